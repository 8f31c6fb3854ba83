//! The E2B-compatible API (`hutchd --e2b-listen`): code written for E2B's SDKs runs against
//! hutch with only `E2B_API_URL`, `E2B_SANDBOX_URL` and `E2B_API_KEY` changed (docs/e2b.md).
//!
//! One listener serves both of E2B's planes:
//! - the control plane (sandboxes: create, list, get, kill, timeout, pause, connect, ...),
//!   authenticated by `X-API-Key`, which is a hutch token (the admin API token or an account's
//!   JWT); the account owns what it creates;
//! - envd, the in-sandbox API (Connect-protocol process and filesystem services, `/files`,
//!   `/health`), for requests carrying `E2b-Sandbox-Id`, authenticated by the sandbox's
//!   `X-Access-Token` (handed out at create). hutch serves envd itself, over its own guest agent:
//!   no E2B code runs in the VM.
//!
//! A sandbox is a hutch VM named by its sandbox id, in its owner's namespace, plus a record
//! under [`SANDBOXES`] with what E2B keeps and hutch does not (metadata, env vars, template).

mod connect;
mod control;
mod envd;
mod files;
mod fs;
mod metrics;
mod model;
mod process;
mod routing;
mod snaps;
mod users;
mod watch;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::Service;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::Mac;
use std::sync::Arc;
use tower::ServiceExt;

pub use model::SandboxRecord;
pub use routing::{Route, Served};

/// Store prefix of sandbox records, keyed by sandbox id.
pub const SANDBOXES: &str = "e2b/sandboxes/";

/// The envd port: requests for it are served by hutch, not forwarded to the guest.
pub const ENVD_PORT: u16 = 49983;

/// The envd version hutch reports: the SDKs enable exactly the features of this version, and
/// hutch serves all of them (process, filesystem with watches, octet-stream uploads, default
/// user). Features of later versions (file metadata as extended attributes, entries in watch
/// events) stay off in the SDKs.
pub const ENVD_VERSION: &str = "0.5.7";

/// The E2B server's state.
pub struct E2b {
    m: Arc<Service>,
    admin_token: String,
    /// HMAC key for the sandboxes' envd access tokens.
    key: Vec<u8>,
    /// The domain sandboxes are reachable under (`<port>-<id>.<domain>`), if the proxy runs.
    domain: Option<String>,
    procs: process::Table,
    watchers: fs::Watchers,
    users: users::Cache,
    routes: routing::Routes,
}

impl E2b {
    pub fn new(m: Arc<Service>, admin_token: String, key: Vec<u8>, domain: Option<String>) -> E2b {
        E2b {
            m,
            admin_token,
            key,
            domain,
            procs: process::Table::default(),
            watchers: fs::Watchers::default(),
            users: users::Cache::default(),
            routes: routing::Routes::default(),
        }
    }

    /// Loads the proxy's routes of every sandbox (at start).
    pub async fn load_routes(&self) -> Result<(), ApiError> {
        let recs: Vec<SandboxRecord> = self.m.records.list(SANDBOXES).await?;
        for r in recs.iter().filter(|r| !r.vm_id.is_empty()) {
            self.routes.set(&r.id, Route::of(r));
        }
        Ok(())
    }

    /// The VM of sandbox `id` for the proxy, and whether its ports are public.
    pub fn route(&self, id: &str) -> Option<Route> {
        self.routes.get(id)
    }

    /// The envd access token of sandbox `id` (VM `vm_id`): derived, so nothing to store, and
    /// different for a new sandbox that reuses an id.
    fn access_token(&self, id: &str, vm_id: &str) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        mac.update(b"e2b-envd\0");
        mac.update(id.as_bytes());
        mac.update(b"\0");
        mac.update(vm_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The caller an `X-API-Key` stands for.
    async fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        let key = headers.get("x-api-key")?.to_str().ok()?;
        if crate::constant_eq(key.as_bytes(), self.admin_token.as_bytes()) {
            return Some(Caller::local_admin());
        }
        self.m.verify_token(key).await
    }

