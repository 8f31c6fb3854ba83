//! hutch-proxy: the HTTP(S) front door that exposes VM ports.
//!
//! `https://<port>-<vm>.<domain>/` reaches port `<port>` of VM `<vm>`, and `https://<vm>.<domain>/`
//! reaches its port 80. The daemon supplies a [`Backends`] implementation (name resolution,
//! authorization, activity) and runs [`Proxy::serve_http`] / [`Proxy::serve_https`] on its
//! listeners. Ports are private by default: a request passes when the port is public, when it
//! carries `Authorization: Bearer <token>` accepted by [`Backends::authorize`], or when it carries
//! a valid share cookie obtained through a [`Proxy::share_link`] URL. See `docs/proxy.md`.

mod error;
mod forward;
mod host;
mod server;
mod share;
mod tls;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub use error::ProxyError;
pub use host::{parse_host, Target};
pub use share::{ShareClaims, SHARE_COOKIE_PREFIX, SHARE_PARAM};
pub use tls::{ca_pem, tls_config, TlsSource};

/// What a host's VM label names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolve {
    /// No such VM: 404.
    Unknown,
    /// The VM exists but is not running: 503.
    Stopped { vm: String },
    /// The VM runs at `ip`; `public_ports` are reachable without credentials (a 0 among them
    /// stands for every port).
    Running {
        vm: String,
        ip: IpAddr,
        public_ports: Vec<u16>,
    },
    /// The VM is paused and resumes when used: a request that passes the checks a running
    /// VM's would is held while [`Backends::wake`] resumes it, then forwarded.
    Paused { vm: String, public_ports: Vec<u16> },
}

/// What [`Backends::wake`] returns: the VM's address once it runs again, or None (503).
pub type Waking<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<IpAddr>> + Send + 'a>>;

/// A byte stream to a VM's port that the daemon opened itself ([`Backends::dial`]).
pub trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Conn for T {}

/// What [`Backends::dial`] returns: the connection, or why there is none (502).
pub type Dialing<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Box<dyn Conn>, String>> + Send + 'a>>;

/// Errors of a [`LocalBody`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of a response the daemon serves itself.
pub type LocalBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;
/// A response the daemon serves itself (see [`Backends::local`]).
pub type Local =
    std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Response<LocalBody>> + Send>>;

/// The daemon's side of the proxy.
pub trait Backends: Send + Sync + 'static {
    /// Takes a request the daemon answers itself (an API served on the proxy's domain) instead
    /// of a VM's port; gives every other request back. Default: none.
    fn local(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<Local, Box<hyper::Request<hyper::body::Incoming>>> {
        Err(Box::new(req))
    }
    /// `label` is the host's VM part (a VM id or name), lowercase.
    fn resolve(&self, label: &str) -> Resolve;
    /// Whether `bearer` (the token from `Authorization: Bearer`) may use VM `vm`.
    fn authorize(&self, vm: &str, bearer: &str) -> bool;
    /// Called for every proxied request (activity, for auto-pause). Default no-op.
    fn touched(&self, _vm: &str) {}
    /// Resumes paused VM `vm` for an authorized request; its address once it runs.
    fn wake(&self, _vm: &str) -> Waking<'_> {
        Box::pin(async { None })
    }
    /// Opens the connection to port `port` of VM `vm` (running, the request authorized) when the
    /// proxy cannot reach the VM's address itself: a VM on another node, through that node.
    /// Default: None, the proxy connects to the address.
    fn dial(&self, _vm: &str, _port: u16) -> Option<Dialing<'static>> {
        None
    }
}

/// What the proxy serves and how it signs share links.
#[derive(Clone)]
pub struct ProxyConfig {
    /// The base domain, e.g. `hutch.example.com` (VM hosts are one label below it).
    pub domain: String,
    /// HMAC-SHA256 key for share tokens. Keep it secret and stable across restarts.
    pub share_key: Vec<u8>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("domain", &self.domain)
            .field("share_key", &"<redacted>")
            .finish()
    }
}

/// Bounds on what clients and guests may make the proxy hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once (plain and TLS each count; upgraded connections too).
    /// Further connections wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send a complete request head (slowloris), and a TLS handshake.
    pub header_read_timeout: Duration,
    /// Largest request head (request line + headers) from a client, in bytes: 431 beyond it.
    pub max_request_header_bytes: usize,
    /// Largest response head from a guest, in bytes: 502 beyond it.
    pub max_response_header_bytes: usize,
    /// Most header fields in a request or response.
    pub max_headers: usize,
    /// Time to open the TCP connection to the guest port: 502 beyond it.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            max_request_header_bytes: 64 * 1024,
            max_response_header_bytes: 64 * 1024,
            max_headers: 100,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The proxy: cheap to share behind an `Arc`, one per daemon.
pub struct Proxy {
    cfg: ProxyConfig,
    /// `cfg.domain`, lowercase, without a trailing dot.
    domain: String,
    backends: Arc<dyn Backends>,
    limits: Limits,
    conns: Arc<tokio::sync::Semaphore>,
}

impl Proxy {
    /// A proxy with the default [`Limits`].
    pub fn new(cfg: ProxyConfig, backends: Arc<dyn Backends>) -> Self {
        Self::with_limits(cfg, backends, Limits::default())
    }

    /// A proxy with the given limits (`max_connections` at least 1; header sizes at least 8 KiB).
    pub fn with_limits(cfg: ProxyConfig, backends: Arc<dyn Backends>, mut limits: Limits) -> Self {
        limits.max_connections = limits.max_connections.max(1);
        limits.max_request_header_bytes = limits.max_request_header_bytes.max(8192);
        limits.max_response_header_bytes = limits.max_response_header_bytes.max(8192);
        limits.max_headers = limits.max_headers.max(1);
        let domain = cfg.domain.trim_end_matches('.').to_ascii_lowercase();
        let conns = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        Proxy {
            cfg,
            domain,
            backends,
            limits,
            conns,
        }
    }

    /// The configured domain (lowercase).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A URL that grants its holder access to `port` of VM `vm` (reached through the host label
    /// `vm_label`, an id or a name) for `ttl`: `SCHEME://<port>-<label>.<domain>/?hutch_share=T`.
    pub fn share_link(
        &self,
        vm_label: &str,
        vm: &str,
        port: u16,
        ttl: Duration,
        scheme: &str,
    ) -> String {
        let exp = share::now_unix().saturating_add(ttl.as_secs());
        let token = share::sign(&self.cfg.share_key, vm, port, exp);
        format!(
            "{scheme}://{port}-{}.{}/?{SHARE_PARAM}={token}",
            vm_label.to_ascii_lowercase(),
            self.domain
        )
    }

    /// Checks a share token for `vm`/`port` now; the claims when it is good.
    pub fn verify_share(&self, token: &str, vm: &str, port: u16) -> Option<ShareClaims> {
        share::verify(&self.cfg.share_key, token, vm, port, share::now_unix())
    }
}
