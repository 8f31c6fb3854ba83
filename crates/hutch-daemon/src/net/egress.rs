//! The Host / TLS SNI check for VMs whose egress is allowed by domain (`--allow-out NAME`).
//! nftables sends their TCP 80 and 443 to this listener on the gateway; it reads the request's
//! first bytes, takes the name (HTTP `Host`, or the TLS ClientHello's server name), and passes
//! the connection on to its original destination only when the VM's rules allow that name (or
//! the address is allowed by CIDR) and do not deny either. So an allowed name's address does not
//! open every other site served there.

use super::{vm_at, VmNetwork};
use crate::records::Records;
use hutch_core::net::{EgressRule, NetMode};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Bytes read for the name: HTTP headers or one TLS record.
const MAX_HELLO: usize = 16 * 1024 + 5;
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being checked or passed on, from all VMs together.
const MAX_CONNECTIONS: usize = 1024;

/// The destination a connection had before nftables sent it here.
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fd is an open socket; `sa`/`len` are valid for writes of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            &mut sa as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// The `Host` of an HTTP request head (without a port), lowercase.
pub fn http_host(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let end = text.find("\r\n\r\n")?;
    text[..end].split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("host")
            .then(|| v.trim().rsplit_once(':').map_or(v.trim(), |(h, _)| h))
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
    })
}

/// The server name of a TLS ClientHello in the first record of `b`, lowercase.
pub fn tls_sni(b: &[u8]) -> Option<String> {
    // Record: type 22 (handshake), version, length; then handshake type 1 (ClientHello).
    if b.len() < 9 || b[0] != 22 || b[5] != 1 {
        return None;
    }
    let rec_len = u16::from_be_bytes([b[3], b[4]]) as usize;
    let body = b.get(5..5 + rec_len)?;
    let mut p = 4 + 2 + 32; // handshake header, client version, random
    let sid = *body.get(p)? as usize;
    p += 1 + sid;
    let suites = u16::from_be_bytes([*body.get(p)?, *body.get(p + 1)?]) as usize;
    p += 2 + suites;
    let comp = *body.get(p)? as usize;
    p += 1 + comp;
    let ext_len = u16::from_be_bytes([*body.get(p)?, *body.get(p + 1)?]) as usize;
    p += 2;
    let exts = body.get(p..p + ext_len)?;
    let mut q = 0;
    while q + 4 <= exts.len() {
        let kind = u16::from_be_bytes([exts[q], exts[q + 1]]);
        let len = u16::from_be_bytes([exts[q + 2], exts[q + 3]]) as usize;
        let data = exts.get(q + 4..q + 4 + len)?;
        if kind == 0 {
            // server_name list: length, then (type 0 = host_name, length, name).
            let name_len = u16::from_be_bytes([*data.get(3)?, *data.get(4)?]) as usize;
            let name = std::str::from_utf8(data.get(5..5 + name_len)?).ok()?;
            return Some(name.trim_end_matches('.').to_ascii_lowercase());
        }
        q += 4 + len;
    }
    None
}

/// Whether the VM's rules let it reach `name` at `dst`: not denied by name or address, and
/// allowed by address, or by name at an address hutch's resolver gave the VM (`resolved`), so
/// that claiming an allowed name opens no other address.
pub fn allowed(
    allow: &[EgressRule],
    deny: &[EgressRule],
    name: &str,
    dst: Ipv4Addr,
    resolved: bool,
) -> bool {
    let by_net = |rules: &[EgressRule]| {
        rules
            .iter()
            .any(|r| matches!(r, EgressRule::Net(n) if n.contains(dst)))
    };
    let by_name = |rules: &[EgressRule]| rules.iter().any(|r| r.covers(name));
    if by_net(deny) || by_name(deny) {
        return false;
    }
    by_net(allow) || (resolved && by_name(allow))
}

