//! Snapshots, pause and resume, and fork for a caller (docs/snapshots.md). Snapshots live in
//! their owner's namespace like VMs (`snapshots/OWNER/NAME`); a VM made from one counts against
//! its owner's quota like any other, and so does every copy a fork makes.

use super::vms::check;
use super::Service;
use crate::auth::Caller;
use crate::cluster::route::Life;
use crate::error::ApiError;
use crate::node::{internal, Launch, Restore};
use crate::records::SNAPSHOTS;
use axum::http::Method;
use hutch_core::api::{CreateVm, ForkVm};
use hutch_core::net::VmNet;
use hutch_core::snapshot::{Snapshot, VmMemory};
use hutch_core::{names, Event, Vm, VmState};
use std::sync::Arc;
use std::time::Instant;

/// The most copies one fork makes.
pub const MAX_FORK: u32 = 64;

impl Service {
    /// `caller`'s snapshot `name`.
    pub async fn snapshot_for(&self, caller: &Caller, name: &str) -> Result<Snapshot, ApiError> {
        let missing = || ApiError::NotFound {
            kind: "snapshot",
            name: name.into(),
        };
        let key = caller.vm_key(name).ok_or_else(missing)?;
        match self.records.get::<Snapshot>(SNAPSHOTS, &key).await? {
            Some(s) if caller.sees(s.owner.as_deref()) && !s.internal => Ok(s),
            _ => Err(missing()),
        }
    }

    /// The snapshots `caller` may see, oldest first.
    pub async fn snapshots_of(&self, caller: &Caller) -> Result<Vec<Snapshot>, ApiError> {
        let mut v: Vec<Snapshot> = self
            .records
            .list::<Snapshot>(SNAPSHOTS)
            .await?
            .into_iter()
            .filter(|s| !s.internal && caller.sees(s.owner.as_deref()))
            .collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
        Ok(v)
    }

    /// Removes `caller`'s snapshot `name`. VMs made from it keep running: its files go when
    /// the last of them is gone.
    pub async fn delete_snapshot(&self, caller: &Caller, name: &str) -> Result<(), ApiError> {
        let s = self.snapshot_for(caller, name).await?;
        self.records.delete(SNAPSHOTS, &s.key()).await?;
        self.collect_snapshots().await
    }

    /// Removes layers and snapshot files no record needs (after a snapshot or VM is removed).
    pub(crate) async fn collect_snapshots(&self) -> Result<(), ApiError> {
        let _g = self.snap_ops.write().await;
        self.node.collect(&[]).await
    }

    /// Takes snapshot `snap_name` of `caller`'s running VM `name`; the VM runs on (it is stopped
    /// only while its state is written and its QEMU replaced).
    pub async fn snapshot(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        snap_name: &str,
    ) -> Result<Snapshot, ApiError> {
        names::validate_name(snap_name).map_err(ApiError::Invalid)?;
        let vm = self.vm_for(caller, name).await?;
        let req = serde_json::json!({ "name": snap_name });
        if let Some(s) = self
            .on_owner_json(caller, &vm, Method::POST, "snapshot", Some(req))
            .await?
        {
            return Ok(s);
        }
        let key = hutch_core::vm_key(vm.owner.as_deref(), snap_name);
        if self
            .records
            .get::<Snapshot>(SNAPSHOTS, &key)
            .await?
            .is_some()
        {
            return Err(ApiError::Conflict(format!(
                "snapshot {snap_name:?} already exists"
            )));
        }
        self.snapshot_vm(&vm, snap_name, false).await
    }

    /// Takes a snapshot of running `vm` and records it (`internal`: hidden, for a fork).
    pub(crate) async fn snapshot_vm(
        self: &Arc<Self>,
        vm: &Vm,
        snap_name: &str,
        internal_: bool,
    ) -> Result<Snapshot, ApiError> {
        check(vm, &Event::Snapshot)?;
        let image = self.image_of(vm).await?.ok_or_else(|| {
            ApiError::Conflict(format!(
                "the image of {} is no longer in the store",
                vm.name
            ))
        })?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let _ops = self.snap_ops.read().await;
        let vm = self.by_id(&vm.id, &vm.name).await?;
        if vm.mem.base.is_some() {
            // Its RAM is a snapshot's plus its own pages, in no file of its own: a first pass
            // moves all of it into a file of its own, so that the snapshot's copies map it and
            // share it (docs/snapshots.md).
            let pass = self
                .snapshot_once(&vm, &image, &format!("own-{}", names::random_id()), true)
                .await?;
            self.records.delete(SNAPSHOTS, &pass.key()).await?;
        }
        let vm = self.by_id(&vm.id, &vm.name).await?;
        self.snapshot_once(&vm, &image, snap_name, internal_).await
    }

