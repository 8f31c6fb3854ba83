//! hutchd's records in the revisioned store (`hutch_store::kv`): which keys hold what, the
//! schema version and its migrations, and typed reads and writes. Everything else in the daemon
//! reaches the store through here.
//!
//! Keys (schema 1):
//! ```text
//! meta/schema                     the schema version (a JSON number)
//! vms/ID                          a VM (hutch_core::Vm), keyed by its id
//! names/vm/OWNER/NAME             the id of OWNER's VM called NAME (OWNER `-`: the admin's)
//! images/KEY                      an image (KEY: `name` in the shared library, `~acct/name`)
//! accounts/NAME  tokens/ID  invites/HASH
//! ```
//! A VM and its name index entry are written in one transaction: a create is one transaction
//! (`Absent(name)` + both puts), so of two creates of one name exactly one commits; a change of
//! state is a compare-and-swap on the VM's key.
//!
//! VM reads are served from memory: a view of `vms/` kept by this process's own writes (applied
//! at their revision when they commit, so a caller reads its writes) and by a watch on the store
//! (so changes made by anyone else, later another node, arrive too). Per VM the newest revision
//! wins; a deleted VM leaves a tombstone until the watch has passed its revision, so a late
//! event cannot bring it back. Writes always go to the store, compared against the store.
//!
//! Schema 0 is the layout before the revisioned store (tables `vms`, `images`, `accounts`,
//! `tokens`, `invites`, keyed by name); `RedbStore` turns it into `legacy/TABLE/KEY`, and
//! [`Records::open`] moves those to their keys here, in batches that each move some records
//! atomically (a crash in between resumes where it stopped), then writes the version.

use hutch_core::{Image, Vm};
use hutch_store::kv::{
    Compare, EventKind, Revision, Store, StoreError, StoreExt, Txn, TxnOutcome, MAX_TXN_OPS,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};

/// The schema this hutchd reads and writes.
pub const SCHEMA: u64 = 1;

pub const VMS: &str = "vms/";
pub const NAMES: &str = "names/vm/";
pub const IMAGES: &str = "images/";
pub const ACCOUNTS: &str = "accounts/";
pub const TOKENS: &str = "tokens/";
pub const INVITES: &str = "invites/";
/// `leases/IP` → VM id: the VM network's address leases (the VM's record holds its address;
/// the lease key makes two creates that picked the same address conflict in the store).
pub const LEASES: &str = "leases/";
/// Templates and warm pools, by owner and name (`templates/alice/py`, `pools/alice/py`).
pub const TEMPLATES: &str = "templates/";
pub const POOLS: &str = "pools/";
/// Snapshots, by owner and name (`snapshots/alice/base`, `snapshots/base` for the admin's).
pub const SNAPSHOTS: &str = "snapshots/";
const META_SCHEMA: &str = "meta/schema";

/// The name index key of VM `name` owned by `owner`.
pub fn name_key(owner: Option<&str>, name: &str) -> String {
    format!("{NAMES}{}/{name}", owner.unwrap_or("-"))
}

/// The name index key of a VM store key as `hutch_core::vm_key` makes them (`alice/web`, `web`).
fn name_key_of(vm_key: &str) -> String {
    match vm_key.split_once('/') {
        Some((owner, name)) => name_key(Some(owner), name),
        None => name_key(None, vm_key),
    }
}

#[derive(Clone)]
pub struct Records {
    kv: Arc<dyn Store>,
    view: Arc<RwLock<View>>,
    /// This hutchd's node name in a cluster (unset on a single node: every VM is local).
    local: Arc<std::sync::OnceLock<String>>,
}

/// The in-memory view of `vms/` (see the module doc).
#[derive(Default)]
struct View {
    vms: HashMap<String, (Vm, Revision)>,
    /// Name index key -> id.
    names: HashMap<String, String>,
    /// Deleted ids and the revision of their deletion.
    gone: HashMap<String, Revision>,
    /// The revision the watch has applied.
    watched: Revision,
}

