//! Tenants against each other and against the host, through the real REST API with account
//! tokens issued over SSH: private image namespaces beside the shared library, VM names per
//! account (a taken name reveals nothing), quotas, host admission control, and a VM that keeps
//! working after its image's tag moves. Two VM boots.

mod common;
use common::ssh_client::*;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

struct Rest {
    addr: String,
}

impl Rest {
    fn call(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        http_json(&self.addr, token, method, path, body.as_ref())
    }

    fn upload(&self, token: &str, name: &str, tar: &Path) -> (u16, Value) {
        let mut c = std::net::TcpStream::connect(&self.addr).unwrap();
        let body = std::fs::read(tar).unwrap();
        let (st, out) = http(
            &mut c,
            "POST",
            &format!("/api/v1/images?name={name}"),
            Some(&body),
            "application/x-tar",
            Some(token),
        )
        .unwrap();
        (st, serde_json::from_slice(&out).unwrap_or(Value::Null))
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// MiB free on the filesystem of `p`, as df sees it.
fn free_mib(p: &Path) -> u64 {
    let o = std::process::Command::new("df")
        .args(["--output=avail", "-m"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[test]
fn tenants_are_isolated_and_bounded() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let admin = keygen(w, "admin", &["-t", "ed25519"]);
    let alice = keygen(w, "alice", &["-t", "ed25519"]);
    let bob = keygen(w, "bob", &["-t", "ed25519"]);
    let (ssh_port, api_port) = (free_port(), free_port());
    let layout = busybox_layout(w);
    let tar = w.join("busybox.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        layout.display(),
        tar.display()
    ));
    // Host memory admission at 600 MiB of guest memory: two 256 MiB VMs fit, a third does not.
    // Disk admission leaves 30 GiB of headroom above the reserve.
    let host_mib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap()
        / 1024;
    let overcommit = format!("{:.6}", 600.0 / host_mib as f64);
    let reserve = (free_mib(Path::new("/tmp")).saturating_sub(30 * 1024)).to_string();
    let d = Daemon::start(&[
        "--ssh-max-pending-per-address",
        "4",
        "--listen",
        &format!("127.0.0.1:{api_port}"),
        "--ssh-listen",
        &format!("127.0.0.1:{ssh_port}"),
        "--admin-keys",
        &format!("{}.pub", admin.display()),
        "--mem-overcommit",
        &overcommit,
        "--disk-reserve-mib",
        &reserve,
        "--quota-vms",
        "1",
    ]);
    d.import_busybox(&layout);
    let s = Ssh { port: ssh_port };
    for (name, key) in [("alice", &alice), ("bob", &bob)] {
        let pubkey = std::fs::read(format!("{}.pub", key.display())).unwrap();
        let (_, se, c) = text(&s.run(&admin, "admin", &["adduser", name], Some(&pubkey), false));
        assert_eq!(c, 0, "{se}");
    }
    let token = |key: &Path, user: &str| -> String {
        let (so, se, c) = text(&s.run(key, user, &["token", "create", "--json"], None, false));
        assert_eq!(c, 0, "{se}");
        serde_json::from_str::<Value>(&so).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (at, bt) = (token(&alice, "alice"), token(&bob, "bob"));
    let r = Rest {
        addr: format!("127.0.0.1:{api_port}"),
    };
    let shared = d.json(&["image", "inspect", "busybox"]);

    // Images: alice's upload named busybox lands in her namespace; the shared one is untouched.
    let (st, v) = r.upload(&at, "busybox", &tar);
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["owner"], "alice");
    let (_, v) = r.call(&at, "GET", "/api/v1/images", None);
    let names: Vec<(Value, Value)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].clone(), i["owner"].clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            (json!("busybox:latest"), Value::Null),
            (json!("busybox:latest"), json!("alice"))
        ]
    );
    let (_, v) = r.call(&bt, "GET", "/api/v1/images", None);
    assert_eq!(
        v.as_array().unwrap().len(),
        1,
        "bob sees only the shared library: {v}"
    );
    let admin_view = d.json(&["image", "inspect", "busybox"]);
    assert_eq!(admin_view, shared, "the shared image did not change");
    // Bob can neither read, delete, push nor boot alice's image, nor delete a shared one.
    for (method, path, body) in [
        ("GET", "/api/v1/images/~alice%2Fbusybox", None),
        ("DELETE", "/api/v1/images/~alice%2Fbusybox", None),
        (
            "POST",
            "/api/v1/images/push",
            Some(json!({"image": "~alice/busybox", "reference": "127.0.0.1:1/x:1"})),
        ),
        (
            "POST",
            "/api/v1/sandboxes",
            Some(json!({"image": "~alice/busybox", "name": "steal"})),
        ),
    ] {
        let (st, v) = r.call(&bt, method, path, body);
        assert_eq!((st, code(&v)), (404, "not_found"), "{method} {path}: {v}");
    }
    let (st, v) = r.call(&bt, "DELETE", "/api/v1/images/busybox", None);
    assert_eq!((st, code(&v)), (403, "forbidden"), "{v}");
    let (st, v) = r.call(&at, "DELETE", "/api/v1/images/busybox", None);
    assert_eq!(
        st, 204,
        "alice deletes her own busybox (hers shadows the shared one): {v}"
    );
    let (_, v) = r.call(&at, "GET", "/api/v1/images/busybox", None);
    assert_eq!(
        v["owner"],
        Value::Null,
        "now busybox is the shared one again: {v}"
    );

