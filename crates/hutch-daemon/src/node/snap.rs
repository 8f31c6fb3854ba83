//! Memory snapshots on this node (docs/snapshots.md): where a VM's RAM and disk layers live,
//! pausing a VM to files and resuming it, freezing a running VM into a snapshot that new VMs
//! start from, and collecting the files no record needs any more.
//!
//! Files, under the data dir:
//! ```text
//! vms/ID/mem              the VM's own memory file (guest RAM, mapped shared)
//! vms/ID/state            its saved device state while it is paused
//! vms/ID/disk.qcow2       its writable disk, over its frozen layers
//! layers/LAYER.qcow2      a frozen disk layer (read-only), over the next one down
//! snapshots/ID/state      a snapshot's device state (and RAM when it is not in a memory file)
//! snapshots/ID/mem        a snapshot's memory file (read-only; VMs map it copy-on-write)
//! ```
//! A VM's record says which layers are under its disk and which snapshot's memory it maps
//! (`Vm::mem`); nothing is read from the qcow2 headers, which a VM's QEMU can write.

use super::{internal, Node};
use crate::agent::Agent;
use crate::error::ApiError;
use hutch_core::snapshot::{SavedState, Snapshot};
use hutch_core::{Event, Image, Vm, VmState};
use hutch_vmm::{DiskFormat, Incoming, Layer, Memory};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a VM's QEMU starts.
#[derive(Debug, Clone)]
pub enum Launch {
    /// A cold boot of the kernel.
    Boot,
    /// From saved state.
    Restore(Restore),
}

/// A start from saved state: the VM's own (a resume) or a snapshot's.
#[derive(Debug, Clone)]
pub struct Restore {
    pub state: PathBuf,
    /// The RAM is in a memory file (the state holds devices only).
    pub ram_in_file: bool,
    /// The VM is a copy (a fork, a restore of a snapshot into a new VM): it gets its own
    /// hostname, machine id and network in the guest.
    pub new_identity: bool,
}

/// The most frozen layers a disk may sit on (QEMU gets each as a descriptor).
pub const MAX_LAYERS: usize = hutch_vmm::cmdline::MAX_LAYERS;

fn io(what: String) -> impl FnOnce(std::io::Error) -> ApiError {
    move |e| ApiError::Internal(format!("{what}: {e}"))
}

/// Makes `p` read-only for everyone and hutchd's own: frozen files never change again, and the
/// VM whose QEMU wrote it (its uid owned it) can no longer change its mode. The data dir is
/// 0700, so only hutchd reaches them by path; a confined QEMU reopens a memory file through
/// the descriptor it was handed.
pub(super) fn freeze_mode(p: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if let Err(e) = std::os::unix::fs::chown(p, Some(euid), Some(euid)) {
        return Err(io(format!("chown {}", p.display()))(e));
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444))
        .map_err(io(format!("chmod {}", p.display())))
}

