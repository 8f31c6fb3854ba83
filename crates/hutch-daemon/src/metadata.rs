//! The metadata service a VM reaches at `http://169.254.169.254/` (hutchd serves it on the VM
//! network's gateway address; the nftables rules send 169.254.169.254:80 there and drop
//! packets whose source address is not the sending TAP's lease, so the TCP peer address names
//! the VM). It tells a VM about itself and issues it identity tokens ([`crate::identity`]).
//!
//! - `GET /`: the paths below, one per line (text/plain).
//! - `GET /v1/instance`: `{id, name, owner, hostname, domain, ipv4: [..]}` of the calling VM.
//! - `GET /v1/identity?audience=AUD` with header `Hutch-Metadata: true`: `{"token", "expires_at"}`,
//!   a 10-minute ES256 JWT for audience AUD (1 to 256 visible ASCII characters, no spaces);
//!   with `Accept: text/plain` the bare token.
//!
//! Guards against a VM's own services being tricked into fetching a token (SSRF): `/v1/identity`
//! needs the `Hutch-Metadata: true` header, which a plain redirect or URL fetch does not send,
//! and every request carrying `X-Forwarded-For` or `Forwarded` (i.e. relayed by a proxy) is
//! refused. Callers the [`Instances`] do not know get 403. Errors are JSON
//! `{"error":{"code","message"}}`.

use crate::identity::{IdentityClaims, IdentityKey};
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// How long an identity token is valid.
pub const IDENTITY_TTL_SECS: u64 = 600;
/// The header `/v1/identity` requires (value `true`).
pub const GUARD_HEADER: &str = "hutch-metadata";
/// The longest audience, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 256;

/// What the metadata service knows about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub name: String,
    /// The owning account; None for the admin's VMs.
    pub owner: Option<String>,
    pub ipv4: Ipv4Addr,
    pub hostname: String,
    pub domain: String,
}

/// The VMs, by address.
pub trait Instances: Send + Sync + 'static {
    /// The VM whose network address is `ip` (the connection's source address), if any.
    fn by_ip(&self, ip: Ipv4Addr) -> Option<Instance>;
}

#[derive(Clone)]
struct Ctx {
    instances: Arc<dyn Instances>,
    key: Arc<IdentityKey>,
    issuer: Arc<str>,
}

fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message.to_string()}});
    (status, no_store(), Json(body)).into_response()
}

fn no_store() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))]
}

/// The metadata service's router. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()`: without the peer address every VM
/// request fails with 500 (closed, not open).
pub fn router(instances: Arc<dyn Instances>, key: Arc<IdentityKey>, issuer: String) -> Router {
    let ctx = Ctx {
        instances,
        key,
        issuer: issuer.into(),
    };
    Router::new()
        .route("/", get(index))
        .route("/v1/instance", get(instance))
        .route("/v1/identity", get(identity))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such path") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "only GET is served",
            )
        })
        .layer(axum::middleware::from_fn(refuse_forwarded))
        .with_state(ctx)
}

/// `GET /.well-known/jwks.json`: the public key set identity tokens verify against, for the API
/// listeners.
pub fn jwks_router(key: Arc<IdentityKey>) -> Router {
    let body = Arc::new(key.jwks().to_string());
    Router::new().route(
        "/.well-known/jwks.json",
        get(move || {
            let body = body.clone();
            async move {
                (
                    [
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        ),
                        (
                            header::CACHE_CONTROL,
                            HeaderValue::from_static("public, max-age=300"),
                        ),
                    ],
                    body.as_str().to_owned(),
                )
            }
        }),
    )
}

/// Requests relayed by a proxy (inside the VM or out) are refused: the peer address would not
/// be the VM's own request, and a proxy is the usual SSRF path.
async fn refuse_forwarded(req: Request, next: Next) -> Response {
    let h = req.headers();
    if h.contains_key("x-forwarded-for") || h.contains_key(header::FORWARDED) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "forwarded requests are refused by the metadata service",
        );
    }
    next.run(req).await
}

/// The calling VM, by the connection's peer address.
struct Caller(Instance);

