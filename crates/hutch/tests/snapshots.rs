//! Issue 10 on real VMs under QEMU (TCG here): pause and resume, snapshots, VMs made from a
//! snapshot, and fork. One VM is booted; everything else is restored from it. What must hold:
//! a file in tmpfs, a running process and an open TCP connection survive; copies get their own
//! hostname, address and machine id and do not see each other's writes; bad input changes
//! nothing; no file is left once the last user of a snapshot is gone.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

fn text(o: &std::process::Output) -> (String, String, i32) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
        o.status.code().unwrap_or(-1),
    )
}

fn sh(d: &Daemon, vm: &str, script: &str) -> String {
    d.ok(&["exec", vm, "--", "sh", "-c", script])
}

fn ip(vm: &Value) -> String {
    vm["net"]["ipv4"].as_str().unwrap_or_default().to_string()
}

/// Files under `dir` (recursively), for checking that nothing is left.
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.file_name().to_string_lossy().to_string());
        }
    }
    out.sort();
    out
}

#[test]
fn pause_resume_snapshot_restore_fork() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let d = Daemon::start(&[]);
    d.import_busybox(&layout);
    let src = d.json(&["new", "--image", "busybox", "--name", "src", "--mem", "256"]);
    assert_eq!(src["state"], "running");
    let src_ip = ip(&src);
    // State that must survive: a file in tmpfs (RAM only), a process that keeps running.
    sh(
        &d,
        "src",
        "echo kept > /dev/shm/f; cat /proc/sys/kernel/random/boot_id > /tmp/boot; \
         setsid sh -c 'while true; do date +%s > /tmp/tick; sleep 1; done' \
         </dev/null >/dev/null 2>&1 & echo $! > /tmp/bg",
    );
    let bg = sh(&d, "src", "cat /tmp/bg").trim().to_string();
    let boot_id = sh(&d, "src", "cat /tmp/boot");

    // A peer VM holds a TCP connection open to src across src's pause and resume.
    d.ok(&[
        "new", "--image", "busybox", "--name", "peer", "--mem", "128",
    ]);
    sh(
        &d,
        "src",
        // (busybox nc closes the connection when its stdin ends: keep both stdins open)
        "setsid sh -c 'sleep 1000 | nc -l -p 9000 > /tmp/got' </dev/null >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_millis(500));
    sh(
        &d,
        "peer",
        &format!(
            "setsid sh -c '(echo one; sleep 12; echo two; sleep 1000) | nc {src_ip} 9000' \
             </dev/null >/dev/null 2>&1 &"
        ),
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            (sh(&d, "src", "cat /tmp/got") == "one\n").then_some(())
        })
        .is_some(),
        "the connection did not carry its first line"
    );

    // Pause: no QEMU, no memory; exec is refused with a clear message.
    let qemus = d.qemu_pids().len();
    let (so, se, c) = text(&d.hutch(&["pause", "src"]));
    assert_eq!(c, 0, "{se}");
    assert_eq!(so, "src paused\n");
    let v = d.json(&["describe", "src"]);
    assert_eq!(v["state"], "paused");
    assert!(v["pid"].is_null());
    assert_eq!(d.qemu_pids().len(), qemus - 1);
    let (_, se, c) = text(&d.hutch(&["exec", "src", "--", "true"]));
    assert_ne!(c, 0);
    assert!(se.contains("paused"), "{se}");
    let (_, se, c) = text(&d.hutch(&["pause", "src"]));
    assert!(c != 0 && se.contains("already paused"), "{se}");
    let (_, se, c) = text(&d.hutch(&["start", "src"]));
    assert!(c != 0 && se.contains("resume"), "{se}");

    // Resume: same name, address, boot, files, processes and connection.
    let (so, se, c) = text(&d.hutch(&["resume", "src"]));
    assert_eq!((so.as_str(), c), ("src running\n", 0), "{se}");
    let v = d.json(&["describe", "src"]);
    assert_eq!(ip(&v), src_ip);
    assert_eq!(sh(&d, "src", "cat /dev/shm/f"), "kept\n");
    assert_eq!(
        sh(&d, "src", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    assert_eq!(
        sh(&d, "src", &format!("kill -0 {bg} && echo alive")),
        "alive\n"
    );
    assert_eq!(sh(&d, "src", "hostname"), "src\n");
    // The guest clock was set: the ticker writes the host's time again.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            let t: u64 = sh(&d, "src", "cat /tmp/tick").trim().parse().ok()?;
            (t + 5 >= now()).then_some(())
        })
        .is_some(),
        "the guest clock was not set after the resume"
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            (sh(&d, "src", "cat /tmp/got") == "one\ntwo\n").then_some(())
        })
        .is_some(),
        "the TCP connection did not survive the pause: {:?}",
        sh(&d, "src", "cat /tmp/got")
    );

    // Snapshot of the running VM: it runs on, with everything. An exec in flight meanwhile ends
    // with the connection it ran for: it goes on neither in src nor in copies.
    let data = d.data().to_path_buf();
    let inflight = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hutch"))
            .arg("--data-dir")
            .arg(&data)
            .args([
                "exec",
                "src",
                "--",
                "sh",
                "-c",
                "sleep 4; echo leaked > /dev/shm/leak",
            ])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (so, se, c) = text(&d.hutch(&["snapshot", "src", "base"]));
    assert_eq!(c, 0, "{se}");
    assert!(so.starts_with("snapshot base of src"), "{so}");
    assert_eq!(d.json(&["describe", "src"])["state"], "running");
    assert_eq!(sh(&d, "src", "cat /dev/shm/f"), "kept\n");
    assert_eq!(
        sh(&d, "src", &format!("kill -0 {bg} && echo alive")),
        "alive\n"
    );
    let snaps = d.json(&["snapshot", "ls"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["name"], "base");
    assert_eq!(snaps[0]["ram_in_file"], true);
    assert!(d.ok(&["snapshot", "ls"]).contains("base"));

    // A new VM from it: the snapshot's memory and processes, its own identity.
    let copy = d.json(&["new", "--snapshot", "base", "--name", "copy"]);
    assert_eq!(copy["state"], "running");
    assert_eq!(copy["mem"]["from"], "base");
    let copy_ip = ip(&copy);
    assert!(!copy_ip.is_empty() && copy_ip != src_ip, "{copy_ip}");
    assert_eq!(sh(&d, "copy", "hostname"), "copy\n");
    assert_eq!(sh(&d, "copy", "cat /dev/shm/f"), "kept\n");
    assert_eq!(
        sh(&d, "copy", &format!("kill -0 {bg} && echo alive")),
        "alive\n"
    );
    assert_ne!(
        sh(&d, "copy", "cat /etc/machine-id"),
        sh(&d, "src", "cat /etc/machine-id 2>/dev/null || echo none")
    );
    // Its network works under its new address: the peer resolves its name to it and gets an
    // answer from it there (a refused connection: nothing listens on that port).
    let got = sh(
        &d,
        "copy",
        "ip addr show eth0; cat /sys/class/net/eth0/address",
    );
    assert!(got.contains(&format!("inet {copy_ip}/32")), "{got}");
    assert!(got.contains(copy["net"]["mac"].as_str().unwrap()), "{got}");
    // (Retried: once in CI the first try timed out; see the issue 10 note.)
    let mut got = String::new();
    let reached = wait_until(Duration::from_secs(45), || {
        got = sh(&d, "peer", "nc -w 3 copy 7 2>&1; true");
        (got.contains(&format!("({copy_ip})")) && got.contains("refused")).then_some(())
    });
    if reached.is_none() {
        let br = d.bridge().unwrap_or_default();
        let neigh = std::process::Command::new("ip")
            .args(["neigh", "show", "dev", &br])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        panic!(
            "{got}\nhost neighbours on {br}:\n{neigh}\ncopy: {}\npeer: {}\ncopy console:\n{}",
            sh(&d, "copy", "ip addr show eth0; ip route; cat /proc/net/arp"),
            sh(
                &d,
                "peer",
                "ip route; cat /proc/net/arp; nslookup copy 2>&1"
            ),
            d.ok(&["logs", "copy"])
        );
    }
    let o = inflight.join().unwrap();
    assert!(
        !o.status.success(),
        "the exec in flight did not end with the snapshot"
    );
    std::thread::sleep(Duration::from_secs(4));
    for vm in ["src", "copy"] {
        assert_eq!(
            sh(&d, vm, "cat /dev/shm/leak 2>/dev/null || echo none"),
            "none\n",
            "{vm}"
        );
    }
    // Writes stay apart.
    sh(&d, "copy", "echo copy > /dev/shm/f; echo copy > /root/disk");
    assert_eq!(sh(&d, "src", "cat /dev/shm/f"), "kept\n");
    assert_eq!(
        sh(&d, "src", "cat /root/disk 2>/dev/null || echo none"),
        "none\n"
    );

    // Fork: copies with their own names, addresses and writes; the source runs on.
    let forks = d.json(&["fork", "src", "--count", "2", "--name", "f"]);
    let forks = forks.as_array().unwrap();
    assert_eq!(forks.len(), 2);
    assert_eq!(
        (forks[0]["name"].as_str(), forks[1]["name"].as_str()),
        (Some("f-1"), Some("f-2"))
    );
    // src mapped base's memory; the fork moved its RAM into a file first, so the copies map
    // (and share) the fork's memory file rather than each holding all of it.
    assert!(
        forks.iter().all(|f| f["mem"]["base"].is_string()),
        "{forks:?}"
    );
    let ips: Vec<String> = forks.iter().map(ip).collect();
    assert!(ips[0] != ips[1] && !ips.contains(&src_ip), "{ips:?}");
    assert_eq!(sh(&d, "f-1", "hostname"), "f-1\n");
    assert_eq!(sh(&d, "f-2", "hostname"), "f-2\n");
    sh(&d, "f-1", "echo one > /dev/shm/f");
    assert_eq!(sh(&d, "f-2", "cat /dev/shm/f"), "kept\n");
    assert_eq!(sh(&d, "src", "cat /dev/shm/f"), "kept\n");
    assert_eq!(d.json(&["describe", "src"])["state"], "running");
    // Fork snapshots are not listed.
    assert_eq!(d.json(&["snapshot", "ls"]).as_array().unwrap().len(), 1);

    // Bad input changes nothing.
    let (_, se, c) = text(&d.hutch(&["new", "--snapshot", "nope"]));
    assert!(c != 0 && se.contains("nope"), "{se}");
    let (_, se, c) = text(&d.hutch(&["snapshot", "src", "base"]));
    assert!(c != 0 && se.contains("already exists"), "{se}");
    let (_, se, c) = text(&d.hutch(&["snapshot", "src", "../x"]));
    assert_ne!(c, 0, "{se}");
    let (_, se, c) = text(&d.hutch(&["fork", "src", "--count", "0"]));
    assert!(c != 0 && se.contains("count"), "{se}");
    let (_, se, c) = text(&d.hutch(&["fork", "src", "--count", "2", "--name", "f"]));
    assert!(c != 0 && se.contains("already exists"), "{se}");
    d.ok(&["stop", "peer"]);
    let (_, se, c) = text(&d.hutch(&["snapshot", "peer", "p"]));
    assert!(c != 0 && se.contains("stopped"), "{se}");
    let (_, se, c) = text(&d.hutch(&["pause", "peer"]));
    assert!(c != 0 && se.contains("stopped"), "{se}");
    let (st, body) = d
        .api(
            "POST",
            "/api/v1/sandboxes",
            Some(r#"{"snapshot":"base","image":"busybox"}"#),
        )
        .unwrap();
    assert_eq!(st, 400, "{body}");
    assert_eq!(d.json(&["ls"]).as_array().unwrap().len(), 5);

    // Stop of a paused VM discards its state; the next start boots afresh.
    d.ok(&["pause", "f-2"]);
    d.ok(&["stop", "f-2"]);
    assert_eq!(d.json(&["describe", "f-2"])["state"], "stopped");
    d.ok(&["start", "f-2"]);
    assert_eq!(
        sh(&d, "f-2", "cat /dev/shm/f 2>/dev/null || echo gone"),
        "gone\n"
    );

    // A paused copy resumes (its RAM came from the snapshot, so it is saved whole).
    d.ok(&["pause", "copy"]);
    d.ok(&["resume", "copy"]);
    assert_eq!(sh(&d, "copy", "cat /dev/shm/f"), "copy\n");
    assert_eq!(sh(&d, "copy", "hostname"), "copy\n");

    // Removing the snapshot leaves its users running; its files go with the last of them.
    d.ok(&["snapshot", "rm", "base"]);
    assert_eq!(d.json(&["snapshot", "ls"]).as_array().unwrap().len(), 0);
    assert_eq!(sh(&d, "src", "cat /dev/shm/f"), "kept\n");
    for vm in ["copy", "f-1", "f-2", "src", "peer"] {
        d.ok(&["rm", vm]);
    }
    assert!(files(&d.data().join("snapshots")).is_empty());
    assert!(files(&d.data().join("layers")).is_empty());
    assert!(files(&d.data().join("vms")).is_empty());
    assert!(d.qemu_pids().is_empty());
}
