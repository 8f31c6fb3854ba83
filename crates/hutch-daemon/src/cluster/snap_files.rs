//! A VM made from a snapshot may run on any node: a node without the snapshot's files copies
//! them from the node that took it before it restores the VM. Node to node, with the cluster's
//! admin token:
//!
//! - `GET /api/v1/cluster/snapshots/{id}`: the snapshot's files here (name, size, SHA-256) and
//!   the SHA-256 of the root filesystem its guest runs on (a copy must run on the very same
//!   bytes, as a migrated VM does);
//! - `GET /api/v1/cluster/snapshots/{id}/files/{name}`: one of them, streamed.
//!
//! The copy is checked against the sizes and hashes, written sparse (zero runs stay holes, as in
//! the memory file the original is), staged outside the snapshot directories and moved in under
//! the snapshot lock, so `collect` never sees half a copy. Copies go with the snapshot's record,
//! like the originals.

use super::blobs::file_stream;
use super::extents::{self, extents_stream};
use crate::api::{ApiPath, AppState};
use crate::auth::{Caller, NodeToken};
use crate::error::ApiError;
use crate::records::SNAPSHOTS;
use crate::service::{admin_only, Service};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use hutch_core::snapshot::Snapshot;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One file of a snapshot, as its node describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// What a snapshot's node holds of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapManifest {
    pub files: Vec<SnapFile>,
    pub rootfs_sha256: String,
}

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/api/v1/cluster/snapshots/{id}", get(manifest))
        .route("/api/v1/cluster/snapshots/{id}/files/{name}", get(file))
}

/// Hashes of frozen files already computed (path, size) -> SHA-256: they never change.
static HASHES: Mutex<Option<HashMap<(PathBuf, u64), String>>> = Mutex::new(None);

fn frozen_sha256(p: &Path) -> Result<(u64, String), ApiError> {
    let size = std::fs::metadata(p)
        .map_err(|e| ApiError::Internal(format!("{}: {e}", p.display())))?
        .len();
    let key = (p.to_path_buf(), size);
    if let Some(h) = HASHES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Ok((size, h.clone()));
    }
    let h = hutch_image::rootfs::file_sha256(p).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut g = HASHES.lock().unwrap_or_else(|e| e.into_inner());
    let m = g.get_or_insert_with(HashMap::new);
    if m.len() > 4096 {
        m.clear();
    }
    m.insert(key, h.clone());
    Ok((size, h))
}

/// Snapshot `id` when this node holds its files, for a node-to-node request.
async fn held(
    m: &Service,
    caller: &Caller,
    node: Option<Extension<NodeToken>>,
    id: &str,
) -> Result<Snapshot, ApiError> {
    super::forward::node_only(&node, "reading snapshot files")?;
    admin_only(caller, "reading snapshot files")?;
    m.clustered("reading snapshot files")?;
    let missing = || ApiError::NotFound {
        kind: "snapshot",
        name: id.to_string(),
    };
    let snap = m
        .records
        .list::<Snapshot>(SNAPSHOTS)
        .await?
        .into_iter()
        .find(|s| s.id == id)
        .ok_or_else(missing)?;
    if !m.node.has_snapshot_files(&snap) {
        return Err(missing());
    }
    Ok(snap)
}

async fn manifest(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    node: Option<Extension<NodeToken>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SnapManifest>, ApiError> {
    let snap = held(&m, &caller, node, &id).await?;
    let files = m.node.snapshot_files(&snap);
    let (images, digest) = (m.images.clone(), snap.image_digest.clone());
    let out = tokio::task::spawn_blocking(move || -> Result<SnapManifest, ApiError> {
        let mut v = Vec::new();
        for (name, p) in files {
            let (size, sha256) = frozen_sha256(&p)?;
            v.push(SnapFile { name, size, sha256 });
        }
        let rootfs = images
            .rootfs_sha256(&digest)
            .map_err(|e| ApiError::Conflict(format!("this node's root filesystem: {e}")))?;
        Ok(SnapManifest {
            files: v,
            rootfs_sha256: rootfs,
        })
    })
    .await
    .map_err(crate::node::internal)??;
    Ok(Json(out))
}

async fn file(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    node: Option<Extension<NodeToken>>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let snap = held(&m, &caller, node, &id).await?;
    let path = m
        .node
        .snapshot_files(&snap)
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| p)
        .ok_or_else(|| ApiError::NotFound {
            kind: "snapshot file",
            name: name.clone(),
        })?;
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    // Its data only, when the receiver takes that (extents.rs).
    let sparse = headers
        .get(axum::http::header::ACCEPT)
        .is_some_and(|v| v.as_bytes() == extents::CONTENT_TYPE.as_bytes());
    let (kind, body) = if sparse {
        let f = f.into_std().await;
        (extents::CONTENT_TYPE, Body::from_stream(extents_stream(f)))
    } else {
        (
            "application/octet-stream",
            Body::from_stream(file_stream(f)),
        )
    };
    Ok(([(axum::http::header::CONTENT_TYPE, kind)], body).into_response())
}

