//! The cluster with each node in its own network namespace (a bridge joins them; the etcd
//! members listen on its address): a partitioned node fences itself and heals; auto-scaling
//! adds a node in a namespace and removes it; VMs move live between nodes that share one VM
//! network, keeping their address and an open TCP connection, and a node is drained. Two VM
//! boots each.

mod common;
use common::cluster::*;
use common::*;
use hutch_store_etcd::testing::EtcdCluster;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Membership lease TTL of these nodes (seconds): short, to keep the tests quick.
const TTL: &str = "3";

/// Each node in its own network namespace. A node cut off from the network (etcd and its
/// peers) freezes its VMs once its lease may have expired; the others see it down and make its
/// restart-always VM again; healed, it resumes the VM still recorded on it and removes the one
/// that moved: never one VM running on two nodes.
#[test]
fn a_partitioned_node_freezes_and_heals() {
    let lan = Lan::new(2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(EtcdCluster::start_on(&[lan.host(); 3]));
    let eps = etcd.endpoints().join(",");
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let nodes: Vec<Daemon> = (0..2)
        .map(|i| {
            let addr = format!("{}:7070", lan.ip(i));
            let name = format!("p{i}");
            Daemon::start_in(
                Some(&lan.nss[i]),
                &[
                    "--etcd",
                    &eps,
                    "--node-name",
                    &name,
                    "--listen",
                    &addr,
                    "--advertise",
                    &addr,
                    "--lease-ttl",
                    TTL,
                ],
            )
        })
        .collect();
    let (p0, p1) = (&nodes[0], &nodes[1]);
    // Imported on p0; p1 fetches the layer over TLS across the namespaces.
    p0.import_busybox(&layout);
    let stay = p0.json(&[
        "new", "--image", "busybox", "--name", "stay", "--node", "p1",
    ]);
    let go = p0.json(&[
        "new",
        "--image",
        "busybox",
        "--name",
        "go",
        "--node",
        "p1",
        "--restart",
        "always",
    ]);
    // Across namespaces, through the other node.
    assert_eq!(p0.ok(&["exec", "stay", "--", "echo", "ok"]), "ok\n");
    let (stay_id, go_id) = (
        stay["id"].as_str().unwrap().to_string(),
        go["id"].as_str().unwrap().to_string(),
    );
    let go_qemu = go["pid"].as_u64().unwrap() as u32;

    lan.cut(1);
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || (state_of(p0, "p1") == "down")
            .then_some(()))
        .is_some(),
        "p1 not down"
    );
    eprintln!("a partitioned node is down after {:?}", t0.elapsed());
    // Cut off, p1 froze its VMs (by its own clock, before etcd let its lease go).
    for id in [&stay_id, &go_id] {
        assert_eq!(
            qemu_status(p1.data(), id),
            "paused",
            "VM {id} on the cut-off node"
        );
    }
    let moved = wait_until(Duration::from_secs(60), || {
        let o = p0.hutch(&["--json", "describe", "go"]);
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["node"] == "p0" && v["state"] == "running").then_some(v)
    })
    .expect("go not recreated on p0");
    assert_eq!(p0.ok(&["exec", "go", "--", "echo", "moved"]), "moved\n");
    assert_eq!(vm(p0, "stay")["lost"], true);

    lan.heal(1);
    assert!(
        wait_until(Duration::from_secs(30), || (state_of(p0, "p1") == "ready")
            .then_some(()))
        .is_some(),
        "p1 not back"
    );
    // The VM that moved is gone from p1; the one still recorded there runs on.
    assert!(
        wait_until(Duration::from_secs(20), || {
            (!qemu_pids_under(p1.data()).contains(&go_qemu)).then_some(())
        })
        .is_some(),
        "p1 still runs the VM that moved"
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            (qemu_status(p1.data(), &stay_id) == "running").then_some(())
        })
        .is_some(),
        "the VM still recorded on p1 was not resumed"
    );
    assert_eq!(p0.ok(&["exec", "stay", "--", "echo", "back"]), "back\n");
    // p1's view of the records catches up with what happened while it was cut off (its watch
    // resumes from where it stopped): one `go`, the one on p0.
    let caught_up = wait_until(Duration::from_secs(20), || {
        let all = p1.json(&["ls"]);
        let gos: Vec<Value> = all
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["name"] == "go")
            .cloned()
            .collect();
        (gos.len() == 1 && gos[0]["id"] == moved["id"]).then_some(())
    });
    assert!(caught_up.is_some(), "p1 sees: {}", p1.json(&["ls"]));

    for name in ["stay", "go"] {
        p1.ok(&["rm", name]);
    }
    drop(nodes);
    drop(etcd);
    drop(lan);
}

