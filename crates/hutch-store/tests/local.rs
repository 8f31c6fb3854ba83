//! What the local backends promise beyond the conformance suite: revisions from 1, closing,
//! exclusive files, history kept across reopen, the legacy layout converted, any executor.

mod common;

use common::options;
use hutch_store::kv::{
    Compare, EventKind, MemoryStore, RedbStore, Store, StoreError, StoreOptions, Txn, TxnOutcome,
};
use std::sync::Arc;
use std::time::Duration;

async fn put(s: &dyn Store, key: &str, value: &str) -> u64 {
    s.txn(Txn::new().put(key, value))
        .await
        .unwrap()
        .revision()
        .unwrap()
}

fn both(history: u64) -> (tempfile::TempDir, Vec<Arc<dyn Store>>) {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open_with(&dir.path().join("s.redb"), options(history)).unwrap();
    let memory = MemoryStore::with_options(options(history));
    (dir, vec![Arc::new(memory), Arc::new(redb)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_start_at_one_and_history_at_the_first() {
    let (_dir, stores) = both(1000);
    for s in stores {
        assert_eq!(s.revision().await.unwrap(), 0, "{}", s.backend());
        assert_eq!(s.range("").await.unwrap().revision, 0);
        assert_eq!(put(&*s, "a", "1").await, 1);
        let mut w = s.watch("", 0).await.unwrap();
        assert_eq!(w.next().await.unwrap().revision, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_lagging_past_history_gets_compacted() {
    let (_dir, stores) = both(8);
    for s in stores {
        let mut w = s.watch("", 0).await.unwrap();
        for i in 0..40 {
            put(&*s, &format!("k{i}"), "v").await;
        }
        // The ring (4 batches) and the history (8 revisions) both moved past revision 1.
        match w.next().await {
            Err(StoreError::Compacted { oldest }) => assert_eq!(oldest, 33, "{}", s.backend()),
            other => panic!("{}: {other:?}", s.backend()),
        }
        assert!(matches!(
            s.watch("", 31).await,
            Err(StoreError::Compacted { oldest: 33 })
        ));
        let mut w = s.watch("", 32).await.unwrap();
        assert_eq!(w.next().await.unwrap().revision, 33);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_store_closes_its_watchers() {
    let (_dir, stores) = both(1000);
    for s in stores {
        let backend = s.backend();
        put(&*s, "a", "1").await;
        let mut waiting = s.watch("", 1).await.unwrap();
        let mut replaying = s.watch("", 0).await.unwrap();
        let waiter = tokio::spawn(async move { waiting.next().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
        let r = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Err(StoreError::Closed)), "{backend}: {r:?}");
        // A watcher that had not subscribed yet is closed too.
        let r = replaying.next().await;
        assert!(matches!(r, Err(StoreError::Closed)), "{backend}: {r:?}");
    }
}

#[test]
fn a_file_is_opened_once_and_released_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    let s = RedbStore::open(&p).unwrap();
    assert!(matches!(RedbStore::open(&p), Err(StoreError::Db { .. })));
    drop(s);
    RedbStore::open(&p).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_floor_survives_reopen_and_shrinks_to_a_smaller_limit() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    {
        let s = RedbStore::open_with(&p, options(20)).unwrap();
        for i in 0..30 {
            put(&s, &format!("k{i}"), "v").await;
        }
        assert!(matches!(
            s.watch("", 9).await,
            Err(StoreError::Compacted { oldest: 11 })
        ));
    }
    let s = RedbStore::open_with(&p, options(20)).unwrap();
    assert_eq!(s.revision().await.unwrap(), 30);
    assert!(matches!(
        s.watch("", 9).await,
        Err(StoreError::Compacted { oldest: 11 })
    ));
    assert_eq!(
        s.watch("", 10)
            .await
            .unwrap()
            .next()
            .await
            .unwrap()
            .revision,
        11
    );
    drop(s);
    let s = RedbStore::open_with(&p, options(5)).unwrap();
    assert!(matches!(
        s.watch("", 10).await,
        Err(StoreError::Compacted { oldest: 26 })
    ));
    assert_eq!(
        s.watch("", 25)
            .await
            .unwrap()
            .next()
            .await
            .unwrap()
            .revision,
        26
    );
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Rec {
    n: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_file_is_converted_in_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("state.redb");
    {
        let legacy = hutch_store::Store::open(&p).unwrap();
        legacy
            .insert_new(hutch_store::VMS, "acct/vm1", &Rec { n: 1 })
            .unwrap();
        legacy
            .insert_new(hutch_store::VMS, "acct/vm2", &Rec { n: 2 })
            .unwrap();
        legacy
            .put(hutch_store::IMAGES, "alpine:3", &Rec { n: 3 })
            .unwrap();
        legacy
            .put(hutch_store::TOKENS, "t1", &Rec { n: 4 })
            .unwrap();
    }
    {
        let s = RedbStore::open(&p).unwrap();
        assert_eq!(s.revision().await.unwrap(), 1);
        let snap = s.range("legacy/").await.unwrap();
        let got: Vec<_> = snap
            .kvs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_slice(), kv.create_revision))
            .collect();
        assert_eq!(
            got,
            [
                ("legacy/images/alpine:3", &br#"{"n":3}"#[..], 1),
                ("legacy/tokens/t1", &br#"{"n":4}"#[..], 1),
                ("legacy/vms/acct/vm1", &br#"{"n":1}"#[..], 1),
                ("legacy/vms/acct/vm2", &br#"{"n":2}"#[..], 1),
            ]
        );
        let mut w = s.watch("legacy/vms/", 0).await.unwrap();
        let e = w.next().await.unwrap();
        assert_eq!(
            (e.kind, e.key.as_str(), e.revision),
            (EventKind::Put, "legacy/vms/acct/vm1", 1)
        );
        put(&s, "vms/x", "{}").await;
    }
    // The legacy tables are gone and a second open converts nothing.
    {
        let db = redb::Database::open(&p).unwrap();
        let rtx = db.begin_read().unwrap();
        let mut names: Vec<String> = redb::ReadTransaction::list_tables(&rtx)
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["kv", "kv_history", "kv_meta"]);
    }
    let s = RedbStore::open(&p).unwrap();
    assert_eq!(s.revision().await.unwrap(), 2);
    assert_eq!(s.range("legacy/").await.unwrap().kvs.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_legacy_file_converts_to_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("state.redb");
    drop(hutch_store::Store::open(&p).unwrap());
    let s = RedbStore::open(&p).unwrap();
    assert_eq!(s.revision().await.unwrap(), 0);
    assert!(s.range("").await.unwrap().kvs.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixes_failed_and_committed_txns_in_submission_order() {
    // Many clients at once: the writer batches them, and each compare sees the earlier
    // transactions of its batch.
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
    let tasks: Vec<_> = (0..50u32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                // Every client creates its own key and tries to take one of 5 shared slots.
                let txn = Txn::new()
                    .when(Compare::Absent(format!("slot/{}", i % 5)))
                    .put(format!("slot/{}", i % 5), i.to_string())
                    .put(format!("own/{i}"), "v");
                s.txn(txn).await.unwrap()
            })
        })
        .collect();
    let mut committed = Vec::new();
    for t in tasks {
        if let TxnOutcome::Committed { revision } = t.await.unwrap() {
            committed.push(revision);
        }
    }
    committed.sort();
    assert_eq!(committed, [1, 2, 3, 4, 5]);
    assert_eq!(s.range("slot/").await.unwrap().kvs.len(), 5);
    assert_eq!(s.range("own/").await.unwrap().kvs.len(), 5);
}

#[test]
fn works_without_a_tokio_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    block_on(async {
        assert_eq!(put(&s, "a", "1").await, 1);
        assert_eq!(s.get("a").await.unwrap().unwrap().value, b"1");
        assert_eq!(s.range("").await.unwrap().revision, 1);
        let mut w = s.watch("", 0).await.unwrap();
        assert_eq!(w.next().await.unwrap().key, "a");
    });
    let m = MemoryStore::with_options(StoreOptions::default());
    block_on(async { assert_eq!(put(&m, "a", "1").await, 1) });
}

/// A minimal executor: polls on this thread, parks between wake-ups.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
