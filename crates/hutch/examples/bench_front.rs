//! `make bench-cluster` (front-door part): SSH to a VM through the node that runs it and
//! through another node (whose sessions reach the VM over agent links), side by side on the
//! same VM in the same run: connection + auth + exec of `true` (median of interleaved runs),
//! stdin streamed into `cat > /dev/null`, and scp (SFTP: one agent stream per request) up and
//! down. Then a VM made from a snapshot of it on its node against one made on the other node
//! (whose first copies the snapshot's files). Two nodes on loopback with TLS between them (a
//! certificate for 127.0.0.1), a 1-member etcd.
//!
//! As bench_snap: `HUTCH_BENCH_HUTCHD`, `HUTCH_BENCH_IMAGE`, `HUTCH_BENCH_BOOT`,
//! `HUTCH_BENCH_ACCEL` point it at what it needs on another machine.

mod benchlib;

use benchlib::{api, cluster_node, free_port, median, test_image};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const ROUNDS: usize = 15;
const COPY_MB: usize = 16;
const STDIN_MB: usize = 64;

/// ssh or scp with this benchmark's options; returns the seconds it took.
fn run(prog: &str, port: u16, key: &Path, args: &[&str], stdin: Option<&Path>) -> f64 {
    let t = Instant::now();
    let port_flag = if prog == "ssh" { "-p" } else { "-P" };
    let st = Command::new(prog)
        .args(["-q", port_flag, &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"])
        .arg(key)
        .args(args)
        .stdin(match stdin {
            Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
            None => Stdio::null(),
        })
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{prog} -p {port} {args:?} failed");
    t.elapsed().as_secs_f64()
}

fn main() {
    let work = tempfile::Builder::new()
        .prefix("hutch-bench-front")
        .tempdir_in("/tmp")
        .unwrap();
    let w = work.path();
    let key = w.join("key");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-t", "ed25519", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    // TLS between the nodes, as on a network: a certificate for 127.0.0.1, its key 0600.
    let pair = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&pair).unwrap();
    std::fs::write(w.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(w.join("key.pem"), pair.serialize_pem()).unwrap();
    std::fs::set_permissions(
        w.join("key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let oci = test_image(w);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(hutch_store_etcd::testing::EtcdCluster::start(1));
    let eps = etcd.endpoints().join(",");
    let (p1, p2) = (free_port(), free_port());
    let (pubkey, cert, tkey) = (
        format!("{}.pub", key.display()),
        w.join("cert.pem").display().to_string(),
        w.join("key.pem").display().to_string(),
    );
    let node = |name: &str, port: u16| {
        let ssh = format!("127.0.0.1:{port}");
        let extra = [
            "--ssh-listen",
            &ssh,
            "--admin-keys",
            &pubkey,
            "--tls-cert",
            &cert,
            "--tls-key",
            &tkey,
        ];
        cluster_node(w, name, &eps, &extra)
    };
    let (_g1, s1) = node("f1", p1);
    let (_g2, _s2) = node("f2", p2);
    let (st, v) = api(
        &s1,
        "POST",
        "/api/v1/images",
        Some(json!({"path": oci, "name": "bb"})),
    );
    assert_eq!(st, 201, "{v}");
    let (st, v) = api(
        &s1,
        "POST",
        "/api/v1/sandboxes",
        Some(json!({"image": "bb", "name": "web", "mem_mib": 256, "node": "f1"})),
    );
    assert_eq!(st, 201, "{v}");
    let accel = v["accel"].as_str().unwrap_or("?").to_string();
    println!(
        "SSH to a VM on node f1 ({accel} guest), through f1 itself and through f2 (agent links, \
         TLS on loopback)"
    );

    let (mut here, mut there) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        here.push(run("ssh", p1, &key, &["web@127.0.0.1", "true"], None));
        there.push(run("ssh", p2, &key, &["web@127.0.0.1", "true"], None));
    }
    let (h, t) = (median(&mut here) * 1000.0, median(&mut there) * 1000.0);
    println!("ssh connect + auth + exec `true` + exit (median of {ROUNDS}, interleaved)");
    println!("  through f1 (the VM's node)   {h:8.1} ms");
    println!("  through f2 (another node)    {t:8.1} ms");
    println!("  ratio f2/f1                  {:8.2}", t / h);

    let big = w.join("stdin");
    let bytes: Vec<u8> = (0..STDIN_MB << 20)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect();
    std::fs::write(&big, &bytes).unwrap();
    let cat = |port| {
        run(
            "ssh",
            port,
            &key,
            &["web@127.0.0.1", "cat > /dev/null"],
            Some(&big),
        )
    };
    let (h, t) = (cat(p1), cat(p2));
    println!("stdin, {STDIN_MB} MB into `cat > /dev/null` (one stream)");
    println!(
        "  through f1                   {:8.1} MB/s",
        STDIN_MB as f64 / h
    );
    println!(
        "  through f2                   {:8.1} MB/s",
        STDIN_MB as f64 / t
    );
    println!("  ratio f2/f1 (time)           {:8.2}", t / h);

    let file = w.join("copy");
    std::fs::write(&file, &bytes[..COPY_MB << 20]).unwrap();
    let src = file.display().to_string();
    let back = w.join("back").display().to_string();
    let (mut up, mut down) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for _ in 0..3 {
        for (i, port) in [p1, p2].into_iter().enumerate() {
            up[i].push(run(
                "scp",
                port,
                &key,
                &[&src, "web@127.0.0.1:/root/copy"],
                None,
            ));
            down[i].push(run(
                "scp",
                port,
                &key,
                &["web@127.0.0.1:/root/copy", &back],
                None,
            ));
            assert_eq!(std::fs::read(&back).unwrap(), bytes[..COPY_MB << 20]);
        }
    }
    println!("scp of {COPY_MB} MB (SFTP: one agent stream per request; median of 3, interleaved)");
    for (what, v) in [("up", &mut up), ("down", &mut down)] {
        let (h, t) = (median(&mut v[0]), median(&mut v[1]));
        println!(
            "  {what:4} through f1              {:8.1} MB/s",
            COPY_MB as f64 / h
        );
        println!(
            "  {what:4} through f2              {:8.1} MB/s",
            COPY_MB as f64 / t
        );
        println!("  {what:4} ratio f2/f1 (time)      {:8.2}", t / h);
    }
    snapshot_copies(w, &s1);
    let (st, v) = api(&s1, "DELETE", "/api/v1/sandboxes/web", None);
    assert!(st < 300, "{v}");
    drop(etcd);
}

/// A VM made from a snapshot of web: on f1, which holds its files (a restore), against f2's
/// first (its files copied from f1: their data only) and second (a restore from its copy).
fn snapshot_copies(w: &Path, s1: &Path) {
    // Some of the RAM written, as a used VM has it.
    let (st, v) = api(
        s1,
        "POST",
        "/api/v1/sandboxes/web/exec",
        Some(json!({"argv": ["sh", "-c", "head -c 48m /dev/urandom > /dev/shm/fill"]})),
    );
    assert!(st < 300, "{v}");
    let (st, snap) = api(
        s1,
        "POST",
        "/api/v1/sandboxes/web/snapshot",
        Some(json!({"name": "base"})),
    );
    assert_eq!(st, 201, "{snap}");
    let mem = w
        .join("f1/snapshots")
        .join(snap["id"].as_str().unwrap())
        .join("mem");
    let md = std::fs::metadata(&mem).unwrap();
    let (size, used) = (
        md.len() >> 20,
        (std::os::unix::fs::MetadataExt::blocks(&md) * 512) >> 20,
    );
    let make = |name: &str, node: &str| {
        let t = Instant::now();
        let (st, v) = api(
            s1,
            "POST",
            "/api/v1/sandboxes",
            Some(json!({"snapshot": "base", "name": name, "node": node})),
        );
        assert_eq!(st, 201, "{v}");
        t.elapsed().as_secs_f64() * 1000.0
    };
    let home = make("c1", "f1");
    let first = make("c2", "f2");
    let again = make("c3", "f2");
    println!("a VM from a snapshot of web (memory file {size} MiB, {used} MiB of it data)");
    println!("  on f1 (holds its files)        {home:8.0} ms");
    println!("  on f2, first (files copied)    {first:8.0} ms");
    println!("  on f2, again (its copy)        {again:8.0} ms");
    println!("  ratio first/f1                 {:8.2}", first / home);
    println!("  ratio again/f1                 {:8.2}", again / home);
    for name in ["c1", "c2", "c3"] {
        let (st, v) = api(s1, "DELETE", &format!("/api/v1/sandboxes/{name}"), None);
        assert!(st < 300, "{v}");
    }
    let (st, v) = api(s1, "DELETE", "/api/v1/snapshots/base", None);
    assert!(st < 300, "{v}");
}