impl Node {
    pub fn layer_path(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("layers").join(format!("{id}.qcow2"))
    }

    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("snapshots").join(id)
    }

    /// The VM's own memory file.
    pub fn mem_path(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("mem")
    }

    /// The VM's saved state while it is paused.
    pub fn state_path(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("state")
    }

    /// `vm`'s disk chain under its writable disk, top first, down to the empty filesystem.
    pub(super) fn backing_of(&self, vm: &Vm) -> Result<Vec<Layer>, ApiError> {
        if vm.mem.layers.len() >= MAX_LAYERS {
            return Err(ApiError::Conflict(format!(
                "{} sits on {} disk layers, the most there may be",
                vm.name,
                vm.mem.layers.len()
            )));
        }
        let mut v: Vec<Layer> = vm
            .mem
            .layers
            .iter()
            .map(|l| Layer {
                path: self.layer_path(l),
                format: DiskFormat::Qcow2,
            })
            .collect();
        v.push(Layer {
            path: self.disk_template(vm.disk_gib)?,
            format: DiskFormat::Raw,
        });
        Ok(v)
    }

    /// Where `vm`'s RAM comes from for `launch`, and the state it starts from.
    pub(super) fn memory_of(
        &self,
        vm: &Vm,
        launch: &Launch,
    ) -> Result<(Memory, Option<Incoming>), ApiError> {
        let own = self.mem_path(&vm.id);
        match launch {
            Launch::Boot => {
                // A state saved by a pause that did not finish is of no use to a cold boot.
                let _ = std::fs::remove_file(self.state_path(&vm.id));
                fresh_memory(&own)?;
                Ok((Memory::Own(own), None))
            }
            Launch::Restore(r) => {
                let memory = match (&vm.mem.base, r.ram_in_file) {
                    (Some(b), true) => Memory::Cow(self.snapshot_dir(b).join("mem")),
                    (None, true) => Memory::Own(own),
                    // The RAM comes with the state, into a fresh file of the VM's own.
                    (_, false) => {
                        fresh_memory(&own)?;
                        Memory::Own(own)
                    }
                };
                Ok((
                    memory,
                    Some(Incoming {
                        state: r.state.clone(),
                        ignore_shared: r.ram_in_file,
                    }),
                ))
            }
        }
    }

    /// Tells a restored guest what changed: the time, fresh entropy and, for a copy, its new
    /// identity.
    pub(super) async fn restored(
        &self,
        vm: &Vm,
        client: &Arc<dyn Agent>,
        new_identity: bool,
    ) -> Result<(), ApiError> {
        let identity = new_identity.then(|| self.identity_of(vm, true));
        let info = hutch_proto::RestoreInfo::now(&entropy(), identity);
        tokio::time::timeout(Duration::from_secs(30), client.restored(info))
            .await
            .map_err(|_| internal(format!("the agent of {} did not take its restore", vm.name)))?
            .map_err(ApiError::from)
    }

    /// Gives running `vm`'s guest the identity its record has now (a claimed warm pool VM:
    /// its new name and a new machine id; its address and MAC were its own already).
    pub async fn personalize(&self, vm: &Vm) -> Result<(), ApiError> {
        let client = self.client(vm)?;
        let info = hutch_proto::RestoreInfo::now(&entropy(), Some(self.identity_of(vm, false)));
        tokio::time::timeout(Duration::from_secs(30), client.restored(info))
            .await
            .map_err(|_| internal(format!("the agent of {} did not take its name", vm.name)))?
            .map_err(ApiError::from)
    }

    /// `vm`'s identity for its guest; `with_net`: its network too.
    fn identity_of(&self, vm: &Vm, with_net: bool) -> hutch_proto::Identity {
        let net = match (&self.net, vm.net.ipv4, &vm.net.mac) {
            (Some(n), Some(ip), Some(mac)) if with_net && self.nic(vm).is_some() => {
                let gw = n.settings.cfg.gateway();
                Some(hutch_proto::NetIdentity {
                    ip,
                    gw,
                    dns: gw,
                    domain: n.settings.domain.clone(),
                    mtu: Some(n.settings.cfg.mtu),
                    mac: mac.clone(),
                })
            }
            _ => None,
        };
        hutch_proto::Identity {
            hostname: vm.name.clone(),
            machine_id: hex::encode(rand::random::<[u8; 16]>()),
            net,
        }
    }

    /// Pauses `vm` (recorded `pausing` by the caller): its state goes to files, its QEMU ends
    /// and its memory is released. If the state cannot be written the VM runs on (the error
    /// says why).
    pub async fn pause(self: &Arc<Self>, vm: &Vm) -> Result<Vm, ApiError> {
        let h = self
            .handle(vm)
            .ok_or_else(|| internal(format!("{} has no process", vm.name)))?;
        let ram_in_file = vm.mem.base.is_none();
        let (state, tmp) = (
            self.state_path(&vm.id),
            self.vm_dir(&vm.id).join("state.new"),
        );
        let _ = std::fs::remove_file(&tmp);
        let t = Instant::now();
        let (vmm, h2, tmp2) = (self.vmm.clone(), h.clone(), tmp.clone());
        let saved = tokio::task::spawn_blocking(move || vmm.save(&h2, &tmp2, ram_in_file))
            .await
            .map_err(internal)?;
        let saved = match saved {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                self.run_on(vm, &h).await;
                return Err(ApiError::Internal(format!(
                    "{} could not be paused: {e}",
                    vm.name
                )));
            }
        };
        std::fs::rename(&tmp, &state).map_err(io(format!("renaming {}", tmp.display())))?;
        hutch_fs::durable::sync_dir(&self.vm_dir(&vm.id)).map_err(internal)?;
        self.metrics.saves.observe(t.elapsed());
        crate::crash::point("pause.saved");
        // Recorded before QEMU ends: the process is no longer the VM's, so its exit is not a
        // failure. A VM mapping a snapshot's memory has it all in its state now.
        let at = hutch_core::now();
        let vm = self
            .transition(&vm.id, Event::Saved, |v| {
                v.pid = None;
                v.mem.base = None;
                v.mem.saved = Some(SavedState {
                    ram_in_file,
                    bytes: saved.bytes,
                    at,
                });
            })
            .await?;
        self.end_process(&h).await;
        if ram_in_file {
            let mem = self.mem_path(&vm.id);
            tokio::task::spawn_blocking(move || release_memory(&mem))
                .await
                .map_err(internal)??;
        }
        tracing::info!(vm = %vm.name, save_ms = saved.ms, bytes = saved.bytes, "vm paused");
        Ok(vm)
    }

    /// Lets a VM whose pause or snapshot failed run on.
    async fn run_on(&self, vm: &Vm, h: &hutch_vmm::VmHandle) {
        let (vmm, h2) = (self.vmm.clone(), h.clone());
        let _ = tokio::task::spawn_blocking(move || vmm.resume(&h2)).await;
        let _ = self.transition(&vm.id, Event::Done, |_| {}).await;
    }

    /// Ends a stopped QEMU whose state is saved, and frees its confinement.
    async fn end_process(self: &Arc<Self>, h: &hutch_vmm::VmHandle) {
        self.forget(&h.id);
        let (vmm, h2) = (self.vmm.clone(), h.clone());
        let _ = tokio::task::spawn_blocking(move || vmm.quit(&h2)).await;
        if !self.wait_gone(h, Duration::from_secs(5)).await {
            let _ = self.vmm.kill(h);
            self.wait_gone(h, Duration::from_secs(5)).await;
        }
        let (me, id) = (self.clone(), h.id.clone());
        let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
    }

    /// Resumes paused `vm` (recorded `resuming` by the caller) from its saved state.
    pub async fn resume(self: &Arc<Self>, vm: &Vm, image: &Image) -> Result<Vm, ApiError> {
        let saved = vm
            .mem
            .saved
            .clone()
            .ok_or_else(|| internal(format!("{} has no saved state", vm.name)))?;
        let launch = Launch::Restore(Restore {
            state: self.state_path(&vm.id),
            ram_in_file: saved.ram_in_file,
            new_identity: false,
        });
        let vm = self.boot(vm, image, None, launch).await?;
        let _ = std::fs::remove_file(self.state_path(&vm.id));
        Ok(vm)
    }

    /// Takes a snapshot of running `vm` (recorded `snapshotting` by the caller): its state is
    /// saved, its disk frozen as a layer and, when its RAM is its own file, that file becomes
    /// the snapshot's memory; then the VM runs on, restored from the snapshot like any copy.
    /// Fills in `snap`'s files and returns the VM running again. The caller writes the record.
    pub async fn take_snapshot(
        self: &Arc<Self>,
        vm: &Vm,
        image: &Image,
        snap: &mut Snapshot,
    ) -> Result<Vm, ApiError> {
        let h = self
            .handle(vm)
            .ok_or_else(|| internal(format!("{} has no process", vm.name)))?;
        if vm.mem.layers.len() + 1 >= MAX_LAYERS {
            self.run_on(vm, &h).await;
            return Err(ApiError::Conflict(format!(
                "{} already sits on {} disk layers, the most a snapshot may add to",
                vm.name,
                vm.mem.layers.len()
            )));
        }
        let ram_in_file = vm.mem.base.is_none();
        let dir = self.snapshot_dir(&snap.id);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let t = Instant::now();
        let (vmm, h2, st) = (self.vmm.clone(), h.clone(), dir.join("state"));
        let saved = tokio::task::spawn_blocking(move || vmm.save(&h2, &st, ram_in_file))
            .await
            .map_err(internal)?;
        let saved = match saved {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                self.run_on(vm, &h).await;
                return Err(ApiError::Internal(format!(
                    "a snapshot of {} could not be taken: {e}",
                    vm.name
                )));
            }
        };
        crate::crash::point("snapshot.saved");
        // The new layer is recorded before any file moves (freeze_disk finishes it, after a
        // crash too); the process is no longer the VM's.
        let layer = hutch_core::names::random_id();
        let vm = self
            .update(&vm.id, |v| {
                v.pid = None;
                v.mem.layers.insert(0, layer.clone());
                v.mem.base = if ram_in_file {
                    Some(snap.id.clone())
                } else {
                    None
                };
            })
            .await?;
        self.end_process(&h).await;
        let (me, v2, d2) = (self.clone(), vm.clone(), dir.clone());
        let bytes = tokio::task::spawn_blocking(move || -> Result<u64, ApiError> {
            me.freeze_disk(&v2)?;
            let mut bytes = saved.bytes;
            if ram_in_file {
                let mem = d2.join("mem");
                move_file(&me.mem_path(&v2.id), &mem)?;
                freeze_mode(&mem)?;
                bytes += allocated(&mem);
            }
            freeze_mode(&d2.join("state"))?;
            hutch_fs::durable::sync_dir(&d2).map_err(internal)?;
            Ok(bytes)
        })
        .await
        .map_err(internal)??;
        crate::crash::point("snapshot.frozen");
        snap.ram_in_file = ram_in_file;
        snap.layers = vm.mem.layers.clone();
        snap.bytes = bytes;
        snap.pause_ms = t.elapsed().as_millis() as u64;
        self.metrics.saves.observe(t.elapsed());
        // The VM runs on from the snapshot, like every copy, but keeps its identity.
        let launch = Launch::Restore(Restore {
            state: dir.join("state"),
            ram_in_file,
            new_identity: false,
        });
        let vm = self.boot(&vm, image, None, launch).await;
        snap.pause_ms = t.elapsed().as_millis() as u64;
        vm
    }

    /// Makes the top layer `vm`'s record names (`mem.layers[0]`) out of its writable disk and
    /// puts a fresh overlay on top; done already is fine (it is finished after a crash).
    pub(crate) fn freeze_disk(&self, vm: &Vm) -> Result<(), ApiError> {
        use std::os::unix::fs::MetadataExt;
        let Some(top) = vm.mem.layers.first() else {
            return Ok(());
        };
        let disk = self.vm_dir(&vm.id).join("disk.qcow2");
        let layer = self.layer_path(top);
        let dir = self.cfg.data_dir.join("layers");
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        if !layer.exists() {
            std::fs::hard_link(&disk, &layer)
                .map_err(io(format!("freezing {}", disk.display())))?;
            hutch_fs::durable::sync_dir(&dir).map_err(internal)?;
        }
        let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.ino() == y.ino() && x.dev() == y.dev(),
            _ => false,
        };
        if same(&disk, &layer) || !disk.exists() {
            let f =
                std::fs::File::open(&layer).map_err(io(format!("opening {}", layer.display())))?;
            f.sync_all().map_err(internal)?;
            freeze_mode(&layer)?;
            let tmp = self.vm_dir(&vm.id).join("disk.qcow2.new");
            let _ = std::fs::remove_file(&tmp);
            self.vmm.create_disk(
                &tmp,
                &Layer {
                    path: layer.clone(),
                    format: DiskFormat::Qcow2,
                },
                None,
            )?;
            std::fs::rename(&tmp, &disk).map_err(io(format!("renaming {}", tmp.display())))?;
            hutch_fs::durable::sync_dir(&self.vm_dir(&vm.id)).map_err(internal)?;
        }
        Ok(())
    }

    /// Removes the layers and snapshot directories that neither a VM nor a snapshot record
    /// names any more. `busy`: ids being made right now (not recorded yet).
    pub async fn collect(&self, busy: &[String]) -> Result<(), ApiError> {
        let vms = self.records.local_vms().await?;
        let snaps: Vec<Snapshot> = self.records.list(crate::records::SNAPSHOTS).await?;
        let mut layers: std::collections::HashSet<String> = busy.iter().cloned().collect();
        let mut dirs = layers.clone();
        for v in &vms {
            layers.extend(v.mem.layers.iter().cloned());
            dirs.extend(v.mem.base.iter().cloned());
        }
        for s in &snaps {
            layers.extend(s.layers.iter().cloned());
            dirs.insert(s.id.clone());
        }
        let root = self.cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            let entries = |d: &str| -> Vec<(String, PathBuf)> {
                std::fs::read_dir(root.join(d))
                    .map(|rd| {
                        rd.flatten()
                            .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            for (name, p) in entries("layers") {
                let id = name.strip_suffix(".qcow2").unwrap_or(&name);
                if !layers.contains(id) {
                    tracing::info!(layer = %id, "removing a disk layer nothing uses");
                    let _ = std::fs::remove_file(p);
                }
            }
            for (id, p) in entries("snapshots") {
                if !dirs.contains(&id) {
                    tracing::info!(snapshot = %id, "removing snapshot files nothing uses");
                    let _ = std::fs::remove_dir_all(p);
                }
            }
        })
        .await
        .map_err(internal)
    }

    /// Drops a paused VM's saved state (a stop of a paused VM) and its memory file's blocks.
    pub fn discard_saved(&self, id: &str) {
        let _ = std::fs::remove_file(self.state_path(id));
        self.drop_memory(id);
    }

    /// Empties stopped VM `id`'s own memory file (its blocks go back to the disk).
    pub fn drop_memory(&self, id: &str) {
        let p = self.mem_path(id);
        if p.exists() {
            let _ = fresh_memory(&p);
        }
    }

    /// After a crash of hutchd: a VM caught between saving its state and running again is
    /// brought to a state it can leave (its files finished, the rest `failed` or `paused`).
    pub(super) async fn recover_saves(self: &Arc<Self>, vm: &Vm, alive: bool) {
        if vm.state == VmState::Snapshotting {
            let (me, v2) = (self.clone(), vm.clone());
            let r = tokio::task::spawn_blocking(move || me.freeze_disk(&v2)).await;
            if let Ok(Err(e)) = r {
                tracing::warn!(vm = %vm.name, error = %e, "finishing an interrupted disk freeze");
            }
        }
        if alive {
            if let Some(h) = self.handle(vm) {
                let (vmm, h2) = (self.vmm.clone(), h.clone());
                let _ = tokio::task::spawn_blocking(move || vmm.resume(&h2)).await;
            }
        }
    }
}

