//! Operating hutch over REST: the lifecycle event stream (`GET /api/v1/events`), host status
//! (`GET /api/v1/status`) and Prometheus metrics (`GET /metrics`, admin only).

use crate::api::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hutch_core::status::Status;
use tokio::sync::broadcast::error::RecvError;

/// Lifecycle events as they happen, one JSON object per line (`application/x-ndjson`), for as
/// long as the client reads. An account sees its own VMs' events only. A client that falls
/// behind gets a `{"kind":"lagged","missed":N}` line and continues.
pub async fn events(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let mut rx = m.events.subscribe();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(async move {
        loop {
            let line = match rx.recv().await {
                Ok(e) if caller.sees(e.owner.as_deref()) => serde_json::to_vec(&e),
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    serde_json::to_vec(&serde_json::json!({"kind": "lagged", "missed": n}))
                }
                Err(RecvError::Closed) => return,
            };
            let Ok(mut line) = line else { continue };
            line.push(b'\n');
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream_from(body_rx);
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

pub async fn status(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<Status>, ApiError> {
    Ok(Json(m.status(&caller).await?))
}

pub async fn metrics(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Response, ApiError> {
    let text = m.metrics_text(&caller).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// `POST /api/v1/admin/recover`: rebuilds the VM records the state store lost (see rebuild.rs).
pub async fn recover(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<Vec<crate::node::rebuild::Recovered>>, ApiError> {
    crate::service::admin_only(&caller, "recover")?;
    Ok(Json(m.node.rebuild().await?))
}
