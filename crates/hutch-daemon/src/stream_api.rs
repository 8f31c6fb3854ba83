//! The REST handlers that move bytes between clients and guests, all streamed with
//! backpressure, and the request body limits.
//!
//! - `POST /sandboxes/{name}/exec`: a JSON body (stdin whole, base64, within the JSON limit), or
//!   the streaming form (`Content-Type: application/vnd.hutch.exec-stream`): one line of JSON
//!   (the same request, without `stdin`), then the process's stdin as raw bytes to the end of the
//!   body. The response is NDJSON events, produced only as fast as the client reads them: a
//!   client that stops reading stalls its process (the guest blocks on its full pipe) and
//!   nothing else.
//! - `GET/PUT /sandboxes/{name}/files`: file contents streamed in chunks; a PUT is limited to the
//!   configured upload size.
//! - Bodies: JSON requests up to [`JSON_LIMIT`]; uploads up to the configured size; 413 beyond.

use crate::agent::{within, AgentError, ExecEvent};
use crate::api::AppState;
use crate::api::{ApiQuery, VmRef};
use crate::error::ApiError;
use crate::service::files::ANSWER_TIMEOUT;
use crate::service::ExecVm;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest JSON request body.
pub const JSON_LIMIT: usize = 1 << 20;
/// Content type of the streaming exec form.
pub const EXEC_STREAM: &str = "application/vnd.hutch.exec-stream";

fn content_type(h: &HeaderMap) -> &str {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Bodies other than uploads and streamed stdin are JSON, limited to [`JSON_LIMIT`].
enum BodyKind {
    Json,
    Upload,
    Stream,
}

fn body_kind(method: &Method, path: &str, ctype: &str) -> BodyKind {
    let is_json = ctype.starts_with("application/json");
    let file_put = *method == Method::PUT && path.ends_with("/files");
    let archive = *method == Method::POST && path == "/api/v1/images" && !is_json;
    if file_put || archive {
        BodyKind::Upload
    } else if *method == Method::POST && path.ends_with("/exec") && ctype.starts_with(EXEC_STREAM) {
        BodyKind::Stream
    } else {
        BodyKind::Json
    }
}

/// Refuses, before reading it, a body whose declared length is over its route's limit. Bodies
/// without a length are counted as they are read (by the JSON extractor and the upload loops).
pub async fn body_limits(
    State(m): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = match body_kind(req.method(), req.uri().path(), content_type(req.headers())) {
        BodyKind::Json => Some(JSON_LIMIT as u64),
        BodyKind::Upload => Some(m.cfg().max_upload_bytes),
        BodyKind::Stream => None,
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(limit), Some(len)) = (limit, declared) {
        if len > limit {
            return ApiError::TooLarge(format!(
                "the request body of {len} bytes is over this route's limit of {limit} bytes"
            ))
            .into_response();
        }
    }
    next.run(req).await
}

/// Reads a whole JSON body, at most [`JSON_LIMIT`] bytes.
pub async fn json_body<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, JSON_LIMIT).await.map_err(|_| {
        ApiError::TooLarge(format!("JSON bodies are limited to {JSON_LIMIT} bytes"))
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::Invalid(format!("malformed request body: {e}")))
}

fn line(v: Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// The exec request line of the streaming form and whatever of stdin came with it.
async fn exec_head(
    s: &mut (impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin),
) -> Result<(ExecVm, Bytes), ApiError> {
    let mut head = Vec::new();
    loop {
        let chunk = s
            .next()
            .await
            .ok_or_else(|| ApiError::Invalid("the body ended before the exec request line".into()))?
            .map_err(|e| ApiError::Invalid(format!("reading the body: {e}")))?;
        if let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            head.extend_from_slice(&chunk[..pos]);
            let req: ExecVm = serde_json::from_slice(&head)
                .map_err(|e| ApiError::Invalid(format!("malformed exec request line: {e}")))?;
            return Ok((req, chunk.slice(pos + 1..)));
        }
        head.extend_from_slice(&chunk);
        if head.len() > JSON_LIMIT {
            return Err(ApiError::TooLarge(format!(
                "the exec request line is over {JSON_LIMIT} bytes"
            )));
        }
    }
}

