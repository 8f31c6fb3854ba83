//! `make bench` (network part): figures of the VM network, each beside a baseline measured in the
//! same run on the same machine.
//!
//! 1. HTTP requests/s through hutchd's proxy vs. straight to the VM's address (goal >= 0.9x):
//!    8 clients, one request per connection (busybox httpd in the guest), alternating rounds.
//! 2. TCP throughput out of a VM to the host vs. host loopback under the same load (busybox nc
//!    both times; TCG bounds the VM side: the ratio is reported, not judged).
//! 3. Time networking adds to a create: hutchd's own measure of the TAP + rules + rates step
//!    (`net_us`, goal <= 10 ms), and create wall time with `--net internet` vs `--net none`.

mod benchlib;

use benchlib::{api, api_ok, median, ws, Cleanup};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 3;
const ROUND_SECS: u64 = 5;
const CLIENTS: usize = 8;
const CREATES: usize = 5;
const MB: u64 = 64;

/// Runs `sh -c script` in VM `vm` through the API; its exit code.
fn exec(sock: &Path, vm: &str, script: &str) -> i64 {
    let (st, v) = api(
        sock,
        "POST",
        &format!("/api/v1/sandboxes/{vm}/exec"),
        Some(json!({"argv": ["sh", "-c", script]})),
    );
    assert_eq!(st, 200, "{v}");
    v["code"].as_i64().unwrap_or(-1)
}

/// One GET on a new connection; whether a 200 came back.
fn get(addr: &str, host: &str) -> bool {
    let Ok(mut c) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(
        c,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    out.starts_with(b"HTTP/1.1 200") || out.starts_with(b"HTTP/1.0 200")
}

/// Requests/s of `CLIENTS` loops of `get(addr, host)` for `ROUND_SECS`.
fn rate(addr: &str, host: &str) -> f64 {
    let ok = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(ROUND_SECS);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ok, addr, host) = (ok.clone(), addr.to_string(), host.to_string());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    if get(&addr, &host) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    ok.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// MB/s reading `MB` MiB from `addr` (a busybox nc -l fed by dd).
fn read_all(addr: &str) -> f64 {
    let t0 = Instant::now();
    let mut c = loop {
        match TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("connecting {addr}: {e}"),
        }
    };
    let t0 = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k as u64,
        }
    }
    assert!(n >= MB << 20, "only {n} bytes from {addr}");
    n as f64 / 1048576.0 / t0.elapsed().as_secs_f64()
}

