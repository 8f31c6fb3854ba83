//! envd's `/files`: download a file (GET), upload one or many (POST, `multipart/form-data` or
//! `application/octet-stream`), streamed through the guest agent both ways.

use super::envd::{ctx_with, Ctx};
use super::users::absolute;
use super::{error, E2b, Refusal};
use axum::body::Body;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize, Default, Clone)]
pub struct FileQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<u64>,
}

/// Whether `q` is signed for `op` (read, write) with `token`: E2B's v1 signature, the
/// unpadded base64 of SHA-256 over `path:op:user:token[:expiration]`, not expired.
pub fn signed(q: &FileQuery, op: &str, token: &str) -> bool {
    use base64::Engine;
    use sha2::Digest;
    let Some(sig) = q.signature.as_deref().and_then(|s| s.strip_prefix("v1_")) else {
        return false;
    };
    if q.signature_expiration
        .is_some_and(|t| t < hutch_core::now())
    {
        return false;
    }
    let mut raw = format!(
        "{}:{op}:{}:{token}",
        q.path.as_deref().unwrap_or(""),
        q.username.as_deref().unwrap_or("")
    );
    if let Some(t) = q.signature_expiration {
        raw.push_str(&format!(":{t}"));
    }
    let want = base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(raw));
    crate::constant_eq(sig.as_bytes(), want.as_bytes())
}

/// An envd `/files` error: `{"code": STATUS, "message": ...}`.
fn fail(status: StatusCode, msg: impl std::fmt::Display) -> Refusal {
    error(status, &msg.to_string())
}

/// An envd failure as a `/files` answer, by its code.
fn rpc_fail(e: super::connect::RpcError) -> Refusal {
    use super::connect::Code;
    let status = match e.code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        Code::Unavailable => StatusCode::BAD_GATEWAY,
        Code::Internal | Code::Unimplemented => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    fail(status, e.message)
}

fn from_api(e: crate::error::ApiError) -> Refusal {
    use crate::error::ApiError as A;
    let status = match &e {
        A::NotFound { .. } => StatusCode::NOT_FOUND,
        A::Invalid(_) => StatusCode::BAD_REQUEST,
        A::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        A::Forbidden(_) | A::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        other => other.status(),
    };
    // The agent's "not found" comes as a guest error: say 404 as envd does.
    let msg = e.to_string();
    let status = if status == StatusCode::INTERNAL_SERVER_ERROR && msg.contains("No such file") {
        StatusCode::NOT_FOUND
    } else {
        status
    };
    fail(status, msg)
}

/// The account and absolute path of a `/files` request.
async fn target(
    c: &Ctx,
    headers: &HeaderMap,
    q: &FileQuery,
    path: Option<&str>,
) -> Result<(super::users::Account, String), Refusal> {
    // The `username` query names the user of a signed URL; else the Basic header does.
    let acct = match &q.username {
        Some(u) => c.account_named(Some(u)).await,
        None => c.account(headers).await,
    }
    .map_err(|e| match e.code {
        super::connect::Code::Unauthenticated => fail(StatusCode::UNAUTHORIZED, e.message),
        _ => fail(StatusCode::BAD_GATEWAY, e.message),
    })?;
    let Some(p) = path.filter(|p| !p.is_empty()) else {
        return Err(fail(StatusCode::BAD_REQUEST, "a path is required"));
    };
    let abs = absolute(p, &acct.home).map_err(|e| fail(StatusCode::BAD_REQUEST, e.message))?;
    Ok((acct, abs))
}

