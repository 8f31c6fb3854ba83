//! API fuzzing: schemathesis (pinned, from PyPI, in a venv under target/fuzz-venv) against the
//! openapi.json that hutchd serves, over the TCP API three times: with no token, with an
//! account's token (issued over SSH) and with the admin token. The oracle is schemathesis's own
//! checks: no response is a server error (5xx), and every response has a status code, content
//! type and body that the spec documents. One VM boot beforehand (an account's VM that the
//! VM routes hit by name), plus those the fuzzer's own creates boot; each run is bounded in time.
//!
//! Registry traffic (pulls and pushes of the references the fuzzer makes up) goes to a proxy on
//! loopback that the test counts and refuses, so nothing leaves the machine.

mod common;
use common::ssh_client::*;
use common::*;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The schemathesis release the oracle is pinned to.
const SCHEMATHESIS: &str = "4.32.5";
/// Seconds each of the three runs may take; schemathesis repeats fuzzing until they are spent.
const RUN_SECS: u64 = 35;
/// Test cases per operation and pass.
const EXAMPLES: u32 = 15;
/// The account VM every sandbox route is pointed at (half of the time).
const VM: &str = "fuzz";

/// A venv under target/ with the pinned schemathesis, made on first use and reused after.
fn schemathesis() -> PathBuf {
    let venv = workspace().join("target/fuzz-venv");
    let bin = venv.join("bin/schemathesis");
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    if have
        .trim_end()
        .ends_with(&format!("version {SCHEMATHESIS}"))
    {
        return bin;
    }
    let o = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output()
        .expect("python3 (scripts/install-deps.sh --test)");
    assert!(
        o.status.success(),
        "python3 -m venv failed (Debian/Ubuntu: package python3-venv, see scripts/install-deps.sh --test): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!("schemathesis=={SCHEMATHESIS}"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "installing schemathesis {SCHEMATHESIS} from PyPI failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    bin
}

/// A loopback "proxy" that counts connections and closes them: every registry request hutchd
/// makes ends here (a refused pull or push, answered as the API's 4xx).
fn sink_proxy() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            n2.fetch_add(1, Ordering::Relaxed);
            drop(c);
        }
    });
    (port, n)
}

/// The schemathesis configuration: the built-in server-error check and the three conformance
/// checks, and dictionaries that point path names at the account's VM and the image half of
/// the time (as each caller names them), the other half at whatever the fuzzer makes up.
const CONFIG: &str = r#"
[generation]
database = "none"

[checks]
enabled = false
[checks.not_a_server_error]
enabled = true
[checks.status_code_conformance]
enabled = true
[checks.content_type_conformance]
enabled = true
[checks.response_schema_conformance]
enabled = true

[dictionaries.vm]
values = ["fuzz", "alice/fuzz"]
[dictionaries.image]
values = ["busybox", "busybox:latest", "~alice/busybox"]

# The event stream answers for as long as the client reads: nothing to fuzz, and it would
# only run into the request timeout.
[[operations]]
include-path = "/api/v1/events"
enabled = false

[[operations]]
include-path-regex = "^/api/v1/sandboxes/"
parameters = { "path.name" = { dictionary = "vm", probability = 0.5 } }

[[operations]]
include-path-regex = "^/api/v1/images/\\{"
parameters = { "path.name" = { dictionary = "image", probability = 0.5 } }
"#;

struct Run {
    summary: String,
    cases: u64,
    secs: f64,
}