fn main() {
    let ws = ws();
    let work = tempfile::Builder::new()
        .prefix("hutch-bench-net")
        .tempdir_in("/tmp")
        .unwrap();
    let img = work.path().join("img");
    std::fs::create_dir_all(&img).unwrap();
    let st = Command::new(ws.join("scripts/make-test-image.sh"))
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let data = work.path().join("d");
    let proxy_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bridge = format!("hbn{}", std::process::id() % 100_000);
    let subnet = format!("10.199.{}.0/24", std::process::id() % 250);
    let hutchd = Command::new(ws.join("target/release/hutchd"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--boot-cache")
        .arg(ws.join("target/hutch-bench-boot"))
        .args([
            "--ssh-listen",
            "off",
            "--bridge",
            &bridge,
            "--subnet",
            &subnet,
        ])
        .args(["--http-listen", &format!("127.0.0.1:{proxy_port}")])
        .args(["--domain", "bench.hutch"])
        .env("HUTCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("hutchd.log")).unwrap())
        .spawn()
        .expect("target/release/hutchd (run `make build`)");
    let _guard = Cleanup {
        hutchd,
        data: data.clone(),
        bridge: bridge.clone(),
    };
    let sock = data.join("hutchd.sock");
    let deadline = Instant::now() + Duration::from_secs(300);
    while api_ok(&sock).is_none() {
        assert!(Instant::now() < deadline, "hutchd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, v) = api(
        &sock,
        "POST",
        "/api/v1/images",
        Some(json!({"path": img.join("oci"), "name": "bb"})),
    );
    assert_eq!(st, 201, "{v}");
    println!(
        "VM network benchmark ({} clients, {ROUND_SECS} s rounds, TCG guests)",
        CLIENTS
    );

    // 3 first: creates with and without a network, alternating; hutchd's net_us.
    let (mut with, mut without, mut net_us) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..CREATES {
        for mode in ["internet", "none"] {
            let t = Instant::now();
            let (st, v) = api(
                &sock,
                "POST",
                "/api/v1/sandboxes",
                Some(json!({"image": "bb", "name": format!("c{mode}{i}"), "net": mode})),
            );
            assert_eq!(st, 201, "{v}");
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if mode == "internet" {
                with.push(ms);
                net_us.push(v["net_us"].as_f64().unwrap_or(f64::NAN));
            } else {
                without.push(ms);
            }
            api(
                &sock,
                "DELETE",
                &format!("/api/v1/sandboxes/c{mode}{i}"),
                None,
            );
        }
    }
    let (w, wo) = (median(&mut with), median(&mut without));
    println!(
        "create: --net internet {w:.0} ms vs --net none {wo:.0} ms (median of {CREATES}; +{:.0} ms, noise of a TCG boot included)",
        w - wo
    );
    println!(
        "network set-up inside the create (TAP, rules, rates; hutchd's net_us): median {:.2} ms (goal <= 10 ms)",
        median(&mut net_us) / 1000.0
    );

    // 1: HTTP through the proxy vs straight to the VM.
    let (st, v) = api(
        &sock,
        "POST",
        "/api/v1/sandboxes",
        Some(json!({"image": "bb", "name": "web"})),
    );
    assert_eq!(st, 201, "{v}");
    let ip = v["net"]["ipv4"].as_str().unwrap().to_string();
    assert_eq!(
        exec(
            &sock,
            "web",
            "mkdir -p /www && echo hello > /www/index.html && busybox httpd -p 8080 -h /www"
        ),
        0
    );
    let (st, _) = api(&sock, "PUT", "/api/v1/sandboxes/web/public/8080", None);
    assert_eq!(st, 200);
    let direct = format!("{ip}:8080");
    let proxy = format!("127.0.0.1:{proxy_port}");
    assert!(get(&direct, "x") && get(&proxy, "8080-web.bench.hutch"));
    let (mut d, mut p) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(rate(&direct, "x"));
        p.push(rate(&proxy, "8080-web.bench.hutch"));
    }
    let (dm, pm) = (median(&mut d), median(&mut p));
    println!(
        "HTTP req/s: proxy {pm:.0} vs direct {dm:.0} -> {:.2}x (goal >= 0.9x)",
        pm / dm
    );

    // 2: TCP out of the VM vs host loopback (busybox nc -l fed by dd, the host reads).
    let (mut vm, mut lo) = (Vec::new(), Vec::new());
    let count = MB * 16;
    for r in 0..ROUNDS {
        let port = 9000 + r as u16;
        let sock2 = sock.clone();
        let t = std::thread::spawn(move || {
            exec(
                &sock2,
                "web",
                &format!("dd if=/dev/zero bs=64k count={count} 2>/dev/null | nc -l -p {port}"),
            )
        });
        vm.push(read_all(&format!("{ip}:{port}")));
        t.join().unwrap();
        let lport = 19000 + r as u16 + (std::process::id() % 1000) as u16 * 8;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dd if=/dev/zero bs=64k count={count} 2>/dev/null | busybox nc -l -p {lport}"
            ))
            .spawn()
            .unwrap();
        lo.push(read_all(&format!("127.0.0.1:{lport}")));
        let _ = child.wait();
    }
    let (vmm, lom) = (median(&mut vm), median(&mut lo));
    println!(
        "TCP VM -> host {vmm:.0} MB/s vs host loopback {lom:.0} MB/s -> {:.3}x (TCG bounds the guest)",
        vmm / lom
    );
}