    /// One snapshot of running `vm` (its lock held), recorded.
    async fn snapshot_once(
        self: &Arc<Self>,
        vm: &Vm,
        image: &hutch_core::Image,
        snap_name: &str,
        internal_: bool,
    ) -> Result<Snapshot, ApiError> {
        let vm = self
            .node
            .transition(&vm.id, Event::Snapshot, |_| {})
            .await?;
        let mut snap = Snapshot {
            id: names::random_id(),
            name: snap_name.to_string(),
            owner: vm.owner.clone(),
            vm: vm.name.clone(),
            vm_id: vm.id.clone(),
            created_at: hutch_core::now(),
            image: vm.image.clone(),
            image_digest: vm.image_digest.clone(),
            image_config_digest: vm.image_config_digest.clone(),
            image_layers: vm.image_layers.clone(),
            image_config: vm.image_config.clone(),
            vcpus: vm.vcpus,
            mem_mib: vm.mem_mib,
            disk_gib: vm.disk_gib,
            run: vm.run,
            net: VmNet {
                ipv4: None,
                mac: None,
                ssh_addr: None,
                ports: Vec::new(),
                public_ports: Vec::new(),
                ..vm.net.clone()
            },
            ram_in_file: false,
            layers: Vec::new(),
            bytes: 0,
            pause_ms: 0,
            internal: internal_,
            node: self.records.local_node(),
        };
        let ran = self.node.take_snapshot(&vm, image, &mut snap).await;
        if snap.layers.is_empty() {
            // Nothing was frozen: the VM runs on as it was.
            return Err(ran
                .err()
                .unwrap_or_else(|| internal("the snapshot froze nothing")));
        }
        // The files are there whether or not the VM came back: record the snapshot.
        if !self.records.create(SNAPSHOTS, &snap.key(), &snap).await? {
            return Err(ApiError::Conflict(format!(
                "snapshot {:?} already exists",
                snap.name
            )));
        }
        if let Err(e) = ran {
            let why = e.to_string();
            let _ = self
                .node
                .transition(&vm.id, Event::Exited(why), |v| v.pid = None)
                .await;
            return Err(e);
        }
        tracing::info!(vm = %vm.name, snapshot = %snap.name, pause_ms = snap.pause_ms, "snapshot taken");
        Ok(snap)
    }

    /// Makes a new VM from snapshot `req.snapshot` (validated by `create`).
    pub(crate) async fn create_from_snapshot(
        self: &Arc<Self>,
        caller: &Caller,
        req: &CreateVm,
        snap_name: &str,
    ) -> Result<Vm, ApiError> {
        let snap = self.snapshot_for(caller, snap_name).await?;
        let timers = super::timers::timers_of(req)?;
        self.restore_copy(caller, &snap, req.name.clone(), timers, None)
            .await
    }

