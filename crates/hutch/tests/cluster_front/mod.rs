//! The front-door parts of `cluster.rs`'s story, on its three nodes: SSH, SFTP and scp through
//! nodes that do not run the VM, every node's HTTP proxy serving a VM on another node, a
//! snapshot's VMs made on a node that copies its files, and warm pools on several nodes. (A
//! directory, so that cargo does not take it for a test of its own.)

use crate::common::cluster::*;
use crate::common::ssh_client::{client, keygen, text, Ssh};
use crate::common::*;
use serde_json::Value;
use std::time::Duration;

/// SSH, SFTP and scp through nodes that do not run the VM (`ssh VM@any-node`), for the admin
/// and for an account (the VM's node acts for it, and for nobody else); the SSH commands about
/// a VM on another node (logs, keepalive, snapshot); the node-to-node route they use refuses strangers.
pub fn ssh_reaches_other_nodes(
    n: &[&Daemon; 3],
    admin: &std::path::Path,
    w: &std::path::Path,
    web: &Value,
) {
    let ssh = |d: &Daemon| Ssh {
        port: d
            .opt("--ssh-listen")
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap(),
    };
    let (s1, s3) = (ssh(n[0]), ssh(n[2]));
    let links = counter(n[1], "hutch_cluster_agent_links_total");
    let streams = counter(n[1], "hutch_cluster_agent_streams_total");
    // web runs on n2; its sessions go through n1 and n3.
    for s in [&s1, &s3] {
        let (o, e, c) = text(&s.run(admin, "web", &["echo hi; hostname; exit 7"], None, false));
        assert_eq!((o.as_str(), c), ("hi\nweb\n", 7), "{e}");
    }
    let big = vec![b'x'; 300_000];
    let (o, e, c) = text(&s3.run(admin, "web", &["wc -c"], Some(&big), false));
    assert_eq!((o.trim(), c), ("300000", 0), "{e}");
    let (o, _, c) = text(&s1.run(admin, "web", &["tty"], None, true));
    assert!(o.contains("/dev/pts/") && c == 0, "{o}");
    // scp (SFTP underneath) up through n3, checked and back down through n1.
    let local: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(w.join("up.bin"), &local).unwrap();
    let st = client("scp", s3.port, admin)
        .arg(w.join("up.bin"))
        .arg("web@127.0.0.1:/tmp/up.bin")
        .status()
        .unwrap();
    assert!(st.success(), "scp up through n3");
    let (o, _, _) = text(&s1.run(admin, "web", &["wc -c < /tmp/up.bin"], None, false));
    assert_eq!(o.trim(), "1500000");
    let st = client("scp", s1.port, admin)
        .arg("web@127.0.0.1:/tmp/up.bin")
        .arg(w.join("down.bin"))
        .status()
        .unwrap();
    assert!(st.success(), "scp down through n1");
    assert!(
        std::fs::read(w.join("down.bin")).unwrap() == local,
        "the file came back changed"
    );
    // All of it went over agent links to n2: a stream per command and per SFTP request, on
    // links kept between streams (one per front node here, as nothing ran at once).
    let served = counter(n[1], "hutch_cluster_agent_streams_total") - streams;
    let opened = counter(n[1], "hutch_cluster_agent_links_total") - links;
    assert!(served > 10, "{served} agent streams");
    assert!(
        opened >= 2 && opened * 4 < served,
        "{opened} links for {served} streams"
    );
    // SSH commands about a VM on another node run there.
    let (o, e, c) = text(&s3.run(admin, "admin", &["logs", "web"], None, false));
    assert!(c == 0 && o.contains("hutch-agent"), "{o}{e}");
    let (o, e, c) = text(&s1.run(admin, "admin", &["keepalive", "web", "48h"], None, false));
    assert!(c == 0 && o.contains("expires in"), "{o}{e}");
    assert!(vm(n[1], "web")["timers"]["deadline"].as_u64() > Some(0));
    // A snapshot asked through n3 is taken on n2, which holds its files; web runs on.
    let (o, e, c) = text(&s3.run(admin, "admin", &["snapshot", "web", "viassh"], None, false));
    assert!(c == 0 && o.contains("snapshot viassh of web"), "{o}{e}");
    let id = n[0].json(&["snapshot", "ls"]);
    let id = id
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "viassh")
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["node"].clone()))
        .unwrap();
    assert_eq!(id.1, "n2");
    assert!(n[1]
        .data()
        .join("snapshots")
        .join(&id.0)
        .join("state")
        .exists());
    assert!(!n[2].data().join("snapshots").join(&id.0).exists());
    let (_, e, c) = text(&s1.run(admin, "admin", &["snapshot", "rm", "viassh"], None, false));
    assert_eq!(c, 0, "{e}");
    assert_eq!(n[0].ok(&["exec", "web", "--", "cat", "/tmp/f"]), "hi\n");

    // An account's VM on n2, used through n3 as the account.
    let alice = keygen(w, "alice", &["-t", "ed25519"]);
    let token = s1.account_with_token(admin, "alice", &alice);
    let a1 = n[0].opt("--listen").unwrap();
    let body =
        serde_json::json!({"name": "mine", "image": "busybox", "node": "n2", "mem_mib": 128});
    let (st, mine) = http_json(&a1, &token, "POST", "/api/v1/sandboxes", Some(&body));
    assert_eq!(st, 201, "{mine}");
    let (o, e, c) = text(&s3.run(&alice, "mine", &["id -u; hostname"], None, false));
    assert_eq!((o.as_str(), c), ("0\nmine\n", 0), "{e}");
    // Not the admin's VM, through any node.
    let (o, _, c) = text(&s3.run(&alice, "web", &["hostname"], None, false));
    assert!(c != 0 && !o.contains("web"), "{o}");

    // The node-to-node route: only with the cluster's admin token, acting for someone who may
    // see the VM, on the VM's own node, as a byte stream.
    let admin_token = std::fs::read_to_string(n[0].data().join("api-token")).unwrap();
    let bearer = format!("Bearer {}", admin_token.trim());
    let user = format!("Bearer {token}");
    let url = |d: &Daemon, id: &Value| {
        format!(
            "http://{}/api/v1/cluster/agent/{}",
            d.opt("--listen").unwrap(),
            id.as_str().unwrap()
        )
    };
    let upgrade = [("connection", "upgrade"), ("upgrade", "hutch-stream")];
    for (d, id, headers, want) in [
        (
            n[1],
            &mine["id"],
            vec![("authorization", user.as_str())],
            403,
        ),
        (
            n[1],
            &web["id"],
            vec![
                ("authorization", bearer.as_str()),
                ("x-hutch-act-as", "alice"),
            ],
            404,
        ),
        (
            n[1],
            &mine["id"],
            vec![
                ("authorization", bearer.as_str()),
                ("x-hutch-act-as", "nobody"),
            ],
            401,
        ),
        (
            n[0],
            &mine["id"],
            vec![("authorization", bearer.as_str())],
            409,
        ),
        (
            n[1],
            &Value::from("nope"),
            vec![("authorization", bearer.as_str())],
            404,
        ),
        (
            n[1],
            &mine["id"],
            vec![("authorization", bearer.as_str())],
            400,
        ),
    ] {
        let mut h = headers.clone();
        if want != 400 {
            h.extend(upgrade);
        }
        let (st, b) = curl("POST", &url(d, id), &h, None);
        assert_eq!(st, want, "{headers:?}: {}", String::from_utf8_lossy(&b));
    }
    // Nor may an account dial its own VM's port node to node (its proxy requests go through
    // the proxy, which authorizes them).
    let dial = format!(
        "http://{}/api/v1/cluster/dial/{}/80",
        n[1].opt("--listen").unwrap(),
        mine["id"].as_str().unwrap()
    );
    let mut h = vec![("authorization", user.as_str())];
    h.extend(upgrade);
    assert_eq!(curl("POST", &dial, &h, None).0, 403);
    fork_and_cp_through_other_nodes(&s1, &s3, &alice, &a1, &token);
    let (st, v) = http_json(&a1, &token, "DELETE", "/api/v1/sandboxes/mine", None);
    assert!(st < 300, "{v}");
}

