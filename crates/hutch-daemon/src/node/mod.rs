//! The node runtime: what runs VMs on this host. It owns the VM directories (writable disks,
//! runtime sockets, consoles, record copies), launches QEMU through the [`Vmm`] seam, connects
//! to each guest agent through the [`Connector`] seam, follows every QEMU process, halts and
//! destroys them, and re-attaches after a restart of hutchd (`recover.rs`).
//!
//! It decides nothing about who may do what: the control plane (`crate::service`) authorizes,
//! admits and records desired state, then asks the node to act. The node records what actually
//! happens (pids, boots, exits) through the lifecycle state machine, with compare-and-swap on the
//! VM's record, so a watch on the store sees every change. This is the seam where a cluster
//! splits control from nodes.

mod confine;
mod console;
pub mod migrate;
pub mod rebuild;
mod recover;
pub mod snap;
mod snap_copy;

pub use snap::{Launch, Restore};

pub use confine::JailOptions;
pub use console::trim_log;

use crate::agent::{Agent, AgentClient, AgentError};
use crate::error::ApiError;
use crate::records::Records;
use futures_util::future::BoxFuture;
use hutch_core::{image_env, Event, Image, Vm, VmState};
use hutch_proto::ExecRequest;
use hutch_vmm::{Accel, VmExit, VmHandle, VmSpec, Vmm};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the node needs from the daemon's configuration.
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

/// A connected agent and the guest kernel's release.
pub type Connected = (Arc<dyn Agent>, String);

/// How the node reaches a VM's guest agent once its QEMU runs: the agent socket (real), or an
/// in-memory agent (tests and the control-plane benchmark).
pub trait Connector: Send + Sync {
    /// Connects within `timeout`; the agent and the guest kernel's release.
    fn connect<'a>(
        &'a self,
        vm: &'a VmHandle,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Connected, AgentError>>;
}

/// The agent over the VM's virtio-serial socket.
pub struct SocketConnector;

impl Connector for SocketConnector {
    fn connect<'a>(
        &'a self,
        vm: &'a VmHandle,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Connected, AgentError>> {
        Box::pin(async move {
            let (c, ack) = AgentClient::connect(&vm.agent_socket(), timeout).await?;
            Ok((c as Arc<dyn Agent>, ack.kernel))
        })
    }
}

/// Fakes below the node, for unit tests of the service and the control-plane benchmark: every
/// VM a fake VMM runs gets an in-memory agent.
#[cfg(any(test, feature = "fakes"))]
pub mod fakes {
    use super::*;

    /// Hands every VM whose (fake) process is alive a new `FakeAgent`.
    pub struct FakeConnector {
        pub vmm: Arc<dyn Vmm>,
    }

