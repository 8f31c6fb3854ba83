//! The redb file layout of the revisioned store: its tables, how a record and a revision's
//! events are encoded, and the [`KvTable`] view of the data table that transactions apply to.
//!
//! - `kv` (`&str` -> bytes): a key's `create_revision` (u64 LE), `mod_revision` (u64 LE), value.
//! - `kv_meta` (`&str` -> u64): `schema`, `revision` (the last committed), `floor` (history is
//!   kept for revisions above it).
//! - `kv_history` (u64 -> bytes): a revision's events: a u32 count, then per event a kind byte
//!   (0 put, 1 delete), the key (u32 length, bytes) and for a put the value (u32 length, bytes).

use crate::kv::apply::KvTable;
use crate::kv::error::StoreError;
use crate::kv::types::{EventKind, KeyValue, Revision, WatchEvent};
use redb::{ReadableTable, TableDefinition};

pub(super) const DATA: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("kv_meta");
pub(super) const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("kv_history");

/// The layout version this build writes and reads.
pub(super) const SCHEMA: u64 = 1;
pub(super) const META_SCHEMA: &str = "schema";
pub(super) const META_REVISION: &str = "revision";
pub(super) const META_FLOOR: &str = "floor";

/// A redb failure as a [`StoreError`].
pub(super) fn db<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::db(context, e.into())
}

fn malformed(what: String) -> StoreError {
    StoreError::db_msg("malformed state store file", what)
}

pub(super) fn encode_record(value: &[u8], create: Revision, modr: Revision) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create.to_le_bytes());
    out.extend_from_slice(&modr.to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// `(create_revision, mod_revision, value)` of a stored record.
pub(super) fn decode_record<'a>(
    key: &str,
    bytes: &'a [u8],
) -> Result<(Revision, Revision, &'a [u8]), StoreError> {
    let bad = || malformed(format!("record {key:?} is shorter than its header"));
    let create = bytes.get(0..8).ok_or_else(bad)?;
    let modr = bytes.get(8..16).ok_or_else(bad)?;
    Ok((le_u64(create), le_u64(modr), &bytes[16..]))
}

pub(super) fn record_kv(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let (create_revision, mod_revision, value) = decode_record(key, bytes)?;
    Ok(KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        create_revision,
        mod_revision,
    })
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Keys and values are far below 4 GiB (redb's own limit is lower).
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// The events of one revision (all share it).
pub(super) fn encode_events(events: &[WatchEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for ev in events {
        match (&ev.kind, &ev.value) {
            (EventKind::Put, Some(v)) => {
                out.push(0);
                push_bytes(&mut out, ev.key.as_bytes());
                push_bytes(&mut out, v);
            }
            _ => {
                out.push(1);
                push_bytes(&mut out, ev.key.as_bytes());
            }
        }
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    revision: Revision,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.bytes.len() < n {
            return Err(malformed(format!(
                "history of revision {} is truncated",
                self.revision
            )));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<usize, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()?;
        self.take(n)
    }
}

pub(super) fn decode_events(
    revision: Revision,
    bytes: &[u8],
) -> Result<Vec<WatchEvent>, StoreError> {
    let mut r = Reader { bytes, revision };
    let count = r.u32()?;
    // Each event takes at least 5 bytes: a corrupt count cannot make us allocate much.
    let mut events = Vec::with_capacity(count.min(bytes.len() / 5));
    for _ in 0..count {
        let kind = r.take(1)?[0];
        let key = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| {
            malformed(format!(
                "history of revision {revision} has a non-UTF-8 key"
            ))
        })?;
        let (kind, value) = match kind {
            0 => (EventKind::Put, Some(r.bytes()?.to_vec())),
            1 => (EventKind::Delete, None),
            k => {
                return Err(malformed(format!(
                    "history of revision {revision} has event kind {k}"
                )))
            }
        };
        events.push(WatchEvent {
            kind,
            key,
            value,
            revision,
        });
    }
    Ok(events)
}

impl KvTable for redb::Table<'_, &'static str, &'static [u8]> {
    fn revisions(&mut self, key: &str) -> Result<Option<(Revision, Revision)>, StoreError> {
        match self.get(key).map_err(db("read"))? {
            Some(g) => {
                let (create, modr, _) = decode_record(key, g.value())?;
                Ok(Some((create, modr)))
            }
            None => Ok(None),
        }
    }

    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        create: Revision,
        modr: Revision,
    ) -> Result<(), StoreError> {
        let record = encode_record(value, create, modr);
        self.insert(key, record.as_slice()).map_err(db("write"))?;
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool, StoreError> {
        Ok(redb::Table::remove(self, key)
            .map_err(db("write"))?
            .is_some())
    }
}

/// Reads a meta value (0 when unset).
pub(super) fn meta_get(
    meta: &impl ReadableTable<&'static str, u64>,
    name: &str,
) -> Result<u64, StoreError> {
    Ok(meta
        .get(name)
        .map_err(db("read"))?
        .map(|g| g.value())
        .unwrap_or(0))
}

/// Drops history at and below `cutoff` when above `floor`; the new floor.
pub(super) fn trim_history(
    history: &mut redb::Table<'_, u64, &'static [u8]>,
    meta: &mut redb::Table<'_, &'static str, u64>,
    floor: Revision,
    cutoff: Revision,
) -> Result<Revision, StoreError> {
    if cutoff <= floor {
        return Ok(floor);
    }
    history
        .retain_in(..=cutoff, |_, _| false)
        .map_err(db("trim history"))?;
    meta.insert(META_FLOOR, cutoff).map_err(db("write"))?;
    Ok(cutoff)
}
