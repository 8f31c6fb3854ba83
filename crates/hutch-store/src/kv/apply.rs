//! The transaction semantics shared by the local backends: how compares are checked and
//! operations applied to a key table, and which revision and events result. Memory and redb
//! both run their transactions through [`apply`], so they cannot disagree.

use super::error::StoreError;
use super::types::{EventKind, Op, Revision, Txn, TxnOutcome, WatchEvent};

/// A key table a transaction is applied to (a `BTreeMap`, a redb table in a write transaction).
pub(crate) trait KvTable {
    /// The key's `(create_revision, mod_revision)`, None when absent.
    fn revisions(&mut self, key: &str) -> Result<Option<(Revision, Revision)>, StoreError>;
    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        create_revision: Revision,
        mod_revision: Revision,
    ) -> Result<(), StoreError>;
    /// Removes the key; whether it existed.
    fn remove(&mut self, key: &str) -> Result<bool, StoreError>;
}

/// A transaction applied (or not) to a table whose revision was `current`.
pub(crate) struct Applied {
    pub outcome: TxnOutcome,
    /// The changes, all at `current + 1`; empty when nothing changed (the revision stays).
    pub events: Vec<WatchEvent>,
}

/// Checks `txn`'s compares against `table` and, when all hold, applies its operations at revision
/// `current + 1`. An error leaves the table partly written: the caller discards the whole write
/// (the redb write transaction is aborted; the memory table never fails).
pub(crate) fn apply(
    table: &mut impl KvTable,
    current: Revision,
    txn: &Txn,
) -> Result<Applied, StoreError> {
    for compare in &txn.compares {
        let mod_revision = table.revisions(compare.key())?.map(|(_, m)| m);
        if !compare.holds(mod_revision) {
            return Ok(Applied {
                outcome: TxnOutcome::Failed {
                    key: compare.key().to_string(),
                },
                events: Vec::new(),
            });
        }
    }
    let events = apply_ops(table, current + 1, txn.ops.iter().map(Op::as_ref))?;
    let revision = if events.is_empty() {
        current
    } else {
        current + 1
    };
    Ok(Applied {
        outcome: TxnOutcome::Committed { revision },
        events,
    })
}

/// A borrowed operation.
pub(crate) enum OpRef<'a> {
    Put(&'a str, &'a [u8]),
    Delete(&'a str),
}

impl Op {
    pub(crate) fn as_ref(&self) -> OpRef<'_> {
        match self {
            Op::Put { key, value } => OpRef::Put(key, value),
            Op::Delete { key } => OpRef::Delete(key),
        }
    }
}

/// Applies operations (on distinct keys) at `revision`; the events of what changed.
pub(crate) fn apply_ops<'a>(
    table: &mut impl KvTable,
    revision: Revision,
    ops: impl Iterator<Item = OpRef<'a>>,
) -> Result<Vec<WatchEvent>, StoreError> {
    let mut events = Vec::new();
    for op in ops {
        match op {
            OpRef::Put(key, value) => {
                let create = match table.revisions(key)? {
                    Some((create, _)) => create,
                    None => revision,
                };
                table.put(key, value, create, revision)?;
                events.push(WatchEvent {
                    kind: EventKind::Put,
                    key: key.to_string(),
                    value: Some(value.to_vec()),
                    revision,
                });
            }
            OpRef::Delete(key) => {
                if table.remove(key)? {
                    events.push(WatchEvent {
                        kind: EventKind::Delete,
                        key: key.to_string(),
                        value: None,
                        revision,
                    });
                }
            }
        }
    }
    Ok(events)
}
