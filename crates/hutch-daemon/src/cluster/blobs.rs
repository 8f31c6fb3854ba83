//! Images are cluster-wide: their records are in etcd, their blobs on the nodes that pulled or
//! imported them. A node about to build an image's root filesystem without some of its layers
//! fetches each from a live peer that has it (`GET /api/v1/cluster/blobs/DIGEST`, node to node
//! with the cluster's admin token, TLS pinned as for forwarding), and keeps it only when its
//! content hashes to the digest (`ImageStore::add_peer_blob`).

use crate::api::{ApiPath, AppState};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::{admin_only, Service};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures_util::StreamExt;
use hutch_core::cluster::NodeState;
use hutch_image::Digest;
use std::io::Write;

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/api/v1/cluster/blobs/{digest}", get(blob))
        .route("/api/v1/cluster/rootfs/{digest}", get(rootfs))
}

/// The SHA-256 of the root filesystem a peer streams.
pub(crate) const ROOTFS_SHA256: &str = "x-hutch-rootfs-sha256";

/// This node's root filesystem of manifest `digest`, streamed with its SHA-256 (admin only).
async fn rootfs(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(digest): ApiPath<String>,
) -> Result<Response, ApiError> {
    admin_only(&caller, "reading root filesystems")?;
    let d = Digest::parse(&digest).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let missing = || ApiError::NotFound {
        kind: "root filesystem",
        name: digest.clone(),
    };
    if !m.images.has_rootfs(d.as_str()) {
        return Err(missing());
    }
    let (images, d2) = (m.images.clone(), d.clone());
    let (f, sha) = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(images.rootfs_path(d2.as_str()))?;
        let sha = images
            .rootfs_sha256(d2.as_str())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok::<_, std::io::Error>((f, sha))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|_| missing())?;
    let stream = file_stream(tokio::fs::File::from_std(f));
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (axum::http::HeaderName::from_static(ROOTFS_SHA256), sha),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Writes a response body to the new file `path`, refusing more than `max` bytes.
pub(crate) async fn body_to_file(
    resp: axum::http::Response<hyper::body::Incoming>,
    path: &std::path::Path,
    max: u64,
) -> Result<u64, ApiError> {
    let mut f = std::fs::File::create(path).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut n: u64 = 0;
    let mut body = http_body_util::BodyStream::new(resp.into_body());
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            n += data.len() as u64;
            if n > max {
                return Err(ApiError::Internal(format!("more than {max} bytes")));
            }
            f.write_all(&data)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        }
    }
    Ok(n)
}

