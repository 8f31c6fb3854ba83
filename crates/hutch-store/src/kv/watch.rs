//! Watch delivery for the local backends: the [`Hub`] that fans committed events out to live
//! watchers through a bounded broadcast ring, and [`LocalWatcher`], which replays history, follows
//! the ring, and falls back to history when it lags so that a slow watcher never blocks a writer
//! nor holds more than the ring's and one history page's worth of events.

use super::error::StoreError;
use super::store::WatchStream;
use super::types::{Revision, WatchEvent};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::broadcast;

/// At most this many revisions are read from history per catch-up step.
pub(crate) const HISTORY_PAGE: u64 = 256;

/// The events of one or more consecutive revisions, in order.
pub(crate) type Batch = Arc<Vec<WatchEvent>>;

/// Fans committed events out to live watchers and knows the last published revision.
pub(crate) struct Hub {
    tx: broadcast::Sender<Batch>,
    published: AtomicU64,
}

impl Hub {
    pub(crate) fn new(capacity: usize, revision: Revision) -> Hub {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Hub {
            tx,
            published: AtomicU64::new(revision),
        }
    }

    /// The last revision published (the store's committed revision).
    pub(crate) fn revision(&self) -> Revision {
        self.published.load(Ordering::SeqCst)
    }

    /// Publishes the committed events up to `revision` (call in revision order, after the
    /// commit is visible to readers). Never blocks: a watcher that has not taken the oldest
    /// batch out of the ring when it is overwritten is told it lagged.
    pub(crate) fn publish(&self, events: Batch, revision: Revision) {
        // The revision first, then the events: a watcher that subscribes and then sees
        // `published >= r` knows the events of `r` are in history or on their way to it.
        self.published.store(revision, Ordering::SeqCst);
        if !events.is_empty() {
            // An error only means no watcher is listening.
            let _ = self.tx.send(events);
        }
    }

    /// A receiver of every batch published from now on, and the revision published before it.
    fn subscribe(&self) -> (broadcast::Receiver<Batch>, Revision) {
        let rx = self.tx.subscribe();
        (rx, self.revision())
    }
}

/// Events of a range of revisions, read from a backend's history.
pub(crate) struct HistoryPage {
    /// The events of revisions `(after, through]`, in order.
    pub events: Vec<WatchEvent>,
    pub through: Revision,
    /// Whether revisions after `through` were committed when the page was read.
    pub more: bool,
}

/// A page of history being read.
pub(crate) type HistoryFuture =
    Pin<Box<dyn Future<Output = Result<HistoryPage, StoreError>> + Send>>;

/// A local backend as its watchers see it.
pub(crate) trait HistorySource: Send + Sync + 'static {
    fn hub(&self) -> &Hub;

    /// The events of revisions above `after`, at most `max` revisions of them;
    /// [`StoreError::Compacted`] when revision `after + 1` is no longer kept. Takes the `Arc` so
    /// that a read on another thread keeps the backend alive.
    fn history(self: Arc<Self>, after: Revision, max: u64) -> HistoryFuture;
}

/// A watcher of a local backend. Holds the backend weakly, so that dropping the store closes it.
pub(crate) struct LocalWatcher {
    source: Weak<dyn HistorySource>,
    prefix: String,
    /// Every revision up to this one was delivered (or did not match).
    last: Revision,
    pending: VecDeque<WatchEvent>,
    rx: Option<broadcast::Receiver<Batch>>,
    /// Revisions after `last` may be missing from `rx`: read history first.
    behind: bool,
}

impl LocalWatcher {
    pub(crate) fn new(source: Weak<dyn HistorySource>, prefix: &str, after: Revision) -> Self {
        LocalWatcher {
            source,
            prefix: prefix.to_string(),
            last: after,
            pending: VecDeque::new(),
            rx: None,
            behind: true,
        }
    }

    fn take(&mut self, events: &[WatchEvent]) {
        for ev in events {
            if ev.revision > self.last && ev.key.starts_with(&self.prefix) {
                self.pending.push_back(ev.clone());
            }
        }
    }

    /// Subscribes when not yet subscribed, then reads one page of history when needed.
    async fn catch_up(&mut self) -> Result<(), StoreError> {
        let source = self.source.upgrade().ok_or(StoreError::Closed)?;
        if self.rx.is_none() {
            let (rx, published) = source.hub().subscribe();
            self.rx = Some(rx);
            if self.last >= published {
                // Everything after `last` is published after the subscription: `rx` has it.
                self.behind = false;
                return Ok(());
            }
        }
        let page = source.history(self.last, HISTORY_PAGE).await?;
        self.take(&page.events);
        self.last = self.last.max(page.through);
        self.behind = page.more;
        Ok(())
    }
}

#[async_trait::async_trait]
impl WatchStream for LocalWatcher {
    async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            if self.behind || self.rx.is_none() {
                self.catch_up().await?;
                continue;
            }
            let Some(rx) = self.rx.as_mut() else {
                continue;
            };
            match rx.recv().await {
                Ok(batch) => {
                    self.take(&batch);
                    if let Some(ev) = batch.last() {
                        self.last = self.last.max(ev.revision);
                    }
                }
                // The ring overwrote batches this watcher had not taken: read them from
                // history, then go on with the ring (what it still holds is deduplicated by
                // revision).
                Err(broadcast::error::RecvError::Lagged(_)) => self.behind = true,
                Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Closed),
            }
        }
    }
}