/// Largest file of a snapshot a node takes: its memory file is the VM's RAM, a disk layer at
/// most the VM's disk and qcow2's metadata, the state a fraction of the RAM.
fn bound(snap: &Snapshot, name: &str) -> u64 {
    let mib = 1u64 << 20;
    match name {
        "mem" | "state" => snap.mem_mib.saturating_mul(mib).saturating_add(64 * mib),
        _ => snap
            .disk_gib
            .saturating_mul(1 << 30)
            .saturating_add(256 * mib),
    }
}

/// Whether a node's manifest names exactly the files `snap` has (`wanted`), once each, each
/// within its bound, with SHA-256s in hex.
fn manifest_fits(man: &SnapManifest, wanted: &[(String, PathBuf)], snap: &Snapshot) -> bool {
    let hex64 = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
    let named = |n: &str| man.files.iter().filter(|f| f.name == n).count() == 1;
    man.files.len() == wanted.len()
        && wanted.iter().all(|(n, _)| named(n))
        && man
            .files
            .iter()
            .all(|f| hex64(&f.sha256) && f.size <= bound(snap, &f.name))
}

/// Writes file `f`'s body to `path`, its data only (`sparse`: records, extents.rs) or whole:
/// exactly `f.size` bytes (no more are read), zeros left as holes, hashing to `f.sha256`. The
/// bytes that came over the wire.
async fn receive_file<B>(body: B, sparse: bool, path: &Path, f: &SnapFile) -> Result<u64, String>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    let wire = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w = wire.clone();
    let body = body.map_frame(move |fr| {
        if let Some(d) = fr.data_ref() {
            w.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        fr
    });
    let sha = if sparse {
        extents::receive_extents(body, path, f.size).await?
    } else {
        body_to_sparse(body, path, f.size).await?
    };
    if sha != f.sha256 {
        return Err(format!("{} does not hash to what its node said", f.name));
    }
    Ok(wire.load(std::sync::atomic::Ordering::Relaxed))
}

/// Writes a body to `path` (at most `size` bytes, exactly that many), leaving runs of zeros as
/// holes; its SHA-256.
async fn body_to_sparse<B>(body: B, path: &Path, size: u64) -> Result<String, String>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use futures_util::StreamExt;
    let err = |e: String| format!("{}: {e}", path.display());
    let f = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
    let mut h = Sha256::new();
    let mut at: u64 = 0;
    let mut body = http_body_util::BodyStream::new(body);
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|e| err(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if at + data.len() as u64 > size {
            return Err(err(format!("more than the {size} bytes announced")));
        }
        h.update(&data);
        if data.iter().any(|b| *b != 0) {
            f.write_all_at(&data, at).map_err(|e| err(e.to_string()))?;
        }
        at += data.len() as u64;
    }
    if at != size {
        return Err(err(format!("{at} bytes of the {size} announced")));
    }
    f.set_len(size).map_err(|e| err(e.to_string()))?;
    Ok(hex::encode(h.finalize()))
}

