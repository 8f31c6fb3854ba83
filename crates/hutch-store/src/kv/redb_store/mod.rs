//! [`RedbStore`]: the embedded, single-node backend. One redb file ([`layout`]), prepared (and
//! converted from the legacy layout) when opened ([`migrate`]). Writes go through the
//! group-commit [`writer`] thread: the transactions queued while it commits are applied
//! together in one redb write transaction with one fsync, each at its own revision. Reads (and
//! watch history) are redb read transactions run on tokio's blocking pool (inline outside a
//! runtime), never on an async worker.

mod layout;
mod migrate;
mod writer;

use super::error::StoreError;
use super::options::StoreOptions;
use super::store::{Store, Watcher};
use super::types::{KeyValue, Revision, Snapshot, Txn, TxnOutcome};
use super::watch::{HistoryFuture, HistoryPage, HistorySource, Hub, LocalWatcher};
use layout::{
    db, decode_events, meta_get, record_kv, DATA, HISTORY, META, META_FLOOR, META_REVISION,
};
use redb::Database;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// The redb backend. Opening takes the file's lock (a second opener, in this process or another,
/// fails). Every commit is durable (fsynced) before its caller hears of it. Dropping the store
/// waits for the queued transactions to commit, closes its watchers and releases the file (once
/// no read is in flight).
pub struct RedbStore {
    shared: Arc<Shared>,
    submit: Option<mpsc::Sender<writer::Request>>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// What the writer, the readers and the watchers share.
pub(super) struct Shared {
    db: Database,
    hub: Hub,
    /// History is kept for revisions above this one.
    floor: AtomicU64,
    history_limit: u64,
}

impl RedbStore {
    /// Opens (or creates) the store file with the default options. Blocks (disk I/O): call it at
    /// startup or from blocking code.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the store file: converts a legacy-layout file, trims history to
    /// `options.history_revisions`, starts the writer thread.
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<RedbStore, StoreError> {
        let database = Database::create(path).map_err(db("open"))?;
        let history_limit = options.history();
        let prepared = migrate::prepare(&database, history_limit)?;
        let shared = Arc::new(Shared {
            db: database,
            hub: Hub::new(options.watch_buffer, prepared.revision),
            floor: AtomicU64::new(prepared.floor),
            history_limit,
        });
        let (submit, rx) = mpsc::channel();
        let max_batch = options.max_batch.max(1);
        let for_writer = shared.clone();
        let writer = std::thread::Builder::new()
            .name("hutch-store-writer".into())
            .spawn(move || writer::run(for_writer, rx, max_batch))
            .map_err(|e| StoreError::db("start the writer thread", e))?;
        Ok(RedbStore {
            shared,
            submit: Some(submit),
            writer: Some(writer),
            path: path.to_path_buf(),
        })
    }

    /// The file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a read on a blocking thread (inline when not inside a tokio runtime).
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        blocking(self.shared.clone(), f).await
    }
}

async fn blocking<R: Send + 'static>(
    shared: Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h
            .spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StoreError::db("read", e))?,
        Err(_) => f(&shared),
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // The writer ends once its queue is drained and every sender is gone.
        self.submit.take();
        if let Some(w) = self.writer.take() {
            // Waits for the last commit, off the async worker where there is one. The writer
            // only panics on a bug; the store is going away either way.
            let _ = crate::offload::offload(|| w.join());
        }
    }
}

impl Shared {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let rtx = self.db.begin_read().map_err(db("begin read"))?;
        let data = rtx.open_table(DATA).map_err(db("open data"))?;
        let v = data.get(key).map_err(db("read"))?;
        v.map(|g| record_kv(key, g.value())).transpose()
    }

    fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let rtx = self.db.begin_read().map_err(db("begin read"))?;
        let meta = rtx.open_table(META).map_err(db("open meta"))?;
        let revision = meta_get(&meta, META_REVISION)?;
        let data = rtx.open_table(DATA).map_err(db("open data"))?;
        let mut kvs = Vec::new();
        for item in data.range(prefix..).map_err(db("read"))? {
            let (k, v) = item.map_err(db("read"))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            kvs.push(record_kv(k.value(), v.value())?);
        }
        Ok(Snapshot { kvs, revision })
    }

    fn read_history(&self, after: Revision, max: u64) -> Result<HistoryPage, StoreError> {
        let rtx = self.db.begin_read().map_err(db("begin read"))?;
        let meta = rtx.open_table(META).map_err(db("open meta"))?;
        let revision = meta_get(&meta, META_REVISION)?;
        let floor = meta_get(&meta, META_FLOOR)?;
        if after < floor {
            return Err(StoreError::Compacted { oldest: floor + 1 });
        }
        let through = revision.min(after.saturating_add(max)).max(after);
        let history = rtx.open_table(HISTORY).map_err(db("open history"))?;
        let mut events = Vec::new();
        if through > after {
            for item in history.range(after + 1..=through).map_err(db("read"))? {
                let (rev, v) = item.map_err(db("read"))?;
                events.extend(decode_events(rev.value(), v.value())?);
            }
        }
        Ok(HistoryPage {
            events,
            through,
            more: through < revision,
        })
    }
}

impl HistorySource for Shared {
    fn hub(&self) -> &Hub {
        &self.hub
    }

    fn history(self: Arc<Self>, after: Revision, max: u64) -> HistoryFuture {
        Box::pin(blocking(self, move |s| s.read_history(after, max)))
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.read(move |s| s.get(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let prefix = prefix.to_string();
        self.read(move |s| s.range(&prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        let (reply, answer) = oneshot::channel();
        self.submit
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(writer::Request { txn, reply })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watcher, StoreError> {
        let floor = self.shared.floor.load(Ordering::SeqCst);
        if after < floor {
            return Err(StoreError::Compacted { oldest: floor + 1 });
        }
        let shared: Arc<dyn HistorySource> = self.shared.clone();
        let source: Weak<dyn HistorySource> = Arc::downgrade(&shared);
        Ok(Watcher::new(LocalWatcher::new(source, prefix, after)))
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.shared.hub.revision())
    }

    fn backend(&self) -> &'static str {
        "redb"
    }
}
