//! A directory watch in a real guest: QEMU, the guest kernel's inotify, the real agent, and
//! hutchd's agent client (`Agent::watch`). hutchd has no endpoint for watches yet, so the test
//! boots a VM with a real hutchd, stops hutchd with SIGKILL (its VMs outlive it) and connects
//! its own `AgentClient` to the VM's agent socket, as hutchd would. One VM boot:
//! - a recursive watch reports a file's create, write, chmod, rename and remove, in order, and
//!   the changes of a directory tree made after the watch began;
//! - refusals carry the agent's codes (not found, not a directory);
//! - removing the watched directory ends its watch with not_found;
//! - the agent (PID 1) holds one inotify fd per watch, and closes it when the host drops the
//!   stream.

mod common;
use common::*;
use hutch_daemon::agent::{
    within, Agent, AgentClient, AgentError, ErrorCode, ExecEvent, ExecRequest, FsEvent,
    FsEventKind, WatchStream,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// The agent socket of the only VM under `data`.
fn agent_socket(data: &Path) -> PathBuf {
    fn find(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                find(&p, out);
            } else if e.file_name() == "agent.sock" {
                out.push(p);
            }
        }
    }
    let mut found = Vec::new();
    find(data, &mut found);
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// Runs `script` with the guest's sh; its stdout (it must exit 0).
async fn sh_in(a: &dyn Agent, script: &str) -> String {
    let req = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: [("PATH".to_string(), "/bin".to_string())].into(),
        ..Default::default()
    };
    let mut s = a.exec(req).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match within(T, s.next()).await.unwrap() {
            Some(ExecEvent::Stdout(b)) => out.extend_from_slice(&b),
            Some(ExecEvent::Stderr(b)) => err.extend_from_slice(&b),
            Some(ExecEvent::Exited { code, .. }) => {
                let err = String::from_utf8_lossy(&err);
                assert_eq!(code, Some(0), "{script}: {err}");
                return String::from_utf8(out).unwrap();
            }
            Some(ExecEvent::Started { .. }) => {}
            None => panic!("{script}: no exit"),
        }
    }
}

/// inotify fds the agent (PID 1) holds.
async fn agent_inotify_fds(a: &dyn Agent) -> usize {
    let out = sh_in(a, "ls -l /proc/1/fd | grep -c inotify || true").await;
    out.trim().parse().unwrap()
}

/// Events of `w` until one is `name` of `kind`.
async fn until(w: &mut WatchStream, name: &str, kind: FsEventKind) -> Vec<(String, FsEventKind)> {
    let mut got = Vec::new();
    loop {
        let e = within(T, w.next()).await.unwrap();
        let Some(FsEvent { name: n, kind: k }) = e else {
            panic!("the watch ended; got {got:?}")
        };
        got.push((n.clone(), k));
        if n == name && k == kind {
            return got;
        }
    }
}

fn ev(name: &str, kind: FsEventKind) -> (String, FsEventKind) {
    (name.to_string(), kind)
}

#[test]
fn a_watch_in_a_real_guest() {
    use FsEventKind::*;
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let mut d = Daemon::start(&["--network", "off"]);
    d.import_busybox(&layout);
    d.ok(&["new", "--image", "busybox", "--name", "watched"]);
    d.kill9();
    let sock = agent_socket(d.data());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (c, _) = AgentClient::connect(&sock, T).await.unwrap();
        let a: &dyn Agent = &*c;
        within(T, a.mkdir("/root/w", 0o755)).await.unwrap();
        assert_eq!(agent_inotify_fds(a).await, 0);
        let mut w = within(T, a.watch("/root/w", true)).await.unwrap();
        assert_eq!(agent_inotify_fds(a).await, 1);

        // One file's life: each step waits for its event, so the order is the guest's.
        sh_in(a, "echo hi > /root/w/a").await;
        let mut got = until(&mut w, "a", Write).await;
        within(T, a.chmod("/root/w/a", 0o600)).await.unwrap();
        got.extend(until(&mut w, "a", Chmod).await);
        within(T, a.rename("/root/w/a", "/root/w/b")).await.unwrap();
        got.extend(until(&mut w, "b", Create).await);
        within(T, a.remove("/root/w/b")).await.unwrap();
        got.extend(until(&mut w, "b", Remove).await);
        assert_eq!(
            got,
            vec![
                ev("a", Create),
                ev("a", Write),
                ev("a", Chmod),
                ev("a", Rename),
                ev("b", Create),
                ev("b", Remove)
            ]
        );

        // A tree made at once: every level is reported, and watched from then on.
        sh_in(
            a,
            "mkdir -p /root/w/sub/deep && echo x > /root/w/sub/deep/f",
        )
        .await;
        let got = until(&mut w, "sub/deep/f", Create).await;
        for want in [ev("sub", Create), ev("sub/deep", Create)] {
            assert!(got.contains(&want), "{want:?} missing from {got:?}");
        }
        sh_in(a, "echo more >> /root/w/sub/deep/f").await;
        until(&mut w, "sub/deep/f", Write).await;

        // Refusals.
        let code = |r: Result<WatchStream, AgentError>| r.err().and_then(|e| e.code());
        let r = within(T, a.watch("/root/nope", false)).await;
        assert_eq!(code(r), Some(ErrorCode::NotFound));
        let r = within(T, a.watch("/etc/passwd", false)).await;
        assert_eq!(code(r), Some(ErrorCode::NotADirectory));

        // The watched directory removed: its watch ends.
        within(T, a.mkdir("/root/gone", 0o755)).await.unwrap();
        let mut g = within(T, a.watch("/root/gone", false)).await.unwrap();
        within(T, a.rmdir("/root/gone")).await.unwrap();
        let e = within(T, g.next()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");

        // Dropping the stream cancels the watch: the agent closes its inotify fd.
        drop(w);
        let mut left = usize::MAX;
        for _ in 0..50 {
            left = agent_inotify_fds(a).await;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, 0, "the agent still holds an inotify fd");
    });
}
