//! The [`Store`] trait every backend implements, and the [`Watcher`] it hands out.

use super::error::StoreError;
use super::types::{KeyValue, Revision, Snapshot, Txn, TxnOutcome, WatchEvent};

/// A revisioned key-value store: the state of hutchd (see the crate docs for the model and how it
/// maps onto etcd). Object safe: the service holds an `Arc<dyn Store>`.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key's value and revisions; None when it does not exist.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key starting with `prefix` (all keys for ""), sorted, as of one revision.
    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError>;

    /// Runs the transaction: when every compare holds, applies all its operations atomically and
    /// durably at one new revision. A transaction submitted before its future is dropped may
    /// still commit (as with etcd: the outcome is then unknown to the caller).
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Every change to keys under `prefix` with a revision above `after`, in revision order,
    /// then the live ones. [`StoreError::Compacted`] when the history no longer reaches back to
    /// `after + 1` (now, or later if the watcher falls that far behind).
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watcher, StoreError>;

    /// The store's current revision.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// "redb", "memory", ...
    fn backend(&self) -> &'static str;
}

/// The stream behind a [`Watcher`]; a backend implements it.
#[async_trait::async_trait]
pub trait WatchStream: Send + 'static {
    /// The next event; see [`Watcher::next`].
    async fn next(&mut self) -> Result<WatchEvent, StoreError>;
}

/// The changes under a prefix, in revision order, without gaps: a watcher that falls behind
/// catches up from the store's history, or gets [`StoreError::Compacted`] once that history no
/// longer reaches back far enough. Dropping it ends the watch.
pub struct Watcher {
    inner: Box<dyn WatchStream>,
}

impl Watcher {
    pub fn new(stream: impl WatchStream) -> Watcher {
        Watcher {
            inner: Box::new(stream),
        }
    }

    /// Waits for the next event. Cancel safe (an event is never lost by dropping the future, so
    /// it can sit in a `select!`). After an error the watcher is done: [`StoreError::Compacted`]
    /// means re-list and watch again from the snapshot's revision, [`StoreError::Closed`] that
    /// the store is gone.
    pub async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        self.inner.next().await
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}