impl View {
    fn put(&mut self, vm: Vm, rev: Revision) {
        if self.gone.get(&vm.id).is_some_and(|g| *g >= rev)
            || self.vms.get(&vm.id).is_some_and(|(_, r)| *r >= rev)
        {
            return;
        }
        self.names
            .insert(name_key(vm.owner.as_deref(), &vm.name), vm.id.clone());
        self.vms.insert(vm.id.clone(), (vm, rev));
    }

    fn delete(&mut self, id: &str, rev: Revision) {
        if self.vms.get(id).is_some_and(|(_, r)| *r > rev) {
            return;
        }
        if let Some((vm, _)) = self.vms.remove(id) {
            let n = name_key(vm.owner.as_deref(), &vm.name);
            if self.names.get(&n).is_some_and(|i| i == id) {
                self.names.remove(&n);
            }
        }
        self.gone.insert(id.to_string(), rev);
    }

    fn watched_to(&mut self, rev: Revision) {
        self.watched = self.watched.max(rev);
        let w = self.watched;
        self.gone.retain(|_, r| *r > w);
    }
}

impl Records {
    /// Opens the records on `kv`, migrating an older schema; refuses a newer one.
    pub async fn open(kv: Arc<dyn Store>) -> Result<Records, StoreError> {
        let r = Records {
            kv,
            view: Arc::default(),
            local: Arc::default(),
        };
        let version =
            r.kv.get_json::<u64>(META_SCHEMA)
                .await?
                .map(|v| v.value)
                .unwrap_or(0);
        if version > SCHEMA {
            return Err(StoreError::Schema {
                found: version,
                supported: SCHEMA,
            });
        }
        if version < 1 {
            r.migrate_legacy().await?;
        }
        let snap = r.kv.range(VMS).await?;
        load(&r.view, &snap)?;
        follow(Arc::downgrade(&r.view), r.kv.clone(), snap.revision);
        Ok(r)
    }

    /// Names this hutchd's cluster node: from now on only VMs recorded on it are local.
    pub fn set_local_node(&self, name: &str) {
        let _ = self.local.set(name.to_string());
    }

    /// This hutchd's cluster node (None on a single node).
    pub fn local_node(&self) -> Option<String> {
        self.local.get().cloned()
    }

    /// Whether `vm` runs on this hutchd's node (every VM does on a single node).
    pub fn is_local(&self, vm: &Vm) -> bool {
        self.is_here(vm.node.as_deref())
    }

    /// Whether what is recorded on `node` is this hutchd's (everything is on a single node).
    pub fn is_here(&self, node: Option<&str>) -> bool {
        match self.local.get() {
            None => true,
            Some(n) => node == Some(n.as_str()),
        }
    }

    /// The store underneath (for watches).
    pub fn kv(&self) -> &Arc<dyn Store> {
        &self.kv
    }

    /// Schema 0 -> 1: `legacy/TABLE/KEY` to the keys of the module doc.
    async fn migrate_legacy(&self) -> Result<(), StoreError> {
        let legacy = self.kv.range("legacy/").await?;
        let mut txn = Txn::new();
        let mut moved = 0usize;
        for kv in legacy.kvs {
            let Some((table, key)) = kv.key["legacy/".len()..].split_once('/') else {
                continue;
            };
            let corrupt = |source| StoreError::Corrupt {
                key: kv.key.clone(),
                source,
            };
            txn = match table {
                "vms" => {
                    let vm: Vm = serde_json::from_slice(&kv.value).map_err(corrupt)?;
                    txn.put_json(name_key(vm.owner.as_deref(), &vm.name), &vm.id)?
                        .put(format!("{VMS}{}", vm.id), kv.value.clone())
                }
                "images" => {
                    let img: Image = serde_json::from_slice(&kv.value).map_err(corrupt)?;
                    txn.put(format!("{IMAGES}{}", img.key()), kv.value.clone())
                }
                "accounts" => txn.put(format!("{ACCOUNTS}{key}"), kv.value.clone()),
                "tokens" => txn.put(format!("{TOKENS}{key}"), kv.value.clone()),
                "invites" => txn.put(format!("{INVITES}{key}"), kv.value.clone()),
                _ => txn,
            }
            .delete(kv.key.clone());
            moved += 1;
            if txn.ops.len() + 3 > MAX_TXN_OPS {
                self.commit(std::mem::take(&mut txn)).await?;
            }
        }
        let txn = txn.put_json(META_SCHEMA, &SCHEMA)?;
        self.commit(txn).await?;
        if moved > 0 {
            tracing::info!(records = moved, schema = SCHEMA, "state store migrated");
        }
        Ok(())
    }

