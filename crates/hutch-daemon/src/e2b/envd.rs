//! envd's routes, for requests that name a sandbox (`E2b-Sandbox-Id`, `E2b-Sandbox-Port`):
//! the process and filesystem Connect services, `/files`, `/health` and `/envs`. Every
//! request is authorized by the sandbox's access token (`X-Access-Token`) before anything
//! about the sandbox is looked at beyond its record.

use super::connect::{self, Code, RpcError};
use super::users::{self, Account};
use super::{owner_caller, E2b, SandboxRecord, ENVD_PORT};
use crate::auth::Caller;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::sync::Arc;

/// A request's sandbox, authorized.
pub struct Ctx {
    pub e: Arc<E2b>,
    pub rec: SandboxRecord,
    /// The sandbox's owner, who acts on its VM.
    pub caller: Caller,
    /// The image's configured user (`User`), for E2B's `user`.
    pub image_user: String,
}

impl Ctx {
    pub fn vm(&self) -> &str {
        &self.rec.id
    }

    /// The guest account of the request's E2B user (`Authorization: Basic`).
    pub async fn account(&self, headers: &HeaderMap) -> Result<Account, RpcError> {
        self.account_named(users::basic_user(headers)?.as_deref())
            .await
    }

    /// The guest account of E2B user `name` (`user` when None).
    pub async fn account_named(&self, name: Option<&str>) -> Result<Account, RpcError> {
        self.table().await?.resolve(name, &self.image_user)
    }

    pub async fn table(&self) -> Result<Arc<users::Table>, RpcError> {
        self.e
            .users
            .of(&self.e.m, &self.caller, self.vm(), &self.rec.vm_id)
            .await
    }
}

/// Why a request gets no sandbox: answered like E2B's edge proxy does.
pub struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let code = match self.0 {
            StatusCode::UNAUTHORIZED => "unauthenticated",
            StatusCode::BAD_REQUEST => "invalid_argument",
            StatusCode::NOT_FOUND => "not_found",
            _ => "unavailable",
        };
        (
            self.0,
            axum::Json(serde_json::json!({"code": code, "message": self.1})),
        )
            .into_response()
    }
}

/// The sandbox a request names, if its access token is right.
pub async fn ctx(e: &Arc<E2b>, headers: &HeaderMap) -> Result<Ctx, Refused> {
    ctx_with(e, headers, |_| false).await
}

/// The same, also taking a request that `signed` finds signed with the sandbox's access token
/// (`/files` URLs made by the SDKs' `download_url` and `upload_url`).
pub async fn ctx_with(
    e: &Arc<E2b>,
    headers: &HeaderMap,
    signed: impl FnOnce(&str) -> bool,
) -> Result<Ctx, Refused> {
    let id = headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let port = headers
        .get("e2b-sandbox-port")
        .and_then(|v| v.to_str().ok())
        .map(|p| p.parse::<u16>())
        .transpose()
        .map_err(|_| Refused(StatusCode::BAD_REQUEST, "bad E2b-Sandbox-Port".into()))?
        .unwrap_or(ENVD_PORT);
    if port != ENVD_PORT {
        return Err(Refused(
            StatusCode::BAD_GATEWAY,
            format!(
                "port {port} of sandbox {id} is served through the proxy (https://{port}-{id}.DOMAIN), \
                 not by header; this port is not open here"
            ),
        ));
    }
    let not_found = || {
        Refused(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {id} was not found"),
        )
    };
    let rec = e
        .record(id)
        .await
        .map_err(|_| not_found())?
        .ok_or_else(not_found)?;
    let token = e.access_token(&rec.id, &rec.vm_id);
    let given = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let by_header = headers.contains_key("x-access-token");
    let ok = if by_header {
        crate::constant_eq(given.as_bytes(), token.as_bytes())
    } else {
        signed(&token)
    };
    if !ok {
        return Err(Refused(
            StatusCode::UNAUTHORIZED,
            "missing or wrong X-Access-Token for this sandbox".into(),
        ));
    }
    let caller = owner_caller(&rec);
    // The VM must still be the sandbox's (killed, or its TTL deleted it: not found).
    let vm = match e.m.vm_for(&caller, &rec.id).await {
        Ok(vm) if vm.id == rec.vm_id => vm,
        _ => return Err(not_found()),
    };
    Ok(Ctx {
        e: e.clone(),
        rec,
        caller,
        image_user: vm.image_config.map(|c| c.user).unwrap_or_default(),
    })
}

pub fn router(e: Arc<E2b>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/envs", get(envs))
        .route(
            "/files",
            // Uploads are streamed and bounded by `--max-upload-mib` (files.rs), not by axum's
            // default body limit; every other body has its own bound.
            get(super::files::download)
                .post(super::files::upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/{service}/{method}", post(rpc))
        .fallback(|| async {
            Refused(StatusCode::NOT_FOUND, "no such envd route".into()).into_response()
        })
        .with_state(e)
}

async fn health(State(e): State<Arc<E2b>>, headers: HeaderMap) -> Response {
    match ctx(&e, &headers).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r.into_response(),
    }
}

async fn envs(State(e): State<Arc<E2b>>, headers: HeaderMap) -> Response {
    match ctx(&e, &headers).await {
        Ok(c) => axum::Json(&c.rec.env_vars).into_response(),
        Err(r) => r.into_response(),
    }
}

/// One Connect call: authorized, its framing checked, then handed to its service.
async fn rpc(
    State(e): State<Arc<E2b>>,
    Path((service, method)): Path<(String, String)>,
    req: Request,
) -> Response {
    let Some(framing) = connect::framing(req.headers()) else {
        return connect::unsupported_codec();
    };
    let fail = |err: RpcError| match framing {
        connect::Framing::Unary => err.into_response(),
        connect::Framing::Stream => connect::stream_error(err),
    };
    if let Err(err) = connect::check_encoding(req.headers()) {
        return fail(err);
    }
    let c = match ctx(&e, req.headers()).await {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let streaming = matches!(
        (service.as_str(), method.as_str()),
        ("process.Process", "Start" | "Connect" | "StreamInput")
            | ("filesystem.Filesystem", "WatchDir")
    );
    let want = if streaming {
        connect::Framing::Stream
    } else {
        connect::Framing::Unary
    };
    if framing != want {
        return fail(RpcError::invalid(format!(
            "{service}/{method} is {} (Content-Type application/{})",
            if streaming { "streaming" } else { "unary" },
            if streaming { "connect+json" } else { "json" }
        )));
    }
    let r = match service.as_str() {
        "process.Process" => super::process::call(c, &method, req).await,
        "filesystem.Filesystem" => super::fs::call(c, &method, req).await,
        _ => Err(RpcError::new(
            Code::Unimplemented,
            format!("no service {service}"),
        )),
    };
    r.unwrap_or_else(fail)
}
