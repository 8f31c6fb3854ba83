//! Accept loops, per-connection HTTP/1.1 serving, and the routing/authorization of each request.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, COOKIE, HOST, LOCATION, SET_COOKIE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::error::json_error;
use crate::forward::{empty, forward, Body, UpgradeGuard, Upstream};
use crate::host::parse_host;
use crate::share::{cookie_tokens, strip_cookies, take_param, SHARE_COOKIE_PREFIX};
use crate::{Proxy, Resolve};

/// What a request's handler knows about its connection.
#[derive(Clone)]
struct Conn {
    peer: IpAddr,
    https: bool,
    permit: Arc<OwnedSemaphorePermit>,
    shutdown: watch::Receiver<()>,
}

impl Proxy {
    /// Serves plain HTTP on `l` until this future is dropped (connections it started, upgraded
    /// ones included, end with it).
    pub async fn serve_http(self: Arc<Self>, l: TcpListener) -> io::Result<()> {
        self.serve(l, None).await
    }

    /// Serves HTTPS on `l` with `tls` (see [`crate::tls_config`]) until this future is dropped.
    pub async fn serve_https(
        self: Arc<Self>,
        l: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> io::Result<()> {
        self.serve(l, Some(TlsAcceptor::from(tls))).await
    }

    async fn serve(self: Arc<Self>, l: TcpListener, tls: Option<TlsAcceptor>) -> io::Result<()> {
        // Dropping the sender (with this future) tells spliced upgrades to stop.
        let (_shutdown_tx, shutdown) = watch::channel(());
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = accept(&self.conns, &l) => match accepted {
                    Ok((permit, tcp, peer)) => {
                        let conn = Conn {
                            peer: peer.ip().to_canonical(),
                            https: tls.is_some(),
                            permit: Arc::new(permit),
                            shutdown: shutdown.clone(),
                        };
                        let this = self.clone();
                        let tls = tls.clone();
                        conns.spawn(async move { this.connection(tcp, tls, conn).await });
                    }
                    Err(e) if transient(&e) => {
                        tracing::warn!(error = %e, "proxy accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                },
            }
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, tls: Option<TlsAcceptor>, conn: Conn) {
        let _ = tcp.set_nodelay(true);
        match tls {
            None => self.serve_conn(tcp, conn).await,
            Some(acceptor) => {
                let hs =
                    tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(tcp));
                match hs.await {
                    Ok(Ok(stream)) => self.serve_conn(stream, conn).await,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = %conn.peer, "TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve_conn<I>(self: Arc<Self>, io: I, conn: Conn)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = conn.peer;
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let conn = conn.clone();
            async move {
                use http_body_util::BodyExt;
                let r = match this.backends.local(req) {
                    Ok(local) => local.await,
                    Err(req) => this.handle(*req, conn).await.map(|b| {
                        b.map_err(|e| -> crate::BoxError { Box::new(e) })
                            .boxed_unsync()
                    }),
                };
                Ok::<_, Infallible>(r)
            }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_header_size(self.limits.max_request_header_bytes)
            .max_headers(self.limits.max_headers)
            .keep_alive(true);
        if let Err(e) = b
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await
        {
            tracing::debug!(%peer, error = %e, "proxy connection ended");
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, conn: Conn) -> Response<Body> {
        if req.method() == hyper::Method::CONNECT {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this is not a forward proxy",
            );
        }
        // In absolute form the request target's authority is the host (RFC 9112 section 3.2.2).
        let host = match req.uri().authority() {
            Some(a) => Some(a.as_str().to_string()),
            None => req
                .headers()
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        };
        let Some(host) = host else {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "missing Host header",
            );
        };
        let Some(target) = parse_host(&host, &self.domain) else {
            return json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!(
                    "no VM is served at this host; use <port>-<vm>.{}",
                    self.domain
                ),
            );
        };
        let (vm, ip, public_ports) = match self.backends.resolve(&target.label) {
            Resolve::Unknown => {
                return json_error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no VM {:?}", target.label),
                )
            }
            Resolve::Stopped { vm } => {
                return json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "vm_not_running",
                    &format!("VM {vm} is not running; start it and retry"),
                )
            }
            Resolve::Running {
                vm,
                ip,
                public_ports,
            } => (vm, Some(ip), public_ports),
            Resolve::Paused { vm, public_ports } => (vm, None, public_ports),
        };
        let port = target.port;

        if let Some((token, rest)) = req.uri().query().and_then(take_param) {
            return match self.verify_share(&token, &vm, port) {
                Some(claims) => {
                    // Absolute, on the host just validated: a path like `//elsewhere` cannot
                    // turn this into an open redirect.
                    let scheme = if conn.https { "https" } else { "http" };
                    let path = req.uri().path();
                    let mut location = format!("{scheme}://{}{path}", host.to_ascii_lowercase());
                    if !rest.is_empty() {
                        location.push('?');
                        location.push_str(&rest);
                    }
                    let max_age = claims.expires.saturating_sub(crate::share::now_unix());
                    let secure = if conn.https { "; Secure" } else { "" };
                    let cookie = format!(
                        "{SHARE_COOKIE_PREFIX}{port}={token}; HttpOnly{secure}; SameSite=Lax; Path=/; Max-Age={max_age}"
                    );
                    redirect(&location, &cookie)
                }
                None => json_error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this share link is invalid or has expired",
                ),
            };
        }

        let allowed = public_ports.contains(&port)
            || public_ports.contains(&0)
            || bearer(&req).is_some_and(|t| self.backends.authorize(&vm, t))
            || cookie_tokens(cookie_values(&req), port)
                .any(|t| self.verify_share(t, &vm, port).is_some());
        if !allowed {
            let mut r = json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                &format!(
                    "port {port} of VM {vm} is private: send Authorization: Bearer <token> or use a share link"
                ),
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            return r;
        }

        // Share cookies stay with the proxy; other cookies go to the guest.
        let kept = strip_cookies(cookie_values(&req));
        req.headers_mut().remove(COOKIE);
        if let Some(v) = kept.and_then(|k| HeaderValue::from_str(&k).ok()) {
            req.headers_mut().insert(COOKIE, v);
        }
        req.headers_mut().remove(AUTHORIZATION);

        // A paused VM is woken only for a request that may reach it.
        let ip = match ip {
            Some(ip) => ip,
            None => match self.backends.wake(&vm).await {
                Some(ip) => ip,
                None => {
                    return json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "vm_not_running",
                        &format!("VM {vm} is paused and could not be resumed; retry"),
                    )
                }
            },
        };
        self.backends.touched(&vm);
        let host = HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static(""));
        let up = Upstream {
            addr: SocketAddr::new(ip, port),
            dialed: self.backends.dial(&vm, port),
            peer: conn.peer,
            proto: if conn.https { "https" } else { "http" },
            host,
        };
        let guard = UpgradeGuard {
            permit: conn.permit.clone(),
            shutdown: conn.shutdown.clone(),
        };
        forward(req, up, &self.limits, guard).await
    }
}

/// Takes a connection slot, then a connection.
async fn accept(
    slots: &Arc<Semaphore>,
    l: &TcpListener,
) -> io::Result<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    let (tcp, peer) = l.accept().await?;
    Ok((permit, tcp, peer))
}

/// Accept errors that say nothing about the listener itself (a peer gone, out of descriptors).
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

fn cookie_values(req: &Request<Incoming>) -> impl Iterator<Item = &str> {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn redirect(location: &str, cookie: &str) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(cookie) {
        h.insert(SET_COOKIE, v);
    }
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}
