//! Repairs what a crash of hutchd (kill -9, power loss) interrupted, at start and before VMs
//! are re-attached: half-made VMs (create, clone) are undone, half-removed ones removed, QEMU
//! processes of this data dir that no record accounts for are killed, and VM directories without
//! a record are deleted. The store is the truth; the host is made to match it.

use super::Node;
use crate::error::ApiError;
use hutch_core::{Event, Vm, VmState};
use hutch_vmm::VmHandle;
use std::collections::HashMap;
use std::sync::Arc;

impl Node {
    /// After a (re)start of hutchd: re-attach to every VM whose QEMU still runs; record the
    /// others as exited (a VM that should have run becomes `failed`, and the control plane's
    /// restart policy starts it again: after a host reboot too); finish stops that a crash
    /// interrupted.
    pub async fn reattach(self: &Arc<Self>) -> Result<(), ApiError> {
        self.recover().await?;
        if let Some(net) = self.net.clone() {
            let vms = self.records.local_vms().await?;
            let (n2, v2) = (net.clone(), vms.clone());
            tokio::task::spawn_blocking(move || n2.reconcile(&v2))
                .await
                .map_err(super::internal)??;
            net.restore_forwards(&vms).await;
        }
        for vm in self.records.local_vms().await? {
            let handle = self.handle(&vm).filter(|h| self.vmm.is_alive(h));
            match (vm.state, handle) {
                (VmState::Stopped | VmState::Failed | VmState::Paused, _) => {}
                // A move at rest that hutchd's crash interrupted: the VM stays here as it was
                // (the QEMU that held it for the move is gone: recover() killed it).
                (VmState::Migrating, None) if vm.pid.is_none() => {
                    let ev = if vm.mem.saved.is_some() {
                        Event::Saved
                    } else {
                        Event::Halted
                    };
                    tracing::warn!(vm = %vm.name, "a move interrupted by a hutchd stop; the vm stays here");
                    self.transition(&vm.id, ev, |_| {}).await?;
                }
                (state, Some(h)) => {
                    if matches!(
                        state,
                        VmState::Pausing | VmState::Resuming | VmState::Snapshotting
                    ) {
                        self.recover_saves(&vm, true).await;
                    }
                    self.attach(&vm, h).await;
                    if state == VmState::Stopping {
                        // A stop that hutchd's crash interrupted: finish it.
                        let (me, id) = (self.clone(), vm.id.clone());
                        tokio::spawn(async move {
                            if let Err(e) = me.finish_stop(&id).await {
                                tracing::warn!(vm = %id, error = %e, "finishing an interrupted stop");
                            }
                        });
                    }
                }
                (state, None) => {
                    if state == VmState::Snapshotting {
                        self.recover_saves(&vm, false).await;
                    }
                    self.release_jail(&vm.id);
                    tracing::warn!(vm = %vm.name, "vm process is gone");
                    self.transition(
                        &vm.id,
                        Event::Exited("QEMU exited while hutchd was not running".into()),
                        |v| {
                            v.pid = None;
                            v.main_pid = None;
                            v.clean_exit = false;
                        },
                    )
                    .await?;
                }
            }
        }
        // Cgroups and jails of VMs that are gone (removed or crashed while hutchd was down).
        // VMs the store lost (their directory has a record copy) keep theirs: their QEMU
        // runs on until `hutch admin recover`.
        let vms = self.records.local_vms().await?;
        let mut keep: Vec<String> = vms
            .iter()
            .filter(|v| self.handle(v).is_some_and(|h| self.vmm.is_alive(&h)))
            .map(|v| v.id.clone())
            .collect();
        keep.extend(
            qemu_processes(&self.cfg.data_dir.join("vms"))
                .into_iter()
                .map(|(_, id)| id)
                .filter(|id| !vms.iter().any(|v| &v.id == id) && self.saved_record(id).is_some()),
        );
        if let Err(e) = self.vmm.reconcile(&keep) {
            tracing::warn!(error = %e, "reconciling VM cgroups and jails");
        }
        // Disk layers and snapshot files an interrupted snapshot left without a record.
        if let Err(e) = self.collect(&[]).await {
            tracing::warn!(error = %e, "collecting unused snapshot files");
        }
        Ok(())
    }

    /// Halts a `stopping` VM's process and records it stopped.
    pub async fn finish_stop(self: &Arc<Self>, id: &str) -> Result<Vm, ApiError> {
        let Some(vm) = self.records.vm_by_id(id).await? else {
            return Err(ApiError::vm(id));
        };
        if let Some(h) = self.handle(&vm) {
            self.halt(&h).await;
        }
        let (me, id2) = (self.clone(), vm.id.clone());
        let _ = tokio::task::spawn_blocking(move || {
            me.release_jail(&id2);
            // A stopped VM's RAM is gone: its memory file gives its disk space back.
            me.drop_memory(&id2);
        })
        .await;
        self.forget(&vm.id);
        // The watch may record the exit first (stopping + exited = stopped): then there is
        // nothing left to record, decided on the record as the compare-and-swap reads it.
        match self.records.vm_by_id(id).await? {
            Some(now) if now.state != VmState::Stopping => Ok(now),
            _ => {
                self.records
                    .update_vm(id, |v: &mut Vm| {
                        if v.state == VmState::Stopping {
                            v.apply(&Event::Halted)
                                .map_err(|d| ApiError::Conflict(format!("{} {d}", v.name)))?;
                            v.pid = None;
                            v.main_pid = None;
                        }
                        Ok(())
                    })
                    .await
            }
        }
    }

