//! `make bench` (snapshot part): issue 10's figures, each beside a baseline measured in the same
//! run on the same machine (TCG guests here).
//!
//! 1. Restore from a snapshot vs cold create of the same image, API call to exec-ready (a create
//!    or restore, then `true` run in the guest): ratio (goal >= 30x) and restore time (goal
//!    < 100 ms).
//! 2. Warm pool claim, API call to exec-ready: p50 (goal < 20 ms) and p99.
//! 3. Fork of 10 copies of a running VM: total time (goal < 1 s), and each idle copy's PSS
//!    (proportional set size of its QEMU) against a cold-booted VM's.
//! 4. Resume of a 256 MiB vs a 2 GiB guest, each with 40% of its RAM in use: ratio (goal <= 1.3).
//! 5. Density: how many idle VMs from one template fit in a memory budget vs cold-booted ones
//!    (the inverse ratio of their PSS).
//!
//! For a run on another machine (a KVM host without a build), the environment can point it at
//! what it needs: `HUTCH_BENCH_HUTCHD` (hutchd), `HUTCH_BENCH_IMAGE` (an OCI layout made by
//! scripts/make-test-image.sh), `HUTCH_BENCH_BOOT` (a boot cache), `HUTCH_BENCH_ACCEL`
//! (hutchd's `--accel`), `HUTCH_BENCH_NET=off` (no VM network), `HUTCH_BENCH_LOG` (where hutchd's
//! log goes).

mod benchlib;

use benchlib::{api, api_ok, median, ws, Cleanup};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const CLAIMS: usize = 20;
const FORKS: u32 = 10;

fn ok(st: u16, v: &Value, want: u16) {
    assert_eq!(st, want, "{v}");
}

/// Runs `sh -c script` in `vm`; its exit code.
fn exec(sock: &Path, vm: &str, script: &str) -> i64 {
    let (st, v) = api(
        sock,
        "POST",
        &format!("/api/v1/sandboxes/{vm}/exec"),
        Some(json!({"argv": ["sh", "-c", script]})),
    );
    ok(st, &v, 200);
    v["code"].as_i64().unwrap_or(-1)
}

/// Milliseconds from a create request (`body`) to `true` having run in the VM.
fn create_ready(sock: &Path, body: Value) -> (f64, Value) {
    let t = Instant::now();
    let (st, v) = api(sock, "POST", "/api/v1/sandboxes", Some(body));
    ok(st, &v, 201);
    assert_eq!(exec(sock, v["name"].as_str().unwrap(), "true"), 0);
    (t.elapsed().as_secs_f64() * 1000.0, v)
}

fn delete(sock: &Path, vm: &str) {
    let (st, v) = api(sock, "DELETE", &format!("/api/v1/sandboxes/{vm}"), None);
    ok(st, &v, 204);
}