impl FromRequestParts<Ctx> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, Response> {
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
            tracing::error!("metadata service served without connect info");
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the caller's address is unknown",
            ));
        };
        let ip = match peer.ip().to_canonical() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        };
        match ip.and_then(|ip| ctx.instances.by_ip(ip)) {
            Some(vm) => Ok(Caller(vm)),
            None => Err(error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{} is not a VM's address", peer.ip()),
            )),
        }
    }
}

async fn index() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        "/v1/instance\n/v1/identity?audience=AUD (header Hutch-Metadata: true)\n",
    )
}

async fn instance(Caller(vm): Caller) -> Response {
    let body = serde_json::json!({
        "id": vm.id,
        "name": vm.name,
        "owner": vm.owner,
        "hostname": vm.hostname,
        "domain": vm.domain,
        "ipv4": [vm.ipv4.to_string()],
    });
    (no_store(), Json(body)).into_response()
}

/// The one `audience` parameter, when it is 1..=256 visible ASCII characters.
fn audience(query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<String, String> {
    let Query(pairs) = query.map_err(|e| e.body_text())?;
    let mut auds = pairs.into_iter().filter(|(k, _)| k == "audience");
    let (Some((_, aud)), None) = (auds.next(), auds.next()) else {
        return Err("exactly one audience=... parameter is required".into());
    };
    if aud.is_empty() || aud.len() > MAX_AUDIENCE_LEN {
        return Err(format!(
            "the audience must be 1 to {MAX_AUDIENCE_LEN} characters"
        ));
    }
    if !aud.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the audience must be visible ASCII characters (no spaces)".into());
    }
    Ok(aud)
}

/// Whether the client asked for the bare token (`Accept: text/plain`, and not JSON).
fn wants_text(headers: &HeaderMap) -> bool {
    let types: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    types.iter().any(|t| t == "text/plain") && !types.iter().any(|t| t == "application/json")
}

