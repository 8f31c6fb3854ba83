//! VM lifecycle on this node: create, start, stop, delete, exec, files, logs; re-attaching to
//! running VMs after a restart and noticing VMs whose QEMU died.
//!
//! The store says what exists; QEMU processes (not our children) are what runs. Every lifecycle
//! operation on one VM holds that VM's lock, so stop/start/delete never interleave.

use crate::agent::AgentClient;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::tenancy::{Admission, Ask};
use hutch_core::{image_env, names, Event, Image, Vm, VmState};
use hutch_proto::ExecRequest;
use hutch_store::{Store, IMAGES, VMS};
use hutch_vmm::{Accel, VmExit, VmHandle, VmSpec, Vmm};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the manager needs from the daemon's configuration.
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub bundle: hutch_guest::BootBundle,
    pub accel: Accel,
    pub boot_timeout: Duration,
    pub default_disk_gib: u64,
    pub console_max_bytes: u64,
    /// Confinement: the uid range VMs get their own uid from (base, count); None: off.
    pub jail_uids: Option<(u32, u32)>,
    /// Non-admin accounts may pull from loopback, link-local and private addresses.
    pub registry_allow_private: bool,
    /// Largest upload (file PUT, image archive) in bytes.
    pub max_upload_bytes: u64,
    /// QEMU's version, for `hutch status`.
    pub qemu_version: String,
}

pub struct Manager {
    pub cfg: NodeConfig,
    pub store: Store,
    pub images: hutch_image::ImageStore,
    pub(crate) vmm: Arc<dyn Vmm>,
    pub(crate) conns: Mutex<HashMap<String, Arc<AgentClient>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    host_cpus: u32,
    host_mem_mib: u64,
    /// Pulls, imports and commits hold it shared; garbage collection holds it exclusively, so it
    /// never deletes the blobs of an image still being made.
    pub image_ops: tokio::sync::RwLock<()>,
    pub tokens: crate::auth::Tokens,
    pub admission: Admission,
    /// Held from an admission check until the admitted VM's record counts (see `admit`).
    admit_lock: tokio::sync::Mutex<()>,
    /// Lifecycle events, published after each persisted change.
    pub events: crate::events::EventBus,
    pub metrics: crate::metrics::Metrics,
}

/// A request to create a VM.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: Option<String>,
    pub image: String,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    pub disk_gib: Option<u64>,
    /// Run the image's Entrypoint + Cmd as the VM's main process.
    #[serde(default)]
    pub run: bool,
    /// What happens when its QEMU exits without `hutch stop` (default: no).
    #[serde(default)]
    pub restart: hutch_core::RestartPolicy,
}

/// The defaults of a create, the one place they live (REST, SSH and the CLI all use them).
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEM_MIB: u64 = 256;

fn one() -> u32 {
    DEFAULT_VCPUS
}
fn default_mem() -> u64 {
    DEFAULT_MEM_MIB
}

impl Default for CreateVm {
    fn default() -> Self {
        CreateVm {
            name: None,
            image: String::new(),
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            disk_gib: None,
            run: false,
            restart: Default::default(),
        }
    }
}

/// A request to run a process in a VM.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecVm {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: HashMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Standard input, base64.
    pub stdin: Option<String>,
    pub timeout_secs: Option<u64>,
    /// Run on a terminal of this size (SSH sessions with a PTY).
    #[serde(skip)]
    pub tty: Option<hutch_proto::TtySize>,
    /// Keep stdin open for streaming (SSH sessions) instead of sending `stdin` whole.
    #[serde(skip)]
    pub stream_stdin: bool,
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

impl Manager {
    pub fn new(
        cfg: NodeConfig,
        store: Store,
        images: hutch_image::ImageStore,
        vmm: Arc<dyn Vmm>,
        tokens: crate::auth::Tokens,
    ) -> Manager {
        Manager {
            cfg,
            store,
            images,
            vmm,
            conns: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            host_cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            host_mem_mib: mem_total_mib(),
            image_ops: tokio::sync::RwLock::new(()),
            tokens,
            admission: Admission::default(),
            admit_lock: tokio::sync::Mutex::new(()),
            events: Default::default(),
            metrics: Default::default(),
        }
    }

    pub fn host_mem_mib(&self) -> u64 {
        self.host_mem_mib
    }

    pub fn host_cpus(&self) -> u32 {
        self.host_cpus
    }

