//! Property: any sequence of transactions gives the same outcomes, the same state and the same
//! watch history on the memory and the redb backends.

use hutch_store::kv::{Compare, MemoryStore, RedbStore, Store, StoreError, Txn, TxnOutcome};
use proptest::prelude::*;

const KEYS: [&str; 6] = ["a", "a/1", "a/2", "b", "b/1", "c"];

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(&KEYS[..]).prop_map(String::from)
}

fn compare() -> impl Strategy<Value = Compare> {
    prop_oneof![
        key().prop_map(Compare::Absent),
        key().prop_map(Compare::Exists),
        (key(), 0u64..12).prop_map(|(k, r)| Compare::ModRevision(k, r)),
    ]
}

#[derive(Clone, Debug)]
enum OpSpec {
    Put(String, Vec<u8>),
    Delete(String),
}

fn op() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        3 => (key(), prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(k, v)| OpSpec::Put(k, v)),
        1 => key().prop_map(OpSpec::Delete),
    ]
}

fn txn() -> impl Strategy<Value = Txn> {
    (
        prop::collection::vec(compare(), 0..3),
        // Sometimes a key twice: both backends must refuse it alike.
        prop::collection::vec(op(), 0..4),
    )
        .prop_map(|(compares, ops)| {
            let mut t = Txn::new();
            for c in compares {
                t = t.when(c);
            }
            for o in ops {
                t = match o {
                    OpSpec::Put(k, v) => t.put(k, v),
                    OpSpec::Delete(k) => t.delete(k),
                };
            }
            t
        })
}

/// Every event a watcher has to give now (it stays quiet a while after the last).
async fn drain(w: &mut hutch_store::kv::Watcher) -> Vec<hutch_store::kv::WatchEvent> {
    let mut out = Vec::new();
    while let Ok(e) = tokio::time::timeout(std::time::Duration::from_millis(30), w.next()).await {
        out.push(e.unwrap());
    }
    out
}

/// What a backend answered, comparable across backends.
fn summary(r: Result<TxnOutcome, StoreError>) -> Result<TxnOutcome, String> {
    r.map_err(|e| match e {
        StoreError::InvalidTxn(_) => "invalid".to_string(),
        other => panic!("store failure: {other}"),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn memory_and_redb_agree(txns in prop::collection::vec(txn(), 1..24)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let redb = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let memory = MemoryStore::new();
        rt.block_on(async {
            for t in txns {
                let m = summary(memory.txn(t.clone()).await);
                let r = summary(redb.txn(t.clone()).await);
                assert_eq!(m, r, "txn {t:?}");
            }
            let revision = memory.revision().await.unwrap();
            assert_eq!(redb.revision().await.unwrap(), revision);
            for prefix in ["", "a", "a/", "b/", "c", "z"] {
                assert_eq!(memory.range(prefix).await.unwrap(), redb.range(prefix).await.unwrap());
            }
            for k in KEYS {
                assert_eq!(memory.get(k).await.unwrap(), redb.get(k).await.unwrap());
            }
            for prefix in ["", "a/"] {
                let mut wm = memory.watch(prefix, 0).await.unwrap();
                let mut wr = redb.watch(prefix, 0).await.unwrap();
                assert_eq!(drain(&mut wm).await, drain(&mut wr).await);
            }
        });
    }
}
