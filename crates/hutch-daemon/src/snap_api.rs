//! REST for snapshots, pause and resume, and fork (docs/snapshots.md): nanobox's
//! `POST /sandboxes/{name}/pause|resume`, `POST /sandboxes/{name}/snapshot` and `/fork`, and
//! the caller's snapshots under `/snapshots`.

use crate::api::{ApiJson, ApiPath, AppState, VmRef};
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hutch_core::api::{ForkVm, SnapshotVm};
use hutch_core::snapshot::Snapshot;
use hutch_core::Vm;

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/api/v1/sandboxes/{name}/pause", post(pause))
        .route("/api/v1/sandboxes/{name}/resume", post(resume))
        .route("/api/v1/sandboxes/{name}/snapshot", post(snapshot))
        .route("/api/v1/sandboxes/{name}/fork", post(fork))
        .route("/api/v1/snapshots", get(list))
        .route("/api/v1/snapshots/{name}", get(show).delete(remove))
}

async fn pause(State(m): State<AppState>, r: VmRef) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.pause(&r.caller, &r.name).await?))
}

async fn resume(State(m): State<AppState>, r: VmRef) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.resume(&r.caller, &r.name).await?))
}

async fn snapshot(
    State(m): State<AppState>,
    r: VmRef,
    ApiJson(req): ApiJson<SnapshotVm>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let s = m.snapshot(&r.caller, &r.name, &req.name).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

async fn fork(
    State(m): State<AppState>,
    r: VmRef,
    ApiJson(req): ApiJson<ForkVm>,
) -> Result<(StatusCode, Json<Vec<Vm>>), ApiError> {
    let v = m.fork(&r.caller, &r.name, req).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn list(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<Snapshot>>, ApiError> {
    Ok(Json(m.snapshots_of(&caller).await?))
}

async fn show(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(m.snapshot_for(&caller, &name).await?))
}

async fn remove(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    m.delete_snapshot(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
