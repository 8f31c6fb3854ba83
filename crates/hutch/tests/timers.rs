//! VM timers on real VMs under QEMU (TCG here): a TTL deletes or pauses a VM, keepalive pushes
//! it back, auto-pause pauses an idle VM, and exec, an SSH login and HTTP through the proxy
//! resume it with its state kept. Bad input gets a clear error and changes nothing. One VM is
//! booted; the others are made from a snapshot of it (much faster than booting).

mod common;
use common::ssh_client::*;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn sh(d: &Daemon, vm: &str, script: &str) -> String {
    d.ok(&["exec", vm, "--", "sh", "-c", script])
}

/// `vm`'s record, or None once it is gone.
fn get(d: &Daemon, vm: &str) -> Option<Value> {
    let (st, v) = d
        .api("GET", &format!("/api/v1/sandboxes/{vm}"), None)
        .unwrap();
    (st == 200).then_some(v)
}

fn state(d: &Daemon, vm: &str) -> String {
    get(d, vm).map_or("gone".into(), |v| v["state"].as_str().unwrap().to_string())
}

/// Waits (up to 40 s) for `vm` to be in state `want` ("gone": deleted).
fn wait_state(d: &Daemon, vm: &str, want: &str) {
    let ok = wait_until(Duration::from_secs(40), || {
        (state(d, vm) == want).then_some(())
    });
    assert!(ok.is_some(), "{vm} is {}, not {want}", state(d, vm));
}

/// A GET through the proxy at `addr` for `host` with a bearer token; status and body.
fn via_proxy(addr: &str, host: &str, token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET / HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status.unwrap_or(0), body)
}

fn metric(d: &Daemon, name: &str) -> u64 {
    let (_, b) = d.api_raw("GET", "/metrics", None, "text/plain").unwrap();
    let text = String::from_utf8(b).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics"))
}

