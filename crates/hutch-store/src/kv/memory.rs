//! [`MemoryStore`]: the in-memory backend (tests of the service, the benchmark baseline), with
//! the same semantics as redb: the shared [`apply`] under one mutex, history in a bounded ring.

use super::apply::{apply, KvTable};
use super::error::StoreError;
use super::options::StoreOptions;
use super::store::{Store, Watcher};
use super::types::{KeyValue, Revision, Snapshot, Txn, TxnOutcome};
use super::watch::{Batch, HistoryFuture, HistoryPage, HistorySource, Hub, LocalWatcher};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

/// The in-memory backend. Not persistent; dropping it closes its watchers.
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    hub: Hub,
    history_limit: u64,
}

struct Record {
    value: Vec<u8>,
    create: Revision,
    modr: Revision,
}

#[derive(Default)]
struct State {
    data: BTreeMap<String, Record>,
    revision: Revision,
    /// History holds revisions `floor + 1 ..= revision`, one entry each.
    floor: Revision,
    history: VecDeque<Batch>,
}

impl KvTable for BTreeMap<String, Record> {
    fn revisions(&mut self, key: &str) -> Result<Option<(Revision, Revision)>, StoreError> {
        Ok(self.get(key).map(|r| (r.create, r.modr)))
    }

    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        create: Revision,
        modr: Revision,
    ) -> Result<(), StoreError> {
        let record = Record {
            value: value.to_vec(),
            create,
            modr,
        };
        self.insert(key.to_string(), record);
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool, StoreError> {
        Ok(BTreeMap::remove(self, key).is_some())
    }
}

fn kv(key: &str, r: &Record) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: r.value.clone(),
        create_revision: r.create,
        mod_revision: r.modr,
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::with_options(StoreOptions::default())
    }

    pub fn with_options(options: StoreOptions) -> MemoryStore {
        MemoryStore {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                hub: Hub::new(options.watch_buffer, 0),
                history_limit: options.history(),
            }),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; were it poisoned, the state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl HistorySource for Shared {
    fn hub(&self) -> &Hub {
        &self.hub
    }

    fn history(self: Arc<Self>, after: Revision, max: u64) -> HistoryFuture {
        Box::pin(std::future::ready(self.read_history(after, max)))
    }
}

impl Shared {
    fn read_history(&self, after: Revision, max: u64) -> Result<HistoryPage, StoreError> {
        let st = self.lock();
        if after < st.floor {
            return Err(StoreError::Compacted {
                oldest: st.floor + 1,
            });
        }
        let through = st.revision.min(after.saturating_add(max));
        let mut events = Vec::new();
        for rev in after + 1..=through {
            // In range: floor < rev <= revision.
            if let Some(evs) = st.history.get((rev - st.floor - 1) as usize) {
                events.extend(evs.iter().cloned());
            }
        }
        Ok(HistoryPage {
            events,
            through: through.max(after),
            more: through < st.revision,
        })
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.shared.lock().data.get(key).map(|r| kv(key, r)))
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let st = self.shared.lock();
        let kvs = st
            .data
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, r)| kv(k, r))
            .collect();
        Ok(Snapshot {
            kvs,
            revision: st.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let applied = apply(&mut st.data, st.revision, &txn)?;
        if let TxnOutcome::Committed { revision } = applied.outcome {
            if revision > st.revision {
                st.revision = revision;
                let batch: Batch = Arc::new(applied.events);
                st.history.push_back(batch.clone());
                while st.history.len() as u64 > self.shared.history_limit {
                    st.history.pop_front();
                    st.floor += 1;
                }
                // Under the lock, so batches go out in revision order.
                self.shared.hub.publish(batch, revision);
            }
        }
        Ok(applied.outcome)
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watcher, StoreError> {
        let floor = self.shared.lock().floor;
        if after < floor {
            return Err(StoreError::Compacted { oldest: floor + 1 });
        }
        let shared: Arc<dyn HistorySource> = self.shared.clone();
        let source: Weak<dyn HistorySource> = Arc::downgrade(&shared);
        Ok(Watcher::new(LocalWatcher::new(source, prefix, after)))
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.shared.lock().revision)
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}
