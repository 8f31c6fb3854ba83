//! VM lifecycle on this node: create, start, stop, delete, exec, files, logs; re-attaching to
//! running VMs after a restart and noticing VMs whose QEMU died.
//!
//! The store says what exists; QEMU processes (not our children) are what runs. Every lifecycle
//! operation on one VM holds that VM's lock, so stop/start/delete never interleave.

use crate::agent::AgentClient;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::tenancy::{Admission, Ask};
use hutch_core::{image_env, names, Image, Vm, VmState};
use hutch_proto::{ExecRequest, Kind, Request, Response};
use hutch_store::{Store, IMAGES, VMS};
use hutch_vmm::{Accel, VmSpec, Vmm};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
}

pub struct Manager {
    pub cfg: NodeConfig,
    pub store: Store,
    pub images: hutch_image::ImageStore,
    pub(crate) vmm: Arc<dyn Vmm>,
    conns: Mutex<HashMap<String, Arc<AgentClient>>>,
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
}

fn one() -> u32 {
    1
}
fn default_mem() -> u64 {
    256
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

fn internal(e: impl std::fmt::Display) -> ApiError {
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
        }
    }

    pub fn host_mem_mib(&self) -> u64 {
        self.host_mem_mib
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        l.entry(name.to_string()).or_default().clone()
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
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

    /// Makes a new image from a running VM's changes since boot (a consistent snapshot: the
    /// guest's writable filesystem is frozen while it is read).
    pub async fn commit(
        &self,
        caller: &Caller,
        name: &str,
        reference: &str,
        comment: &str,
    ) -> Result<Image, ApiError> {
        hutch_image::normalize_ref(reference).map_err(|e| ApiError::Invalid(e.to_string()))?;
        let _ops = self.image_ops.read().await;
        let vm = self.get(name)?;
        let client = self.client(&vm)?;
        let base = self.image_of(&vm)?.ok_or_else(|| {
            ApiError::Conflict(format!("the image of {name} is no longer in the store"))
        })?;
        let tmp = self.images.tmp_dir()?;
        let tar = tmp.path().join("layer.tar");
        let mut f = tokio::fs::File::create(&tar).await.map_err(internal)?;
        // A guest cannot make the layer bigger than its disk (plus tar headers).
        let max = (vm.disk_gib.max(1) << 30).saturating_mul(2);
        self.export_changes(name, &client, &mut f, max).await?;
        drop(f);
        let reference = reference.to_string();
        let comment = comment.to_string();
        let img = tokio::task::block_in_place(|| {
            self.images.commit_layer(&base, &tar, &reference, &comment)
        })?;
        crate::crash::point("commit.built");
        let img = self.store_image(caller.owner(), img)?;
        tracing::info!(vm = name, image = %img.key(), digest = %img.digest, "committed");
        Ok(img)
    }

    /// Removes blobs and root filesystems no image or VM uses.
    pub async fn gc(&self) -> Result<hutch_image::GcStats, ApiError> {
        // Pulls, imports and commits in progress finish first; gc waits for them a bounded
        // time and then gives up rather than queueing every later pull behind it.
        let _ops = tokio::time::timeout(Duration::from_secs(60), self.image_ops.write())
            .await
            .map_err(|_| {
                ApiError::Conflict(
                    "image operations are in progress; try garbage collection again later".into(),
                )
            })?;
        let mut keep = std::collections::HashSet::new();
        for i in self.store.list::<Image>(IMAGES)? {
            keep.insert(i.digest);
            keep.insert(i.config_digest);
            keep.extend(i.layers);
        }
        for v in self.list()? {
            keep.insert(v.image_digest);
            keep.extend(v.image_config_digest);
            keep.extend(v.image_layers);
        }
        let st = tokio::task::block_in_place(|| self.images.gc(&keep))?;
        tracing::info!(?st, "garbage collection");
        Ok(st)
    }

    /// Pushes a stored image to `reference` (default: its own name).
    pub async fn push(
        &self,
        caller: &Caller,
        image: &str,
        reference: Option<&str>,
        insecure: bool,
        creds: Option<hutch_image::registry::Credentials>,
    ) -> Result<String, ApiError> {
        let img = self.image_for(caller, image)?;
        let target = reference.unwrap_or(&img.name).to_string();
        // Accounts push to public addresses only, unless the admin allowed private ones.
        let egress = hutch_image::Egress {
            allow_private: caller.admin || self.cfg.registry_allow_private,
            allow_addrs: Vec::new(),
        };
        Ok(self
            .images
            .push_with(
                &img,
                &target,
                insecure,
                creds,
                egress,
                hutch_image::Timeouts::default(),
            )
            .await?)
    }

    /// Pulls an image (one pull per reference at a time) and records it.
    pub async fn pull(
        &self,
        caller: &Caller,
        reference: &str,
        opts: hutch_image::PullOptions,
        progress: &mut (dyn FnMut(hutch_image::PullEvent) + Send),
    ) -> Result<Image, ApiError> {
        let r = hutch_image::registry::Reference::parse(reference)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        let owner = caller.owner();
        let lock = self.lock_for(&format!(
            "pull:{}",
            hutch_core::image_key(owner.as_deref(), &r.canonical())
        ));
        let _g = lock.lock().await;
        let _ops = self.image_ops.read().await;
        let img = self.images.pull(reference, &opts, progress).await?;
        crate::crash::point("pull.fetched");
        let img = self.store_image(owner, img)?;
        tracing::info!(image = %img.key(), digest = %img.digest, "pulled image");
        Ok(img)
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
        };
        // Admission and the name claim under one lock; the name is claimed in one store
        // transaction: of concurrent creates, one wins.
        let admit = self.admit_lock.lock().await;
        self.admit(
            vm.owner.as_deref(),
            Ask {
                vcpus: vm.vcpus,
                mem_mib: vm.mem_mib,
                disk_gib: vm.disk_gib,
                new: true,
            },
        )?;
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
            let us = t.elapsed().as_micros() as u64;
            self.store
                .update(VMS, &vm.key(), |v: &mut Vm| v.disk_us = Some(us))?;
            self.boot(&vm, &image).await
        }
        .await;
        match result {
            Ok(vm) => Ok(vm),
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
        self.store.update(VMS, &vm.key(), |v: &mut Vm| {
            v.pid = Some(proc_.pid);
            if v.state != VmState::Creating {
                v.state = VmState::Starting;
            }
            v.confinement = proc_.confinement.clone().or(v.confinement.take());
        })?;
        let agent_sock = spec.agent_socket();
        let connected = tokio::select! {
            r = AgentClient::connect(&agent_sock, self.cfg.boot_timeout) => r.map_err(ApiError::from),
            _ = self.wait_exit(&vm.id, proc_.pid) => Err(ApiError::Internal("QEMU exited during boot".into())),
        };
        let (client, ack) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = self.vmm.kill(&vm.id, proc_.pid);
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
        crate::crash::point("boot.connected");
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.id.clone(), client);
        let vm = self.store.update(VMS, &vm.key(), |v: &mut Vm| {
            v.state = VmState::Running;
            v.reason = None;
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
        tracing::info!(vm = %vm.name, pid = proc_.pid, boot_ms, "vm running");
        self.watch(vm.key(), vm.id.clone(), proc_.pid);
        Ok(vm)
    }

    /// Starts the image's Entrypoint + Cmd, detached, output to the console.
    async fn start_main(&self, vm: &Vm, image: &Image) -> Result<Vm, ApiError> {
        let c = &image.config;
        let argv: Vec<String> = c.entrypoint.iter().chain(c.cmd.iter()).cloned().collect();
        let client = self.client(vm)?;
        let r = Request::Exec(ExecRequest {
            argv,
            env: image_env(c, &vm.name),
            cwd: Some(c.working_dir.clone()).filter(|w| !w.is_empty()),
            user: Some(c.user.clone()).filter(|u| !u.is_empty()),
            stdin: false,
            timeout_ms: None,
            detach: true,
            tty: None,
        });
        let mut s = client.open(&r)?;
        let mut stderr = Vec::new();
        let pid = loop {
            let f = tokio::time::timeout(Duration::from_secs(30), s.rx.recv())
                .await
                .map_err(|_| internal("the agent did not start the main process"))?
                .ok_or(crate::agent::AgentError::Lost)?;
            if f.kind == Kind::Stderr {
                stderr.extend_from_slice(&f.payload);
                continue;
            }
            match f.parse::<Response>("response").map_err(internal)? {
                Response::Started { pid } => break pid,
                Response::Exited { code, .. } => {
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

    async fn wait_exit(&self, id: &str, pid: u32) {
        while self.vmm.is_alive(id, pid) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Follows a running VM's process; records it stopped (with why) when it goes away.
    fn watch(self: &Arc<Self>, name: String, id: String, pid: u32) {
        let me = self.clone();
        tokio::spawn(async move {
            me.wait_exit(&id, pid).await;
            me.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            let tail = me.console_text(&id, 512);
            let last = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string();
            let mine = std::cell::Cell::new(false);
            let _ = me.store.update(VMS, &name, |v: &mut Vm| {
                if v.id != id || v.pid != Some(pid) {
                    return;
                }
                mine.set(true);
                if matches!(
                    v.state,
                    VmState::Running | VmState::Starting | VmState::Creating
                ) {
                    v.reason = Some(if last.is_empty() {
                        "QEMU exited unexpectedly".into()
                    } else {
                        format!("QEMU exited unexpectedly; console: {last}")
                    });
                    tracing::warn!(vm = %name, "vm process exited unexpectedly");
                }
                // A delete in progress owns the record: it stays `deleting` (so a crash before
                // the delete finishes is finished at restart, not left as a stopped VM).
                if v.state != VmState::Deleting {
                    v.state = VmState::Stopped;
                }
                v.pid = None;
                v.main_pid = None;
            });
            if mine.get() {
                let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
            }
        });
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
            let _ = self.vmm.kill(&vm.id, pid);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.vmm.is_alive(&vm.id, pid) && Instant::now() < deadline {
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
        if from.state != VmState::Stopped {
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
            ..from.clone()
        };
        {
            let _admit = self.admit_lock.lock().await;
            self.admit(
                vm.owner.as_deref(),
                Ask {
                    vcpus: vm.vcpus,
                    mem_mib: vm.mem_mib,
                    disk_gib: vm.disk_gib,
                    new: true,
                },
            )?;
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

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let vm = self.get(name)?;
        if vm.state != VmState::Stopped {
            return Err(ApiError::Conflict(format!(
                "{name} is {}, not stopped",
                vm.state.as_str()
            )));
        }
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
        {
            let _admit = self.admit_lock.lock().await;
            self.admit(
                vm.owner.as_deref(),
                Ask {
                    vcpus: vm.vcpus,
                    mem_mib: vm.mem_mib,
                    disk_gib: vm.disk_gib,
                    new: false,
                },
            )?;
            self.store.update(VMS, name, |v: &mut Vm| {
                v.state = VmState::Starting;
                v.reason = None;
            })?;
        }
        match self.boot(&vm, &image).await {
            Ok(vm) => Ok(vm),
            Err(e) => {
                let _ = self.store.update(VMS, name, |v: &mut Vm| {
                    v.state = VmState::Stopped;
                    v.pid = None;
                    v.reason = Some(e.to_string());
                });
                Err(e)
            }
        }
    }

    /// Stops a VM: the agent syncs and powers off; QMP quit and then SIGKILL if it does not.
    pub async fn stop(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.stop_locked(name).await
    }

    async fn stop_locked(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        let vm = self.get(name)?;
        match vm.state {
            VmState::Stopped => {
                return Err(ApiError::Conflict(format!("{name} is already stopped")))
            }
            VmState::Creating | VmState::Deleting => {
                return Err(ApiError::Conflict(format!(
                    "{name} is {}",
                    vm.state.as_str()
                )))
            }
            _ => {}
        }
        self.store
            .update(VMS, name, |v: &mut Vm| v.state = VmState::Stopping)?;
        if let Some(pid) = vm.pid {
            self.halt(&vm, pid).await;
        }
        let (me, id) = (self.clone(), vm.id.clone());
        let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm.id);
        Ok(self.store.update(VMS, name, |v: &mut Vm| {
            v.state = VmState::Stopped;
            v.pid = None;
            v.main_pid = None;
            v.reason = None;
        })?)
    }

    async fn halt(&self, vm: &Vm, pid: u32) {
        let client = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vm.id)
            .cloned();
        if let Some(c) = client {
            if let Ok(mut s) = c.open(&Request::Shutdown) {
                let _ = tokio::time::timeout(Duration::from_secs(2), s.rx.recv()).await;
            }
        }
        let wait = |secs| {
            let deadline = Instant::now() + Duration::from_secs(secs);
            async move {
                while self.vmm.is_alive(&vm.id, pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                !self.vmm.is_alive(&vm.id, pid)
            }
        };
        if wait(10).await {
            return;
        }
        let qmp = self.vm_dir(&vm.id).join("run/qmp.sock");
        if let Ok(mut q) = hutch_vmm::qmp::QmpClient::connect(&qmp).await {
            let _ = q.quit().await;
        }
        if wait(3).await {
            return;
        }
        let _ = self.vmm.kill(&vm.id, pid);
        wait(5).await;
    }

    /// Deletes a VM, stopping it first; leaves no process, socket, disk or record behind.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.get(name)?;
        // Marked first: a delete that hutchd's crash interrupts is finished at the next start.
        let vm = self
            .store
            .update(VMS, name, |v: &mut Vm| v.state = VmState::Deleting)?;
        crate::crash::point("delete.marked");
        if let Some(pid) = vm.pid {
            self.halt(&vm, pid).await;
        }
        let me = self.clone();
        let vm2 = vm.clone();
        tokio::task::spawn_blocking(move || me.destroy(&vm2))
            .await
            .map_err(internal)?;
        crate::crash::point("delete.destroyed");
        self.store.delete(VMS, name)?;
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

    pub fn console_path(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    /// The last `max` bytes of the VM's console.
    /// The raw end of a VM's console (`hutch logs` shows it as the guest wrote it).
    pub fn console_tail(&self, id: &str, max: u64) -> String {
        read_tail(&self.console_path(id), max)
    }

    /// The end of a VM's console made safe to put in errors and `describe`.
    fn console_text(&self, id: &str, max: u64) -> String {
        hutch_core::clean_text(&read_tail(&self.console_path(id), max))
    }

    /// Keeps every console log under the configured size (QEMU appends with O_APPEND, so
    /// truncating in place is safe).
    pub fn trim_consoles(&self) {
        let Ok(vms) = self.store.list::<Vm>(VMS) else {
            return;
        };
        for vm in vms {
            if let Err(e) = trim_log(&self.console_path(&vm.id), self.cfg.console_max_bytes) {
                tracing::warn!(vm = %vm.name, error = %e, "trimming console log");
            }
        }
    }

    /// After a (re)start of hutchd: re-attach to every VM whose QEMU still runs; mark the others
    /// stopped with the reason.
    pub async fn reattach(self: &Arc<Self>) -> Result<(), ApiError> {
        self.migrate_keys()?;
        self.recover().await?;
        for vm in self.list()? {
            let alive = vm.pid.is_some_and(|p| self.vmm.is_alive(&vm.id, p));
            match (vm.state, alive) {
                (VmState::Stopped, _) => {}
                (_, true) => {
                    let pid = vm.pid.unwrap_or_default();
                    let sock = self.vm_dir(&vm.id).join("run/agent.sock");
                    match AgentClient::connect(&sock, self.cfg.boot_timeout).await {
                        Ok((c, ack)) => {
                            self.conns
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(vm.id.clone(), c);
                            self.store.update(VMS, &vm.key(), |v: &mut Vm| {
                                v.state = VmState::Running;
                                v.kernel = Some(hutch_core::clean_text(&ack.kernel));
                            })?;
                            tracing::info!(vm = %vm.name, pid, "re-attached to running vm");
                        }
                        Err(e) => {
                            tracing::warn!(vm = %vm.name, error = %e, "vm runs but its agent does not answer");
                        }
                    }
                    self.watch(vm.key(), vm.id.clone(), pid);
                }
                (state, false) => {
                    self.release_jail(&vm.id);
                    let reason = (state != VmState::Stopping)
                        .then(|| "QEMU exited while hutchd was not running".to_string());
                    tracing::warn!(vm = %vm.name, "vm process is gone; marking stopped");
                    self.store.update(VMS, &vm.key(), |v: &mut Vm| {
                        v.state = VmState::Stopped;
                        v.pid = None;
                        v.reason = reason.clone();
                    })?;
                }
            }
        }
        // Cgroups and jails of VMs that are gone (removed or crashed while hutchd was down).
        let keep: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|v| v.pid.is_some_and(|p| self.vmm.is_alive(&v.id, p)))
            .map(|v| v.id)
            .collect();
        if let Err(e) = self.vmm.reconcile(&keep) {
            tracing::warn!(error = %e, "reconciling VM cgroups and jails");
        }
        Ok(())
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

/// When `p` is over `max` bytes, keeps only its last `max / 2` bytes. The writer (QEMU) has the
/// file open with O_APPEND, so its next write lands at the new end.
pub fn trim_log(p: &Path, max: u64) -> std::io::Result<bool> {
    let size = match std::fs::metadata(p) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= max {
        return Ok(false);
    }
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(p)?;
    f.seek(SeekFrom::Start(size - max / 2))?;
    let mut keep = Vec::new();
    f.read_to_end(&mut keep)?;
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&keep)?;
    Ok(true)
}

fn read_tail(p: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(p) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut b = Vec::new();
    let _ = f.take(max).read_to_end(&mut b);
    String::from_utf8_lossy(&b).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_logs_stay_bounded_and_keep_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        assert!(!trim_log(&p, 100).unwrap(), "a missing log is fine");
        std::fs::write(&p, vec![b'a'; 80]).unwrap();
        assert!(!trim_log(&p, 100).unwrap());
        // An appending writer keeps writing at the end after a trim.
        let mut w = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        use std::io::Write;
        w.write_all(&[b'b'; 70]).unwrap();
        assert!(trim_log(&p, 100).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), vec![b'b'; 50]);
        w.write_all(b"end").unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 53);
        assert!(got.ends_with(b"bend"));
        assert_eq!(read_tail(&p, 4), "bend");
    }
}
