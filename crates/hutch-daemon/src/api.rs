//! The REST API under /api/v1: turns HTTP into manager calls, nothing more.

use crate::agent::{AgentClient, AgentStream};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::manager::{CreateVm, ExecVm, Manager};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use futures_util::StreamExt;
use hutch_core::{Image, Vm};
use hutch_proto::{Frame, Kind};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub type AppState = Arc<Manager>;

/// The sandbox a `/sandboxes/{name}/...` path names, resolved once for the caller (see
/// tenancy.rs): handlers get the VM's store key and act on exactly the VM the caller may touch;
/// another account's VM answers 404, as a missing one does.
pub struct VmKey(pub String);

impl FromRequestParts<AppState> for VmKey {
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
        Ok(VmKey(m.vm_for(&caller, &name)?.key()))
    }
}

/// JSON body extractor whose rejections are our JSON errors.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
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
        .route("/api/v1/sandboxes/{name}/exec", post(exec_vm))
        .route(
            "/api/v1/sandboxes/{name}/files",
            get(get_file).put(put_file),
        )
        .route("/api/v1/sandboxes/{name}/logs", get(logs))
        .route("/api/v1/sandboxes/{name}/health", get(vm_health))
        .route("/api/v1/sandboxes/{name}/commit", post(commit_vm))
        .fallback(|| async {
            ApiError::NotFound {
                kind: "route",
                name: "this path".into(),
            }
        })
        .layer(axum::extract::DefaultBodyLimit::max(1 << 30))
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

/// Every request acts for a caller; reading files on the daemon's host and garbage collection
/// are for admins. Which sandbox a path names is resolved by the `VmKey` extractor.
async fn ownership(
    State(_m): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return ApiError::Unauthorized("no caller identity".into()).into_response();
    };
    let path = req.uri().path().to_string();
    if !caller.admin {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let admin_only = path == "/api/v1/images/gc"
            || (path == "/api/v1/images" && req.method() == axum::http::Method::POST && is_json);
        if admin_only {
            return ApiError::Forbidden(format!("{path} is for admins")).into_response();
        }
    }
    next.run(req).await
}

async fn health(State(m): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "accel": m.cfg.accel.as_str(),
        "kernel": m.cfg.bundle.release,
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
    Ok(Json(m.images_of(&caller)?))
}

async fn get_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(m.image_for(&caller, &name)?))
}

