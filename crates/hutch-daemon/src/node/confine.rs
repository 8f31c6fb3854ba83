//! The daemon's side of confining QEMU (the mechanism is `hutch_vmm::jail`): the hutchd options,
//! building the backend's [`JailConfig`], and giving each VM its own uid from the configured
//! range, persisted in its record so restarts and re-attach keep it.

use super::Node;
use crate::error::ApiError;
use hutch_core::{Confinement, Vm};
use hutch_vmm::cgroup::{node_name, Cgroups};
use hutch_vmm::JailConfig;
use std::path::{Path, PathBuf};

/// hutchd's confinement options (`--jail-*`, `--cgroup-*`).
#[derive(Debug, Clone)]
pub struct JailOptions {
    pub uid_base: u32,
    pub uid_count: u32,
    /// Where the cgroup hierarchies are mounted (normally /sys/fs/cgroup).
    pub cgroup_root: PathBuf,
    /// Our cgroups live in `PARENT/NODE/VM-ID` (NODE: a hash of the data dir).
    pub cgroup_parent: String,
    pub mem_overhead_mib: u64,
}

impl Default for JailOptions {
    fn default() -> Self {
        JailOptions {
            uid_base: 900_000,
            uid_count: 65_536,
            cgroup_root: "/sys/fs/cgroup".into(),
            cgroup_parent: "hutch".into(),
            mem_overhead_mib: hutch_vmm::jail::DEFAULT_MEM_OVERHEAD_MIB,
        }
    }
}

impl JailOptions {
    /// The backend's settings for the hutchd of `data_dir`.
    pub fn config(&self, data_dir: &Path) -> JailConfig {
        let cgroups = Cgroups::detect(&self.cgroup_root, &self.cgroup_parent, &node_name(data_dir));
        match &cgroups {
            Some(c) => tracing::info!(version = ?c.version, base = %c.base.display(), "VM cgroups"),
            None => tracing::warn!(
                root = %self.cgroup_root.display(),
                "no usable cgroup v1 or v2 hierarchy with memory, cpu and pids: VMs run without limits"
            ),
        }
        JailConfig {
            uid_base: self.uid_base,
            uid_count: self.uid_count,
            dir: data_dir.join("jail"),
            cgroups,
            mem_overhead_mib: self.mem_overhead_mib,
        }
    }
}

/// A new VM's confinement (None: off) and the allocation lock, held until it is recorded.
pub(crate) type Allocated = (
    Option<Confinement>,
    Option<tokio::sync::MutexGuard<'static, ()>>,
);

/// Serialises uid allocation (pick + record) within this hutchd.
static ALLOCATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Node {
    /// A uid of its own for a new VM when confinement is on: the lowest of the range that no
    /// VM of this node holds and no process on the host runs as. The caller records it (in the
    /// VM's create transaction) while it holds the returned guard, so no other allocation sees
    /// the uid as free meanwhile.
    pub(crate) async fn allocate_uid(&self) -> Result<Allocated, ApiError> {
        let Some((base, count)) = self.cfg.jail_uids else {
            return Ok((None, None));
        };
        let g = ALLOCATE.lock().await;
        let mut used: Vec<u32> = self
            .records
            .local_vms()
            .await?
            .iter()
            .filter_map(|v| v.confinement.as_ref().map(|c| c.uid))
            .collect();
        used.extend(hutch_vmm::jail::uids_in_use());
        let uid = hutch_vmm::jail::allocate_uid(base, count, &used).ok_or_else(|| {
            ApiError::Conflict(format!(
                "no free VM uid left in {base}..{} (hutchd --jail-uid-count)",
                u64::from(base) + u64::from(count)
            ))
        })?;
        Ok((
            Some(Confinement {
                uid,
                gid: uid,
                ..Default::default()
            }),
            Some(g),
        ))
    }

    /// `vm` with a uid of its own when confinement is on and it has none yet (VMs made before
    /// confinement): one is allocated and recorded.
    pub(crate) async fn with_jail_uid(&self, vm: &Vm) -> Result<Vm, ApiError> {
        let Some((base, count)) = self.cfg.jail_uids else {
            return Ok(vm.clone());
        };
        let in_range = |u: u32| u >= base && u - base < count;
        if vm.confinement.as_ref().is_some_and(|c| in_range(c.uid)) {
            return Ok(vm.clone());
        }
        let (conf, _held) = self.allocate_uid().await?;
        self.update(&vm.id, |v| v.confinement = conf.clone()).await
    }

    /// Frees VM `id`'s cgroup and jail (its QEMU is gone); failures are logged.
    pub(crate) fn release_jail(&self, id: &str) {
        if let Err(e) = self.vmm.release(id) {
            tracing::warn!(id, error = %e, "releasing the VM's cgroup and jail");
        }
    }
}
