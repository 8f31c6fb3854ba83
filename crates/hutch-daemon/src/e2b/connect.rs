//! The Connect protocol (connectrpc.com/docs/protocol) with the JSON codec, as envd's clients
//! speak it: unary calls (`application/json` bodies), server streams and client streams
//! (`application/connect+json`: 5-byte envelopes, a flags byte and a big-endian length, with an
//! end-of-stream envelope carrying the error, if any). Compressed envelopes are refused.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

/// Largest message a client may send (a unary body or one envelope of a stream).
pub const MAX_MESSAGE: usize = 4 << 20;

const FLAG_COMPRESSED: u8 = 1;
const FLAG_END: u8 = 2;

/// Connect error codes (the subset hutch answers with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    pub fn name(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code (the protocol's table).
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// An RPC failure: a code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> RpcError {
        RpcError::new(Code::InvalidArgument, message)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.name(), "message": self.message})
    }
}

impl From<crate::error::ApiError> for RpcError {
    fn from(e: crate::error::ApiError) -> RpcError {
        use crate::error::ApiError as A;
        let code = match &e {
            A::Invalid(_) | A::BadImage(_) => Code::InvalidArgument,
            A::NotFound { .. } => Code::NotFound,
            A::Conflict(_) => Code::FailedPrecondition,
            A::Unauthorized(_) => Code::Unauthenticated,
            A::Forbidden(_) => Code::PermissionDenied,
            A::Quota(_) | A::TooLarge(_) => Code::ResourceExhausted,
            A::Capacity(_) => Code::Unavailable,
            A::Vmm(hutch_vmm::VmmError::Unsupported { .. }) => Code::Unimplemented,
            _ => Code::Internal,
        };
        RpcError::new(code, e.to_string())
    }
}

/// A unary error response.
impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let mut r = (self.code.status(), axum::Json(self.json())).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// How the client framed its request, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Unary,
    Stream,
}

/// The framing of a request; None for anything but the JSON codec (answer with
/// [`unsupported_codec`]).
pub fn framing(headers: &HeaderMap) -> Option<Framing> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match ct.as_str() {
        "application/json" => Some(Framing::Unary),
        "application/connect+json" => Some(Framing::Stream),
        _ => None,
    }
}

/// The answer to a request in another codec (protobuf) or content type.
pub fn unsupported_codec() -> Response {
    (
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        [("accept-post", "application/json, application/connect+json")],
        "hutch serves the Connect protocol with the JSON codec only",
    )
        .into_response()
}

/// Refuses compressed request bodies (the SDKs send none).
pub fn check_encoding(headers: &HeaderMap) -> Result<(), RpcError> {
    for h in ["content-encoding", "connect-content-encoding"] {
        if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
            if v != "identity" {
                return Err(RpcError::new(
                    Code::Unimplemented,
                    format!("{h} {v} is not supported"),
                ));
            }
        }
    }
    Ok(())
}

/// The client's deadline (`Connect-Timeout-Ms`), if any.
pub fn timeout(headers: &HeaderMap) -> Result<Option<std::time::Duration>, RpcError> {
    match headers.get("connect-timeout-ms") {
        None => Ok(None),
        Some(v) => {
            let ms: u64 = v
                .to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 10)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| RpcError::invalid("Connect-Timeout-Ms is not a number"))?;
            Ok(Some(std::time::Duration::from_millis(ms)))
        }
    }
}

/// Parses one JSON message (an empty body is the empty message).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| RpcError::invalid(format!("malformed message: {e}")))
}

/// Envelope parser for a request stream.
#[derive(Debug, Default)]
pub struct Envelopes {
    buf: Vec<u8>,
}

/// What one envelope held.
#[derive(Debug, PartialEq, Eq)]
pub enum Envelope {
    Message(Vec<u8>),
    End(Vec<u8>),
}

impl Envelopes {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete envelope; an error for a compressed one, an oversized one, or
    /// unknown flags.
    pub fn next(&mut self) -> Result<Option<Envelope>, RpcError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if flags & FLAG_COMPRESSED != 0 {
            return Err(RpcError::new(
                Code::Unimplemented,
                "compressed messages are not supported",
            ));
        }
        if flags & !FLAG_END != 0 {
            return Err(RpcError::invalid(format!(
                "unknown envelope flags {flags:#x}"
            )));
        }
        if len > MAX_MESSAGE {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("message of {len} bytes is over the {MAX_MESSAGE} limit"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let msg = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        Ok(Some(if flags & FLAG_END != 0 {
            Envelope::End(msg)
        } else {
            Envelope::Message(msg)
        }))
    }

    /// Bytes left over (a truncated envelope at the end of the body).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// One message in an envelope.
pub fn envelope(flags: u8, json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + json.len());
    out.push(flags);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
    Bytes::from(out)
}

/// A message envelope for `v`.
pub fn message(v: &serde_json::Value) -> Bytes {
    envelope(0, v.to_string().as_bytes())
}

/// The end-of-stream envelope, with the error if the call failed.
pub fn end(err: Option<&RpcError>) -> Bytes {
    let v = match err {
        Some(e) => serde_json::json!({"error": e.json()}),
        None => serde_json::json!({}),
    };
    envelope(FLAG_END, v.to_string().as_bytes())
}

/// Reads the one enveloped request message of a server-streaming call.
pub async fn read_single(body: Body) -> Result<Vec<u8>, RpcError> {
    let mut env = Envelopes::default();
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| RpcError::new(Code::Canceled, e.to_string()))?;
        env.push(&chunk);
        if env.pending() > MAX_MESSAGE + 5 {
            return Err(RpcError::new(Code::ResourceExhausted, "request too large"));
        }
        if let Some(Envelope::Message(m)) = env.next()? {
            return Ok(m);
        }
    }
    Err(RpcError::invalid(
        "the request stream ended before its message",
    ))
}

