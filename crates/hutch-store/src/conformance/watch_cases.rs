//! Conformance cases of watches: replay then live, prefix filtering, compaction, the list-then-
//! watch pattern, and watchers that fall behind.

use super::{committed, del, next, next_result, put, quiet, rev, run, Backend, WAIT};
use crate::kv::{EventKind, Store, StoreError, Txn, WatchEvent};
use std::collections::BTreeSet;

fn ev(kind: EventKind, key: &str, value: Option<&[u8]>, revision: u64) -> WatchEvent {
    WatchEvent {
        kind,
        key: key.into(),
        value: value.map(<[u8]>::to_vec),
        revision,
    }
}

/// A watch from a past revision replays what came after it, then streams live changes; the
/// events of one transaction share its revision, in the order of its operations.
pub async fn watch_replays_then_streams_live(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let r0 = rev(s).await;
    let r1 = put(s, "w/a", b"1").await;
    let r2 = put(s, "w/b", b"2").await;
    let r3 = del(s, "w/a").await;
    let mut w = s.watch("w/", r0).await.expect("watch");
    assert_eq!(
        next(&mut w).await,
        ev(EventKind::Put, "w/a", Some(b"1"), r1)
    );
    assert_eq!(
        next(&mut w).await,
        ev(EventKind::Put, "w/b", Some(b"2"), r2)
    );
    assert_eq!(next(&mut w).await, ev(EventKind::Delete, "w/a", None, r3));
    quiet(&mut w).await;
    let r4 = committed(run(s, Txn::new().put("w/y", "y").put("w/x", "x").delete("w/b")).await);
    assert_eq!(
        next(&mut w).await,
        ev(EventKind::Put, "w/y", Some(b"y"), r4)
    );
    assert_eq!(
        next(&mut w).await,
        ev(EventKind::Put, "w/x", Some(b"x"), r4)
    );
    assert_eq!(next(&mut w).await, ev(EventKind::Delete, "w/b", None, r4));

    // From a later revision: only what came after it.
    let mut w2 = s.watch("w/", r2).await.expect("watch");
    assert_eq!(next(&mut w2).await.revision, r3);
    // From the current revision: only live changes.
    let mut w3 = s.watch("w/", r4).await.expect("watch");
    quiet(&mut w3).await;
    let r5 = put(s, "w/z", b"z").await;
    assert_eq!(
        next(&mut w3).await,
        ev(EventKind::Put, "w/z", Some(b"z"), r5)
    );
    assert_eq!(next(&mut w).await.revision, r5);
}

/// A watcher sees only keys under its prefix; "" sees everything.
pub async fn watch_filters_by_prefix(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let r0 = rev(s).await;
    let mut f = s.watch("f/", r0).await.expect("watch");
    let mut all = s.watch("", r0).await.expect("watch");
    let keys = ["f/1", "g/1", "f", "ff/1", "f/2"];
    for k in keys {
        put(s, k, b"v").await;
    }
    let mixed = committed(run(s, Txn::new().put("g/2", "v").put("f/3", "v")).await);
    assert_eq!(next(&mut f).await.key, "f/1");
    assert_eq!(next(&mut f).await.key, "f/2");
    let e = next(&mut f).await;
    assert_eq!((e.key.as_str(), e.revision), ("f/3", mixed));
    quiet(&mut f).await;
    for k in keys.iter().chain(&["g/2", "f/3"]) {
        assert_eq!(next(&mut all).await.key, *k);
    }
}

/// A watch may start after the current revision: it sees only later revisions.
pub async fn watch_from_a_future_revision(b: &dyn Backend) {
    let s = b.fresh(1000).await.store;
    let s = &*s;
    let r0 = rev(s).await;
    let mut w = s.watch("", r0 + 3).await.expect("watch");
    for i in 0..4 {
        put(s, &format!("fut/{i}"), b"v").await;
    }
    let e = next(&mut w).await;
    assert_eq!((e.key.as_str(), e.revision), ("fut/3", r0 + 4));
}

/// The first result of a watch: its creation's error, or its first event's.
async fn first(s: &dyn Store, prefix: &str, after: u64) -> Result<WatchEvent, StoreError> {
    let mut w = s.watch(prefix, after).await?;
    next_result(&mut w).await
}