/// `fork` and `cp` over SSH of an account's VM on n2, asked through n3 and n1: made on n2,
/// for the account, each its own VM.
fn fork_and_cp_through_other_nodes(
    s1: &Ssh,
    s3: &Ssh,
    alice: &std::path::Path,
    api: &str,
    token: &str,
) {
    let (_, e, c) = text(&s1.run(alice, "mine", &["echo forked > /tmp/f"], None, false));
    assert_eq!(c, 0, "{e}");
    let (o, e, c) = text(&s3.run(
        alice,
        "hutch",
        &["fork", "mine", "--name", "mf"],
        None,
        false,
    ));
    assert!(c == 0 && o.contains("mf-1"), "{o}{e}");
    let (o, e, c) = text(&s1.run(alice, "mf-1", &["hostname; cat /tmp/f"], None, false));
    assert_eq!((o.as_str(), c), ("mf-1\nforked\n", 0), "{e}");
    // cp copies a stopped VM's disk.
    let (_, e, c) = text(&s1.run(alice, "hutch", &["stop", "mine"], None, false));
    assert_eq!(c, 0, "{e}");
    let (o, e, c) = text(&s1.run(alice, "hutch", &["cp", "mine", "mc"], None, false));
    assert!(c == 0 && o.contains("mc"), "{o}{e}");
    let (o, e, c) = text(&s3.run(alice, "mc", &["hostname; cat /tmp/f"], None, false));
    assert_eq!((o.as_str(), c), ("mc\nforked\n", 0), "{e}");
    // Both are alice's, on n2.
    for name in ["mf-1", "mc"] {
        let path = format!("/api/v1/sandboxes/{name}");
        let (st, v) = http_json(api, token, "GET", &path, None);
        assert_eq!((st, v["node"].as_str()), (200, Some("n2")), "{v}");
        let (st, v) = http_json(api, token, "DELETE", &path, None);
        assert!(st < 300, "{v}");
    }
}

