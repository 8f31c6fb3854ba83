//! A cluster on one machine: three hutchd nodes (each its own data dir, bridge and subnet) on a
//! 3-member etcd (Debian's etcd-server). One story, three VM boots: the nodes join and share
//! their secrets; a VM created through one node is placed on another and used through a third;
//! cordoning; lifecycle through a node that does not run the VM; a node's hutchd killed -9 is
//! down within its lease TTL and its VM `lost`, then back; etcd losing a member changes nothing
//! users see; a rolling restart moves nothing; everything deleted through one node leaves
//! nothing running. Also a single node moved into etcd by `hutch admin migrate-store`. The
//! tests with each node in its own network namespace are in cluster_netns.rs.

mod common;
#[path = "cluster_front/mod.rs"]
mod front;
use common::cluster::*;
use common::ssh_client::keygen;
use common::*;
use front::*;
use hutch_store_etcd::testing::EtcdCluster;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Membership lease TTL of the nodes (seconds): the test also loses an etcd member (a leader
/// election, a client moving to another member), which must not cost a node its lease.
const TTL3: &str = "8";

fn node(endpoints: &str, name: &str, admin_keys: &std::path::Path) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let e2b = format!("127.0.0.1:{}", free_port());
    let ssh = format!("127.0.0.1:{}", free_port());
    let proxy = format!("127.0.0.1:{}", free_port());
    let keys = format!("{}.pub", admin_keys.display());
    let d = Daemon::start(&[
        "--domain",
        "c.hutch",
        "--http-listen",
        &proxy,
        "--ssh-listen",
        &ssh,
        "--admin-keys",
        &keys,
        "--e2b-listen",
        &e2b,
        "--etcd",
        endpoints,
        "--node-name",
        name,
        "--listen",
        &addr,
        "--advertise",
        &addr,
        "--lease-ttl",
        TTL3,
    ]);
    (d, addr)
}

