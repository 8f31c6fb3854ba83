//! Backends of the conformance suite for the local stores (shared by the integration tests).

#![allow(dead_code)]

use hutch_store::conformance::{Backend, Instance};
use hutch_store::kv::{MemoryStore, RedbStore, StoreOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Small live-watch ring, so that lag cases really lag.
pub fn options(history: u64) -> StoreOptions {
    StoreOptions {
        history_revisions: history,
        watch_buffer: 4,
        ..StoreOptions::default()
    }
}

pub struct Memory;

#[async_trait::async_trait]
impl Backend for Memory {
    async fn fresh(&self, history: u64) -> Instance {
        Instance {
            store: Arc::new(MemoryStore::with_options(options(history))),
            locator: String::new(),
        }
    }

    async fn reopen(&self, _: Instance) -> Option<Instance> {
        None
    }
}

pub struct Redb {
    dir: tempfile::TempDir,
    n: AtomicUsize,
}

impl Redb {
    pub fn new() -> Redb {
        Redb {
            dir: tempfile::tempdir().expect("tempdir"),
            n: AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Backend for Redb {
    async fn fresh(&self, history: u64) -> Instance {
        let n = self.n.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.path().join(format!("s{n}.redb"));
        let store = RedbStore::open_with(&path, options(history)).expect("open");
        Instance {
            store: Arc::new(store),
            locator: path.display().to_string(),
        }
    }

    async fn reopen(&self, instance: Instance) -> Option<Instance> {
        let Instance { store, locator } = instance;
        assert_eq!(Arc::strong_count(&store), 1, "reopen needs the last handle");
        drop(store);
        let store = RedbStore::open_with(locator.as_ref(), options(1000)).expect("reopen");
        Some(Instance {
            store: Arc::new(store),
            locator,
        })
    }
}