    async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        if txn.ops.is_empty() {
            return Ok(true);
        }
        Ok(self.kv.txn(txn).await?.is_committed())
    }

    // Generic records.

    pub async fn get<T: DeserializeOwned + Send>(
        &self,
        prefix: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        Ok(self
            .kv
            .get_json::<T>(&format!("{prefix}{key}"))
            .await?
            .map(|v| v.value))
    }

    pub async fn list<T: DeserializeOwned + Send>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, StoreError> {
        Ok(self
            .kv
            .list_json::<T>(prefix)
            .await?
            .0
            .into_iter()
            .map(|v| v.value)
            .collect())
    }

    pub async fn put<T: Serialize + Sync>(
        &self,
        prefix: &str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.commit(Txn::new().put_json(format!("{prefix}{key}"), value)?)
            .await
            .map(|_| ())
    }

    /// Changes a record by compare-and-swap; `f` may refuse (its error is returned, nothing
    /// written). A missing record is a store error.
    pub async fn update<T, E, F>(&self, prefix: &str, key: &str, f: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned + Send + Sync,
        E: From<StoreError> + Send,
        F: FnMut(&mut T) -> Result<(), E> + Send,
    {
        Ok(self
            .kv
            .update_json::<T, E, F>(&format!("{prefix}{key}"), f)
            .await?
            .value)
    }

    /// Writes a record that must not exist yet; false when it does.
    pub async fn create<T: Serialize + Sync>(
        &self,
        prefix: &str,
        key: &str,
        value: &T,
    ) -> Result<bool, StoreError> {
        let k = format!("{prefix}{key}");
        self.commit(
            Txn::new()
                .when(Compare::Absent(k.clone()))
                .put_json(k, value)?,
        )
        .await
    }

    /// Removes a record; returns whether it existed (of concurrent removals, one sees true).
    pub async fn delete(&self, prefix: &str, key: &str) -> Result<bool, StoreError> {
        let k = format!("{prefix}{key}");
        let Some(cur) = self.kv.get(&k).await? else {
            return Ok(false);
        };
        self.commit(
            Txn::new()
                .when(Compare::ModRevision(k.clone(), cur.mod_revision))
                .delete(k),
        )
        .await
    }

    // VMs.

    /// The VM stored under `vm_key` (`alice/web`, or `web` for the admin's).
    pub async fn vm(&self, vm_key: &str) -> Result<Option<Vm>, StoreError> {
        let v = self.view.read().unwrap_or_else(|e| e.into_inner());
        Ok(v.names
            .get(&name_key_of(vm_key))
            .and_then(|id| v.vms.get(id))
            .map(|(vm, _)| vm.clone()))
    }

    pub async fn vm_by_id(&self, id: &str) -> Result<Option<Vm>, StoreError> {
        let v = self.view.read().unwrap_or_else(|e| e.into_inner());
        Ok(v.vms.get(id).map(|(vm, _)| vm.clone()))
    }

    /// VM `id` as the store has it now (not the view): for code that follows the store's watch
    /// and must not act on a view that has not caught up with the event it saw.
    pub async fn vm_stored(&self, id: &str) -> Result<Option<Vm>, StoreError> {
        self.get(VMS, id).await
    }

    /// Every VM (of every node in a cluster).
    pub async fn vms(&self) -> Result<Vec<Vm>, StoreError> {
        Ok(self.fold_vms(|it| it.cloned().collect()))
    }

    /// The VMs of this hutchd's node: what its runtime runs, recovers and reaps.
    pub async fn local_vms(&self) -> Result<Vec<Vm>, StoreError> {
        Ok(self.fold_local_vms(|it| it.cloned().collect()))
    }

    /// [`Self::fold_vms`] over this node's VMs only.
    pub fn fold_local_vms<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &Vm>) -> R) -> R {
        self.fold_vms(|it| f(&mut it.filter(|v| self.is_local(v))))
    }

    /// [`Self::find_vm`] among this node's VMs.
    pub fn find_local_vm(&self, mut pred: impl FnMut(&Vm) -> bool) -> Option<Vm> {
        self.find_vm(|v| self.is_local(v) && pred(v))
    }

    /// Records a new VM and claims its name, in one transaction; false when the name is taken.
    pub async fn create_vm(&self, vm: &Vm) -> Result<bool, StoreError> {
        let name = name_key(vm.owner.as_deref(), &vm.name);
        let key = format!("{VMS}{}", vm.id);
        let mut txn = Txn::new()
            .when(Compare::Absent(name.clone()))
            .when(Compare::Absent(key.clone()))
            .put_json(name, &vm.id)?
            .put_json(key, vm)?;
        if let Some(ip) = vm.net.ipv4 {
            let lease = format!("{LEASES}{ip}");
            txn = txn
                .when(Compare::Absent(lease.clone()))
                .put_json(lease, &vm.id)?;
        }
        match self.kv.txn(txn).await? {
            TxnOutcome::Committed { revision } => {
                self.view_put(vm.clone(), revision);
                Ok(true)
            }
            TxnOutcome::Failed { .. } => Ok(false),
        }
    }

    /// Changes VM `id` by compare-and-swap; `f` may refuse (its error is returned, nothing
    /// written). The name never changes here.
    pub async fn update_vm<E, F>(&self, id: &str, f: F) -> Result<Vm, E>
    where
        E: From<StoreError> + Send,
        F: FnMut(&mut Vm) -> Result<(), E> + Send,
    {
        let v = self
            .kv
            .update_json::<Vm, E, F>(&format!("{VMS}{id}"), f)
            .await?;
        self.view_put(v.value.clone(), v.revision);
        Ok(v.value)
    }

    /// Reads VM `id` from the store into the view (another node changed it just now) and
    /// returns it.
    pub async fn reload_vm(&self, id: &str) -> Result<Option<Vm>, StoreError> {
        match self.kv.get_json::<Vm>(&format!("{VMS}{id}")).await? {
            Some(v) => {
                self.view_put(v.value.clone(), v.revision);
                Ok(Some(v.value))
            }
            None => Ok(None),
        }
    }

    fn view_put(&self, vm: Vm, rev: Revision) {
        self.view
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .put(vm, rev);
    }

    /// Computes over every VM without copying them (admission sums, uid allocation).
    pub fn fold_vms<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &Vm>) -> R) -> R {
        let v = self.view.read().unwrap_or_else(|e| e.into_inner());
        let mut it = v.vms.values().map(|(vm, _)| vm);
        f(&mut it)
    }

    /// The first VM `pred` accepts (a copy).
    pub fn find_vm(&self, mut pred: impl FnMut(&Vm) -> bool) -> Option<Vm> {
        self.fold_vms(|it| {
            for v in it {
                if pred(v) {
                    return Some(v.clone());
                }
            }
            None
        })
    }

    /// Renames VM `id` to `new_name` (which must be free) and applies `f`, in one transaction
    /// conditional on the record being unchanged since it was read: of concurrent claims of a
    /// warm pool VM, one wins. None: the record changed or is gone, or the name is taken.
    pub async fn rename_vm(
        &self,
        id: &str,
        new_name: &str,
        f: impl FnOnce(&mut Vm),
    ) -> Result<Option<Vm>, StoreError> {
        let key = format!("{VMS}{id}");
        let Some(cur) = self.kv.get_json::<Vm>(&key).await? else {
            return Ok(None);
        };
        let mut vm = cur.value;
        let old = name_key(vm.owner.as_deref(), &vm.name);
        vm.name = new_name.to_string();
        f(&mut vm);
        let new = name_key(vm.owner.as_deref(), &vm.name);
        let txn = Txn::new()
            .when(Compare::ModRevision(key.clone(), cur.revision))
            .when(Compare::Absent(new.clone()))
            .delete(old)
            .put_json(new, &vm.id)?
            .put_json(key, &vm)?;
        match self.kv.txn(txn).await? {
            TxnOutcome::Committed { revision } => {
                self.view_put(vm.clone(), revision);
                Ok(Some(vm))
            }
            TxnOutcome::Failed { .. } => Ok(None),
        }
    }

    /// Writes `vm` whole (recovery); its name must be its own or free.
    pub async fn put_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        let mut txn = Txn::new()
            .put_json(name_key(vm.owner.as_deref(), &vm.name), &vm.id)?
            .put_json(format!("{VMS}{}", vm.id), vm)?;
        if let Some(ip) = vm.net.ipv4 {
            txn = txn.put_json(format!("{LEASES}{ip}"), &vm.id)?;
        }
        if let TxnOutcome::Committed { revision } = self.kv.txn(txn).await? {
            self.view_put(vm.clone(), revision);
        }
        Ok(())
    }

    /// Removes VM `vm` and its name, in one transaction.
    pub async fn delete_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        let name = name_key(vm.owner.as_deref(), &vm.name);
        let mut txn = Txn::new().delete(format!("{VMS}{}", vm.id));
        if let Some(ip) = vm.net.ipv4 {
            txn = txn.delete(format!("{LEASES}{ip}"));
        }
        // The name goes with it only while it still names this VM.
        if let Some(cur) = self.kv.get_json::<String>(&name).await? {
            if cur.value == vm.id {
                txn = txn
                    .when(Compare::ModRevision(name.clone(), cur.revision))
                    .delete(name);
            }
        }
        let revision = match self.kv.txn(txn).await? {
            TxnOutcome::Committed { revision } => revision,
            // The name was re-pointed meanwhile: remove just the record.
            TxnOutcome::Failed { .. } => {
                let mut txn = Txn::new().delete(format!("{VMS}{}", vm.id));
                if let Some(ip) = vm.net.ipv4 {
                    txn = txn.delete(format!("{LEASES}{ip}"));
                }
                match self.kv.txn(txn).await? {
                    TxnOutcome::Committed { revision } => revision,
                    TxnOutcome::Failed { .. } => return Ok(()),
                }
            }
        };
        self.view
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .delete(&vm.id, revision);
        Ok(())
    }

    // Images.

    pub async fn image(&self, key: &str) -> Result<Option<Image>, StoreError> {
        self.get(IMAGES, key).await
    }

    pub async fn images(&self) -> Result<Vec<Image>, StoreError> {
        self.list(IMAGES).await
    }

    pub async fn put_image(&self, img: &Image) -> Result<(), StoreError> {
        self.put(IMAGES, &img.key(), img).await
    }

    pub async fn delete_image(&self, key: &str) -> Result<bool, StoreError> {
        self.delete(IMAGES, key).await
    }
}