/// Reads the request's first bytes until a name can be told (or the bound or deadline passes).
async fn first_bytes(s: &TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_HELLO];
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    loop {
        let got = tokio::time::timeout_at(deadline, s.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if got == 0 {
            return None;
        }
        let b = &buf[..got];
        let complete = if b.first() == Some(&22) {
            b.len() >= 5 && b.len() >= 5 + u16::from_be_bytes([b[3], b[4]]) as usize
        } else {
            b.windows(4).any(|w| w == b"\r\n\r\n")
        };
        if complete || got == buf.len() {
            return Some(b.to_vec());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn handle(mut s: TcpStream, peer: SocketAddr, records: Records, net: Arc<VmNetwork>) {
    let std::net::IpAddr::V4(src) = peer.ip() else {
        return;
    };
    let (Some(vm), Ok(dst)) = (vm_at(&records, src), original_dst(&s)) else {
        return;
    };
    // Only redirected connections have somewhere to go: nftables sends outside addresses here,
    // so a destination on the VM network (this listener itself, reached directly) is refused
    // rather than connected back to.
    if vm.net.mode != NetMode::Internet
        || dst.ip().is_loopback()
        || net.settings.cfg.subnet.contains(*dst.ip())
    {
        return;
    }
    let Some(head) = first_bytes(&s).await else {
        return;
    };
    let name = tls_sni(&head).or_else(|| http_host(&head));
    let resolved = net.was_resolved(&vm.id, *dst.ip());
    let ok = name
        .as_deref()
        .is_some_and(|n| allowed(&vm.net.allow_out, &vm.net.deny_out, n, *dst.ip(), resolved));
    if !ok {
        tracing::info!(vm = %vm.name, name = ?name, %dst, "egress refused by name");
        if dst.port() == 80 {
            let _ = s
                .write_all(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
        return;
    }
    let Ok(Ok(mut out)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await
    else {
        return;
    };
    // The peeked bytes are still in `s`: the splice sends them on.
    let _ = tokio::io::copy_bidirectional(&mut s, &mut out).await;
}

/// Serves the check on the gateway until the task is dropped.
pub async fn serve(net: Arc<VmNetwork>, records: Records) -> std::io::Result<()> {
    let cfg = &net.settings.cfg;
    let listen = SocketAddr::new(cfg.gateway().into(), cfg.egress_port);
    let l = TcpListener::bind(listen).await?;
    tracing::info!(%listen, "Host/SNI check for egress allowed by domain");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (s, peer) = match l.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (records, net) = (records.clone(), net.clone());
        tokio::spawn(async move {
            let _slot = slot;
            handle(s, peer, records, net).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_http_and_tls() {
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nhost: Example.COM:8080\r\nX: y\r\n\r\n").as_deref(),
            Some("example.com")
        );
        assert_eq!(http_host(b"GET / HTTP/1.0\r\n\r\n"), None);
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: a.b"),
            None,
            "incomplete head"
        );
        // A real ClientHello, from rustls.
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut c =
            rustls::ClientConnection::new(Arc::new(cfg), "pypi.org".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        c.write_tls(&mut hello).unwrap();
        assert_eq!(tls_sni(&hello).as_deref(), Some("pypi.org"));
        for cut in [0, 5, 20, hello.len() - 1] {
            assert_eq!(tls_sni(&hello[..cut]), None, "cut at {cut}");
        }
        assert_eq!(tls_sni(b"\x16\x03\x01\xff\xff\x01garbage"), None);
    }

    #[test]
    fn rules_decide() {
        let r = |s: &[&str]| -> Vec<EgressRule> { s.iter().map(|x| x.parse().unwrap()).collect() };
        let ip: Ipv4Addr = "1.2.3.4".parse().unwrap();
        let (pypi, files) = (r(&["pypi.org"]), r(&["files.pypi.org"]));
        assert!(allowed(&pypi, &[], "files.pypi.org", ip, true));
        assert!(
            !allowed(&pypi, &[], "files.pypi.org", ip, false),
            "an allowed name at an address it did not resolve to"
        );
        assert!(!allowed(&pypi, &[], "evil.com", ip, true));
        assert!(allowed(&r(&["1.2.3.0/24"]), &[], "anything.com", ip, false));
        assert!(!allowed(&pypi, &files, "files.pypi.org", ip, true));
        assert!(!allowed(&pypi, &r(&["1.2.3.4"]), "pypi.org", ip, true));
    }
}