async fn delete_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    m.delete_image(&caller, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportReq {
    path: String,
    name: Option<String>,
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
    let (path, name) = if is_json {
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .map_err(|e| ApiError::Invalid(format!("reading body: {e}")))?;
        let req: ImportReq = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::Invalid(format!("malformed request body: {e}")))?;
        let p = std::path::PathBuf::from(&req.path);
        if !p.exists() {
            return Err(ApiError::Invalid(format!(
                "{} does not exist on the daemon's host",
                req.path
            )));
        }
        (p, req.name)
    } else {
        upload = m.images.tmp_dir()?;
        let p = upload.path().join("upload.tar");
        let mut f = tokio::fs::File::create(&p)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut s = body.into_data_stream();
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| ApiError::Invalid(format!("reading upload: {e}")))?;
            f.write_all(&chunk)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        f.flush()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        (p, q.name)
    };
    let _ops = m.image_ops.read().await;
    crate::crash::point("import.uploaded");
    let m2 = m.clone();
    let img = tokio::task::spawn_blocking(move || m2.images.import(&path, name.as_deref()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    crate::crash::point("import.built");
    let img = m.store_image(caller.owner(), img)?;
    tracing::info!(image = %img.key(), digest = %img.digest, "imported image");
    Ok((StatusCode::CREATED, Json(img)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullReq {
    reference: String,
    #[serde(default)]
    insecure: bool,
    username: Option<String>,
    password: Option<String>,
    name: Option<String>,
}

/// Pulls from a registry; the response is NDJSON progress events ending in
/// `{"type":"done","image":{...}}` or `{"type":"error","code","message"}`.
async fn pull_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(req): ApiJson<PullReq>,
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

async fn gc_images(State(m): State<AppState>) -> Result<Json<hutch_image::GcStats>, ApiError> {
    Ok(Json(m.gc().await?))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushReq {
    image: String,
    reference: Option<String>,
    #[serde(default)]
    insecure: bool,
    username: Option<String>,
    password: Option<String>,
}

async fn push_image(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(req): ApiJson<PushReq>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitReq {
    reference: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    push: bool,
    #[serde(default)]
    insecure: bool,
    username: Option<String>,
    password: Option<String>,
}

/// Commits a VM's changes to a new image; with `push`, sends it to the registry too.
async fn commit_vm(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    VmKey(name): VmKey,
    ApiJson(req): ApiJson<CommitReq>,
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
    Ok(Json(m.vms_of(&caller)?))
}

async fn create_vm(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(req): ApiJson<CreateVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((StatusCode::CREATED, Json(m.create(&caller, req).await?)))
}

async fn get_vm(State(m): State<AppState>, VmKey(name): VmKey) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.get(&name)?))
}

async fn delete_vm(State(m): State<AppState>, VmKey(name): VmKey) -> Result<StatusCode, ApiError> {
    m.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_vm(State(m): State<AppState>, VmKey(name): VmKey) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.start(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneReq {
    name: Option<String>,
}

/// Copies a stopped sandbox's disk into a new sandbox and boots it.
async fn clone_vm(
    State(m): State<AppState>,
    VmKey(name): VmKey,
    ApiJson(req): ApiJson<CloneReq>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(m.clone_vm(&name, req.name).await?),
    ))
}

async fn stop_vm(State(m): State<AppState>, VmKey(name): VmKey) -> Result<Json<Vm>, ApiError> {
    Ok(Json(m.stop(&name).await?))
}

/// Kills the process if the HTTP client goes away before it exited.
struct ExecGuard {
    client: Arc<AgentClient>,
    stream: AgentStream,
    done: bool,
}

impl Drop for ExecGuard {
    fn drop(&mut self) {
        if !self.done {
            let r = hutch_proto::Request::Signal { signal: 9 };
            let _ = self
                .client
                .send(Frame::json(Kind::Request, self.stream.id, &r));
        }
    }
}

fn line(v: Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// Runs a process; the response is NDJSON events: started, stdout/stderr (base64), exit.
async fn exec_vm(
    State(m): State<AppState>,
    VmKey(name): VmKey,
    ApiJson(req): ApiJson<ExecVm>,
) -> Result<Response, ApiError> {
    let (client, stream) = m.exec(&name, req)?;
    let guard = ExecGuard {
        client,
        stream,
        done: false,
    };
    let events = futures_util::stream::unfold(Some(guard), move |g| async move {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut g = g?;
        let ev = match g.stream.rx.recv().await {
            None => {
                g.done = true;
                let ev = json!({"type": "error", "code": "agent_lost", "message": "connection to the guest agent was lost"});
                return Some((Ok::<_, std::convert::Infallible>(line(ev)), None));
            }
            Some(f) => f,
        };
        let (v, end) = match ev.kind {
            Kind::Stdout => (
                json!({"type": "stdout", "data": b64.encode(&ev.payload)}),
                false,
            ),
            Kind::Stderr => (
                json!({"type": "stderr", "data": b64.encode(&ev.payload)}),
                false,
            ),
            Kind::Response => match ev.parse::<hutch_proto::Response>("response") {
                Ok(hutch_proto::Response::Started { pid }) => {
                    (json!({"type": "started", "pid": pid}), false)
                }
                Ok(hutch_proto::Response::Exited {
                    code,
                    signal,
                    timed_out,
                }) => (
                    json!({"type": "exit", "code": code, "signal": signal, "timed_out": timed_out}),
                    true,
                ),
                Ok(hutch_proto::Response::Error { code, message }) => (
                    json!({"type": "error", "code": code, "message": message}),
                    true,
                ),
                Ok(other) => (
                    json!({"type": "other", "value": format!("{other:?}")}),
                    false,
                ),
                Err(e) => (
                    json!({"type": "error", "code": "protocol", "message": e.to_string()}),
                    true,
                ),
            },
            _ => (json!({"type": "other"}), false),
        };
        if end {
            g.done = true;
            Some((Ok(line(v)), None))
        } else {
            Some((Ok(line(v)), Some(g)))
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(events),
    )
        .into_response())
}

#[derive(Deserialize)]
struct FileQuery {
    path: String,
    mode: Option<String>,
}

async fn get_file(
    State(m): State<AppState>,
    VmKey(name): VmKey,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    let data = m.read_file(&name, &q.path).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

async fn put_file(
    State(m): State<AppState>,
    VmKey(name): VmKey,
    ApiQuery(q): ApiQuery<FileQuery>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let mode = match q.mode.as_deref() {
        Some(s) => Some(
            u32::from_str_radix(s, 8)
                .map_err(|_| ApiError::Invalid(format!("mode {s:?} is not octal")))?,
        ),
        None => None,
    };
    let n = m.write_file(&name, &q.path, mode, &body).await?;
    Ok(Json(json!({"path": q.path, "bytes": n})))
}

async fn vm_health(State(m): State<AppState>, VmKey(name): VmKey) -> Result<Json<Value>, ApiError> {
    Ok(Json(m.agent_health(&name).await?))
}

#[derive(Deserialize)]
struct LogQuery {
    tail: Option<u64>,
}

async fn logs(
    State(m): State<AppState>,
    VmKey(name): VmKey,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    let vm = m.get(&name)?;
    let text = m.console_tail(&vm.id, q.tail.unwrap_or(64 * 1024).min(16 << 20));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}
