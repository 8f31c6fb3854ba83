//! Live migration on the node (docs/cluster.md). The target's half: a QEMU that waits, stopped,
//! for the VM's state, with a fresh writable disk exported for the source's mirror
//! ([`Node::arrive`]); then the guest run and the record moved here ([`Node::arrived`]), or
//! everything undone ([`Node::abandon`]). The source's half, once the VM runs on the target:
//! its stopped QEMU, TAP, jail and directory removed ([`Node::departed`]).

use super::{internal, Launch, Node};
use crate::error::ApiError;
use hutch_core::snapshot::VmMemory;
use hutch_core::{Event, Image, Vm, VmState};
use hutch_vmm::VmHandle;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A VM on its way here: its QEMU waits for the state.
pub struct Arrival {
    /// The VM as it will be recorded here once it runs.
    pub vm: Vm,
    pub handle: VmHandle,
    /// hutchd's end of the state stream (QEMU reads the other).
    pub state: Option<UnixStream>,
    /// The socket QEMU's NBD server listens on (the disk export).
    pub nbd: PathBuf,
}

impl Node {
    /// Prepares VM `vm` (recorded `migrating` on node `from`) to arrive here: a uid, a fresh
    /// disk over the empty filesystem (the mirror copies the whole disk), its TAP, and a QEMU
    /// waiting for the state with the disk exported. Undone on error.
    pub async fn arrive(self: &Arc<Self>, vm: &Vm, image: &Image) -> Result<Arrival, ApiError> {
        let here = self
            .records
            .local_node()
            .ok_or_else(|| ApiError::Invalid("migration is for clusters".into()))?;
        let mut v = vm.clone();
        v.node = Some(here);
        v.pid = None;
        v.mem = VmMemory {
            from: vm.mem.from.clone(),
            ..Default::default()
        };
        let has_nic = v.net.ipv4.is_some() && v.net.mode != hutch_core::net::NetMode::None;
        match (&self.net, v.net.ipv4) {
            (None, Some(_)) if has_nic => {
                return Err(ApiError::Conflict(format!(
                    "{} has a network interface, and this node has no VM network (hutchd \
                     --network off)",
                    v.name
                )))
            }
            (Some(net), Some(ip)) if has_nic && !net.settings.cfg.subnet.contains(ip) => {
                let sub = net.settings.cfg.subnet;
                return Err(ApiError::Conflict(format!(
                    "{} keeps its address {ip} when it moves, and this node's VM network is {sub}: \
                     the nodes must share one VM network (same --subnet; docs/cluster.md)",
                    v.name
                )));
            }
            _ => {}
        }
        // A uid of this node's (the source's may be taken here); none when it confines nothing.
        let (conf, held) = self.allocate_uid().await?;
        v.confinement = conf;
        let r = self.launch_arrival(&v, image).await;
        drop(held);
        match r {
            Ok(a) => Ok(a),
            Err(e) => {
                self.clean_up(&v, None).await;
                Err(e)
            }
        }
    }

    async fn launch_arrival(self: &Arc<Self>, v: &Vm, image: &Image) -> Result<Arrival, ApiError> {
        let (me, v2) = (self.clone(), v.clone());
        tokio::task::spawn_blocking(move || me.create_disk(&v2, None))
            .await
            .map_err(internal)??;
        if let Some(net) = self.net.clone() {
            let v2 = v.clone();
            tokio::task::spawn_blocking(move || net.attach(&v2))
                .await
                .map_err(internal)??;
        }
        let mut spec = self.spec(v, image, &Launch::Boot)?;
        spec.migration_in = true;
        let vmm = self.vmm.clone();
        let p = tokio::task::spawn_blocking(move || vmm.launch(&spec))
            .await
            .map_err(internal)??;
        let h = p.handle;
        let mut v = v.clone();
        v.pid = Some(h.pid);
        v.confinement = p.confinement.or(v.confinement);
        let nbd = h.runtime_dir.join("nbd.sock");
        let _ = std::fs::remove_file(&nbd);
        let ready = (|| {
            let listener = UnixListener::bind(&nbd).map_err(internal)?;
            let (ours, theirs) = UnixStream::pair().map_err(internal)?;
            self.vmm
                .migrate_receive(&h, listener.as_raw_fd(), theirs.as_raw_fd())?;
            Ok::<_, ApiError>(ours)
        })();
        match ready {
            Ok(ours) => Ok(Arrival {
                vm: v,
                handle: h,
                state: Some(ours),
                nbd,
            }),
            Err(e) => {
                let _ = self.vmm.kill(&h);
                self.wait_gone(&h, Duration::from_secs(5)).await;
                Err(e)
            }
        }
    }

