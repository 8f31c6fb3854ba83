//! The REST API under /api/v1: turns HTTP into service calls, nothing more.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::{CreateVm, Service};
use crate::stream_api;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use hutch_core::{Image, Vm};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub type AppState = Arc<Service>;

/// The sandbox a `/sandboxes/{name}/...` path names and who asks. The service resolves the
/// name in the caller's namespace (another account's VM answers 404, as a missing one does);
/// the extractor asks it once up front too, so that a path naming no sandbox of the caller is a
/// 404 before any request body is read or judged.
pub struct VmRef {
    pub caller: Caller,
    pub name: String,
}

impl FromRequestParts<AppState> for VmRef {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, m: &AppState) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, m)
            .await
            .map_err(|e| ApiError::Invalid(e.body_text()))?;
        let caller = parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("no caller identity".into()))?;
        m.vm_for(&caller, &name).await?;
        Ok(VmRef { caller, name })
    }
}

/// JSON body extractor whose rejections are our JSON errors.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::TooLarge(format!(
                    "JSON bodies are limited to {} bytes",
                    stream_api::JSON_LIMIT
                )))
            }
            Err(e) => Err(ApiError::Invalid(format!(
                "malformed request body: {}",
                e.body_text()
            ))),
        }
    }
}

/// Query-string extractor whose rejections are our JSON errors (axum's own are plain text).
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::Invalid(e.body_text())),
        }
    }
}

/// Path-parameter extractor whose rejections (e.g. a name that is not UTF-8 once
/// percent-decoded) are our JSON errors.
pub struct ApiPath<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::Invalid(e.body_text())),
        }
    }
}

/// The API. `local`: every caller is the admin (the unix socket); otherwise an outer layer must
/// put the `Caller` in the request extensions (the TCP listener's token check).
pub fn router(m: AppState, local: bool) -> Router {
    let r = Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/status", get(crate::ops_api::status))
        .route("/api/v1/events", get(crate::ops_api::events))
        .route("/metrics", get(crate::ops_api::metrics))
        .route("/api/v1/admin/recover", post(crate::ops_api::recover))
        .route("/api/v1/images", get(list_images).post(import_image))
        .route("/api/v1/images/pull", post(pull_image))
        .route("/api/v1/images/push", post(push_image))
        .route("/api/v1/images/gc", post(gc_images))
        .route(
            "/api/v1/images/{*name}",
            get(get_image).delete(delete_image),
        )
        .route("/api/v1/sandboxes", get(list_vms).post(create_vm))
        .route("/api/v1/sandboxes/{name}", get(get_vm).delete(delete_vm))
        .route("/api/v1/sandboxes/{name}/start", post(start_vm))
        .route("/api/v1/sandboxes/{name}/stop", post(stop_vm))
        .route("/api/v1/sandboxes/{name}/clone", post(clone_vm))
        .route("/api/v1/sandboxes/{name}/exec", post(stream_api::exec_vm))
        .route(
            "/api/v1/sandboxes/{name}/files",
            get(stream_api::get_file).put(stream_api::put_file),
        )
        .route("/api/v1/sandboxes/{name}/logs", get(logs))
        .route("/api/v1/sandboxes/{name}/health", get(vm_health))
        .route("/api/v1/sandboxes/{name}/commit", post(commit_vm));
    let r = crate::cluster_api::routes(crate::timers_api::routes(crate::template_api::routes(
        crate::snap_api::routes(crate::net_api::routes(r)),
    )))
    .fallback(|| async {
        ApiError::NotFound {
            kind: "route",
            name: "this path".into(),
        }
    })
    .layer(axum::extract::DefaultBodyLimit::max(stream_api::JSON_LIMIT))
    .layer(axum::middleware::from_fn_with_state(
        m.clone(),
        stream_api::body_limits,
    ))
    .layer(axum::middleware::from_fn_with_state(
        m.clone(),
        crate::cluster::forward::forward,
    ))
    .layer(axum::middleware::from_fn_with_state(m.clone(), ownership))
    .with_state(m);
    if local {
        r.layer(axum::middleware::from_fn(
            |mut req: Request, next: axum::middleware::Next| async move {
                req.extensions_mut().insert(Caller::local_admin());
                next.run(req).await
            },
        ))
    } else {
        r
    }
}

/// Every request acts for a caller (who may do what is the service's to decide).
async fn ownership(
    State(_m): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if req.extensions().get::<Caller>().is_none() {
        return ApiError::Unauthorized("no caller identity".into()).into_response();
    }
    next.run(req).await
}

async fn health(State(m): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "accel": m.cfg().accel.as_str(),
        "kernel": m.cfg().bundle.release,
    }))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn list_images(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<Vec<Image>>, ApiError> {
    Ok(Json(m.images_of(&caller).await?))
}

async fn get_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(m.image_for(&caller, &name).await?))
}

