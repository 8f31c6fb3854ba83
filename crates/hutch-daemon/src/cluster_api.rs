//! REST for the cluster (docs/cluster.md): nanobox's `GET /api/v1/nodes` and `GET /api/v1/stats`,
//! cordoning, draining and live migration. Admin only.

use crate::api::{ApiJson, ApiPath, AppState, VmRef};
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hutch_core::cluster::{ClusterStats, Drained, MigrateRequest, Migrated, NodeView};

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    use crate::cluster::{agent_link, arrive, blobs, dial, snap_files};
    let r = [
        blobs::routes,
        arrive::routes,
        agent_link::routes,
        dial::routes,
        snap_files::routes,
    ]
    .into_iter()
    .fold(r, |r, f| f(r));
    r.route("/api/v1/sandboxes/{name}/migrate", post(migrate))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/nodes/{name}/cordon", post(cordon))
        .route("/api/v1/nodes/{name}/uncordon", post(uncordon))
        .route("/api/v1/nodes/{name}/drain", post(drain))
}

async fn nodes(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    Ok(Json(m.nodes(&caller).await?))
}

async fn stats(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<ClusterStats>, ApiError> {
    let nodes = m.nodes(&caller).await?;
    let vms = m.list().await?;
    Ok(Json(ClusterStats::of(&nodes, &vms)))
}

async fn cordon(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<NodeView>, ApiError> {
    Ok(Json(m.cordon(&caller, &name, true).await?))
}

async fn uncordon(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<NodeView>, ApiError> {
    Ok(Json(m.cordon(&caller, &name, false).await?))
}

async fn migrate(
    State(m): State<AppState>,
    r: VmRef,
    ApiJson(req): ApiJson<MigrateRequest>,
) -> Result<Json<Migrated>, ApiError> {
    Ok(Json(m.migrate(&r.caller, &r.name, &req.to).await?))
}

async fn drain(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Drained>, ApiError> {
    Ok(Json(m.drain(&caller, &name).await?))
}
