//! hutch's DNS: the resolver its VMs use, and an optional public listener for hutch's domain.
//!
//! * [`serve_guest`]: answers `<vm>` and `<vm>.<domain>` from the [`Directory`] (only VMs of the
//!   asking VM's own account), forwards every other name the client's egress rules allow to the
//!   upstream servers, and tells the directory which addresses those names resolved to.
//! * [`serve_public`]: authoritative for `<domain>`, `<vm>.<domain>` and `*.<vm>.<domain>`;
//!   refuses every other name, so it is never an open resolver.
//!
//! Messages are parsed and built with `hickory-proto`. The UDP and TCP loops are this crate's
//! own, not `hickory-server`'s: forwarding relays the upstream's answer as it came (which the
//! `hickory-server` response API, built from record iterators per section, makes awkward), and
//! every bound a hostile peer could push on (TCP connections, idle time, message sizes,
//! upstream queries in flight) is set and tested here. See `docs/dns.md`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

mod guest;
mod names;
mod public;
mod server;
mod upstream;

use names::Labels;

/// What the daemon knows about VMs, accounts and egress rules. Every method is called on the
/// listener's task and must be quick (an in-memory look-up), never block.
pub trait Directory: Send + Sync + 'static {
    /// The IPv4 address of the VM called `vm` (a VM name or id, lowercase) as seen by the VM
    /// whose address is `client`: Some only when both belong to the same account.
    fn vm_address(&self, client: Ipv4Addr, vm: &str) -> Option<Ipv4Addr>;
    /// Whether a name outside hutch's domain may be resolved for `client` (egress rules by domain).
    /// `fqdn` is lowercase, without a trailing dot, and each label holds only ASCII letters,
    /// digits, '-' and '_' (other names are refused before this is asked).
    fn may_resolve(&self, client: Ipv4Addr, fqdn: &str) -> bool;
    /// Called with the A records the upstream answered for `fqdn` to `client` (after may_resolve
    /// said yes), so the daemon can add them to the VM's allowed-address set. `ttl` in seconds.
    /// The records are those of `fqdn` and of the CNAME chain starting at it; `ttl` is the least
    /// TTL among them. Not called when there are none.
    fn resolved(&self, client: Ipv4Addr, fqdn: &str, addrs: &[Ipv4Addr], ttl: u32);
    /// Public listener: whether `label` (the label right before the domain) names a VM.
    /// `label` is lowercase ASCII letters, digits, '-' and '_'.
    fn public_vm(&self, label: &str) -> bool;
    /// Public listener: the address `label`'s names answer with, when it is not the listener's
    /// configured one (hutchd's `--ssh-pool` gives each VM its own).
    fn public_address(&self, _label: &str) -> Option<Ipv4Addr> {
        None
    }
}

/// The guest resolver's configuration.
#[derive(Clone, Debug)]
pub struct GuestDns {
    /// hutch's domain, e.g. `hutch.internal` (a trailing dot is allowed).
    pub domain: String,
    /// Where to listen, UDP and TCP (port 0: any port free for both).
    pub listen: SocketAddr,
    /// Servers to forward to, asked in order (see [`host_upstreams`]). Empty: every forwarded
    /// question is answered SERVFAIL.
    pub upstream: Vec<SocketAddr>,
}

/// The public listener's configuration.
#[derive(Clone, Debug)]
pub struct PublicDns {
    /// hutch's domain, e.g. `sandbox.example.com`.
    pub domain: String,
    /// Where to listen, UDP and TCP (port 0: any port free for both).
    pub listen: SocketAddr,
    /// The address every public name resolves to (the host's HTTPS proxy).
    pub address: Ipv4Addr,
}