/// Auto-scaling: a one-node cluster whose guest memory use passes `--scale-up-at` runs the
/// scale-up command, which starts another hutchd node in its own network namespace; when use
/// falls below `--scale-down-at`, the idle new node is cordoned, the scale-down command stops
/// it, and the cluster forgets it.
#[test]
fn auto_scaling_adds_and_removes_a_node() {
    let lan = Lan::new(2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(EtcdCluster::start_on(&[lan.host()]));
    let eps = etcd.endpoints().join(",");
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    // The thresholds from this host's memory: one 256 MiB VM is past "up" on one node and
    // past "down" on two.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_mib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0;
    let one_vm = 256.0 * 100.0 / total_mib;
    let (up_at, down_at) = (one_vm * 0.8, one_vm * 0.2);

    // The commands: start or stop node `s1` in namespace 1 (idempotent, as the leader may ask
    // again after the cooldown).
    let d1 = tempfile::Builder::new()
        .prefix("hutch-t")
        .tempdir_in("/tmp")
        .unwrap();
    let (bridge, subnet) = test_network();
    let addr1 = format!("{}:7070", lan.ip(1));
    let script = work.path().join("scale.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh
pidf={d}/hutchd.pid
case \"$1\" in
up)
  if [ -f $pidf ] && kill -0 $(cat $pidf) 2>/dev/null; then exit 0; fi
  ip netns exec {ns} {hutchd} --data-dir {d}/data --boot-cache {boot} --ssh-listen off \\
    --bridge {bridge} --subnet {subnet} --etcd {eps} --node-name s1 \\
    --listen {addr1} --advertise {addr1} --lease-ttl 3 >> {d}/hutchd.log 2>&1 &
  echo $! > $pidf ;;
down)
  [ \"$HUTCH_NODE\" = s1 ] || exit 3
  kill $(cat $pidf) ;;
esac
",
            d = d1.path().display(),
            ns = lan.nss[1],
            hutchd = env!("CARGO_BIN_EXE_hutchd"),
            boot = workspace().join("target/hutch-test-boot").display(),
        ),
    )
    .unwrap();
    let sh_script = format!("sh {}", script.display());
    let addr0 = format!("{}:7070", lan.ip(0));
    let (up, down) = (format!("{up_at}"), format!("{down_at}"));
    let s0 = Daemon::start_in(
        Some(&lan.nss[0]),
        &[
            "--etcd",
            &eps,
            "--node-name",
            "s0",
            "--listen",
            &addr0,
            "--advertise",
            &addr0,
            "--lease-ttl",
            TTL,
            "--scale-up-cmd",
            &format!("{sh_script} up"),
            "--scale-down-cmd",
            &format!("{sh_script} down"),
            "--scale-up-at",
            &up,
            "--scale-down-at",
            &down,
            "--scale-cooldown",
            "2",
        ],
    );
    s0.import_busybox(&layout);
    assert_eq!(nodes(&s0).len(), 1);

    s0.ok(&[
        "new", "--image", "busybox", "--name", "load", "--node", "s0",
    ]);
    let joined = wait_until(Duration::from_secs(90), || {
        (state_of(&s0, "s1") == "ready").then_some(())
    });
    assert!(
        joined.is_some(),
        "no node was added: {:?}\n{}",
        nodes(&s0),
        s0.log()
    );

    s0.ok(&["rm", "load"]);
    let gone = wait_until(Duration::from_secs(90), || {
        let ns = nodes(&s0);
        (ns.len() == 1 && ns[0]["name"] == "s0").then_some(())
    });
    assert!(
        gone.is_some(),
        "the idle node was not removed: {:?}\n{}",
        nodes(&s0),
        s0.log()
    );
    let pid = std::fs::read_to_string(d1.path().join("hutchd.pid")).unwrap();
    let alive = || {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .is_ok_and(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
    };
    assert!(
        wait_until(Duration::from_secs(10), || (!alive()).then_some(())).is_some(),
        "s1's hutchd still runs"
    );
    // What s1's hutchd made outside its namespace: its (empty) cgroups.
    let node = hutch_vmm::cgroup::node_name(&d1.path().join("data"));
    if let Some(cg) =
        hutch_vmm::cgroup::Cgroups::detect(std::path::Path::new("/sys/fs/cgroup"), "hutch", &node)
    {
        for id in cg.list() {
            let _ = cg.remove(&id);
        }
    }

    drop(s0);
    drop(etcd);
    drop(lan);
}

