//! Test infrastructure: a real hutchd on a private data dir, the real CLI, a busybox image built
//! with umoci, and cleanup that leaves no process behind.
#![allow(dead_code)]

pub mod cluster;
pub mod ssh_client;

use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Daemon start-ups are serialised so only one fetches the kernel and builds the initramfs.
static START: Mutex<()> = Mutex::new(());

/// Builds the static agent if the Makefile has not.
pub fn ensure_agent() {
    agent_bin("hutch-agent");
}

/// A static binary of the hutch-agent crate (the agent, or a guest-side test tool), built the
/// way `make agent` builds it if it is not there yet; its path.
pub fn agent_bin(bin: &str) -> PathBuf {
    let p = workspace()
        .join("target/agent/x86_64-unknown-linux-gnu/release")
        .join(bin);
    if p.exists() {
        return p;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(workspace())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--release", "-p", "hutch-agent", "--bin", bin])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args(["--target-dir", "target/agent"])
        .status()
        .unwrap();
    assert!(st.success(), "building {bin} failed");
    p
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub extra: Vec<String>,
    /// The test's own bridge and subnet (see `start`).
    net: Vec<String>,
    /// The network namespace hutchd runs in (None: the test's own).
    pub netns: Option<String>,
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_in(None, extra)
    }

    /// `start`, with hutchd (and so its VM network and VMs) in network namespace `netns`.
    pub fn start_in(netns: Option<&str>, extra: &[&str]) -> Daemon {
        ensure_agent();
        let dir = tempfile::Builder::new()
            .prefix("hutch-t")
            .tempdir_in("/tmp")
            .unwrap();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // Every daemon gets its own bridge and subnet (tests run side by side), kept across
        // restarts (also when a test replaces `extra`); Drop removes them.
        let net = if extra.iter().any(|a| a == "--network" || a == "--bridge") {
            Vec::new()
        } else {
            let (bridge, subnet) = test_network();
            vec!["--bridge".into(), bridge, "--subnet".into(), subnet]
        };
        let mut d = Daemon {
            dir,
            child: None,
            extra,
            net,
            netns: netns.map(str::to_string),
        };
        d.spawn();
        d
    }

    /// The value of hutchd option `flag` this daemon runs with.
    pub fn opt(&self, flag: &str) -> Option<String> {
        let args: Vec<&String> = self.extra.iter().chain(&self.net).collect();
        let i = args.iter().position(|a| *a == flag)?;
        args.get(i + 1).map(|s| s.to_string())
    }

    /// The VM network's bridge (None: --network off).
    pub fn bridge(&self) -> Option<String> {
        self.opt("--bridge")
    }

    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    pub fn spawn(&mut self) {
        let _g = START.lock().unwrap_or_else(|e| e.into_inner());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(
            self.data().join("../").join(format!(
                "{}.hutchd.log",
                self.data().file_name().unwrap().to_string_lossy()
            )),
        );
        let log = log.unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_hutchd")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_hutchd")),
        };
        cmd.arg("--data-dir").arg(self.data());
        if !self.extra.iter().any(|a| a == "--ssh-listen") {
            cmd.arg("--ssh-listen").arg("off");
        }
        if !self.extra.iter().any(|a| a == "--boot-cache") {
            cmd.arg("--boot-cache")
                .arg(workspace().join("target/hutch-test-boot"));
        }
        let child = cmd
            .args(&self.extra)
            .args(&self.net)
            .env("HUTCH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(300), || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("hutchd exited during start-up: {st}; log: {}", self.log());
            }
            self.api("GET", "/api/v1/health", None)
                .ok()
                .filter(|(s, _)| *s == 200)
        });
        assert!(ok.is_some(), "hutchd did not become ready: {}", self.log());
    }

    /// hutchd's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        let p = self.data().join("../").join(format!(
            "{}.hutchd.log",
            self.data().file_name().unwrap().to_string_lossy()
        ));
        std::fs::read_to_string(p).unwrap_or_default()
    }

    /// Imports the busybox test layout (`busybox_layout`) as `busybox`.
    pub fn import_busybox(&self, layout: &Path) {
        self.ok(&[
            "image",
            "import",
            layout.to_str().unwrap(),
            "--name",
            "busybox",
        ]);
    }

    /// Waits for hutchd to exit by itself (e.g. at a crash point); its status, None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let st = wait_until(timeout, || c.try_wait().ok().flatten());
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// SIGKILL hutchd (VMs must survive).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn hutch(&self, args: &[&str]) -> Output {
        self.hutch_stdin(args, None)
    }

    pub fn hutch_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hutch"))
            .arg("--data-dir")
            .arg(self.data())
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(data) = stdin {
            let mut s = c.stdin.take().unwrap();
            s.write_all(data).unwrap();
        }
        c.wait_with_output().unwrap()
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.hutch(args);
        assert!(
            o.status.success(),
            "hutch {args:?} failed: {}\nstdout: {}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// A raw HTTP/1.1 request over the unix socket; returns status and parsed JSON body (or Null).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Value)> {
        let (s, b) = self.api_raw(method, path, body.map(str::as_bytes), "application/json")?;
        Ok((s, serde_json::from_slice(&b).unwrap_or(Value::Null)))
    }

    pub fn api_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        ctype: &str,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = std::os::unix::net::UnixStream::connect(self.data().join("hutchd.sock"))?;
        http(&mut s, method, path, body, ctype, None)
    }

    pub fn qemu_pids(&self) -> Vec<u32> {
        qemu_pids_under(self.data())
    }
}

