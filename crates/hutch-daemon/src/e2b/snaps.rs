//! E2B's snapshots over hutch's: `POST /sandboxes/{id}/snapshots` takes one (memory, processes
//! and disk; the sandbox runs on), `GET /snapshots` lists them, `DELETE /templates/{id}` removes
//! one, and a create whose `templateID` names one restores it.

use super::control::{authed, body, Res};
use super::{api_error, error, owner_caller, E2b};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Deserialize, Default)]
pub struct SnapshotBody {
    name: Option<String>,
    memory: Option<bool>,
}

fn info(name: &str) -> serde_json::Value {
    serde_json::json!({"snapshotID": name, "names": [name]})
}

pub async fn create(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Path(id): Path<String>,
    b: axum::body::Body,
) -> Res {
    let caller = authed(&e, &h).await?;
    let r: SnapshotBody = body(b).await?;
    if r.memory == Some(false) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "filesystem-only snapshots (memory: false) are not supported: hutch's keep memory",
        ));
    }
    let (rec, _) = e.resolve(&caller, &id).await.map_err(api_error)?;
    let name = r
        .name
        .unwrap_or_else(|| format!("snap-{}", super::model::new_id()));
    let snap =
        e.m.snapshot(&owner_caller(&rec), &rec.id, &name)
            .await
            .map_err(api_error)?;
    Ok((StatusCode::CREATED, Json(info(&snap.name))).into_response())
}

pub async fn list(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Res {
    let caller = authed(&e, &h).await?;
    let mut all = e.m.snapshots_of(&caller).await.map_err(api_error)?;
    all.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    let sandbox = q.get("sandboxID");
    let name = q.get("name");
    let all: Vec<_> = all
        .iter()
        .filter(|s| sandbox.is_none_or(|id| &s.vm == id) && name.is_none_or(|n| &s.name == n))
        .collect();
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let start = match q.get("nextToken") {
        Some(t) => all.iter().position(|s| &s.name == t).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "nextToken is not from this listing",
            )
        })?,
        None => 0,
    };
    let page: Vec<_> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|s| info(&s.name))
        .collect();
    let mut resp = Json(page).into_response();
    if let Some(n) = all.get(start + limit).and_then(|s| s.name.parse().ok()) {
        resp.headers_mut().insert("x-next-token", n);
    }
    Ok(resp)
}

/// `DELETE /templates/{id}`: E2B deletes a snapshot this way (hutch templates are removed with
/// `hutch template rm`).
pub async fn delete(State(e): State<Arc<E2b>>, h: HeaderMap, Path(id): Path<String>) -> Res {
    let caller = authed(&e, &h).await?;
    e.m.delete_snapshot(&caller, &id).await.map_err(api_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
