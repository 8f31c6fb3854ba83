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
    let stream = tokio_util_stream(tokio::fs::File::from_std(f));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn tokio_util_stream(
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
        let peers: Vec<String> = self
            .nodes(&Caller::local_admin())
            .await?
            .into_iter()
            .filter(|n| n.name != c.name() && n.state != NodeState::Down && n.advertise.is_some())
            .map(|n| n.name)
            .collect();
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
        let mut f = std::fs::File::create(&path).map_err(|e| ApiError::Internal(e.to_string()))?;
        let max = self.images.limits.max_bytes;
        let mut n: u64 = 0;
        let mut body = http_body_util::BodyStream::new(resp.into_body());
        while let Some(frame) = body.next().await {
            let frame = frame.map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                n += data.len() as u64;
                if n > max {
                    return Err(ApiError::Internal(format!("blob larger than {max} bytes")));
                }
                f.write_all(&data)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
            }
        }
        drop(f);
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