/// A VM made from a snapshot on a node that does not hold its files: they are copied from the
/// snapshot's node (once), the copy runs with the snapshot's memory and disk; the copies go when
/// the snapshot and its VMs are gone.
pub fn snapshot_copies_run_elsewhere(n: &[&Daemon; 3], token: &str) {
    let a1 = n[0].opt("--listen").unwrap();
    n[0].ok(&["exec", "web", "--", "sh", "-c", "echo in-ram > /dev/shm/m"]);
    let (st, snap) = http_json(
        &a1,
        token,
        "POST",
        "/api/v1/sandboxes/web/snapshot",
        Some(&serde_json::json!({"name": "base"})),
    );
    assert_eq!(st, 201, "{snap}");
    assert_eq!(snap["node"], "n2");
    let dir = |d: &Daemon| {
        d.data()
            .join("snapshots")
            .join(snap["id"].as_str().unwrap())
    };
    assert!(dir(n[1]).join("mem").exists() && !dir(n[2]).exists());
    for name in ["copy1", "copy2"] {
        let body = serde_json::json!({"snapshot": "base", "name": name, "node": "n3"});
        let (st, v) = http_json(&a1, token, "POST", "/api/v1/sandboxes", Some(&body));
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["node"], "n3", "{v}");
        let out = n[0].ok(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "hostname; cat /dev/shm/m /tmp/f",
        ]);
        assert_eq!(out, format!("{name}\nin-ram\nhi\n"));
    }
    assert!(dir(n[2]).join("state").exists(), "n3 holds a copy");
    let log = n[2].log();
    let copied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("copied a snapshot's files"))
        .collect();
    assert_eq!(copied.len(), 1, "copied once, for the first VM");
    // Only the files' data crossed: the memory file is mostly RAM the guest never touched.
    let field = |name: &str| -> u64 {
        let at = copied[0].find(&format!(" {name}=")).unwrap() + name.len() + 2;
        copied[0][at..].split(' ').next().unwrap().parse().unwrap()
    };
    let (mib, wire) = (field("mib"), field("wire_mib"));
    assert!(
        wire * 2 < mib,
        "{wire} MiB sent of {mib} MiB: {}",
        copied[0]
    );
    // Gone with the snapshot's record and the VMs that map its memory.
    let (st, v) = http_json(&a1, token, "DELETE", "/api/v1/snapshots/base", None);
    assert!(st < 300, "{v}");
    for name in ["copy1", "copy2"] {
        n[0].ok(&["rm", name]);
    }
    let gone = wait_until(Duration::from_secs(20), || {
        (!dir(n[2]).exists()).then_some(())
    });
    assert!(gone.is_some(), "n3 kept the copy of a deleted snapshot");
}

