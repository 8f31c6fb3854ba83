//! The SSH front door with the real OpenSSH client: keys are identities, control commands,
//! `ssh VM@host` with exit codes, stdout/stderr, stdin pipes and a PTY, isolation between
//! accounts, unknown keys refused, a stopped VM explained. One VM boot.

mod common;
use common::ssh_client::*;
use common::*;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Output, Stdio};

#[test]
fn ssh_front_door() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let admin = keygen(w, "admin", &["-t", "ed25519"]);
    let alice = keygen(w, "alice", &["-t", "ecdsa"]);
    let alice2 = keygen(w, "alice2", &["-t", "rsa", "-b", "2048"]);
    let bob = keygen(w, "bob", &["-t", "ed25519"]);
    let stranger = keygen(w, "stranger", &["-t", "ed25519"]);
    let weak = keygen(w, "weak", &["-t", "rsa", "-b", "1024"]);
    let port = free_port();
    let layout = busybox_layout(w);
    let api_port = free_port();
    let api_addr = format!("127.0.0.1:{api_port}");
    let d = Daemon::start(&[
        "--listen",
        &api_addr,
        "--ssh-listen",
        &format!("127.0.0.1:{port}"),
        "--admin-keys",
        &format!("{}.pub", admin.display()),
        "--ssh-host-name",
        "hutch.test",
        "--ssh-max-auth-failures",
        "5",
        "--ssh-auth-timeout",
        "2",
    ]);
    d.import_busybox(&layout);
    let s = Ssh { port };
    let pubkey = |k: &Path| std::fs::read(format!("{}.pub", k.display())).unwrap();

    // Unknown keys are refused; admins add users.
    assert_eq!(
        s.run(&stranger, "x", &["ls"], None, false).status.code(),
        Some(255)
    );
    let (so, _, code) = text(&s.run(&admin, "admin", &["whoami"], None, false));
    assert_eq!(code, 0);
    assert!(so.starts_with("admin (admin)\nkey SHA256:"), "{so}");
    for (name, key) in [("alice", &alice), ("bob", &bob)] {
        let (so, se, code) = text(&s.run(
            &admin,
            "admin",
            &["adduser", name],
            Some(&pubkey(key)),
            false,
        ));
        assert_eq!(code, 0, "{so}{se}");
    }
    let (_, se, code) = text(&s.run(
        &bob,
        "bob",
        &["adduser", "eve"],
        Some(&pubkey(&stranger)),
        false,
    ));
    assert_eq!(code, 1);
    assert!(se.contains("only admins"), "{se}");
    let (_, se, _) = text(&s.run(
        &alice,
        "alice",
        &["keys", "add"],
        Some(&pubkey(&weak)),
        false,
    ));
    assert!(se.contains("at least 2048 bits"), "{se}");
    s.run(
        &alice,
        "alice",
        &["keys", "add"],
        Some(&pubkey(&alice2)),
        false,
    );
    let (so, _, _) = text(&s.run(&alice2, "alice", &["whoami"], None, false));
    assert!(so.starts_with("alice\n"), "{so}");

    // Create, list, describe: boxcutter's shape.
    let (so, se, code) = text(&s.run(
        &alice,
        "alice",
        &[
            "new", "--name", "web", "--image", "busybox", "--vcpu", "1", "--mem", "256",
        ],
        None,
        false,
    ));
    assert_eq!(code, 0, "{se}");
    assert!(
        so.contains("Name:    web") && so.contains("Status:  running"),
        "{so}"
    );
    assert!(
        so.contains(&format!("Connect: ssh -p {port} web@hutch.test")),
        "{so}"
    );
    let (so, _, _) = text(&s.run(&alice, "alice", &["ls"], None, false));
    assert!(so.contains("web") && so.contains("running"), "{so}");
    // Isolation: bob neither sees nor enters alice's VM; the admin sees it.
    let (so, se, code) = text(&s.run(&bob, "bob", &["ls"], None, false));
    assert_eq!(code, 0, "{se}");
    assert!(so.starts_with("NAME") && !so.contains("web"), "{so}");
    for cmd in [
        vec!["describe", "web"],
        vec!["rm", "web"],
        vec!["stop", "web"],
    ] {
        let (_, se, code) = text(&s.run(&bob, "bob", &cmd, None, false));
        assert_eq!((code, se.trim()), (1, "web: no such VM"));
    }
    // "web" is no VM of bob's, so `hostname` is taken as a control command, which does not
    // exist: bob never lands in alice's VM, and is not told that it exists.
    let (so, se, code) = text(&s.run(&bob, "web", &["hostname"], None, false));
    assert_eq!((so.as_str(), code), ("", 1), "{se}");
    assert!(se.contains("unknown command"), "{se}");
    let (so, _, _) = text(&s.run(&bob, "alice/web", &["hostname"], None, false));
    assert_eq!(
        so, "",
        "bob cannot name alice's VM by its qualified name either"
    );
    let (so, _, _) = text(&s.run(&admin, "admin", &["ls"], None, false));
    assert!(so.contains("alice/web"), "{so}");
    let (so, _, code) = text(&s.run(&admin, "alice/web", &["hostname"], None, false));
    assert_eq!(
        (so.as_str(), code),
        ("web\n", 0),
        "the admin reaches it as alice/web"
    );

    // In the VM: exit status, separate stdout/stderr, stdin pipes, a PTY.
    let (so, se, code) = text(&s.run(
        &alice,
        "web",
        &["echo out; echo err >&2; hostname; exit 7"],
        None,
        false,
    ));
    assert_eq!((so.as_str(), se.as_str(), code), ("out\nweb\n", "err\n", 7));
    let data: Vec<u8> = (0..(2 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (so, _, code) = text(&s.run(&alice, "web", &["sha256sum"], Some(&data), false));
    assert_eq!(code, 0);
    assert_eq!(
        so.split_whitespace().next().unwrap(),
        hex::encode(Sha256::digest(&data))
    );
    let (so, _, code) = text(&s.run(&alice, "web", &["tty; echo $TERM"], None, true));
    assert_eq!(code, 0);
    assert!(so.starts_with("/dev/pts/"), "{so:?}");
    // An interactive login shell on a PTY: typed commands run, `exit 3` ends the session with 3.
    let typed = b"echo from-shell-$((6*7))\nexit 3\n";
    let (so, _, code) = text(&s.run(&alice, "web", &[], Some(typed), true));
    assert!(so.contains("from-shell-42"), "{so:?}");
    assert_eq!(code, 3);
    // scp (SFTP) into and out of the VM: a 10 MB file, checksummed, and a directory tree.
    let big: Vec<u8> = (0..10 << 20)
        .map(|i: u32| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect();
    std::fs::write(w.join("big.bin"), &big).unwrap();
    std::fs::create_dir_all(w.join("tree/sub")).unwrap();
    std::fs::write(w.join("tree/sub/f"), b"leaf").unwrap();
    let scp = |args: &[&str]| {
        let o = client("scp", port, &alice).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "scp {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    scp(&[w.join("big.bin").to_str().unwrap(), "web@127.0.0.1:/root/"]);
    let (so, _, _) = text(&s.run(&alice, "web", &["sha256sum /root/big.bin"], None, false));
    assert_eq!(
        so.split_whitespace().next().unwrap(),
        hex::encode(Sha256::digest(&big))
    );
    scp(&[
        "web@127.0.0.1:/root/big.bin",
        w.join("back.bin").to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(w.join("back.bin")).unwrap(), big);
    scp(&[
        "-r",
        w.join("tree").to_str().unwrap(),
        "web@127.0.0.1:/tmp/",
    ]);
    scp(&[
        w.join("tree/sub/f").to_str().unwrap(),
        "web@127.0.0.1:/root/new-name",
    ]);
    let (so, _, _) = text(&s.run(
        &alice,
        "web",
        &["cat /tmp/tree/sub/f /root/new-name"],
        None,
        false,
    ));
    assert_eq!(so, "leafleaf");
    // sftp lists what is there; bob has no SFTP into alice's VM.
    let sftp = |key: &Path, user: &str, script: &str| {
        let mut c = client("sftp", port, key)
            .args(["-b", "-"])
            .arg(format!("{user}@127.0.0.1"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), script.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let o = sftp(&alice, "web", "ls /root\n");
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("big.bin"),
        "{o:?}"
    );
    // For bob, "web" is no VM: no SFTP subsystem for him there.
    let o = sftp(&bob, "web", "ls /root\n");
    assert!(!o.status.success(), "{o:?}");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("big.bin"),
        "{o:?}"
    );

    // Ctrl-C typed on the PTY interrupts the guest's foreground process (SIGINT: 128+2).
    let mut c = client("ssh", port, &alice)
        .arg("-tt")
        .args(["web@127.0.0.1", "sleep 60; echo not-interrupted"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let t = std::time::Instant::now();
    std::io::Write::write_all(&mut stdin, &[3]).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("not-interrupted"));
    assert_eq!(o.status.code(), Some(130), "{o:?}");

    // Window-size changes reach the guest's terminal (a real local PTY drives ssh).
    let o = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/winch.py"))
        .args([&port.to_string(), alice.to_str().unwrap(), "web@127.0.0.1"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("SIZE 40 100") && out.contains("SIZE 33 77"),
        "{out}"
    );

    // Many channels on one connection (OpenSSH multiplexing): concurrent sessions in the VM run
    // side by side up to the cap of 16; the rest are refused; the server goes on serving.
    let ctl = w.join("ctl.sock");
    let muxed = || {
        let mut c = client("ssh", port, &alice);
        c.arg("-S").arg(&ctl);
        c
    };
    let mut master = muxed().args(["-M", "-N", "web@127.0.0.1"]).spawn().unwrap();
    wait_until(std::time::Duration::from_secs(20), || {
        ctl.exists().then_some(())
    })
    .unwrap();
    let outs: Vec<Output> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..20)
            .map(|_| {
                sc.spawn(|| {
                    muxed()
                        .args(["web@127.0.0.1", "sleep 3; echo ok"])
                        .stdin(Stdio::null())
                        .output()
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Past 16 channels the connection refuses more (OpenSSH then falls back to connections of
    // their own, so every session still runs).
    assert!(outs
        .iter()
        .all(|o| o.status.success() && o.stdout == b"ok\n"));
    assert!(
        d.log()
            .contains("ssh channel refused: 16 open on one connection"),
        "{}",
        d.log()
    );
    let _ = master.kill();
    let _ = master.wait();
    let (so, _, _) = text(&s.run(&alice, "web", &["echo still-serving"], None, false));
    assert_eq!(so, "still-serving\n");

    // Bad input does not hurt the server.
    let (_, se, code) = text(&s.run(
        &alice,
        "alice",
        &["new", "--vcpu", "x", "--image", "busybox"],
        None,
        false,
    ));
    assert_eq!(code, 1);
    assert!(se.contains("not a number"), "{se}");
    let (_, se, _) = text(&s.run(&alice, "alice", &["frobnicate"], None, false));
    assert!(se.contains("unknown command"), "{se}");

    // API tokens issued over SSH act for the account on the REST API, until revoked.
    let tok = |key: &Path, user: &str| -> serde_json::Value {
        let (so, se, code) = text(&s.run(
            key,
            user,
            &["token", "create", "--ttl", "1", "--json"],
            None,
            false,
        ));
        assert_eq!(code, 0, "{se}");
        serde_json::from_str(&so).unwrap()
    };
    let get = |path: &str, token: &str| {
        let mut c = std::net::TcpStream::connect(&api_addr).unwrap();
        let (st, body) = http(&mut c, "GET", path, None, "application/json", Some(token)).unwrap();
        (
            st,
            serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
        )
    };
    let at = tok(&alice, "alice");
    let bt = tok(&bob, "bob");
    let (st, v) = get("/api/v1/sandboxes", at["token"].as_str().unwrap());
    assert_eq!(st, 200);
    assert_eq!(v[0]["name"], "web");
    assert_eq!(v[0]["owner"], "alice");
    let (st, v) = get("/api/v1/sandboxes", bt["token"].as_str().unwrap());
    assert_eq!((st, v), (200, serde_json::json!([])));
    let (st, v) = get("/api/v1/sandboxes/web", bt["token"].as_str().unwrap());
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("not_found")));
    let mut c = std::net::TcpStream::connect(&api_addr).unwrap();
    let (st, _) = http(
        &mut c,
        "DELETE",
        "/api/v1/images/busybox",
        None,
        "application/json",
        bt["token"].as_str(),
    )
    .unwrap();
    assert_eq!(st, 403);
    let (st, _) = get("/api/v1/sandboxes", "not.a.token");
    assert_eq!(st, 401);
    let (so, _, _) = text(&s.run(&alice, "alice", &["token", "ls"], None, false));
    assert!(so.contains(at["id"].as_str().unwrap()), "{so}");
    let (_, _, code) = text(&s.run(
        &bob,
        "bob",
        &["token", "rm", at["id"].as_str().unwrap()],
        None,
        false,
    ));
    assert_eq!(code, 1, "bob cannot revoke alice's token");
    let (_, _, code) = text(&s.run(
        &alice,
        "alice",
        &["token", "rm", at["id"].as_str().unwrap()],
        None,
        false,
    ));
    assert_eq!(code, 0);
    let (st, _) = get("/api/v1/sandboxes", at["token"].as_str().unwrap());
    assert_eq!(st, 401, "a revoked token stops working");

    // cp copies a stopped VM's disk into a new VM.
    let (_, se, code) = text(&s.run(&alice, "alice", &["cp", "web", "web2"], None, false));
    assert_eq!(code, 1);
    assert!(se.contains("stop it first"), "{se}");
    // A stopped VM says how to start it.
    s.run(&alice, "alice", &["stop", "web"], None, false);
    let (so, se, code) = text(&s.run(&alice, "alice", &["cp", "web", "web2"], None, false));
    assert_eq!(code, 0, "{se}");
    assert!(so.contains("Name:    web2"), "{so}");
    let (so, _, _) = text(&s.run(&alice, "web2", &["sha256sum /root/big.bin"], None, false));
    assert_eq!(
        so.split_whitespace().next().unwrap_or(""),
        hex::encode(Sha256::digest(&big))
    );
    let (so, se, code) = text(&s.run(&bob, "bob", &["ls"], None, false));
    assert_eq!(code, 0, "{se}");
    assert!(
        so.starts_with("NAME") && !so.contains("web2"),
        "the copy belongs to alice: {so}"
    );
    s.run(&alice, "alice", &["rm", "web2"], None, false);
    let (_, se, code) = text(&s.run(&alice, "web", &["true"], None, false));
    assert_eq!(code, 1);
    assert_eq!(
        se.trim(),
        format!("web is stopped; run: ssh -p {port} hutch.test start web")
    );
    let (_, _, code) = text(&s.run(&alice, "alice", &["rm", "web"], None, false));
    assert_eq!(code, 0);
    assert!(d.qemu_pids().is_empty());
    assert_eq!(d.json(&["ls"]), serde_json::json!([]));

    // A connection that does not log in is cut off after the deadline.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    std::io::Write::write_all(&mut raw, b"SSH-2.0-hutch-test\r\n").unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    while std::io::Read::read(&mut raw, &mut buf)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "not cut off: {:?}",
        t.elapsed()
    );
    // Repeated unknown keys lock the address out, even for a known key afterwards.
    for _ in 0..5 {
        assert_eq!(
            s.run(&stranger, "x", &["ls"], None, false).status.code(),
            Some(255)
        );
    }
    assert_eq!(
        s.run(&admin, "admin", &["whoami"], None, false)
            .status
            .code(),
        Some(255)
    );
}