/// Puts a snapshot of `vms/` into the view, dropping VMs it no longer has.
fn load(view: &RwLock<View>, snap: &hutch_store::kv::Snapshot) -> Result<(), StoreError> {
    let mut v = view.write().unwrap_or_else(|e| e.into_inner());
    let mut seen = std::collections::HashSet::new();
    for kv in &snap.kvs {
        let vm: Vm = serde_json::from_slice(&kv.value).map_err(|source| StoreError::Corrupt {
            key: kv.key.clone(),
            source,
        })?;
        seen.insert(vm.id.clone());
        v.put(vm, kv.mod_revision);
    }
    let stale: Vec<String> = v
        .vms
        .iter()
        .filter(|(id, (_, r))| !seen.contains(*id) && *r <= snap.revision)
        .map(|(id, _)| id.clone())
        .collect();
    for id in stale {
        v.delete(&id, snap.revision);
    }
    v.watched_to(snap.revision);
    Ok(())
}

/// Keeps the view in step with the store's `vms/` for as long as the records live.
fn follow(view: Weak<RwLock<View>>, kv: Arc<dyn Store>, mut from: Revision) {
    tokio::spawn(async move {
        loop {
            let mut w = match kv.watch(VMS, from).await {
                Ok(w) => w,
                Err(StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "records: watching VMs");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                let ev = match w.next().await {
                    Ok(ev) => ev,
                    Err(StoreError::Closed) => return,
                    Err(e) => {
                        if !matches!(e, StoreError::Compacted { .. }) {
                            tracing::warn!(error = %e, "records: VM watch");
                        }
                        break;
                    }
                };
                let Some(view) = view.upgrade() else { return };
                let id = ev.key[VMS.len()..].to_string();
                let mut v = view.write().unwrap_or_else(|e| e.into_inner());
                match ev.kind {
                    EventKind::Put => {
                        if let Some(vm) = ev
                            .value
                            .as_deref()
                            .and_then(|b| serde_json::from_slice::<Vm>(b).ok())
                        {
                            v.put(vm, ev.revision);
                        }
                    }
                    EventKind::Delete => v.delete(&id, ev.revision),
                }
                v.watched_to(ev.revision);
                from = ev.revision;
            }
            // Behind the store's history (or the watch failed): reload, then watch again.
            let Some(view) = view.upgrade() else { return };
            match kv.range(VMS).await {
                Ok(snap) => {
                    if load(&view, &snap).is_ok() {
                        from = snap.revision;
                    }
                }
                Err(StoreError::Closed) => return,
                Err(e) => tracing::warn!(error = %e, "records: reloading VMs"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use hutch_store::kv::MemoryStore;

    fn vm(id: &str, name: &str, owner: Option<&str>) -> Vm {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": name, "owner": owner, "image": "busybox",
            "image_digest": "sha256:00", "vcpus": 1, "mem_mib": 64, "disk_gib": 1,
            "state": "stopped", "reason": null, "pid": null, "accel": null, "created_at": 0,
            "started_at": null, "boot_ms": null, "kernel": null
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn vms_by_id_with_a_name_index() {
        let r = Records::open(Arc::new(MemoryStore::new())).await.unwrap();
        assert!(r.create_vm(&vm("a1", "web", Some("alice"))).await.unwrap());
        assert!(r.create_vm(&vm("b1", "web", Some("bob"))).await.unwrap());
        assert!(r.create_vm(&vm("c1", "web", None)).await.unwrap());
        // The same name in the same namespace: refused, nothing written.
        assert!(!r.create_vm(&vm("a2", "web", Some("alice"))).await.unwrap());
        assert!(r.vm_by_id("a2").await.unwrap().is_none());
        assert_eq!(r.vm("alice/web").await.unwrap().unwrap().id, "a1");
        assert_eq!(r.vm("web").await.unwrap().unwrap().id, "c1");
        assert_eq!(r.vms().await.unwrap().len(), 3);
        let v: Result<Vm, StoreError> = r
            .update_vm("a1", |v| {
                v.vcpus = 2;
                Ok(())
            })
            .await;
        assert_eq!(v.unwrap().vcpus, 2);
        r.delete_vm(&vm("a1", "web", Some("alice"))).await.unwrap();
        assert!(r.vm("alice/web").await.unwrap().is_none());
        // The name is free again.
        assert!(r.create_vm(&vm("a3", "web", Some("alice"))).await.unwrap());
    }

    #[tokio::test]
    async fn legacy_layout_is_migrated_once() {
        let kv: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let v = vm("a1", "web", Some("alice"));
        let txn = Txn::new()
            .put_json("legacy/vms/alice/web", &v)
            .unwrap()
            .put("legacy/accounts/alice", b"{\"x\":1}".to_vec())
            .put("legacy/tokens/t1", b"{}".to_vec());
        kv.txn(txn).await.unwrap();
        let r = Records::open(kv.clone()).await.unwrap();
        assert_eq!(r.vm("alice/web").await.unwrap(), Some(v));
        assert!(kv.range("legacy/").await.unwrap().kvs.is_empty());
        assert!(kv.get("accounts/alice").await.unwrap().is_some());
        assert!(kv.get("tokens/t1").await.unwrap().is_some());
        let rev = kv.revision().await.unwrap();
        Records::open(kv.clone()).await.unwrap();
        assert_eq!(
            kv.revision().await.unwrap(),
            rev,
            "a second open changes nothing"
        );
        // A newer schema is refused.
        kv.txn(Txn::new().put_json(META_SCHEMA, &(SCHEMA + 1)).unwrap())
            .await
            .unwrap();
        assert!(Records::open(kv).await.is_err());
    }
}
