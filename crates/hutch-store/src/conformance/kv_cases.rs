//! Conformance cases of reads, transactions, revisions, the JSON helpers and persistence.

use super::{committed, del, put, rev, run, Backend};
use crate::kv::{Compare, KeyValue, StoreError, StoreExt, Txn, TxnOutcome, MAX_TXN_OPS};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;

fn kv(key: &str, value: &[u8], create: u64, modr: u64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.to_vec(),
        create_revision: create,
        mod_revision: modr,
    }
}

fn failed(key: &str) -> TxnOutcome {
    TxnOutcome::Failed { key: key.into() }
}

/// Put, get, replace, delete, re-create: values and create/mod revisions.
pub async fn put_get_delete(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let r0 = rev(s).await;
    assert_eq!(s.get("a").await.expect("get"), None);
    let r1 = put(s, "a", b"1").await;
    assert_eq!(r1, r0 + 1);
    assert_eq!(rev(s).await, r1);
    assert_eq!(s.get("a").await.expect("get"), Some(kv("a", b"1", r1, r1)));
    let r2 = put(s, "a", b"2").await;
    assert_eq!(r2, r1 + 1);
    assert_eq!(s.get("a").await.expect("get"), Some(kv("a", b"2", r1, r2)));
    let r3 = del(s, "a").await;
    assert_eq!(r3, r2 + 1);
    assert_eq!(s.get("a").await.expect("get"), None);
    let r4 = put(s, "a", b"").await;
    assert_eq!(s.get("a").await.expect("get"), Some(kv("a", b"", r4, r4)));
    assert_eq!(rev(s).await, r4);
}

/// All writes of a transaction share its one revision.
pub async fn revisions_of_multi_key_txns(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let r0 = rev(s).await;
    let r1 = committed(run(s, Txn::new().put("m/a", "a1").put("m/b", "b1")).await);
    assert_eq!(r1, r0 + 1);
    let r2 = committed(
        run(
            s,
            Txn::new().put("m/a", "a2").delete("m/b").put("m/c", "c1"),
        )
        .await,
    );
    assert_eq!(r2, r1 + 1);
    assert_eq!(
        s.get("m/a").await.expect("get"),
        Some(kv("m/a", b"a2", r1, r2))
    );
    assert_eq!(s.get("m/b").await.expect("get"), None);
    assert_eq!(
        s.get("m/c").await.expect("get"),
        Some(kv("m/c", b"c1", r2, r2))
    );
    assert_eq!(rev(s).await, r2);
}

/// No operations, or only deletes of absent keys: committed at the current revision, which
/// stays; a failed compare does not move it either.
pub async fn txn_that_changes_nothing_takes_no_revision(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let r1 = put(s, "x", b"1").await;
    assert_eq!(committed(run(s, Txn::new()).await), r1);
    assert_eq!(del(s, "absent").await, r1);
    assert_eq!(
        committed(run(s, Txn::new().when(Compare::Exists("x".into()))).await),
        r1
    );
    let f = run(
        s,
        Txn::new().when(Compare::Absent("x".into())).put("y", "1"),
    )
    .await;
    assert_eq!(f, failed("x"));
    assert_eq!(rev(s).await, r1);
    assert_eq!(put(s, "z", b"1").await, r1 + 1);
}