    /// Runs the arrived guest and moves its record here (from `migrating` on node `from`, by
    /// compare-and-swap): from then on it is this node's. The caller abandons it on error.
    /// Returns the record and when the guest ran.
    pub async fn arrived(
        self: &Arc<Self>,
        a: &Arrival,
        from: &str,
    ) -> Result<(Vm, Instant), ApiError> {
        let (vmm, h) = (self.vmm.clone(), a.handle.clone());
        tokio::task::spawn_blocking(move || vmm.migrate_complete(&h, true))
            .await
            .map_err(internal)??;
        let resumed = Instant::now();
        let here = a.vm.node.clone();
        let vm = self
            .records
            .update_vm(&a.vm.id, |r: &mut Vm| {
                if r.state != VmState::Migrating || r.node.as_deref() != Some(from) {
                    return Err(ApiError::Conflict(format!(
                        "{} changed during the migration (now {} on {})",
                        r.name,
                        r.state.as_str(),
                        r.node.as_deref().unwrap_or("no node")
                    )));
                }
                r.apply(&Event::Done)
                    .map_err(|d| ApiError::Conflict(format!("{} {d}", r.name)))?;
                r.node = here.clone();
                r.pid = a.vm.pid;
                r.confinement = a.vm.confinement.clone();
                r.mem = a.vm.mem.clone();
                r.migrated = Some(format!("live from node {from}"));
                Ok(())
            })
            .await?;
        match self
            .connector
            .connect(&a.handle, self.cfg.boot_timeout)
            .await
        {
            Ok((c, _)) => {
                self.conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(vm.id.clone(), c);
            }
            Err(e) => {
                tracing::warn!(vm = %vm.key(), error = %e, "migrated vm runs but its agent does not answer")
            }
        }
        let (me, v2) = (self.clone(), vm.clone());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.save_record(&v2, true)).await {
            tracing::warn!(vm = %vm.key(), error = %e, "saving the record copy");
        }
        self.watch(a.handle.clone());
        tracing::info!(vm = %vm.key(), pid = a.handle.pid, from, "vm arrived");
        Ok((vm, resumed))
    }

    /// Ends a move at rest here: the arrived VM stays stopped, its state saved to its files
    /// (`paused`) or dropped (a stopped VM: only its disk counts), its QEMU ends, and its record
    /// moves here `paused` or `stopped` (compare-and-swap from `migrating` on `from`). The caller
    /// abandons it on error.
    pub async fn arrived_at_rest(
        self: &Arc<Self>,
        a: &Arrival,
        from: &str,
        paused: bool,
    ) -> Result<Vm, ApiError> {
        let (vmm, h) = (self.vmm.clone(), a.handle.clone());
        tokio::task::spawn_blocking(move || vmm.migrate_complete(&h, false))
            .await
            .map_err(internal)??;
        let id = a.vm.id.clone();
        let saved = if paused {
            let (state, tmp) = (self.state_path(&id), self.vm_dir(&id).join("state.new"));
            let _ = std::fs::remove_file(&tmp);
            let (vmm, h, t2) = (self.vmm.clone(), a.handle.clone(), tmp.clone());
            // The RAM stays in the VM's own memory file; the state file holds the devices.
            let s = tokio::task::spawn_blocking(move || vmm.save(&h, &t2, true))
                .await
                .map_err(internal)??;
            std::fs::rename(&tmp, &state).map_err(internal)?;
            hutch_fs::durable::sync_dir(&self.vm_dir(&id)).map_err(internal)?;
            Some(hutch_core::snapshot::SavedState {
                ram_in_file: true,
                bytes: s.bytes,
                at: hutch_core::now(),
            })
        } else {
            None
        };
        let here = a.vm.node.clone();
        let vm = self
            .records
            .update_vm(&id, |r: &mut Vm| {
                if r.state != VmState::Migrating || r.node.as_deref() != Some(from) {
                    return Err(ApiError::Conflict(format!(
                        "{} changed during the move (now {} on {})",
                        r.name,
                        r.state.as_str(),
                        r.node.as_deref().unwrap_or("no node")
                    )));
                }
                let ev = if paused { Event::Saved } else { Event::Halted };
                r.apply(&ev)
                    .map_err(|d| ApiError::Conflict(format!("{} {d}", r.name)))?;
                r.node = here.clone();
                r.pid = None;
                r.main_pid = if paused { r.main_pid } else { None };
                r.confinement = a.vm.confinement.clone();
                r.mem = VmMemory {
                    saved: saved.clone(),
                    ..a.vm.mem.clone()
                };
                r.migrated = Some(format!(
                    "at rest ({}) from node {from}",
                    if paused { "paused" } else { "stopped" }
                ));
                Ok(())
            })
            .await?;
        let (vmm, h) = (self.vmm.clone(), a.handle.clone());
        let _ = tokio::task::spawn_blocking(move || vmm.quit(&h)).await;
        if !self.wait_gone(&a.handle, Duration::from_secs(5)).await {
            let _ = self.vmm.kill(&a.handle);
            self.wait_gone(&a.handle, Duration::from_secs(5)).await;
        }
        let (me, v2) = (self.clone(), vm.clone());
        let _ = tokio::task::spawn_blocking(move || {
            me.release_jail(&v2.id);
            if !paused {
                me.drop_memory(&v2.id);
            }
            if let Err(e) = me.save_record(&v2, true) {
                tracing::warn!(vm = %v2.key(), error = %e, "saving the record copy");
            }
        })
        .await;
        tracing::info!(vm = %vm.key(), from, state = vm.state.as_str(), "vm arrived at rest");
        Ok(vm)
    }

    /// A QEMU for paused or stopped `vm` that does not run its guest (from its saved state, or
    /// its disk at rest), started only to move it. Its handle is not recorded.
    pub async fn hold(self: &Arc<Self>, vm: &Vm, image: &Image) -> Result<VmHandle, ApiError> {
        let launch = match (&vm.mem.saved, vm.state) {
            (Some(s), VmState::Paused) => Launch::Restore(super::Restore {
                state: self.state_path(&vm.id),
                ram_in_file: s.ram_in_file,
                new_identity: false,
            }),
            (_, VmState::Stopped) => Launch::Boot,
            _ => {
                return Err(ApiError::Conflict(format!(
                    "{} is {}: it does not move at rest",
                    vm.name,
                    vm.state.as_str()
                )))
            }
        };
        if let Some(net) = self.net.clone() {
            let v = vm.clone();
            tokio::task::spawn_blocking(move || net.attach(&v))
                .await
                .map_err(internal)??;
        }
        let mut spec = self.spec(vm, image, &launch)?;
        spec.hold = true;
        let vmm = self.vmm.clone();
        let p = tokio::task::spawn_blocking(move || vmm.launch(&spec))
            .await
            .map_err(internal)??;
        Ok(p.handle)
    }

    /// Ends a QEMU [`Node::hold`] started, when its VM did not move (it stays here as it was).
    pub async fn unhold(self: &Arc<Self>, vm: &Vm, h: &VmHandle) {
        let _ = self.vmm.kill(h);
        self.wait_gone(h, Duration::from_secs(5)).await;
        let (me, id) = (self.clone(), vm.id.clone());
        let _ = tokio::task::spawn_blocking(move || me.release_jail(&id)).await;
    }

    /// Undoes an arrival: its QEMU killed, its TAP, jail and directory removed. The record is
    /// not touched (it is still the source's).
    pub async fn abandon(self: &Arc<Self>, a: Arrival) {
        self.clean_up(&a.vm, Some(&a.handle)).await;
    }

    /// The source's half after the VM moved: its (stopped) QEMU, agent connection, TAP, jail
    /// and directory go; the record, now the target's, is not touched.
    pub async fn departed(self: &Arc<Self>, vm: &Vm, h: &VmHandle) {
        self.forget(&vm.id);
        self.clean_up(vm, Some(h)).await;
    }

    async fn clean_up(self: &Arc<Self>, vm: &Vm, h: Option<&VmHandle>) {
        if let Some(h) = h {
            let _ = self.vmm.kill(h);
            self.wait_gone(h, Duration::from_secs(5)).await;
        }
        let (me, v) = (self.clone(), vm.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(net) = &me.net {
                net.detach(&v);
            }
            me.release_jail(&v.id);
            let _ = std::fs::remove_dir_all(me.vm_dir(&v.id));
        })
        .await;
    }
}