async fn delete_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    m.delete_image(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct NameQuery {
    name: Option<String>,
}

/// Imports an image: JSON `{path, name}` naming a file or directory on the daemon's host, or the
/// archive itself as the request body (any other content type), with `?name=`.
async fn import_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiQuery(q): ApiQuery<NameQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let upload;
    if is_json {
        let req: hutch_core::api::ImportImage = stream_api::json_body(body).await?;
        let img = m
            .import_host_path(&caller, std::path::Path::new(&req.path), req.name)
            .await?;
        return Ok((StatusCode::CREATED, Json(img)));
    }
    let (path, name) = {
        upload = m.images.tmp_dir()?;
        let p = upload.path().join("upload.tar");
        let mut f = tokio::fs::File::create(&p)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut s = body.into_data_stream();
        use tokio::io::AsyncWriteExt;
        let (mut total, limit) = (0u64, m.cfg().max_upload_bytes);
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| ApiError::Invalid(format!("reading upload: {e}")))?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(ApiError::TooLarge(format!(
                    "uploads are limited to {limit} bytes (hutchd --max-upload-mib)"
                )));
            }
            f.write_all(&chunk)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        f.flush()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        (p, q.name)
    };
    let img = m.import(&caller, &path, name).await?;
    Ok((StatusCode::CREATED, Json(img)))
}

/// Pulls from a registry; the response is NDJSON progress events ending in
/// `{"type":"done","image":{...}}` or `{"type":"error","code","message"}`.
async fn pull_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(req): ApiJson<hutch_core::api::PullImage>,
) -> Result<Response, ApiError> {
    hutch_image::registry::Reference::parse(&req.reference)
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    let creds = match (req.username, req.password) {
        (Some(u), Some(p)) => Some(hutch_image::registry::Credentials {
            username: u,
            password: p,
        }),
        (None, None) => None,
        _ => {
            return Err(ApiError::Invalid(
                "give both username and password, or neither".into(),
            ))
        }
    };
    let opts = hutch_image::PullOptions {
        insecure: req.insecure,
        creds,
        name: req.name,
        // Private destinations only for the admin, or for everyone if the admin said so.
        allow_private: caller.admin || m.cfg().registry_allow_private,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    // The pull goes on if the client goes away; what it fetched stays for the next pull.
    tokio::spawn(async move {
        let ptx = tx.clone();
        let mut progress = move |ev: hutch_image::PullEvent| {
            let _ = ptx.send(serde_json::to_value(&ev).unwrap_or(Value::Null));
        };
        let ev = match m.pull(&caller, &req.reference, opts, &mut progress).await {
            Ok(img) => json!({"type": "done", "image": img}),
            Err(e) => json!({"type": "error", "code": e.code(), "message": e.to_string()}),
        };
        let _ = tx.send(ev);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(line(v)), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn gc_images(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<hutch_image::GcStats>, ApiError> {
    Ok(Json(m.gc(&caller).await?))
}

fn creds(
    u: Option<String>,
    p: Option<String>,
) -> Result<Option<hutch_image::registry::Credentials>, ApiError> {
    match (u, p) {
        (Some(username), Some(password)) => Ok(Some(hutch_image::registry::Credentials {
            username,
            password,
        })),
        (None, None) => Ok(None),
        _ => Err(ApiError::Invalid(
            "give both username and password, or neither".into(),
        )),
    }
}

async fn push_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(req): ApiJson<hutch_core::api::PushImage>,
) -> Result<Json<Value>, ApiError> {
    let c = creds(req.username, req.password)?;
    let pushed = m
        .push(
            &caller,
            &req.image,
            req.reference.as_deref(),
            req.insecure,
            c,
        )
        .await?;
    Ok(Json(json!({"pushed": pushed})))
}

/// Commits a VM's changes to a new image; with `push`, sends it to the registry too.
async fn commit_vm(
    State(m): State<AppState>,
    VmRef { caller, name }: VmRef,
    ApiJson(req): ApiJson<hutch_core::api::CommitVm>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = creds(req.username, req.password)?;
    let img = m
        .commit(&caller, &name, &req.reference, &req.comment)
        .await?;
    let mut v = serde_json::to_value(&img).map_err(|e| ApiError::Internal(e.to_string()))?;
    if req.push {
        let key = img.key();
        v["pushed"] = json!(
            m.push(&caller, &key, Some(&img.name), req.insecure, c)
                .await?
        );
    }
    Ok((StatusCode::CREATED, Json(v)))
}

async fn list_vms(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    Ok(Json(m.vms_of(&caller).await?))
}

async fn create_vm(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(req): ApiJson<CreateVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((StatusCode::CREATED, Json(m.create(&caller, req).await?)))
}

async fn get_vm(State(m): State<AppState>, r: VmRef) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.describe(&r.caller, &r.name).await?))
}

async fn delete_vm(State(m): State<AppState>, r: VmRef) -> Result<StatusCode, ApiError> {
    m.delete(&r.caller, &r.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_vm(State(m): State<AppState>, r: VmRef) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.start(&r.caller, &r.name).await?))
}

/// Copies a stopped sandbox's disk into a new sandbox and boots it.
async fn clone_vm(
    State(m): State<AppState>,
    r: VmRef,
    ApiJson(req): ApiJson<hutch_core::api::CloneVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(m.clone_vm(&r.caller, &r.name, req.name).await?),
    ))
}

async fn stop_vm(State(m): State<AppState>, r: VmRef) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.stop(&r.caller, &r.name).await?))
}

fn line(v: Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

async fn vm_health(State(m): State<AppState>, r: VmRef) -> Result<Json<Value>, ApiError> {
    Ok(Json(m.agent_health(&r.caller, &r.name).await?))
}

#[derive(Deserialize)]
struct LogQuery {
    tail: Option<u64>,
}

async fn logs(
    State(m): State<AppState>,
    r: VmRef,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    let text = m
        .console(
            &r.caller,
            &r.name,
            q.tail.unwrap_or(64 * 1024).min(16 << 20),
        )
        .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}