    pub(crate) fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        l.entry(name.to_string()).or_default().clone()
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    /// The handle of `vm`'s QEMU process, when it has one.
    pub fn handle(&self, vm: &Vm) -> Option<VmHandle> {
        vm.pid.map(|pid| VmHandle {
            id: vm.id.clone(),
            pid,
            runtime_dir: self.vm_dir(&vm.id).join("run"),
        })
    }

    fn spec(&self, vm: &Vm, image: &Image) -> VmSpec {
        let dir = self.vm_dir(&vm.id);
        VmSpec {
            id: vm.id.clone(),
            hostname: vm.name.clone(),
            vcpus: vm.vcpus,
            mem_mib: vm.mem_mib,
            kernel: self.cfg.bundle.kernel.clone(),
            initrd: self.cfg.bundle.initrd.clone(),
            image_disk: self.images.rootfs_path(&image.digest),
            data_disk: dir.join("disk.qcow2"),
            runtime_dir: dir.join("run"),
            console_log: dir.join("console.log"),
            accel: self.cfg.accel,
            jail_uid: vm.confinement.as_ref().map(|c| c.uid),
        }
    }

    pub fn get(&self, name: &str) -> Result<Vm, ApiError> {
        self.store
            .get::<Vm>(VMS, name)?
            .ok_or_else(|| ApiError::vm(name))
    }

    /// Moves VM `key` through the lifecycle state machine (hutch_core::lifecycle) and persists
    /// the new state, with `also` applied to the record, in one store transaction. A denied
    /// event changes nothing and is a 409.
    pub(crate) fn transition(
        &self,
        key: &str,
        event: Event,
        also: impl FnOnce(&mut Vm),
    ) -> Result<Vm, ApiError> {
        let denied = std::cell::RefCell::new(None);
        let from = std::cell::Cell::new(VmState::Creating);
        let vm = self.store.update(VMS, key, |v: &mut Vm| {
            from.set(v.state);
            match v.apply(&event) {
                Ok(_) => also(v),
                Err(d) => *denied.borrow_mut() = Some(format!("{} {d}", v.name)),
            }
        })?;
        if let Some(m) = denied.into_inner() {
            return Err(ApiError::Conflict(m));
        }
        self.events.transition(&vm, from.get(), &event);
        Ok(vm)
    }

    /// Refuses `event` at once when `vm`'s current state does not allow it (before waiting for
    /// the VM's lock), so a second operation on a VM in a transitional state is a 409, not a wait.
    pub(crate) fn check(vm: &Vm, event: &Event) -> Result<(), ApiError> {
        vm.state
            .on(event)
            .map(|_| ())
            .map_err(|d| ApiError::Conflict(format!("{} {d}", vm.name)))
    }

    pub fn list(&self) -> Result<Vec<Vm>, ApiError> {
        let mut v: Vec<Vm> = self.store.list(VMS)?;
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
        Ok(v)
    }

    /// The image a VM was made from: by the name the VM records (its store key), else (the name
    /// was deleted or moved) any image with the same manifest digest.
    pub(crate) fn image_of(&self, vm: &Vm) -> Result<Option<Image>, ApiError> {
        if let Some(i) = vm.recorded_image() {
            return Ok(Some(i));
        }
        if let Some(i) = self.store.get::<Image>(IMAGES, &vm.image)? {
            if i.digest == vm.image_digest {
                return Ok(Some(i));
            }
        }
        let all = self.store.list::<Image>(IMAGES)?;
        Ok(all.into_iter().find(|i| i.digest == vm.image_digest))
    }

