//! Crash safety of pause and snapshot: hutchd aborts (as kill -9 would) between the steps of a
//! pause and of a snapshot; after a restart no QEMU is orphaned, no VM is stuck in `pausing` or
//! `snapshotting`, the VM runs on (its QEMU was only stopped) or is `failed` with a reason and
//! starts again, and no snapshot file or disk layer is left without a record. One boot.

mod common;
use common::*;
use std::time::Duration;

fn count(d: &Daemon, dir: &str) -> usize {
    std::fs::read_dir(d.data().join(dir))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[test]
fn hutchd_crash_during_pause_and_snapshot_is_repaired() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let mut d = Daemon::start(&[]);
    d.import_busybox(&layout);
    d.ok(&["new", "--image", "busybox", "--name", "vm"]);
    d.ok(&["exec", "vm", "--", "sh", "-c", "echo kept > /dev/shm/f"]);
    for (point, op) in [
        ("pause.saved", vec!["pause", "vm"]),
        ("snapshot.saved", vec!["snapshot", "vm", "s1"]),
        ("snapshot.frozen", vec!["snapshot", "vm", "s2"]),
    ] {
        d.kill9();
        d.extra = vec!["--crash-at".into(), point.into()];
        d.spawn();
        let o = d.hutch(&op);
        assert!(!o.status.success(), "{point}: {op:?} cannot succeed");
        assert!(
            d.wait_exit(Duration::from_secs(120)).is_some(),
            "{point}: hutchd did not reach its crash point"
        );
        assert!(d.log().contains(&format!("crash point {point} reached")));
        d.extra.clear();
        d.spawn();
        let v = d.json(&["describe", "vm"]);
        let state = v["state"].as_str().unwrap().to_string();
        match point {
            // The QEMU was only stopped: it runs on, with its memory.
            "pause.saved" | "snapshot.saved" => {
                assert_eq!(state, "running", "{point}: {v}");
                assert_eq!(
                    d.ok(&["exec", "vm", "--", "cat", "/dev/shm/f"]),
                    "kept\n",
                    "{point}"
                );
            }
            // The QEMU had ended with the state saved: the VM failed, with the reason, and
            // starts again (a cold boot on its frozen disk).
            _ => {
                assert_eq!(state, "failed", "{point}: {v}");
                assert!(v["reason"].is_string());
                d.ok(&["start", "vm"]);
                d.ok(&["exec", "vm", "--", "sh", "-c", "echo kept > /dev/shm/f"]);
            }
        }
        // No snapshot was recorded, and no file of one is left.
        assert!(d.json(&["snapshot", "ls"]).as_array().unwrap().is_empty());
        assert_eq!(count(&d, "snapshots"), 0, "{point}: snapshot files left");
        assert_eq!(d.qemu_pids().len(), 1, "{point}: one QEMU, the VM's");
    }
    // It works end to end afterwards: a snapshot, a copy, removal of everything.
    d.ok(&["snapshot", "vm", "s"]);
    d.ok(&["new", "--snapshot", "s", "--name", "copy"]);
    assert_eq!(d.ok(&["exec", "copy", "--", "cat", "/dev/shm/f"]), "kept\n");
    d.ok(&["snapshot", "rm", "s"]);
    d.ok(&["rm", "copy"]);
    d.ok(&["rm", "vm"]);
    assert_eq!((count(&d, "snapshots"), count(&d, "layers")), (0, 0));
    assert!(d.qemu_pids().is_empty());
}
