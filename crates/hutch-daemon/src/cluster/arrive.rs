//! Live migration, the target's side (migrate.rs has the whole sequence). Node to node, admin
//! only:
//!
//! - `POST /api/v1/cluster/migrations` prepares a VM recorded `migrating` on the caller: the
//!   same root filesystem bytes as the source's, admission, and a QEMU waiting (node/migrate.rs).
//! - `POST .../{id}/disk` and `.../{id}/state`, upgraded to byte streams: the NBD export of the
//!   new disk and the migration stream.
//! - `POST .../{id}/finish` runs the guest and moves the record here; `DELETE .../{id}` undoes
//!   the preparation, which also happens by itself [`EXPIRY`] after it began.

use super::migrate::{Arrive, Arriving, Finished};
use crate::api::{ApiJson, ApiPath, AppState};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::node::migrate::Arrival;
use crate::service::{admin_only, Reservation, Service};
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::{delete, post};
use axum::{Extension, Json, Router};
use hutch_core::VmState;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a prepared arrival waits for its finish before it is undone.
pub const EXPIRY: Duration = Duration::from_secs(25 * 60);

/// The arrivals this node prepared, by migration id.
#[derive(Default)]
pub struct Arrivals {
    pending: Mutex<HashMap<String, Pending>>,
}

struct Pending {
    arrival: Arrival,
    from: String,
    /// Running (it runs on here), paused or stopped (it stays so).
    was: VmState,
    /// The memory admitted for it, held until its record counts here.
    _admitted: Reservation,
}

impl Arrivals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, id: &str) -> Result<Pending, ApiError> {
        self.lock().remove(id).ok_or_else(|| missing(id))
    }
}

fn missing(id: &str) -> ApiError {
    ApiError::NotFound {
        kind: "migration",
        name: id.to_string(),
    }
}

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route(super::migrate::MIGRATIONS, post(arrive))
        .route("/api/v1/cluster/migrations/{id}/disk", post(disk))
        .route("/api/v1/cluster/migrations/{id}/state", post(state))
        .route("/api/v1/cluster/migrations/{id}/finish", post(finish))
        .route("/api/v1/cluster/migrations/{id}", delete(abort))
}

async fn arrive(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<Arrive>,
) -> Result<Json<Arriving>, ApiError> {
    admin_only(&caller, "receiving migrations")?;
    let c = m.clustered("receiving migrations")?;
    if req.from == c.name() {
        return Err(ApiError::Invalid("a VM cannot move to its own node".into()));
    }
    let vm = m
        .records
        .vm_stored(&req.vm)
        .await?
        .ok_or_else(|| ApiError::vm(&req.vm))?;
    if vm.state != VmState::Migrating || vm.node.as_deref() != Some(req.from.as_str()) {
        return Err(ApiError::Conflict(format!(
            "{} is {} on node {}, not migrating from {}",
            vm.name,
            vm.state.as_str(),
            vm.node.as_deref().unwrap_or("none"),
            req.from
        )));
    }
    let image = m.image_of(&vm).await?.ok_or_else(|| {
        ApiError::Conflict(format!(
            "the image of {} is no longer in the store",
            vm.name
        ))
    })?;
    m.same_rootfs(&c, &req.from, &image, &req.rootfs_sha256)
        .await?;
    let mut here = vm.clone();
    here.node = Some(c.name().to_string());
    let admitted = m.admit(&here, false).await?;
    let arrival = m.node.arrive(&vm, &image).await?;
    // Its TAP is here now: its address is no longer routed to the source.
    if let Err(e) = m.sync_overlay().await {
        tracing::warn!(error = %e, "cluster: routing an arriving VM");
    }
    let id = hutch_core::names::random_id();
    c.arrivals.lock().insert(
        id.clone(),
        Pending {
            arrival,
            from: req.from.clone(),
            was: req.was,
            _admitted: admitted,
        },
    );
    tracing::info!(vm = %vm.key(), from = %req.from, migration = %id, "vm arriving");
    let (node, c2, id2) = (m.node.clone(), c.clone(), id.clone());
    tokio::spawn(async move {
        tokio::time::sleep(EXPIRY).await;
        if let Ok(p) = c2.arrivals.take(&id2) {
            tracing::warn!(vm = %p.arrival.vm.key(), "a migration did not finish in time; undoing its target half");
            node.abandon(p.arrival).await;
        }
    });
    Ok(Json(Arriving { id }))
}