    /// Boots a new VM of `caller`'s from `snap`, named `name` (or a random name).
    pub(crate) async fn restore_copy(
        self: &Arc<Self>,
        caller: &Caller,
        snap: &Snapshot,
        name: Option<String>,
        timers: hutch_core::timers::VmTimers,
        pool: Option<String>,
    ) -> Result<Vm, ApiError> {
        let t0 = Instant::now();
        if let Some(n) = &name {
            names::validate_name(n).map_err(ApiError::Invalid)?;
        }
        // In a cluster, from the node that took it when its files are not here.
        self.ensure_snapshot_files(snap).await?;
        let image = self.snapshot_image(snap).await?;
        let _ops = self.snap_ops.read().await;
        let mut vm = snap_vm(snap, caller);
        vm.node = self.records.local_node();
        vm.timers = timers;
        vm.pool = pool;
        {
            let _admitted = self.admit(&vm, true).await?;
            let (conf, _uid_held) = self.node.allocate_uid().await?;
            vm.confinement = conf;
            let _lease = self.lease(&mut vm)?;
            self.claim_name(&mut vm, name.as_deref()).await?;
        }
        let launch = Launch::Restore(Restore {
            state: self.node.snapshot_dir(&snap.id).join("state"),
            ram_in_file: snap.ram_in_file,
            new_identity: true,
        });
        let (id, pooled) = (vm.id.clone(), vm.pool.is_some());
        let warming = |add: bool| {
            let mut w = self.warming.lock().unwrap_or_else(|e| e.into_inner());
            if add {
                w.insert(id.clone());
            } else {
                w.remove(&id);
            }
        };
        if pooled {
            // Not claimable until the pool has warmed it up (pools.rs).
            warming(true);
        }
        let r = self.build(vm, image, None, t0, launch).await;
        if pooled && r.is_err() {
            warming(false);
        }
        r
    }

    /// The image the guest of `snap` runs on (its record: by digest).
    pub(crate) async fn snapshot_image(
        &self,
        snap: &Snapshot,
    ) -> Result<hutch_core::Image, ApiError> {
        self.image_of(&snap_vm(snap, &Caller::local_admin()))
            .await?
            .ok_or_else(|| {
                ApiError::Conflict(format!(
                    "the image of snapshot {} is no longer in the store",
                    snap.name
                ))
            })
    }

