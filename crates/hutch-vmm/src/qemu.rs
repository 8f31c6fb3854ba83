//! The QEMU backend: opens a VM's files and sockets, starts `qemu-system-x86_64` confined (see
//! [`crate::jail`]) and recognises its processes.
//!
//! QEMU gets every host resource as an inherited descriptor: disks and the console through
//! `-add-fd` fd sets, kernel and initrd through `/proc/self/fd`, QMP and agent as listening
//! sockets hutchd bound, the jail directory for `-run-with chroot=`. So a confined QEMU needs
//! no access to any host path, and the data dir stays 0700 root.

use crate::cmdline::{self, Fds};
use crate::jail::{self, Identity, JailConfig};
use crate::{Accel, Memory, Saved, VmExit, VmHandle, VmProcess, VmSpec, Vmm, VmmError};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Qemu {
    pub binary: PathBuf,
    /// Confinement settings; None runs QEMU as hutchd's user, unconfined but for seccomp.
    pub jail: Option<JailConfig>,
    /// Exit statuses of the QEMUs this process launched and reaped, by pid (bounded: a status
    /// is taken out when read, and the map is cleared past [`MAX_EXITS`]).
    exits: Arc<Mutex<HashMap<u32, std::process::ExitStatus>>>,
}

/// Bytes per second a save may write (the migration default of 128 MiB/s is meant for links).
const SAVE_BANDWIDTH: u64 = 1 << 40;
/// How long a save may take (a guest's whole RAM, when it is not in a shared file).
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Exit statuses kept for [`Vmm::exit`] before the oldest are dropped.
const MAX_EXITS: usize = 4096;

impl Qemu {
    pub fn new(binary: PathBuf, jail: Option<JailConfig>) -> Qemu {
        Qemu {
            binary,
            jail,
            exits: Arc::default(),
        }
    }
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu::new("qemu-system-x86_64".into(), None)
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { context, source }
}

fn open(p: &Path, o: &mut OpenOptions) -> Result<File, VmmError> {
    o.open(p).map_err(io(format!("opening {}", p.display())))
}

/// Makes `f` (a kernel or initrd: public content) readable by the VM's uid, which reopens it
/// through `/proc/self/fd`.
fn share_read(f: &File, p: &Path) -> Result<(), VmmError> {
    let m = f.metadata().map_err(io(format!("stat {}", p.display())))?;
    if m.mode() & 0o004 == 0 {
        tracing::info!(file = %p.display(), "making readable for confined QEMUs");
        f.set_permissions(std::fs::Permissions::from_mode((m.mode() & 0o7777) | 0o044))
            .map_err(io(format!("chmod {}", p.display())))?;
    }
    Ok(())
}

/// Gives `f` (a VM's own disk or console) to `uid` alone.
fn own(f: &File, p: &Path, uid: u32) -> Result<(), VmmError> {
    std::os::unix::fs::fchown(f, Some(uid), Some(uid))
        .map_err(io(format!("chown {}", p.display())))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", p.display())))
}

/// Everything opened for one launch; dropped (closed in hutchd) once QEMU runs.
struct Opened {
    _files: Vec<File>,
    _sockets: Vec<std::os::unix::net::UnixListener>,
    fds: Fds,
    procs: Vec<File>,
}

impl Qemu {
    fn confined(&self, spec: &VmSpec) -> Option<(&JailConfig, u32)> {
        match (&self.jail, spec.jail_uid) {
            (Some(j), Some(uid)) => Some((j, uid)),
            _ => None,
        }
    }

