//! VM lifecycle for a caller: create, clone, start, stop, delete, get, list. Every operation
//! resolves the name in the caller's namespace, checks its event against the VM's state before
//! waiting for the VM's lock (a VM in a transitional state answers 409 at once, see
//! `hutch_core::lifecycle`), and again under the lock.

use super::Service;
use crate::auth::Caller;
use crate::cluster::route::Life;
use crate::error::ApiError;
use crate::node::{internal, Launch};
use axum::http::Method;
use hutch_core::net::{NetMode, VmNet};
use hutch_core::{names, Event, Image, Vm, VmState};
use std::sync::Arc;
use std::time::Instant;

pub use hutch_core::api::{CreateVm, ExecVm, DEFAULT_MEM_MIB, DEFAULT_VCPUS};

/// Refuses `event` when `vm`'s current state does not allow it (409).
pub(crate) fn check(vm: &Vm, event: &Event) -> Result<(), ApiError> {
    vm.state
        .on(event)
        .map(|_| ())
        .map_err(|d| ApiError::Conflict(format!("{} {d}", vm.name)))
}

impl Service {
    /// The VM stored under `key` (`alice/web`, or `web` for the admin's).
    pub async fn get(&self, key: &str) -> Result<Vm, ApiError> {
        self.records
            .vm(key)
            .await?
            .ok_or_else(|| ApiError::vm(key.rsplit('/').next().unwrap_or(key)))
    }

    /// The current record of VM `id`.
    pub(crate) async fn by_id(&self, id: &str, name: &str) -> Result<Vm, ApiError> {
        self.records
            .vm_by_id(id)
            .await?
            .ok_or_else(|| ApiError::vm(name))
    }

    /// Every VM, oldest first.
    pub async fn list(&self) -> Result<Vec<Vm>, ApiError> {
        let mut v = self.records.vms().await?;
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
        Ok(v)
    }

    /// `caller`'s VM `name`, described (`lost` while its node is down).
    pub async fn describe(&self, caller: &Caller, name: &str) -> Result<Vm, ApiError> {
        let mut vm = [self.vm_for(caller, name).await?];
        self.mark_lost(&mut vm).await;
        let [vm] = vm;
        Ok(vm)
    }

    /// The end (`max` bytes) of `caller`'s VM `name`'s console, as the guest wrote it.
    pub async fn console(&self, caller: &Caller, name: &str, max: u64) -> Result<String, ApiError> {
        let vm = self.vm_for(caller, name).await?;
        let sub = format!("logs?tail={max}");
        if let Some(b) = self.on_owner(caller, &vm, Method::GET, &sub, None).await? {
            return Ok(String::from_utf8_lossy(&b).into_owned());
        }
        Ok(self.node.console_tail(&vm.id, max))
    }

    pub(crate) fn validate_create(&self, req: &CreateVm) -> Result<(), ApiError> {
        if let Some(n) = &req.name {
            names::validate_name(n).map_err(ApiError::Invalid)?;
        }
        let (cpus, mem) = (self.node.host_cpus(), self.node.host_mem_mib());
        if req.vcpus == 0 || req.vcpus > cpus {
            return Err(ApiError::Invalid(format!(
                "vcpus must be between 1 and {cpus} (the host's CPUs), not {}",
                req.vcpus
            )));
        }
        if req.mem_mib < 64 || req.mem_mib > mem {
            return Err(ApiError::Invalid(format!(
                "mem_mib must be between 64 and {mem} (the host's memory), not {}",
                req.mem_mib
            )));
        }
        if let Some(d) = req.disk_gib {
            if d == 0 || d > 1024 {
                return Err(ApiError::Invalid(format!(
                    "disk_gib must be between 1 and 1024, not {d}"
                )));
            }
        }
        let sock = self.node.vm_dir("000000000000").join("run/agent.sock");
        if sock.as_os_str().len() >= 100 {
            return Err(ApiError::Internal(format!(
                "data dir {} is too long for unix socket paths",
                self.cfg().data_dir.display()
            )));
        }
        Ok(())
    }

