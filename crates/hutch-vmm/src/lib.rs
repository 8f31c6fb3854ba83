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
pub mod migrate;
pub mod qemu;
pub mod qmp;
pub mod version;

pub use accel::{detect_accel, kvm_for_confined, Accel, AccelChoice};
pub use cmdline::DiskFormat;
pub use jail::JailConfig;
pub use qemu::Qemu;
pub use version::{check_qemu, MIN_QEMU};

use std::future::Future;
use std::os::fd::RawFd;
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
    /// Where guest RAM lives (None: anonymous memory, which no snapshot can share).
    pub memory: Option<Memory>,
    /// The frozen layers under `data_disk`, top first, down to the raw base filesystem. hutchd
    /// decides the chain from its records and never from the qcow2 headers, which the VM's
    /// (confined, but untrusted) QEMU can write.
    pub backing: Vec<Layer>,
    /// Start from saved device state instead of booting (a restore or a resume).
    pub incoming: Option<Incoming>,
    /// Start stopped, waiting for a live migration's state ([`Vmm::migrate_receive`]).
    pub migration_in: bool,
    /// Start and stay stopped: a boot waits before its first instruction (`-S`), a restore
    /// stays stopped once loaded. A VM that does not run, started only to be moved.
    pub hold: bool,
}

/// Where a VM's RAM lives. Either way it is a file, so that a snapshot of a VM whose RAM is its
/// own file writes only device state, and a restore maps memory instead of reading it
/// (docs/snapshots.md).
#[derive(Debug, Clone, PartialEq)]
pub enum Memory {
    /// A file the VM owns, mapped shared: the file *is* the guest's RAM.
    Own(PathBuf),
    /// A snapshot's memory file, mapped private and read-only on the host side: pages are
    /// shared with every other VM restored from it until the guest writes them (copy on write).
    Cow(PathBuf),
}

impl Memory {
    pub fn path(&self) -> &std::path::Path {
        match self {
            Memory::Own(p) | Memory::Cow(p) => p,
        }
    }
}

/// One frozen disk layer (a backing file).
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// Saved device state to start from.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The state written by [`Vmm::save`].
    pub state: PathBuf,
    /// It was saved without the RAM (which is in the memory file): both ends must agree.
    pub ignore_shared: bool,
}

/// What [`Vmm::save`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub bytes: u64,
    pub ms: u64,
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
    /// Makes a VM's writable disk at `disk`: a copy-on-write overlay over `base` (the raw empty
    /// filesystem, or a snapshot's frozen layer), or (a clone) a copy of the disk `from`. The
    /// disk is flushed when this returns.
    fn create_disk(
        &self,
        disk: &std::path::Path,
        base: &Layer,
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
    /// Stops the guest's CPUs and writes its device state to the new file `state` (flushed when
    /// this returns). With `ignore_shared` the RAM is left out when it is a shared file
    /// ([`Memory::Own`]), which then holds it; otherwise the RAM goes into `state` too. The VM
    /// stays stopped: a copy of it is started with [`VmSpec::incoming`].
    fn save(
        &self,
        _vm: &VmHandle,
        _state: &std::path::Path,
        _ignore_shared: bool,
    ) -> Result<Saved, VmmError> {
        Err(self.unsupported("snapshot"))
    }
    /// Live migration, target side, on a VM launched with [`VmSpec::migration_in`]: serves
    /// its writable disk over NBD on the listening socket `listener` and waits for the state
    /// on the connected socket `stream` ([`migrate`]).
    fn migrate_receive(
        &self,
        _vm: &VmHandle,
        _listener: RawFd,
        _stream: RawFd,
    ) -> Result<(), VmmError> {
        Err(self.unsupported("migrate"))
    }
    /// Live migration, source side: the disk into the target's export (`disk`, connected to
    /// its `listener`), then RAM and devices (`state`, connected to its `stream`). The VM ends
    /// stopped; on error it runs on.
    fn migrate_send(
        &self,
        _vm: &VmHandle,
        _disk: RawFd,
        _state: RawFd,
    ) -> Result<migrate::Sent, VmmError> {
        Err(self.unsupported("migrate"))
    }
    /// Live migration, target side: once the state is in, the disk export closed and (`run`)
    /// the guest running; without `run` it stays stopped (a VM moved at rest).
    fn migrate_complete(&self, _vm: &VmHandle, _run: bool) -> Result<(), VmmError> {
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
