//! The secrets every node of a cluster shares, through etcd: the admin API token and the JWT
//! signing key (so that every token works on every node), the E2B and share-link keys, the VM
//! identity key, the SSH host key (so `ssh VM@any-node` meets one host key) and the proxy's CA.
//!
//! They stay files in each node's data dir (0600, see `crate::secrets`), which the code that
//! loads them reads as on a single node. [`adopt`] runs before anything loads them: it writes
//! the cluster's copy of each over the node's, and makes and publishes the random ones that the
//! cluster does not have yet. [`publish`] runs once the daemon has made the rest (keys in their
//! own formats): each one the cluster lacks is offered with compare-and-swap; a node that loses
//! that race at the cluster's first start stops with an error and takes the winner's copy at its
//! next start. etcd then holds secrets: run it with TLS and authentication (docs/cluster.md).

use hutch_store::kv::{Compare, Store, StoreError, Txn, TxnOutcome};
use hutch_store_etcd::EtcdStore;
use std::path::Path;

const PREFIX: &str = "cluster/secrets/";

/// A shared secret: its file under the data dir, and how to make it when no node has one (None:
/// the daemon makes it in its own format, and [`publish`] shares it).
struct Shared {
    file: &'static str,
    make: Option<fn() -> Vec<u8>>,
}

fn random32() -> Vec<u8> {
    rand::random::<[u8; 32]>().to_vec()
}

fn hex_token() -> Vec<u8> {
    hex::encode(rand::random::<[u8; 32]>()).into_bytes()
}

const SHARED: &[Shared] = &[
    Shared {
        file: "api-token",
        make: Some(hex_token),
    },
    Shared {
        file: "jwt-secret",
        make: Some(random32),
    },
    Shared {
        file: "e2b-key",
        make: Some(random32),
    },
    Shared {
        file: "proxy-share-key",
        make: Some(random32),
    },
    Shared {
        file: "identity-key.p8",
        make: None,
    },
    Shared {
        file: "ssh_host_ed25519_key",
        make: None,
    },
    Shared {
        file: "proxy-ca/ca.pem",
        make: None,
    },
    Shared {
        file: "proxy-ca/ca.key",
        make: None,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    File(#[from] crate::secrets::SecretError),
    #[error("{0}")]
    Io(String),
    #[error(
        "another node shared its own {0} at the same time (the cluster's first start); this \
         node has taken the cluster's copy: start hutchd again"
    )]
    Raced(String),
}

fn key(file: &str) -> String {
    format!("{PREFIX}{file}")
}

/// Writes `data` as the node's copy of `file` (creating `proxy-ca/` 0700 when needed).
fn write_local(data_dir: &Path, file: &str, data: &[u8]) -> Result<(), SecretsError> {
    let path = data_dir.join(file);
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| SecretsError::Io(e.to_string()))?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(|e| SecretsError::Io(e.to_string()))?;
        }
    }
    if crate::secrets::read(&path)?.as_deref() != Some(data) {
        crate::secrets::write(&path, data)?;
    }
    Ok(())
}

/// Before the daemon loads its secrets: the cluster's copies replace the node's; random secrets
/// the cluster lacks are made (or the node's own are shared) now.
pub async fn adopt(store: &EtcdStore, data_dir: &Path) -> Result<(), SecretsError> {
    for s in SHARED {
        if let Some(kv) = store.get(&key(s.file)).await? {
            write_local(data_dir, s.file, &kv.value)?;
            continue;
        }
        let Some(make) = s.make else { continue };
        let local = crate::secrets::read(&data_dir.join(s.file))?;
        let mine = local.unwrap_or_else(make);
        let txn = Txn::new()
            .when(Compare::Absent(key(s.file)))
            .put(key(s.file), mine.clone());
        let data = match store.txn(txn).await? {
            TxnOutcome::Committed { .. } => mine,
            TxnOutcome::Failed { .. } => store
                .get(&key(s.file))
                .await?
                .map(|kv| kv.value)
                .unwrap_or(mine),
        };
        write_local(data_dir, s.file, &data)?;
    }
    Ok(())
}

/// Once the daemon made its secrets: shares those the cluster lacks.
pub async fn publish(store: &EtcdStore, data_dir: &Path) -> Result<(), SecretsError> {
    for s in SHARED {
        let Some(local) = crate::secrets::read(&data_dir.join(s.file))? else {
            continue;
        };
        let txn = Txn::new()
            .when(Compare::Absent(key(s.file)))
            .put(key(s.file), local.clone());
        if let TxnOutcome::Failed { .. } = store.txn(txn).await? {
            let theirs = store.get(&key(s.file)).await?.map(|kv| kv.value);
            if theirs.as_deref() != Some(local.as_slice()) {
                if let Some(t) = theirs {
                    write_local(data_dir, s.file, &t)?;
                }
                return Err(SecretsError::Raced(s.file.to_string()));
            }
        }
    }
    Ok(())
}
