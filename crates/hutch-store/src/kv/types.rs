//! The plain data of the revisioned key-value API: revisions, records, compares, operations,
//! transactions and their outcomes, snapshots and watch events, and the checks every backend
//! applies to a transaction before running it.

use super::error::StoreError;
use serde::Serialize;
use std::collections::HashSet;

/// A store-wide, strictly increasing revision (etcd's revision). Every transaction that changes
/// something gets the next one; 0 means nothing was ever written.
pub type Revision = u64;

/// At most this many compares, and this many operations, in one transaction (etcd's default
/// `--max-txn-ops`, so that what passes here passes on etcd too).
pub const MAX_TXN_OPS: usize = 128;

/// One key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the transaction that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// The revision of the transaction that last wrote the key.
    pub mod_revision: Revision,
}

/// A condition of a [`Txn`], checked against the state before the transaction's operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Exists(String),
    /// The key's `mod_revision` equals the revision; revision 0 means the key is absent.
    ModRevision(String, Revision),
}

impl Compare {
    pub fn key(&self) -> &str {
        match self {
            Compare::Absent(k) | Compare::Exists(k) | Compare::ModRevision(k, _) => k,
        }
    }

    /// Whether the compare holds for a key whose `mod_revision` is `current` (None: absent).
    pub(crate) fn holds(&self, current: Option<Revision>) -> bool {
        match self {
            Compare::Absent(_) => current.is_none(),
            Compare::Exists(_) => current.is_some(),
            Compare::ModRevision(_, rev) => current.unwrap_or(0) == *rev,
        }
    }
}

/// A write of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Creates or replaces the key.
    Put { key: String, value: Vec<u8> },
    /// Removes the key; removing an absent key changes nothing.
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// Compares and operations applied all together or not at all: when every compare holds, every
/// operation is applied atomically and durably at one new revision; otherwise nothing is written.
///
/// ```
/// # use hutch_store::kv::{Compare, Txn};
/// let txn = Txn::new()
///     .when(Compare::Absent("names/vm/a".into()))
///     .put("names/vm/a", "id-1")
///     .put_json("vms/id-1", &serde_json::json!({"name": "a"}))?
///     .delete("tmp/x");
/// # Ok::<(), hutch_store::kv::StoreError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Adds a condition.
    pub fn when(mut self, compare: Compare) -> Txn {
        self.compares.push(compare);
        self
    }

    /// Adds a put of raw bytes.
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Txn {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Adds a put of `value` as JSON.
    pub fn put_json<T: Serialize + ?Sized>(
        self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<Txn, StoreError> {
        let key = key.into();
        match serde_json::to_vec(value) {
            Ok(bytes) => Ok(self.put(key, bytes)),
            Err(source) => Err(StoreError::Encode { key, source }),
        }
    }

    /// Adds a delete.
    pub fn delete(mut self, key: impl Into<String>) -> Txn {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// The checks every backend (etcd included) makes before running a transaction: no empty
    /// key, at most [`MAX_TXN_OPS`] compares and operations, no key written twice.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.compares.len() > MAX_TXN_OPS || self.ops.len() > MAX_TXN_OPS {
            return Err(StoreError::InvalidTxn(format!(
                "{} compares and {} operations; at most {MAX_TXN_OPS} of each",
                self.compares.len(),
                self.ops.len()
            )));
        }
        if self.compares.iter().any(|c| c.key().is_empty())
            || self.ops.iter().any(|o| o.key().is_empty())
        {
            return Err(StoreError::InvalidTxn("an empty key".into()));
        }
        let mut seen = HashSet::with_capacity(self.ops.len());
        for op in &self.ops {
            if !seen.insert(op.key()) {
                return Err(StoreError::InvalidTxn(format!(
                    "key {:?} is written twice",
                    op.key()
                )));
            }
        }
        Ok(())
    }
}

/// What a [`Txn`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held and every operation was applied at `revision`. A transaction that
    /// changed nothing (no operation, or only deletes of absent keys) takes no new revision: its
    /// `revision` is the store's revision when it ran.
    Committed { revision: Revision },
    /// `key` is the key of the first compare that did not hold; nothing was written.
    Failed { key: String },
}

impl TxnOutcome {
    pub fn is_committed(&self) -> bool {
        matches!(self, TxnOutcome::Committed { .. })
    }

    /// The revision of a committed transaction.
    pub fn revision(&self) -> Option<Revision> {
        match self {
            TxnOutcome::Committed { revision } => Some(*revision),
            TxnOutcome::Failed { .. } => None,
        }
    }
}

/// A consistent read: every key under a prefix as of one revision, sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub kvs: Vec<KeyValue>,
    /// The store's revision the read saw; watch from it to follow every later change.
    pub revision: Revision,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: String,
    /// The new value of a put; None for a delete.
    pub value: Option<Vec<u8>>,
    /// The revision of the transaction that made the change (several events of one transaction
    /// share it, in the order of its operations).
    pub revision: Revision,
}