#[test]
fn three_nodes_on_three_etcd_members() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut etcd = rt.block_on(EtcdCluster::start(3));
    let eps = etcd.endpoints().join(",");
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let admin_key = keygen(work.path(), "admin", &["-t", "ed25519"]);

    // The first node initializes the cluster; the others join it.
    let (mut n1, a1) = node(&eps, "n1", &admin_key);
    let (mut n2, a2) = node(&eps, "n2", &admin_key);
    let (mut n3, a3) = node(&eps, "n3", &admin_key);
    for d in [&n1, &n2, &n3] {
        let ns = nodes(d);
        let names: Vec<&str> = ns.iter().map(|n| n["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["n1", "n2", "n3"]);
        assert!(ns.iter().all(|n| n["state"] == "ready"), "{ns:?}");
        assert!(ns.iter().all(|n| n["capacity"]["cpus"].as_u64() > Some(0)));
    }
    // One admin token and one JWT key: every token works on every node.
    for f in ["api-token", "jwt-secret", "e2b-key", "identity-key.p8"] {
        let a = std::fs::read(n1.data().join(f)).unwrap();
        for d in [&n2, &n3] {
            assert_eq!(std::fs::read(d.data().join(f)).unwrap(), a, "{f} differs");
        }
    }
    let token = std::fs::read_to_string(n1.data().join("api-token")).unwrap();
    let (st, v) = http_json(&a3, token.trim(), "GET", "/api/v1/stats", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["nodes"]["ready"], 3);

    // Images are cluster-wide: imported through n1 only, their layers are fetched from n1
    // by the node that first needs them (verified against their digests).
    let img = n1.json(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        "busybox",
    ]);
    let layer = img["layers"][0]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let blob = |d: &Daemon| d.data().join("images/blobs/sha256").join(&layer);
    assert!(blob(&n1).exists() && !blob(&n2).exists());

    // Created through n1, placed on n2 (pinned), used through n1 and n3.
    let web = n1.json(&["new", "--image", "busybox", "--name", "web", "--node", "n2"]);
    assert_eq!(web["node"], "n2");
    assert_eq!(web["state"], "running");
    let qemu = web["pid"].as_u64().unwrap() as u32;
    assert!(n2.qemu_pids().contains(&qemu), "web's QEMU runs under n2");
    assert!(blob(&n2).exists(), "n2 fetched the layer from n1");
    assert!(n1.qemu_pids().is_empty() && n3.qemu_pids().is_empty());
    for d in [&n1, &n3] {
        let out = d.ok(&[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo hi > /tmp/f; cat /tmp/f; hostname",
        ]);
        assert_eq!(out, "hi\nweb\n");
    }
    let ls = n3.ok(&["ls"]);
    assert!(ls.contains("NODE") && ls.contains("n2"), "{ls}");
    ssh_reaches_other_nodes(&[&n1, &n2, &n3], &admin_key, work.path(), &web);
    proxy_reaches_other_nodes(&[&n1, &n2, &n3], token.trim(), &web);
    snapshot_copies_run_elsewhere(&[&n1, &n2, &n3], token.trim());
    pools_on_every_node(&[&n1, &n2, &n3]);

    // Unpinned: the scheduler places it on a ready node.
    let auto = n3.json(&["new", "--image", "busybox", "--name", "auto"]);
    let placed = auto["node"].as_str().unwrap().to_string();
    assert!(["n1", "n2", "n3"].contains(&placed.as_str()));
    assert_eq!(n1.ok(&["exec", "auto", "--", "echo", "ok"]), "ok\n");

    // Cordoned: no new VMs there, the others still placed.
    n1.ok(&["cordon", "n3"]);
    assert_eq!(state_of(&n2, "n3"), "cordoned");
    fails_with(
        &n1,
        &["new", "--image", "busybox", "--node", "n3"],
        "cordoned",
    );
    fails_with(
        &n1,
        &["new", "--image", "busybox", "--node", "nope"],
        "not found",
    );
    n1.ok(&["uncordon", "n3"]);
    assert_eq!(state_of(&n2, "n3"), "ready");

    // E2B: a sandbox made through n1's E2B API runs on n1; its envd answers through n3's and
    // n2's E2B APIs (forwarded), and n2's control plane kills it (an intent to n1).
    let e2b = |d: &Daemon| format!("http://{}", d.opt("--e2b-listen").unwrap());
    let (st, b) = curl(
        "POST",
        &format!("{}/sandboxes", e2b(&n1)),
        &[
            ("x-api-key", token.trim()),
            ("content-type", "application/json"),
        ],
        Some(br#"{"templateID":"busybox","timeout":600}"#),
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&b));
    let sb: Value = serde_json::from_slice(&b).unwrap();
    let (sid, at) = (
        sb["sandboxID"].as_str().unwrap().to_string(),
        sb["envdAccessToken"].as_str().unwrap().to_string(),
    );
    let envd = [
        ("e2b-sandbox-id", sid.as_str()),
        ("x-access-token", at.as_str()),
    ];
    let (st, b) = curl(
        "POST",
        &format!("{}/files?path=/tmp/e2b.txt", e2b(&n3)),
        &[
            envd[0],
            envd[1],
            ("content-type", "application/octet-stream"),
        ],
        Some(b"via n3"),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let (st, b) = curl(
        "GET",
        &format!("{}/files?path=/tmp/e2b.txt", e2b(&n2)),
        &envd,
        None,
    );
    assert_eq!((st, b.as_slice()), (200, &b"via n3"[..]));
    let (st, b) = curl(
        "DELETE",
        &format!("{}/sandboxes/{sid}", e2b(&n2)),
        &[("x-api-key", token.trim())],
        None,
    );
    assert_eq!(st, 204, "{}", String::from_utf8_lossy(&b));

    // Lifecycle through a node that does not run the VM: the owner acts (intents in etcd).
    let stopped = n3.json(&["stop", "web"]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let started = n1.json(&["start", "web"]);
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(n3.ok(&["exec", "web", "--", "cat", "/tmp/f"]), "hi\n");

    // Live migration, asked through a third node. The nodes here have a VM subnet each, so
    // the VM has no NIC (cluster_netns.rs moves one with its address and a TCP connection).
    let body = serde_json::json!({"name": "mover", "image": "busybox", "vcpus": 1,
        "mem_mib": 256, "node": "n1", "net": "none"});
    let (st, v) = http_json(&a1, token.trim(), "POST", "/api/v1/sandboxes", Some(&body));
    assert_eq!(st, 201, "{v}");
    let old_pid = v["pid"].as_u64().unwrap() as u32;
    let boot_id = n1.ok(&[
        "exec",
        "mover",
        "--",
        "sh",
        "-c",
        "echo kept > /root/f; sync; cat /proc/sys/kernel/random/boot_id",
    ]);
    let m = n2.json(&["migrate", "mover", "--to", "n3"]);
    eprintln!(
        "migrated a 256 MiB VM: {} ms paused, {} ms in all",
        m["downtime_ms"], m["total_ms"]
    );
    assert_eq!(m["vm"]["node"], "n3", "{m}");
    assert_eq!(
        (m["from"].as_str(), m["to"].as_str()),
        (Some("n1"), Some("n3"))
    );
    assert!(
        m["disk_bytes"].as_u64() > Some(0) && m["ram_bytes"].as_u64() > Some(0),
        "{m}"
    );
    assert!(m["downtime_ms"].as_u64() <= m["total_ms"].as_u64(), "{m}");
    let new_pid = m["vm"]["pid"].as_u64().unwrap() as u32;
    assert!(
        n3.qemu_pids().contains(&new_pid),
        "mover's QEMU runs under n3"
    );
    assert!(!n1.qemu_pids().contains(&old_pid), "n1's copy is gone");
    assert!(!n1
        .data()
        .join("vms")
        .join(m["vm"]["id"].as_str().unwrap())
        .exists());
    // The same running kernel (no reboot); the file read from n3's disk, not from RAM.
    let after = n1.ok(&[
        "exec",
        "mover",
        "--",
        "sh",
        "-c",
        "echo 3 > /proc/sys/vm/drop_caches; cat /proc/sys/kernel/random/boot_id /root/f",
    ]);
    assert_eq!(after, format!("{boot_id}kept\n"));
    assert!(n2.ok(&["describe", "mover"]).contains("from node n1"));
    let events = n3.ok(&["ls"]);
    assert!(events.contains("mover"), "{events}");
    fails_with(
        &n1,
        &["migrate", "mover", "--to", "n3"],
        "already runs on node n3",
    );
    fails_with(&n1, &["migrate", "mover", "--to", "nope"], "not found");
    fails_with(
        &n1,
        &["migrate", "web", "--to", "n1"],
        "share one VM network",
    );
    // Stray or hostile node-to-node calls change nothing.
    let zero = format!("/api/v1/cluster/rootfs/sha256:{}", "0".repeat(64));
    for (method, path, want) in [
        ("POST", "/api/v1/cluster/migrations/nope/state", 404),
        ("POST", "/api/v1/cluster/migrations/nope/disk", 404),
        ("POST", "/api/v1/cluster/migrations/nope/finish", 404),
        ("DELETE", "/api/v1/cluster/migrations/nope", 404),
        ("GET", zero.as_str(), 404),
        ("GET", "/api/v1/cluster/rootfs/..%2F..%2Fapi-token", 400),
    ] {
        let (st, v) = http_json(&a1, token.trim(), method, path, None);
        assert_eq!(st, want, "{method} {path}: {v}");
    }
    // A target is asked to take a VM that is not migrating (web runs on n2): refused.
    let ask = serde_json::json!({"vm": web["id"], "from": "n2", "rootfs_sha256": "0"});
    let (st, v) = http_json(
        &a1,
        token.trim(),
        "POST",
        "/api/v1/cluster/migrations",
        Some(&ask),
    );
    assert_eq!(st, 409, "{v}");
    // web (refused above) runs on, on n2.
    assert_eq!(n1.ok(&["exec", "web", "--", "cat", "/tmp/f"]), "hi\n");
    // Stopped and started on n3: a cold boot from the disk it brought.
    n2.ok(&["stop", "mover"]);
    n2.ok(&["start", "mover"]);
    assert_eq!(n1.ok(&["exec", "mover", "--", "cat", "/root/f"]), "kept\n");
    n1.ok(&["rm", "mover"]);

    // A restart-always VM on n2, to be made again elsewhere when n2 goes down.
    let always = n3.json(&[
        "new",
        "--image",
        "busybox",
        "--name",
        "always",
        "--node",
        "n2",
        "--restart",
        "always",
    ]);
    let always_qemu = always["pid"].as_u64().unwrap() as u32;

    // n2's hutchd killed -9: down within the lease TTL; its VM is lost but its QEMU runs on.
    let qemu = vm(&n1, "web")["pid"].as_u64().unwrap() as u32;
    n2.kill9();
    let t0 = Instant::now();
    let down = wait_until(Duration::from_secs(20), || {
        (state_of(&n1, "n2") == "down").then_some(())
    });
    let took = t0.elapsed();
    assert!(down.is_some(), "n2 not down in 20 s: {:?}", nodes(&n1));
    assert!(
        took < Duration::from_secs(8 + 3),
        "n2 down after {took:?} (lease TTL {TTL3} s)"
    );
    eprintln!("a killed node is down after {took:?} (lease TTL {TTL3} s)");
    assert_eq!(vm(&n3, "web")["lost"], true);
    assert!(n1.ok(&["ls"]).contains("lost"));
    fails_with(&n1, &["exec", "web", "--", "true"], "lost");
    fails_with(&n3, &["stop", "web"], "lost");
    assert!(
        qemu_pids_under(n2.data()).contains(&qemu),
        "VMs outlive hutchd"
    );
    // The restart-always VM is made again on another node, from its image, and says so.
    let moved = wait_until(Duration::from_secs(60), || {
        // Between the old record's removal and the new one's, it is not found.
        let o = n1.hutch(&["--json", "describe", "always"]);
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["node"] != "n2" && v["state"] == "running" && v["recreated"].is_string()).then_some(v)
    })
    .expect("the restart-always VM was not recreated elsewhere");
    assert_ne!(moved["id"], always["id"]);
    let note = moved["recreated"].as_str().unwrap_or_default();
    assert!(note.contains("n2") && note.contains("lost"), "{moved}");
    let desc = n1.ok(&["describe", "always"]);
    assert!(desc.contains("recreated on"), "{desc}");
    let on = moved["node"].as_str().unwrap().to_string();
    let d_on = if on == "n1" { &n1 } else { &n3 };
    assert!(d_on
        .qemu_pids()
        .contains(&(moved["pid"].as_u64().unwrap() as u32)));
    assert_eq!(n3.ok(&["exec", "always", "--", "echo", "here"]), "here\n");
    let all = n1.json(&["ls"]);
    let named = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == "always");
    assert_eq!(named.count(), 1, "placed once: {all}");

    // Back: it re-attaches, holds a new lease, and serves again.
    n2.spawn();
    let ready = wait_until(Duration::from_secs(30), || {
        (state_of(&n1, "n2") == "ready").then_some(())
    });
    assert!(ready.is_some(), "n2 not ready again: {:?}", nodes(&n1));
    assert_eq!(vm(&n3, "web")["lost"], Value::Null);
    assert_eq!(vm(&n3, "web")["pid"].as_u64(), Some(u64::from(qemu)));
    assert_eq!(n1.ok(&["exec", "web", "--", "cat", "/tmp/f"]), "hi\n");
    // What moved away does not run on n2 any more: its hutchd stopped it at start.
    assert!(
        !qemu_pids_under(n2.data()).contains(&always_qemu),
        "n2 still runs the VM that was moved"
    );

    // etcd loses a member (of 3): the cluster goes on.
    etcd.kill(0);
    let third = n1.json(&[
        "new", "--image", "busybox", "--name", "third", "--node", "n3",
    ]);
    assert_eq!(third["state"], "running");
    assert_eq!(n2.ok(&["exec", "third", "--", "echo", "still"]), "still\n");
    assert_eq!(n3.json(&["ls"]).as_array().unwrap().len(), 4);
    let (st, _) = http_json(&a2, token.trim(), "GET", "/api/v1/nodes", None);
    assert_eq!(st, 200);
    // No node lost its lease over it (nor froze its VMs).
    std::thread::sleep(Duration::from_secs(3));
    for d in [&n1, &n2, &n3] {
        assert!(
            !d.log().contains("membership lease lost") && !d.log().contains("are frozen"),
            "a node flapped when etcd lost a member: {}",
            d.log()
        );
    }

    // A rolling restart of every node's hutchd (each back within its lease TTL): no node is
    // seen down, no VM moves or reboots.
    let before: Vec<(String, String, Value)> = n1
        .json(&["ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["id"].as_str().unwrap().to_string(),
                v["pid"].clone(),
            )
        })
        .collect();
    for d in [&mut n1, &mut n2, &mut n3] {
        d.kill9();
        d.spawn();
    }
    for d in [&n1, &n2, &n3] {
        assert!(
            nodes(d).iter().all(|n| n["state"] == "ready"),
            "{:?}",
            nodes(d)
        );
    }
    for (name, id, pid) in &before {
        let v = vm(&n2, name);
        assert_eq!(
            (&v["id"], &v["pid"]),
            (&Value::from(id.as_str()), pid),
            "{name} changed"
        );
        assert_eq!(v["state"], "running");
        assert_eq!(n3.ok(&["exec", name, "--", "echo", "up"]), "up\n");
    }

    // Deleted through one node, wherever they run: nothing is left.
    for name in ["web", "auto", "third", "always"] {
        n1.ok(&["rm", name]);
    }
    assert!(n2.json(&["ls"]).as_array().unwrap().is_empty());
    let gone = wait_until(Duration::from_secs(20), || {
        [&n1, &n2, &n3]
            .iter()
            .all(|d| d.qemu_pids().is_empty())
            .then_some(())
    });
    assert!(gone.is_some(), "QEMU left running");
    drop((n1, n2, n3));
    drop(etcd);
}

