//! hutch's state store.
//!
//! [`kv`] is the store hutchd is moving to: a revisioned key-value [`kv::Store`] trait (async,
//! object safe) shaped after etcd so that a replicated etcd backend can follow, with an embedded
//! redb backend ([`kv::RedbStore`], single node, the default) and an in-memory one
//! ([`kv::MemoryStore`]). [`conformance`] is the test suite every backend must pass. The legacy
//! sync API ([`Store`], [`StoreError`] and the tables [`VMS`], [`IMAGES`], [`ACCOUNTS`],
//! [`TOKENS`]) stays at the crate root until hutchd has moved over.
//!
//! # The model
//!
//! - **Keys** are plain strings, grouped by prefix (`vms/`, `names/vm/`); values are bytes (JSON
//!   through [`kv::StoreExt`]).
//! - **Revisions**: one store-wide counter, 0 before the first write. Every transaction that
//!   changes something takes the next revision, shared by all its writes; a key carries the
//!   revision that created it (`create_revision`) and the one that last wrote it
//!   (`mod_revision`). A transaction that changes nothing takes no revision.
//! - **Transactions** ([`kv::Txn`]): compares ([`kv::Compare`]: `Absent`, `Exists`,
//!   `ModRevision(key, rev)`, checked against the state before the transaction), then puts and
//!   deletes on distinct keys, all applied atomically and durably, or none of them when a
//!   compare fails ([`kv::TxnOutcome::Failed`] names the first). Compare-and-swap is
//!   `when(ModRevision(key, read.mod_revision)).put(key, new)`; a create that must be unique is
//!   `when(Absent(key)).put(key, v)`: of concurrent ones exactly one commits.
//! - **Reads**: `get` one key, `range` every key under a prefix as one [`kv::Snapshot`] (the keys
//!   and the revision it was taken at).
//! - **Watch**: `watch(prefix, after)` yields every change under the prefix with a revision above
//!   `after`, in order, history first, then live. Each committed revision's events are kept in a
//!   bounded history (the latest [`kv::StoreOptions::history_revisions`], 50,000 by default,
//!   trimmed as writes go). Watching from before it, or falling behind past it, gives
//!   [`kv::StoreError::Compacted`]. A slow watcher never slows writers: it reads what it missed
//!   from the history.
//!
//! The pattern that never misses a change: list, then watch from the list's revision; on
//! `Compacted`, do it again.
//!
//! ```no_run
//! # use hutch_store::kv::{Store, StoreError};
//! # async fn follow(store: &dyn Store) -> Result<(), StoreError> {
//! loop {
//!     let snapshot = store.range("vms/").await?; // the state at snapshot.revision
//!     let mut watcher = store.watch("vms/", snapshot.revision).await?;
//!     loop {
//!         match watcher.next().await {
//!             Ok(event) => { /* apply event to the state */ }
//!             Err(StoreError::Compacted { .. }) => break, // too far behind: re-list
//!             Err(e) => return Err(e),
//!         }
//!     }
//! }
//! # }
//! ```
//!
//! # Mapping onto etcd
//!
//! revision = etcd's revision (the header revision; `create_revision`, `mod_revision` the same
//! fields); [`kv::Txn`] = an etcd `Txn` whose success branch holds the puts and deletes (no
//! failure branch); `Absent(k)` = `Compare(Version(k) == 0)`, `Exists(k)` =
//! `Compare(Version(k) > 0)`, `ModRevision(k, r)` = `Compare(ModRevision(k) == r)`; `Failed`
//! names the first compare that does not hold (etcd only says the txn failed: the etcd backend
//! re-reads the compared keys); `range(prefix)` = a range get with the prefix end;
//! `watch(prefix, after)` = a prefix watch with `start_revision = after + 1`, and
//! `Compacted { oldest }` = the watch cancelled with `compact_revision = oldest`. History
//! trimming = etcd's compaction. [`kv::MAX_TXN_OPS`] is etcd's default `--max-txn-ops`; a key is
//! written at most once per transaction, as etcd requires.

pub mod conformance;
pub mod kv;
mod legacy;
mod offload;

pub use legacy::{Store, StoreError, Table, ACCOUNTS, IMAGES, INVITES, TOKENS, VMS};
