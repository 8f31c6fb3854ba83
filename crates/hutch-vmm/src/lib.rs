//! The `Vmm` backend trait and the QEMU backend.
//!
//! A VM is one QEMU process that outlives hutchd: it runs in a session of its own, and
//! everything needed to find it again lives in its runtime directory (QMP socket, agent socket)
//! and its record (pid). Each QEMU is confined ([`jail`], [`cgroup`]). See `docs/architecture.md`.

pub mod accel;
pub mod cgroup;
pub mod cmdline;
#[cfg(any(test, feature = "fakes"))]
pub mod fake;
pub mod jail;
pub mod qcow2;
pub mod qemu;
pub mod qmp;
pub mod version;

pub use accel::{detect_accel, Accel, AccelChoice};
pub use jail::JailConfig;
pub use qemu::Qemu;
pub use version::{check_qemu, MIN_QEMU};

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

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
    /// The VM's NIC (None: no network).
    pub nic: Option<Nic>,
    /// More kernel command line words (the network's `hutch.ip=...` for the agent).
    pub cmdline_extra: String,
}

/// A virtio-net NIC on an existing TAP device (hutchd makes the TAP; the backend opens it and
/// hands QEMU the descriptor).
#[derive(Debug, Clone, PartialEq)]
pub struct Nic {
    pub tap: String,
    pub mac: String,
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
    /// The handle of this VM's process `pid`.
    pub fn handle(&self, pid: u32) -> VmHandle {
        VmHandle {
            id: self.id.clone(),
            pid,
            runtime_dir: self.runtime_dir.clone(),
        }
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
    #[error("the {backend} backend cannot {op} VMs yet")]
    Unsupported {
        backend: &'static str,
        op: &'static str,
    },
}

/// A VM process as the backend knows it: which VM, which process, and the runtime directory
/// that holds its control sockets. Everything needed to find a VM again after a hutchd restart.
#[derive(Debug, Clone, PartialEq)]
pub struct VmHandle {
    pub id: String,
    pub pid: u32,
    pub runtime_dir: PathBuf,
}

impl VmHandle {
    pub fn qmp_socket(&self) -> PathBuf {
        self.runtime_dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.runtime_dir.join("agent.sock")
    }
    pub fn log_file(&self) -> PathBuf {
        self.runtime_dir.join("qemu.log")
    }
}

/// A launched VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmProcess {
    pub handle: VmHandle,
    /// How it is confined (None: it is not).
    pub confinement: Option<hutch_core::Confinement>,
}

/// How a VM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// QEMU exited with status 0: the guest powered off, or QEMU was asked to quit.
    Clean,
    /// Killed by a signal or a non-zero status (the text says which).
    Crashed(String),
    /// Not known: the process was not this backend's child (it was launched before a restart of
    /// hutchd), or it has not ended.
    Unknown,
}

/// A VM backend. Implementations must leave VMs running when the daemon process dies. What a
/// backend cannot do yet answers [`VmmError::Unsupported`] (the defaults below), never panics.
pub trait Vmm: Send + Sync {
    /// The backend's name, for messages ("qemu").
    fn name(&self) -> &'static str;
    /// Starts the VM described by `spec`; returns once the process runs (not once the guest booted).
    fn launch(&self, spec: &VmSpec) -> Result<VmProcess, VmmError>;
    /// Whether the handle's process is still the VM process (and not a reused pid).
    fn is_alive(&self, vm: &VmHandle) -> bool;
    /// Resolves once the handle's process has ended. The default polls [`Vmm::is_alive`];
    /// backends with a way to be told (QEMU: a pidfd) override it.
    fn wait<'a>(&'a self, vm: &'a VmHandle) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            while self.is_alive(vm) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    }
    /// How the process ended, once it has.
    fn exit(&self, _vm: &VmHandle) -> VmExit {
        VmExit::Unknown
    }
    /// Asks the VMM to end the VM now (QEMU: QMP `quit`), without waiting for the guest.
    fn quit(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.kill(vm)
    }
    /// Kills the VM process at once (SIGKILL); used when a graceful stop did not finish.
    fn kill(&self, vm: &VmHandle) -> Result<(), VmmError>;
    /// Makes a VM's writable disk at `disk`: a copy-on-write overlay over the raw `template`,
    /// or (a clone) a copy of the disk `from`. The disk is flushed when this returns.
    fn create_disk(
        &self,
        disk: &std::path::Path,
        template: &std::path::Path,
        from: Option<&std::path::Path>,
    ) -> Result<(), VmmError>;
    /// Stops the guest's CPUs; memory stays allocated.
    fn pause(&self, _vm: &VmHandle) -> Result<(), VmmError> {
        Err(self.unsupported("pause"))
    }
    /// Lets a paused guest run again.
    fn resume(&self, _vm: &VmHandle) -> Result<(), VmmError> {
        Err(self.unsupported("resume"))
    }
    /// Writes the VM's memory and device state under `dir`.
    fn snapshot(&self, _vm: &VmHandle, _dir: &std::path::Path) -> Result<(), VmmError> {
        Err(self.unsupported("snapshot"))
    }
    /// Launches `spec` from a snapshot written by [`Vmm::snapshot`].
    fn restore(&self, _spec: &VmSpec, _dir: &std::path::Path) -> Result<VmProcess, VmmError> {
        Err(self.unsupported("restore"))
    }
    /// Moves the running VM to the VMM listening at `to`.
    fn migrate(&self, _vm: &VmHandle, _to: &str) -> Result<(), VmmError> {
        Err(self.unsupported("migrate"))
    }
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
    /// The error for an operation this backend does not have.
    fn unsupported(&self, op: &'static str) -> VmmError {
        VmmError::Unsupported {
            backend: self.name(),
            op,
        }
    }
}