/// One schemathesis run against `port` with `token` (None: no Authorization header).
fn fuzz(st: &Path, work: &Path, spec: &Path, port: u16, token: Option<&str>, who: &str) -> Run {
    let doc: Value = serde_json::from_slice(&std::fs::read(spec).unwrap()).unwrap();
    // Every documented operation but the event stream (disabled in CONFIG: it never ends).
    let ops = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(path, _)| path.as_str() != "/api/v1/events")
        .map(|(_, p)| p.as_object().unwrap().len())
        .sum::<usize>();
    // A fixed seed by default, so `make test` explores the same inputs each time (time bounds
    // and two workers still vary it a little); HUTCH_FUZZ_SEED=N picks another,
    // HUTCH_FUZZ_SEED=random lets schemathesis choose.
    let seed = match std::env::var("HUTCH_FUZZ_SEED") {
        Ok(s) if s == "random" => None,
        Ok(s) => Some(s),
        Err(_) => Some("20261126".to_string()),
    };
    let mut c = Command::new(st);
    c.current_dir(work)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env("NO_COLOR", "1")
        .args(["--config-file", "fuzz.toml", "run"])
        .arg(spec)
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["--max-time", &RUN_SECS.to_string()])
        .args(["--max-examples", &EXAMPLES.to_string()])
        .args(["--workers", "2", "--request-timeout", "60", "--no-color"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"]);
    if let Some(t) = token {
        c.args(["--header", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(s) = &seed {
        c.args(["--seed", s]);
    }
    let t0 = Instant::now();
    let o = c.output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "schemathesis ({who}) found failures:\n{out}"
    );
    let tested = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested:"))
        .and_then(|s| s.trim().parse::<usize>().ok());
    assert_eq!(
        tested,
        Some(ops),
        "({who}) every operation was tested:\n{out}"
    );
    let cases = out
        .lines()
        .find_map(|l| l.trim().split_once(" generated")?.0.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(cases > 100, "({who}) too few test cases ran:\n{out}");
    let summary = out
        .lines()
        .rev()
        .find(|l| l.contains(" in ") && l.contains("=="))
        .unwrap_or("")
        .trim_matches(|c| c == '=' || c == ' ')
        .to_string();
    Run {
        summary,
        cases,
        secs,
    }
}

/// Puts alice's VM back (running) when a run deleted or stopped it.
fn ensure_vm(d: &Daemon, token: &str, port: u16) {
    let addr = format!("127.0.0.1:{port}");
    let call = |method: &str, path: &str, body: Option<Value>| {
        http_json(&addr, token, method, path, body.as_ref())
    };
    let (st, v) = d
        .api("GET", &format!("/api/v1/sandboxes/alice%2F{VM}"), None)
        .unwrap();
    let (st, v) = match st {
        404 => call(
            "POST",
            "/api/v1/sandboxes",
            Some(json!({"image": "busybox", "name": VM, "mem_mib": 256, "disk_gib": 1})),
        ),
        200 if v["state"] != "running" => {
            call("POST", &format!("/api/v1/sandboxes/{VM}/start"), None)
        }
        _ => (st, v),
    };
    assert!(
        st < 300 && v["state"] == "running",
        "alice's VM is not running: {st} {v}"
    );
}

#[test]
fn api_fuzzing_finds_no_server_errors() {
    let started = Instant::now();
    let st = schemathesis();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let admin = keygen(w, "admin", &["-t", "ed25519"]);
    let alice = keygen(w, "alice", &["-t", "ed25519"]);
    let (ssh_port, api_port) = (free_port(), free_port());
    let (proxy_port, proxied) = sink_proxy();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    // hutchd inherits these (this binary has this one test): registry requests go to the sink.
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        std::env::set_var(k, &proxy);
    }
    for k in [
        "NO_PROXY",
        "no_proxy",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        std::env::remove_var(k);
    }
    let layout = busybox_layout(w);
    let d = Daemon::start(&[
        "--listen",
        &format!("127.0.0.1:{api_port}"),
        "--ssh-listen",
        &format!("127.0.0.1:{ssh_port}"),
        "--admin-keys",
        &format!("{}.pub", admin.display()),
        // Guest memory is reserved, not touched: without this a fuzzed 20 GiB VM would make
        // the next create a 503 insufficient_capacity, which is right but not what this tests.
        "--mem-overcommit",
        "1000",
    ]);
    d.import_busybox(&layout);
    let s = Ssh { port: ssh_port };
    let alice_token = s.account_with_token(&admin, "alice", &alice);
    let admin_token = std::fs::read_to_string(d.data().join("api-token"))
        .unwrap()
        .trim()
        .to_string();

    // The spec under test is the one hutchd serves.
    let (code, spec) = {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap();
        http(
            &mut c,
            "GET",
            "/api/v1/openapi.json",
            None,
            "application/json",
            Some(&admin_token),
        )
        .unwrap()
    };
    assert_eq!(code, 200);
    let spec_path = w.join("openapi.json");
    std::fs::write(&spec_path, &spec).unwrap();
    std::fs::write(w.join("fuzz.toml"), CONFIG).unwrap();

    let mut report = Vec::new();
    for (who, token) in [
        ("no token", None),
        ("alice's token", Some(alice_token.as_str())),
        ("admin token", Some(admin_token.as_str())),
    ] {
        if token.is_some() {
            ensure_vm(&d, &alice_token, api_port);
        }
        let r = fuzz(&st, w, &spec_path, api_port, token, who);
        report.push(format!(
            "{who}: {} test cases in {:.0} s ({})",
            r.cases, r.secs, r.summary
        ));
    }
    let log = d.log();
    assert!(
        !log.contains("panicked"),
        "hutchd panicked during fuzzing: {log}"
    );
    for l in &report {
        eprintln!("api_fuzz: {l}");
    }
    eprintln!(
        "api_fuzz: {} registry connections caught on loopback; {:.0} s in all",
        proxied.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    drop(d);
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        std::env::remove_var(k);
    }
}
