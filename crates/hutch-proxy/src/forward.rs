//! Forwarding one request to a guest port over HTTP/1.1, streaming both ways; upgrades (WebSocket
//! and others) are spliced once the guest answers 101.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, FORWARDED, HOST, UPGRADE,
};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::error::json_error;
use crate::Limits;

/// The body of every response the proxy sends.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// Hop-by-hop headers (RFC 9110 section 7.6.1 and the usual non-standard ones).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where and for whom a request is forwarded.
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    /// The connection the daemon opened to it (see `Backends::dial`); None: connect to `addr`.
    pub dialed: Option<crate::Dialing<'static>>,
    /// The client's address (`X-Forwarded-For`).
    pub peer: IpAddr,
    /// `http` or `https` (`X-Forwarded-Proto`).
    pub proto: &'static str,
    /// The host the client asked for (`Host`, `X-Forwarded-Host`).
    pub host: HeaderValue,
}

/// Keeps an upgraded connection's resources: its connection slot, and the serve loop's liveness
/// (the splice ends when the serve loop is dropped).
pub(crate) struct UpgradeGuard {
    pub permit: Arc<OwnedSemaphorePermit>,
    pub shutdown: watch::Receiver<()>,
}

/// The `Upgrade` value when `headers` ask for a protocol upgrade (`Connection: upgrade`).
fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(UPGRADE).cloned()
    } else {
        None
    }
}

/// Removes hop-by-hop headers, including the ones `Connection` names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn bad_gateway(message: &str) -> Response<Body> {
    json_error(StatusCode::BAD_GATEWAY, "bad_gateway", message)
}

/// Sends `req` (already authorized, share cookies already removed) to `up.addr` and returns the
/// guest's response, or a 502 when the guest cannot be reached or answers garbage.
pub(crate) async fn forward(
    mut req: Request<Incoming>,
    up: Upstream,
    limits: &Limits,
    guard: UpgradeGuard,
) -> Response<Body> {
    let upgrade = upgrade_request(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let h = req.headers_mut();
    strip_hop_by_hop(h);
    // The owner's credentials never reach the guest.
    h.remove(AUTHORIZATION);
    h.remove(FORWARDED);
    h.insert(HOST, up.host.clone());
    h.insert("x-forwarded-host", up.host);
    h.insert(
        "x-forwarded-for",
        HeaderValue::from_str(&up.peer.to_string()).expect("an IP address is a header value"),
    );
    h.insert("x-forwarded-proto", HeaderValue::from_static(up.proto));
    if let Some(u) = &upgrade {
        h.insert(UPGRADE, u.clone());
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let origin_form = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    *req.uri_mut() = origin_form
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    *req.version_mut() = Version::HTTP_11;

    let port = up.addr.port();
    let connect = async {
        match up.dialed {
            Some(d) => d.await,
            None => {
                let tcp = TcpStream::connect(up.addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp) as Box<dyn crate::Conn>)
            }
        }
    };
    let tcp = match tokio::time::timeout(limits.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(addr = %up.addr, error = %e, "proxy connect failed");
            return bad_gateway(&format!("nothing answers on port {port} of the VM ({e})"));
        }
        Err(_) => return bad_gateway(&format!("port {port} of the VM did not answer in time")),
    };
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder
        .max_header_size(limits.max_response_header_bytes)
        .max_headers(limits.max_headers);
    let (mut sender, conn) = match builder.handshake(TokioIo::new(tcp)).await {
        Ok(x) => x,
        Err(e) => return bad_gateway(&format!("HTTP handshake with the VM failed: {e}")),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "proxy upstream connection ended");
        }
    });
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(addr = %up.addr, error = %e, "proxy upstream request failed");
            return bad_gateway(&format!("the VM's port {port} sent no valid response: {e}"));
        }
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return bad_gateway("the VM switched protocols without being asked");
        };
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        let proto = resp.headers().get(UPGRADE).cloned();
        strip_hop_by_hop(resp.headers_mut());
        if let Some(p) = proto {
            resp.headers_mut().insert(UPGRADE, p);
        }
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        tokio::spawn(splice(client_upgrade, backend_upgrade, guard));
        return resp.map(|_| empty());
    }
    strip_hop_by_hop(resp.headers_mut());
    resp.map(|b| b.boxed())
}

/// Copies bytes both ways between the upgraded client and guest connections until both close,
/// or the serve loop goes away.
async fn splice(client: OnUpgrade, backend: OnUpgrade, mut guard: UpgradeGuard) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "proxy upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "proxy upgraded connection ended");
            }
        }
        _ = guard.shutdown.changed() => {}
    }
    drop(guard.permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));

        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_request(&h).unwrap(), "websocket");
        h.insert(CONNECTION, HeaderValue::from_static("close"));
        assert!(upgrade_request(&h).is_none());
    }
}
