//! REST for VM timers (docs/snapshots.md): nanobox's `POST /sandboxes/{name}/keepalive`. The
//! TTL and auto-pause themselves are given at create (`ttl`, `on_expire`, `auto_pause`).

use crate::api::{AppState, VmRef};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use hutch_core::api::Keepalive;
use hutch_core::Vm;

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/api/v1/sandboxes/{name}/keepalive", post(keepalive))
}

/// `{"duration"?}`; an empty body extends the TTL by the VM's own.
async fn keepalive(State(m): State<AppState>, r: VmRef, body: Bytes) -> Result<Json<Vm>, ApiError> {
    let req: Keepalive = if body.iter().all(u8::is_ascii_whitespace) {
        Keepalive::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::Invalid(format!("malformed request body: {e}")))?
    };
    Ok(Json(m.keepalive(&r.caller, &r.name, req).await?))
}