/// A bridge name and a /24 no other daemon of this run uses (the second octet from the pid,
/// so test binaries run one after another do not meet leftovers of each other).
pub fn test_network() -> (String, String) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    (
        format!("hb{:x}x{n}", pid % 0xffff),
        format!("10.{}.{}.0/24", 200 + pid % 50, n % 256),
    )
}

/// Removes what a test daemon's VM network left: TAPs on the bridge, the bridge, the tables.
pub fn remove_network(bridge: &str) {
    for e in std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = Command::new("ip")
            .args(["link", "del"])
            .arg(e.file_name())
            .status();
    }
    let _ = Command::new("ip").args(["link", "del", bridge]).status();
    // The shared-subnet overlay device (hutch_net::NetConfig::overlay), where there is one.
    let overlay = format!("{}-x", &bridge[..bridge.len().min(13)]);
    if Path::new("/sys/class/net").join(&overlay).exists() {
        let _ = Command::new("ip").args(["link", "del", &overlay]).status();
    }
    let table = bridge.replace('-', "_");
    for fam in ["inet", "bridge"] {
        let _ = Command::new("nft")
            .args(["delete", "table", fam, &table])
            .stderr(Stdio::null())
            .status();
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

/// One JSON request over TCP to `addr` with a bearer token: status and parsed body (or Null).
pub fn http_json(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let b = body.map(|b| b.to_string());
    let (st, out) = http(
        &mut s,
        method,
        path,
        b.as_deref().map(str::as_bytes),
        "application/json",
        Some(token),
    )
    .unwrap();
    (st, serde_json::from_slice(&out).unwrap_or(Value::Null))
}

pub fn http(
    s: &mut (impl Read + Write),
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    ctype: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let body = body.unwrap_or(b"");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: hutchd\r\nConnection: close\r\n{auth}Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(resp.len());
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = resp[(split + 4).min(resp.len())..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..pos]).unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[pos + 2..pos + 2 + n]);
        b = &b[pos + 2 + n + 2..];
    }
    out
}

/// QEMU processes whose command line mentions `dir`.
pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("qemu-system") && cmd.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        for pid in self.qemu_pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        wait_until(Duration::from_secs(10), || {
            self.qemu_pids().is_empty().then_some(())
        });
        // In a namespace of the test's, the network goes with the namespace.
        if let Some(br) = self.bridge().filter(|_| self.netns.is_none()) {
            remove_network(&br);
        }
        // The VMs' cgroups outlive the killed hutchd; remove them (empty now) with its node.
        let node = hutch_vmm::cgroup::node_name(self.data());
        if let Some(cg) =
            hutch_vmm::cgroup::Cgroups::detect(Path::new("/sys/fs/cgroup"), "hutch", &node)
        {
            for id in cg.list() {
                let _ = cg.remove(&id);
            }
        }
        let log = self.data().join("../").join(format!(
            "{}.hutchd.log",
            self.data().file_name().unwrap().to_string_lossy()
        ));
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(log);
        } else {
            eprintln!("hutchd log kept at {}", log.display());
        }
    }
}

/// Builds the busybox test image (scripts/make-test-image.sh) under `dir`; returns its layout.
pub fn busybox_layout(dir: &Path) -> PathBuf {
    let o = Command::new(workspace().join("scripts/make-test-image.sh"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "building the test image failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    dir.join("oci")
}

/// A real registry (Debian's docker-registry, the CNCF distribution server) on loopback,
/// optionally with htpasswd (Basic) auth; stopped and removed on drop.
pub struct TestRegistry {
    pub addr: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl TestRegistry {
    pub fn start(auth: Option<(&str, &str)>) -> TestRegistry {
        Self::run(|dir| match auth {
            None => String::new(),
            Some((u, p)) => {
                let o = Command::new("htpasswd")
                    .args(["-Bbn", u, p])
                    .output()
                    .unwrap();
                assert!(o.status.success());
                std::fs::write(dir.join("htpasswd"), o.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: hutch-test\n    path: {}\n",
                    dir.join("htpasswd").display()
                )
            }
        })
    }

    /// A registry that wants Bearer tokens from `realm`, signed by the key of `cert`.
    pub fn start_token(realm: &str, cert: &Path) -> TestRegistry {
        Self::run(|_| {
            format!(
                "auth:\n  token:\n    realm: {realm}\n    service: hutch-test\n    issuer: hutch-issuer\n    rootcertbundle: {}\n",
                cert.display()
            )
        })
    }

    /// Starts a registry on a free loopback port; `auth` gives the config's auth section.
    fn run(auth: impl FnOnce(&Path) -> String) -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        cfg.push_str(&auth(dir.path()));
        std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry)");
        let reg = TestRegistry { addr, dir, child };
        let up = wait_until(Duration::from_secs(20), || {
            let mut s = std::net::TcpStream::connect(&reg.addr).ok()?;
            let (st, _) = http(&mut s, "GET", "/v2/", None, "application/json", None).ok()?;
            (st == 200 || st == 401).then_some(())
        });
        assert!(up.is_some(), "registry did not start");
        reg
    }

    /// `skopeo copy --all` of `oci:LAYOUT:TAG` to `REGISTRY/DEST`.
    pub fn push(&self, layout: &Path, tag: &str, dest: &str, creds: Option<&str>) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--all", "--dest-tls-verify=false"]);
        if let Some(cr) = creds {
            c.args(["--dest-creds", cr]);
        }
        let o = c
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{dest}", self.addr))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "skopeo push: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// The registry's stored copy of a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a bash script; panics with its stderr on failure.
pub fn sh(script: &str) {
    let o = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(
        o.status.success(),
        "script failed: {}\n{script}",
        String::from_utf8_lossy(&o.stderr)
    );
}