    impl Connector for FakeConnector {
        fn connect<'a>(
            &'a self,
            vm: &'a VmHandle,
            _timeout: Duration,
        ) -> BoxFuture<'a, Result<Connected, AgentError>> {
            Box::pin(async move {
                if !self.vmm.is_alive(vm) {
                    return Err(AgentError::Lost);
                }
                let a: Arc<dyn Agent> = Arc::new(PowersOff {
                    inner: crate::agent::fake::FakeAgent::new(),
                    vmm: self.vmm.clone(),
                    vm: vm.clone(),
                });
                Ok((a, "6.1.0-fake".to_string()))
            })
        }
    }

    /// A `FakeAgent` whose `shutdown` ends its VM's fake process, as a guest powering off ends
    /// QEMU.
    struct PowersOff {
        inner: crate::agent::fake::FakeAgent,
        vmm: Arc<dyn Vmm>,
        vm: VmHandle,
    }

    use crate::agent::{
        ExecStream, FileRead, FileWrite, FsAnswer, FsRequest, Health, RestoreInfo, WatchStream,
    };

    impl Agent for PowersOff {
        fn exec(&self, req: ExecRequest) -> Result<ExecStream, AgentError> {
            self.inner.exec(req)
        }
        fn read_file(
            &self,
            path: &str,
            offset: u64,
            len: Option<u64>,
        ) -> Result<FileRead, AgentError> {
            self.inner.read_file(path, offset, len)
        }
        fn write_file(
            &self,
            path: &str,
            mode: Option<u32>,
            offset: Option<u64>,
        ) -> Result<FileWrite, AgentError> {
            self.inner.write_file(path, mode, offset)
        }
        fn export_changes(&self) -> Result<FileRead, AgentError> {
            self.inner.export_changes()
        }
        fn fs(&self, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
            self.inner.fs(req)
        }
        fn read_file_as(
            &self,
            user: &str,
            path: &str,
            offset: u64,
            len: Option<u64>,
        ) -> Result<FileRead, AgentError> {
            self.inner.read_file_as(user, path, offset, len)
        }
        fn write_file_as(
            &self,
            user: &str,
            path: &str,
            mode: Option<u32>,
            offset: Option<u64>,
        ) -> Result<FileWrite, AgentError> {
            self.inner.write_file_as(user, path, mode, offset)
        }
        fn fs_as(&self, user: &str, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
            self.inner.fs_as(user, req)
        }
        fn health(&self) -> BoxFuture<'_, Result<Health, AgentError>> {
            self.inner.health()
        }
        fn shutdown(&self) -> BoxFuture<'_, Result<(), AgentError>> {
            Box::pin(async move {
                self.inner.shutdown().await?;
                let _ = self.vmm.quit(&self.vm);
                Ok(())
            })
        }
        fn restored(&self, info: RestoreInfo) -> BoxFuture<'_, Result<(), AgentError>> {
            self.inner.restored(info)
        }
        fn watch(
            &self,
            path: &str,
            recursive: bool,
        ) -> BoxFuture<'_, Result<WatchStream, AgentError>> {
            self.inner.watch(path, recursive)
        }
        fn is_alive(&self) -> bool {
            self.vmm.is_alive(&self.vm)
        }
    }
}