/// A unary body, within [`MAX_MESSAGE`].
pub async fn read_unary(body: Body) -> Result<Bytes, RpcError> {
    axum::body::to_bytes(body, MAX_MESSAGE)
        .await
        .map_err(|e| RpcError::new(Code::ResourceExhausted, format!("request body: {e}")))
}

/// A unary success response.
pub fn unary_ok(v: serde_json::Value) -> Response {
    let mut r = axum::Json(v).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The sending half of a server stream: messages, then [`StreamTx::finish`].
pub struct StreamTx {
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl StreamTx {
    /// Sends one message; false once the client is gone.
    pub async fn send(&self, v: serde_json::Value) -> bool {
        self.tx.send(message(&v)).await.is_ok()
    }

    /// Ends the stream, with the error if the call failed.
    pub async fn finish(self, err: Option<RpcError>) {
        let _ = self.tx.send(end(err.as_ref())).await;
    }

    /// Resolves when the client went away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A streaming response and its sender. The channel is small: a client that does not read
/// holds the sender back instead of filling hutchd's memory.
pub fn stream_response() -> (StreamTx, Response) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let r = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    (StreamTx { tx }, r)
}

/// A streaming response that is only an error (a call refused before it started).
pub fn stream_error(err: RpcError) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from(end(Some(&err))))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// proto3 JSON `bytes`: base64, standard or URL-safe, padded or not.
pub fn decode_bytes(s: &str) -> Result<Vec<u8>, RpcError> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let t = s.trim_end_matches('=');
    STANDARD_NO_PAD
        .decode(t)
        .or_else(|_| URL_SAFE_NO_PAD.decode(t))
        .map_err(|e| RpcError::invalid(format!("bytes field is not base64: {e}")))
}

/// proto3 JSON `bytes` out.
pub fn encode_bytes(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_split_anywhere() {
        let mut wire = message(&serde_json::json!({"a": 1})).to_vec();
        wire.extend_from_slice(&end(None));
        let mut e = Envelopes::default();
        let mut got = Vec::new();
        for b in wire {
            e.push(&[b]);
            while let Some(x) = e.next().unwrap() {
                got.push(x);
            }
        }
        assert_eq!(
            got,
            vec![
                Envelope::Message(br#"{"a":1}"#.to_vec()),
                Envelope::End(b"{}".to_vec())
            ]
        );
        assert_eq!(e.pending(), 0);
    }

    #[test]
    fn bad_envelopes_are_refused() {
        let mut e = Envelopes::default();
        e.push(&envelope(FLAG_COMPRESSED, b"x"));
        assert_eq!(e.next().unwrap_err().code, Code::Unimplemented);
        let mut e = Envelopes::default();
        e.push(&[0x80, 0, 0, 0, 1, b'x']);
        assert_eq!(e.next().unwrap_err().code, Code::InvalidArgument);
        let mut e = Envelopes::default();
        e.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(e.next().unwrap_err().code, Code::ResourceExhausted);
    }

    #[test]
    fn bytes_decode_every_base64_flavour() {
        assert_eq!(decode_bytes("aGk=").unwrap(), b"hi");
        assert_eq!(decode_bytes("aGk").unwrap(), b"hi");
        assert_eq!(decode_bytes("-_8").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(decode_bytes("+/8=").unwrap(), vec![0xfb, 0xff]);
        assert!(decode_bytes("!!").is_err());
    }

    #[test]
    fn errors_have_the_protocols_statuses() {
        assert_eq!(Code::NotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(Code::Unauthenticated.status(), StatusCode::UNAUTHORIZED);
        let e = RpcError::new(Code::NotFound, "gone");
        assert_eq!(
            e.json(),
            serde_json::json!({"code":"not_found","message":"gone"})
        );
        assert_eq!(
            end(Some(&e))[5..],
            br#"{"error":{"code":"not_found","message":"gone"}}"#[..]
        );
    }

    #[test]
    fn timeouts_parse() {
        let mut h = HeaderMap::new();
        assert_eq!(timeout(&h).unwrap(), None);
        h.insert("connect-timeout-ms", HeaderValue::from_static("1500"));
        assert_eq!(
            timeout(&h).unwrap(),
            Some(std::time::Duration::from_millis(1500))
        );
        h.insert("connect-timeout-ms", HeaderValue::from_static("soon"));
        assert!(timeout(&h).is_err());
    }
}
