//! Any node is a front door: a REST request about a VM that runs on another node (exec,
//! files, logs, ports, ...) is forwarded, streamed both ways, to that node's API at its
//! `--advertise` address. The forwarded request carries the caller's own bearer token (every
//! token and JWT is valid on every node: the secrets are shared), or, for a caller on this
//! node's unix socket, the cluster's admin token; the owner authorizes it again, on the VM it
//! resolves. `X-Hutch-Forwarded-By` marks it, so it is never forwarded twice.
//!
//! Lifecycle operations (create, start, stop, pause, resume, delete) are not forwarded: the
//! service runs them on the owner through the store (intents.rs).

use crate::api::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use hutch_store::kv::Store;

pub const FORWARDED_BY: &str = "x-hutch-forwarded-by";

/// Sub-paths of `/api/v1/sandboxes/{name}/` the service itself routes (through intents).
const SERVICE_ROUTED: &[&str] = &["start", "stop", "pause", "resume"];

/// The VM name a path is about, when it is a data-plane path under `/api/v1/sandboxes/{name}/`.
fn vm_of_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/sandboxes/")?;
    let (name, sub) = rest.split_once('/')?;
    if name.is_empty() || sub.is_empty() || SERVICE_ROUTED.contains(&sub) {
        return None;
    }
    Some(percent_decode(name))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The middleware: forwards what belongs to another node, passes the rest on.
pub async fn forward(
    axum::extract::State(m): axum::extract::State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(c) = m.cluster.get().cloned() else {
        return next.run(req).await;
    };
    if req.headers().contains_key(FORWARDED_BY) {
        return next.run(req).await;
    }
    let Some(name) = vm_of_path(req.uri().path()) else {
        return next.run(req).await;
    };
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return next.run(req).await;
    };
    let Ok(vm) = m.vm_for(&caller, &name).await else {
        return next.run(req).await;
    };
    if m.records.is_local(&vm) {
        return next.run(req).await;
    }
    let Some(node) = vm.node.clone() else {
        return next.run(req).await;
    };
    match to_node(&m, &c, &node, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn to_node(
    m: &AppState,
    c: &super::Cluster,
    node: &str,
    req: Request,
) -> Result<Response, ApiError> {
    if !m.node_live(node).await? {
        return Err(ApiError::Capacity(format!(
            "the VM is lost: its node {node} is down"
        )));
    }
    Ok(node_request(m, c, node, req).await?.map(Body::new))
}

/// Sends `req` (path and query; any body) to node `node`'s API (the caller has checked that it
/// is live): to its advertised address,
/// over TLS pinned to the certificate it recorded, with the caller's bearer token or else the
/// cluster's admin token, marked forwarded.
pub(crate) async fn node_request(
    m: &crate::service::Service,
    c: &super::Cluster,
    node: &str,
    req: Request,
) -> Result<axum::http::Response<hyper::body::Incoming>, ApiError> {
    to_listener(m, c, node, req, Listener::Api).await
}

/// Opens a raw byte stream to node `node` (live: the caller checked): `POST path` upgraded to
/// protocol [`UPGRADE`], over TLS pinned as for forwarding, with the admin token, acting for
/// account `act_as` when given ([`ACT_AS`](crate::auth::ACT_AS)). A refusal is the node's error.
pub(crate) async fn node_upgrade(
    m: &crate::service::Service,
    c: &super::Cluster,
    node: &str,
    path: &str,
    act_as: Option<&str>,
) -> Result<hyper::upgrade::Upgraded, ApiError> {
    Ok(node_upgrade_headers(m, c, node, path, act_as).await?.0)
}

/// [`node_upgrade`], with the headers of the far end's 101.
pub(crate) async fn node_upgrade_headers(
    m: &crate::service::Service,
    c: &super::Cluster,
    node: &str,
    path: &str,
    act_as: Option<&str>,
) -> Result<(hyper::upgrade::Upgraded, axum::http::HeaderMap), ApiError> {
    let mut req = Request::builder()
        .method("POST")
        .uri(path)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE);
    if let Some(a) = act_as {
        req = req.header(crate::auth::ACT_AS, a);
    }
    let req = req
        .body(Body::empty())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let resp = to_listener(m, c, node, req, Listener::Api).await?;
    if resp.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(ApiError::from_remote(
            status,
            &body[..body.len().min(4096)],
            node,
        ));
    }
    let headers = resp.headers().clone();
    let up = hyper::upgrade::on(resp)
        .await
        .map_err(|e| ApiError::Internal(format!("node {node}: upgrading {path}: {e}")))?;
    Ok((up, headers))
}

/// Refuses a node-to-node request (`what`) that did not bear the cluster's admin token.
pub(crate) fn node_only(
    token: &Option<axum::Extension<crate::auth::NodeToken>>,
    what: &str,
) -> Result<(), ApiError> {
    match token {
        Some(_) => Ok(()),
        None => Err(ApiError::Forbidden(format!(
            "{what} is node to node: it needs the cluster's admin token"
        ))),
    }
}

/// The protocol name of node-to-node byte streams.
pub(crate) const UPGRADE: &str = "hutch-stream";

