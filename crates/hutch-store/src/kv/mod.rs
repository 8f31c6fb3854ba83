//! The revisioned key-value API: the [`Store`] trait, its types and errors, the typed helpers of
//! [`StoreExt`], and the local backends ([`RedbStore`], [`MemoryStore`]). See the crate docs for
//! the model.

mod apply;
mod error;
mod ext;
mod memory;
mod options;
mod redb_store;
mod store;
mod types;
mod watch;

pub use error::{Cause, Message, StoreError};
pub use ext::{StoreExt, Versioned, UPDATE_ATTEMPTS};
pub use memory::MemoryStore;
pub use options::StoreOptions;
pub use redb_store::RedbStore;
pub use store::{Store, WatchStream, Watcher};
pub use types::{
    Compare, EventKind, KeyValue, Op, Revision, Snapshot, Txn, TxnOutcome, WatchEvent, MAX_TXN_OPS,
};