    // Registry egress: accounts reach public registries only (the admin may reach any).
    let (st, v) = r.call(
        &bt,
        "POST",
        "/api/v1/images/push",
        Some(json!({"image": "busybox", "reference": "127.0.0.1:9/x:1", "insecure": true})),
    );
    assert!(st >= 400 && v.to_string().contains("private"), "{st} {v}");
    let mut c = std::net::TcpStream::connect(&r.addr).unwrap();
    let body = json!({"reference": "127.0.0.1:9/x:1", "insecure": true}).to_string();
    let (_, out) = http(
        &mut c,
        "POST",
        "/api/v1/images/pull",
        Some(body.as_bytes()),
        "application/json",
        Some(&bt),
    )
    .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("\"error\"") && out.contains("private"),
        "{out}"
    );

    // `hutch new` pulls a missing image for an account as for the admin, through the same
    // API and so under the same egress policy: loopback is refused here.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hutch"))
        .args(["--url", &format!("http://{}", r.addr), "--token", &bt])
        .args(["new", "--image", "127.0.0.1:9/x:1"])
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{se}");
    assert!(
        se.contains("Unable to find image '127.0.0.1:9/x:1'")
            && se.contains("--registry-allow-private"),
        "{se}"
    );

    // VM names are per account: bob's "web" does not collide with alice's, and reveals nothing.
    let new = |t: &str, name: &str| {
        r.call(
            t,
            "POST",
            "/api/v1/sandboxes",
            Some(json!({"image": "busybox", "name": name, "mem_mib": 256, "disk_gib": 1})),
        )
    };
    let (st, a_web) = new(&at, "web");
    assert_eq!(st, 201, "{a_web}");
    let (st, b_web) = new(&bt, "web");
    assert_eq!(st, 201, "{b_web}");
    assert_ne!(a_web["id"], b_web["id"]);
    let (_, v) = r.call(&bt, "GET", "/api/v1/sandboxes/web", None);
    assert_eq!(v["id"], b_web["id"]);
    let (st, v) = r.call(&bt, "GET", "/api/v1/sandboxes/alice%2Fweb", None);
    assert_eq!((st, code(&v)), (404, "not_found"), "{v}");
    let ls = d.ok(&["ls"]);
    assert!(ls.contains("alice/web") && ls.contains("bob/web"), "{ls}");
    let o = d.ok(&["exec", "alice/web", "--", "hostname"]);
    assert_eq!(o, "web\n");

    // Quota: one VM per account here; refused before anything is made.
    let vm_dirs = || std::fs::read_dir(d.data().join("vms")).unwrap().count();
    let before = vm_dirs();
    let (st, v) = new(&at, "second");
    assert_eq!((st, code(&v)), (403, "quota_exceeded"), "{v}");
    assert_eq!(vm_dirs(), before, "a refused create leaves nothing behind");
    let (so, se, c) = text(&s.run(
        &admin,
        "admin",
        &["quota", "alice", "--vms", "3"],
        None,
        false,
    ));
    assert_eq!(c, 0, "{se}");
    assert!(so.contains("VMs:    1 of 3"), "{so}");
    let (_, se, c) = text(&s.run(&bob, "bob", &["quota", "bob", "--vms", "9"], None, false));
    assert_eq!(c, 1, "accounts do not set quotas: {se}");

    // Host admission: a third 256 MiB VM exceeds the 600 MiB the host admits.
    let (st, v) = new(&at, "second");
    assert_eq!((st, code(&v)), (503, "insufficient_capacity"), "{v}");
    assert_eq!(vm_dirs(), before);
    // Disk admission: 1 TiB of sparse disk needs 256 GiB free above the reserve.
    let (st, v) = d
        .api(
            "POST",
            "/api/v1/sandboxes",
            Some(r#"{"image":"busybox","name":"huge","mem_mib":64,"disk_gib":1024}"#),
        )
        .unwrap();
    assert_eq!((st, code(&v)), (503, "insufficient_capacity"), "{v}");

    // A VM keeps its image: the shared busybox tag moves to another image (as a re-pull of a
    // moving tag does) and garbage is collected; the stopped VM still starts and works.
    let (_, v) = r.call(&at, "POST", "/api/v1/sandboxes/web/stop", None);
    assert_eq!(v["state"], "stopped", "{v}");
    let moved = w.join("moved");
    sh(&format!(
        "cp -r {} {m} && umoci config --image {m}:bb --config.label moved=1",
        layout.display(),
        m = moved.display()
    ));
    d.ok(&[
        "image",
        "import",
        moved.to_str().unwrap(),
        "--name",
        "busybox",
    ]);
    let now = d.json(&["image", "inspect", "busybox"]);
    assert_ne!(now["digest"], shared["digest"], "the tag moved");
    d.ok(&["image", "gc"]);
    let (st, v) = r.call(&at, "POST", "/api/v1/sandboxes/web/start", None);
    assert_eq!((st, v["state"].clone()), (200, json!("running")), "{v}");
    let o = d.ok(&["exec", "alice/web", "--", "hostname"]);
    assert_eq!(o.trim(), "web");
    let o = d.hutch(&["image", "rm", "busybox"]);
    assert!(o.status.success(), "nothing uses the moved tag's image");
    let (st, v) = new(&at, "third");
    assert_eq!((st, code(&v)), (404, "not_found"), "{v}");

    for t in [&at, &bt] {
        let (st, v) = r.call(t, "DELETE", "/api/v1/sandboxes/web", None);
        assert_eq!(st, 204, "{v}");
    }

    // Removing one of an account's keys revokes its API tokens (a lost key may have made them).
    let alice2 = keygen(w, "alice2", &["-t", "ed25519"]);
    let pub2 = std::fs::read(format!("{}.pub", alice2.display())).unwrap();
    let (_, se, c) = text(&s.run(&alice, "alice", &["keys", "add"], Some(&pub2), false));
    assert_eq!(c, 0, "{se}");
    let t2 = token(&alice2, "alice");
    assert_eq!(r.call(&t2, "GET", "/api/v1/sandboxes", None).0, 200);
    let fp = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(format!("{}.pub", alice2.display()))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let (so, se, c) = text(&s.run(&alice, "alice", &["keys", "rm", &fp], None, false));
    assert_eq!(c, 0, "{se}");
    assert!(so.contains("revoked 2 API token(s)"), "{so}");
    for t in [&t2, &at] {
        let (st, v) = r.call(t, "GET", "/api/v1/sandboxes", None);
        assert_eq!((st, code(&v)), (401, "unauthorized"), "{v}");
    }

    // Idle SSH sockets from one address use up that address's logins in progress, not
    // everyone's: another address still logs in, and the idle ones are cut at the deadline.
    let idle: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", ssh_port)).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut c = client("ssh", ssh_port, &alice);
    let o = c
        .args(["-o", "ConnectTimeout=5", "alice@127.0.0.1", "whoami"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(255),
        "a fifth login from 127.0.0.1 is refused"
    );
    let mut c = client("ssh", ssh_port, &alice);
    let o = c
        .args(["-b", "127.0.0.2", "alice@127.0.0.1", "whoami"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("alice\n"),
        "127.0.0.2 still gets in: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(idle);
    assert!(d.qemu_pids().is_empty());
}