pub async fn download(
    State(e): State<Arc<E2b>>,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Result<Response, Refusal> {
    let c = match ctx_with(&e, &headers, |t| signed(&q, "read", t)).await {
        Ok(c) => c,
        Err(r) => return Ok(r.into_response()),
    };
    let (acct, path) = target(&c, &headers, &q, q.path.as_deref()).await?;
    let agent = match super::fs::agent_of(&c, &acct).await {
        Ok(a) => a,
        Err(e) => return Err(rpc_fail(e)),
    };
    match super::fs::stat(&*agent, &path, true).await {
        Ok(Some(a)) if super::fs::is_dir(a.mode) => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                format!("{path} is a directory"),
            ));
        }
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(fail(
                StatusCode::NOT_FOUND,
                format!("{path} does not exist"),
            ))
        }
        Err(e) => return Err(rpc_fail(e)),
    }
    let user = super::fs::user_spec(&acct);
    let r = match c
        .e
        .m
        .open_read_as(&c.caller, c.vm(), user.as_deref(), &path, 0, None)
        .await
    {
        Ok(r) => r,
        Err(e) => return Err(from_api(e)),
    };
    let body = futures_util::stream::unfold(Some(r), |r| async move {
        let mut r = r?;
        match r.next().await {
            Ok(Some(b)) => Some((Ok::<_, std::io::Error>(b), Some(r))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    let name = path
        .rsplit('/')
        .next()
        .unwrap_or("file")
        .replace(['"', '\\'], "_");
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

pub async fn upload(
    State(e): State<Arc<E2b>>,
    Query(q): Query<FileQuery>,
    req: Request,
) -> Result<Response, Refusal> {
    let headers = req.headers().clone();
    let c = match ctx_with(&e, &headers, |t| signed(&q, "write", t)).await {
        Ok(c) => c,
        Err(r) => return Ok(r.into_response()),
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v != "identity")
    {
        return Err(fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads are not supported (hutch reports envd 0.5.7)",
        ));
    }
    if headers
        .keys()
        .any(|k| k.as_str().starts_with("x-metadata-"))
    {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "file metadata is not supported (hutch reports envd 0.5.7)",
        ));
    }
    let limit = c.e.m.cfg().max_upload_bytes;
    let mut written = Vec::new();
    if ct.starts_with("multipart/form-data") {
        let mut mp = match axum::extract::Multipart::from_request(req, &()).await {
            Ok(m) => m,
            Err(e) => return Err(fail(StatusCode::BAD_REQUEST, e.body_text())),
        };
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(fail(StatusCode::BAD_REQUEST, e.body_text())),
            };
            // The query's path names a single file; without it, each part's file name does.
            let name = q
                .path
                .clone()
                .or_else(|| field.file_name().map(str::to_string));
            let (acct, path) = target(&c, &headers, &q, name.as_deref()).await?;
            let chunks = field.map(|r| r.map_err(|e| e.body_text()));
            write(&c, &acct, &path, chunks, limit).await?;
            written.push((acct, path));
        }
    } else if ct.starts_with("application/octet-stream") || ct.is_empty() {
        let (acct, path) = target(&c, &headers, &q, q.path.as_deref()).await?;
        let chunks = req
            .into_body()
            .into_data_stream()
            .map(|r| r.map_err(|e| e.to_string()));
        write(&c, &acct, &path, chunks, limit).await?;
        written.push((acct, path));
    } else {
        return Err(fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "upload as multipart/form-data or application/octet-stream",
        ));
    }
    let out: Vec<_> = written
        .iter()
        .map(|(_, p)| {
            serde_json::json!({
                "name": p.rsplit('/').next().unwrap_or(""),
                "type": "file",
                "path": p,
            })
        })
        .collect();
    Ok(axum::Json(out).into_response())
}

/// Streams `chunks` into `path` within `limit` bytes; the file and the parents it needed
/// belong to `acct`.
async fn write<S>(
    c: &Ctx,
    acct: &super::users::Account,
    path: &str,
    mut chunks: S,
    limit: u64,
) -> Result<(), Refusal>
where
    S: futures_util::Stream<Item = Result<axum::body::Bytes, String>> + Unpin,
{
    let agent = super::fs::agent_of(c, acct).await.map_err(rpc_fail)?;
    let existing = super::fs::stat(&*agent, path, true)
        .await
        .map_err(rpc_fail)?;
    if existing.is_some_and(|a| super::fs::is_dir(a.mode)) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!("{path} is a directory"),
        ));
    }
    if let Some(parent) = path
        .rsplit_once('/')
        .map(|(p, _)| p)
        .filter(|p| !p.is_empty())
    {
        super::fs::make_dirs(&*agent, parent)
            .await
            .map_err(rpc_fail)?;
    }
    let user = super::fs::user_spec(acct);
    let mut w =
        c.e.m
            .open_write_as(&c.caller, c.vm(), user.as_deref(), path, Some(0o644), None)
            .await
            .map_err(from_api)?;
    let mut total = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| fail(StatusCode::BAD_REQUEST, e))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("uploads are limited to {limit} bytes (hutchd --max-upload-mib)"),
            ));
        }
        w.write(&chunk).await.map_err(from_api)?;
    }
    w.finish().await.map_err(from_api)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_e2bs_v1() {
        // What the SDK computes for download_url("/tmp/a", user="root") with token "tok".
        use base64::Engine;
        use sha2::Digest;
        let d = sha2::Sha256::digest(b"/tmp/a:read:root:tok");
        let sig = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(d)
        );
        let q = FileQuery {
            path: Some("/tmp/a".into()),
            username: Some("root".into()),
            signature: Some(sig),
            signature_expiration: None,
        };
        assert!(signed(&q, "read", "tok"));
        assert!(!signed(&q, "write", "tok"), "a read URL does not write");
        assert!(!signed(&q, "read", "other"));
        let mut other_path = q.clone();
        other_path.path = Some("/etc/shadow".into());
        assert!(!signed(&other_path, "read", "tok"));
        let mut expired = q.clone();
        expired.signature_expiration = Some(1);
        assert!(!signed(&expired, "read", "tok"));
        assert!(!signed(&FileQuery::default(), "read", "tok"));
    }
}