/// Bounds on what peers can make a listener hold. [`Limits::default`] is what [`serve_guest`]
/// and [`serve_public`] use.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open TCP connections; one more is accepted and closed at once.
    pub max_tcp_connections: usize,
    /// How long a TCP connection may take to send the next query, or to take an answer.
    pub tcp_idle: Duration,
    /// Largest query accepted (UDP datagram or TCP message); larger ones are dropped (UDP) or
    /// close the connection (TCP).
    pub max_query_len: usize,
    /// Questions being forwarded at once; one more is answered SERVFAIL.
    pub max_upstream_in_flight: usize,
    /// How long one upstream server may take (UDP and the TCP retry together).
    pub upstream_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tcp_connections: 256,
            tcp_idle: Duration::from_secs(10),
            max_query_len: 4096,
            max_upstream_in_flight: 512,
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS domain {0:?}")]
    Domain(String),
    #[error("invalid DNS limits: {0}")]
    Limits(&'static str),
    #[error("cannot listen for DNS on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running listener (UDP and TCP). Dropping it stops it too, without waiting.
pub struct DnsServer {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// The addresses actually bound: (UDP, TCP).
    pub fn local_addrs(&self) -> (SocketAddr, SocketAddr) {
        (self.udp_addr, self.tcp_addr)
    }

    /// Stops listening, closes the TCP connections, abandons questions in flight, and waits
    /// until the sockets are closed.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn check(limits: &Limits) -> Result<(), DnsError> {
    if limits.max_tcp_connections == 0 || limits.max_upstream_in_flight == 0 {
        return Err(DnsError::Limits(
            "connection and in-flight limits must be > 0",
        ));
    }
    if !(512..=65535).contains(&limits.max_query_len) {
        return Err(DnsError::Limits("max_query_len must be within 512..=65535"));
    }
    if limits.tcp_idle.is_zero() || limits.upstream_timeout.is_zero() {
        return Err(DnsError::Limits("timeouts must be > 0"));
    }
    Ok(())
}

async fn start<H: server::Handler>(
    listen: SocketAddr,
    handler: H,
    limits: Limits,
) -> Result<DnsServer, DnsError> {
    let (udp, tcp) = server::bind(listen).await?;
    let bind_err = |source| DnsError::Bind {
        addr: listen,
        source,
    };
    let udp_addr = udp.local_addr().map_err(bind_err)?;
    let tcp_addr = tcp.local_addr().map_err(bind_err)?;
    let handler = Arc::new(handler);
    let (stop, stopped) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(server::udp_loop(
            Arc::new(udp),
            handler.clone(),
            limits.clone(),
            stopped.clone(),
        )),
        tokio::spawn(server::tcp_loop(tcp, handler, limits, stopped)),
    ];
    tracing::info!(udp = %udp_addr, tcp = %tcp_addr, "dns: listening");
    Ok(DnsServer {
        udp_addr,
        tcp_addr,
        stop,
        tasks,
    })
}

/// Starts the guest resolver with [`Limits::default`].
pub async fn serve_guest(cfg: GuestDns, dir: Arc<dyn Directory>) -> Result<DnsServer, DnsError> {
    serve_guest_with(cfg, dir, Limits::default()).await
}

/// Starts the guest resolver with the given bounds.
pub async fn serve_guest_with(
    cfg: GuestDns,
    dir: Arc<dyn Directory>,
    limits: Limits,
) -> Result<DnsServer, DnsError> {
    check(&limits)?;
    let domain = Labels::parse_domain(&cfg.domain).ok_or(DnsError::Domain(cfg.domain.clone()))?;
    // Never forward to ourselves.
    let upstreams: Vec<SocketAddr> = cfg
        .upstream
        .iter()
        .copied()
        .filter(|u| *u != cfg.listen || cfg.listen.port() == 0)
        .collect();
    let handler = guest::Guest {
        domain,
        dir,
        upstreams: upstreams.into(),
        in_flight: Arc::new(Semaphore::new(limits.max_upstream_in_flight)),
        per_server: limits.upstream_timeout,
    };
    start(cfg.listen, handler, limits).await
}

/// Starts the public listener with [`Limits::default`].
pub async fn serve_public(cfg: PublicDns, dir: Arc<dyn Directory>) -> Result<DnsServer, DnsError> {
    serve_public_with(cfg, dir, Limits::default()).await
}

/// Starts the public listener with the given bounds.
pub async fn serve_public_with(
    cfg: PublicDns,
    dir: Arc<dyn Directory>,
    limits: Limits,
) -> Result<DnsServer, DnsError> {
    check(&limits)?;
    let domain = Labels::parse_domain(&cfg.domain).ok_or(DnsError::Domain(cfg.domain.clone()))?;
    let handler = public::Public::new(domain, cfg.address, dir)
        .ok_or(DnsError::Domain(cfg.domain.clone()))?;
    start(cfg.listen, handler, limits).await
}

/// The nameservers of the host's `/etc/resolv.conf`, port 53; empty when it cannot be read.
pub fn host_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

/// The `nameserver` lines of a resolv.conf text, port 53, at most 8; lines that do not parse
/// (IPv6 with a zone, names) are skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let addr = SocketAddr::new(ip, 53);
        if !out.contains(&addr) && out.len() < 8 {
            out.push(addr);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nnameserver 10.0.0.2\nsearch example.com\n nameserver  ::1 \n\
                    nameserver fe80::1%eth0\nnameserver 10.0.0.2\nnameserverx 1.1.1.1\n\
                    ;nameserver 9.9.9.9\noptions ndots:2\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert!(parse_resolv_conf("").is_empty());
    }

    #[test]
    fn limits_are_checked() {
        assert!(check(&Limits::default()).is_ok());
        let bad = Limits {
            max_query_len: 100,
            ..Limits::default()
        };
        assert!(check(&bad).is_err());
    }
}
