//! Typed JSON helpers over any [`Store`]: [`StoreExt`] (reads that decode, a compare-and-swap
//! update loop) and [`Versioned`].

use super::error::StoreError;
use super::store::Store;
use super::types::{Compare, KeyValue, Revision, Txn, TxnOutcome};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How many times [`StoreExt::update_json`] tries before giving up with
/// [`StoreError::Contended`].
pub const UPDATE_ATTEMPTS: u32 = 16;

/// A decoded record and the revision it was last written at (its `mod_revision`: pass it to
/// [`Compare::ModRevision`] to write only if nobody else did meanwhile).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub key: String,
    pub value: T,
    pub revision: Revision,
}

fn decode<T: DeserializeOwned>(kv: KeyValue) -> Result<Versioned<T>, StoreError> {
    match serde_json::from_slice(&kv.value) {
        Ok(value) => Ok(Versioned {
            key: kv.key,
            value,
            revision: kv.mod_revision,
        }),
        Err(source) => Err(StoreError::Corrupt {
            key: kv.key,
            source,
        }),
    }
}

/// JSON records on any store (`Arc<dyn Store>` included).
#[async_trait::async_trait]
pub trait StoreExt: Store {
    /// The record at `key`, decoded; [`StoreError::Corrupt`] when it is not a `T`.
    async fn get_json<T: DeserializeOwned + Send>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        self.get(key).await?.map(decode).transpose()
    }

    /// Every record under `prefix`, decoded, sorted by key, and the revision they were read at.
    async fn list_json<T: DeserializeOwned + Send>(
        &self,
        prefix: &str,
    ) -> Result<(Vec<Versioned<T>>, Revision), StoreError> {
        let snapshot = self.range(prefix).await?;
        let records = snapshot
            .kvs
            .into_iter()
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((records, snapshot.revision))
    }

    /// Reads the record, lets `f` change it, and writes it back only if nobody wrote it
    /// meanwhile; otherwise runs again on the newer record, at most [`UPDATE_ATTEMPTS`] times. An
    /// error of `f` stops the update (nothing written). [`StoreError::NotFound`] when absent.
    async fn update_json<T, E, F>(&self, key: &str, mut f: F) -> Result<Versioned<T>, E>
    where
        T: Serialize + DeserializeOwned + Send,
        E: From<StoreError> + Send,
        F: FnMut(&mut T) -> Result<(), E> + Send,
    {
        for _ in 0..UPDATE_ATTEMPTS {
            let Some(current) = self.get_json::<T>(key).await? else {
                return Err(StoreError::NotFound { key: key.into() }.into());
            };
            let mut value = current.value;
            f(&mut value)?;
            let txn = Txn::new()
                .when(Compare::ModRevision(key.into(), current.revision))
                .put_json(key, &value)?;
            match self.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    return Ok(Versioned {
                        key: key.into(),
                        value,
                        revision,
                    })
                }
                TxnOutcome::Failed { .. } => {}
            }
        }
        Err(StoreError::Contended {
            key: key.into(),
            attempts: UPDATE_ATTEMPTS,
        }
        .into())
    }
}

impl<S: Store + ?Sized> StoreExt for S {}