/// `Absent`, `Exists`, `ModRevision` (0 = absent) before a key exists, while it does, after it
/// is deleted.
pub async fn compare_absent_exists_mod_revision(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let check = |c: Compare| Txn::new().when(c);
    let k = || "k".to_string();
    let holds = |o: TxnOutcome| o.is_committed();
    assert!(holds(run(s, check(Compare::Absent(k()))).await));
    assert_eq!(run(s, check(Compare::Exists(k()))).await, failed("k"));
    assert!(holds(run(s, check(Compare::ModRevision(k(), 0))).await));

    let r = put(s, "k", b"v").await;
    assert_eq!(run(s, check(Compare::Absent(k()))).await, failed("k"));
    assert!(holds(run(s, check(Compare::Exists(k()))).await));
    assert!(holds(run(s, check(Compare::ModRevision(k(), r))).await));
    assert_eq!(
        run(s, check(Compare::ModRevision(k(), r - 1))).await,
        failed("k")
    );
    assert_eq!(
        run(s, check(Compare::ModRevision(k(), r + 1))).await,
        failed("k")
    );
    assert_eq!(
        run(s, check(Compare::ModRevision(k(), 0))).await,
        failed("k")
    );

    // Compare-and-swap: the write guarded by the revision read commits once.
    let cas = || Txn::new().when(Compare::ModRevision(k(), r)).put("k", "w");
    let r2 = committed(run(s, cas()).await);
    assert_eq!(run(s, cas()).await, failed("k"));
    assert_eq!(s.get("k").await.expect("get"), Some(kv("k", b"w", r, r2)));

    del(s, "k").await;
    assert_eq!(
        run(s, check(Compare::ModRevision(k(), r2))).await,
        failed("k")
    );
    assert!(holds(run(s, check(Compare::ModRevision(k(), 0))).await));
    assert!(holds(run(s, check(Compare::Absent(k()))).await));
}

/// A transaction with a failing compare writes none of its operations; `Failed` names the first
/// compare that did not hold.
pub async fn failed_compare_writes_nothing(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let r = put(s, "x", b"1").await;
    let txn = Txn::new()
        .when(Compare::Exists("x".into()))
        .when(Compare::Absent("x".into()))
        .put("y", "1")
        .put("x", "2")
        .delete("x2");
    assert_eq!(run(s, txn).await, failed("x"));
    assert_eq!(s.get("y").await.expect("get"), None);
    assert_eq!(s.get("x").await.expect("get"), Some(kv("x", b"1", r, r)));
    assert_eq!(rev(s).await, r);

    let txn = Txn::new()
        .when(Compare::Absent("y".into()))
        .when(Compare::Exists("z".into()))
        .when(Compare::Exists("w".into()))
        .put("y", "1");
    assert_eq!(run(s, txn).await, failed("z"));
    let txn = Txn::new()
        .when(Compare::Exists("w".into()))
        .when(Compare::Exists("z".into()));
    assert_eq!(run(s, txn).await, failed("w"));
    assert_eq!(s.range("").await.expect("range").kvs.len(), 1);
}

/// Duplicate keys, empty keys and too many operations are refused before anything runs.
pub async fn invalid_txns_are_refused(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let r0 = rev(s).await;
    let invalid = |r: Result<TxnOutcome, StoreError>| matches!(r, Err(StoreError::InvalidTxn(_)));
    assert!(invalid(s.txn(Txn::new().put("a", "1").delete("a")).await));
    assert!(invalid(s.txn(Txn::new().put("a", "1").put("a", "2")).await));
    assert!(invalid(s.txn(Txn::new().put("", "1")).await));
    assert!(invalid(
        s.txn(Txn::new().when(Compare::Absent(String::new()))).await
    ));
    let mut big = Txn::new();
    for i in 0..=MAX_TXN_OPS {
        big = big.put(format!("big/{i}"), "v");
    }
    assert!(invalid(s.txn(big).await));
    let mut many_compares = Txn::new();
    for i in 0..=MAX_TXN_OPS {
        many_compares = many_compares.when(Compare::Absent(format!("c/{i}")));
    }
    assert!(invalid(s.txn(many_compares).await));
    assert_eq!(rev(s).await, r0);
    assert!(s.range("").await.expect("range").kvs.is_empty());
    // The limit itself is fine.
    let mut max = Txn::new();
    for i in 0..MAX_TXN_OPS {
        max = max.put(format!("max/{i}"), "v");
    }
    assert_eq!(committed(run(s, max).await), r0 + 1);
}

