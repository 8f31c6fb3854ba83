//! The `Vmm` backend trait and the QEMU backend.
//!
//! A VM is one QEMU process that outlives hutchd: it is started with `-daemonize`, so it is not
//! hutchd's child, and everything needed to find it again lives in its runtime directory
//! (pidfile, QMP socket, agent socket). See `docs/architecture.md`.

pub mod accel;
pub mod cmdline;
pub mod qemu;
pub mod qmp;
pub mod version;

pub use accel::{detect_accel, Accel, AccelChoice};
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
    /// Holds `qemu.pid`, `qmp.sock`, `agent.sock`.
    pub runtime_dir: PathBuf,
    pub console_log: PathBuf,
    pub accel: Accel,
}

impl VmSpec {
    pub fn pidfile(&self) -> PathBuf {
        self.runtime_dir.join("qemu.pid")
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
}

/// A running VM process as the backend knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmProcess {
    pub pid: u32,
}

/// A VM backend. Implementations must leave VMs running when the daemon process dies.
pub trait Vmm: Send + Sync {
    /// Starts the VM described by `spec`; returns once the process runs (not once the guest booted).
    fn launch(&self, spec: &VmSpec) -> Result<VmProcess, VmmError>;
    /// Whether `pid` is still the VM process of `id` (and not a reused pid).
    fn is_alive(&self, id: &str, pid: u32) -> bool;
    /// Kills the VM process at once (SIGKILL); used when a graceful stop did not finish.
    fn kill(&self, id: &str, pid: u32) -> Result<(), VmmError>;
}