    /// Creates and boots a VM; on any failure nothing of it remains. The record (state
    /// `creating`, name claimed) is one store transaction.
    pub async fn create(self: &Arc<Self>, caller: &Caller, req: CreateVm) -> Result<Vm, ApiError> {
        if let Some(vm) = self.create_placed(caller, req.clone()).await? {
            return Ok(vm);
        }
        let t0 = Instant::now();
        if req.snapshot.is_some() || req.template.is_some() {
            if !req.image.is_empty() || req.clone.is_some() || req.run {
                return Err(ApiError::Invalid(
                    "a VM made from a snapshot or template takes its image, main process and \
                     disk from it: drop image, run and clone"
                        .into(),
                ));
            }
            return match (req.snapshot.clone(), req.template.clone()) {
                (Some(s), None) => self.create_from_snapshot(caller, &req, &s).await,
                (None, Some(t)) => self.create_from_template(caller, &req, &t).await,
                _ => Err(ApiError::Invalid(
                    "give a snapshot or a template, not both".into(),
                )),
            };
        }
        if req.image.is_empty() {
            return Err(ApiError::Invalid("image is required".into()));
        }
        self.validate_create(&req)?;
        let net = self.net_of(&req)?;
        let image = self.image_for(caller, &req.image).await?;
        let clone = super::clone_repo::clone_target(&req, &image.config.working_dir)?;
        if req.run && image.config.entrypoint.is_empty() && image.config.cmd.is_empty() {
            return Err(ApiError::Invalid(format!(
                "image {} has no Entrypoint or Cmd to --run",
                image.name
            )));
        }
        self.ensure_rootfs(&image).await?;
        let mut vm = Vm {
            id: names::random_id(),
            name: String::new(),
            image: image.name.clone(),
            image_digest: image.digest.clone(),
            vcpus: req.vcpus,
            mem_mib: req.mem_mib,
            disk_gib: req.disk_gib.unwrap_or(self.cfg().default_disk_gib),
            state: VmState::Creating,
            reason: None,
            pid: None,
            accel: Some(self.cfg().accel.as_str().into()),
            created_at: hutch_core::now(),
            started_at: None,
            boot_ms: None,
            kernel: None,
            disk_us: None,
            run: req.run,
            main_pid: None,
            owner: caller.owner(),
            image_config_digest: Some(image.config_digest.clone()),
            image_layers: image.layers.clone(),
            image_config: Some(image.config.clone()),
            confinement: None,
            restart: req.restart,
            restarts: 0,
            clean_exit: false,
            net,
            net_us: None,
            mem: Default::default(),
            timers: super::timers::timers_of(&req)?,
            pool: None,
            node: self.records.local_node(),
            recreated: None,
            migrated: None,
            lost: false,
        };
        // Admitted (reserved until the record counts), then the name is claimed in the create's
        // one store transaction: of concurrent creates, one wins.
        {
            let _admitted = self.admit(&vm, true).await?;
            let (conf, _uid_held) = self.node.allocate_uid().await?;
            vm.confinement = conf;
            let _lease = self.lease(&mut vm)?;
            self.claim_name(&mut vm, req.name.as_deref()).await?;
        }
        let vm = self.build(vm, image, None, t0, Launch::Boot).await?;
        if let Some((url, dir)) = clone {
            if let Err(e) = self.clone_repo(caller, &vm, &url, &dir).await {
                let shown = hutch_core::render::display_name(&vm, caller.owner().as_deref());
                if let Err(d) = self.delete(caller, &shown).await {
                    tracing::warn!(vm = %vm.name, error = %d, "undoing a create whose clone failed");
                }
                return Err(e);
            }
        }
        Ok(vm)
    }

