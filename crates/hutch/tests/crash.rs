//! Crash safety: hutchd aborts (as kill -9 would) at every crash point of create, start, clone,
//! delete, commit, pull and import, one round each; after a restart there is no orphan QEMU, no
//! VM record stuck half-way, no VM directory or temp file without an owner, and every VM that
//! survives works (its filesystem writable, so a commit's freeze did not outlive the crash).
//! Four full VM boots, two partial ones.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

/// What must hold after any crash and restart; returns the VMs by name.
fn check(d: &Daemon, point: &str) -> Vec<Value> {
    let vms = d.json(&["ls"]);
    let vms = vms.as_array().unwrap().clone();
    let mut running_pids = BTreeSet::new();
    for v in &vms {
        let name = v["name"].as_str().unwrap();
        let state = v["state"].as_str().unwrap();
        // A start that a crash interrupted leaves the VM failed, with the reason.
        assert!(
            state == "running"
                || state == "stopped"
                || (state == "failed" && v["reason"].is_string()),
            "{point}: {name} is {state} after restart: {v}"
        );
        if state == "running" {
            running_pids.insert(v["pid"].as_u64().unwrap() as u32);
            let o = d.ok(&[
                "exec",
                name,
                "--",
                "sh",
                "-c",
                "echo ok >/root/probe && cat /root/probe",
            ]);
            assert_eq!(o, "ok\n", "{point}: {name} is usable");
        }
    }
    let qemus: BTreeSet<u32> = d.qemu_pids().into_iter().collect();
    assert_eq!(
        qemus, running_pids,
        "{point}: every QEMU belongs to a running VM"
    );
    let ids: BTreeSet<String> = vms
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    let dirs: BTreeSet<String> = std::fs::read_dir(d.data().join("vms"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(dirs, ids, "{point}: every VM directory has a record");
    let tmp = std::fs::read_dir(d.data().join("images/tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp, 0, "{point}: no temp files left");
    vms
}

fn names(vms: &[Value]) -> BTreeSet<String> {
    vms.iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn hutchd_crash_at_any_step_is_repaired() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let layout = busybox_layout(w);
    let tar = w.join("bb.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        layout.display(),
        tar.display()
    ));
    let reg = TestRegistry::start(None);
    reg.push(&layout, "bb", "team/app:1", None);
    let mut d = Daemon::start(&[]);
    d.import_busybox(&layout);
    d.ok(&["new", "--image", "busybox", "--name", "keep"]);
    d.ok(&["new", "--image", "busybox", "--name", "cold"]);
    d.ok(&["stop", "cold"]);
    let pull_ref = format!("{}/team/app:1", reg.addr);
    let rounds: Vec<(&str, Vec<&str>)> = vec![
        (
            "create.registered",
            vec!["new", "--image", "busybox", "--name", "x"],
        ),
        (
            "create.disk",
            vec!["new", "--image", "busybox", "--name", "x"],
        ),
        (
            "boot.launched",
            vec!["new", "--image", "busybox", "--name", "x"],
        ),
        (
            "boot.connected",
            vec!["new", "--image", "busybox", "--name", "x"],
        ),
        ("boot.launched", vec!["start", "cold"]),
        ("clone.copied", vec!["clone", "cold", "x"]),
        ("commit.exporting", vec!["commit", "keep", "snap:1"]),
        ("commit.built", vec!["commit", "keep", "snap:2"]),
        (
            "pull.fetched",
            vec!["image", "pull", "--insecure", &pull_ref],
        ),
        (
            "import.uploaded",
            vec!["image", "import", tar.to_str().unwrap(), "--name", "up:1"],
        ),
        (
            "import.built",
            vec!["image", "import", tar.to_str().unwrap(), "--name", "up:2"],
        ),
        ("delete.marked", vec!["rm", "cold"]),
        ("delete.destroyed", vec!["rm", "keep"]),
    ];
    for (point, op) in rounds {
        d.kill9();
        d.extra = vec!["--crash-at".into(), point.into()];
        d.spawn();
        let o = d.hutch(&op);
        assert!(
            !o.status.success(),
            "{point}: {op:?} cannot succeed when hutchd dies in it"
        );
        let st = d.wait_exit(Duration::from_secs(120));
        assert!(
            st.is_some(),
            "{point}: hutchd did not reach its crash point"
        );
        assert!(
            d.log().contains(&format!("crash point {point} reached")),
            "{point}"
        );
        d.extra.clear();
        d.spawn();
        let vms = check(&d, point);
        let have = names(&vms);
        assert!(
            !have.contains("x"),
            "{point}: a create or clone it interrupted is undone"
        );
        match point {
            "delete.marked" => assert!(!have.contains("cold"), "the delete was finished"),
            "delete.destroyed" => assert!(!have.contains("keep"), "the delete was finished"),
            p if p.starts_with("delete") => {}
            _ => assert!(
                have.contains("keep") && have.contains("cold"),
                "{point}: {have:?}"
            ),
        }
        let images = d.json(&["image", "ls"]);
        let refs: Vec<&str> = images
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert!(
            !refs
                .iter()
                .any(|r| r.starts_with("snap:") || r.starts_with("up:")),
            "{point}: an interrupted commit or import records no image: {refs:?}"
        );
    }
    // After all that, the store still works end to end: gc, a create, a delete.
    d.ok(&["image", "gc"]);
    d.ok(&["new", "--image", "busybox", "--name", "after"]);
    assert_eq!(d.ok(&["exec", "after", "--", "echo", "fine"]), "fine\n");
    d.ok(&["rm", "after"]);
    assert!(d.qemu_pids().is_empty());
}