    /// Re-attaches to the running QEMU `h` of `vm`: a new agent connection (the agent kills
    /// what the old one started), `starting` becomes `running`, and a watch on the process.
    pub(crate) async fn attach(self: &Arc<Self>, vm: &Vm, h: VmHandle) {
        match self.connector.connect(&h, self.cfg.boot_timeout).await {
            Ok((c, kernel)) => {
                self.conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(vm.id.clone(), c);
                let kernel = hutch_core::clean_text(&kernel);
                // An operation the crash interrupted ends with the VM running.
                let event = match vm.state {
                    VmState::Starting | VmState::Resuming => Some(Event::Booted),
                    VmState::Pausing | VmState::Snapshotting => Some(Event::Done),
                    VmState::Migrating => {
                        // A live migration that hutchd's crash interrupted: the record is still
                        // this node's, so the guest runs on here (QEMU may have stopped it for
                        // a switch-over nobody finished).
                        let (vmm, h2) = (self.vmm.clone(), h.clone());
                        let _ = tokio::task::spawn_blocking(move || vmm.resume(&h2)).await;
                        Some(Event::Done)
                    }
                    _ => None,
                };
                let r = if let Some(event) = event {
                    self.transition(&vm.id, event, |v| v.kernel = Some(kernel.clone()))
                        .await
                } else {
                    self.update(&vm.id, |v| v.kernel = Some(kernel.clone()))
                        .await
                };
                if let Err(e) = r {
                    tracing::warn!(vm = %vm.name, error = %e, "recording a re-attached vm");
                }
                tracing::info!(vm = %vm.name, pid = h.pid, "re-attached to running vm");
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %e, "vm runs but its agent does not answer");
            }
        }
        self.watch(h);
    }

    /// Undoes creates, finishes deletes, kills orphan QEMUs, removes orphan VM directories.
    /// A directory with a record copy (`vm.json`) that the store does not know is not an orphan
    /// but a VM the store lost: it and its QEMU are left for `hutch admin recover` (on a single
    /// node; a cluster node's VM unknown to etcd was moved or deleted elsewhere: removed).
    pub async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        for vm in self.records.local_vms().await? {
            if !matches!(vm.state, VmState::Creating | VmState::Deleting) {
                continue;
            }
            self.destroy(&vm).await;
            self.records.delete_vm(&vm).await?;
            tracing::warn!(
                vm = %vm.key(),
                "{} interrupted by a hutchd stop; {}",
                if vm.state == VmState::Creating { "create" } else { "delete" },
                if vm.state == VmState::Creating { "undone" } else { "finished" }
            );
        }
        let vms: HashMap<String, Vm> = self
            .records
            .local_vms()
            .await?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let vms_dir = self.cfg.data_dir.join("vms");
        // On a cluster node the store is etcd, replicated: a VM it does not record here was
        // moved or deleted while this node was away, not lost by the store.
        let cluster = self.records.local_node().is_some();
        let lost = |id: &str| !cluster && !vms.contains_key(id) && self.saved_record(id).is_some();
        let mut warned = std::collections::HashSet::new();
        for (pid, id) in qemu_processes(&vms_dir) {
            if lost(&id) {
                continue;
            }
            let owned = vms.get(&id).is_some_and(|v| {
                v.pid == Some(pid) && v.state.has_process() && v.state != VmState::Creating
            });
            if !owned {
                tracing::warn!(pid, vm_id = %id, "killing a QEMU no VM record accounts for");
                let h = self.handle_of(&id, pid);
                let _ = self.vmm.kill(&h);
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while self.vmm.is_alive(&h) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&vms_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if lost(&name) {
                    if warned.insert(name.clone()) {
                        tracing::warn!(
                            id = %name,
                            "VM directory without a record in the state store (was the store lost?): kept; run `hutch admin recover` to restore it"
                        );
                    }
                    continue;
                }
                if !vms.contains_key(&name) {
                    tracing::warn!(dir = %e.path().display(), "removing a VM directory without a record");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }
}

/// (pid, VM id) of every QEMU whose command line names a VM directory under `vms_dir` and
/// carries hutch's `-name hutch-ID,...` tag.
pub(crate) fn qemu_processes(vms_dir: &std::path::Path) -> Vec<(u32, String)> {
    let needle = format!("{}/", vms_dir.display());
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a.contains(&needle)) {
            continue;
        }
        let id = args.iter().find_map(|a| {
            a.strip_prefix("hutch-")
                .and_then(|r| r.split(',').next())
                .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
                .map(str::to_string)
        });
        if let Some(id) = id {
            out.push((pid, id));
        }
    }
    out
}