    fn open_all(&self, spec: &VmSpec) -> Result<Opened, VmmError> {
        let jailed = self.confined(spec);
        let ro = || {
            let mut o = OpenOptions::new();
            o.read(true);
            o
        };
        let kernel = open(&spec.kernel, &mut ro())?;
        let initrd = open(&spec.initrd, &mut ro())?;
        let image = open(&spec.image_disk, &mut ro())?;
        let data = open(&spec.data_disk, OpenOptions::new().read(true).write(true))?;
        let console = open(
            &spec.console_log,
            OpenOptions::new().append(true).create(true).mode(0o600),
        )?;
        if spec.backing.len() > cmdline::MAX_LAYERS {
            return Err(VmmError::Launch(format!(
                "the disk has {} layers; at most {} are supported",
                spec.backing.len(),
                cmdline::MAX_LAYERS
            )));
        }
        let mut backing = Vec::new();
        for l in &spec.backing {
            backing.push((open(&l.path, &mut ro())?, l.format, l.path.clone()));
        }
        let memory = match &spec.memory {
            Some(Memory::Own(p)) => {
                let f = open(p, OpenOptions::new().read(true).write(true))?;
                let want = spec.mem_mib << 20;
                let len = f
                    .metadata()
                    .map_err(io(format!("stat {}", p.display())))?
                    .len();
                if len != want {
                    // A new VM's file, or one whose memory size changed while it was stopped.
                    f.set_len(want)
                        .map_err(io(format!("sizing {}", p.display())))?;
                }
                Some((f, true, p))
            }
            Some(Memory::Cow(p)) => Some((open(p, &mut ro())?, false, p)),
            None => None,
        };
        let incoming = match &spec.incoming {
            Some(i) => Some(open(&i.state, &mut ro())?),
            None => None,
        };
        if let Some((_, uid)) = jailed {
            share_read(&kernel, &spec.kernel)?;
            share_read(&initrd, &spec.initrd)?;
            own(&data, &spec.data_disk, uid)?;
            own(&console, &spec.console_log, uid)?;
            // QEMU reopens its memory file through /proc/self/fd, as the VM's uid.
            match &memory {
                Some((f, true, p)) => own(f, p, uid)?,
                Some((f, false, p)) => share_read(f, p)?,
                None => {}
            }
        }
        let bind = |p: PathBuf| {
            std::os::unix::net::UnixListener::bind(&p)
                .map_err(io(format!("binding {}", p.display())))
        };
        let qmp = bind(spec.qmp_socket())?;
        let agent = bind(spec.agent_socket())?;
        let (jail_dir, procs) = match jailed {
            Some((j, _)) => {
                let d = j.jail_dir(&spec.id);
                std::fs::create_dir_all(&j.dir)
                    .map_err(io(format!("creating {}", j.dir.display())))?;
                // An empty directory it cannot write: nothing to read, nowhere to chroot to.
                match std::fs::remove_dir(&d) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(format!("clearing jail {}", d.display()))(e))
                    }
                    _ => {}
                }
                std::fs::create_dir(&d).map_err(io(format!("creating {}", d.display())))?;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555))
                    .map_err(io(format!("chmod {}", d.display())))?;
                let dir = open(&d, ro().custom_flags(libc::O_PATH | libc::O_DIRECTORY))?;
                let mut procs = Vec::new();
                if let Some(cg) = &j.cgroups {
                    cg.create(&spec.id, &j.limits(spec.vcpus, spec.mem_mib))?;
                    for f in cg.procs_files(&spec.id) {
                        procs.push(open(&f, OpenOptions::new().write(true))?);
                    }
                }
                (Some(dir), procs)
            }
            None => (None, Vec::new()),
        };
        let tap = match &spec.nic {
            Some(n) => Some(
                hutch_net::tap::open(&n.tap, true).map_err(io(format!("opening TAP {}", n.tap)))?,
            ),
            None => None,
        };
        let fds = Fds {
            kernel: kernel.as_raw_fd(),
            initrd: initrd.as_raw_fd(),
            image: image.as_raw_fd(),
            data: data.as_raw_fd(),
            backing: backing
                .iter()
                .map(|(f, fmt, p)| (f.as_raw_fd(), *fmt, p.clone()))
                .collect(),
            memory: memory.as_ref().map(|(f, own, _)| (f.as_raw_fd(), *own)),
            incoming: incoming.as_ref().map(|f| f.as_raw_fd()),
            console: console.as_raw_fd(),
            qmp: qmp.as_raw_fd(),
            agent: agent.as_raw_fd(),
            jail: jail_dir.as_ref().map(|d| d.as_raw_fd()),
            tap: tap.as_ref().map(|t| t.as_raw_fd()),
        };
        let mut files = vec![kernel, initrd, image, data, console];
        files.extend(backing.into_iter().map(|b| b.0));
        files.extend(memory.map(|m| m.0));
        files.extend(incoming);
        files.extend(jail_dir);
        files.extend(tap);
        Ok(Opened {
            _files: files,
            _sockets: vec![qmp, agent],
            fds,
            procs,
        })
    }

    fn confinement(&self, spec: &VmSpec) -> Option<hutch_core::Confinement> {
        let (j, uid) = self.confined(spec)?;
        Some(hutch_core::Confinement {
            uid,
            gid: uid,
            jail: Some(j.jail_dir(&spec.id).display().to_string()),
            seccomp: true,
            cgroup: j.cgroups.as_ref().map(|cg| {
                let l = j.limits(spec.vcpus, spec.mem_mib);
                hutch_core::CgroupLimits {
                    version: match cg.version {
                        crate::cgroup::Version::V1 => 1,
                        crate::cgroup::Version::V2 => 2,
                    },
                    path: cg.path(&spec.id),
                    memory_max_bytes: l.memory_bytes,
                    cpu_quota_us: l.cpu_quota_us,
                    cpu_period_us: l.cpu_period_us,
                    pids_max: l.pids,
                }
            }),
        })
    }

    fn start(&self, spec: &VmSpec) -> Result<u32, VmmError> {
        std::fs::create_dir_all(&spec.runtime_dir)
            .map_err(io(format!("creating {}", spec.runtime_dir.display())))?;
        std::fs::set_permissions(&spec.runtime_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", spec.runtime_dir.display())))?;
        for stale in [
            spec.qmp_socket(),
            spec.agent_socket(),
            spec.runtime_dir.join("qemu.pid"),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        let o = self.open_all(spec)?;
        let log = open(
            &spec.log_file(),
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600),
        )?;
        let log2 = log.try_clone().map_err(io("dup qemu.log".into()))?;
        let args = cmdline::build(spec, &o.fds);
        tracing::debug!(id = %spec.id, ?args, "launching qemu");
        let who = self.confined(spec).map(|(_, uid)| Identity {
            uid,
            gid: uid,
            groups: match spec.accel {
                // /dev/kvm is opened before the chroot; its group lets the uid open it.
                Accel::Kvm => std::fs::metadata("/dev/kvm")
                    .map(|m| vec![m.gid()])
                    .unwrap_or_default(),
                Accel::Tcg => vec![],
            },
        });
        let procs: Vec<RawFd> = o.procs.iter().map(|f| f.as_raw_fd()).collect();
        let keep = o.fds.all();
        let mut cmd = Command::new(&self.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: drop_privileges only makes system calls on the descriptors and values
        // captured here (allocated before the fork), as pre_exec requires.
        unsafe {
            cmd.pre_exec(move || jail::drop_privileges(&procs, &keep, who.as_ref()));
        }
        let mut child = cmd
            .spawn()
            .map_err(io(format!("running {}", self.binary.display())))?;
        let pid = child.id();
        // QEMU is our child until hutchd exits (then init's): reap it so it leaves no zombie,
        // and keep how it ended for the restart policy.
        let exits = self.exits.clone();
        std::thread::spawn(move || {
            if let Ok(st) = child.wait() {
                let mut m = exits.lock().unwrap_or_else(|e| e.into_inner());
                if m.len() >= MAX_EXITS {
                    m.clear();
                }
                m.insert(pid, st);
            }
        });
        drop(o);
        Ok(pid)
    }

    /// Loads the saved state QEMU was started to wait for (fd set [`cmdline::SET_STATE`]) and
    /// (`run`) lets the guest run on.
    fn load(
        &self,
        spec: &VmSpec,
        pid: u32,
        ignore_shared: bool,
        run: bool,
    ) -> Result<(), VmmError> {
        use serde_json::json;
        let mut q = crate::qmp::Blocking::connect(&spec.qmp_socket(), Duration::from_secs(10))?;
        q.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "x-ignore-shared", "state": ignore_shared },
            ]})),
        )?;
        q.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("file:/dev/fdset/{}", cmdline::SET_STATE) })),
        )?;
        let deadline = Instant::now() + SAVE_TIMEOUT;
        loop {
            if !is_vm_process(&spec.id, pid) {
                let log = std::fs::read_to_string(spec.log_file()).unwrap_or_default();
                return Err(VmmError::Launch(format!(
                    "qemu exited while loading the saved state: {}",
                    log.trim()
                )));
            }
            let st = q.execute("query-status", None)?;
            match st["status"].as_str().unwrap_or("") {
                // The source was stopped when it saved, so the state loads as paused.
                "paused" | "postmigrate" | "prelaunch" if !run => {
                    // Held (to be moved): its disks are taken now, as a start would (QEMU 10
                    // leaves them inactive until the guest runs, and a mirror needs them).
                    crate::migrate::activate(&mut q)?;
                    return Ok(());
                }
                "paused" | "postmigrate" | "prelaunch" => {
                    q.execute("cont", None)?;
                }
                "running" => return Ok(()),
                "inmigrate" | "restore-vm" => {}
                other => {
                    return Err(VmmError::Launch(format!(
                        "loading the saved state left QEMU {other}"
                    )))
                }
            }
            if Instant::now() > deadline {
                return Err(VmmError::Launch("loading the saved state timed out".into()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until QEMU's main loop answers on QMP (and, when confined, it sits in its jail).
    fn wait_ready(&self, spec: &VmSpec, pid: u32) -> Result<(), VmmError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let jail = self.confined(spec).map(|(j, _)| j.jail_dir(&spec.id));
        let mut answered = false;
        loop {
            if !is_vm_process(&spec.id, pid) {
                let log = std::fs::read_to_string(spec.log_file()).unwrap_or_default();
                let log = log.trim();
                return Err(VmmError::Launch(if log.is_empty() {
                    "qemu exited during start-up".into()
                } else {
                    log.to_string()
                }));
            }
            if !answered {
                answered =
                    crate::qmp::ping_blocking(&spec.qmp_socket(), Duration::from_secs(2)).is_ok();
            }
            let in_jail = match &jail {
                None => true,
                Some(j) => std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| &r == j),
            };
            if answered && in_jail {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(VmmError::Launch(format!(
                    "qemu {pid} did not become ready (QMP answered: {answered}, chrooted: {in_jail})"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn launch(&self, spec: &VmSpec) -> Result<VmProcess, VmmError> {
        let t0 = Instant::now();
        let started = self.start(spec).and_then(|pid| {
            let spawned = t0.elapsed();
            self.wait_ready(spec, pid)
                .and_then(|_| {
                    let ready = t0.elapsed();
                    let r = match &spec.incoming {
                        Some(i) => self.load(spec, pid, i.ignore_shared, !spec.hold),
                        None => Ok(()),
                    };
                    tracing::debug!(id = %spec.id, ?spawned, ?ready, loaded = ?t0.elapsed(), "qemu launch phases");
                    r
                })
                .inspect_err(|_| {
                    let _ = self.kill(&spec.handle(pid));
                })?;
            Ok(pid)
        });
        match started {
            Ok(pid) => Ok(VmProcess {
                handle: spec.handle(pid),
                confinement: self.confinement(spec),
            }),
            Err(e) => {
                if self.confined(spec).is_some() {
                    if let Err(r) = self.release(&spec.id) {
                        tracing::warn!(id = %spec.id, error = %r, "releasing after a failed launch");
                    }
                }
                Err(e)
            }
        }
    }

    fn is_alive(&self, vm: &VmHandle) -> bool {
        is_vm_process(&vm.id, vm.pid)
    }

    fn wait<'a>(
        &'a self,
        vm: &'a VmHandle,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            // A pidfd becomes readable when the process exits (Linux >= 5.3); it refers to this
            // process, not to a later one with its pid. Polling stays as the fallback.
            if let Some(fd) = pidfd(vm.pid) {
                if is_vm_process(&vm.id, vm.pid) {
                    // SAFETY: `fd` is an open pidfd this AsyncFd owns (it is moved in) for its
                    // whole life, so the descriptor stays valid and the same.
                    let registered = unsafe {
                        tokio::io::unix::AsyncFd::register_with_interest(
                            fd,
                            tokio::io::Interest::READABLE,
                        )
                    };
                    if let Ok(afd) = registered {
                        let _ = afd.readable().await;
                        return;
                    }
                }
            }
            while is_vm_process(&vm.id, vm.pid) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn exit(&self, vm: &VmHandle) -> VmExit {
        use std::os::unix::process::ExitStatusExt;
        // The reaper thread may record the status just after the process disappears.
        for _ in 0..20 {
            let st = self
                .exits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&vm.pid);
            match st {
                Some(st) if st.success() => return VmExit::Clean,
                Some(st) => {
                    return VmExit::Crashed(match (st.code(), st.signal()) {
                        (Some(c), _) => format!("QEMU exited with status {c}"),
                        (_, Some(s)) => format!("QEMU was killed by signal {s}"),
                        _ => "QEMU ended abnormally".into(),
                    })
                }
                None if is_vm_process(&vm.id, vm.pid) => return VmExit::Unknown,
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        VmExit::Unknown
    }

    fn create_disk(
        &self,
        disk: &Path,
        base: &crate::Layer,
        from: Option<&Path>,
    ) -> Result<(), VmmError> {
        let mut cmd = match from {
            None => {
                let mut c = Command::new("qemu-img");
                c.args([
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    base.format.as_str(),
                    "-b",
                ])
                .arg(&base.path)
                .arg(disk);
                c
            }
            Some(src) => {
                let mut c = Command::new("cp");
                c.arg("--sparse=always").arg(src).arg(disk);
                c
            }
        };
        let tool = cmd.get_program().to_string_lossy().to_string();
        let o = cmd.output().map_err(io(format!("running {tool}")))?;
        if !o.status.success() {
            return Err(VmmError::Launch(format!(
                "{tool}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        let f = File::open(disk).map_err(io(format!("opening {}", disk.display())))?;
        f.sync_all()
            .map_err(io(format!("flushing {}", disk.display())))
    }

    fn quit(&self, vm: &VmHandle) -> Result<(), VmmError> {
        crate::qmp::execute_blocking(&vm.qmp_socket(), "quit", Duration::from_secs(2)).map(|_| ())
    }

    fn migrate_receive(
        &self,
        vm: &VmHandle,
        listener: RawFd,
        stream: RawFd,
    ) -> Result<(), VmmError> {
        crate::migrate::receive(&vm.qmp_socket(), listener, stream)
    }

    fn migrate_send(
        &self,
        vm: &VmHandle,
        disk: RawFd,
        state: RawFd,
    ) -> Result<crate::migrate::Sent, VmmError> {
        crate::migrate::send(&vm.qmp_socket(), disk, state)
    }

    fn migrate_complete(&self, vm: &VmHandle, run: bool) -> Result<(), VmmError> {
        crate::migrate::complete(&vm.qmp_socket(), Duration::from_secs(600), run)
    }

    fn pause(&self, vm: &VmHandle) -> Result<(), VmmError> {
        crate::qmp::execute_blocking(&vm.qmp_socket(), "stop", Duration::from_secs(5)).map(|_| ())
    }

    fn resume(&self, vm: &VmHandle) -> Result<(), VmmError> {
        crate::qmp::execute_blocking(&vm.qmp_socket(), "cont", Duration::from_secs(5)).map(|_| ())
    }

    fn save(&self, vm: &VmHandle, state: &Path, ignore_shared: bool) -> Result<Saved, VmmError> {
        use serde_json::json;
        let t = Instant::now();
        let f = open(
            state,
            OpenOptions::new().write(true).create_new(true).mode(0o600),
        )?;
        let mut q = crate::qmp::Blocking::connect(&vm.qmp_socket(), Duration::from_secs(10))?;
        q.execute("stop", None)?;
        q.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "x-ignore-shared", "state": ignore_shared },
            ]})),
        )?;
        // The default limit (128 MiB/s) is for links; this goes to a local file.
        q.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": SAVE_BANDWIDTH })),
        )?;
        let set = q.execute_with_fd(
            "add-fd",
            Some(json!({ "opaque": state.display().to_string() })),
            f.as_raw_fd(),
        )?;
        let set = set["fdset-id"]
            .as_u64()
            .ok_or_else(|| VmmError::Qmp(format!("add-fd answered {set}")))?;
        q.execute(
            "migrate",
            Some(json!({ "uri": format!("file:/dev/fdset/{set}") })),
        )?;
        let deadline = Instant::now() + SAVE_TIMEOUT;
        loop {
            let m = q.execute("query-migrate", None)?;
            match m["status"].as_str().unwrap_or("") {
                "completed" => break,
                s @ ("failed" | "cancelled") => {
                    return Err(VmmError::Qmp(format!(
                        "saving the state {s}: {}",
                        m["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() > deadline => {
                    let _ = q.execute("migrate_cancel", None);
                    return Err(VmmError::Qmp(format!(
                        "saving the state did not finish in {} s",
                        SAVE_TIMEOUT.as_secs()
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        f.sync_all()
            .map_err(io(format!("flushing {}", state.display())))?;
        let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Saved {
            bytes,
            ms: t.elapsed().as_millis() as u64,
        })
    }

    fn kill(&self, vm: &VmHandle) -> Result<(), VmmError> {
        let (id, pid) = (vm.id.as_str(), vm.pid);
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

    fn release(&self, id: &str) -> Result<(), VmmError> {
        let Some(j) = &self.jail else {
            return Ok(());
        };
        if let Some(cg) = &j.cgroups {
            cg.remove(id)?;
        }
        match std::fs::remove_dir(j.jail_dir(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("removing jail of {id}"))(e))
            }
            _ => Ok(()),
        }
    }

    fn reconcile(&self, keep: &[String]) -> Result<(), VmmError> {
        let Some(j) = &self.jail else {
            return Ok(());
        };
        let mut ids = j.cgroups.as_ref().map(|c| c.list()).unwrap_or_default();
        if let Ok(rd) = std::fs::read_dir(&j.dir) {
            ids.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string()),
            );
        }
        ids.sort();
        ids.dedup();
        for id in ids.iter().filter(|i| !keep.contains(i)) {
            tracing::info!(id = %id, "removing the confinement of a VM that no longer runs");
            self.release(id)?;
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

/// A pidfd for `pid` (None where the kernel has none or the process is gone).
fn pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor was just returned to us and is owned by nothing else.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
