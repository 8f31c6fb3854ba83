//! The group-commit writer: one thread takes every queued transaction (up to `max_batch`), applies
//! them in order in one redb write transaction (each sees the earlier ones, each committed one gets
//! its own revision), commits with one fsync, publishes the events, then answers each caller.

use super::layout::{db, encode_events, trim_history, DATA, HISTORY, META, META_REVISION};
use super::Shared;
use crate::kv::apply::apply;
use crate::kv::error::StoreError;
use crate::kv::types::{Txn, TxnOutcome, WatchEvent};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// A transaction waiting for the writer.
pub(super) struct Request {
    pub txn: Txn,
    pub reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
}

/// Runs until every sender of `rx` is gone (the store is dropped).
pub(super) fn run(shared: Arc<Shared>, rx: mpsc::Receiver<Request>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        match commit(&shared, &batch) {
            Ok(outcomes) => {
                for (req, outcome) in batch.drain(..).zip(outcomes) {
                    // A caller that stopped waiting does not care.
                    let _ = req.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for req in batch.drain(..) {
                    let _ = req.reply.send(Err(e.share()));
                }
            }
        }
    }
}

/// Applies and commits one batch; the outcome of each transaction, in order.
fn commit(shared: &Shared, batch: &[Request]) -> Result<Vec<TxnOutcome>, StoreError> {
    let start = shared.hub.revision();
    let mut revision = start;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut events: Vec<WatchEvent> = Vec::new();
    let wtx = shared.db.begin_write().map_err(db("begin write"))?;
    let mut floor = shared.floor.load(Ordering::SeqCst);
    {
        let mut data = wtx.open_table(DATA).map_err(db("open data"))?;
        let mut history = wtx.open_table(HISTORY).map_err(db("open history"))?;
        let mut meta = wtx.open_table(META).map_err(db("open meta"))?;
        for req in batch {
            let applied = apply(&mut data, revision, &req.txn)?;
            if !applied.events.is_empty() {
                revision += 1;
                history
                    .insert(revision, encode_events(&applied.events).as_slice())
                    .map_err(db("write history"))?;
                events.extend(applied.events);
            }
            outcomes.push(applied.outcome);
        }
        if revision > start {
            meta.insert(META_REVISION, revision).map_err(db("write"))?;
            let cutoff = revision.saturating_sub(shared.history_limit);
            floor = trim_history(&mut history, &mut meta, floor, cutoff)?;
        }
    }
    if revision == start {
        // Only failed compares and no-op transactions: nothing to make durable.
        wtx.abort().map_err(db("abort"))?;
        return Ok(outcomes);
    }
    wtx.commit().map_err(db("commit"))?;
    shared.floor.store(floor, Ordering::SeqCst);
    shared.hub.publish(Arc::new(events), revision);
    Ok(outcomes)
}
