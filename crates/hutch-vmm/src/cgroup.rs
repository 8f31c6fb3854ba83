//! One cgroup per VM, on cgroup v2 (unified) or v1 (one hierarchy per controller), behind one
//! small type.
//!
//! Layout: `ROOT/PARENT/NODE/ID` on v2, `ROOT/{memory,cpu,pids}/PARENT/NODE/ID` on v1, where
//! NODE names one hutchd (a hash of its data dir, so two daemons on one host never reconcile
//! each other's cgroups) and ID is the VM id. The QEMU process joins its cgroup in `pre_exec`
//! (by writing `0` to `cgroup.procs`), so every thread it ever makes is inside from the start.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("cgroup of {0} still has processes after killing them")]
    Busy(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CgroupError {
    let what = what.into();
    move |e| CgroupError::Io(what, e)
}

/// The cgroup controllers hutch uses.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// What one VM's cgroup is limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub pids: u64,
}

/// Which cgroup layout the host mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller under ROOT/CONTROLLER (this project's build machines).
    V1,
    /// The unified hierarchy at ROOT (modern systemd hosts).
    V2,
}

/// The cgroups of one hutchd: `ROOT[/CONTROLLER]/PARENT/NODE`.
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub version: Version,
    pub root: PathBuf,
    /// `PARENT/NODE`, relative.
    pub base: PathBuf,
}

/// A stable short name for the hutchd that owns `data_dir` (FNV-1a of the path).
pub fn node_name(data_dir: &Path) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

