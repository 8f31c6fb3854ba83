//! hutchd's E2B-compatible server (`--e2b-listen`) driven by the official, unmodified E2B SDKs:
//! PyPI `e2b` 2.63.0 (sync and async) and npm `e2b` 2.51.0, pinned and installed by
//! scripts/install-e2b-sdks.sh (`make test` runs it through install-deps.sh --test). The sessions
//! are the scripts in tests/e2b/, run against a real hutchd with the image of
//! scripts/make-e2b-image.sh imported as `base` (E2B's default template), the admin API token as
//! the E2B API key. Then two accounts: B's key neither sees nor reaches A's sandbox.
//! A missing SDK install fails the test (it does not skip). Three VM boots in all, one at a time
//! within each test.

mod common;
use common::ssh_client::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest one SDK script may run (each is ~2 minutes or less under TCG).
const SCRIPT_LIMIT: Duration = Duration::from_secs(600);

struct Sdk {
    python: PathBuf,
    node: PathBuf,
    scripts: PathBuf,
}

/// The pinned SDK install, or a failure that says how to make it.
fn sdk() -> Sdk {
    let ws = workspace();
    let python = ws.join("target/e2b-sdk/venv/bin/python");
    let node = ws.join("target/e2b-sdk/bin/node");
    let scripts = ws.join("tests/e2b");
    let how = "run scripts/install-e2b-sdks.sh (make test runs it through scripts/install-deps.sh --test)";
    let o = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; import e2b; print(m.version('e2b'))",
        ])
        .output();
    match o {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "2.63.0" => {}
        Ok(o) => panic!(
            "the E2B Python SDK in {} is not e2b 2.63.0 ({}{}): {how}",
            python.display(),
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "the E2B Python SDK is not installed ({}: {e}): {how}",
            python.display()
        ),
    }
    let o = Command::new(&node)
        .current_dir(&scripts)
        .args([
            "--input-type=module",
            "-e",
            "import { createRequire } from 'node:module'; \
             const r = createRequire(process.cwd() + '/'); \
             await import('e2b'); console.log(r('e2b/package.json').version)",
        ])
        .output();
    match o {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "2.51.0" => {}
        Ok(o) => panic!(
            "the E2B JS SDK in tests/e2b/node_modules is not e2b 2.51.0 ({}{}): {how}",
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "no Node.js for the E2B JS SDK ({}: {e}): {how}",
            node.display()
        ),
    }
    Sdk {
        python,
        node,
        scripts,
    }
}

/// Builds the E2B test image (bash, root and user) under `dir`; returns its OCI layout.
fn e2b_layout(dir: &Path) -> PathBuf {
    let o = Command::new(workspace().join("scripts/make-e2b-image.sh"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "scripts/make-e2b-image.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    dir.join("oci")
}

/// A hutchd with the E2B server on a free loopback port and the image imported as `base`;
/// the port.
fn e2b_daemon(extra: &[&str], layout: &Path) -> (Daemon, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--e2b-listen", listen.as_str()];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args);
    d.ok(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        "base",
    ]);
    (d, port)
}

/// `cmd` with the E2B SDK's environment pointed at hutchd on `port` with `key`.
fn sdk_env(cmd: &mut Command, port: u16, key: &str) {
    let url = format!("http://127.0.0.1:{port}");
    cmd.env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", key)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("PYTHONUNBUFFERED", "1");
    for k in [
        "E2B_DOMAIN",
        "E2B_DEBUG",
        "E2B_ACCESS_TOKEN",
        "E2B_HTTP_VERSION",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(k);
    }
}

/// Runs `cmd` (stdout and stderr into one log under `dir`) for at most SCRIPT_LIMIT; asserts it
/// exits 0, with its output and hutchd's log on failure. Returns the output.
fn run_script(d: &Daemon, dir: &Path, name: &str, mut cmd: Command) -> String {
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let status = wait_until(SCRIPT_LIMIT, || child.try_wait().ok().flatten());
    let out = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{name} did not finish within {} s; its output:\n{}\nhutchd log:\n{}",
            SCRIPT_LIMIT.as_secs(),
            out(&log_path),
            d.log()
        );
    };
    let text = out(&log_path);
    assert!(
        status.success(),
        "{name} failed ({status}) after {:.0} s; its output:\n{text}\nhutchd log:\n{}",
        started.elapsed().as_secs_f64(),
        d.log()
    );
    eprintln!(
        "--- {name} ({:.0} s):\n{text}",
        started.elapsed().as_secs_f64()
    );
    text
}

/// Every sandbox a session made is gone: no VM listed, no QEMU left.
fn assert_nothing_left(d: &Daemon, after: &str) {
    let vms = d.json(&["ls"]);
    assert_eq!(
        vms.as_array().map(|a| a.len()),
        Some(0),
        "VMs left after {after}: {vms}"
    );
    let gone = wait_until(Duration::from_secs(30), || {
        d.qemu_pids().is_empty().then_some(())
    });
    assert!(gone.is_some(), "QEMU still running after {after}");
}

