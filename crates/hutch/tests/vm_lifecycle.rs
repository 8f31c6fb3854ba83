//! The user story of the foundation issue, on real VMs under QEMU (TCG here), as two focused
//! stories that run side by side: what runs in a VM (exec in every shape, scratch space, files,
//! reaping, logs), and what a VM outlives (hutchd kill -9 and re-attach, stop/start keeping its
//! disk, a QEMU that died while hutchd was down, delete leaving nothing behind). Three boots.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn out(o: &std::process::Output) -> (String, String, i32) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
        o.status.code().unwrap_or(-1),
    )
}

/// A hutchd with the busybox image and a running VM `demo`; the VM's QEMU pid.
fn daemon_with_demo() -> (tempfile::TempDir, Daemon, u32) {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let d = Daemon::start(&[]);
    let img = d.json(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        "busybox",
    ]);
    assert_eq!(img["name"], "busybox:latest");
    let vm = d.json(&[
        "new", "--image", "busybox", "--name", "demo", "--vcpu", "1", "--mem", "256",
    ]);
    assert_eq!(vm["state"], "running");
    let pid = vm["pid"].as_u64().unwrap() as u32;
    (work, d, pid)
}

#[test]
fn what_runs_in_a_vm() {
    let (work, d, _pid) = daemon_with_demo();

    // stdout, stderr and the exit code are kept apart.
    let (so, se, code) = out(&d.hutch(&[
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]));
    assert_eq!((so.as_str(), se.as_str(), code), ("out\n", "err\n", 3));
    // Image config (Env, WorkingDir) applies; --env and --cwd override; hostname is the VM name.
    let so = d.ok(&[
        "exec",
        "demo",
        "-e",
        "A=1",
        "--",
        "sh",
        "-c",
        "echo $A $FOO $(pwd) $(hostname)",
    ]);
    assert_eq!(so, "1 bar /tmp demo\n");
    assert_eq!(
        d.ok(&["exec", "demo", "-w", "/root", "--", "pwd"]),
        "/root\n"
    );
    assert_eq!(
        d.ok(&["exec", "demo", "-u", "nobody", "--", "id", "-u"]),
        "65534\n"
    );
    // Scratch space whatever the image ships (this one has /tmp at 0755 and no /run): /tmp on
    // the writable layer at 1777, /run and /dev/shm tmpfs at 1777, all writable by nobody.
    let so = d.ok(&[
        "exec",
        "demo",
        "-u",
        "nobody",
        "--",
        "sh",
        "-c",
        "for d in /tmp /run /dev/shm; do echo hi > $d/by-nobody && cat $d/by-nobody; done; \
         stat -c '%a %n' /tmp /run /dev/shm; \
         grep -E ' /(tmp|run|dev/shm) ' /proc/mounts | busybox cut -d' ' -f2,3",
    ]);
    assert_eq!(
        so,
        "hi\nhi\nhi\n1777 /tmp\n1777 /run\n1777 /dev/shm\n/dev/shm tmpfs\n/run tmpfs\n"
    );
    // stdin reaches the process.
    let o = d.hutch_stdin(
        &["exec", "demo", "--", "sh", "-c", "cat; echo done"],
        Some(b"piped input\n"),
    );
    assert_eq!(out(&o).0, "piped input\ndone\n");
    // A missing binary is exit 127 with a message, not a crash.
    let (_, se, code) = out(&d.hutch(&["exec", "demo", "--", "/no/such/binary"]));
    assert_eq!(code, 127);
    assert!(se.contains("No such file"), "{se}");
    // An unknown user is refused before running anything.
    let (_, se, code) = out(&d.hutch(&["exec", "demo", "-u", "ghost", "--", "true"]));
    assert_eq!(code, 126, "{se}");
    // Timeouts kill the process.
    let t = Instant::now();
    let (_, _, code) = out(&d.hutch(&["exec", "demo", "--timeout", "1", "--", "sleep", "30"]));
    assert_eq!(code, 124);
    assert!(t.elapsed() < Duration::from_secs(15));
    // A signal death is 128+N.
    let (_, _, code) = out(&d.hutch(&["exec", "demo", "--", "sh", "-c", "kill -9 $$"]));
    assert_eq!(code, 137);

    // Many execs at once.
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    d.ok(&[
                        "exec",
                        "demo",
                        "--",
                        "sh",
                        "-c",
                        &format!("sleep 0.$((RANDOM % 5)); echo {i}"),
                    ])
                })
            })
            .collect();
        for (i, h) in hs.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), format!("{i}\n"));
        }
    });

    // Files in and out, binary-safe.
    let data: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let local = work.path().join("blob");
    std::fs::write(&local, &data).unwrap();
    d.ok(&[
        "cp",
        local.to_str().unwrap(),
        "demo:/root/sub/blob",
        "--mode",
        "600",
    ]);
    let back = work.path().join("back");
    d.ok(&["cp", "demo:/root/sub/blob", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert_eq!(
        d.ok(&[
            "exec",
            "demo",
            "--",
            "busybox",
            "stat",
            "-c",
            "%a",
            "/root/sub/blob"
        ]),
        "600\n"
    );
    let missing = d.hutch(&["cp", "demo:/nope", back.to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));

    // PID 1 reaps orphans: double-forked processes leave no zombies behind.
    for _ in 0..3 {
        d.ok(&["exec", "demo", "--", "sh", "-c", "(sleep 0.2 &); true"]);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let zombies = d.ok(&[
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "cat /proc/[0-9]*/stat | grep -c ') Z ' || true",
    ]);
    assert_eq!(zombies.trim(), "0");
    let (s, h) = d.api("GET", "/api/v1/sandboxes/demo/health", None).unwrap();
    assert_eq!((s, &h["ready"]), (200, &serde_json::json!(true)), "{h}");

    // The console log.
    let logs = d.ok(&["logs", "demo"]);
    assert!(logs.contains("hutch-agent: root ready"), "{logs}");
}

#[test]
fn what_a_vm_outlives() {
    let (_work, mut d, pid) = daemon_with_demo();
    // kill -9 hutchd: the VM keeps running; a new hutchd re-attaches and exec works.
    d.ok(&["exec", "demo", "--", "sh", "-c", "echo hi > /tmp/by-nobody"]);
    d.ok(&[
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "echo kept > /root/persist && sync",
    ]);
    d.kill9();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "qemu died with hutchd"
    );
    d.spawn();
    let vm = d.json(&["describe", "demo"]);
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["pid"].as_u64(), Some(pid as u64));
    assert_eq!(
        d.ok(&["exec", "demo", "--", "cat", "/root/persist"]),
        "kept\n"
    );

    // stop / start keeps the writable layer.
    let ls = d.ok(&["ls"]);
    assert!(ls.contains("demo") && ls.contains("running"), "{ls}");
    d.ok(&["stop", "demo"]);
    assert_eq!(d.json(&["describe", "demo"])["state"], "stopped");
    assert!(d.qemu_pids().is_empty());
    let o = d.hutch(&["exec", "demo", "--", "true"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("stopped"));
    d.ok(&["start", "demo"]);
    assert_eq!(
        d.ok(&["exec", "demo", "--", "cat", "/root/persist"]),
        "kept\n"
    );
    // /tmp is on the writable layer and keeps its files; /run is fresh on every boot.
    assert_eq!(
        d.ok(&[
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "cat /tmp/by-nobody; ls -A /run"
        ]),
        "hi\n"
    );

    // QEMU dies while hutchd is down: shown as failed, with the reason.
    let pid = d.json(&["describe", "demo"])["pid"].as_u64().unwrap() as i32;
    d.kill9();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until(Duration::from_secs(10), || {
        d.qemu_pids().is_empty().then_some(())
    })
    .unwrap();
    d.spawn();
    let vm = d.json(&["describe", "demo"]);
    assert_eq!(vm["state"], "failed");
    assert!(
        vm["reason"]
            .as_str()
            .unwrap_or("")
            .contains("while hutchd was not running"),
        "{vm}"
    );

    // Delete leaves no process, disk, socket or record.
    let id = vm["id"].as_str().unwrap().to_string();
    d.ok(&["rm", "demo"]);
    assert_eq!(d.json(&["ls"]), serde_json::json!([]));
    assert!(!d.data().join("vms").join(&id).exists());
    assert!(d.qemu_pids().is_empty());
    let o = d.hutch(&["describe", "demo"]);
    assert_eq!(o.status.code(), Some(1));
}
