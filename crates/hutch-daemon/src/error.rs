//! The service's error type (kinds, with the store's, VMM's and image store's causes kept) and
//! its one mapping to HTTP status codes and JSON error bodies (the REST edge; the SSH edge prints
//! the message, the SFTP edge maps agent codes itself).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadImage(String),
    #[error("{0}")]
    Registry(String),
    #[error("{0}")]
    Quota(String),
    #[error("{0}")]
    Capacity(String),
    #[error("{0}")]
    Internal(String),
    /// A request body over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// The state store failed (the cause is kept).
    #[error("state store: {0}")]
    Store(#[source] hutch_store::kv::StoreError),
    /// The VMM failed, or cannot do this yet (`Unsupported`); the cause is kept.
    #[error("{0}")]
    Vmm(#[source] hutch_vmm::VmmError),
    /// Building or storing an image failed on this host (not the image's fault).
    #[error("{0}")]
    Image(#[source] hutch_image::ImageError),
    /// What another cluster node answered for work it did for this one.
    #[error("{message}")]
    Remote {
        status: u16,
        code: String,
        message: String,
    },
}

/// Every code [`ApiError::code`] gives, for errors that come back from another node.
const CODES: &[&str] = &[
    "invalid_argument",
    "not_found",
    "conflict",
    "unauthorized",
    "forbidden",
    "bad_image",
    "registry_error",
    "quota_exceeded",
    "insufficient_capacity",
    "internal",
    "payload_too_large",
    "unsupported",
];

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid_argument",
            ApiError::NotFound { .. } => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BadImage(_) => "bad_image",
            ApiError::Registry(_) => "registry_error",
            ApiError::Quota(_) => "quota_exceeded",
            ApiError::Capacity(_) => "insufficient_capacity",
            ApiError::Internal(_) => "internal",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Store(_) | ApiError::Image(_) => "internal",
            ApiError::Vmm(hutch_vmm::VmmError::Unsupported { .. }) => "unsupported",
            ApiError::Vmm(_) => "internal",
            ApiError::Remote { code, .. } => CODES
                .iter()
                .find(|c| **c == code.as_str())
                .copied()
                .unwrap_or("internal"),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) | ApiError::BadImage(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Registry(_) => StatusCode::BAD_GATEWAY,
            ApiError::Quota(_) => StatusCode::FORBIDDEN,
            ApiError::Capacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Store(_) | ApiError::Image(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Vmm(hutch_vmm::VmmError::Unsupported { .. }) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Vmm(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Remote { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// The error node `node` answered (status and JSON body), as this node's.
    pub fn from_remote(status: StatusCode, body: &[u8], node: &str) -> ApiError {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let e = &v["error"];
        ApiError::Remote {
            status: status.as_u16(),
            code: e["code"].as_str().unwrap_or("internal").to_string(),
            message: match e["message"].as_str() {
                Some(m) => format!("node {node}: {m}"),
                None => format!(
                    "node {node} answered {status}: {}",
                    hutch_core::clean_text(&String::from_utf8_lossy(&body[..body.len().min(300)]))
                ),
            },
        }
    }

    pub fn vm(name: &str) -> ApiError {
        ApiError::NotFound {
            kind: "sandbox",
            name: name.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            // The whole chain of causes goes to the log; the client gets the message.
            let mut chain = self.to_string();
            let mut cause = std::error::Error::source(&self);
            while let Some(c) = cause {
                chain.push_str(&format!(": {c}"));
                cause = c.source();
            }
            tracing::error!(error = %chain, "request failed");
        }
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        (self.status(), axum::Json(body)).into_response()
    }
}

impl From<hutch_store::kv::StoreError> for ApiError {
    fn from(e: hutch_store::kv::StoreError) -> Self {
        match e {
            hutch_store::kv::StoreError::Contended { .. } => ApiError::Conflict(format!(
                "{e}; another change to the same record kept winning, try again"
            )),
            // The record went away between the lookup and the change (a concurrent delete).
            hutch_store::kv::StoreError::NotFound { key } => {
                let (kind, name) = match key.split_once('/') {
                    Some(("vms", id)) => ("sandbox", id.to_string()),
                    Some(("templates", n)) => ("template", n.to_string()),
                    Some(("snapshots", n)) => ("snapshot", n.to_string()),
                    Some(("nodes", n)) => ("node", n.to_string()),
                    _ => ("record", key.clone()),
                };
                ApiError::NotFound { kind, name }
            }
            other => ApiError::Store(other),
        }
    }
}

impl From<hutch_image::ImageError> for ApiError {
    fn from(e: hutch_image::ImageError) -> Self {
        match e {
            hutch_image::ImageError::Io { .. } | hutch_image::ImageError::Build(_) => {
                ApiError::Image(e)
            }
            other => ApiError::BadImage(other.to_string()),
        }
    }
}

/// The HTTP meaning of what the guest agent answered: its error codes by kind (a missing file is
/// 404, a denied one 403, a bad path 400, a busy, full or exhausted guest 409), a broken
/// protocol 500, and an agent that is gone, slow or saturated 409.
impl From<crate::agent::AgentError> for ApiError {
    fn from(e: crate::agent::AgentError) -> Self {
        use crate::agent::{AgentError as A, ErrorCode as C};
        match e {
            A::Guest { code, message } => match code {
                C::NotFound => ApiError::NotFound {
                    kind: "file",
                    name: message,
                },
                C::PermissionDenied | C::ReadOnly => ApiError::Forbidden(message),
                C::NotADirectory
                | C::IsDirectory
                | C::NotEmpty
                | C::InvalidArgument
                | C::TooLarge
                | C::Unsupported => ApiError::Invalid(message),
                C::Exists | C::Busy | C::NoSpace | C::ResourceExhausted => {
                    ApiError::Conflict(message)
                }
                C::Io
                | C::BadRequest
                | C::NoProcess
                | C::SignalFailed
                | C::ExportFailed
                | C::Unknown => ApiError::Internal(message),
            },
            A::Proto(_) => ApiError::Internal(e.to_string()),
            A::RequestTooLarge(_) => ApiError::Invalid(e.to_string()),
            _ => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<hutch_vmm::VmmError> for ApiError {
    fn from(e: hutch_vmm::VmmError) -> Self {
        ApiError::Vmm(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_kept_and_mapped_at_the_edge() {
        let e: ApiError = hutch_vmm::VmmError::Unsupported {
            backend: "qemu",
            op: "snapshot",
        }
        .into();
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::NOT_IMPLEMENTED, "unsupported")
        );
        assert_eq!(e.to_string(), "the qemu backend cannot snapshot VMs yet");
        let e: ApiError = hutch_store::kv::StoreError::Closed.into();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            std::error::Error::source(&e).is_some(),
            "the store's error is kept"
        );
        let e: ApiError = hutch_store::kv::StoreError::Contended {
            key: "vms/x".into(),
            attempts: 16,
        }
        .into();
        assert_eq!(e.status(), StatusCode::CONFLICT);
    }
}