/// PSS of process `pid` in MiB.
fn pss_mib(pid: u64) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn pool_ready(sock: &Path) -> u64 {
    let (_, v) = api(sock, "GET", "/api/v1/pools", None);
    v[0]["ready"].as_u64().unwrap_or(0)
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let ws = ws();
    let work = tempfile::Builder::new()
        .prefix("hutch-bench-snap")
        .tempdir_in("/tmp")
        .unwrap();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let oci = match env("HUTCH_BENCH_IMAGE") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let img = work.path().join("img");
            std::fs::create_dir_all(&img).unwrap();
            let st = Command::new(ws.join("scripts/make-test-image.sh"))
                .arg(&img)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
            img.join("oci")
        }
    };
    let data = work.path().join("d");
    let bridge = format!("hbs{}", std::process::id() % 100_000);
    let subnet = format!("10.198.{}.0/24", std::process::id() % 250);
    let mut cmd = Command::new(
        env("HUTCH_BENCH_HUTCHD")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| ws.join("target/release/hutchd")),
    );
    cmd.arg("--data-dir")
        .arg(&data)
        .arg("--boot-cache")
        .arg(
            env("HUTCH_BENCH_BOOT")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| ws.join("target/hutch-bench-boot")),
        )
        .args(["--ssh-listen", "off"])
        .args([
            "--accel",
            &env("HUTCH_BENCH_ACCEL").unwrap_or("auto".into()),
        ]);
    if env("HUTCH_BENCH_NET").as_deref() == Some("off") {
        cmd.args(["--network", "off"]);
    } else {
        cmd.args(["--bridge", &bridge, "--subnet", &subnet]);
    }
    let hutchd = cmd
        .env("HUTCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(
                env("HUTCH_BENCH_LOG")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| work.path().join("hutchd.log")),
            )
            .unwrap(),
        )
        .spawn()
        .expect("target/release/hutchd (run `make build`)");
    let _guard = Cleanup {
        hutchd,
        data: data.clone(),
        bridge,
    };
    let sock = data.join("hutchd.sock");
    wait("hutchd", 300, || api_ok(&sock).is_some());
    let (st, v) = api(
        &sock,
        "POST",
        "/api/v1/images",
        Some(json!({"path": oci, "name": "bb"})),
    );
    ok(st, &v, 201);
    let (_, status) = api(&sock, "GET", "/api/v1/status", None);
    println!(
        "Snapshot benchmark ({} guests, 1 vCPU, 256 MiB unless said; {} CPUs)",
        status["accel"].as_str().unwrap_or("?"),
        status["host"]["cpus"]
    );

    // 1: restore vs cold create, alternating.
    let (st, v) = api(
        &sock,
        "POST",
        "/api/v1/sandboxes",
        Some(json!({"image": "bb", "name": "src"})),
    );
    ok(st, &v, 201);
    let (st, v) = api(
        &sock,
        "POST",
        "/api/v1/sandboxes/src/snapshot",
        Some(json!({"name": "base"})),
    );
    ok(st, &v, 201);
    println!(
        "snapshot of a running VM: guest stopped {} ms, {:.1} MiB on disk",
        v["pause_ms"],
        v["bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    let (mut cold, mut restore) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let (ms, _) = create_ready(&sock, json!({"image": "bb", "name": format!("cold{i}")}));
        cold.push(ms);
        delete(&sock, &format!("cold{i}"));
        let (ms, _) = create_ready(&sock, json!({"snapshot": "base", "name": format!("r{i}")}));
        restore.push(ms);
        delete(&sock, &format!("r{i}"));
    }
    let (c, r) = (median(&mut cold), median(&mut restore));
    println!(
        "create to exec-ready: restore {r:.0} ms vs cold boot {c:.0} ms -> {:.1}x faster (median of {ROUNDS}; goals >= 30x, < 100 ms)",
        c / r
    );

    // 2: pool claims.
    let (st, v) = api(
        &sock,
        "POST",
        "/api/v1/templates",
        Some(json!({"name": "t", "image": "bb"})),
    );
    ok(st, &v, 202);
    wait("the template", 300, || {
        api(&sock, "GET", "/api/v1/templates/t", None).1["status"] == "ready"
    });
    let (st, v) = api(&sock, "PUT", "/api/v1/pools/t", Some(json!({"min": 3})));
    ok(st, &v, 200);
    let mut claims = Vec::new();
    for i in 0..CLAIMS {
        wait("the pool", 300, || pool_ready(&sock) >= 3);
        let (ms, v) = create_ready(&sock, json!({"template": "t", "name": format!("p{i}")}));
        assert!(v["pool"].is_null());
        claims.push(ms);
        delete(&sock, &format!("p{i}"));
    }
    let (p50, p99) = (pct(&mut claims.clone(), 0.5), pct(&mut claims, 0.99));
    println!(
        "pool claim to exec-ready: p50 {p50:.1} ms, p99 {p99:.1} ms ({CLAIMS} claims; goal p50 < 20 ms)"
    );
    let (st, _) = api(&sock, "DELETE", "/api/v1/pools/t", None);
    assert_eq!(st, 204);

    // 3 and 5: fork of 10 from a cold-booted VM; PSS of idle copies vs cold VMs.
    let (st, v) = api(
        &sock,
        "POST",
        "/api/v1/sandboxes",
        Some(json!({"image": "bb", "name": "f"})),
    );
    ok(st, &v, 201);
    let t = Instant::now();
    let (st, forks) = api(
        &sock,
        "POST",
        "/api/v1/sandboxes/f/fork",
        Some(json!({"count": FORKS, "name": "k"})),
    );
    ok(st, &forks, 201);
    let fork_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut colds = Vec::new();
    for i in 0..3 {
        let (st, v) = api(
            &sock,
            "POST",
            "/api/v1/sandboxes",
            Some(json!({"image": "bb", "name": format!("c{i}")})),
        );
        ok(st, &v, 201);
        colds.push(v["pid"].as_u64().unwrap());
    }
    std::thread::sleep(Duration::from_secs(5));
    let fork_pss: Vec<f64> = forks
        .as_array()
        .unwrap()
        .iter()
        .map(|v| pss_mib(v["pid"].as_u64().unwrap()))
        .collect();
    let cold_pss: Vec<f64> = colds.iter().map(|p| pss_mib(*p)).collect();
    let (fp, cp) = (mean(&fork_pss), mean(&cold_pss));
    println!(
        "fork of {FORKS}: {fork_ms:.0} ms in all (goal < 1 s); idle copy PSS {fp:.1} MiB vs cold-booted VM {cp:.1} MiB (QEMU's own memory, TCG's code cache included)"
    );
    println!(
        "density: {:.1}x as many idle VMs from one snapshot fit in a memory budget as cold-booted ones",
        cp / fp
    );
    for i in 0..3 {
        delete(&sock, &format!("c{i}"));
    }
    for i in 1..=FORKS {
        delete(&sock, &format!("k-{i}"));
    }

    // 4: resume of 256 MiB vs 2 GiB guests with half their RAM in use.
    let mut times = [Vec::new(), Vec::new()];
    for mib in [256u64, 2048] {
        let name = format!("m{mib}");
        let (st, v) = api(
            &sock,
            "POST",
            "/api/v1/sandboxes",
            Some(json!({"image": "bb", "name": name, "mem_mib": mib})),
        );
        ok(st, &v, 201);
        // 40% of RAM in a tmpfs (its size is half of RAM): pages really in use.
        let fill = mib * 4 / 10;
        assert_eq!(
            exec(
                &sock,
                &name,
                &format!("dd if=/dev/zero of=/dev/shm/fill bs=1M count={fill} 2>/dev/null")
            ),
            0
        );
    }
    for _ in 0..ROUNDS {
        for (j, mib) in [256u64, 2048].into_iter().enumerate() {
            let name = format!("m{mib}");
            let (st, v) = api(
                &sock,
                "POST",
                &format!("/api/v1/sandboxes/{name}/pause"),
                None,
            );
            ok(st, &v, 200);
            let t = Instant::now();
            let (st, v) = api(
                &sock,
                "POST",
                &format!("/api/v1/sandboxes/{name}/resume"),
                None,
            );
            ok(st, &v, 200);
            assert_eq!(exec(&sock, &name, "true"), 0);
            times[j].push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let (small, big) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "resume to exec-ready, 40% of RAM in use: 2 GiB {big:.0} ms vs 256 MiB {small:.0} ms -> {:.2}x (goal <= 1.3)",
        big / small
    );
}
