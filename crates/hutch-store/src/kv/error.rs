//! The error type of the revisioned key-value API ([`StoreError`]) and the helpers backends use to
//! build it.

use super::types::Revision;
use std::sync::Arc;

/// A cause shared by every caller of a failed group commit.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, a broken file, a lost connection); `source` tells why.
    #[error("state store: {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: Cause,
    },
    /// A stored record is not the JSON its reader expects.
    #[error("state store record {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be turned into JSON.
    #[error("record {key:?} cannot be encoded: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The watch history no longer holds the revisions asked for: `oldest` is the oldest revision
    /// still kept (a watch needs `after >= oldest - 1`). Re-list with `range` and watch from the
    /// snapshot's revision.
    #[error("revisions before {oldest} are compacted away")]
    Compacted { oldest: Revision },
    /// The store was closed (its last handle dropped, or its writer stopped).
    #[error("state store is closed")]
    Closed,
    /// A transaction the store refuses to run (see [`crate::kv::Txn::validate`]).
    #[error("invalid transaction: {0}")]
    InvalidTxn(String),
    /// `update_json` found no record at the key.
    #[error("record {key:?} not found")]
    NotFound { key: String },
    /// `update_json` lost the compare-and-swap race this many times in a row.
    #[error("record {key:?} changed under {attempts} updates in a row")]
    Contended { key: String, attempts: u32 },
    /// The file is of a layout this build does not know (written by a newer hutch).
    #[error("state store schema {found} is newer than this build's {supported}")]
    Schema { found: u64, supported: u64 },
}

impl StoreError {
    /// A backend failure with its cause.
    pub fn db(context: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Db {
            context,
            source: Arc::new(e),
        }
    }

    /// A backend failure described by a message (a malformed stored record, a lost thread).
    pub fn db_msg(context: &'static str, msg: impl Into<String>) -> Self {
        StoreError::db(context, Message(msg.into()))
    }

    /// The same error for one more caller (every transaction of a failed group commit gets one).
    pub(crate) fn share(&self) -> StoreError {
        match self {
            StoreError::Db { context, source } => StoreError::Db {
                context,
                source: source.clone(),
            },
            StoreError::Closed => StoreError::Closed,
            other => StoreError::db_msg("group commit", other.to_string()),
        }
    }
}

/// An error that is only a message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Message(pub String);