/// Two nodes sharing one VM network (the same --subnet; the overlay routes each VM to its
/// node). A TCP connection from a VM on m1 to a VM on m0 carries data before the server VM
/// moves to m1 (then both are on m1), after it moves back (across nodes again), and after
/// m1 is drained (both on m0): one connection, never re-opened, and the server's file kept.
/// The drain also moves a paused VM (resumed on m0 with its memory) and a stopped one (started
/// on m0 from its disk).
#[test]
fn vms_move_live_with_their_address_and_connections() {
    let lan = Lan::new(2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(EtcdCluster::start_on(&[lan.host()]));
    let eps = etcd.endpoints().join(",");
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let (bridge, subnet) = test_network();
    let nodes: Vec<Daemon> = (0..2)
        .map(|i| {
            let addr = format!("{}:7070", lan.ip(i));
            let name = format!("m{i}");
            let proxy = format!("{}:8080", lan.ip(i));
            Daemon::start_in(
                Some(&lan.nss[i]),
                &[
                    "--etcd",
                    &eps,
                    "--node-name",
                    &name,
                    "--listen",
                    &addr,
                    "--advertise",
                    &addr,
                    "--lease-ttl",
                    TTL,
                    "--bridge",
                    &bridge,
                    "--subnet",
                    &subnet,
                    "--domain",
                    "c.hutch",
                    "--http-listen",
                    &proxy,
                ],
            )
        })
        .collect();
    let (m0, m1) = (&nodes[0], &nodes[1]);
    m0.import_busybox(&layout);
    let server = m0.json(&[
        "new", "--image", "busybox", "--name", "server", "--node", "m0",
    ]);
    let client = m0.json(&[
        "new", "--image", "busybox", "--name", "client", "--node", "m1",
    ]);
    let server_ip = server["net"]["ipv4"].as_str().unwrap().to_string();
    assert!(client["net"]["ipv4"].is_string());
    // The server keeps what it receives on its disk; the client sends what is appended to a
    // file. Both in sessions of their own, so that they outlive the exec that starts them.
    m0.ok(&[
        "exec",
        "server",
        "--",
        "sh",
        "-c",
        // (busybox nc ends the connection when its input ends: it reads a pipe that never does)
        "setsid sh -c 'tail -f /dev/null | nc -l -p 7000 > /root/got' </dev/null >/dev/null 2>&1 &",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    m0.ok(&[
        "exec",
        "client",
        "--",
        "sh",
        "-c",
        &format!(
            "touch /root/out; setsid sh -c 'tail -f /root/out | nc {server_ip} 7000' \
             </dev/null >/dev/null 2>&1 &"
        ),
    ]);
    let send_and_see = |word: &str| {
        m0.ok(&[
            "exec",
            "client",
            "--",
            "sh",
            "-c",
            &format!("echo {word} >> /root/out"),
        ]);
        let seen = wait_until(Duration::from_secs(30), || {
            let got = m1.ok(&["exec", "server", "--", "cat", "/root/got"]);
            got.contains(word).then_some(got)
        });
        assert!(seen.is_some(), "{word} did not arrive over the connection");
    };
    // Across nodes (m1 -> m0), through the overlay.
    send_and_see("one");
    // m0's HTTP proxy serves a port of the client VM on m1 (its host reaches it through the
    // overlay too).
    m0.ok(&[
        "exec",
        "client",
        "--",
        "sh",
        "-c",
        "mkdir -p /srv && echo served-by-m1 > /srv/index.html && httpd -p 8000 -h /srv",
    ]);
    let token = std::fs::read_to_string(m0.data().join("api-token")).unwrap();
    let (st, body) = curl(
        "GET",
        &format!("http://{}:8080/", lan.ip(0)),
        &[
            ("Host", "8000-client.c.hutch"),
            ("Authorization", &format!("Bearer {}", token.trim())),
        ],
        None,
    );
    assert_eq!(
        (st, String::from_utf8_lossy(&body).as_ref()),
        (200, "served-by-m1\n")
    );
    // hutch's DNS on m1 names the account's VM on m0 for the client.
    let found = m0.ok(&[
        "exec",
        "client",
        "--",
        "sh",
        "-c",
        "ping -c 1 -W 3 server; true",
    ]);
    assert!(found.contains(&server_ip), "{found}");
    let moved = m1.json(&["migrate", "server", "--to", "m1"]);
    assert_eq!(moved["vm"]["node"], "m1", "{moved}");
    assert_eq!(moved["vm"]["net"]["ipv4"], server_ip.as_str());
    eprintln!(
        "migrated a VM with a NIC: {} ms paused, {} ms in all",
        moved["downtime_ms"], moved["total_ms"]
    );
    // Both on m1 now; the same connection.
    send_and_see("two");
    m0.json(&["migrate", "server", "--to", "m0"]);
    // Across nodes again, the other way round.
    send_and_see("three");

    // On m1 also a paused VM (its memory saved) and a stopped one (its disk only).
    m0.json(&[
        "new",
        "--image",
        "busybox",
        "--name",
        "napping",
        "--node",
        "m1",
        "--auto-pause",
        "600s",
    ]);
    // A VM that pauses when idle is proxied through its node even where the overlay reaches
    // it, so that its node sees it used (and wakes it): dialed by m1.
    m0.ok(&[
        "exec",
        "napping",
        "--",
        "sh",
        "-c",
        "mkdir -p /srv && echo napping > /srv/index.html && httpd -p 8000 -h /srv",
    ]);
    // (m1's metrics over its unix socket, which needs no token.)
    let dials = || {
        let o = std::process::Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(m1.data().join("hutchd.sock"))
            .arg("http://localhost/metrics")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("hutch_cluster_dials_total ")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .expect("m1's dial counter")
    };
    let before = dials();
    let (st, body) = curl(
        "GET",
        &format!("http://{}:8080/", lan.ip(0)),
        &[
            ("Host", "8000-napping.c.hutch"),
            ("Authorization", &format!("Bearer {}", token.trim())),
        ],
        None,
    );
    assert_eq!(
        (st, String::from_utf8_lossy(&body).as_ref()),
        (200, "napping\n")
    );
    assert_eq!(dials(), before + 1, "dialed through m1");
    m0.json(&[
        "new", "--image", "busybox", "--name", "parked", "--node", "m1",
    ]);
    let napped = m0.ok(&[
        "exec",
        "napping",
        "--",
        "sh",
        "-c",
        "echo in-ram > /dev/shm/mark; cat /proc/sys/kernel/random/boot_id",
    ]);
    m0.ok(&[
        "exec",
        "parked",
        "--",
        "sh",
        "-c",
        "echo on-disk > /root/mark; sync",
    ]);
    m0.ok(&["pause", "napping"]);
    m0.ok(&["stop", "parked"]);

    // Drained: m1 cordoned, its VMs moved to m0: the client live, the others at rest.
    let drained = m0.json(&["drain", "m1"]);
    assert_eq!(drained["failed"], serde_json::json!([]), "{drained}");
    assert_eq!(
        drained["migrated"].as_array().unwrap().len(),
        3,
        "{drained}"
    );
    assert_eq!(vm(m0, "client")["node"], "m0");
    for (name, state) in [("napping", "paused"), ("parked", "stopped")] {
        let v = vm(m0, name);
        assert_eq!(
            v["migrated"],
            format!("at rest ({state}) from node m1"),
            "{v}"
        );
        assert_eq!(
            (v["node"].as_str(), v["state"].as_str()),
            (Some("m0"), Some(state)),
            "{v}"
        );
    }
    assert!(!m1
        .data()
        .join("vms")
        .join(vm(m0, "napping")["id"].as_str().unwrap())
        .exists());
    // The paused VM resumes on m0 where it stopped (its RAM came along); the stopped one boots
    // from the disk it brought.
    m0.ok(&["resume", "napping"]);
    let after = m0.ok(&[
        "exec",
        "napping",
        "--",
        "sh",
        "-c",
        "cat /proc/sys/kernel/random/boot_id /dev/shm/mark",
    ]);
    assert_eq!(after, format!("{napped}in-ram\n"));
    m0.ok(&["start", "parked"]);
    assert_eq!(
        m0.ok(&["exec", "parked", "--", "cat", "/root/mark"]),
        "on-disk\n"
    );
    assert_eq!(state_of(m0, "m1"), "cordoned");
    assert!(qemu_pids_under(m1.data()).is_empty(), "m1 still runs a VM");
    send_and_see("four");
    let got = m0.ok(&["exec", "server", "--", "cat", "/root/got"]);
    assert_eq!(got, "one\ntwo\nthree\nfour\n");
    // A drained node takes no new VMs; a VM cannot move to it.
    fails_with(m0, &["migrate", "server", "--to", "m1"], "cordoned");

    for name in ["server", "client", "napping", "parked"] {
        m0.ok(&["rm", name]);
    }
    drop(nodes);
    drop(etcd);
    drop(lan);
}
