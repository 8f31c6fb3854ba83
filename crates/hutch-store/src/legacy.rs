//! The legacy sync API (kept until hutchd moves to [`crate::kv::Store`]): JSON records in four
//! named tables, every change one ACID redb transaction.
//!
//! The embedded backend is redb (a single file in the data directory, copy-on-write B-trees,
//! crash-safe commits). Uniqueness (a VM name, an image reference) is enforced inside the write
//! transaction, and redb serialises write transactions, so of two concurrent creates with the same
//! key exactly one wins.
//!
//! [`crate::kv::RedbStore::open`] converts a file in this layout into the revisioned one (every row
//! becomes `legacy/{table}/{key}`); the two are never open on the same file at once.

use crate::offload::offload;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// A table of records keyed by a string.
#[derive(Clone, Copy)]
pub struct Table(&'static str);

pub const VMS: Table = Table("vms");
pub const IMAGES: Table = Table("images");
pub const ACCOUNTS: Table = Table("accounts");
pub const TOKENS: Table = Table("tokens");
pub const INVITES: Table = Table("invites");
/// Every legacy table, in the order the revisioned store migrates them.
pub(crate) const ALL: [Table; 5] = [VMS, IMAGES, ACCOUNTS, TOKENS, INVITES];

impl Table {
    /// The redb table name (also the `legacy/{name}/` key prefix after migration).
    pub(crate) fn name(self) -> &'static str {
        self.0
    }

    pub(crate) fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{table} {key:?} already exists")]
    Exists { table: &'static str, key: String },
    #[error("{table} {key:?} not found")]
    NotFound { table: &'static str, key: String },
    #[error("state store: {0}")]
    Db(Box<redb::Error>),
    #[error("state store record {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store file. Fails if another process holds it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let database = Database::create(path).map_err(db)?;
        let tx = database.begin_write().map_err(db)?;
        for t in ALL {
            tx.open_table(t.def()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(Store { db: database })
    }

    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(table.def()).map_err(db)?;
        let v = t.get(key).map_err(db)?;
        v.map(|v| decode(key, v.value())).transpose()
    }

    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(table.def()).map_err(db)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every record of a table with its key.
    pub fn entries<T: DeserializeOwned>(
        &self,
        table: Table,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(table.def()).map_err(db)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Moves a record to a new key in one transaction; refuses when the new key is taken.
    pub fn rekey(&self, table: Table, old: &str, new: &str) -> Result<(), StoreError> {
        self.write(table, |t| {
            if t.get(new).map_err(db)?.is_some() {
                return Err(StoreError::Exists {
                    table: table.0,
                    key: new.into(),
                });
            }
            let v = t
                .remove(old)
                .map_err(db)?
                .map(|v| v.value().to_vec())
                .ok_or_else(|| StoreError::NotFound {
                    table: table.0,
                    key: old.into(),
                })?;
            t.insert(new, v.as_slice()).map_err(db)?;
            Ok(())
        })
    }

    /// Inserts a record that must not exist yet.
    pub fn insert_new<T: Serialize>(
        &self,
        table: Table,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.write(table, |t| {
            if t.get(key).map_err(db)?.is_some() {
                return Err(StoreError::Exists {
                    table: table.0,
                    key: key.into(),
                });
            }
            t.insert(key, encode(value).as_slice()).map_err(db)?;
            Ok(())
        })
    }

    /// Inserts or replaces a record.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        self.write(table, |t| {
            t.insert(key, encode(value).as_slice()).map_err(db)?;
            Ok(())
        })
    }

    /// Reads, changes and writes back one record in one transaction; returns the new value.
    pub fn update<T: Serialize + DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
        f: impl FnOnce(&mut T),
    ) -> Result<T, StoreError> {
        self.write(table, |t| {
            let mut v: T = match t.get(key).map_err(db)? {
                Some(v) => decode(key, v.value())?,
                None => {
                    return Err(StoreError::NotFound {
                        table: table.0,
                        key: key.into(),
                    })
                }
            };
            f(&mut v);
            t.insert(key, encode(&v).as_slice()).map_err(db)?;
            Ok(v)
        })
    }

    /// Removes a record; returns whether it existed.
    pub fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        self.write(table, |t| Ok(t.remove(key).map_err(db)?.is_some()))
    }

    /// One write transaction. A commit is durable (it waits for the disk), so on hutchd's
    /// multi-threaded runtime it runs as blocking work (`block_in_place`): the worker thread's
    /// other tasks move to another thread meanwhile, instead of waiting behind an fsync.
    fn write<R>(
        &self,
        table: Table,
        f: impl FnOnce(&mut redb::Table<'_, &'static str, &'static [u8]>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        offload(|| self.write_now(table, f))
    }

    fn write_now<R>(
        &self,
        table: Table,
        f: impl FnOnce(&mut redb::Table<'_, &'static str, &'static [u8]>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let r = {
            let mut t = tx.open_table(table.def()).map_err(db)?;
            f(&mut t)
        };
        match r {
            Ok(r) => {
                tx.commit().map_err(db)?;
                Ok(r)
            }
            Err(e) => {
                let _ = tx.abort();
                Err(e)
            }
        }
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Our records are plain data; serialising them cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::sync::Arc;

    #[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn crud_and_persistence() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        {
            let s = Store::open(&p).unwrap();
            s.insert_new(VMS, "a", &Rec { n: 1 }).unwrap();
            assert!(matches!(
                s.insert_new(VMS, "a", &Rec { n: 2 }),
                Err(StoreError::Exists { .. })
            ));
            let v: Rec = s.update(VMS, "a", |r: &mut Rec| r.n += 10).unwrap();
            assert_eq!(v.n, 11);
            assert!(matches!(
                s.update(VMS, "zz", |_: &mut Rec| ()),
                Err(StoreError::NotFound { .. })
            ));
            s.put(IMAGES, "img", &Rec { n: 5 }).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.get::<Rec>(VMS, "a").unwrap(), Some(Rec { n: 11 }));
        assert_eq!(s.list::<Rec>(IMAGES).unwrap(), vec![Rec { n: 5 }]);
        assert!(s.delete(VMS, "a").unwrap());
        assert!(!s.delete(VMS, "a").unwrap());
        assert_eq!(s.get::<Rec>(VMS, "a").unwrap(), None);
    }

    #[test]
    fn second_open_of_the_same_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        let _s = Store::open(&p).unwrap();
        assert!(Store::open(&p).is_err());
    }

    #[test]
    fn writes_from_every_kind_of_thread() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(&d.path().join("s.redb")).unwrap());
        let rec = |n: u32| Rec { n };
        // An async worker of a multi-threaded runtime (block_in_place), its blocking pool, a
        // current-thread runtime (where block_in_place would panic), a plain thread.
        let mt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let s1 = s.clone();
        mt.block_on(async move {
            let s2 = s1.clone();
            tokio::spawn(async move { s2.put(VMS, "a", &rec(1)).unwrap() })
                .await
                .unwrap();
            let s3 = s1.clone();
            tokio::task::spawn_blocking(move || s3.put(VMS, "b", &rec(2)).unwrap())
                .await
                .unwrap();
        });
        let ct = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        ct.block_on(async { s.put(VMS, "c", &rec(3)).unwrap() });
        s.put(VMS, "d", &rec(4)).unwrap();
        assert_eq!(s.list::<Rec>(VMS).unwrap().len(), 4);
    }

    #[test]
    fn concurrent_creates_exactly_one_wins() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(&d.path().join("s.redb")).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || s.insert_new(VMS, "same", &Rec { n: i }).is_ok())
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(wins, 1);
    }
}
