#![allow(dead_code)] // each benchmark uses part of it
//! What the benchmark examples share: the workspace path, a REST call over hutchd's unix
//! socket, a median, and killing the VMs a benchmark's hutchd left.

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn api(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).expect("connect hutchd");
    let b = body.map(|v| v.to_string()).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()).unwrap();
    let mut r = Vec::new();
    s.read_to_end(&mut r).unwrap();
    let split = r
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(r.len());
    let head = String::from_utf8_lossy(&r[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let body = &r[(split + 4).min(r.len())..];
    let text = String::from_utf8_lossy(body);
    // Exec answers are chunked NDJSON; the last JSON line is what we want.
    let v = serde_json::from_slice(body).unwrap_or_else(|_| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .rfind(Value::is_object)
            .unwrap_or(Value::Null)
    });
    (status, v)
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// SIGKILLs every QEMU whose command line names `data` (a benchmark's hutchd data dir).
pub fn kill_qemus_under(data: &Path) {
    let needle = data.to_string_lossy().to_string();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("qemu-system") && cmd.contains(&needle) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether hutchd answers on `sock`.
pub fn api_ok(sock: &Path) -> Option<()> {
    UnixStream::connect(sock).ok()?;
    (api(sock, "GET", "/api/v1/health", None).0 == 200).then_some(())
}

/// Stops a benchmark's hutchd and its VMs, and removes its bridge and tables, also on a panic.
pub struct Cleanup {
    pub hutchd: std::process::Child,
    pub data: PathBuf,
    pub bridge: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        use std::process::Command;
        let _ = self.hutchd.kill();
        let _ = self.hutchd.wait();
        kill_qemus_under(&self.data);
        std::thread::sleep(std::time::Duration::from_millis(500));
        // A killed hutchd removes no cgroups: its VMs' and its node's go here.
        let node = hutch_vmm::cgroup::node_name(&self.data);
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = h.path().join("hutch").join(&node);
            for vm in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if vm.path().is_dir() {
                    let _ = std::fs::remove_dir(vm.path());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        if self.bridge.is_empty() {
            return; // --network off
        }
        let ports = std::fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge));
        for p in ports.into_iter().flatten().flatten() {
            let _ = Command::new("ip")
                .args(["link", "del"])
                .arg(p.file_name())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        for fam in ["inet", "bridge"] {
            let _ = Command::new("nft")
                .args(["delete", "table", fam, &self.bridge])
                .status();
        }
    }
}

/// Waits (polling) until `f` holds, at most `secs`.
pub fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not ready in {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A set, non-empty environment variable.
pub fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// The busybox test image's OCI layout (`HUTCH_BENCH_IMAGE`, or made under `work`).
pub fn test_image(work: &Path) -> PathBuf {
    if let Some(p) = env("HUTCH_BENCH_IMAGE") {
        return PathBuf::from(p);
    }
    let img = work.join("img");
    std::fs::create_dir_all(&img).unwrap();
    let st = std::process::Command::new(ws().join("scripts/make-test-image.sh"))
        .arg(&img)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    img.join("oci")
}

/// One hutchd cluster node on etcd `etcd`, its API on a loopback port (no VM network: the
/// nodes share this namespace; no SSH unless `extra` says `--ssh-listen`), plus `extra`
/// flags; its guard and its unix socket. `HUTCH_BENCH_HUTCHD`, `HUTCH_BENCH_BOOT` and
/// `HUTCH_BENCH_ACCEL` point it at what it needs on another machine.
pub fn cluster_node(work: &Path, name: &str, etcd: &str, extra: &[&str]) -> (Cleanup, PathBuf) {
    use std::process::{Command, Stdio};
    let data = work.join(name);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(
        env("HUTCH_BENCH_HUTCHD")
            .map(PathBuf::from)
            .unwrap_or_else(|| ws().join("target/release/hutchd")),
    );
    cmd.arg("--data-dir")
        .arg(&data)
        .arg("--boot-cache")
        .arg(
            env("HUTCH_BENCH_BOOT")
                .map(PathBuf::from)
                .unwrap_or_else(|| ws().join("target/hutch-bench-boot")),
        )
        .args(["--network", "off"])
        .args([
            "--accel",
            &env("HUTCH_BENCH_ACCEL").unwrap_or("auto".into()),
        ])
        .args(["--etcd", etcd, "--node-name", name])
        .args(["--listen", &addr, "--advertise", &addr])
        .args(extra);
    if !extra.contains(&"--ssh-listen") {
        cmd.args(["--ssh-listen", "off"]);
    }
    let hutchd = cmd
        .env("HUTCH_LOG", env("HUTCH_BENCH_LOG").unwrap_or("warn".into()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("target/release/hutchd (run `make build`)");
    let sock = data.join("hutchd.sock");
    let c = Cleanup {
        hutchd,
        data,
        bridge: String::new(),
    };
    wait("hutchd", 300, || api_ok(&sock).is_some());
    (c, sock)
}
