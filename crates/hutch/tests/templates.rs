//! Templates and warm pools on real VMs under QEMU (TCG here): a template's start command runs
//! and its ready command gates the snapshot; VMs from it carry what the start command left
//! (a running server, a file in tmpfs) under their own names; a pool keeps VMs ready, a create
//! claims one and the pool refills, also after hutchd is killed and restarted; a rebuild and a
//! removal drain the pool; bad input changes nothing; nothing is left behind.

mod common;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

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

fn pool(d: &Daemon) -> Value {
    let v = d.json(&["pool", "ls"]);
    v.as_array()
        .and_then(|a| a.first().cloned())
        .unwrap_or(Value::Null)
}

fn wait_ready(d: &Daemon, n: u64, secs: u64) {
    let got = wait_until(Duration::from_secs(secs), || {
        (pool(d)["ready"].as_u64() == Some(n)).then_some(())
    });
    assert!(
        got.is_some(),
        "the pool did not reach {n} ready: {}",
        pool(d)
    );
}

fn names(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = d
        .json(&["ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn templates_and_warm_pools() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let mut d = Daemon::start(&[]);
    d.import_busybox(&layout);

    // Bad input first: nothing is made.
    let (_, se, c) = text(&d.hutch(&["template", "create", "t", "--image", "nope"]));
    assert!(c != 0 && se.contains("nope"), "{se}");
    let (_, se, c) = text(&d.hutch(&["template", "create", "Bad/Name", "--image", "busybox"]));
    assert_ne!(c, 0, "{se}");
    let (_, se, c) = text(&d.hutch(&["new", "--template", "py"]));
    assert!(c != 0 && se.contains("py"), "{se}");
    let (_, se, c) = text(&d.hutch(&["pool", "set", "py", "--min", "1"]));
    assert!(c != 0 && se.contains("py"), "{se}");
    assert!(d.json(&["template", "ls"]).as_array().unwrap().is_empty());

    // A template: the start command leaves a server running and a file in tmpfs; the ready
    // command waits for the file.
    let (so, se, c) = text(&d.hutch(&[
        "template",
        "create",
        "py",
        "--image",
        "busybox",
        "--mem",
        "256",
        "--start-cmd",
        "mkdir -p /srv && echo hi > /srv/index.html && httpd -p 8080 -h /srv && sleep 1 && echo up > /dev/shm/started",
        "--ready-cmd",
        "test -f /dev/shm/started",
    ]));
    assert_eq!(c, 0, "{se}");
    assert!(so.contains("template py ready"), "{so}");
    let t = d.json(&["template", "ls"]);
    assert_eq!(t[0]["status"], "ready");
    assert!(d.ok(&["template", "ls"]).contains("ready"));
    // Its build VM is gone.
    assert!(names(&d).is_empty(), "{:?}", names(&d));
    let (_, se, c) = text(&d.hutch(&["template", "create", "py", "--image", "busybox"]));
    assert!(c != 0 && se.contains("already exists"), "{se}");

    // Without a pool: a restore of the template.
    let a = d.json(&["new", "--template", "py", "--name", "a"]);
    assert_eq!(a["state"], "running");
    assert_eq!(sh(&d, "a", "hostname"), "a\n");
    assert_eq!(sh(&d, "a", "cat /dev/shm/started"), "up\n");
    // The server the start command started answers in the copy.
    let got = sh(
        &d,
        "a",
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080 | tail -1",
    );
    assert_eq!(got, "hi\n");

    // A pool of 2: a create claims one at once and the pool refills.
    let (_, se, c) = text(&d.hutch(&["pool", "set", "py", "--min", "2"]));
    assert_eq!(c, 0, "{se}");
    wait_ready(&d, 2, 120);
    assert_eq!(names(&d), ["a"], "pool VMs are not listed");
    let t0 = Instant::now();
    let b = d.json(&["new", "--template", "py", "--name", "b"]);
    let claim = t0.elapsed();
    assert_eq!(b["state"], "running");
    assert!(b["pool"].is_null());
    assert_eq!(sh(&d, "b", "hostname"), "b\n");
    assert_eq!(sh(&d, "b", "cat /dev/shm/started"), "up\n");
    assert!(
        claim < Duration::from_secs(3),
        "a claim took {claim:?} (a restore would take longer)"
    );
    wait_ready(&d, 2, 120);
    let (st, body) = d.api_raw("GET", "/metrics", None, "text/plain").unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(st, 200);
    assert!(
        body.contains("hutch_pool_ready{template=\"py\"} 2"),
        "{body}"
    );
    assert!(body.contains("hutch_pool_claims_total 1"), "{body}");

    // The pool survives hutchd being killed: its VMs run on, claims work, it refills.
    d.kill9();
    d.spawn();
    wait_ready(&d, 2, 60);
    let c2 = d.json(&["new", "--template", "py", "--name", "c"]);
    assert_eq!(c2["state"], "running");
    assert_eq!(sh(&d, "c", "hostname"), "c\n");
    wait_ready(&d, 2, 120);

    // A rebuild drains the pool's VMs of the old build and refills from the new one.
    let (so, se, code) = text(&d.hutch(&["template", "build", "py"]));
    assert_eq!(code, 0, "{se}");
    assert!(so.contains("ready"), "{so}");
    assert_eq!(d.json(&["template", "ls"])[0]["builds"], 2);
    wait_ready(&d, 2, 120);

    // Removing the template removes its pool and idle VMs; VMs made from it run on.
    d.ok(&["template", "rm", "py"]);
    assert!(d.json(&["pool", "ls"]).as_array().unwrap().is_empty());
    assert!(
        wait_until(Duration::from_secs(30), || {
            (d.qemu_pids().len() == 3).then_some(())
        })
        .is_some(),
        "pool VMs left running"
    );
    assert_eq!(names(&d), ["a", "b", "c"]);
    assert_eq!(sh(&d, "b", "cat /dev/shm/started"), "up\n");
    for vm in ["a", "b", "c"] {
        d.ok(&["rm", vm]);
    }
    let left = |dir: &str| {
        std::fs::read_dir(d.data().join(dir))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    assert_eq!((left("vms"), left("snapshots"), left("layers")), (0, 0, 0));
    assert!(d.qemu_pids().is_empty());
}
