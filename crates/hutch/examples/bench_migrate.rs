//! `make bench-cluster` (migration part): a live migration of a 256 MiB VM (100 MiB of its RAM
//! written) between two hutchd nodes on loopback (a 1-member etcd, TCG guests here), back and
//! forth: the guest's pause and the whole move, each beside the baseline measured on the same VM
//! in the same run, a cold move's outage (stop, then start: what a move costs without live
//! migration, even with the disk already in place).
//!
//! As bench_snap: `HUTCH_BENCH_HUTCHD`, `HUTCH_BENCH_IMAGE`, `HUTCH_BENCH_BOOT`,
//! `HUTCH_BENCH_ACCEL` point it at what it needs on another machine.

mod benchlib;

use benchlib::{api, cluster_node, median, test_image};
use serde_json::{json, Value};
use std::time::Instant;

const ROUNDS: usize = 6;

fn ok(st: u16, v: &Value, want: u16) {
    assert_eq!(st, want, "{v}");
}

fn main() {
    let work = tempfile::Builder::new()
        .prefix("hutch-bench-mig")
        .tempdir_in("/tmp")
        .unwrap();
    let oci = test_image(work.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(hutch_store_etcd::testing::EtcdCluster::start(1));
    let eps = etcd.endpoints().join(",");
    let (_g1, s1) = cluster_node(work.path(), "b1", &eps, &[]);
    let (_g2, _s2) = cluster_node(work.path(), "b2", &eps, &[]);
    let (st, v) = api(
        &s1,
        "POST",
        "/api/v1/images",
        Some(json!({"path": oci, "name": "bb"})),
    );
    ok(st, &v, 201);
    let (st, v) = api(
        &s1,
        "POST",
        "/api/v1/sandboxes",
        Some(json!({"image": "bb", "name": "mig", "mem_mib": 256, "node": "b1"})),
    );
    ok(st, &v, 201);
    let accel = v["accel"].as_str().unwrap_or("?").to_string();
    let exec = |script: &str| {
        let (st, v) = api(
            &s1,
            "POST",
            "/api/v1/sandboxes/mig/exec",
            Some(json!({"argv": ["sh", "-c", script]})),
        );
        ok(st, &v, 200);
        assert_eq!(v["code"], 0, "{v}");
    };
    exec(
        "mkdir -p /mnt/fill && mount -t tmpfs -o size=120m tmpfs /mnt/fill && \
         head -c 104857600 /dev/urandom > /mnt/fill/f",
    );
    println!(
        "Live migration ({accel} guests, loopback, 1-member etcd): a 256 MiB VM with 100 MiB of \
         its RAM written, moved back and forth {ROUNDS} times"
    );
    let (mut down, mut total, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let to = if i % 2 == 0 { "b2" } else { "b1" };
        let t = Instant::now();
        let (st, m) = api(
            &s1,
            "POST",
            "/api/v1/sandboxes/mig/migrate",
            Some(json!({"to": to})),
        );
        ok(st, &m, 200);
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
        down.push(m["downtime_ms"].as_f64().unwrap());
        total.push(m["total_ms"].as_f64().unwrap());
        println!(
            "  to {to}: guest paused {} ms, {} ms in all, {:.0} MiB of RAM and {:.0} MiB of disk sent",
            m["downtime_ms"],
            m["total_ms"],
            m["ram_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            m["disk_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
        );
    }
    exec("test -s /mnt/fill/f");
    // The baseline: a cold move's outage, on the same VM (stop, then start where it is).
    let mut cold = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let (st, v) = api(&s1, "POST", "/api/v1/sandboxes/mig/stop", None);
        ok(st, &v, 200);
        let (st, v) = api(&s1, "POST", "/api/v1/sandboxes/mig/start", None);
        ok(st, &v, 200);
        exec("true");
        cold.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (d, tot, w, c) = (
        median(&mut down),
        median(&mut total),
        median(&mut wall),
        median(&mut cold),
    );
    println!(
        "guest paused, p50: {d:.0} ms (max {:.0})",
        down.iter().cloned().fold(0.0, f64::max)
    );
    println!("whole move, p50: {tot:.0} ms (API call {w:.0} ms)");
    println!("cold move's outage (stop + start + exec), p50: {c:.0} ms");
    println!("pause / cold outage: {:.3}x", d / c);
    let (st, v) = api(&s1, "DELETE", "/api/v1/sandboxes/mig", None);
    assert!(st < 300, "{v}");
    drop(etcd);
}