/// Warm pools per node: a template's pool kept on every node (the snapshot's files copied to
/// the others), a create through any node claims a ready VM, a node taken off the pool's list
/// gives its VMs back, and the pool removed through a node that keeps none empties them all.
pub fn pools_on_every_node(n: &[&Daemon; 3]) {
    let t = n[0].json(&[
        "template", "create", "pt", "--image", "busybox", "--mem", "128",
    ]);
    assert_eq!(t["status"], "ready", "{t}");
    let vms = || -> u64 { nodes(n[0]).iter().map(|v| v["vms"].as_u64().unwrap()).sum() };
    let before = vms();
    // Bad node lists change nothing (the list is bounded too).
    let many: Vec<String> = (0..65).map(|i| format!("n{i}")).collect();
    let many = many.join(",");
    for (nodes, err) in [
        ("nope", "not found"),
        ("n1,n1", "twice"),
        ("*,n1", "stands alone"),
        (many.as_str(), "at most 64"),
    ] {
        fails_with(
            n[0],
            &["pool", "set", "pt", "--min", "1", "--nodes", nodes],
            err,
        );
    }
    assert_eq!(n[1].json(&["pool", "ls"]), serde_json::json!([]));
    // Every node keeps one ready.
    let by_node = |d: &Daemon| -> Vec<(String, u64)> {
        let v = d.json(&["pool", "ls"]);
        v[0]["by_node"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["node"].as_str().unwrap().to_string(),
                            e["ready"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let settled = |d: &Daemon, want: &[&str]| {
        let want: Vec<(String, u64)> = want.iter().map(|n| (n.to_string(), 1)).collect();
        let got = wait_until(Duration::from_secs(120), || {
            (by_node(d) == want).then_some(())
        });
        assert!(
            got.is_some(),
            "pool by node: {:?}, wanted {want:?}",
            by_node(d)
        );
    };
    let set = n[0].json(&["pool", "set", "pt", "--min", "1", "--nodes", "all"]);
    assert_eq!(set["nodes"], serde_json::json!(["*"]), "{set}");
    settled(n[2], &["n1", "n2", "n3"]);
    let table = n[1].ok(&["pool", "ls"]);
    assert!(
        table.contains("KEPT ON") && table.contains("n1=1 n2=1 n3=1"),
        "{table}"
    );
    // A create through any node claims one (no restore): where one is ready.
    let claims = || -> u64 {
        n.iter()
            .map(|d| counter(d, "hutch_pool_claims_total"))
            .sum()
    };
    let c0 = claims();
    let pc = n[2].json(&["new", "--template", "pt", "--name", "pc"]);
    assert_eq!(claims(), c0 + 1, "{pc}");
    assert_eq!(n[0].ok(&["exec", "pc", "--", "hostname"]), "pc\n");
    settled(n[0], &["n1", "n2", "n3"]);
    // n2 taken off the list (through n2; min and max as they were): its pool VM goes.
    n[1].ok(&["pool", "set", "pt", "--min", "1", "--nodes", "n1,n3"]);
    settled(n[1], &["n1", "n3"]);
    // Removed through a node that keeps none: every node's pool VMs go.
    n[1].ok(&["pool", "rm", "pt"]);
    let gone = wait_until(Duration::from_secs(30), || {
        (vms() == before + 1).then_some(())
    });
    assert!(
        gone.is_some(),
        "pool VMs left: {} VMs, {before} before",
        vms()
    );
    n[0].ok(&["rm", "pc"]);
    n[2].ok(&["template", "rm", "pt"]);
}

/// Counter `name` of node `d`'s metrics.
fn counter(d: &Daemon, name: &str) -> u64 {
    let token = std::fs::read_to_string(d.data().join("api-token")).unwrap();
    let url = format!("http://{}/metrics", d.opt("--listen").unwrap());
    let (st, b) = curl(
        "GET",
        &url,
        &[("authorization", &format!("Bearer {}", token.trim()))],
        None,
    );
    assert_eq!(st, 200);
    let text = String::from_utf8_lossy(&b).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Every node's HTTP proxy serves a VM on another node whose address it cannot reach (these
/// nodes have a subnet each): through the VM's node. The node-to-node route it uses refuses
/// anything but the cluster's admin token, and dials only its own VMs' ports.
pub fn proxy_reaches_other_nodes(n: &[&Daemon; 3], token: &str, web: &Value) {
    n[1].ok(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "mkdir -p /www && echo from-n2 > /www/index.html && httpd -p 8080 -h /www",
    ]);
    let bearer = format!("Bearer {token}");
    for d in [n[0], n[2]] {
        let proxy = d.opt("--http-listen").unwrap();
        let (st, body) = curl(
            "GET",
            &format!("http://{proxy}/"),
            &[("Host", "8080-web.c.hutch"), ("Authorization", &bearer)],
            None,
        );
        assert_eq!(
            (st, String::from_utf8_lossy(&body).as_ref()),
            (200, "from-n2\n")
        );
        // Private without a token, wherever it is asked.
        let (st, _) = curl(
            "GET",
            &format!("http://{proxy}/"),
            &[("Host", "8080-web.c.hutch")],
            None,
        );
        assert_eq!(st, 401);
        // Nothing listens on 8081: a clear 502, not a hang.
        let (st, body) = curl(
            "GET",
            &format!("http://{proxy}/"),
            &[("Host", "8081-web.c.hutch"), ("Authorization", &bearer)],
            None,
        );
        assert_eq!(st, 502, "{}", String::from_utf8_lossy(&body));
    }
    // Through n2 (these nodes do not reach each other's VM addresses), and only the two that
    // were answered.
    assert_eq!(counter(n[1], "hutch_cluster_dials_total"), 2);
    let api = |d: &Daemon| d.opt("--listen").unwrap();
    let id = web["id"].as_str().unwrap();
    let upgrade = [("connection", "upgrade"), ("upgrade", "hutch-stream")];
    for (d, path, act_as, want) in [
        (
            n[1],
            format!("/api/v1/cluster/dial/{id}/8080"),
            Some("nobody"),
            401,
        ),
        (n[0], format!("/api/v1/cluster/dial/{id}/8080"), None, 409),
        (n[1], format!("/api/v1/cluster/dial/{id}/0"), None, 400),
        (n[1], format!("/api/v1/cluster/dial/{id}/8081"), None, 409),
        (
            n[1],
            "/api/v1/cluster/dial/nope/8080".to_string(),
            None,
            404,
        ),
    ] {
        let mut h = vec![("authorization", bearer.as_str())];
        h.extend(upgrade);
        if let Some(a) = act_as {
            h.push(("x-hutch-act-as", a));
        }
        let (st, b) = curl("POST", &format!("http://{}{path}", api(d)), &h, None);
        assert_eq!(st, want, "{path}: {}", String::from_utf8_lossy(&b));
    }
}