/// Of many concurrent creates of one key (`Absent` guard), exactly one commits.
pub async fn concurrent_creates_exactly_one_wins(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let tasks: Vec<_> = (0..32u32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let txn = Txn::new()
                    .when(Compare::Absent("lock".into()))
                    .put("lock", i.to_string());
                (i, s.txn(txn).await.expect("txn"))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (i, outcome) = t.await.expect("task");
        match outcome {
            TxnOutcome::Committed { .. } => winners.push(i),
            TxnOutcome::Failed { key } => assert_eq!(key, "lock"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let got = s.get("lock").await.expect("get").expect("lock exists");
    assert_eq!(got.value, winners[0].to_string().into_bytes());
}

/// Concurrent transactions on distinct keys all commit, each at its own revision.
pub async fn concurrent_txns_get_distinct_revisions(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let r0 = rev(&*s).await;
    let tasks: Vec<_> = (0..40u32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let key = format!("d/{i:02}");
                let r = put(&*s, &key, b"v").await;
                (key, r)
            })
        })
        .collect();
    let mut revs = HashSet::new();
    for t in tasks {
        let (key, r) = t.await.expect("task");
        assert!(
            r > r0 && r <= r0 + 40,
            "revision {r} outside ({r0}, {}]",
            r0 + 40
        );
        assert!(revs.insert(r), "revision {r} given twice");
        let got = s.get(&key).await.expect("get").expect("key exists");
        assert_eq!((got.create_revision, got.mod_revision), (r, r));
    }
    assert_eq!(rev(&*s).await, r0 + 40);
}

/// `range` returns exactly the keys under the prefix, sorted bytewise, with the revision.
pub async fn range_by_prefix(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let keys = [
        "vms/b",
        "vms/a",
        "vms0",
        "vms",
        "vm",
        "names/vm/a",
        "vms/ä",
        "vms/a/x",
    ];
    for k in keys {
        put(s, k, k.as_bytes()).await;
    }
    let r = rev(s).await;
    let snap = s.range("vms/").await.expect("range");
    let got: Vec<_> = snap.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(got, ["vms/a", "vms/a/x", "vms/b", "vms/ä"]);
    assert_eq!(snap.revision, r);
    for kv in &snap.kvs {
        assert_eq!(kv.value, kv.key.as_bytes());
        assert!(kv.mod_revision <= snap.revision);
    }
    let all = s.range("").await.expect("range");
    let mut sorted: Vec<_> = keys.to_vec();
    sorted.sort();
    let got: Vec<_> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(got, sorted);
    let snap = s.range("zzz").await.expect("range");
    assert!(snap.kvs.is_empty());
    assert_eq!(snap.revision, r);
    assert_eq!(s.range("vms").await.expect("range").kvs.len(), 6);
}

