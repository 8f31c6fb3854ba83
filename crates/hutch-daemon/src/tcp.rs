//! The REST API on TCP, for remote clients: TLS (a certificate the admin supplies, or one hutchd
//! makes and keeps in `DATA_DIR/tls/`), plain HTTP only on a loopback address; a cap on open
//! connections; a deadline for the TLS handshake and for each request's headers, so idle or slow
//! clients cannot hold the listener.

use crate::DaemonError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How the TCP listener is set up.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    pub listen: SocketAddr,
    /// PEM certificate chain and private key; both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_connections: usize,
    /// For the TLS handshake and for each request's headers.
    pub header_timeout: Duration,
}

fn setup(m: impl std::fmt::Display) -> DaemonError {
    DaemonError::Setup(m.to_string())
}

/// Where hutchd keeps the certificate it makes for itself (clients trust `cert.pem`).
pub fn self_made_cert(data_dir: &Path) -> (PathBuf, PathBuf) {
    let d = data_dir.join("tls");
    (d.join("cert.pem"), d.join("key.pem"))
}

/// The TLS configuration for `opts`: None (plain HTTP) only for a loopback address without a
/// certificate; a non-loopback address without one gets a certificate hutchd makes.
pub fn tls_config(
    data_dir: &Path,
    opts: &TcpOptions,
) -> Result<Option<Arc<rustls::ServerConfig>>, DaemonError> {
    let (cert, key) = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) if opts.listen.ip().is_loopback() => return Ok(None),
        (None, None) => {
            let (c, k) = self_made_cert(data_dir);
            if !c.exists() || crate::secrets::read(&k).map_err(setup)?.is_none() {
                make_cert(&c, &k, opts.listen)?;
            }
            tracing::info!(cert = %c.display(), "TLS with hutchd's own certificate; clients trust it with --ca-cert");
            (c, k)
        }
        _ => return Err(setup("give both --tls-cert and --tls-key, or neither")),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| setup(format!("TLS certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(setup(format!("{} holds no certificate", cert.display())));
    }
    let key_pem = crate::secrets::read(&key)
        .map_err(setup)?
        .ok_or_else(|| setup(format!("TLS key {} does not exist", key.display())))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| setup(format!("TLS key {}: {e}", key.display())))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(setup)?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| setup(format!("TLS certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(cfg)))
}

/// A self-signed certificate for this host's names and the listen address.
fn make_cert(cert: &Path, key: &Path, listen: SocketAddr) -> Result<(), DaemonError> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if !host.is_empty() {
        names.push(host);
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(setup)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hutchd");
    let pair = rcgen::KeyPair::generate().map_err(setup)?;
    let c = params.self_signed(&pair).map_err(setup)?;
    if let Some(d) = cert.parent() {
        std::fs::create_dir_all(d).map_err(setup)?;
    }
    // Both atomically (a crash leaves the pair whole or absent), the certificate last: its
    // presence is what says the pair is there.
    crate::secrets::write(key, pair.serialize_pem().as_bytes()).map_err(setup)?;
    crate::secrets::write(cert, c.pem().as_bytes()).map_err(setup)?;
    Ok(())
}

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    opts: TcpOptions,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Streams (exec, node links) carry small writes both ways: no Nagle delays on them.
        let _ = sock.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "tcp connection refused: too many open connections");
            drop(sock);
            continue;
        };
        // The peer for handlers that ask (`ConnectInfo`: the metadata service knows VMs by it).
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let (acceptor, timeout) = (acceptor.clone(), opts.header_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper_util::service::TowerToHyperService::new(app);
            // HTTP/1.1 and HTTP/2 (h2c by its preface in plain text, ALPN under TLS).
            let mut http =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            // A client may shut its sending side down once the request is out (busybox nc
            // does): answer it still.
            http.http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .half_close(true);
            http.http2().timer(hyper_util::rt::TokioTimer::new());
            let r = match acceptor {
                Some(a) => match tokio::time::timeout(timeout, a.accept(sock)).await {
                    Ok(Ok(s)) => {
                        http.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
                            .await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                None => {
                    http.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(sock), svc)
                        .await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
}