    /// The record of sandbox `id`, if `caller` may see it (others' sandboxes are not found).
    async fn sandbox_for(&self, caller: &Caller, id: &str) -> Result<SandboxRecord, ApiError> {
        match self.record(id).await? {
            Some(r) if caller.sees(r.owner.as_deref()) => Ok(r),
            _ => Err(ApiError::vm(id)),
        }
    }

    /// The cluster and the node running the VM of the sandbox a request names, when that is
    /// not this node (a request forwarded here is served here).
    async fn runs_elsewhere(
        &self,
        headers: &HeaderMap,
    ) -> Option<(Arc<crate::cluster::Cluster>, String)> {
        let c = self.m.cluster.get()?.clone();
        if headers.contains_key(crate::cluster::forward::FORWARDED_BY) {
            return None;
        }
        let id = headers.get("e2b-sandbox-id")?.to_str().ok()?;
        let r = self.record(id).await.ok()??;
        let vm = self.m.records.vm_by_id(&r.vm_id).await.ok()??;
        if self.m.records.is_local(&vm) {
            return None;
        }
        Some((c, vm.node?))
    }

    async fn record(&self, id: &str) -> Result<Option<SandboxRecord>, ApiError> {
        if !model::valid_id(id) {
            return Ok(None);
        }
        Ok(self.m.records.get(SANDBOXES, id).await?)
    }
}

/// The caller that acts on a sandbox's VM: its owner (the VM lives in its namespace).
pub(crate) fn owner_caller(r: &SandboxRecord) -> Caller {
    match &r.owner {
        Some(a) => Caller {
            account: a.clone(),
            admin: false,
        },
        None => Caller::local_admin(),
    }
}

/// The E2B router: envd for requests naming a sandbox, the control plane for the rest.
pub fn router(e: Arc<E2b>) -> axum::Router {
    let control = control::router(e.clone());
    let envd = envd::router(e.clone());
    axum::Router::new().fallback(move |State(()): State<()>, req: Request| {
        let (control, envd, e) = (control.clone(), envd.clone(), e.clone());
        async move {
            let to_envd = req.headers().contains_key("e2b-sandbox-id");
            if to_envd {
                // In a cluster, envd of a sandbox whose VM runs on another node is that node's.
                if let Some((c, node)) = e.runs_elsewhere(req.headers()).await {
                    if !e.m.node_live(&node).await.unwrap_or(false) {
                        let msg = format!("the sandbox's node {node} is down");
                        return error(StatusCode::BAD_GATEWAY, &msg).into_response();
                    }
                    let to = crate::cluster::forward::Listener::E2b;
                    return match crate::cluster::forward::to_listener(&e.m, &c, &node, req, to)
                        .await
                    {
                        Ok(r) => r.map(axum::body::Body::new).into_response(),
                        Err(err) => api_error(err).into_response(),
                    };
                }
            }
            let r = if to_envd {
                envd.oneshot(req).await
            } else {
                control.oneshot(req).await
            };
            r.unwrap_or_else(|e| match e {}).into_response()
        }
    })
}

/// A refusal in E2B's shape: `{"code": STATUS, "message": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({"code": self.status.as_u16(), "message": self.message})),
        )
            .into_response()
    }
}

/// A service error as E2B answers it (quotas are E2B's 429).
pub(crate) fn api_error(e: ApiError) -> Refusal {
    let status = match &e {
        ApiError::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
        _ => e.status(),
    };
    if status.is_server_error() {
        tracing::error!(error = %e, "e2b request failed");
    }
    error(status, &e.to_string())
}

pub(crate) fn error(status: StatusCode, message: &str) -> Refusal {
    Refusal {
        status,
        message: message.to_string(),
    }
}