/// A range taken while transactions write two keys together always sees both at one revision.
pub async fn range_is_consistent_with_its_revision(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..60u32 {
                let v = i.to_string();
                let txn = Txn::new().put("pair/a", v.clone()).put("pair/b", v);
                committed(s.txn(txn).await.expect("txn"));
            }
        })
    };
    let mut last = 0;
    loop {
        let done = writer.is_finished();
        let snap = s.range("pair/").await.expect("range");
        assert!(snap.revision >= last, "snapshot revision went back");
        last = snap.revision;
        match snap.kvs.as_slice() {
            [] => {}
            [a, b] => {
                assert_eq!(a.value, b.value);
                assert_eq!(a.mod_revision, b.mod_revision);
                assert!(a.mod_revision <= snap.revision);
            }
            other => panic!("torn range: {other:?}"),
        }
        if done {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Counter {
    n: u64,
}

/// `get_json`, `list_json`, `update_json`, `put_json`, and a corrupt record.
pub async fn json_helpers(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let txn = Txn::new()
        .put_json("j/2", &Counter { n: 2 })
        .expect("encode")
        .put_json("j/1", &Counter { n: 1 })
        .expect("encode");
    let r = committed(run(s, txn).await);
    let one = s.get_json::<Counter>("j/1").await.expect("get_json");
    let one = one.expect("j/1 exists");
    assert_eq!(
        (one.key.as_str(), &one.value, one.revision),
        ("j/1", &Counter { n: 1 }, r)
    );
    assert!(s
        .get_json::<Counter>("j/none")
        .await
        .expect("get")
        .is_none());
    let (all, at) = s.list_json::<Counter>("j/").await.expect("list_json");
    assert_eq!(at, r);
    let ns: Vec<_> = all.iter().map(|v| (v.key.as_str(), v.value.n)).collect();
    assert_eq!(ns, [("j/1", 1), ("j/2", 2)]);

    let up = s
        .update_json("j/1", |c: &mut Counter| -> Result<(), StoreError> {
            c.n += 10;
            Ok(())
        })
        .await
        .expect("update_json");
    assert_eq!(up.value, Counter { n: 11 });
    assert_eq!(up.revision, r + 1);
    let again = s
        .get_json::<Counter>("j/1")
        .await
        .expect("get")
        .expect("j/1");
    assert_eq!((again.value, again.revision), (Counter { n: 11 }, r + 1));

    let missing = s
        .update_json("j/none", |_: &mut Counter| -> Result<(), StoreError> {
            Ok(())
        })
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound { key }) if key == "j/none"));
    let refused = s
        .update_json("j/1", |_: &mut Counter| {
            Err(StoreError::InvalidTxn("no".into()))
        })
        .await;
    assert!(matches!(refused, Err(StoreError::InvalidTxn(_))));
    assert_eq!(rev(s).await, r + 1);

    put(s, "j/bad", b"{not json").await;
    let bad = s.get_json::<Counter>("j/bad").await;
    assert!(matches!(bad, Err(StoreError::Corrupt { key, .. }) if key == "j/bad"));
    let bad = s.list_json::<Counter>("j/").await;
    assert!(matches!(bad, Err(StoreError::Corrupt { key, .. }) if key == "j/bad"));
}

/// Concurrent `update_json` increments are all counted (compare-and-swap retries).
pub async fn update_json_under_contention(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let txn = Txn::new()
        .put_json("ctr", &Counter { n: 0 })
        .expect("encode");
    committed(s.txn(txn).await.expect("txn"));
    // 4 tasks of 4 increments: a task loses a race only to one of the other 12 updates, so it
    // never needs more than 13 of its 16 attempts.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..4 {
                    s.update_json("ctr", |c: &mut Counter| -> Result<(), StoreError> {
                        c.n += 1;
                        Ok(())
                    })
                    .await
                    .expect("update_json");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let got = s
        .get_json::<Counter>("ctr")
        .await
        .expect("get")
        .expect("ctr");
    assert_eq!(got.value, Counter { n: 16 });
}

/// Data, revisions and watch history survive closing and reopening.
pub async fn persistence_across_reopen(b: &dyn Backend) {
    let inst = b.fresh(1000).await;
    let s = Arc::clone(&inst.store);
    let r0 = rev(&*s).await;
    let ra = put(&*s, "p/a", b"a").await;
    put(&*s, "p/b", b"b").await;
    del(&*s, "p/b").await;
    let rc = committed(run(&*s, Txn::new().put("p/c", "c").put("p/a", "a2")).await);
    let before = s.range("").await.expect("range");
    let mut events = Vec::new();
    {
        let mut w = s.watch("p/", r0).await.expect("watch");
        while events.len() < 5 {
            events.push(super::next(&mut w).await);
        }
    }
    drop(s);
    let Some(inst) = b.reopen(inst).await else {
        return;
    };
    let s = &*inst.store;
    assert_eq!(rev(s).await, rc);
    assert_eq!(s.range("").await.expect("range"), before);
    assert_eq!(
        s.get("p/a").await.expect("get"),
        Some(kv("p/a", b"a2", ra, rc))
    );
    let mut w = s.watch("p/", r0).await.expect("watch");
    for ev in &events {
        assert_eq!(&super::next(&mut w).await, ev);
    }
    let rd = put(s, "p/d", b"d").await;
    assert_eq!(rd, rc + 1);
    assert_eq!(super::next(&mut w).await.revision, rd);
}
