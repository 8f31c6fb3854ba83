//! Watches on etcd that survive lost connections and lost members.
//!
//! A task owns the etcd watch stream and hands events to the [`Watcher`] through a bounded
//! channel (so `next` is cancel safe, and a watcher that is not polled holds back only its own
//! stream: etcd buffers, then catches the watch up from its history). When the stream breaks
//! (a member died, the connection was cut), the task watches again from the revision after the
//! last one it delivered, with backoff, for as long as the watcher lives. Events of one
//! revision arrive in one etcd response and are delivered whole before the resume point
//! moves, so a resume never repeats or skips one. Compaction past the resume point ends the
//! watch with `Compacted`.

use crate::{irev, rev, EtcdStore};
use etcd_client::{EventType, WatchOptions, WatchStream as EtcdStream};
use hutch_store::kv::{EventKind, Revision, StoreError, WatchEvent, WatchStream, Watcher};
use std::time::Duration;
use tokio::sync::mpsc;

/// Events buffered between the task and the watcher.
const BUFFER: usize = 1024;
/// Backoff between resume attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

struct Stream {
    rx: mpsc::Receiver<Result<WatchEvent, StoreError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait::async_trait]
impl WatchStream for Stream {
    async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        match self.rx.recv().await {
            Some(r) => r,
            None => Err(StoreError::Closed),
        }
    }
}

/// What one watch response told.
enum Step {
    /// Events delivered; the next revision to watch from.
    Delivered,
    /// The watch cannot go on (compacted, refused); the error was sent.
    Ended,
    /// The watcher was dropped.
    Gone,
}

/// Opens the watch (so that a refusal shows at once), then follows it in a task.
pub(crate) async fn start(
    store: EtcdStore,
    prefix: &str,
    after: Revision,
) -> Result<Watcher, StoreError> {
    let key = store.key(prefix);
    let stream = open(&store, &key, after + 1).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let task = tokio::spawn(follow(store, key, after + 1, stream, tx));
    Ok(Watcher::new(Stream { rx, task }))
}

async fn open(store: &EtcdStore, key: &[u8], from: Revision) -> Result<EtcdStream, StoreError> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(irev(from));
    store
        .request("etcd watch", |mut c| {
            let (k, opts) = (key.to_vec(), opts.clone());
            async move { c.watch(k, Some(opts)).await }
        })
        .await
}

async fn follow(
    store: EtcdStore,
    key: Vec<u8>,
    mut from: Revision,
    mut stream: EtcdStream,
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tx.closed() => return,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(
                        "etcd watch on {:?} broke: {e}",
                        String::from_utf8_lossy(&key)
                    );
                    break;
                }
            };
            match deliver(&store, &resp, &mut from, &tx).await {
                Step::Delivered => backoff = BACKOFF_MIN,
                Step::Ended | Step::Gone => return,
            }
        }
        // Resume from the revision after the last one delivered.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match open(&store, &key, from).await {
                Ok(s) => {
                    stream = s;
                    break;
                }
                Err(e) => tracing::debug!("etcd watch resume from {from}: {e}"),
            }
        }
    }
}

async fn deliver(
    store: &EtcdStore,
    resp: &etcd_client::WatchResponse,
    from: &mut Revision,
    tx: &mpsc::Sender<Result<WatchEvent, StoreError>>,
) -> Step {
    if resp.compact_revision() > 0 {
        let oldest = rev(resp.compact_revision());
        let _ = tx.send(Err(StoreError::Compacted { oldest })).await;
        return Step::Ended;
    }
    if resp.canceled() {
        let why = resp.cancel_reason().to_string();
        let _ = tx
            .send(Err(StoreError::db_msg("etcd watch cancelled", why)))
            .await;
        return Step::Ended;
    }
    let mut last = None;
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let revision = rev(kv.mod_revision());
        // A resumed watch could repeat what a broken response had half delivered; skip it.
        if revision < *from {
            continue;
        }
        let Some(key) = store.strip(kv.key()) else {
            continue;
        };
        let (kind, value) = match ev.event_type() {
            EventType::Put => (EventKind::Put, Some(kv.value().to_vec())),
            EventType::Delete => (EventKind::Delete, None),
        };
        let event = WatchEvent {
            kind,
            key,
            value,
            revision,
        };
        if tx.send(Ok(event)).await.is_err() {
            return Step::Gone;
        }
        last = Some(revision);
    }
    if let Some(r) = last {
        *from = r + 1;
    }
    Step::Delivered
}