async fn identity(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    Caller(vm): Caller,
) -> Response {
    let guarded = headers
        .get(GUARD_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    if !guarded {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "identity requests need the header Hutch-Metadata: true",
        );
    }
    let aud = match audience(query) {
        Ok(a) => a,
        Err(m) => return error(StatusCode::BAD_REQUEST, "invalid_argument", m),
    };
    let now = hutch_core::now();
    let claims = IdentityClaims {
        iss: ctx.issuer.to_string(),
        sub: format!("vm:{}", vm.id),
        aud,
        iat: now,
        exp: now + IDENTITY_TTL_SECS,
        vm_id: vm.id,
        vm_name: vm.name,
        owner: vm.owner,
    };
    let token = match ctx.key.sign(&claims) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "signing an identity token");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
        }
    };
    if wants_text(&headers) {
        let text = (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return ([text, no_store()[0].clone()], token).into_response();
    }
    let body = serde_json::json!({"token": token, "expires_at": claims.exp});
    (no_store(), Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::verify;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Knows one VM, at `at`, and records the addresses it was asked about.
    struct Fake {
        at: Option<Ipv4Addr>,
        asked: Mutex<Vec<Ipv4Addr>>,
    }

    fn vm() -> Instance {
        Instance {
            id: "0123abcd".into(),
            name: "web".into(),
            owner: Some("alice".into()),
            ipv4: Ipv4Addr::new(10, 88, 0, 7),
            hostname: "web".into(),
            domain: "alice.hutch.internal".into(),
        }
    }

    impl Instances for Fake {
        fn by_ip(&self, ip: Ipv4Addr) -> Option<Instance> {
            self.asked.lock().unwrap().push(ip);
            (Some(ip) == self.at).then(vm)
        }
    }

    struct Server {
        addr: SocketAddr,
        fake: Arc<Fake>,
        key: Arc<IdentityKey>,
    }

    const ISSUER: &str = "https://hutch.example:8443";

    async fn serve(at: Option<Ipv4Addr>) -> Server {
        let fake = Arc::new(Fake {
            at,
            asked: Mutex::new(Vec::new()),
        });
        let key = Arc::new(IdentityKey::generate().unwrap());
        let app = router(fake.clone(), key.clone(), ISSUER.into()).merge(jwks_router(key.clone()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(l, app.into_make_service_with_connect_info::<SocketAddr>())
                .await
                .unwrap()
        });
        Server { addr, fake, key }
    }

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
        }
        fn error_code(&self) -> String {
            self.json()["error"]["code"].as_str().unwrap().to_string()
        }
    }

    /// One HTTP/1.1 request over a fresh connection from 127.0.0.1.
    async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
        get_from(Ipv4Addr::LOCALHOST, addr, path, headers).await
    }

    /// One HTTP/1.1 request over a fresh connection from `src` (a loopback address).
    async fn get_from(
        src: Ipv4Addr,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src.into(), 0)).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{head}"
        );
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Reply {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    }

    const GUARD: (&str, &str) = ("Hutch-Metadata", "true");

    #[tokio::test]
    async fn instance_describes_the_calling_vm() {
        let s = serve(Some(Ipv4Addr::LOCALHOST)).await;
        let r = get(s.addr, "/v1/instance", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json(),
            serde_json::json!({
                "id": "0123abcd", "name": "web", "owner": "alice", "hostname": "web",
                "domain": "alice.hutch.internal", "ipv4": ["10.88.0.7"],
            })
        );
        assert_eq!(*s.fake.asked.lock().unwrap(), vec![Ipv4Addr::LOCALHOST]);
        let r = get(s.addr, "/", &[]).await;
        assert_eq!(r.status, 200);
        assert!(r.body.contains("/v1/instance\n") && r.body.contains("/v1/identity"));
        let r = get(s.addr, "/v2/nothing", &[]).await;
        assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    }

    #[tokio::test]
    async fn identity_token_verifies_against_the_served_jwks() {
        let s = serve(Some(Ipv4Addr::LOCALHOST)).await;
        let aud = "https://vault.example/v1/auth?x=1&y=2";
        let before = hutch_core::now();
        let r = get(
            s.addr,
            "/v1/identity?audience=https%3A%2F%2Fvault.example%2Fv1%2Fauth%3Fx%3D1%26y%3D2",
            &[GUARD],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r
            .head
            .to_ascii_lowercase()
            .contains("cache-control: no-store"));
        let body = r.json();
        let token = body["token"].as_str().unwrap();
        let jwks = get(s.addr, "/.well-known/jwks.json", &[]).await;
        assert_eq!(jwks.status, 200);
        assert_eq!(jwks.json(), s.key.jwks());
        let c = verify(&jwks.json(), token, aud, hutch_core::now()).unwrap();
        assert_eq!(c.iss, ISSUER);
        assert_eq!(c.sub, "vm:0123abcd");
        assert_eq!((c.vm_id.as_str(), c.vm_name.as_str()), ("0123abcd", "web"));
        assert_eq!(c.owner.as_deref(), Some("alice"));
        assert_eq!(c.aud, aud);
        assert!(c.iat >= before && c.iat <= hutch_core::now());
        assert_eq!(c.exp - c.iat, IDENTITY_TTL_SECS);
        assert_eq!(body["expires_at"], c.exp);
        assert!(verify(&jwks.json(), token, "https://vault.example", c.iat).is_err());

        // The bare token, on request.
        let r = get(
            s.addr,
            "/v1/identity?audience=sts.example",
            &[GUARD, ("Accept", "text/plain")],
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain"));
        assert_eq!(
            verify(&s.key.jwks(), &r.body, "sts.example", c.iat)
                .unwrap()
                .sub,
            "vm:0123abcd"
        );
        // A 256-character audience is fine.
        let long = "a".repeat(MAX_AUDIENCE_LEN);
        let r = get(s.addr, &format!("/v1/identity?audience={long}"), &[GUARD]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    #[tokio::test]
    async fn unknown_callers_are_forbidden() {
        let s = serve(Some(Ipv4Addr::new(10, 88, 0, 7))).await;
        for path in ["/v1/instance", "/v1/identity?audience=x"] {
            let r = get(s.addr, path, &[GUARD]).await;
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (403, "forbidden"),
                "{path}"
            );
            assert!(!r.body.contains("token"), "{path}");
        }
        // The VM is told apart by the connection's source address, whichever it is.
        let other = Ipv4Addr::new(127, 0, 0, 2);
        let s2 = serve(Some(other)).await;
        assert_eq!(get(s2.addr, "/v1/instance", &[]).await.status, 403);
        let r = get_from(other, s2.addr, "/v1/instance", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["id"], "0123abcd");
        assert_eq!(
            *s2.fake.asked.lock().unwrap(),
            vec![Ipv4Addr::LOCALHOST, other]
        );
        let nobody = serve(None).await;
        let r = get(nobody.addr, "/v1/instance", &[]).await;
        assert_eq!(r.status, 403);
        assert_eq!(
            *nobody.fake.asked.lock().unwrap(),
            vec![Ipv4Addr::LOCALHOST]
        );
    }

    #[tokio::test]
    async fn bad_audiences_are_400() {
        let s = serve(Some(Ipv4Addr::LOCALHOST)).await;
        let long = "a".repeat(MAX_AUDIENCE_LEN + 1);
        for q in [
            "/v1/identity".to_string(),
            "/v1/identity?aud=x".into(),
            "/v1/identity?audience=".into(),
            format!("/v1/identity?audience={long}"),
            "/v1/identity?audience=a%20b".into(),
            "/v1/identity?audience=a%0Ab".into(),
            "/v1/identity?audience=%C3%A9".into(),
            "/v1/identity?audience=a&audience=b".into(),
        ] {
            let r = get(s.addr, &q, &[GUARD]).await;
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (400, "invalid_argument"),
                "{q}: {}",
                r.body
            );
        }
    }

    #[tokio::test]
    async fn ssrf_guards() {
        let s = serve(Some(Ipv4Addr::LOCALHOST)).await;
        let path = "/v1/identity?audience=x";
        for headers in [
            &[][..],
            &[("Hutch-Metadata", "false")][..],
            &[("Hutch-Metadata", "")][..],
            &[("Metadata", "true")][..],
        ] {
            let r = get(s.addr, path, headers).await;
            assert_eq!(r.status, 403, "{headers:?}");
            assert!(r.body.contains("Hutch-Metadata"), "{}", r.body);
        }
        for fwd in [
            ("X-Forwarded-For", "10.88.0.9"),
            ("Forwarded", "for=10.88.0.9"),
        ] {
            for p in [path, "/v1/instance", "/"] {
                let r = get(s.addr, p, &[GUARD, fwd]).await;
                assert_eq!(
                    (r.status, r.error_code().as_str()),
                    (403, "forbidden"),
                    "{p} {fwd:?}"
                );
            }
        }
        // The guarded request itself works (the refusals above are the guards, not the route).
        assert_eq!(get(s.addr, path, &[GUARD]).await.status, 200);
        assert_eq!(
            get(s.addr, path, &[("hutch-metadata", "TRUE")])
                .await
                .status,
            200
        );
    }

    #[tokio::test]
    async fn without_connect_info_requests_fail_closed() {
        use tower::ServiceExt;
        let fake = Arc::new(Fake {
            at: Some(Ipv4Addr::LOCALHOST),
            asked: Mutex::new(Vec::new()),
        });
        let key = Arc::new(IdentityKey::generate().unwrap());
        let req = Request::builder()
            .uri("/v1/instance")
            .body(axum::body::Body::empty())
            .unwrap();
        let r = router(fake.clone(), key, ISSUER.into())
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(fake.asked.lock().unwrap().is_empty());
    }

    #[test]
    fn accept_negotiation() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, v.parse().unwrap());
            m
        };
        assert!(wants_text(&h("text/plain")));
        assert!(wants_text(&h("Text/Plain; q=1")));
        assert!(!wants_text(&h("*/*")));
        assert!(!wants_text(&h("application/json, text/plain")));
        assert!(!wants_text(&HeaderMap::new()));
    }
}