pub struct Node {
    pub cfg: NodeConfig,
    pub records: Records,
    pub images: Arc<hutch_image::ImageStore>,
    pub vmm: Arc<dyn Vmm>,
    pub connector: Arc<dyn Connector>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The VM network (None: `hutchd --network off`, and tests with fakes).
    pub net: Option<Arc<crate::net::VmNetwork>>,
    conns: Mutex<HashMap<String, Arc<dyn Agent>>>,
    host_cpus: u32,
    host_mem_mib: u64,
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
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Runs a host tool; its stderr becomes the error.
pub(crate) fn run_tool(cmd: &mut std::process::Command) -> Result<(), ApiError> {
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

impl Node {
    pub fn new(
        cfg: NodeConfig,
        records: Records,
        images: Arc<hutch_image::ImageStore>,
        vmm: Arc<dyn Vmm>,
        connector: Arc<dyn Connector>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Node {
        Node {
            cfg,
            records,
            images,
            vmm,
            connector,
            metrics,
            net: None,
            conns: Mutex::new(HashMap::new()),
            host_cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            host_mem_mib: mem_total_mib(),
        }
    }

    pub fn host_cpus(&self) -> u32 {
        self.host_cpus
    }

    pub fn host_mem_mib(&self) -> u64 {
        self.host_mem_mib
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    /// The handle of `vm`'s QEMU process, when it has one.
    pub fn handle(&self, vm: &Vm) -> Option<VmHandle> {
        vm.pid.map(|pid| self.handle_of(&vm.id, pid))
    }

    pub fn handle_of(&self, id: &str, pid: u32) -> VmHandle {
        VmHandle {
            id: id.to_string(),
            pid,
            runtime_dir: self.vm_dir(id).join("run"),
        }
    }

    /// Moves VM `id` through the lifecycle state machine (`hutch_core::lifecycle`) and persists
    /// the new state, with `also` applied, by compare-and-swap on its record. A denied event
    /// changes nothing and is a 409.
    pub async fn transition(
        &self,
        id: &str,
        event: Event,
        mut also: impl FnMut(&mut Vm) + Send,
    ) -> Result<Vm, ApiError> {
        self.records
            .update_vm(id, |v: &mut Vm| {
                v.apply(&event)
                    .map_err(|d| ApiError::Conflict(format!("{} {d}", v.name)))?;
                also(v);
                Ok(())
            })
            .await
    }

    /// Changes VM `id`'s record without a state change.
    pub async fn update(
        &self,
        id: &str,
        mut f: impl FnMut(&mut Vm) + Send,
    ) -> Result<Vm, ApiError> {
        self.records
            .update_vm(id, |v: &mut Vm| {
                f(v);
                Ok::<(), ApiError>(())
            })
            .await
    }

    fn spec(&self, vm: &Vm, image: &Image, launch: &Launch) -> Result<VmSpec, ApiError> {
        let dir = self.vm_dir(&vm.id);
        let (memory, incoming) = self.memory_of(vm, launch)?;
        Ok(VmSpec {
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
            nic: self.nic(vm),
            cmdline_extra: self.guest_net_cmdline(vm),
            memory: Some(memory),
            backing: self.backing_of(vm)?,
            incoming,
            migration_in: false,
            hold: false,
        })
    }

    /// `vm`'s NIC, when it has a network.
    fn nic(&self, vm: &Vm) -> Option<hutch_vmm::Nic> {
        let p = self.net.as_ref()?.policy(vm)?;
        Some(hutch_vmm::Nic {
            tap: p.tap,
            mac: p.mac,
        })
    }

    /// The kernel command line words that configure `vm`'s network in the guest.
    fn guest_net_cmdline(&self, vm: &Vm) -> String {
        match (&self.net, vm.net.ipv4) {
            (Some(n), Some(ip)) if self.nic(vm).is_some() => {
                n.settings.cfg.guest_cmdline(ip, &n.settings.domain)
            }
            _ => String::new(),
        }
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

    /// Makes `vm`'s directory, writable disk (a fresh overlay, or for a clone a copy of
    /// `from`'s) and durable record copy (see rebuild.rs).
    pub fn create_disk(&self, vm: &Vm, from: Option<&str>) -> Result<(), ApiError> {
        let dir = self.vm_dir(&vm.id);
        std::fs::create_dir_all(dir.join("run")).map_err(internal)?;
        let base = match vm.mem.layers.first() {
            Some(l) => hutch_vmm::Layer {
                path: self.layer_path(l),
                format: hutch_vmm::DiskFormat::Qcow2,
            },
            None => hutch_vmm::Layer {
                path: self.disk_template(vm.disk_gib)?,
                format: hutch_vmm::DiskFormat::Raw,
            },
        };
        let src = from.map(|id| self.vm_dir(id).join("disk.qcow2"));
        self.vmm
            .create_disk(&dir.join("disk.qcow2"), &base, src.as_deref())?;
        self.save_record(vm, true)?;
        // The disk, the record copy, their directory and the VM's entry in vms/ reach the disk
        // before the VM counts as created.
        hutch_fs::durable::sync_dir(&dir).map_err(internal)?;
        hutch_fs::durable::sync_dir(&self.cfg.data_dir.join("vms")).map_err(internal)
    }

    /// Whether `vm`'s writable disk is there.
    pub fn has_disk(&self, vm: &Vm) -> bool {
        self.vm_dir(&vm.id).join("disk.qcow2").exists()
    }

    /// Launches QEMU for `vm` (in `creating`, `starting`, `resuming` or `snapshotting`) and
    /// waits for its agent; records the VM as running, with its pid, in one store transaction
    /// (a crash before that leaves an unrecorded QEMU, which recovery kills, and a VM that is
    /// undone or failed). On failure the process is gone and the error says why (the
    /// console's end). `disk_us`: how long making its disk took, recorded with it. `launch`:
    /// a boot, or a start from saved state (snap.rs).
    pub async fn boot(
        self: &Arc<Self>,
        vm: &Vm,
        image: &Image,
        disk_us: Option<u64>,
        launch: Launch,
    ) -> Result<Vm, ApiError> {
        let vm = &self.with_jail_uid(vm).await?;
        let mut net_us = None;
        if let Some(net) = self.net.clone() {
            let (v, t) = (vm.clone(), Instant::now());
            tokio::task::spawn_blocking(move || net.attach(&v))
                .await
                .map_err(internal)??;
            net_us = Some(t.elapsed().as_micros() as u64);
        }
        let spec = self.spec(vm, image, &launch)?;
        let t0 = Instant::now();
        let vmm = self.vmm.clone();
        let proc_ = tokio::task::spawn_blocking(move || vmm.launch(&spec))
            .await
            .map_err(internal)??;
        crate::crash::point("boot.launched");
        let launched_ms = t0.elapsed().as_millis() as u64;
        let h = proc_.handle.clone();
        let conf = proc_.confinement.clone();
        let connected = tokio::select! {
            r = self.connector.connect(&h, self.cfg.boot_timeout) => r.map_err(ApiError::from),
            _ = self.wait_exit(&h) => Err(ApiError::Internal("QEMU exited during boot".into())),
        };
        let (client, kernel) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = self.vmm.kill(&h);
                self.wait_gone(&h, Duration::from_secs(5)).await;
                let (me, id) = (self.clone(), vm.id.clone());
                let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
                let tail = self.console_text(&vm.id, 2048);
                return Err(ApiError::Internal(format!(
                    "{} did not boot: {e}; console ends with:\n{}",
                    vm.name,
                    tail.trim_end()
                )));
            }
        };
        let connected_ms = t0.elapsed().as_millis() as u64;
        if let Launch::Restore(r) = &launch {
            if let Err(e) = self.restored(vm, &client, r.new_identity).await {
                let _ = self.vmm.kill(&h);
                self.wait_gone(&h, Duration::from_secs(5)).await;
                let (me, id) = (self.clone(), vm.id.clone());
                let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
                return Err(e);
            }
        }
        let boot_ms = t0.elapsed().as_millis() as u64;
        tracing::debug!(vm = %vm.name, net_us, launched_ms, connected_ms, boot_ms, "boot phases");
        match launch {
            Launch::Boot => self.metrics.boots.observe(t0.elapsed()),
            Launch::Restore(_) => self.metrics.restores.observe(t0.elapsed()),
        }
        crate::crash::point("boot.connected");
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.id.clone(), client);
        let accel = self.cfg.accel.as_str().to_string();
        let kernel = hutch_core::clean_text(&kernel);
        let restored = matches!(launch, Launch::Restore(_));
        let event = if vm.state == VmState::Snapshotting {
            Event::Done
        } else {
            Event::Booted
        };
        let vm = self
            .transition(&vm.id, event, |v| {
                v.pid = Some(h.pid);
                v.mem.saved = None;
                if !restored {
                    // A cold boot runs on the VM's own (fresh) memory file.
                    v.mem.base = None;
                }
                if conf.is_some() {
                    v.confinement = conf.clone();
                }
                if disk_us.is_some() {
                    v.disk_us = disk_us;
                }
                v.net_us = net_us;
                v.started_at = Some(hutch_core::now());
                v.boot_ms = Some(boot_ms);
                v.kernel = Some(kernel.clone());
                v.accel = Some(accel.clone());
                v.clean_exit = false;
            })
            .await?;
        // A restored VM's main process runs on from the snapshot.
        let vm = if vm.run && !restored {
            self.start_main(&vm, image).await?
        } else {
            vm
        };
        let (me, v2) = (self.clone(), vm.clone());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.save_record(&v2, false)).await {
            tracing::warn!(vm = %vm.key(), error = %e, "saving the record copy");
        }
        tracing::info!(vm = %vm.name, pid = h.pid, boot_ms, "vm running");
        self.watch(h);
        Ok(vm)
    }

    /// Starts the image's Entrypoint + Cmd, detached, output to the console.
    async fn start_main(&self, vm: &Vm, image: &Image) -> Result<Vm, ApiError> {
        use crate::agent::ExecEvent;
        let c = &image.config;
        let argv: Vec<String> = c.entrypoint.iter().chain(c.cmd.iter()).cloned().collect();
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
        self.update(&vm.id, |v| v.main_pid = Some(pid)).await
    }

    async fn wait_exit(&self, h: &VmHandle) {
        self.vmm.wait(h).await
    }

    /// Waits up to `limit` for `h` to be gone; whether it is.
    async fn wait_gone(&self, h: &VmHandle, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.vmm.is_alive(h) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !self.vmm.is_alive(h)
    }

    /// Follows a VM's QEMU process; records its end (see [`Node::exited`]).
    pub(crate) fn watch(self: &Arc<Self>, h: VmHandle) {
        let me = self.clone();
        tokio::spawn(async move {
            me.wait_exit(&h).await;
            me.forget(&h.id);
            let how = {
                let (vmm, h2) = (me.vmm.clone(), h.clone());
                tokio::task::spawn_blocking(move || vmm.exit(&h2))
                    .await
                    .unwrap_or(VmExit::Unknown)
            };
            me.exited(&h, how).await;
        });
    }

    /// Records that process `h` is gone: `exited` in the state machine (failed when it should
    /// have run, the end of a stop, nothing during a delete), with how it ended. A record that
    /// moved on to another process is left alone.
    pub(crate) async fn exited(self: &Arc<Self>, h: &VmHandle, how: VmExit) {
        let Ok(Some(vm)) = self.records.vm_by_id(&h.id).await else {
            return;
        };
        // A record that moved on to another process, or (migrated) to another node.
        if vm.pid != Some(h.pid) || !self.records.is_local(&vm) {
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
        let clean = how == VmExit::Clean;
        let after = self
            .transition(&h.id, Event::Exited(reason), |v| {
                v.pid = None;
                v.main_pid = None;
                v.clean_exit = clean;
            })
            .await;
        let (me, id) = (self.clone(), h.id.clone());
        let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
        if let Ok(v) = after {
            if v.state == VmState::Failed {
                tracing::warn!(vm = %v.key(), reason = v.reason.as_deref().unwrap_or(""), "vm failed");
            }
        }
    }

    /// Stops `h`: the agent syncs and powers off; QMP quit after 10 s, SIGKILL after 3 more.
    pub async fn halt(&self, h: &VmHandle) {
        let client = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&h.id)
            .cloned();
        if let Some(c) = client {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.shutdown()).await;
        }
        if self.wait_gone(h, Duration::from_secs(10)).await {
            return;
        }
        let (vmm, h2) = (self.vmm.clone(), h.clone());
        let _ = tokio::task::spawn_blocking(move || vmm.quit(&h2)).await;
        if self.wait_gone(h, Duration::from_secs(3)).await {
            return;
        }
        let _ = self.vmm.kill(h);
        self.wait_gone(h, Duration::from_secs(5)).await;
    }

    /// Kills VM `vm`'s process (the one its record names now, or `vm.pid`), frees its
    /// confinement and removes its directory.
    pub async fn destroy(self: &Arc<Self>, vm: &Vm) {
        let pid = match self.records.vm_by_id(&vm.id).await {
            Ok(Some(v)) => v.pid.or(vm.pid),
            _ => vm.pid,
        };
        if let Some(pid) = pid {
            let h = self.handle_of(&vm.id, pid);
            let _ = self.vmm.kill(&h);
            self.wait_gone(&h, Duration::from_secs(5)).await;
        }
        self.forget(&vm.id);
        let (me, id, v) = (self.clone(), vm.id.clone(), vm.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(net) = &me.net {
                net.detach(&v);
            }
            me.release_jail(&id);
            let _ = std::fs::remove_dir_all(me.vm_dir(&id));
        })
        .await;
    }

    /// Drops the agent connection of VM `id`.
    pub(crate) fn forget(&self, id: &str) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The agent of running VM `vm`.
    pub fn client(&self, vm: &Vm) -> Result<Arc<dyn Agent>, ApiError> {
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