#[test]
fn official_sdk_sessions_pass() {
    let sdk = sdk();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let layout = e2b_layout(w);
    let (d, port) = e2b_daemon(&[], &layout);
    let key = std::fs::read_to_string(d.data().join("api-token"))
        .unwrap()
        .trim()
        .to_string();

    for script in ["session_sync.py", "session_async.py"] {
        let mut c = Command::new(&sdk.python);
        c.arg(sdk.scripts.join(script)).current_dir(w);
        sdk_env(&mut c, port, &key);
        let out = run_script(&d, w, script, c);
        assert!(out.contains("PASS "), "{script} did not say PASS:\n{out}");
        assert_nothing_left(&d, script);
    }
    let mut c = Command::new(&sdk.node);
    c.arg("session.mjs").current_dir(&sdk.scripts);
    sdk_env(&mut c, port, &key);
    let out = run_script(&d, w, "session.mjs", c);
    assert!(
        out.contains("PASS "),
        "session.mjs did not say PASS:\n{out}"
    );
    assert_nothing_left(&d, "session.mjs");
    assert!(
        !d.log().contains("panicked"),
        "hutchd panicked: {}",
        d.log()
    );
}

/// Account A makes a sandbox; B's key must find nothing: not in B's list, get_info / connect /
/// set_timeout / pause raise SandboxNotFoundException, kill answers False; envd calls for A's
/// sandbox without A's envd access token (none, B's API key, a wrong one) are refused, while
/// the same call with A's token works. A's sandbox runs on untouched, then A kills it.
const CROSS_ACCOUNT: &str = r#"
import os, sys
import httpx
from e2b import Sandbox, SandboxQuery, SandboxNotFoundException

A, B = os.environ["KEY_A"], os.environ["KEY_B"]
URL = os.environ["E2B_SANDBOX_URL"].rstrip("/")
RT = 120

def fail(msg):
    print("FAIL:", msg, flush=True)
    sys.exit(1)

def not_found(what, fn):
    try:
        r = fn()
    except SandboxNotFoundException:
        print("ok", what, "-> SandboxNotFoundException", flush=True)
        return
    except Exception as e:
        fail(f"{what}: expected SandboxNotFoundException, got {type(e).__name__}: {e}")
    fail(f"{what}: expected SandboxNotFoundException, got {r!r}")

s = Sandbox.create(api_key=A, metadata={"who": "alice"}, timeout=300, request_timeout=RT)
sid = s.sandbox_id
print("ok A created", sid, flush=True)
try:
    if s.commands.run("echo mine").stdout != "mine\n":
        fail("A's own command")
    listed = [x.sandbox_id for x in Sandbox.list(api_key=B, request_timeout=RT).next_items()]
    if sid in listed:
        fail(f"B's Sandbox.list shows A's sandbox: {listed}")
    by_meta = Sandbox.list(api_key=B, query=SandboxQuery(metadata={"who": "alice"}), request_timeout=RT).next_items()
    if by_meta:
        fail(f"B's Sandbox.list by A's metadata found {[x.sandbox_id for x in by_meta]}")
    print("ok B's list does not show it", flush=True)
    not_found("B get_info", lambda: Sandbox.get_info(sid, api_key=B, request_timeout=RT))
    not_found("B connect", lambda: Sandbox.connect(sid, api_key=B, request_timeout=RT))
    not_found("B set_timeout", lambda: Sandbox.set_timeout(sid, 30, api_key=B, request_timeout=RT))
    not_found("B pause", lambda: Sandbox.pause(sid, api_key=B, request_timeout=RT))
    if Sandbox.kill(sid, api_key=B, request_timeout=RT) is not False:
        fail("B's kill of A's sandbox did not answer False (not found)")
    print("ok B kill -> False", flush=True)

    # envd: the SDK sends no API key there, only E2b-Sandbox-Id/Port and the envd access token
    # (X-Access-Token) that create/connect returned; so that token is what keeps B out.
    token = s._envd_access_token
    if not token:
        fail("create returned no envdAccessToken: envd calls carry no other credential, so anyone "
             "who learns a sandbox id could run commands in it")
    route = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "Content-Type": "application/json"}
    def envd_list(extra):
        return httpx.post(f"{URL}/process.Process/List", headers={**route, **extra}, content=b"{}", timeout=RT)
    r = envd_list({"X-Access-Token": token})
    if r.status_code != 200:
        fail(f"A's token on envd: {r.status_code} {r.text}")
    for name, extra in [("no token", {}), ("B's API key", {"X-API-Key": B, "X-Access-Token": B}),
                        ("a wrong token", {"X-Access-Token": token[:-1] + ("x" if token[-1] != "x" else "y")})]:
        r = envd_list(extra)
        if r.status_code == 200:
            fail(f"envd process list of A's sandbox with {name} succeeded: {r.text}")
        f = httpx.get(f"{URL}/files", params={"path": "/etc/passwd"}, headers={**route, **extra}, timeout=RT)
        if f.status_code == 200:
            fail(f"envd file read in A's sandbox with {name} succeeded")
        print(f"ok envd with {name} -> {r.status_code} / {f.status_code}", flush=True)

    info = Sandbox.get_info(sid, api_key=A, request_timeout=RT)
    if info.state.value != "running" or s.commands.run("echo still").stdout != "still\n":
        fail(f"A's sandbox after B's tries: {info.state}")
    print("ok A's sandbox still runs", flush=True)