/// A blob of this node's image store, streamed (admin only: the node-to-node token).
async fn blob(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(digest): ApiPath<String>,
) -> Result<Response, ApiError> {
    admin_only(&caller, "reading blobs")?;
    let d = Digest::parse(&digest).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let f = m.images.open_blob(&d).map_err(|_| ApiError::NotFound {
        kind: "blob",
        name: digest.clone(),
    })?;
    let stream = file_stream(tokio::fs::File::from_std(f));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

pub(crate) fn file_stream(
    mut f: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> {
    use tokio::io::AsyncReadExt;
    async_stream(move |tx| async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match f.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if tx
                .send(Ok(bytes::Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl Service {
    /// Fetches from live peers the layers of `layers` this node lacks (no-op on a single node).
    pub(crate) async fn fetch_layers(&self, layers: &[String]) -> Result<(), ApiError> {
        let Some(c) = self.cluster.get().cloned() else {
            return Ok(());
        };
        let missing = self.images.missing_blobs(layers)?;
        if missing.is_empty() {
            return Ok(());
        }
        let peers = self.live_peers(&c).await?;
        for d in missing {
            let mut last = format!("no live node to fetch it from ({} peers)", peers.len());
            let mut got = false;
            for p in &peers {
                match self.fetch_blob(&c, p, &d).await {
                    Ok(()) => {
                        tracing::info!(blob = %d, from = %p, "fetched a layer from a peer node");
                        got = true;
                        break;
                    }
                    Err(e) => last = format!("{p}: {e}"),
                }
            }
            if !got {
                return Err(ApiError::Capacity(format!(
                    "this node lacks layer {d} and could not fetch it ({last}); pull or import \
                     the image on a live node"
                )));
            }
        }
        Ok(())
    }

    /// The other nodes that are up and reachable (advertised).
    async fn live_peers(&self, c: &super::Cluster) -> Result<Vec<String>, ApiError> {
        Ok(self
            .nodes(&Caller::local_admin())
            .await?
            .into_iter()
            .filter(|n| n.name != c.name() && n.state != NodeState::Down && n.advertise.is_some())
            .map(|n| n.name)
            .collect())
    }

    /// Makes sure this node has the root filesystem of `image`. In a cluster, a node without
    /// one takes a copy of a live peer's (rootfs.rs in hutch-image says why: a live migration
    /// needs the same bytes on both nodes) and builds it from the layers only when no peer has
    /// one.
    pub(crate) async fn ensure_rootfs(&self, image: &hutch_core::Image) -> Result<(), ApiError> {
        self.fetch_layers(&image.layers).await?;
        if let Some(c) = self.cluster.get().cloned() {
            if !self.images.has_rootfs(&image.digest) {
                for p in self.live_peers(&c).await? {
                    match self.fetch_rootfs(&c, &p, image, None).await {
                        Ok(()) => {
                            tracing::info!(image = %image.name, from = %p, "copied a root filesystem from a peer node");
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(image = %image.name, peer = %p, error = %e, "no root filesystem from this peer")
                        }
                    }
                }
            }
        }
        let (images, img) = (self.images.clone(), image.clone());
        tokio::task::spawn_blocking(move || images.build_rootfs(&img.digest, &img.layers))
            .await
            .map_err(crate::node::internal)??;
        Ok(())
    }

    /// Copies node `node`'s root filesystem of `image` here (`want`: the SHA-256 it must have).
    pub(crate) async fn fetch_rootfs(
        &self,
        c: &super::Cluster,
        node: &str,
        image: &hutch_core::Image,
        want: Option<&str>,
    ) -> Result<(), ApiError> {
        let req = Request::builder()
            .method("GET")
            .uri(format!("/api/v1/cluster/rootfs/{}", image.digest))
            .body(Body::empty())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let resp = super::forward::node_request(self, c, node, req).await?;
        if !resp.status().is_success() {
            return Err(ApiError::Internal(format!("answered {}", resp.status())));
        }
        let sha = resp
            .headers()
            .get(ROOTFS_SHA256)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if want.is_some_and(|w| w != sha) {
            return Err(ApiError::Conflict(format!(
                "node {node}'s root filesystem of {} changed (sha256 {sha})",
                image.name
            )));
        }
        let tmp = self.images.tmp_dir()?;
        let path = tmp.path().join("rootfs.erofs");
        let max = self
            .images
            .limits
            .max_bytes
            .max(image.rootfs_size.saturating_mul(2));
        body_to_file(resp, &path, max).await?;
        let (images, d) = (self.images.clone(), image.digest.clone());
        tokio::task::spawn_blocking(move || {
            let r = images.install_rootfs(&d, &path, &sha);
            drop(tmp);
            r
        })
        .await
        .map_err(crate::node::internal)??;
        Ok(())
    }

    async fn fetch_blob(&self, c: &super::Cluster, node: &str, d: &Digest) -> Result<(), ApiError> {
        let req = Request::builder()
            .method("GET")
            .uri(format!("/api/v1/cluster/blobs/{d}"))
            .body(Body::empty())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let resp = super::forward::node_request(self, c, node, req).await?;
        if !resp.status().is_success() {
            return Err(ApiError::Internal(format!("answered {}", resp.status())));
        }
        // To a temp file first (bounded), then verified into the store.
        let tmp = self.images.tmp_dir()?;
        let path = tmp.path().join("blob");
        body_to_file(resp, &path, self.images.limits.max_bytes).await?;
        let (images, d2) = (self.images.clone(), d.clone());
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            images
                .add_peer_blob(f, &d2)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            drop(tmp);
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))
    }
}