/// Answers `req` (which must ask to upgrade to [`UPGRADE`]) with 101, then runs `then` on the
/// byte stream (`what` names it in a log line when the upgrade fails).
pub(crate) fn upgrade_with<F, Fut>(
    mut req: Request,
    what: &'static str,
    then: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(UPGRADE.as_bytes()));
    if !wants {
        return Err(ApiError::Invalid(format!(
            "this is a byte stream: send Connection: upgrade, Upgrade: {UPGRADE}"
        )));
    }
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on.await {
            Ok(up) => then(hyper_util::rt::TokioIo::new(up)).await,
            Err(e) => tracing::warn!(error = %e, "{what} was not upgraded"),
        }
    });
    Response::builder()
        .status(axum::http::StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE)
        .body(Body::empty())
        .map_err(crate::node::internal)
}

/// Which of a node's listeners a request goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// The REST API (`--advertise`); requests without a token get the admin token.
    Api,
    /// The E2B API (`--e2b-listen`'s port at the advertised host); requests go as they came.
    E2b,
}

pub(crate) async fn to_listener(
    m: &crate::service::Service,
    c: &super::Cluster,
    node: &str,
    mut req: Request,
    to: Listener,
) -> Result<axum::http::Response<hyper::body::Incoming>, ApiError> {
    let rec = c
        .store
        .get(&format!("{}{node}", super::nodes::NODES))
        .await?
        .and_then(|kv| serde_json::from_slice::<super::nodes::NodeRecord>(&kv.value).ok());
    let (addr, tls_cert) = match (rec, to) {
        (Some(r), Listener::Api) => (r.advertise, r.tls_cert),
        (Some(r), Listener::E2b) => (r.e2b, r.e2b_tls_cert),
        (None, _) => (None, None),
    };
    let addr = addr.ok_or_else(|| {
        ApiError::Capacity(format!(
            "node {node} has no advertised address for this (--advertise, and --e2b-listen for \
             the E2B API): it cannot be reached from other nodes"
        ))
    })?;
    if to == Listener::Api && !req.headers().contains_key(header::AUTHORIZATION) {
        let token = crate::api_token(&m.cfg().data_dir)
            .map_err(|e| ApiError::Internal(format!("the cluster's admin token: {e}")))?;
        let v = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    let me = HeaderValue::from_str(c.name()).map_err(|e| ApiError::Internal(e.to_string()))?;
    req.headers_mut().insert(FORWARDED_BY, me);
    let host = HeaderValue::from_str(&addr).map_err(|e| ApiError::Internal(e.to_string()))?;
    req.headers_mut().insert(header::HOST, host);
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = pq
        .parse::<Uri>()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::Capacity(format!("node {node} at {addr} cannot be reached: {e}"))
    };
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| unreachable(&e))?;
    // Node links and forwarded streams carry small writes both ways: no Nagle delays.
    let _ = stream.set_nodelay(true);
    let resp = match tls_cert {
        None => send(hyper_util::rt::TokioIo::new(stream), req).await,
        Some(pem) => {
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let s = pinned(&pem, &host, stream)
                .await
                .map_err(|e| unreachable(&e))?;
            send(hyper_util::rt::TokioIo::new(s), req).await
        }
    };
    resp.map_err(|e| unreachable(&e))
}

/// One HTTP/1.1 exchange on `io`.
async fn send<I>(
    io: I,
    req: Request,
) -> Result<axum::http::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        // With upgrades: a migration's streams are upgraded connections (migrate.rs).
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "forwarded connection");
        }
    });
    sender.send_request(req).await
}

/// TLS to a node that trusts exactly the certificate it recorded in etcd. One client
/// configuration per certificate is kept, so connections to a node resume TLS sessions (node
/// links open a connection per stream).
async fn pinned(
    pem: &str,
    host: &str,
    stream: tokio::net::TcpStream,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let cfg = pinned_config(pem)?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?}: {e}"))?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())
}

/// Client configurations by pinned certificate (a handful: one per node).
type Configs = std::collections::HashMap<String, std::sync::Arc<rustls::ClientConfig>>;
static CONFIGS: std::sync::Mutex<Option<Configs>> = std::sync::Mutex::new(None);
/// Configurations kept at most (certificates replaced over time are dropped with the rest).
const MAX_CONFIGS: usize = 64;

fn pinned_config(pem: &str) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    let mut cache = CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    let map = cache.get_or_insert_with(Configs::new);
    if let Some(c) = map.get(pem) {
        return Ok(c.clone());
    }
    let cfg = std::sync::Arc::new(client_config(pem)?);
    if map.len() >= MAX_CONFIGS {
        map.clear();
    }
    map.insert(pem.to_string(), cfg.clone());
    Ok(cfg)
}

fn client_config(pem: &str) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| format!("its recorded certificate: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("its recorded certificate: {e}"))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_plane_paths() {
        assert_eq!(vm_of_path("/api/v1/sandboxes/web/exec"), Some("web".into()));
        assert_eq!(
            vm_of_path("/api/v1/sandboxes/alice%2Fweb/files"),
            Some("alice/web".into())
        );
        assert_eq!(vm_of_path("/api/v1/sandboxes/web/start"), None);
        assert_eq!(vm_of_path("/api/v1/sandboxes/web"), None);
        assert_eq!(vm_of_path("/api/v1/sandboxes"), None);
        assert_eq!(vm_of_path("/api/v1/images/x/y"), None);
        assert_eq!(percent_decode("a%zz%2"), "a%zz%2");
        assert_eq!(percent_decode("é%2F%c3%a9"), "é/é");
    }
}
