//! Each VM's QEMU is confined (issue 7 section 4), shown on one real VM under TCG: not root,
//! seccomp on, its own cgroup with the expected limits, chrooted in an empty jail so host paths
//! cannot be opened (asked over QMP), only its uid can read its disk; the uid survives kill -9 of
//! hutchd and a restart; stop and rm leave no cgroup, jail or process; leftovers are reconciled
//! at start.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const CGROOT: &str = "/sys/fs/cgroup";

/// The directories of a cgroup (`version`, `path` as `describe --json` shows them).
fn cgroup_dirs(version: u64, path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    match version {
        2 => vec![Path::new(CGROOT).join(rel)],
        _ => ["memory", "cpu", "pids"]
            .iter()
            .map(|k| Path::new(CGROOT).join(k).join(rel))
            .collect(),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

fn status_field(pid: u64, key: &str) -> String {
    let s = read(Path::new(&format!("/proc/{pid}/status")));
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// One QMP command on the VM's monitor socket; the answer's `return` or `error`.
fn qmp(sock: &Path, cmd: &str, args: Value) -> Value {
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("QMP"), "{line}");
    let mut answer = |msg: Value| -> Value {
        writeln!(w, "{msg}").unwrap();
        loop {
            let mut l = String::new();
            assert!(r.read_line(&mut l).unwrap() > 0, "QMP closed");
            let v: Value = serde_json::from_str(&l).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    };
    answer(json!({"execute": "qmp_capabilities"}));
    answer(json!({"execute": cmd, "arguments": args}))
}

fn processes_of_uid(uid: u64) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .map(|r| r.split_whitespace().next() == Some(&uid.to_string()))
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn qemu_runs_confined() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let mut d = Daemon::start(&[]);
    d.json(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        "busybox",
    ]);
    let vm = d.json(&[
        "new", "--image", "busybox", "--name", "jailed", "--vcpu", "1", "--mem", "256",
    ]);
    assert_eq!(vm["state"], "running", "{vm}");
    let (id, pid) = (
        vm["id"].as_str().unwrap().to_string(),
        vm["pid"].as_u64().unwrap(),
    );
    let c = &vm["confinement"];
    let uid = c["uid"].as_u64().unwrap();

    // An unprivileged uid of the configured range, seccomp filter on, only CAP_SYS_CHROOT left.
    assert!((900_000..900_000 + 65_536).contains(&uid), "{c}");
    assert_eq!(
        status_field(pid, "Uid:"),
        vec![uid.to_string(); 4].join(" ")
    );
    assert_eq!(
        status_field(pid, "Gid:"),
        vec![uid.to_string(); 4].join(" ")
    );
    assert_eq!(status_field(pid, "Seccomp:"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "CapEff:"), "0000000000040000");
    assert_eq!(c["seccomp"], true);

    // Its own cgroup: memory = guest RAM + overhead, one CPU's worth of quota, a pids cap.
    let cg = &c["cgroup"];
    let overhead = hutch_vmm::jail::DEFAULT_MEM_OVERHEAD_MIB;
    assert_eq!(
        cg["memory_max_bytes"].as_u64(),
        Some((256 + overhead) << 20)
    );
    assert_eq!(cg["cpu_quota_us"].as_u64(), Some(100_000));
    assert_eq!(cg["cpu_period_us"].as_u64(), Some(100_000));
    assert_eq!(
        cg["pids_max"].as_u64(),
        Some(hutch_vmm::jail::PIDS_BASE + 1)
    );
    let (ver, path) = (
        cg["version"].as_u64().unwrap(),
        cg["path"].as_str().unwrap(),
    );
    assert!(path.ends_with(&format!("/{id}")), "{path}");
    let dirs = cgroup_dirs(ver, path);
    let file = |name: &str| {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|p| p.exists())
            .unwrap()
    };
    if ver == 2 {
        assert_eq!(
            read(&file("memory.max")),
            ((256 + overhead) << 20).to_string()
        );
        assert_eq!(read(&file("cpu.max")), "100000 100000");
    } else {
        assert_eq!(
            read(&file("memory.limit_in_bytes")),
            ((256 + overhead) << 20).to_string()
        );
        assert_eq!(read(&file("cpu.cfs_quota_us")), "100000");
        assert_eq!(read(&file("cpu.cfs_period_us")), "100000");
    }
    assert_eq!(
        read(&file("pids.max")),
        (hutch_vmm::jail::PIDS_BASE + 1).to_string()
    );
    for dir in &dirs {
        let procs = read(&dir.join("cgroup.procs"));
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{}: {procs}",
            dir.display()
        );
    }
    let own = read(Path::new(&format!("/proc/{pid}/cgroup")));
    assert!(own.lines().any(|l| l.ends_with(path)), "{own}");

    // Chrooted into an empty directory it cannot write.
    let jail = PathBuf::from(c["jail"].as_str().unwrap());
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        jail
    );
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);
    let jm = std::fs::metadata(&jail).unwrap();
    assert_eq!((jm.uid(), jm.permissions().mode() & 0o7777), (0, 0o555));
    assert!(!Path::new(&format!("/proc/{pid}/root/etc/hostname")).exists());

    // Only its uid can read its disk and console.
    for f in ["disk.qcow2", "console.log"] {
        let m = std::fs::metadata(d.data().join("vms").join(&id).join(f)).unwrap();
        assert_eq!((m.uid() as u64, m.mode() & 0o777), (uid, 0o600), "{f}");
    }

    // Asked over QMP to open host files, QEMU cannot: neither /etc/hostname nor its own disk
    // by host path. What it was handed still opens (the QMP route works).
    let sock = d.data().join("vms").join(&id).join("run/qmp.sock");
    let disk = d.data().join("vms").join(&id).join("disk.qcow2");
    for (n, host) in [("h1", "/etc/hostname"), ("h2", disk.to_str().unwrap())] {
        let r = qmp(
            &sock,
            "blockdev-add",
            json!({"driver": "file", "node-name": n, "filename": host, "read-only": true}),
        );
        let e = r["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("{host} opened: {r}"));
        assert!(e.contains("No such file"), "{e}");
    }
    let r = qmp(
        &sock,
        "blockdev-add",
        json!({"driver": "file", "node-name": "ok", "filename": "/dev/fdset/1", "read-only": true}),
    );
    assert!(r.get("return").is_some(), "{r}");
    qmp(&sock, "blockdev-del", json!({"node-name": "ok"}));
    assert_eq!(
        d.ok(&["exec", "jailed", "--", "echo", "still fine"]),
        "still fine\n"
    );

    // describe shows it.
    let text = d.ok(&["describe", "jailed"]);
    assert!(
        text.contains(&format!("Jail:    uid {uid}, chroot {}", jail.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("Cgroup:  v{ver} {path}: memory")),
        "{text}"
    );

    // kill -9 hutchd: re-attached with the same uid; leftovers of unknown VMs are reconciled.
    d.kill9();
    let node = hutch_vmm::cgroup::node_name(d.data());
    let ghost = "0badc0ffee00";
    let ghost_dirs = cgroup_dirs(ver, &format!("/hutch/{node}/{ghost}"));
    for g in &ghost_dirs {
        std::fs::create_dir_all(g).unwrap();
    }
    std::fs::create_dir_all(d.data().join("jail").join(ghost)).unwrap();
    d.spawn();
    let again = d.json(&["describe", "jailed"]);
    assert_eq!(
        (again["state"].as_str(), again["pid"].as_u64()),
        (Some("running"), Some(pid))
    );
    assert_eq!(again["confinement"], vm["confinement"]);
    for g in &ghost_dirs {
        assert!(!g.exists(), "{} not reconciled", g.display());
    }
    assert!(!d.data().join("jail").join(ghost).exists());

    // stop frees cgroup and jail; start keeps the uid.
    d.ok(&["stop", "jailed"]);
    for dir in &dirs {
        assert!(!dir.exists(), "{} left after stop", dir.display());
    }
    assert!(!jail.exists());
    let vm = d.json(&["start", "jailed"]);
    assert_eq!(vm["confinement"]["uid"].as_u64(), Some(uid));
    let pid = vm["pid"].as_u64().unwrap();
    assert_eq!(
        status_field(pid, "Uid:"),
        vec![uid.to_string(); 4].join(" ")
    );

    // rm leaves no cgroup, jail or process.
    d.ok(&["rm", "jailed"]);
    for dir in &dirs {
        assert!(!dir.exists(), "{} left after rm", dir.display());
    }
    assert!(!jail.exists());
    assert!(d.qemu_pids().is_empty());
    assert!(processes_of_uid(uid).is_empty());
    assert_eq!(
        hutch_vmm::cgroup::Cgroups::detect(Path::new(CGROOT), "hutch", &node)
            .map(|c| c.list())
            .unwrap_or_default(),
        Vec::<String>::new()
    );
}
