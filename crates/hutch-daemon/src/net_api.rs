//! REST for the VM network: egress rules and rates (`POST /sandboxes/{vm}/net`), port forwards
//! (`/sandboxes/{vm}/ports`), public ports and share links for the HTTPS proxy
//! (`/sandboxes/{vm}/public/{port}`, `/sandboxes/{vm}/share`), and the proxy's CA (`/ca`).

use crate::api::{ApiJson, AppState, VmRef};
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use hutch_core::net::{PortForward, SetNet};
use hutch_core::Vm;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/api/v1/sandboxes/{name}/net", post(set_net))
        .route("/api/v1/sandboxes/{name}/ports", get(ports).post(port_add))
        .route("/api/v1/sandboxes/{name}/ports/{port}", delete(port_rm))
        .route(
            "/api/v1/sandboxes/{name}/public/{port}",
            put(port_public).delete(port_private),
        )
        .route("/api/v1/sandboxes/{name}/share", post(share))
        .route("/api/v1/ca", get(ca))
}

async fn set_net(
    State(m): State<AppState>,
    r: VmRef,
    ApiJson(req): ApiJson<SetNet>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.set_net(&r.caller, &r.name, req).await?))
}

fn ports_of(vm: &Vm) -> Value {
    json!({ "vm": vm.name, "ipv4": vm.net.ipv4, "ports": vm.net.ports, "public_ports": vm.net.public_ports })
}

async fn ports(State(m): State<AppState>, r: VmRef) -> Result<Json<Value>, ApiError> {
    Ok(Json(ports_of(&m.vm_for(&r.caller, &r.name).await?)))
}

async fn port_add(
    State(m): State<AppState>,
    r: VmRef,
    ApiJson(f): ApiJson<PortForward>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if f.host == 0 || f.vm == 0 {
        return Err(ApiError::Invalid("ports must be 1 to 65535".into()));
    }
    let vm = m.port_add(&r.caller, &r.name, f).await?;
    Ok((StatusCode::CREATED, Json(ports_of(&vm))))
}

/// Resolves `{name}/{port}` paths (the VmRef extractor takes one segment).
async fn vm_port(m: &AppState, caller: &Caller, name: &str, port: &str) -> Result<u16, ApiError> {
    m.vm_for(caller, name).await?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::Invalid(format!("port {port:?} must be 1 to 65535")))
}

async fn port_rm(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((name, port)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let port = vm_port(&m, &caller, &name, &port).await?;
    Ok(Json(ports_of(&m.port_rm(&caller, &name, port).await?)))
}

async fn port_public(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((name, port)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let port = vm_port(&m, &caller, &name, &port).await?;
    Ok(Json(ports_of(
        &m.port_public(&caller, &name, port, true).await?,
    )))
}

async fn port_private(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((name, port)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let port = vm_port(&m, &caller, &name, &port).await?;
    Ok(Json(ports_of(
        &m.port_public(&caller, &name, port, false).await?,
    )))
}

/// `POST /sandboxes/{vm}/share`: a signed link to one port that expires.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShareReq {
    pub port: u16,
    /// Lifetime in seconds (1 s to 30 days).
    pub ttl_secs: u64,
}

async fn share(
    State(m): State<AppState>,
    r: VmRef,
    ApiJson(req): ApiJson<ShareReq>,
) -> Result<Json<Value>, ApiError> {
    let (url, expires_at) = m.share(&r.caller, &r.name, req.port, req.ttl_secs).await?;
    Ok(Json(json!({ "url": url, "expires_at": expires_at })))
}

async fn ca(State(m): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let pem = m.proxy_ca()?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem))
}