impl Cgroups {
    /// Finds the layout under `root` (normally /sys/fs/cgroup): v2 when it is the unified
    /// hierarchy with our controllers available, v1 when each controller has its own mount.
    /// None when neither is usable.
    pub fn detect(root: &Path, parent: &str, node: &str) -> Option<Cgroups> {
        let base = Path::new(parent).join(node);
        if let Ok(c) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let have: Vec<&str> = c.split_whitespace().collect();
            if CONTROLLERS.iter().all(|k| have.contains(k)) {
                return Some(Cgroups {
                    version: Version::V2,
                    root: root.into(),
                    base,
                });
            }
        }
        if CONTROLLERS
            .iter()
            .all(|k| root.join(k).join("cgroup.procs").exists())
        {
            return Some(Cgroups {
                version: Version::V1,
                root: root.into(),
                base,
            });
        }
        None
    }

    /// The directories that make up cgroup `id` (one on v2, one per controller on v1).
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.node_dirs().into_iter().map(|d| d.join(id)).collect()
    }

    fn node_dirs(&self) -> Vec<PathBuf> {
        match self.version {
            Version::V2 => vec![self.root.join(&self.base)],
            Version::V1 => CONTROLLERS
                .iter()
                .map(|k| self.root.join(k).join(&self.base))
                .collect(),
        }
    }

    /// The cgroup's path below the hierarchy root, as `/proc/PID/cgroup` shows it.
    pub fn path(&self, id: &str) -> String {
        format!("/{}", self.base.join(id).display())
    }

    /// The files a process writes `0` to in order to join cgroup `id`.
    pub fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        self.dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Creates cgroup `id` (again, if it exists) and writes its limits.
    pub fn create(&self, id: &str, l: &Limits) -> Result<(), CgroupError> {
        if self.version == Version::V2 {
            self.enable_controllers()?;
        }
        for d in self.dirs(id) {
            std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
        }
        let write = |file: PathBuf, v: String| {
            std::fs::write(&file, v).map_err(io(format!("writing {}", file.display())))
        };
        match self.version {
            Version::V2 => {
                let d = self.root.join(&self.base).join(id);
                write(d.join("memory.max"), l.memory_bytes.to_string())?;
                // No swap: the limit is the memory the VM may really use.
                if d.join("memory.swap.max").exists() {
                    write(d.join("memory.swap.max"), "0".into())?;
                }
                write(
                    d.join("cpu.max"),
                    format!("{} {}", l.cpu_quota_us, l.cpu_period_us),
                )?;
                write(d.join("pids.max"), l.pids.to_string())?;
            }
            Version::V1 => {
                let d = |k: &str| self.root.join(k).join(&self.base).join(id);
                write(
                    d("memory").join("memory.limit_in_bytes"),
                    l.memory_bytes.to_string(),
                )?;
                write(
                    d("cpu").join("cpu.cfs_period_us"),
                    l.cpu_period_us.to_string(),
                )?;
                write(
                    d("cpu").join("cpu.cfs_quota_us"),
                    l.cpu_quota_us.to_string(),
                )?;
                write(d("pids").join("pids.max"), l.pids.to_string())?;
            }
        }
        Ok(())
    }

    /// v2: a controller is usable in a child only when every ancestor lists it in
    /// `cgroup.subtree_control`; enables memory, cpu and pids from the root down to NODE.
    fn enable_controllers(&self) -> Result<(), CgroupError> {
        let mut d = self.root.clone();
        let enable: String = CONTROLLERS.iter().map(|k| format!("+{k} ")).collect();
        let mut parts = vec![PathBuf::new()];
        for c in self.base.components() {
            parts.push(c.as_os_str().into());
        }
        for p in parts {
            d.push(p);
            std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
            let f = d.join("cgroup.subtree_control");
            let now = std::fs::read_to_string(&f).unwrap_or_default();
            if CONTROLLERS
                .iter()
                .all(|k| now.split_whitespace().any(|w| w == *k))
            {
                continue;
            }
            std::fs::write(&f, enable.trim_end())
                .map_err(io(format!("enabling controllers in {}", f.display())))?;
        }
        Ok(())
    }

    /// Reads back the limits of cgroup `id`.
    pub fn read(&self, id: &str) -> Result<Limits, CgroupError> {
        let num = |p: PathBuf| -> Result<String, CgroupError> {
            std::fs::read_to_string(&p)
                .map(|s| s.trim().to_string())
                .map_err(io(format!("reading {}", p.display())))
        };
        let parse = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX);
        Ok(match self.version {
            Version::V2 => {
                let d = self.root.join(&self.base).join(id);
                let cpu = num(d.join("cpu.max"))?;
                let mut it = cpu.split_whitespace();
                let q = parse(it.next().unwrap_or("max"));
                let p = parse(it.next().unwrap_or("100000"));
                Limits {
                    memory_bytes: parse(&num(d.join("memory.max"))?),
                    cpu_quota_us: q,
                    cpu_period_us: p,
                    pids: parse(&num(d.join("pids.max"))?),
                }
            }
            Version::V1 => {
                let d = |k: &str| self.root.join(k).join(&self.base).join(id);
                Limits {
                    memory_bytes: parse(&num(d("memory").join("memory.limit_in_bytes"))?),
                    cpu_quota_us: parse(&num(d("cpu").join("cpu.cfs_quota_us"))?),
                    cpu_period_us: parse(&num(d("cpu").join("cpu.cfs_period_us"))?),
                    pids: parse(&num(d("pids").join("pids.max"))?),
                }
            }
        })
    }

    /// The pids in cgroup `id` (empty when it does not exist).
    pub fn pids(&self, id: &str) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .procs_files(id)
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Kills whatever still runs in cgroup `id`, then removes it (and NODE when it is empty).
    /// Removing a cgroup that does not exist is not an error.
    pub fn remove(&self, id: &str) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids(id);
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy(id.into()));
            }
            for p in pids {
                // SAFETY: kill has no memory-safety preconditions; the pid is in our cgroup.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in self.dirs(id) {
            // An exited process leaves its cgroup a moment after it is gone from cgroup.procs.
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io(format!("removing {}", d.display()))(e)),
                }
            }
        }
        for d in self.node_dirs() {
            // Fails while another VM's cgroup is still there: fine.
            let _ = std::fs::remove_dir(&d);
        }
        Ok(())
    }

    /// The VM ids that have a cgroup of this node.
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .node_dirs()
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    fn limits() -> Limits {
        Limits {
            memory_bytes: 300 << 20,
            cpu_quota_us: 200_000,
            cpu_period_us: 100_000,
            pids: 130,
        }
    }

    #[test]
    fn detects_v1_v2_hybrid_and_nothing() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        assert!(Cgroups::detect(r, "hutch", "n").is_none());
        // v1 (as on this project's build machines), with an empty unified mount beside it.
        for k in CONTROLLERS {
            touch(&r.join(k).join("cgroup.procs"), "");
        }
        touch(&r.join("unified/cgroup.controllers"), "");
        let c = Cgroups::detect(r, "hutch", "n").unwrap();
        assert_eq!(c.version, Version::V1);
        assert_eq!(
            c.procs_files("vm1"),
            ["memory", "cpu", "pids"].map(|k| r.join(k).join("hutch/n/vm1/cgroup.procs"))
        );
        // v2 with our controllers wins; without them it is not usable.
        let t2 = tempfile::tempdir().unwrap();
        touch(&t2.path().join("cgroup.controllers"), "cpuset cpu io\n");
        assert!(Cgroups::detect(t2.path(), "hutch", "n").is_none());
        touch(
            &t2.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        );
        let c = Cgroups::detect(t2.path(), "hutch", "n").unwrap();
        assert_eq!(c.version, Version::V2);
        assert_eq!(
            c.procs_files("vm1"),
            [t2.path().join("hutch/n/vm1/cgroup.procs")]
        );
        assert_eq!(c.path("vm1"), "/hutch/n/vm1");
    }

    #[test]
    fn v1_limits_go_to_each_controller() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for k in CONTROLLERS {
            touch(&r.join(k).join("cgroup.procs"), "");
        }
        let c = Cgroups::detect(r, "hutch", "n").unwrap();
        c.create("vm1", &limits()).unwrap();
        let rd = |p: &str| std::fs::read_to_string(r.join(p)).unwrap();
        assert_eq!(rd("memory/hutch/n/vm1/memory.limit_in_bytes"), "314572800");
        assert_eq!(rd("cpu/hutch/n/vm1/cpu.cfs_quota_us"), "200000");
        assert_eq!(rd("cpu/hutch/n/vm1/cpu.cfs_period_us"), "100000");
        assert_eq!(rd("pids/hutch/n/vm1/pids.max"), "130");
        assert_eq!(c.read("vm1").unwrap(), limits());
        assert_eq!(c.list(), ["vm1"]);
        // Processes show through cgroup.procs of every hierarchy, counted once.
        touch(&r.join("memory/hutch/n/vm1/cgroup.procs"), "7\n9\n");
        touch(&r.join("pids/hutch/n/vm1/cgroup.procs"), "9\n");
        assert_eq!(c.pids("vm1"), [7, 9]);
    }

    #[test]
    fn v2_enables_controllers_down_the_tree_and_reads_max() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        touch(&r.join("cgroup.controllers"), "cpu memory pids");
        touch(&r.join("cgroup.subtree_control"), "cpu memory pids");
        let c = Cgroups::detect(r, "hutch", "n").unwrap();
        c.create("vm1", &limits()).unwrap();
        let rd = |p: &str| std::fs::read_to_string(r.join(p)).unwrap();
        // Already enabled at the root: left alone; enabled in PARENT and NODE.
        assert_eq!(rd("cgroup.subtree_control"), "cpu memory pids");
        assert_eq!(rd("hutch/cgroup.subtree_control"), "+memory +cpu +pids");
        assert_eq!(rd("hutch/n/cgroup.subtree_control"), "+memory +cpu +pids");
        assert_eq!(rd("hutch/n/vm1/memory.max"), "314572800");
        assert_eq!(rd("hutch/n/vm1/cpu.max"), "200000 100000");
        assert_eq!(rd("hutch/n/vm1/pids.max"), "130");
        assert_eq!(c.read("vm1").unwrap(), limits());
        // "max" reads as unlimited.
        touch(&r.join("hutch/n/vm1/cpu.max"), "max 100000\n");
        assert_eq!(c.read("vm1").unwrap().cpu_quota_us, u64::MAX);
    }

    #[test]
    fn node_names_differ_per_data_dir_and_are_stable() {
        let a = node_name(Path::new("/var/lib/hutch"));
        assert_eq!(a, node_name(Path::new("/var/lib/hutch")));
        assert_ne!(a, node_name(Path::new("/tmp/hutch-t1")));
        assert_eq!(a.len(), 12);
    }

    /// On the real cgroupfs of this host (v1 or v2, when writable): a cgroup is created with its
    /// limits, a process that writes `0` to cgroup.procs lands in it, and remove kills it and
    /// leaves no directory. Skipped where /sys/fs/cgroup offers neither layout.
    #[test]
    fn real_cgroupfs_roundtrip() {
        let node = format!("unit-{}", std::process::id());
        let Some(c) = Cgroups::detect(Path::new("/sys/fs/cgroup"), "hutch-test", &node) else {
            eprintln!("no usable cgroupfs here; skipped");
            return;
        };
        if unsafe_geteuid() != 0 {
            eprintln!("not root; skipped");
            return;
        }
        c.create("vm1", &limits()).unwrap();
        assert_eq!(c.read("vm1").unwrap(), limits());
        let files: Vec<String> = c
            .procs_files("vm1")
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let script = files
            .iter()
            .map(|f| format!("echo 0 > {f}; "))
            .collect::<String>()
            + "exec sleep 30";
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.pids("vm1") != [pid] && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(c.pids("vm1"), [pid]);
        std::thread::spawn(move || child.wait());
        c.remove("vm1").unwrap();
        for d in c.dirs("vm1") {
            assert!(!d.exists(), "{} left behind", d.display());
        }
        assert!(c.list().is_empty());
        for d in c.node_dirs() {
            assert!(!d.exists());
            let _ = std::fs::remove_dir(d.parent().unwrap());
        }
    }

    fn unsafe_geteuid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }
}