    /// The empty ext4 filesystem every VM's writable disk starts as (a qcow2 overlay on it).
    pub fn disk_template(&self, gib: u64) -> Result<PathBuf, ApiError> {
        let dir = self.cfg.data_dir.join("templates");
        let p = dir.join(format!("data-{gib}G.ext4"));
        if p.exists() {
            return Ok(p);
        }
        std::fs::create_dir_all(&dir).map_err(internal)?;
        let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(internal)?;
        tmp.as_file().set_len(gib << 30).map_err(internal)?;
        run_tool(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "hutch-data"])
                .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
                .arg(tmp.path()),
        )?;
        hutch_fs::durable::sync_file(tmp.as_file()).map_err(internal)?;
        tmp.persist(&p).map_err(|e| internal(e.error))?;
        hutch_fs::durable::sync_dir(&dir).map_err(internal)?;
        Ok(p)
    }

    fn create_disk(&self, vm: &Vm) -> Result<(), ApiError> {
        let template = self.disk_template(vm.disk_gib)?;
        let dir = self.vm_dir(&vm.id);
        std::fs::create_dir_all(dir.join("run")).map_err(internal)?;
        run_tool(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&template)
                .arg(dir.join("disk.qcow2")),
        )?;
        // The disk, its directory and the VM's entry in vms/ reach the disk before the VM
        // counts as created.
        hutch_fs::durable::sync_path(&dir.join("disk.qcow2")).map_err(internal)?;
        hutch_fs::durable::sync_dir(&self.cfg.data_dir.join("vms")).map_err(internal)
    }

    fn validate(&self, req: &CreateVm) -> Result<(), ApiError> {
        if let Some(n) = &req.name {
            names::validate_name(n).map_err(ApiError::Invalid)?;
        }
        if req.vcpus == 0 || req.vcpus > self.host_cpus {
            return Err(ApiError::Invalid(format!(
                "vcpus must be between 1 and {} (the host's CPUs), not {}",
                self.host_cpus, req.vcpus
            )));
        }
        if req.mem_mib < 64 || req.mem_mib > self.host_mem_mib {
            return Err(ApiError::Invalid(format!(
                "mem_mib must be between 64 and {} (the host's memory), not {}",
                self.host_mem_mib, req.mem_mib
            )));
        }
        if let Some(d) = req.disk_gib {
            if d == 0 || d > 1024 {
                return Err(ApiError::Invalid(format!(
                    "disk_gib must be between 1 and 1024, not {d}"
                )));
            }
        }
        let dir = self.vm_dir("000000000000").join("run/agent.sock");
        if dir.as_os_str().len() >= 100 {
            return Err(ApiError::Internal(format!(
                "data dir {} is too long for unix socket paths",
                self.cfg.data_dir.display()
            )));
        }
        Ok(())
    }

    /// Creates and boots a VM; on any failure nothing of it remains.
    pub async fn create(self: &Arc<Self>, caller: &Caller, req: CreateVm) -> Result<Vm, ApiError> {
        let t0 = Instant::now();
        self.validate(&req)?;
        let image = self.image_for(caller, &req.image)?;
        if req.run && image.config.entrypoint.is_empty() && image.config.cmd.is_empty() {
            return Err(ApiError::Invalid(format!(
                "image {} has no Entrypoint or Cmd to --run",
                image.name
            )));
        }
        let me = self.clone();
        let img = image.clone();
        tokio::task::spawn_blocking(move || me.images.build_rootfs(&img.digest, &img.layers))
            .await
            .map_err(internal)??;
        let mut vm = Vm {
            id: names::random_id(),
            name: String::new(),
            image: image.name.clone(),
            image_digest: image.digest.clone(),
            vcpus: req.vcpus,
            mem_mib: req.mem_mib,
            disk_gib: req.disk_gib.unwrap_or(self.cfg.default_disk_gib),
            state: VmState::Creating,
            reason: None,
            pid: None,
            accel: Some(self.cfg.accel.as_str().into()),
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
        };
        // Admission and the name claim under one lock; the name is claimed in one store
        // transaction: of concurrent creates, one wins.
        let admit = self.admit_lock.lock().await;
        self.admit(vm.owner.as_deref(), Ask::of(&vm, true))?;
        match &req.name {
            Some(n) => {
                vm.name = n.clone();
                self.store.insert_new(VMS, &vm.key(), &vm)?;
            }
            None => {
                let mut tries = 0;
                loop {
                    vm.name = names::random_name();
                    match self.store.insert_new(VMS, &vm.key(), &vm) {
                        Ok(()) => break,
                        Err(hutch_store::StoreError::Exists { .. }) if tries < 50 => tries += 1,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        drop(admit);
        let lock = self.lock_for(&vm.key());
        let _g = lock.lock().await;
        let result = async {
            crate::crash::point("create.registered");
            let t = Instant::now();
            tokio::task::block_in_place(|| self.create_disk(&vm))?;
            crate::crash::point("create.disk");
            self.save_record(&vm)?;
            let us = t.elapsed().as_micros() as u64;
            self.store
                .update(VMS, &vm.key(), |v: &mut Vm| v.disk_us = Some(us))?;
            self.boot(&vm, &image).await
        }
        .await;
        match result {
            Ok(vm) => {
                self.metrics.creates.observe(t0.elapsed());
                Ok(vm)
            }
            Err(e) => {
                tokio::task::block_in_place(|| self.destroy(&vm));
                let _ = self.store.delete(VMS, &vm.key());
                Err(e)
            }
        }
    }

    /// Launches QEMU for `vm` and waits for its agent; records the VM as running.
    async fn boot(self: &Arc<Self>, vm: &Vm, image: &Image) -> Result<Vm, ApiError> {
        let vm = &self.with_jail_uid(vm)?;
        let spec = self.spec(vm, image);
        let t0 = Instant::now();
        let vmm = self.vmm.clone();
        let spec2 = spec.clone();
        let proc_ = tokio::task::spawn_blocking(move || vmm.launch(&spec2))
            .await
            .map_err(internal)??;
        crate::crash::point("boot.launched");
        let h = proc_.handle.clone();
        self.store.update(VMS, &vm.key(), |v: &mut Vm| {
            v.pid = Some(h.pid);
            v.confinement = proc_.confinement.clone().or(v.confinement.take());
        })?;
        let agent_sock = spec.agent_socket();
        let connected = tokio::select! {
            r = AgentClient::connect(&agent_sock, self.cfg.boot_timeout) => r.map_err(ApiError::from),
            _ = self.wait_exit(&h) => Err(ApiError::Internal("QEMU exited during boot".into())),
        };
        let (client, ack) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = self.vmm.kill(&h);
                let me = self.clone();
                let id = vm.id.clone();
                let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
                let tail = self.console_text(&vm.id, 2048);
                return Err(ApiError::Internal(format!(
                    "{} did not boot: {e}; console ends with:\n{}",
                    vm.name,
                    tail.trim_end()
                )));
            }
        };
        let boot_ms = t0.elapsed().as_millis() as u64;
        self.metrics.boots.observe(t0.elapsed());
        crate::crash::point("boot.connected");
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.id.clone(), client);
        let vm = self.transition(&vm.key(), Event::Booted, |v| {
            v.started_at = Some(hutch_core::now());
            v.boot_ms = Some(boot_ms);
            v.kernel = Some(hutch_core::clean_text(&ack.kernel));
            v.accel = Some(self.cfg.accel.as_str().into());
        })?;
        let vm = if vm.run {
            self.start_main(&vm, image).await?
        } else {
            vm
        };
        if let Err(e) = self.save_record(&vm) {
            tracing::warn!(vm = %vm.key(), error = %e, "saving the record copy");
        }
        tracing::info!(vm = %vm.name, pid = h.pid, boot_ms, "vm running");
        self.watch(vm.key(), h);
        Ok(vm)
    }

    /// Starts the image's Entrypoint + Cmd, detached, output to the console.
    async fn start_main(&self, vm: &Vm, image: &Image) -> Result<Vm, ApiError> {
        let c = &image.config;
        let argv: Vec<String> = c.entrypoint.iter().chain(c.cmd.iter()).cloned().collect();
        use crate::agent::{Agent as _, ExecEvent};
        let client = self.client(vm)?;
        let mut s = client.exec(ExecRequest {
            argv,
            env: image_env(c, &vm.name),
            cwd: Some(c.working_dir.clone()).filter(|w| !w.is_empty()),
            user: Some(c.user.clone()).filter(|u| !u.is_empty()),
            stdin: false,
            timeout_ms: None,
            detach: true,
            tty: None,
        })?;
        let mut stderr = Vec::new();
        let pid = loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), s.next())
                .await
                .map_err(|_| internal("the agent did not start the main process"))??;
            match ev {
                Some(ExecEvent::Stderr(b)) => stderr.extend_from_slice(&b),
                Some(ExecEvent::Started { pid }) => break pid,
                Some(ExecEvent::Exited { code, .. }) => {
                    return Err(ApiError::Invalid(format!(
                        "the main process of {} could not start (exit {}): {}",
                        vm.name,
                        code.unwrap_or(-1),
                        hutch_core::clean_text(String::from_utf8_lossy(&stderr).trim())
                    )))
                }
                other => return Err(internal(format!("unexpected answer {other:?}"))),
            }
        };
        Ok(self
            .store
            .update(VMS, &vm.key(), |v: &mut Vm| v.main_pid = Some(pid))?)
    }

    async fn wait_exit(&self, h: &VmHandle) {
        while self.vmm.is_alive(h) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Follows a running VM's process. When it goes away without a stop or delete asking for it,
    /// the VM becomes `failed` (with the reason) and its restart policy decides what next.
    pub(crate) fn watch(self: &Arc<Self>, key: String, h: VmHandle) {
        let me = self.clone();
        tokio::spawn(async move {
            me.wait_exit(&h).await;
            me.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&h.id);
            let how = {
                let (vmm, h2) = (me.vmm.clone(), h.clone());
                tokio::task::spawn_blocking(move || vmm.exit(&h2))
                    .await
                    .unwrap_or(VmExit::Unknown)
            };
            me.exited(&key, &h, how).await;
        });
    }

    /// Records that the process `h` of VM `key` is gone (see [`Manager::watch`]).
    pub(crate) async fn exited(self: &Arc<Self>, key: &str, h: &VmHandle, how: VmExit) {
        let Ok(Some(vm)) = self.store.get::<Vm>(VMS, key) else {
            return;
        };
        if vm.id != h.id || vm.pid != Some(h.pid) {
            return;
        }
        let tail = self.console_text(&h.id, 512);
        let last = tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        let what = match &how {
            VmExit::Clean => "the guest powered off".to_string(),
            VmExit::Crashed(why) => why.clone(),
            VmExit::Unknown => "QEMU exited unexpectedly".to_string(),
        };
        let reason = if last.is_empty() {
            what
        } else {
            format!("{what}; console: {last}")
        };
        let after = self.transition(key, Event::Exited(reason), |v| {
            v.pid = None;
            v.main_pid = None;
        });
        let (me, id) = (self.clone(), h.id.clone());
        let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
        if let Ok(v) = after {
            if v.state == VmState::Failed {
                tracing::warn!(vm = %key, reason = v.reason.as_deref().unwrap_or(""), "vm failed");
                self.consider_restart(v, how == VmExit::Clean);
            }
        }
    }

    /// Kills the VM's process (if any) and removes its directory.
    pub(crate) fn destroy(&self, vm: &Vm) {
        if let Some(pid) = self
            .store
            .get::<Vm>(VMS, &vm.key())
            .ok()
            .flatten()
            .and_then(|v| v.pid)
            .or(vm.pid)
        {
            let h = VmHandle {
                id: vm.id.clone(),
                pid,
                runtime_dir: self.vm_dir(&vm.id).join("run"),
            };
            let _ = self.vmm.kill(&h);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.vmm.is_alive(&h) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm.id);
        self.release_jail(&vm.id);
        let _ = std::fs::remove_dir_all(self.vm_dir(&vm.id));
    }

    /// Makes `dst` from a copy of `src`'s disk (boxcutter's `cp`) and boots it. `src` must be
    /// stopped, so its disk is consistent; the copy keeps its image, size and owner.
    pub async fn clone_vm(
        self: &Arc<Self>,
        src: &str,
        dst: Option<String>,
    ) -> Result<Vm, ApiError> {
        let lock = self.lock_for(src);
        let _g = lock.lock().await;
        let from = self.get(src)?;
        // Stopped or failed: no process writes the disk, so it is consistent.
        if !matches!(from.state, VmState::Stopped | VmState::Failed) {
            return Err(ApiError::Conflict(format!(
                "{src} is {}; stop it first to copy it",
                from.state.as_str()
            )));
        }
        let image = self.image_of(&from)?.ok_or_else(|| {
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
            ..from.clone()
        };
        {
            let _admit = self.admit_lock.lock().await;
            self.admit(vm.owner.as_deref(), Ask::of(&vm, true))?;
            self.store.insert_new(VMS, &vm.key(), &vm)?;
        }
        let result = async {
            let dir = self.vm_dir(&vm.id);
            std::fs::create_dir_all(dir.join("run")).map_err(internal)?;
            let t = Instant::now();
            tokio::task::block_in_place(|| {
                run_tool(
                    std::process::Command::new("cp")
                        .arg("--sparse=always")
                        .arg(self.vm_dir(&from.id).join("disk.qcow2"))
                        .arg(dir.join("disk.qcow2")),
                )
            })?;
            hutch_fs::durable::sync_path(&dir.join("disk.qcow2")).map_err(internal)?;
            crate::crash::point("clone.copied");
            let us = t.elapsed().as_micros() as u64;
            vm = self
                .store
                .update(VMS, &vm.key(), |v: &mut Vm| v.disk_us = Some(us))?;
            self.boot(&vm, &image).await
        }
        .await;
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                tokio::task::block_in_place(|| self.destroy(&vm));
                let _ = self.store.delete(VMS, &vm.key());
                Err(e)
            }
        }
    }

    /// Starts a stopped or failed VM.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        Self::check(&self.get(name)?, &Event::Start)?;
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.start_locked(name).await
    }

    pub(crate) async fn start_locked(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        let vm = self.get(name)?;
        Self::check(&vm, &Event::Start)?;
        let image = self.image_of(&vm)?;
        let image = image.ok_or_else(|| {
            ApiError::Conflict(format!(
                "image {} of {name} is no longer in the store",
                vm.image
            ))
        })?;
        if !self.vm_dir(&vm.id).join("disk.qcow2").exists() {
            return Err(ApiError::Conflict(format!("the disk of {name} is missing")));
        }
        let vm = {
            let _admit = self.admit_lock.lock().await;
            self.admit(vm.owner.as_deref(), Ask::of(&vm, false))?;
            self.transition(name, Event::Start, |_| {})?
        };
        match self.boot(&vm, &image).await {
            Ok(vm) => Ok(vm),
            Err(e) => {
                let _ = self.transition(name, Event::BootFailed(e.to_string()), |v| {
                    v.pid = None;
                });
                Err(e)
            }
        }
    }

    /// Stops a VM: the agent syncs and powers off; QMP quit and then SIGKILL if it does not.
    pub async fn stop(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        Self::check(&self.get(name)?, &Event::Stop)?;
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.stop_locked(name).await
    }

    pub(crate) async fn stop_locked(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        self.transition(name, Event::Stop, |_| {})?;
        self.finish_stop(name).await
    }

    /// Halts a `stopping` VM's process and records it stopped.
    pub(crate) async fn finish_stop(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        let vm = self.get(name)?;
        if let Some(h) = self.handle(&vm) {
            self.halt(&h).await;
        }
        let (me, id) = (self.clone(), vm.id.clone());
        let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm.id);
        // The watch may have recorded the exit already (stopping + exited = stopped).
        let now = self.get(name)?;
        if now.state != VmState::Stopping {
            return Ok(now);
        }
        self.transition(name, Event::Halted, |v| {
            v.pid = None;
            v.main_pid = None;
        })
    }

    async fn halt(&self, h: &VmHandle) {
        let client = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&h.id)
            .cloned();
        if let Some(c) = client {
            use crate::agent::Agent as _;
            let _ = tokio::time::timeout(Duration::from_secs(2), c.shutdown()).await;
        }
        let wait = |secs| {
            let deadline = Instant::now() + Duration::from_secs(secs);
            async move {
                while self.vmm.is_alive(h) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                !self.vmm.is_alive(h)
            }
        };
        if wait(10).await {
            return;
        }
        let (vmm, h2) = (self.vmm.clone(), h.clone());
        let _ = tokio::task::spawn_blocking(move || vmm.quit(&h2)).await;
        if wait(3).await {
            return;
        }
        let _ = self.vmm.kill(h);
        wait(5).await;
    }

    /// Deletes a VM, stopping it first; leaves no process, socket, disk or record behind.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        Self::check(&self.get(name)?, &Event::Delete)?;
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        // Marked first: a delete that hutchd's crash interrupts is finished at the next start.
        let vm = self.transition(name, Event::Delete, |_| {})?;
        crate::crash::point("delete.marked");
        if let Some(h) = self.handle(&vm) {
            self.halt(&h).await;
        }
        let me = self.clone();
        let vm2 = vm.clone();
        tokio::task::spawn_blocking(move || me.destroy(&vm2))
            .await
            .map_err(internal)?;
        crate::crash::point("delete.destroyed");
        self.store.delete(VMS, name)?;
        self.events.publish(&vm, "deleted", None);
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        Ok(())
    }

    pub(crate) fn client(&self, vm: &Vm) -> Result<Arc<AgentClient>, ApiError> {
        if vm.state != VmState::Running {
            return Err(ApiError::Conflict(format!(
                "{} is {}; run: hutch start {}",
                vm.name,
                vm.state.as_str(),
                vm.name
            )));
        }
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vm.id)
            .filter(|c| c.is_alive())
            .cloned()
            .ok_or_else(|| ApiError::Conflict(format!("the agent of {} is not connected", vm.name)))
    }
}

/// Runs a host tool; its stderr becomes the error.
fn run_tool(cmd: &mut std::process::Command) -> Result<(), ApiError> {
    let tool = cmd.get_program().to_string_lossy().to_string();
    let o = cmd
        .output()
        .map_err(|e| internal(format!("running {tool}: {e}")))?;
    if !o.status.success() {
        return Err(internal(format!(
            "{tool}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}