    /// Pauses `caller`'s running VM `name`: its state goes to disk and its QEMU ends, so it
    /// holds no memory until it is resumed.
    pub async fn pause(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<Vm, ApiError> {
        if let Some(vm) = self.elsewhere(caller, name, Life::Pause).await? {
            return vm.ok_or_else(|| ApiError::vm(name));
        }
        let vm = self.vm_for(caller, name).await?;
        check(&vm, &Event::Pause)?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        self.pause_locked(&vm.id, |_| {}).await
    }

    /// Pauses running VM `id` (its lock held), with `also` applied to its record as it starts;
    /// also auto-pause's and the TTL's.
    pub(crate) async fn pause_locked(
        self: &Arc<Self>,
        id: &str,
        also: impl FnMut(&mut Vm) + Send,
    ) -> Result<Vm, ApiError> {
        let _ops = self.snap_ops.read().await;
        let vm = self.node.transition(id, Event::Pause, also).await?;
        self.node.pause(&vm).await
    }

    /// Resumes `caller`'s paused VM `name` with its name, address and disk.
    pub async fn resume(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<Vm, ApiError> {
        if let Some(vm) = self.elsewhere(caller, name, Life::Resume).await? {
            return vm.ok_or_else(|| ApiError::vm(name));
        }
        let vm = self.vm_for(caller, name).await?;
        if vm.state == VmState::Running {
            return Ok(vm);
        }
        check(&vm, &Event::Resume)?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        self.resume_locked(&vm.id).await
    }

    /// Resumes paused VM `id` (its lock held); a running one is returned as it is.
    pub(crate) async fn resume_locked(self: &Arc<Self>, id: &str) -> Result<Vm, ApiError> {
        let vm = self.by_id(id, id).await?;
        if vm.state == VmState::Running {
            return Ok(vm);
        }
        check(&vm, &Event::Resume)?;
        let image = self.image_of(&vm).await?.ok_or_else(|| {
            ApiError::Conflict(format!(
                "image {} of {} is no longer in the store",
                vm.image, vm.name
            ))
        })?;
        let vm = {
            let _admitted = self.admit(&vm, false).await?;
            self.node.transition(id, Event::Resume, |_| {}).await?
        };
        match self.node.resume(&vm, &image).await {
            Ok(v) => self.rearm_ttl(v).await,
            Err(e) => {
                let _ = self
                    .node
                    .transition(id, Event::BootFailed(e.to_string()), |v| v.pid = None)
                    .await;
                Err(e)
            }
        }
    }

    /// Makes `req.count` copies of `caller`'s running VM `name`, each with its own identity,
    /// sharing the source's memory and disk copy-on-write. All copies are admitted first: a
    /// fork past the quota makes none.
    pub async fn fork(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: ForkVm,
    ) -> Result<Vec<Vm>, ApiError> {
        let count = req.count.unwrap_or(1);
        if count == 0 || count > MAX_FORK {
            return Err(ApiError::Invalid(format!(
                "count must be between 1 and {MAX_FORK}, not {count}"
            )));
        }
        let vm = self.vm_for(caller, name).await?;
        let body = serde_json::to_value(&req).map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Some(v) = self
            .on_owner_json(caller, &vm, Method::POST, "fork", Some(body))
            .await?
        {
            return Ok(v);
        }
        check(&vm, &Event::Snapshot)?;
        let prefix = req.name.unwrap_or_else(|| format!("{}-fork", vm.name));
        let names: Vec<String> = (1..=count).map(|i| format!("{prefix}-{i}")).collect();
        for n in &names {
            names::validate_name(n).map_err(ApiError::Invalid)?;
            let key = hutch_core::vm_key(vm.owner.as_deref(), n);
            if self.records.vm(&key).await?.is_some() {
                return Err(ApiError::Conflict(format!("sandbox {n:?} already exists")));
            }
        }
        // Every copy admitted up front: what would not fit is refused before anything is made.
        let mut held = Vec::new();
        for _ in 0..count {
            // Reservations are per VM id: each copy-to-be is a VM of its own.
            let copy = Vm {
                id: names::random_id(),
                ..vm.clone()
            };
            held.push(self.admit(&copy, true).await?);
        }
        let snap = self
            .snapshot_vm(&vm, &format!("fork-{}", names::random_id()), true)
            .await?;
        drop(held);
        // Restores run side by side, a few at a time (each is a QEMU start and a guest that
        // takes its identity); the copies come back in name order.
        use futures_util::StreamExt;
        let parallel = (self.node.host_cpus() as usize).clamp(1, 8);
        let snap2 = &snap;
        let results: Vec<Result<Vm, ApiError>> = futures_util::stream::iter(names)
            .map(|n| async move {
                self.restore_copy(caller, snap2, Some(n), Default::default(), None)
                    .await
            })
            .buffered(parallel)
            .collect()
            .await;
        let mut made = Vec::new();
        let mut err = None;
        for r in results {
            match r {
                Ok(v) => made.push(v),
                Err(e) => err = err.or(Some(e)),
            }
        }
        self.records.delete(SNAPSHOTS, &snap.key()).await?;
        if let Some(e) = err {
            // All or nothing: the copies made so far go again.
            for v in &made {
                let shown = hutch_core::render::display_name(v, caller.owner().as_deref());
                let _ = self.delete(caller, &shown).await;
            }
            let _ = self.collect_snapshots().await;
            return Err(e);
        }
        Ok(made)
    }
}

/// A new VM's record as snapshot `snap` makes it, for `caller`.
fn snap_vm(snap: &Snapshot, caller: &Caller) -> Vm {
    Vm {
        id: names::random_id(),
        name: String::new(),
        image: snap.image.clone(),
        image_digest: snap.image_digest.clone(),
        vcpus: snap.vcpus,
        mem_mib: snap.mem_mib,
        disk_gib: snap.disk_gib,
        state: VmState::Creating,
        reason: None,
        pid: None,
        accel: None,
        created_at: hutch_core::now(),
        started_at: None,
        boot_ms: None,
        kernel: None,
        disk_us: None,
        run: snap.run,
        main_pid: None,
        owner: caller.owner(),
        image_config_digest: snap.image_config_digest.clone(),
        image_layers: snap.image_layers.clone(),
        image_config: snap.image_config.clone(),
        confinement: None,
        restart: Default::default(),
        restarts: 0,
        clean_exit: false,
        net: snap.net.clone(),
        net_us: None,
        timers: Default::default(),
        pool: None,
        node: None,
        recreated: None,
        migrated: None,
        lost: false,
        mem: VmMemory {
            base: snap.ram_in_file.then(|| snap.id.clone()),
            layers: snap.layers.clone(),
            saved: None,
            from: Some(snap.name.clone()),
        },
    }
}
