//! Operating hutch, on real VMs: the lifecycle state machine's concurrency outcomes (same-name
//! creates, delete during create, start during stop, stop during exec), a restart policy
//! bringing back a VM whose QEMU was killed but not one whose guest powered off cleanly, the live
//! event stream, Prometheus metrics and `hutch status`. Three boots.

mod common;
use common::*;
use serde_json::Value;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `hutch --json events`, collecting every line it prints.
struct Events {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Events {
    fn follow(d: &Daemon) -> Events {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hutch"))
            .arg("--data-dir")
            .arg(d.data())
            .args(["--json", "events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str(&line) {
                    l2.lock().unwrap().push(v);
                }
            }
        });
        Events { child, lines }
    }

    /// The kinds of `vm`'s events so far, in order.
    fn kinds(&self, vm: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["vm"] == vm)
            .map(|e| e["kind"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_hutch(d: &Daemon, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_hutch"))
        .arg("--data-dir")
        .arg(d.data())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn state(d: &Daemon, vm: &str) -> String {
    let o = d.hutch(&["--json", "describe", vm]);
    if !o.status.success() {
        return String::new();
    }
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["state"].as_str().unwrap_or("").to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn lifecycle_concurrency_restart_policy_events_metrics_status() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let d = Daemon::start(&[]);
    d.import_busybox(&layout);
    let events = Events::follow(&d);

    // Same-name creates: exactly one wins, the other is told the name is taken. While they
    // run, a delete of the VM being created is refused at once (the create decides).
    let racers: Vec<_> = (0..2)
        .map(|_| spawn_hutch(&d, &["new", "--image", "busybox", "--name", "dup"]))
        .collect();
    wait_until(Duration::from_secs(60), || {
        (state(&d, "dup") == "creating").then_some(())
    })
    .expect("dup is seen creating");
    let rm = d.hutch(&["rm", "dup"]);
    assert!(!rm.status.success());
    assert!(
        stderr(&rm).contains("still being created"),
        "{}",
        stderr(&rm)
    );
    let outs: Vec<_> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    assert_eq!(outs.iter().filter(|o| o.status.success()).count(), 1);
    let loser = outs.iter().find(|o| !o.status.success()).unwrap();
    assert!(stderr(loser).contains("exists"), "{}", stderr(loser));
    assert_eq!(state(&d, "dup"), "running");

    // Stop during exec: the stop wins and the exec ends with the VM, with an error. Start
    // during stop: refused at once, nothing changes.
    let exec = spawn_hutch(&d, &["exec", "dup", "--", "sleep", "300"]);
    std::thread::sleep(Duration::from_millis(500));
    let stop = spawn_hutch(&d, &["stop", "dup"]);
    wait_until(Duration::from_secs(30), || {
        (state(&d, "dup") == "stopping").then_some(())
    })
    .expect("dup is seen stopping");
    let start = d.hutch(&["start", "dup"]);
    assert!(!start.status.success());
    assert!(
        stderr(&start).contains("dup is stopping, not stopped"),
        "{}",
        stderr(&start)
    );
    assert!(stop.wait_with_output().unwrap().status.success());
    assert_eq!(state(&d, "dup"), "stopped");
    let exec = exec.wait_with_output().unwrap();
    assert!(!exec.status.success(), "the exec ended with the VM");

    // Restart policy: kill -9 the QEMU of an on-failure VM and it comes back by itself.
    let r = d.json(&[
        "new",
        "--image",
        "busybox",
        "--name",
        "phoenix",
        "--restart",
        "on-failure",
    ]);
    assert_eq!(r["restart"], "on-failure");
    let pid = r["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let back = wait_until(Duration::from_secs(120), || {
        let v = d.json(&["describe", "phoenix"]);
        (v["state"] == "running" && v["pid"].as_u64() != Some(pid as u64)).then_some(v)
    })
    .expect("phoenix came back");
    assert_eq!(back["restarts"], 1, "{back}");
    assert_eq!(d.ok(&["exec", "phoenix", "--", "echo", "alive"]), "alive\n");
    // A stop is respected: no restart.
    d.ok(&["stop", "phoenix"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state(&d, "phoenix"), "stopped");

    // The event stream saw every step, in order.
    let want_dup = ["created", "stopping", "stopped"];
    let want_phoenix = [
        "created",
        "failed",
        "restarting",
        "starting",
        "started",
        "stopping",
        "stopped",
    ];
    let ok = wait_until(Duration::from_secs(10), || {
        (events.kinds("dup") == want_dup && events.kinds("phoenix") == want_phoenix).then_some(())
    });
    assert!(
        ok.is_some(),
        "dup: {:?}, phoenix: {:?}",
        events.kinds("dup"),
        events.kinds("phoenix")
    );
    let failed = events
        .lines
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["vm"] == "phoenix" && e["kind"] == "failed")
        .cloned()
        .unwrap();
    assert!(
        failed["reason"].as_str().unwrap().contains("signal 9"),
        "{failed}"
    );

    // Metrics: VMs by state, latency histograms, per-VM usage.
    d.ok(&["start", "phoenix"]);
    let (st, body) = d.api_raw("GET", "/metrics", None, "text/plain").unwrap();
    let text = String::from_utf8(body).unwrap();
    assert_eq!(st, 200, "{text}");
    for want in [
        "hutch_vms{state=\"running\"} 1\n",
        "hutch_vms{state=\"stopped\"} 1\n",
        "hutch_vm_create_seconds_count 2\n",
        "hutch_vm_boot_seconds_count 4\n",
        "hutch_vm_cpu_seconds_total{vm=\"phoenix\",owner=\"\"}",
        "hutch_vm_memory_bytes{vm=\"phoenix\",owner=\"\"}",
        "hutch_vm_disk_bytes{vm=\"dup\",owner=\"\"}",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // Status: the host at a glance.
    let s = d.json(&["status"]);
    assert_eq!(s["vms"]["running"], 1, "{s}");
    assert_eq!(s["vms"]["stopped"], 1, "{s}");
    assert!(s["host"]["cpus"].as_u64().unwrap() >= 1);
    assert!(s["host"]["mem_active_mib"].as_u64().unwrap() >= 256);
    let text = d.ok(&["status"]);
    assert!(
        text.contains("VMs:     2 (1 running, 1 stopped)") && text.contains("Disk:"),
        "{text}"
    );

    // A clean power-off from inside the guest is not a failure to restart on: on-failure
    // leaves the VM alone (failed, saying why), where `always` would start it again.
    let _ = d.hutch(&["exec", "phoenix", "--", "busybox", "poweroff", "-f"]);
    let off = wait_until(Duration::from_secs(60), || {
        let v = d.json(&["describe", "phoenix"]);
        (v["state"] == "failed").then_some(v)
    })
    .expect("phoenix powered off");
    assert!(
        off["reason"]
            .as_str()
            .unwrap_or("")
            .contains("the guest powered off"),
        "{off}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        state(&d, "phoenix"),
        "failed",
        "no restart after a clean power-off"
    );
    d.ok(&["rm", "dup"]);
    d.ok(&["rm", "phoenix"]);
    assert!(d.qemu_pids().is_empty());
}