impl Service {
    /// Makes sure this node holds the very root filesystem node `from` runs `image` from
    /// (SHA-256 `sha256`): copied from it when this node has none; refused when this node built
    /// its own (another build differs in its time stamps).
    pub(crate) async fn same_rootfs(
        &self,
        c: &super::Cluster,
        from: &str,
        image: &hutch_core::Image,
        sha256: &str,
    ) -> Result<(), ApiError> {
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(ApiError::Invalid(
                "rootfs_sha256: 64 lowercase hex digits".into(),
            ));
        }
        if !self.images.has_rootfs(&image.digest) {
            if let Err(e) = self.fetch_layers(&image.layers).await {
                tracing::warn!(image = %image.name, error = %e, "the layers of a migrating VM's image");
            }
            return self.fetch_rootfs(c, from, image, Some(sha256)).await;
        }
        let (images, d) = (self.images.clone(), image.digest.clone());
        let mine = tokio::task::spawn_blocking(move || images.rootfs_sha256(&d))
            .await
            .map_err(crate::node::internal)??;
        if mine != sha256 {
            return Err(ApiError::Conflict(format!(
                "node {} built its own root filesystem of {} (sha256 {}), and node {from} runs it \
                 from different bytes (sha256 {}): a VM moves live only between nodes holding the \
                 same ones (docs/cluster.md)",
                c.name(),
                image.name,
                &mine[..12],
                &sha256[..12]
            )));
        }
        Ok(())
    }
}

/// Answers `req` with 101 and then copies bytes between the upgraded connection and `sock`.
fn upgrade_to(req: Request, sock: std::os::unix::net::UnixStream) -> Result<Response, ApiError> {
    super::forward::upgrade_with(req, "a migration stream", move |io| async move {
        super::migrate::splice(io.into_inner(), sock).await;
    })
}

async fn disk(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    req: Request,
) -> Result<Response, ApiError> {
    admin_only(&caller, "receiving migrations")?;
    let c = m.clustered("receiving migrations")?;
    let path = c
        .arrivals
        .lock()
        .get(&id)
        .map(|p| p.arrival.nbd.clone())
        .ok_or_else(|| missing(&id))?;
    let sock = tokio::net::UnixStream::connect(&path)
        .await
        .and_then(|s| s.into_std())
        .map_err(|e| ApiError::Internal(format!("the disk export: {e}")))?;
    upgrade_to(req, sock)
}

async fn state(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    req: Request,
) -> Result<Response, ApiError> {
    admin_only(&caller, "receiving migrations")?;
    let c = m.clustered("receiving migrations")?;
    let sock = c
        .arrivals
        .lock()
        .get_mut(&id)
        .ok_or_else(|| missing(&id))?
        .arrival
        .state
        .take()
        .ok_or_else(|| ApiError::Conflict("the migration stream is open already".into()))?;
    upgrade_to(req, sock)
}

async fn finish(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Finished>, ApiError> {
    admin_only(&caller, "receiving migrations")?;
    let c = m.clustered("receiving migrations")?;
    let p = c.arrivals.take(&id)?;
    let t = Instant::now();
    let done = match p.was {
        VmState::Running => m.node.arrived(&p.arrival, &p.from).await,
        was => m
            .node
            .arrived_at_rest(&p.arrival, &p.from, was == VmState::Paused)
            .await
            .map(|vm| (vm, t)),
    };
    match done {
        Ok((vm, resumed)) => Ok(Json(Finished {
            vm,
            resumed_ms: resumed.saturating_duration_since(t).as_millis() as u64,
        })),
        Err(e) => {
            m.node.abandon(p.arrival).await;
            Err(e)
        }
    }
}

async fn abort(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin_only(&caller, "receiving migrations")?;
    let c = m.clustered("receiving migrations")?;
    let p = c.arrivals.take(&id)?;
    m.node.abandon(p.arrival).await;
    Ok(Json(serde_json::json!({ "undone": id })))
}
