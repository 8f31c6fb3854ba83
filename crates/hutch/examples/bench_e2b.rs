//! `make bench` (E2B part): `Sandbox.create()` + `commands.run("true")` + `kill()` through the
//! official Python SDK (tests/e2b/bench.py), p50 of 20, for the same image three ways in one
//! run on the same hutchd:
//!
//! 1. a template with a warm pool (the create claims a ready VM),
//! 2. the same template without a pool (the create restores its snapshot),
//! 3. the image itself (the create cold-boots it),
//!
//! and the ratios of the first to the others. The SDK comes from scripts/install-e2b-sdks.sh.
//! `HUTCH_BENCH_HUTCHD`, `HUTCH_BENCH_BOOT`, `HUTCH_BENCH_ACCEL` and `HUTCH_BENCH_LOG` as in
//! bench_snap.rs; `HUTCH_BENCH_E2B_N` changes the 20.

mod benchlib;

use benchlib::{api, api_ok, ws, Cleanup};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "{what} not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs bench.py for `template`; its p50 total in ms, and its report.
fn bench(python: &Path, port: u16, key: &str, template: &str, n: usize) -> (f64, String) {
    let url = format!("http://127.0.0.1:{port}");
    let o = Command::new(python)
        .arg(ws().join("tests/e2b/bench.py"))
        .args([template, "-n", &n.to_string(), "--json"])
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", key)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(o.status.success(), "bench.py {template} failed");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let last = out.lines().last().unwrap_or("{}");
    let v: Value = serde_json::from_str(last).expect("bench.py --json prints a JSON line last");
    let p50 = v["total"]["p50"].as_f64().unwrap();
    (p50, out)
}

fn main() {
    let ws = ws();
    let python = ws.join("target/e2b-sdk/venv/bin/python");
    assert!(
        python.exists(),
        "the E2B SDK is not installed: run scripts/install-e2b-sdks.sh"
    );
    let n: usize = std::env::var("HUTCH_BENCH_E2B_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let work = tempfile::Builder::new()
        .prefix("hutch-bench-e2b")
        .tempdir_in("/tmp")
        .unwrap();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let img = work.path().join("img");
    std::fs::create_dir_all(&img).unwrap();
    let st = Command::new(ws.join("scripts/make-e2b-image.sh"))
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let data = work.path().join("d");
    let bridge = format!("hbe{}", std::process::id() % 100_000);
    let subnet = format!("10.197.{}.0/24", std::process::id() % 250);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hutchd = Command::new(
        env("HUTCH_BENCH_HUTCHD")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| ws.join("target/release/hutchd")),
    )
    .arg("--data-dir")
    .arg(&data)
    .arg("--boot-cache")
    .arg(
        env("HUTCH_BENCH_BOOT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| ws.join("target/hutch-bench-boot")),
    )
    .args([
        "--ssh-listen",
        "off",
        "--bridge",
        &bridge,
        "--subnet",
        &subnet,
    ])
    .args(["--e2b-listen", &format!("127.0.0.1:{port}")])
    .args([
        "--accel",
        &env("HUTCH_BENCH_ACCEL").unwrap_or("auto".into()),
    ])
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
    let key = std::fs::read_to_string(data.join("api-token")).unwrap();
    let key = key.trim();
    let (st, v) = api(
        &sock,
        "POST",
        "/api/v1/images",
        Some(json!({"path": img.join("oci"), "name": "base"})),
    );
    assert_eq!(st, 201, "{v}");
    for t in ["pooled", "cold"] {
        let (st, v) = api(
            &sock,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": t, "image": "base"})),
        );
        assert_eq!(st, 202, "{v}");
        wait("the template", 300, || {
            api(&sock, "GET", &format!("/api/v1/templates/{t}"), None).1["status"] == "ready"
        });
    }
    let (st, v) = api(
        &sock,
        "PUT",
        "/api/v1/pools/pooled",
        Some(json!({"min": 4})),
    );
    assert_eq!(st, 200, "{v}");
    wait("the pool", 300, || {
        api(&sock, "GET", "/api/v1/pools", None).1[0]["ready"].as_u64() >= Some(4)
    });
    let (_, status) = api(&sock, "GET", "/api/v1/status", None);
    println!(
        "E2B benchmark: Sandbox.create + commands.run(\"true\") + kill through the Python SDK \
         (e2b 2.63.0), p50 of {n} ({} guests, 1 vCPU, 256 MiB; {} CPUs)",
        status["accel"].as_str().unwrap_or("?"),
        status["host"]["cpus"]
    );
    let (pool, out) = bench(&python, port, key, "pooled", n);
    print!("warm pool (min 4):\n{out}");
    let (restore, out) = bench(&python, port, key, "cold", n);
    print!("template without a pool (restore):\n{out}");
    let (boot, out) = bench(&python, port, key, "base", n);
    print!("image (cold boot):\n{out}");
    println!(
        "p50 create+run+kill: warm pool {pool:.0} ms, template restore {restore:.0} ms ({:.1}x the pool), \
         image cold boot {boot:.0} ms ({:.1}x the pool)",
        restore / pool,
        boot / pool
    );
}
