//! Repairs what a crash of hutchd (kill -9, power loss) interrupted, at start and before VMs
//! are re-attached: half-made VMs (create, clone) are undone, half-removed ones removed, QEMU
//! processes of this data dir that no record accounts for are killed, and VM directories without
//! a record are deleted. The store is the truth; the host is made to match it.

use crate::agent::AgentClient;
use crate::error::ApiError;
use crate::manager::Manager;
use hutch_core::{Vm, VmState};
use hutch_store::VMS;
use std::collections::HashMap;
use std::sync::Arc;

impl Manager {
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

    /// Undoes creates, finishes deletes, kills orphan QEMUs, removes orphan VM directories.
    pub async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        for vm in self.list()? {
            if !matches!(vm.state, VmState::Creating | VmState::Deleting) {
                continue;
            }
            let me = self.clone();
            let v2 = vm.clone();
            tokio::task::spawn_blocking(move || me.destroy(&v2))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            self.store.delete(VMS, &vm.key())?;
            tracing::warn!(
                vm = %vm.key(),
                "{} interrupted by a hutchd stop; {}",
                if vm.state == VmState::Creating { "create" } else { "delete" },
                if vm.state == VmState::Creating { "undone" } else { "finished" }
            );
        }
        let vms: HashMap<String, Vm> = self
            .list()?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let vms_dir = self.cfg.data_dir.join("vms");
        for (pid, id) in qemu_processes(&vms_dir) {
            let owned = vms.get(&id).is_some_and(|v| {
                v.pid == Some(pid)
                    && matches!(
                        v.state,
                        VmState::Starting | VmState::Running | VmState::Stopping
                    )
            });
            if !owned {
                tracing::warn!(pid, vm_id = %id, "killing a QEMU no VM record accounts for");
                let _ = self.vmm.kill(&id, pid);
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while self.vmm.is_alive(&id, pid) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&vms_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
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
fn qemu_processes(vms_dir: &std::path::Path) -> Vec<(u32, String)> {
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