    /// Records new `vm` (state `creating`) under `name`, or a random free name: the name is
    /// claimed in the create's one store transaction, so of concurrent creates one wins.
    pub(crate) async fn claim_name(&self, vm: &mut Vm, name: Option<&str>) -> Result<(), ApiError> {
        match name {
            Some(n) => {
                vm.name = n.to_string();
                if !self.records.create_vm(vm).await? {
                    return Err(ApiError::Conflict(format!("sandbox {n:?} already exists")));
                }
            }
            None => {
                let mut tries = 0;
                loop {
                    vm.name = names::random_name();
                    if self.records.create_vm(vm).await? {
                        break;
                    }
                    tries += 1;
                    if tries > 50 {
                        return Err(ApiError::Conflict("no free random name".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives `vm` an address when its mode has a NIC; held until the record is written.
    pub(crate) fn lease(&self, vm: &mut Vm) -> Result<Option<crate::net::Lease<'_>>, ApiError> {
        let Some(n) = self
            .node
            .net
            .as_ref()
            .filter(|_| vm.net.mode != NetMode::None)
        else {
            return Ok(None);
        };
        let l = n.allocate(&self.records, vm.owner.as_deref())?;
        vm.net.ipv4 = Some(l.ip);
        vm.net.ssh_addr = l.ssh.as_ref().map(|s| s.1);
        vm.net.mac = Some(VmNet::mac_for(l.ip));
        Ok(Some(l))
    }

    /// Makes the disk of just-recorded `vm` (fresh, or a copy of VM `from`'s) and boots it
    /// (`launch`: or starts it from a snapshot); undoes everything on failure.
    pub(crate) async fn build(
        self: &Arc<Self>,
        vm: Vm,
        image: Image,
        from: Option<String>,
        t0: Instant,
        launch: Launch,
    ) -> Result<Vm, ApiError> {
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let result = async {
            crate::crash::point("create.registered");
            let t = Instant::now();
            let (node, v2, f2) = (self.node.clone(), vm.clone(), from.clone());
            tokio::task::spawn_blocking(move || node.create_disk(&v2, f2.as_deref()))
                .await
                .map_err(internal)??;
            crate::crash::point(if from.is_some() {
                "clone.copied"
            } else {
                "create.disk"
            });
            let us = t.elapsed().as_micros() as u64;
            self.node.boot(&vm, &image, Some(us), launch).await
        }
        .await;
        match result {
            Ok(v) => {
                self.metrics.creates.observe(t0.elapsed());
                Ok(v)
            }
            Err(e) => {
                self.node.destroy(&vm).await;
                let _ = self.records.delete_vm(&vm).await;
                Err(e)
            }
        }
    }

    /// Makes a new VM from a copy of `src`'s disk (boxcutter's `cp`) and boots it. `src` must
    /// be stopped or failed, so its disk is consistent; the copy keeps its image, size, owner
    /// and restart policy.
    pub async fn clone_vm(
        self: &Arc<Self>,
        caller: &Caller,
        src: &str,
        dst: Option<String>,
    ) -> Result<Vm, ApiError> {
        let t0 = Instant::now();
        let from = self.vm_for(caller, src).await?;
        let req = serde_json::json!({ "name": dst });
        if let Some(v) = self
            .on_owner_json(caller, &from, Method::POST, "clone", Some(req))
            .await?
        {
            return Ok(v);
        }
        let lock = self.lock_for(&from.id);
        let guard = lock.lock().await;
        let from = self.by_id(&from.id, src).await?;
        if !matches!(from.state, VmState::Stopped | VmState::Failed) {
            return Err(ApiError::Conflict(format!(
                "{src} is {}; stop it first to copy it",
                from.state.as_str()
            )));
        }
        let image = self.image_of(&from).await?.ok_or_else(|| {
            ApiError::Conflict(format!("the image of {src} is no longer in the store"))
        })?;
        if let Some(n) = &dst {
            names::validate_name(n).map_err(ApiError::Invalid)?;
        }
        let mut vm = Vm {
            id: names::random_id(),
            name: dst.unwrap_or_else(|| format!("{}-copy", from.name)),
            state: VmState::Creating,
            reason: None,
            pid: None,
            created_at: hutch_core::now(),
            started_at: None,
            boot_ms: None,
            main_pid: None,
            confinement: None,
            restarts: 0,
            clean_exit: false,
            net_us: None,
            timers: Default::default(),
            pool: None,
            node: self.records.local_node(),
            // The copy's disk sits on the same frozen layers; it boots afresh.
            mem: hutch_core::snapshot::VmMemory {
                layers: from.mem.layers.clone(),
                ..Default::default()
            },
            net: VmNet {
                ipv4: None,
                mac: None,
                ssh_addr: None,
                ports: Vec::new(),
                public_ports: Vec::new(),
                ..from.net.clone()
            },
            ..from.clone()
        };
        {
            let _admitted = self.admit(&vm, true).await?;
            let _lease = self.lease(&mut vm)?;
            let (conf, _uid_held) = self.node.allocate_uid().await?;
            vm.confinement = conf;
            let _lease = self.lease(&mut vm)?;
            if !self.records.create_vm(&vm).await? {
                return Err(ApiError::Conflict(format!(
                    "sandbox {:?} already exists",
                    vm.name
                )));
            }
        }
        // The source stays locked while its disk is copied.
        let r = self
            .build(vm, image, Some(from.id.clone()), t0, Launch::Boot)
            .await;
        drop(guard);
        r
    }

    /// Starts `caller`'s stopped or failed VM `name`.
    pub async fn start(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<Vm, ApiError> {
        if let Some(vm) = self.elsewhere(caller, name, Life::Start).await? {
            return vm.ok_or_else(|| ApiError::vm(name));
        }
        let vm = self.vm_for(caller, name).await?;
        check(&vm, &Event::Start)?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        self.start_locked(&vm.id, 0).await
    }

    /// Starts VM `id` (its lock held); `restarts` is what its record's restart count becomes.
    pub(crate) async fn start_locked(
        self: &Arc<Self>,
        id: &str,
        restarts: u32,
    ) -> Result<Vm, ApiError> {
        let vm = self.by_id(id, id).await?;
        check(&vm, &Event::Start)?;
        let image = self.image_of(&vm).await?.ok_or_else(|| {
            ApiError::Conflict(format!(
                "image {} of {} is no longer in the store",
                vm.image, vm.name
            ))
        })?;
        if !self.node.has_disk(&vm) {
            return Err(ApiError::Conflict(format!(
                "the disk of {} is missing",
                vm.name
            )));
        }
        let vm = {
            let _admitted = self.admit(&vm, false).await?;
            self.node
                .transition(id, Event::Start, |v| v.restarts = restarts)
                .await?
        };
        let had_base = vm.mem.base.is_some();
        match self.node.boot(&vm, &image, None, Launch::Boot).await {
            Ok(vm) => {
                // A cold boot no longer maps the snapshot it was made from.
                if had_base {
                    self.collect_snapshots().await?;
                }
                Ok(vm)
            }
            Err(e) => {
                let why = e.to_string();
                let _ = self
                    .node
                    .transition(id, Event::BootFailed(why.clone()), |v| v.pid = None)
                    .await;
                Err(e)
            }
        }
    }

    /// Stops `caller`'s VM `name`: the agent syncs and powers off; QMP quit and then SIGKILL
    /// if it does not.
    pub async fn stop(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<Vm, ApiError> {
        if let Some(vm) = self.elsewhere(caller, name, Life::Stop).await? {
            return vm.ok_or_else(|| ApiError::vm(name));
        }
        let vm = self.vm_for(caller, name).await?;
        check(&vm, &Event::Stop)?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let was = vm.state;
        // A paused VM's saved state is discarded: its next start boots afresh.
        let vm = self
            .node
            .transition(&vm.id, Event::Stop, |v| v.mem.saved = None)
            .await?;
        if was == VmState::Paused {
            self.node.discard_saved(&vm.id);
            return Ok(vm);
        }
        self.node.finish_stop(&vm.id).await
    }

    /// Deletes `caller`'s VM `name`, stopping it first; leaves no process, socket, disk or
    /// record behind.
    pub async fn delete(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<(), ApiError> {
        self.delete_as(caller, name, true).await
    }

    /// Deletes `caller`'s VM `name` without letting its guest shut down first (its QEMU is
    /// killed): for VMs whose disk goes with them anyway (E2B's kill).
    pub async fn discard(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<(), ApiError> {
        self.delete_as(caller, name, false).await
    }

    async fn delete_as(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        graceful: bool,
    ) -> Result<(), ApiError> {
        if self
            .elsewhere(caller, name, Life::Delete { graceful })
            .await?
            .is_some()
        {
            return Ok(());
        }
        let vm = self.vm_for(caller, name).await?;
        check(&vm, &Event::Delete)?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        self.delete_locked(&vm, graceful).await
    }

    /// Deletes `vm` (its lock held): the rest of [`Service::delete`], also the TTL's. With
    /// `graceful` the guest is asked to power off first.
    pub(crate) async fn delete_locked(
        self: &Arc<Self>,
        vm: &Vm,
        graceful: bool,
    ) -> Result<(), ApiError> {
        // Marked first: a delete that hutchd's crash interrupts is finished at the next start.
        let vm = self.node.transition(&vm.id, Event::Delete, |_| {}).await?;
        crate::crash::point("delete.marked");
        if let Some(h) = self.node.handle(&vm).filter(|_| graceful) {
            self.node.halt(&h).await;
        }
        self.node.destroy(&vm).await;
        crate::crash::point("delete.destroyed");
        self.records.delete_vm(&vm).await?;
        self.drop_lock(&vm.id);
        if vm.mem.base.is_some() || !vm.mem.layers.is_empty() {
            if graceful {
                self.collect_snapshots().await?;
            } else {
                // A discard answers at once: the snapshot files it may free are collected
                // meanwhile (collection waits for restores in progress, e.g. a pool's refill).
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.collect_snapshots().await {
                        tracing::warn!(error = %e, "collecting snapshot files after a discard");
                    }
                });
            }
        }
        Ok(())
    }
}