finally:
    killed = Sandbox.kill(sid, api_key=A, request_timeout=RT)
if killed is not True:
    fail("A's kill of its own sandbox")
print("PASS cross-account", flush=True)
"#;

#[test]
fn accounts_cannot_reach_each_others_sandboxes() {
    let sdk = sdk();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let admin = keygen(w, "admin", &["-t", "ed25519"]);
    let alice = keygen(w, "alice", &["-t", "ed25519"]);
    let bob = keygen(w, "bob", &["-t", "ed25519"]);
    let layout = e2b_layout(w);
    let ssh_port = free_port();
    let ssh_listen = format!("127.0.0.1:{ssh_port}");
    let admin_pub = format!("{}.pub", admin.display());
    let (d, port) = e2b_daemon(
        &["--ssh-listen", &ssh_listen, "--admin-keys", &admin_pub],
        &layout,
    );
    let s = Ssh { port: ssh_port };
    let key_a = s.account_with_token(&admin, "alice", &alice);
    let key_b = s.account_with_token(&admin, "bob", &bob);

    let mut c = Command::new(&sdk.python);
    c.args(["-c", CROSS_ACCOUNT]).current_dir(w);
    sdk_env(&mut c, port, &key_a);
    c.env("KEY_A", &key_a).env("KEY_B", &key_b);
    let out = run_script(&d, w, "cross-account", c);
    assert!(out.contains("PASS cross-account"), "{out}");
    assert_nothing_left(&d, "the cross-account session");
}

/// `E2B_DOMAIN` alone, as E2B's own users run the SDK: `https://api.<domain>` and
/// `https://49983-<id>.<domain>` through hutch's HTTPS proxy, the names from hutch's public DNS,
/// the certificate from hutch's CA. The SDK runs in a mount namespace of its own whose
/// /etc/resolv.conf names hutch's DNS (nothing on the host changes).
#[test]
fn e2b_domain_through_the_proxy_and_dns() {
    let sdk = sdk();
    let work = tempfile::tempdir().unwrap();
    let layout = e2b_layout(&work.path().join("img"));
    // An address of the loopback net of this test's own: its DNS and HTTPS listen there on
    // their standard ports, as clients of a real domain expect.
    let addr = format!("127.54.{}.{}", std::process::id() % 200 + 1, 7);
    let (d, _) = e2b_daemon(
        &[
            "--https-listen",
            &format!("{addr}:443"),
            "--dns-listen",
            &format!("{addr}:53"),
            "--public-address",
            &addr,
        ],
        &layout,
    );
    let ca = work.path().join("ca.pem");
    std::fs::write(&ca, d.ok(&["ca"])).unwrap();
    let resolv = work.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {addr}\n")).unwrap();
    let key = std::fs::read_to_string(d.data().join("api-token")).unwrap();
    let script = r#"
import os, sys
from e2b import Sandbox
s = Sandbox.create(timeout=120)
try:
    assert s.sandbox_domain == "hutch.internal", s.sandbox_domain
    r = s.commands.run("echo via-$((6*7)); id -u")
    assert r.stdout == "via-42\n1000\n", r.stdout
    s.files.write("d.txt", "domain mode\n")
    assert s.files.read("/home/user/d.txt") == "domain mode\n"
    host = s.get_host(8080)
    assert host == f"8080-{s.sandbox_id}.hutch.internal", host
    assert s.sandbox_id in [x.sandbox_id for x in Sandbox.list().next_items()]
finally:
    assert s.kill()
print("PASS domain mode", flush=True)
sys.stdout.flush()
os._exit(0)
"#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/resolv.conf && exec {} -c \"$0\"",
            resolv.display(),
            sdk.python.display()
        ))
        .arg(script);
    sdk_env(&mut cmd, 0, key.trim());
    cmd.env_remove("E2B_API_URL")
        .env_remove("E2B_SANDBOX_URL")
        .env("E2B_DOMAIN", "hutch.internal")
        .env("SSL_CERT_FILE", &ca)
        .env("NO_PROXY", "*");
    let out = run_script(&d, work.path(), "domain_mode", cmd);
    assert!(out.contains("PASS domain mode"), "{out}");
    assert_nothing_left(&d, "domain mode");
}