/// A watch from before the kept history is `Compacted`, naming the oldest revision kept; from
/// just before that revision it replays.
pub async fn watch_compacted_when_too_old(b: &dyn Backend) {
    let history = 8;
    let s = b.fresh(history).await.store;
    let s = &*s;
    let r0 = rev(s).await;
    for i in 0..40 {
        put(s, &format!("c/{i}"), b"v").await;
    }
    let current = r0 + 40;
    assert_eq!(rev(s).await, current);
    let oldest = match first(s, "c/", r0).await {
        Err(StoreError::Compacted { oldest }) => oldest,
        other => panic!("watch from {r0} of {current} with history {history}: {other:?}"),
    };
    assert!(
        oldest > r0 + 1 && oldest <= current - history + 1,
        "oldest kept revision {oldest}, current {current}, history {history}"
    );
    assert!(matches!(
        first(s, "c/", oldest - 2).await,
        Err(StoreError::Compacted { .. })
    ));
    assert_eq!(
        first(s, "c/", oldest - 1).await.expect("watch").revision,
        oldest
    );
    assert_eq!(
        first(s, "c/", current - 1).await.expect("watch").revision,
        current
    );
}

/// List, then watch from the list's revision: together they give every key exactly once while
/// writers go on.
pub async fn list_then_watch_misses_nothing(b: &dyn Backend) {
    let s = b.fresh(10_000).await.store;
    let n = 100;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..n {
                put(&*s, &format!("l/{i:03}"), b"v").await;
            }
        })
    };
    // Let some writes land first.
    while s.range("l/").await.expect("range").kvs.len() < 10 {
        tokio::task::yield_now().await;
    }
    let snap = s.range("l/").await.expect("range");
    let mut seen: BTreeSet<String> = snap.kvs.into_iter().map(|kv| kv.key).collect();
    let mut w = s.watch("l/", snap.revision).await.expect("watch");
    while seen.len() < n {
        let e = next(&mut w).await;
        assert!(e.revision > snap.revision);
        assert!(seen.insert(e.key.clone()), "{} seen twice", e.key);
    }
    writer.await.expect("writer");
    quiet(&mut w).await;
}

/// A watcher that is not polled does not slow writers; polled later, it yields every change in
/// order (catching up from history).
pub async fn watcher_lag_does_not_block_writers(b: &dyn Backend) {
    let s = b.fresh(10_000).await.store;
    let r0 = rev(&*s).await;
    let mut lazy = s.watch("lag/", r0).await.expect("watch");
    let clients = 10;
    let each = 30;
    let writers: Vec<_> = (0..clients)
        .map(|c| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..each {
                    put(&*s, &format!("lag/{c}/{i}"), b"v").await;
                }
            })
        })
        .collect();
    let all = async {
        for w in writers {
            w.await.expect("writer");
        }
    };
    if tokio::time::timeout(WAIT, all).await.is_err() {
        panic!("writers did not finish within {WAIT:?} beside an idle watcher");
    }
    let total = clients * each;
    let mut last = r0;
    let mut keys = BTreeSet::new();
    for _ in 0..total {
        let e = next(&mut lazy).await;
        assert!(e.revision > last, "revision {} after {last}", e.revision);
        last = e.revision;
        keys.insert(e.key);
    }
    assert_eq!(keys.len(), total);
    quiet(&mut lazy).await;
}

/// A watcher that falls behind past the kept history either still gets every change in order
/// or gets `Compacted`, never a gap.
pub async fn watcher_lagging_past_history_is_compacted_never_gapped(b: &dyn Backend) {
    let s = b.fresh(8).await.store;
    let s = &*s;
    let r0 = rev(s).await;
    let mut w = s.watch("", r0).await.expect("watch");
    for i in 0..50 {
        put(s, &format!("g/{i}"), b"v").await;
    }
    let mut expect = r0 + 1;
    while expect <= r0 + 50 {
        match next_result(&mut w).await {
            Ok(e) => {
                assert_eq!(e.revision, expect, "a gap in the events");
                expect += 1;
            }
            Err(StoreError::Compacted { oldest }) => {
                assert!(
                    oldest > expect,
                    "compacted at {oldest} but {expect} was due"
                );
                return;
            }
            Err(e) => panic!("watch: {e}"),
        }
    }
}