/// How often a node looks for snapshot files whose record is gone (a snapshot is deleted
/// through any node; the copies on the others go at their next collection).
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Service {
    /// Removes, now and then, snapshot files and layers no record needs any more.
    pub(crate) fn collect_copies(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(COLLECT_EVERY).await;
                let Some(s) = weak.upgrade() else { return };
                if let Err(e) = s.collect_snapshots().await {
                    tracing::warn!(error = %e, "collecting snapshot files");
                }
            }
        });
    }

    /// Makes sure this node holds `snap`'s files: copied from the node that took it when they
    /// are not here (see the module doc).
    pub(crate) async fn ensure_snapshot_files(
        self: &Arc<Self>,
        snap: &Snapshot,
    ) -> Result<(), ApiError> {
        let Some(home) = snap.node.clone() else {
            return Ok(());
        };
        if self.records.is_here(Some(&home)) || self.node.has_snapshot_files(snap) {
            return Ok(());
        }
        let c = self.clustered("copying snapshot files")?;
        let lock = self.lock_for(&format!("snapshot-files/{}", snap.id));
        let _g = lock.lock().await;
        if self.node.has_snapshot_files(snap) {
            return Ok(());
        }
        if !self.node_live(&home).await? {
            return Err(ApiError::Capacity(format!(
                "snapshot {}'s files are on node {home}, which is down",
                snap.name
            )));
        }
        let t0 = std::time::Instant::now();
        // (Files come as their data only where the sender knows how: extents.rs.)
        let get = |path: String| {
            Request::builder()
                .method("GET")
                .uri(path)
                .header(axum::http::header::ACCEPT, extents::CONTENT_TYPE)
                .body(Body::empty())
                .map_err(|e| ApiError::Internal(e.to_string()))
        };
        let base = format!("/api/v1/cluster/snapshots/{}", snap.id);
        let resp = super::forward::node_request(self, &c, &home, get(base.clone())?).await?;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
            resp.into_body(),
            1 << 20,
        ))
        .await
        .map_err(|e| ApiError::Internal(format!("node {home}'s snapshot files: {e}")))?
        .to_bytes();
        if !status.is_success() {
            return Err(ApiError::from_remote(status, &body, &home));
        }
        let man: SnapManifest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::Internal(format!("node {home}'s snapshot files: {e}")))?;
        let wanted = self.node.snapshot_files(snap);
        if !manifest_fits(&man, &wanted, snap) {
            return Err(ApiError::Internal(format!(
                "node {home} described snapshot {}'s files wrongly",
                snap.name
            )));
        }
        let image = self.snapshot_image(snap).await?;
        self.same_rootfs(&c, &home, &image, &man.rootfs_sha256)
            .await?;
        let stage = self.cfg().data_dir.join("incoming");
        std::fs::create_dir_all(&stage).map_err(crate::node::internal)?;
        let stage = tempfile::Builder::new()
            .prefix(&format!("snap-{}-", snap.id))
            .tempdir_in(&stage)
            .map_err(crate::node::internal)?;
        let mut staged = Vec::new();
        let (mut bytes, mut wire) = (0u64, 0u64);
        for f in &man.files {
            let to = wanted.iter().find(|(n, _)| *n == f.name).map(|(_, p)| p);
            if f.name.starts_with("layer-") && to.is_some_and(|p| p.is_file()) {
                continue;
            }
            let resp = super::forward::node_request(
                self,
                &c,
                &home,
                get(format!("{base}/files/{}", f.name))?,
            )
            .await?;
            if !resp.status().is_success() {
                return Err(ApiError::Internal(format!(
                    "node {home} answered {} for snapshot {}'s {}",
                    resp.status(),
                    snap.name,
                    f.name
                )));
            }
            let sparse = resp
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes() == extents::CONTENT_TYPE.as_bytes());
            let p = stage.path().join(&f.name);
            wire += receive_file(resp.into_body(), sparse, &p, f)
                .await
                .map_err(|e| {
                    ApiError::Internal(format!("snapshot {} from node {home}: {e}", snap.name))
                })?;
            bytes += f.size;
            staged.push((f.name.clone(), p));
        }
        {
            let _ops = self.snap_ops.read().await;
            let (node, s2) = (self.node.clone(), snap.clone());
            tokio::task::spawn_blocking(move || node.install_snapshot_files(&s2, &staged))
                .await
                .map_err(crate::node::internal)??;
        }
        tracing::info!(snapshot = %snap.key(), from = %home, mib = bytes >> 20, wire_mib = wire >> 20, ms = t0.elapsed().as_millis() as u64, "copied a snapshot's files from its node");
        Ok(())
    }
}

#[cfg(test)]
#[path = "snap_files_tests.rs"]
mod tests;
