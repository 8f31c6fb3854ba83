//! The state store lost under running VMs (boxcutter's `recover`): hutchd refuses a corrupt store
//! with what to do, starts on an empty one without touching the VMs it no longer knows, and
//! `hutch admin recover` brings their records back from the VM directories and running QEMUs:
//! the running VM re-attached as running (same process), the stopped one stopped, and both
//! usable. Two boots and a start.

mod common;
use common::*;
use std::process::{Command, Stdio};

#[test]
fn lost_store_is_rebuilt_without_stopping_vms() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let mut d = Daemon::start(&[]);
    d.import_busybox(&layout);
    let run = d.json(&["new", "--image", "busybox", "--name", "keep"]);
    let pid = run["pid"].as_u64().unwrap();
    d.ok(&["exec", "keep", "--", "sh", "-c", "echo state >/root/f"]);
    d.json(&["new", "--image", "busybox", "--name", "cold"]);
    d.ok(&["stop", "cold"]);

    // A corrupt store: hutchd refuses it and says what to do.
    d.kill9();
    assert_eq!(d.qemu_pids(), vec![pid as u32], "the VM survives hutchd");
    let store = d.data().join("state.redb");
    std::fs::write(&store, vec![0xa5u8; 64 * 1024]).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_hutchd"))
        .arg("--data-dir")
        .arg(d.data())
        .args(["--ssh-listen", "off", "--network", "off", "--boot-cache"])
        .arg(workspace().join("target/hutch-test-boot"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("hutch admin recover"), "{err}");
    assert_eq!(d.qemu_pids(), vec![pid as u32], "the VM kept running");

    // Moved aside: hutchd starts with an empty store and leaves the VMs it does not know alone.
    std::fs::rename(&store, d.data().join("state.redb.broken")).unwrap();
    d.spawn();
    assert_eq!(d.json(&["ls"]), serde_json::json!([]));
    assert_eq!(d.qemu_pids(), vec![pid as u32]);
    assert!(d.log().contains("hutch admin recover"));

    let rec = d.json(&["admin", "recover"]);
    let mut got: Vec<(String, String)> = rec
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["vm"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("cold".to_string(), "stopped".to_string()),
            ("keep".to_string(), "running".to_string())
        ]
    );
    let v = d.json(&["describe", "keep"]);
    assert_eq!(
        (v["state"].as_str(), v["pid"].as_u64()),
        (Some("running"), Some(pid))
    );
    assert_eq!(d.ok(&["exec", "keep", "--", "cat", "/root/f"]), "state\n");
    d.ok(&["start", "cold"]);
    assert_eq!(d.ok(&["exec", "cold", "--", "echo", "ok"]), "ok\n");
    // Their image is listed again, and a second recover finds nothing to do.
    assert!(d.ok(&["image", "ls"]).contains("busybox"));
    assert_eq!(d.json(&["admin", "recover"]), serde_json::json!([]));
    // A record copy that does not parse, or that names another VM than its directory, is
    // skipped and reported; nothing is made from it.
    let keep_id = d.json(&["describe", "keep"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let vms = d.data().join("vms");
    std::fs::create_dir_all(vms.join("0badc0ffee00")).unwrap();
    std::fs::write(vms.join("0badc0ffee00/vm.json"), b"{\"id\": [not json").unwrap();
    std::fs::create_dir_all(vms.join("0badc0ffee01")).unwrap();
    std::fs::copy(
        vms.join(&keep_id).join("vm.json"),
        vms.join("0badc0ffee01/vm.json"),
    )
    .unwrap();
    let rec = d.json(&["admin", "recover"]);
    let outcomes: Vec<&str> = rec
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "skipped: no readable vm.json",
            "skipped: no readable vm.json"
        ],
        "{rec}"
    );
    assert_eq!(d.json(&["ls"]).as_array().unwrap().len(), 2);
    d.ok(&["rm", "keep"]);
    d.ok(&["rm", "cold"]);
    assert!(d.qemu_pids().is_empty());
}