/// A single node moved into a cluster: `hutch admin migrate-store --to-etcd` with hutchd
/// stopped; its VM runs on throughout, and the node on etcd re-attaches it as its own. A second
/// migration into the now non-empty etcd is refused.
#[test]
fn a_single_node_moves_into_a_cluster() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(EtcdCluster::start(1));
    let eps = etcd.endpoints().join(",");
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let mut d = Daemon::start(&[]);
    d.import_busybox(&layout);
    let v = d.json(&["new", "--image", "busybox", "--name", "old"]);
    d.ok(&["exec", "old", "--", "sh", "-c", "echo kept > /tmp/k"]);
    let pid = v["pid"].as_u64().unwrap() as u32;
    let token = std::fs::read(d.data().join("api-token")).unwrap();

    // A single node has no nodes to place on.
    fails_with(
        &d,
        &["new", "--image", "busybox", "--node", "n9"],
        "runs alone",
    );
    assert_eq!(d.json(&["ls"]).as_array().unwrap().len(), 1, "nothing made");
    // While hutchd runs, its store is locked.
    fails_with(
        &d,
        &[
            "admin",
            "migrate-store",
            "--to-etcd",
            &eps,
            "--node-name",
            "solo",
        ],
        "stop hutchd first",
    );
    d.kill9();
    let out = d.ok(&[
        "admin",
        "migrate-store",
        "--to-etcd",
        &eps,
        "--node-name",
        "solo",
    ]);
    assert!(out.contains("as node solo"), "{out}");
    assert!(d.data().join("state.redb.moved-to-etcd").exists());
    assert!(!d.data().join("state.redb").exists());
    assert!(qemu_pids_under(d.data()).contains(&pid), "the VM ran on");

    d.extra = ["--etcd", &eps, "--node-name", "solo"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    d.spawn();
    let v = vm(&d, "old");
    assert_eq!(v["node"], "solo");
    assert_eq!(v["state"], "running");
    assert_eq!(
        v["pid"].as_u64(),
        Some(u64::from(pid)),
        "re-attached, not rebooted"
    );
    assert_eq!(d.ok(&["exec", "old", "--", "cat", "/tmp/k"]), "kept\n");
    assert_eq!(std::fs::read(d.data().join("api-token")).unwrap(), token);
    assert_eq!(state_of(&d, "solo"), "ready");

    // etcd is not empty any more.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(
        d.data().join("state.redb.moved-to-etcd"),
        other.path().join("state.redb"),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hutch"))
        .args(["--data-dir", other.path().to_str().unwrap()])
        .args(["admin", "migrate-store", "--to-etcd", &eps])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already holds"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    d.ok(&["rm", "old"]);
    drop(d);
    drop(etcd);
}
