//! Recovery when the state store is lost or corrupt (boxcutter's `recover`): every VM directory
//! keeps a copy of its VM's record (`vms/ID/vm.json`, written durably when the VM is created and
//! each time it boots), and `hutch admin recover` rebuilds the records the store lacks from those
//! copies and from the QEMU processes that still run. Nothing is stopped: a VM whose QEMU runs is
//! re-attached as running, the others come back stopped.
//!
//! At start, hutchd leaves such directories (and their QEMUs) alone instead of removing them as
//! leftovers (see recover.rs), and says to run `hutch admin recover`.

use super::{internal, Node};
use crate::error::ApiError;
use hutch_core::{Image, Vm, VmState};
use std::sync::Arc;

/// The copy of a VM's record in its directory.
pub const RECORD: &str = "vm.json";

/// What `hutch admin recover` did with one VM directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Recovered {
    pub id: String,
    pub vm: String,
    pub owner: Option<String>,
    /// running, stopped, or skipped (with why).
    pub outcome: String,
}

impl Node {
    /// Writes `vm`'s record into its directory (durably: a temp file renamed into place).
    /// The copy made when the VM is created is durable (its directory is flushed after it, by
    /// `create_disk`); the refresh after each boot (pid, cgroup) is not flushed: recovery needs
    /// the VM's identity, image and settings, which the first copy has.
    pub(crate) fn save_record(&self, vm: &Vm, durable: bool) -> Result<(), ApiError> {
        let dir = self.vm_dir(&vm.id);
        let tmp = dir.join(format!("{RECORD}.tmp"));
        let bytes = serde_json::to_vec_pretty(vm).map_err(internal)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(internal)?;
            f.write_all(&bytes).map_err(internal)?;
            if durable {
                hutch_fs::durable::sync_file(&f).map_err(internal)?;
            }
        }
        std::fs::rename(&tmp, dir.join(RECORD)).map_err(internal)
    }

    /// The record copy in VM directory `id`, if it has a readable one.
    pub(crate) fn saved_record(&self, id: &str) -> Option<Vm> {
        let b = std::fs::read(self.vm_dir(id).join(RECORD)).ok()?;
        serde_json::from_slice::<Vm>(&b).ok().filter(|v| v.id == id)
    }

    /// Rebuilds the records of VM directories the store does not know (admin only).
    pub async fn rebuild(self: &Arc<Self>) -> Result<Vec<Recovered>, ApiError> {
        let known: std::collections::HashSet<String> = self
            .records
            .local_vms()
            .await?
            .into_iter()
            .map(|v| v.id)
            .collect();
        let running = super::recover::qemu_processes(&self.cfg.data_dir.join("vms"));
        let mut out = Vec::new();
        let mut ids: Vec<String> = std::fs::read_dir(self.cfg.data_dir.join("vms"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        for id in ids.into_iter().filter(|i| !known.contains(i)) {
            let Some(mut vm) = self.saved_record(&id) else {
                out.push(Recovered {
                    id,
                    vm: String::new(),
                    owner: None,
                    outcome: format!("skipped: no readable {RECORD}"),
                });
                continue;
            };
            let pid = running.iter().find(|(_, i)| *i == id).map(|(p, _)| *p);
            let handle = pid.map(|pid| self.handle_of(&id, pid));
            let alive = handle.as_ref().filter(|h| self.vmm.is_alive(h)).cloned();
            vm.pid = alive.as_ref().map(|h| h.pid);
            vm.state = if alive.is_some() {
                VmState::Running
            } else {
                VmState::Stopped
            };
            vm.reason = None;
            if alive.is_none() {
                vm.main_pid = None;
            }
            let outcome = if self.records.create_vm(&vm).await? {
                vm.state.as_str().to_string()
            } else {
                format!("skipped: another VM is called {} now", vm.key())
            };
            if outcome == vm.state.as_str() {
                // Its image comes back too (VMs carry theirs), so the image list is not empty.
                if let Some(img) = vm.recorded_image() {
                    let img = Image {
                        owner: vm.owner.clone(),
                        ..img
                    };
                    if self.records.image(&img.key()).await?.is_none() {
                        self.records.put_image(&img).await?;
                    }
                }
                if let Some(h) = alive {
                    self.attach(&vm, h).await;
                }
                tracing::warn!(vm = %vm.key(), id = %id, state = vm.state.as_str(), "record rebuilt");
            }
            out.push(Recovered {
                id,
                vm: vm.name.clone(),
                owner: vm.owner.clone(),
                outcome,
            });
        }
        Ok(out)
    }
}
