//! The `Vmm` backend trait and the QEMU backend.
//!
//! A VM is one QEMU process that outlives hutchd: it runs in a session of its own, and
//! everything needed to find it again lives in its runtime directory (QMP socket, agent socket)
//! and its record (pid). Each QEMU is confined ([`jail`], [`cgroup`]). See `docs/architecture.md`.

pub mod accel;
pub mod cgroup;
pub mod cmdline;
pub mod jail;
pub mod qcow2;
pub mod qemu;
pub mod qmp;
pub mod version;

pub use accel::{detect_accel, Accel, AccelChoice};
pub use jail::JailConfig;
pub use qemu::Qemu;
pub use version::{check_qemu, MIN_QEMU};

use std::path::PathBuf;

/// Everything a backend needs to launch one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Stable VM id; also tags the process so it can be recognised after a hutchd restart.
    pub id: String,
    pub hostname: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Read-only image filesystem (EROFS), attached with serial `hutch-image`.
    pub image_disk: PathBuf,
    /// The VM's writable disk (qcow2), attached with serial `hutch-data`.
    pub data_disk: PathBuf,
    /// Holds `qmp.sock`, `agent.sock` and `qemu.log` (QEMU's own stderr).
    pub runtime_dir: PathBuf,
    pub console_log: PathBuf,
    pub accel: Accel,
    /// The unprivileged uid QEMU runs as (None: not confined; the backend must have a
    /// [`JailConfig`] for it to apply).
    pub jail_uid: Option<u32>,
}

impl VmSpec {
    pub fn log_file(&self) -> PathBuf {
        self.runtime_dir.join("qemu.log")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.runtime_dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.runtime_dir.join("agent.sock")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu failed to start: {0}")]
    Launch(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("{0}")]
    Version(String),
    #[error("accelerator {0} is not usable here: {1}")]
    Accel(&'static str, String),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
}

/// A running VM process as the backend knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmProcess {
    pub pid: u32,
    /// How it is confined (None: it is not).
    pub confinement: Option<hutch_core::Confinement>,
}

/// A VM backend. Implementations must leave VMs running when the daemon process dies.
pub trait Vmm: Send + Sync {
    /// Starts the VM described by `spec`; returns once the process runs (not once the guest booted).
    fn launch(&self, spec: &VmSpec) -> Result<VmProcess, VmmError>;
    /// Whether `pid` is still the VM process of `id` (and not a reused pid).
    fn is_alive(&self, id: &str, pid: u32) -> bool;
    /// Kills the VM process at once (SIGKILL); used when a graceful stop did not finish.
    fn kill(&self, id: &str, pid: u32) -> Result<(), VmmError>;
    /// Frees what confined VM `id` (its cgroup, its jail directory), killing anything left in
    /// its cgroup; called once its process is gone. Doing it twice is harmless.
    fn release(&self, _id: &str) -> Result<(), VmmError> {
        Ok(())
    }
    /// Releases the confinement of every VM this node has one for that is not in `keep`
    /// (leftovers of VMs removed or crashed while hutchd was not running).
    fn reconcile(&self, _keep: &[String]) -> Result<(), VmmError> {
        Ok(())
    }
}
