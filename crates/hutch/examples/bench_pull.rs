//! `make bench` (second part): pull + convert of one multi-layer image (tens of MB, thousands of
//! files) from a local registry, hutch against the pipeline peers use (skopeo copy, then umoci
//! unpack, then mkfs.ext4 -d), interleaved in one run. Also: a second pull of the same image,
//! and hutch's download rate.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 3;

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn run(script: &str) {
    let o = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn api(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect hutchd");
    let b = body.map(|v| v.to_string()).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()).unwrap();
    let mut r = Vec::new();
    s.read_to_end(&mut r).unwrap();
    let text = String::from_utf8_lossy(&r).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    (status, text)
}

struct Procs(Vec<std::process::Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let w = tempfile::Builder::new()
        .prefix("hutch-bench-pull")
        .tempdir_in("/tmp")
        .unwrap();
    let wp = w.path().display().to_string();
    // The image: busybox, then 3000 files of ~8 KiB, then 600 files of ~40 KiB (random bytes).
    run(&format!(
        r#"set -e; cd {wp}; mkdir img; {ws}/scripts/make-test-image.sh img >/dev/null; cd img
step() {{ umoci unpack --image oci:bb b >/dev/null; eval "$1"; umoci repack --image oci:bb b >/dev/null; rm -rf b; }}
step 'mkdir -p b/rootfs/srv/a; for i in $(seq 3000); do head -c $((4096 + RANDOM % 8192)) /dev/urandom > b/rootfs/srv/a/f$i; done'
step 'mkdir -p b/rootfs/srv/b; for i in $(seq 600); do head -c $((20000 + RANDOM * 2)) /dev/urandom > b/rootfs/srv/b/g$i; done'
"#,
        ws = ws().display()
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reg = format!("127.0.0.1:{port}");
    std::fs::write(
        w.path().join("reg.yml"),
        format!("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {wp}/regdata\nhttp:\n  addr: {reg}\n"),
    )
    .unwrap();
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new("docker-registry")
            .arg("serve")
            .arg(w.path().join("reg.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry"),
    );
    std::thread::sleep(Duration::from_secs(1));
    run(&format!("skopeo copy --dest-tls-verify=false oci:{wp}/img/oci:bb docker://{reg}/bench/app:1 >/dev/null"));
    let data = w.path().join("d");
    let log = std::fs::File::create(w.path().join("hutchd.log")).unwrap();
    procs.0.push(
        Command::new(ws().join("target/release/hutchd"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--boot-cache")
            .arg(ws().join("target/hutch-bench-boot"))
            // No VM network: these figures compare against bare QEMU / tools without one.
            .args(["--network", "off"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("target/release/hutchd (run `make build`)"),
    );
    let sock = data.join("hutchd.sock");
    let deadline = Instant::now() + Duration::from_secs(300);
    while UnixStream::connect(&sock).is_err() || api(&sock, "GET", "/api/v1/health", None).0 != 200
    {
        assert!(Instant::now() < deadline, "hutchd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let reference = format!("{reg}/bench/app:1");
    let pull = || {
        let t = Instant::now();
        let (st, body) = api(
            &sock,
            "POST",
            "/api/v1/images/pull",
            Some(json!({"reference": reference, "insecure": true})),
        );
        assert!(st == 200 && body.contains(r#""type":"done""#), "{body}");
        t.elapsed().as_secs_f64()
    };
    let (mut hutch, mut peers) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        api(
            &sock,
            "DELETE",
            &format!("/api/v1/images/{reference}"),
            None,
        );
        api(&sock, "POST", "/api/v1/images/gc", None);
        hutch.push(pull());
        let t = Instant::now();
        run(&format!(
            "set -e; cd {wp}; rm -rf p{i}; mkdir p{i}; cd p{i}
skopeo copy --src-tls-verify=false docker://{reg}/bench/app:1 oci:lay:app >/dev/null
umoci unpack --image lay:app bundle >/dev/null
size=$(( $(du -sm bundle/rootfs | cut -f1) * 3 / 2 + 64 ))
mkfs.ext4 -q -d bundle/rootfs rootfs.ext4 ${{size}}M"
        ));
        peers.push(t.elapsed().as_secs_f64());
        run(&format!("rm -rf {wp}/p{i}"));
    }
    let second: Vec<f64> = (0..ROUNDS).map(|_| pull()).collect();
    let compressed: u64 = std::fs::read_dir(data.join("images/blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let files = 3000 + 600;
    let (h, p) = (median(&mut hutch), median(&mut peers));
    println!("pull + convert of a 4-layer image ({:.1} MB compressed, {files}+ files) from a local registry", compressed as f64 / 1e6);
    println!(
        "  hutch image pull (to EROFS rootfs)          {:8.0} ms",
        h * 1000.0
    );
    println!(
        "  skopeo copy + umoci unpack + mkfs.ext4 -d   {:8.0} ms",
        p * 1000.0
    );
    println!(
        "  speed-up peers/hutch                         {:8.2}x  (goal >= 1.5x)",
        p / h
    );
    println!(
        "  hutch download+convert rate                  {:8.1} MB/s",
        compressed as f64 / 1e6 / h
    );
    println!("second pull of the same image (all blobs present)");
    println!("  median {:8.1} ms", median(&mut second.clone()) * 1000.0);
}
