//! Preparing a redb file when it is opened, in one write transaction (a crash leaves the file as it
//! was or fully prepared): checking the schema, creating the tables, converting the legacy layout
//! (every row of the tables `vms`, `images`, `accounts`, `tokens` becomes `legacy/{table}/{key}`
//! at one new revision, and the legacy tables are deleted), and trimming history to the limit.

use super::layout::{
    db, encode_events, meta_get, trim_history, DATA, HISTORY, META, META_FLOOR, META_REVISION,
    META_SCHEMA, SCHEMA,
};
use crate::kv::apply::{apply_ops, OpRef};
use crate::kv::error::StoreError;
use crate::kv::types::Revision;
use crate::legacy;
use redb::{Database, ReadableTable, TableHandle};
use std::collections::HashSet;

/// The state of a prepared file.
pub(super) struct Prepared {
    pub revision: Revision,
    pub floor: Revision,
}

pub(super) fn prepare(db_: &Database, history_limit: u64) -> Result<Prepared, StoreError> {
    let wtx = db_.begin_write().map_err(db("begin write"))?;
    let tables: HashSet<String> = wtx
        .list_tables()
        .map_err(db("list tables"))?
        .map(|h| h.name().to_string())
        .collect();
    let legacy_tables: Vec<_> = legacy::ALL
        .into_iter()
        .filter(|t| tables.contains(t.name()))
        .collect();
    let mut changed = !tables.contains(META.name())
        || !tables.contains(DATA.name())
        || !tables.contains(HISTORY.name())
        || !legacy_tables.is_empty();

    let mut rows = Vec::new();
    for t in &legacy_tables {
        let table = wtx.open_table(t.def()).map_err(db("open legacy table"))?;
        for item in table.iter().map_err(db("read legacy table"))? {
            let (k, v) = item.map_err(db("read legacy table"))?;
            rows.push((
                format!("legacy/{}/{}", t.name(), k.value()),
                v.value().to_vec(),
            ));
        }
    }

    let prepared = {
        let mut meta = wtx.open_table(META).map_err(db("open meta"))?;
        let mut data = wtx.open_table(DATA).map_err(db("open data"))?;
        let mut history = wtx.open_table(HISTORY).map_err(db("open history"))?;
        match meta_get(&meta, META_SCHEMA)? {
            0 => {
                meta.insert(META_SCHEMA, SCHEMA).map_err(db("write"))?;
                changed = true;
            }
            found if found > SCHEMA => {
                return Err(StoreError::Schema {
                    found,
                    supported: SCHEMA,
                })
            }
            _ => {}
        }
        let mut revision = meta_get(&meta, META_REVISION)?;
        let mut floor = meta_get(&meta, META_FLOOR)?;
        if !rows.is_empty() {
            revision += 1;
            let ops = rows.iter().map(|(k, v)| OpRef::Put(k, v));
            let events = apply_ops(&mut data, revision, ops)?;
            history
                .insert(revision, encode_events(&events).as_slice())
                .map_err(db("write"))?;
            meta.insert(META_REVISION, revision).map_err(db("write"))?;
        }
        let cutoff = revision.saturating_sub(history_limit);
        if cutoff > floor {
            floor = trim_history(&mut history, &mut meta, floor, cutoff)?;
            changed = true;
        }
        Prepared { revision, floor }
    };
    for t in &legacy_tables {
        wtx.delete_table(t.def())
            .map_err(db("delete legacy table"))?;
    }
    if changed {
        wtx.commit().map_err(db("commit"))?;
    } else {
        wtx.abort().map_err(db("abort"))?;
    }
    Ok(prepared)
}
