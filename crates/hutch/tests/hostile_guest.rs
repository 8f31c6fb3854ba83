//! A hostile guest and hostile clients cannot exhaust hutchd (issue 7, section 3), on one real
//! VM under QEMU:
//! - a guest flooding stdout to a REST client that never reads: the flood stalls in the guest
//!   (its writer blocks), hutchd's RSS stays under a stated bound, and meanwhile another exec in
//!   the same VM answers promptly; when the client goes away the flooding process is killed;
//! - a slow client reading `/dev/zero` through GET /files: bounded memory, correct bytes;
//! - exec stdin streams (16 MiB through `hutch exec`); a process that never reads its stdin does
//!   not make hutchd buffer it;
//! - body limits: JSON over 1 MiB and uploads over `--max-upload-mib` get 413 with a JSON error;
//! - a guest that never answers (its QEMU SIGSTOPped): requests fail with a clear error after a
//!   bound instead of hanging, and hutchd keeps serving;
//! - a guest that writes an oversized frame into the agent's port (`hutch-hostile`, a separate
//!   test binary run as root in the guest, not a hook in the agent): hutchd drops that
//!   connection, stays healthy and reconnects, and the VM is usable again.

mod common;
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// hutchd's resident memory may grow by at most this much during a flood.
const RSS_GROWTH_BOUND_KIB: u64 = 48 * 1024;

