//! The conformance suite every [`Store`] backend must pass (redb and memory here, etcd later):
//! one async function per property, each taking a [`Backend`] that makes fresh stores. A failure
//! panics, like an assertion in a test.
//!
//! Run it from a backend's tests with [`conformance_tests!`](crate::conformance_tests) (one
//! `#[tokio::test]` per case; the calling crate needs tokio with `macros` and `rt-multi-thread`),
//! or all at once with [`run_all`].
//!
//! The cases assume that nothing else writes to a store while a case runs (revisions are
//! checked exactly relative to the one a case starts from), not that revisions start at 0.

mod kv_cases;
mod watch_cases;

pub use kv_cases::*;
pub use watch_cases::*;

use crate::kv::{Store, StoreError, Txn, TxnOutcome, WatchEvent, Watcher};
use std::sync::Arc;
use std::time::Duration;

/// A store made for one case.
pub struct Instance {
    pub store: Arc<dyn Store>,
    /// What [`Backend::reopen`] needs to find the same data again (a file path, a key prefix).
    pub locator: String,
}

/// Makes stores for the suite.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// A new, empty store whose watch history keeps the latest `history` revisions (a watch from
    /// further back is `Compacted`; at most twice as many may be kept). A small live-watch buffer
    /// (a few batches) makes the lag cases meaningful.
    async fn fresh(&self, history: u64) -> Instance;

    /// Closes `instance` (its handle is the last one) and opens its data again; None for a
    /// backend that does not persist (the persistence case then passes trivially).
    async fn reopen(&self, instance: Instance) -> Option<Instance>;
}

/// How long a case waits for an event that must come.
pub const WAIT: Duration = Duration::from_secs(20);

/// Runs every case in turn.
pub async fn run_all(b: &dyn Backend) {
    put_get_delete(b).await;
    revisions_of_multi_key_txns(b).await;
    txn_that_changes_nothing_takes_no_revision(b).await;
    compare_absent_exists_mod_revision(b).await;
    failed_compare_writes_nothing(b).await;
    invalid_txns_are_refused(b).await;
    concurrent_creates_exactly_one_wins(b).await;
    concurrent_txns_get_distinct_revisions(b).await;
    range_by_prefix(b).await;
    range_is_consistent_with_its_revision(b).await;
    json_helpers(b).await;
    update_json_under_contention(b).await;
    persistence_across_reopen(b).await;
    watch_replays_then_streams_live(b).await;
    watch_filters_by_prefix(b).await;
    watch_from_a_future_revision(b).await;
    watch_compacted_when_too_old(b).await;
    list_then_watch_misses_nothing(b).await;
    watcher_lag_does_not_block_writers(b).await;
    watcher_lagging_past_history_is_compacted_never_gapped(b).await;
}

/// One `#[tokio::test]` per conformance case, for the backend `$backend` evaluates to (anew in
/// each test).
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr) => {
        $crate::conformance_tests!(@each $backend;
            put_get_delete,
            revisions_of_multi_key_txns,
            txn_that_changes_nothing_takes_no_revision,
            compare_absent_exists_mod_revision,
            failed_compare_writes_nothing,
            invalid_txns_are_refused,
            concurrent_creates_exactly_one_wins,
            concurrent_txns_get_distinct_revisions,
            range_by_prefix,
            range_is_consistent_with_its_revision,
            json_helpers,
            update_json_under_contention,
            persistence_across_reopen,
            watch_replays_then_streams_live,
            watch_filters_by_prefix,
            watch_from_a_future_revision,
            watch_compacted_when_too_old,
            list_then_watch_misses_nothing,
            watcher_lag_does_not_block_writers,
            watcher_lagging_past_history_is_compacted_never_gapped,
        );
    };
    (@each $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $backend;
                $crate::conformance::$case(&backend).await;
            }
        )*
    };
}

/// The revision of a transaction that must commit.
pub(crate) fn committed(outcome: TxnOutcome) -> u64 {
    match outcome {
        TxnOutcome::Committed { revision } => revision,
        TxnOutcome::Failed { key } => panic!("transaction failed on {key:?}"),
    }
}

pub(crate) async fn run(s: &dyn Store, txn: Txn) -> TxnOutcome {
    s.txn(txn).await.expect("txn")
}

pub(crate) async fn put(s: &dyn Store, key: &str, value: &[u8]) -> u64 {
    committed(run(s, Txn::new().put(key, value)).await)
}

pub(crate) async fn del(s: &dyn Store, key: &str) -> u64 {
    committed(run(s, Txn::new().delete(key)).await)
}

pub(crate) async fn rev(s: &dyn Store) -> u64 {
    s.revision().await.expect("revision")
}

/// The next event, which must come within [`WAIT`].
pub(crate) async fn next(w: &mut Watcher) -> WatchEvent {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(r) => r.expect("watch event"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

/// The next event or error, which must come within [`WAIT`].
pub(crate) async fn next_result(w: &mut Watcher) -> Result<WatchEvent, StoreError> {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(r) => r,
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

/// Asserts that no event comes for a while.
pub(crate) async fn quiet(w: &mut Watcher) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("unexpected watch result {r:?}");
    }
}
