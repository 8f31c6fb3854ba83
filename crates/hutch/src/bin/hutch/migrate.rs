//! `hutch admin migrate-store --to-etcd URL`: moves a single node's state (the embedded store
//! in DATA_DIR/state.redb) into an empty etcd, so that this host becomes the first node of a
//! cluster (docs/cluster.md). hutchd must be stopped (the store file is locked while it runs).
//! Its VMs and snapshots are recorded on this node (`--node-name`), its secrets shared, and
//! the store file renamed `state.redb.moved-to-etcd`, so a hutchd started without `--etcd` by
//! mistake does not run on a stale copy. VMs keep running throughout.

use anyhow::{bail, Context, Result};
use hutch_store::kv::{Compare, Store, Txn, MAX_TXN_OPS};
use hutch_store_etcd::{EtcdOptions, EtcdStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// etcd client URLs (URL[,URL...]), as for `hutchd --etcd`.
    #[arg(long = "to-etcd")]
    pub to_etcd: String,
    /// The name this host will run under (`hutchd --node-name`; default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    #[arg(long, default_value = "hutch/")]
    pub etcd_namespace: String,
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user; the password from HUTCH_ETCD_PASSWORD.
    #[arg(long)]
    pub etcd_user: Option<String>,
}

/// Adds `"node": NAME` to a VM or snapshot record.
fn stamp(value: &[u8], node: &str) -> Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(value).context("a corrupt record")?;
    if let Some(o) = v.as_object_mut() {
        o.insert("node".into(), serde_json::Value::String(node.into()));
    }
    Ok(serde_json::to_vec(&v)?)
}

pub async fn migrate(data_dir: &Path, a: MigrateArgs) -> Result<()> {
    let node = a
        .node_name
        .clone()
        .unwrap_or_else(hutch_daemon::cluster::nodes::local_host_name);
    hutch_core::names::validate_name(&node).map_err(|e| anyhow::anyhow!("--node-name: {e}"))?;
    let state = data_dir.join("state.redb");
    if !state.exists() {
        bail!("{} does not exist: nothing to migrate", state.display());
    }
    let local = hutch_store::kv::RedbStore::open(&state).with_context(|| {
        format!(
            "opening {} (stop hutchd first: it holds the file while it runs)",
            state.display()
        )
    })?;
    let local: Arc<dyn Store> = Arc::new(local);
    // Brings an older layout up to date, as hutchd would.
    hutch_daemon::records::Records::open(local.clone()).await?;
    let snap = local.range("").await?;

    let mut o = EtcdOptions::new(
        EtcdOptions::parse_endpoints(&a.to_etcd).map_err(|e| anyhow::anyhow!("--to-etcd: {e}"))?,
    );
    o.namespace = a.etcd_namespace.clone();
    o.ca = a.etcd_ca.clone();
    o.identity = a.etcd_cert.clone().zip(a.etcd_key.clone());
    if let Some(u) = &a.etcd_user {
        let p = std::env::var("HUTCH_ETCD_PASSWORD")
            .context("--etcd-user needs HUTCH_ETCD_PASSWORD")?;
        o.user = Some((u.clone(), p));
    }
    let etcd = EtcdStore::connect(&o).await?;
    let there = etcd.range("").await?;
    if !there.kvs.is_empty() {
        bail!(
            "etcd already holds {} hutch records under {:?}: migrate-store moves a single node \
             into an empty cluster; to join an existing cluster, start hutchd with --etcd (its \
             VMs are not carried over)",
            there.kvs.len(),
            a.etcd_namespace
        );
    }
    let mut moved = 0usize;
    for chunk in snap.kvs.chunks(MAX_TXN_OPS) {
        let mut txn = Txn::new();
        for kv in chunk {
            let value = if kv.key.starts_with("vms/") || kv.key.starts_with("snapshots/") {
                stamp(&kv.value, &node).with_context(|| format!("record {}", kv.key))?
            } else {
                kv.value.clone()
            };
            txn = txn
                .when(Compare::Absent(kv.key.clone()))
                .put(kv.key.clone(), value);
        }
        if !etcd.txn(txn).await?.is_committed() {
            bail!("another writer filled etcd meanwhile; {moved} records were copied");
        }
        moved += chunk.len();
    }
    hutch_daemon::cluster::secrets::publish(&etcd, data_dir)
        .await
        .context("sharing this node's secrets")?;
    drop(local);
    let aside = data_dir.join("state.redb.moved-to-etcd");
    std::fs::rename(&state, &aside)
        .with_context(|| format!("renaming {} to {}", state.display(), aside.display()))?;
    println!(
        "moved {moved} records to etcd ({}) as node {node}; {} kept as {}\n\
         now start: hutchd --data-dir {} --etcd {} --node-name {node} --advertise HOST:PORT ...",
        a.to_etcd,
        state.display(),
        aside.display(),
        data_dir.display(),
        a.to_etcd
    );
    Ok(())
}