fn hutchd_pid(d: &Daemon) -> u32 {
    let needle = d.data().to_string_lossy().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        let exe = cmd.split('\0').next().unwrap_or("");
        if exe.ends_with("/hutchd") && cmd.contains(&needle) {
            return pid;
        }
    }
    panic!("hutchd not found");
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Sends a request and reads only the response head; the body is left unread.
fn start_request(d: &Daemon, method: &str, path: &str, ctype: &str, body: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(d.data().join("hutchd.sock")).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: hutchd\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Runs `hutch exec` with `stdin` written by a thread (errors ignored: the process may stop
/// reading); returns stdout, stderr, exit code and duration.
fn exec_with_stdin(d: &Daemon, args: &[&str], stdin: Vec<u8>) -> (String, String, i32, Duration) {
    let t0 = Instant::now();
    let mut c = Command::new(env!("CARGO_BIN_EXE_hutch"))
        .arg("--data-dir")
        .arg(d.data())
        .arg("exec")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = c.stdin.take().unwrap();
    let w = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let o = c.wait_with_output().unwrap();
    let _ = w.join();
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
        o.status.code().unwrap_or(-1),
        t0.elapsed(),
    )
}

/// A request whose body the server may refuse before reading it all: written from a thread,
/// write errors ignored; returns the status and the JSON error body.
fn refused_request(
    d: &Daemon,
    method: &str,
    path: &str,
    ctype: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut s = UnixStream::connect(d.data().join("hutchd.sock")).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: hutchd\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let t = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(&body);
    });
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    drop(s);
    let _ = t.join();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
    let head = String::from_utf8_lossy(&resp[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let v = serde_json::from_slice(&resp[(split + 4).min(resp.len())..]).unwrap_or(Value::Null);
    (status, v)
}

fn sh_in(d: &Daemon, script: &str) -> String {
    d.ok(&["exec", "hv", "--", "sh", "-c", script])
}

/// The hostile guest tool (a static bin of hutch-agent, like the agent).
fn hostile_tool() -> std::path::PathBuf {
    agent_bin("hutch-hostile")
}

#[test]
fn hostile_guest_and_clients() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let d = Daemon::start(&["--max-upload-mib", "1"]);
    d.ok(&["image", "import", layout.to_str().unwrap(), "--name", "bb"]);
    d.ok(&["new", "--image", "bb", "--name", "hv", "--mem", "256"]);
    let pid = hutchd_pid(&d);
    let base = rss_kib(pid);

    // 1. A guest floods stdout; the REST client never reads its response.
    let flood = r#"{"argv":["sh","-c","i=0; while :; do head -c 65536 /dev/zero; i=$((i+1)); echo $i > /tmp/n; done","floodmark"]}"#;
    let client = start_request(
        &d,
        "POST",
        "/api/v1/sandboxes/hv/exec",
        "application/json",
        flood.as_bytes(),
    );
    let mut peak = base;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Another exec in the same VM answers promptly meanwhile.
    let t1 = Instant::now();
    let n1: u64 = sh_in(&d, "cat /tmp/n").trim().parse().unwrap();
    let other = t1.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let n2: u64 = sh_in(&d, "cat /tmp/n").trim().parse().unwrap();
    peak = peak.max(rss_kib(pid));
    eprintln!(
        "flood: hutchd RSS {base} KiB -> peak {peak} KiB; guest wrote {} KiB then stalled; \
         other exec took {other:?}",
        n2 * 64
    );
    assert!(
        other < Duration::from_secs(10),
        "a second exec took {other:?} during the flood"
    );
    // The flood stalls in the guest: a few MiB in buffers at most, and no progress.
    assert!(
        n2 * 64 < 16 * 1024,
        "the guest wrote {} KiB unread",
        n2 * 64
    );
    assert_eq!(n1, n2, "the flood kept going while nobody read it");
    assert!(
        peak - base < RSS_GROWTH_BOUND_KIB,
        "hutchd grew by {} KiB during the flood",
        peak - base
    );
    // The client goes away: the flooding process is killed.
    drop(client);
    let gone = wait_until(Duration::from_secs(10), || {
        let o = sh_in(
            &d,
            "grep -l floodmar[k] /proc/[0-9]*/cmdline 2>/dev/null | wc -l",
        );
        (o.trim() == "0").then_some(())
    });
    assert!(gone.is_some(), "the flooding process outlived its client");

    // 2. A slow client reads /dev/zero through GET /files: bounded memory, zeros.
    let mut s = start_request(
        &d,
        "GET",
        "/api/v1/sandboxes/hv/files?path=/dev/zero",
        "application/json",
        b"",
    );
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let n = s.read(&mut buf).unwrap();
        // Chunked framing aside, the payload is zeros.
        got += buf[..n].iter().filter(|&&b| b == 0).count();
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(s);
    eprintln!("slow /dev/zero reader: {got} zero bytes; hutchd RSS peak {peak} KiB");
    assert!(got > 1 << 20, "only {got} bytes of /dev/zero arrived");
    assert!(peak - base < RSS_GROWTH_BOUND_KIB);
    // A bounded read returns exactly what was asked.
    let (st, b) = d
        .api_raw(
            "GET",
            "/api/v1/sandboxes/hv/files?path=/dev/zero&length=1000000",
            None,
            "application/json",
        )
        .unwrap();
    assert_eq!((st, b.len()), (200, 1_000_000));
    assert!(b.iter().all(|&x| x == 0));

    // 3. Stdin streams: 16 MiB through `hutch exec` to wc.
    let (so, se, code, _) = exec_with_stdin(&d, &["hv", "--", "wc", "-c"], vec![7u8; 16 << 20]);
    assert_eq!((so.trim(), code), ("16777216", 0), "{se}");
    // A process that never reads its stdin: the client's upload waits, the exec ends normally.
    let (_, se, code, took) = exec_with_stdin(&d, &["hv", "--", "sleep", "2"], vec![1u8; 64 << 20]);
    assert_eq!(code, 0, "{se}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    peak = peak.max(rss_kib(pid));
    assert!(peak - base < RSS_GROWTH_BOUND_KIB);

    // 4. Body limits: JSON over 1 MiB, uploads over --max-upload-mib 1.
    let big = format!(r#"{{"argv":["true"],"cwd":"{}"}}"#, "x".repeat(2 << 20));
    let (st, v) = refused_request(
        &d,
        "POST",
        "/api/v1/sandboxes/hv/exec",
        "application/json",
        big.into_bytes(),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    let (st, v) = refused_request(
        &d,
        "PUT",
        "/api/v1/sandboxes/hv/files?path=/root/big",
        "application/octet-stream",
        vec![0u8; (1 << 20) + 1],
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    let (st, _) = d
        .api_raw(
            "PUT",
            "/api/v1/sandboxes/hv/files?path=/root/ok",
            Some(&vec![5u8; 1 << 20]),
            "application/octet-stream",
        )
        .unwrap();
    assert_eq!(st, 200);
    assert_eq!(sh_in(&d, "wc -c < /root/ok").trim(), "1048576");

    // 5. A guest that never answers: QEMU stopped. Health fails after its bound with a clear
    // error; hutchd itself keeps answering.
    let qemu = d.qemu_pids();
    assert_eq!(qemu.len(), 1);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(qemu[0] as i32, libc::SIGSTOP) };
    let t0 = Instant::now();
    let (st, v) = d.api("GET", "/api/v1/sandboxes/hv/health", None).unwrap();
    let took = t0.elapsed();
    let (st2, _) = d.api("GET", "/api/v1/health", None).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(qemu[0] as i32, libc::SIGCONT) };
    let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
    assert_eq!(st, 409, "{v}");
    assert!(msg.contains("did not answer"), "{msg}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_eq!(st2, 200);
    assert_eq!(sh_in(&d, "echo back"), "back\n");

    // 6. An oversized frame from the guest: connection dropped, hutchd healthy, reconnected.
    let tool = std::fs::read(hostile_tool()).unwrap();
    let (st, _) = d
        .api_raw(
            "PUT",
            "/api/v1/sandboxes/hv/files?path=/root/hostile&mode=755",
            Some(&tool[..tool.len().min(1 << 20)]),
            "application/octet-stream",
        )
        .unwrap();
    if tool.len() > 1 << 20 {
        // Over this daemon's upload limit: send it in pieces.
        for (i, part) in tool.chunks(512 << 10).enumerate() {
            let p = format!("/root/part{i:02}");
            let (st, _) = d
                .api_raw(
                    "PUT",
                    &format!("/api/v1/sandboxes/hv/files?path={p}"),
                    Some(part),
                    "application/octet-stream",
                )
                .unwrap();
            assert_eq!(st, 200);
        }
        sh_in(
            &d,
            "cat /root/part* > /root/hostile && chmod 755 /root/hostile",
        );
    } else {
        assert_eq!(st, 200);
    }
    let o = d.hutch(&["exec", "hv", "--", "/root/hostile", "oversize"]);
    eprintln!(
        "hostile exec: {:?} {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "the hostile stream survived");
    let back = wait_until(Duration::from_secs(30), || {
        let o = d.hutch(&["exec", "hv", "--", "echo", "again"]);
        (o.status.success() && o.stdout == b"again\n").then_some(())
    });
    assert!(back.is_some(), "no reconnection: {}", d.log());
    assert!(
        d.log().contains("broke the protocol"),
        "no protocol violation logged"
    );
    assert_eq!(d.api("GET", "/api/v1/health", None).unwrap().0, 200);
    let rss = rss_kib(pid);
    eprintln!("after all: hutchd RSS {rss} KiB (start {base} KiB, peak {peak} KiB)");
    assert!(rss.saturating_sub(base) < RSS_GROWTH_BOUND_KIB);
}
