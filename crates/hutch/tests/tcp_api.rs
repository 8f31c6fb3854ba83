//! The REST API on TCP against hostile and careless clients: TLS on a non-loopback listener with
//! a certificate hutchd makes (plain HTTP refused there), the CLI over https, a deadline on each
//! request's headers, a cap on open connections, and a private key hutchd refuses to use once
//! others may read it. No VM boots.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

/// Whether the server closes `s` within `within` (read returns EOF or an error).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A TLS connection (rustls, trusting `cert`) to 127.0.0.1:`port`, handshake done.
fn tls_client(
    port: u16,
    cert: &std::path::Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

#[test]
fn tcp_api_tls_deadlines_and_caps() {
    let port = free_port();
    let mut d = Daemon::start(&[
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--max-connections",
        "3",
        "--http-header-timeout",
        "2",
    ]);
    let cert = d.data().join("tls/cert.pem");
    let key = d.data().join("tls/key.pem");
    assert!(
        cert.exists(),
        "a non-loopback listener gets hutchd's own certificate"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(d.data().join("api-token")).unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let cli = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hutch"))
            .args(["--url", &url, "--token", token.trim()])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = cli(&["--ca-cert", cert.to_str().unwrap(), "--json", "ls"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    let o = cli(&["--json", "ls"]);
    assert!(!o.status.success(), "an untrusted certificate is refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("TLS"), "{o:?}");
    let o = cli(&[
        "--ca-cert",
        cert.to_str().unwrap(),
        "--token",
        "wrong",
        "ls",
    ]);
    assert!(!o.status.success(), "TLS does not replace the token");

    // Plain HTTP gets no answer on a TLS listener.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let r = http(
        &mut s,
        "GET",
        "/api/v1/health",
        None,
        "application/json",
        Some(token.trim()),
    );
    assert!(r.map(|(st, _)| st != 200).unwrap_or(true));

    // A client that never starts its TLS handshake, and one that never finishes its request
    // headers after it, are both cut at the deadline.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let t = Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(6)),
        "silent client cut"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    let mut slow = tls_client(port, &cert);
    slow.write_all(b"GET /api/v1/hea").unwrap();
    slow.flush().unwrap();
    let t = Instant::now();
    slow.sock
        .set_read_timeout(Some(Duration::from_secs(6)))
        .unwrap();
    let mut b = [0u8; 64];
    let r = slow.read(&mut b);
    assert!(
        matches!(r, Ok(0) | Err(_)) || String::from_utf8_lossy(&b).contains("408"),
        "{r:?}"
    );
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(6)).contains(&t.elapsed()),
        "{:?}",
        t.elapsed()
    );

    // Three idle connections fill the cap: a fourth is closed at once; once the deadline cuts
    // the idle ones, clients get in again.
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(
        closed_within(&mut fourth, Duration::from_millis(1000)),
        "over the cap"
    );
    for s in &mut idle {
        assert!(closed_within(s, Duration::from_secs(6)));
    }
    let ok = wait_until(Duration::from_secs(5), || {
        cli(&["--ca-cert", cert.to_str().unwrap(), "ls"])
            .status
            .success()
            .then_some(())
    });
    assert!(ok.is_some(), "clients get in again");

    // A private key others may read is refused at start.
    d.kill9();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hutchd"))
        .arg("--data-dir")
        .arg(d.data())
        .args([
            "--ssh-listen",
            "off",
            "--network",
            "off",
            "--listen",
            &format!("0.0.0.0:{port}"),
        ])
        .arg("--boot-cache")
        .arg(workspace().join("target/hutch-test-boot"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}