/// Runs a process; the response is NDJSON events: started, stdout/stderr (base64), exit.
pub async fn exec_vm(
    State(m): State<AppState>,
    VmRef { caller, name }: VmRef,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let stream = if content_type(&headers).starts_with(EXEC_STREAM) {
        let mut s = body.into_data_stream();
        let (mut req, first) = exec_head(&mut s).await?;
        if req.stdin.is_some() {
            return Err(ApiError::Invalid(
                "in the streaming form stdin is the rest of the body, not a field".into(),
            ));
        }
        req.stream_stdin = true;
        let stream = m.exec(&caller, &name, req).await?;
        let h = stream.handle();
        let limit = m.cfg().max_upload_bytes;
        // Stdin goes to the guest only as fast as the process takes it; the client's upload
        // waits meanwhile. Ends with the body (EOF) or with the process; when the process is
        // gone first, the rest of the upload is read and dropped (bounded), so the connection
        // is not reset under a client that is still sending and has yet to read the exit.
        tokio::spawn(async move {
            let gone = !first.is_empty() && h.stdin(&first).await.is_err();
            if !gone {
                loop {
                    match s.next().await {
                        Some(Ok(chunk)) => {
                            if h.stdin(&chunk).await.is_err() {
                                break;
                            }
                        }
                        Some(Err(_)) => return,
                        None => {
                            let _ = h.eof().await;
                            return;
                        }
                    }
                }
            }
            drain(s, limit, STDIN_DRAIN).await;
        });
        stream
    } else {
        let req: ExecVm = json_body(body).await?;
        m.exec(&caller, &name, req).await?
    };
    // The state: the stream (None once ended) and whether it has answered yet.
    let (metrics, t0) = (m.metrics.clone(), std::time::Instant::now());
    let events = futures_util::stream::unfold(Some((stream, false)), move |st| {
        let metrics = metrics.clone();
        async move {
            let b64 = base64::engine::general_purpose::STANDARD;
            let (mut stream, started) = st?;
            let ev = if started {
                stream.next().await
            } else {
                within(ANSWER_TIMEOUT, stream.next()).await
            };
            let (v, end) = match ev {
                Ok(Some(ExecEvent::Started { pid })) => {
                    (json!({"type": "started", "pid": pid}), false)
                }
                Ok(Some(ExecEvent::Stdout(b))) => {
                    (json!({"type": "stdout", "data": b64.encode(&b)}), false)
                }
                Ok(Some(ExecEvent::Stderr(b))) => {
                    (json!({"type": "stderr", "data": b64.encode(&b)}), false)
                }
                Ok(Some(ExecEvent::Exited {
                    code,
                    signal,
                    timed_out,
                })) => {
                    metrics.execs.observe(t0.elapsed());
                    (
                        json!({"type": "exit", "code": code, "signal": signal, "timed_out": timed_out}),
                        true,
                    )
                }
                // Only after the exit, which ended the stream already.
                Ok(None) => return None,
                Err(AgentError::Guest { code, message }) => (
                    json!({"type": "error", "code": code.as_str(), "message": message}),
                    true,
                ),
                Err(e @ AgentError::Proto(_)) => (
                    json!({"type": "error", "code": "protocol", "message": e.to_string()}),
                    true,
                ),
                Err(e) => {
                    let message = if started {
                        e.to_string()
                    } else {
                        format!("the process did not start: {e}")
                    };
                    let ev = json!({"type": "error", "code": "agent_lost", "message": message});
                    (ev, true)
                }
            };
            // Dropping an unfinished stream (the client went away) cancels it: the agent kills the
            // process.
            Some((
                Ok::<_, std::convert::Infallible>(line(v)),
                (!end).then_some((stream, true)),
            ))
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(events),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct FileQuery {
    path: String,
    mode: Option<String>,
    /// GET: first byte to read.
    #[serde(default)]
    offset: u64,
    /// GET: most bytes to read.
    length: Option<u64>,
}

/// A file's contents, streamed as the client reads them.
pub async fn get_file(
    State(m): State<AppState>,
    VmRef { caller, name }: VmRef,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    let reader = m
        .open_read(&caller, &name, &q.path, q.offset, q.length)
        .await?;
    let chunks = futures_util::stream::unfold(Some(reader), |r| async move {
        let mut r = r?;
        match r.next().await {
            Ok(Some(b)) => Some((Ok(b), Some(r))),
            Ok(None) => None,
            // Ends the response early: the client sees a truncated body, not a short file.
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// Writes a file from the streamed body, up to the configured upload limit.
pub async fn put_file(
    State(m): State<AppState>,
    VmRef { caller, name }: VmRef,
    ApiQuery(q): ApiQuery<FileQuery>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let mode = match q.mode.as_deref() {
        Some(s) => Some(
            u32::from_str_radix(s, 8)
                .map_err(|_| ApiError::Invalid(format!("mode {s:?} is not octal")))?,
        ),
        None => None,
    };
    let limit = m.cfg().max_upload_bytes;
    let mut w = m.open_write(&caller, &name, &q.path, mode, None).await?;
    let mut s = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| ApiError::Invalid(format!("reading the upload: {e}")))?;
        total += chunk.len() as u64;
        if total > limit {
            // Dropping the writer cancels the write in the guest.
            return Err(ApiError::TooLarge(format!(
                "uploads are limited to {limit} bytes (hutchd --max-upload-mib)"
            )));
        }
        w.write(&chunk).await?;
    }
    let n = w.finish().await?;
    Ok(Json(json!({"path": q.path, "bytes": n})))
}

/// How long the rest of an exec's upload is read and dropped after its process ended.
const STDIN_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads and drops what is left of a request body, up to `limit` bytes and `time`.
async fn drain(
    mut s: impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin,
    limit: u64,
    time: std::time::Duration,
) {
    let deadline = tokio::time::Instant::now() + time;
    let mut n = 0u64;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, s.next()).await {
        n += chunk.len() as u64;
        if n > limit {
            return;
        }
    }
}