/// 64 bytes from the host's RNG for a restored guest's.
fn entropy() -> [u8; 64] {
    let mut b = [0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    b
}

/// A fresh memory file at `p`: any earlier content is dropped (QEMU sizes it).
fn fresh_memory(p: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .map(|_| ())
        .map_err(io(format!("creating {}", p.display())))
}

/// Makes a paused VM's memory file durable and drops it from the page cache, so the host's
/// memory is free while the VM is paused.
fn release_memory(p: &Path) -> Result<(), ApiError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).map_err(io(format!("opening {}", p.display())))?;
    f.sync_all()
        .map_err(io(format!("flushing {}", p.display())))?;
    // SAFETY: fadvise only reads its arguments; the descriptor is open.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

/// Moves `from` to `to` (same file system); done already is fine.
fn move_file(from: &Path, to: &Path) -> Result<(), ApiError> {
    if to.exists() && !from.exists() {
        return Ok(());
    }
    let f = std::fs::File::open(from).map_err(io(format!("opening {}", from.display())))?;
    f.sync_all()
        .map_err(io(format!("flushing {}", from.display())))?;
    std::fs::rename(from, to).map_err(io(format!("moving {}", from.display())))
}

/// Bytes a file takes on disk (its allocated blocks; memory files are sparse).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}
