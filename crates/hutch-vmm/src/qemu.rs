//! The QEMU backend: launches `qemu-system-x86_64 -daemonize` and recognises its processes.

use crate::{cmdline, VmProcess, VmSpec, Vmm, VmmError};
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub struct Qemu {
    pub binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            binary: "qemu-system-x86_64".into(),
        }
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { context, source }
}

impl Vmm for Qemu {
    fn launch(&self, spec: &VmSpec) -> Result<VmProcess, VmmError> {
        std::fs::create_dir_all(&spec.runtime_dir)
            .map_err(io(format!("creating {}", spec.runtime_dir.display())))?;
        for stale in [spec.pidfile(), spec.qmp_socket(), spec.agent_socket()] {
            let _ = std::fs::remove_file(stale);
        }
        let args = cmdline::build(spec);
        tracing::debug!(id = %spec.id, ?args, "launching qemu");
        // With -daemonize the process we start exits once QEMU is initialised (sockets bound);
        // the VM lives on in a grandchild that is not ours and survives hutchd.
        let out = Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(io(format!("running {}", self.binary.display())))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(VmmError::Launch(if msg.is_empty() {
                out.status.to_string()
            } else {
                msg
            }));
        }
        let pid = std::fs::read_to_string(spec.pidfile())
            .map_err(io("reading qemu pidfile".into()))?
            .trim()
            .parse::<u32>()
            .map_err(|e| VmmError::Launch(format!("bad pidfile: {e}")))?;
        Ok(VmProcess { pid })
    }

    fn is_alive(&self, id: &str, pid: u32) -> bool {
        is_vm_process(id, pid)
    }

    fn kill(&self, id: &str, pid: u32) -> Result<(), VmmError> {
        if !is_vm_process(id, pid) {
            return Ok(());
        }
        // SAFETY: kill has no memory-safety preconditions; pid was checked to be our VM.
        if unsafe { libc::kill(pid as i32, libc::SIGKILL) } < 0 {
            return Err(io(format!("killing qemu {pid}"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Whether `pid` is alive and is the QEMU process of VM `id` (pids are reused).
pub fn is_vm_process(id: &str, pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited already.
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            return false;
        }
    }
    let tag = format!("hutch-{id},");
    cmdline
        .split(|&b| b == 0)
        .any(|a| a.starts_with(tag.as_bytes()))
}