#[test]
fn ttl_keepalive_auto_pause_and_resume() {
    let t0 = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let admin = keygen(w, "admin", &["-t", "ed25519"]);
    let (ssh_port, http_port) = (free_port(), free_port());
    let d = Daemon::start(&[
        "--ssh-listen",
        &format!("127.0.0.1:{ssh_port}"),
        "--admin-keys",
        &format!("{}.pub", admin.display()),
        "--http-listen",
        &format!("127.0.0.1:{http_port}"),
        "--domain",
        "t.hutch",
    ]);
    let s = Ssh { port: ssh_port };
    let ssh = |user: &str, cmd: &[&str]| text(&s.run(&admin, user, cmd, None, false));
    d.import_busybox(&busybox_layout(w));

    // The one boot: a web server runs in it, and goes on running in every copy.
    d.ok(&["new", "--image", "busybox", "--name", "src", "--mem", "128"]);
    sh(
        &d,
        "src",
        "mkdir -p /www && echo web-ok > /www/index.html && busybox httpd -p 8080 -h /www",
    );
    d.ok(&["snapshot", "src", "base"]);
    d.ok(&["rm", "src"]);
    let booted = t0.elapsed();

    // Bad input: a clear error, nothing made or changed.
    for (args, want) in [
        (vec!["--ttl", "0s"], "between 1s and 30d"),
        (vec!["--ttl", "5 minutes"], "unit"),
        (vec!["--auto-pause", "soon"], "auto_pause"),
        (
            vec!["--ttl", "1m", "--on-expire", "later"],
            "delete or pause",
        ),
        (vec!["--on-expire", "pause"], "--ttl"),
    ] {
        let mut a = vec!["new", "--snapshot", "base", "--name", "bad"];
        a.extend(args.iter());
        let o = d.hutch(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
    let (_, se, c) = ssh("admin", &["new", "--snapshot", "base", "--ttl", "99d"]);
    assert!(c == 1 && se.contains("between 1s and 30d"), "{se}");
    assert_eq!(d.json(&["ls"]).as_array().unwrap().len(), 0);

    // TTLs: one deleted, one paused, one kept alive; one made over SSH. Each is looked at
    // right after it is made, well within its 8 s.
    d.ok(&[
        "new",
        "--snapshot",
        "base",
        "--name",
        "t-del",
        "--ttl",
        "8s",
    ]);
    let (_, se, c) = ssh(
        "admin",
        &[
            "new",
            "--snapshot",
            "base",
            "--name",
            "t-pause",
            "--ttl",
            "8s",
            "--on-expire",
            "pause",
        ],
    );
    assert_eq!(c, 0, "{se}");
    let desc = d.ok(&["describe", "t-pause"]);
    assert!(
        desc.contains("TTL:     8s, expires in") && desc.contains("then pause"),
        "{desc}"
    );
    d.ok(&[
        "new",
        "--snapshot",
        "base",
        "--name",
        "t-keep",
        "--ttl",
        "8s",
    ]);
    let out = d.ok(&["keepalive", "t-keep", "1h"]);
    assert!(out.starts_with("t-keep expires in "), "{out}");
    let deadline = get(&d, "t-keep").unwrap()["timers"]["deadline"]
        .as_u64()
        .unwrap();
    // Auto-pause, with state that must survive it.
    d.ok(&[
        "new",
        "--snapshot",
        "base",
        "--name",
        "t-idle",
        "--auto-pause",
        "5s",
    ]);
    sh(&d, "t-idle", "echo kept > /dev/shm/x");
    let ls = d.ok(&["ls"]);
    let head = ls.lines().next().unwrap();
    assert!(head.ends_with("AGE  EXPIRES"), "{ls}");
    let row = |n: &str| ls.lines().find(|l| l.starts_with(n)).unwrap().to_string();
    assert!(
        row("t-keep").ends_with(" 59m") || row("t-keep").ends_with(" 1h"),
        "{ls}"
    );
    assert!(row("t-idle").ends_with(" -"), "{ls}");
    let desc = d.ok(&["describe", "t-idle"]);
    assert!(desc.contains("Idle:    pauses after 5s"), "{desc}");
    // Keepalive refuses what it cannot do, and changes nothing.
    for (args, want) in [
        (vec!["keepalive", "t-keep", "5x"], "unit"),
        (vec!["keepalive", "t-idle"], "t-idle has no TTL"),
        (vec!["keepalive", "nope", "1h"], "nope"),
    ] {
        let o = d.hutch(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
    let (_, se, c) = ssh("admin", &["keepalive", "t-keep", "0"]);
    assert!(c == 1 && se.contains("between 1s and 30d"), "{se}");
    assert_eq!(
        get(&d, "t-keep").unwrap()["timers"]["deadline"].as_u64(),
        Some(deadline)
    );
    assert!(get(&d, "t-idle").unwrap()["timers"]["deadline"].is_null());

    wait_state(&d, "t-del", "gone");
    wait_state(&d, "t-pause", "paused");
    let v = get(&d, "t-pause").unwrap();
    assert!(v["timers"]["deadline"].is_null(), "{v}");
    assert!(d.ok(&["describe", "t-pause"]).contains("8s, ran out"));
    assert_eq!(state(&d, "t-keep"), "running");
    // Keepalive over SSH without a duration: the VM's own TTL from now; then it runs out.
    let (so, se, c) = ssh("admin", &["keepalive", "t-keep"]);
    assert!(c == 0 && so.starts_with("t-keep expires in "), "{so}{se}");

    // Auto-pause, then exec resumes it with its state.
    wait_state(&d, "t-idle", "paused");
    assert_eq!(sh(&d, "t-idle", "cat /dev/shm/x"), "kept\n");
    assert_eq!(state(&d, "t-idle"), "running");
    // An SSH login resumes it.
    wait_state(&d, "t-idle", "paused");
    let (so, se, c) = ssh("t-idle", &["cat /dev/shm/x"]);
    assert_eq!((so.as_str(), c), ("kept\n", 0), "{se}");
    // HTTP through the proxy resumes it (the request waits, then is answered).
    wait_state(&d, "t-idle", "paused");
    let token = std::fs::read_to_string(d.data().join("api-token")).unwrap();
    let (st, body) = via_proxy(
        &format!("127.0.0.1:{http_port}"),
        "8080-t-idle.t.hutch",
        token.trim(),
    );
    assert_eq!((st, body.trim()), (200, "web-ok"));
    assert_eq!(state(&d, "t-idle"), "running");
    assert_eq!(sh(&d, "t-idle", "cat /dev/shm/x"), "kept\n");

    wait_state(&d, "t-keep", "gone");
    assert!(metric(&d, "hutch_vm_expired_total") >= 3);
    assert!(metric(&d, "hutch_vm_auto_paused_total") >= 3);
    assert!(metric(&d, "hutch_vm_auto_resumed_total") >= 3);

    for vm in ["t-pause", "t-idle"] {
        d.ok(&["rm", vm]);
    }
    d.ok(&["snapshot", "rm", "base"]);
    assert!(d.qemu_pids().is_empty());
    eprintln!(
        "timers: boot and snapshot {:.1}s, all {:.1}s",
        booted.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
