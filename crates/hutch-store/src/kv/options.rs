//! [`StoreOptions`]: the limits of a local backend (history kept for watches, watch ring size,
//! group-commit batch size).

/// Limits of a local backend.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How many of the latest revisions the watch history keeps; older ones are trimmed as
    /// writes go, and a watch from before them gets `Compacted`. At least 1.
    pub history_revisions: u64,
    /// How many committed batches the live-watch ring holds; a watcher further behind catches
    /// up from history. At least 1.
    pub watch_buffer: usize,
    /// At most this many transactions share one group commit (redb). At least 1.
    pub max_batch: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history_revisions: 50_000,
            watch_buffer: 1024,
            max_batch: 1024,
        }
    }
}

impl StoreOptions {
    pub(crate) fn history(&self) -> u64 {
        self.history_revisions.max(1)
    }
}
