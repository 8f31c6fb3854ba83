//! E2B on hutch's proxy (`E2B_DOMAIN` instead of `E2B_SANDBOX_URL`): `api.<domain>` is the
//! control plane, `49983-<id>.<domain>` a sandbox's envd, and `<port>-<id>.<domain>` the
//! sandbox's own ports, public unless the sandbox was made with `allowPublicTraffic: false`.

use super::{E2b, ENVD_PORT};
use axum::http::HeaderValue;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

/// The E2B API as the rest of hutchd sees it: its state and its router.
#[derive(Clone)]
pub struct Served {
    pub e2b: Arc<E2b>,
    pub router: axum::Router,
}

/// What the proxy needs to know of a sandbox without a store read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub vm_id: String,
    pub public: bool,
}

impl Route {
    pub fn of(r: &super::SandboxRecord) -> Route {
        Route {
            vm_id: r.vm_id.clone(),
            public: r.allow_public_traffic != Some(false),
        }
    }
}

/// Sandbox ids to VMs, in memory (loaded at start, kept by create, fork and kill).
#[derive(Default)]
pub struct Routes {
    by_id: Mutex<HashMap<String, Route>>,
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn set(&self, id: &str, r: Route) {
        self.lock().insert(id.to_string(), r);
    }
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
    pub fn get(&self, id: &str) -> Option<Route> {
        self.lock().get(id).cloned()
    }
}

impl Served {
    /// The proxy's request, if it is E2B's: given back otherwise.
    pub fn local(
        &self,
        mut req: hyper::Request<Incoming>,
    ) -> Result<hutch_proxy::Local, Box<hyper::Request<Incoming>>> {
        let Some(domain) = self.e2b.domain.as_deref() else {
            return Err(Box::new(req));
        };
        let host = req
            .uri()
            .authority()
            .map(|a| a.host().to_string())
            .or_else(|| {
                req.headers()
                    .get(hyper::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(|h| h.rsplit_once(':').map_or(h, |(h, _)| h).to_string())
            })
            .unwrap_or_default()
            .to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        let ours = if host == format!("api.{domain}") {
            // The control plane decides by itself; a sandbox header here is not honoured.
            req.headers_mut().remove("e2b-sandbox-id");
            true
        } else {
            match hutch_proxy::parse_host(host, domain) {
                Some(t) if t.port == ENVD_PORT && self.e2b.routes.get(&t.label).is_some() => {
                    let h = req.headers_mut();
                    match HeaderValue::from_str(&t.label) {
                        Ok(v) => {
                            h.insert("e2b-sandbox-id", v);
                        }
                        Err(_) => return Err(Box::new(req)),
                    }
                    h.insert("e2b-sandbox-port", HeaderValue::from_static("49983"));
                    true
                }
                _ => false,
            }
        };
        if !ours {
            return Err(Box::new(req));
        }
        let router = self.router.clone();
        let req = req.map(axum::body::Body::new);
        Ok(Box::pin(async move {
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            resp.map(|b| {
                b.map_err(|e| -> hutch_proxy::BoxError { Box::new(e) })
                    .boxed_unsync()
            })
        }))
    }
}
