//! The fake agent behaves like the real one on the basic operations, through the same typed
//! streams: files written and read back (whole, at offsets, with the agent's error codes),
//! directory paging, the fs operations, exec events in order with stdin, signals and timeouts,
//! health, shutdown, restored and watch.

use super::fake::{FakeAgent, FakeExit, FakeInput};
use super::*;

const T: Duration = Duration::from_secs(5);

async fn read_all(
    a: &dyn Agent,
    path: &str,
    offset: u64,
    len: Option<u64>,
) -> Result<Vec<u8>, AgentError> {
    let mut r = a.read_file(path, offset, len)?;
    let mut out = Vec::new();
    while let Some(b) = within(T, r.next()).await? {
        out.extend_from_slice(&b);
    }
    Ok(out)
}

async fn write_all(
    a: &dyn Agent,
    path: &str,
    offset: Option<u64>,
    data: &[u8],
) -> Result<u64, AgentError> {
    let mut w = a.write_file(path, Some(0o600), offset)?;
    for c in data.chunks(3) {
        within(T, w.write(c)).await?;
    }
    within(T, w.finish()).await
}

/// Runs `req` to its end: (events other than the exit, the exit).
async fn run(a: &dyn Agent, req: ExecRequest, stdin: &[u8]) -> (Vec<ExecEvent>, ExecEvent) {
    let mut s = a.exec(req).unwrap();
    let h = s.handle();
    h.stdin(stdin).await.unwrap();
    h.eof().await.unwrap();
    let mut events = Vec::new();
    loop {
        match within(T, s.next()).await.unwrap().unwrap() {
            e @ ExecEvent::Exited { .. } => return (events, e),
            e => events.push(e),
        }
    }
}

fn argv(a: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: a.iter().map(|s| s.to_string()).collect(),
        stdin: true,
        ..Default::default()
    }
}

fn exited(code: i32) -> ExecEvent {
    ExecEvent::Exited {
        code: Some(code),
        signal: None,
        timed_out: false,
    }
}

#[tokio::test]
async fn files_round_trip_with_offsets_and_codes() {
    let a = FakeAgent::new();
    let a: &dyn Agent = &a;
    assert_eq!(
        write_all(a, "/root/d/f", None, b"hello world")
            .await
            .unwrap(),
        11
    );
    assert_eq!(
        read_all(a, "/root/d/f", 0, None).await.unwrap(),
        b"hello world"
    );
    assert_eq!(read_all(a, "/root/d/f", 6, Some(3)).await.unwrap(), b"wor");
    assert_eq!(read_all(a, "/root/d/f", 99, None).await.unwrap(), b"");
    // In place at an offset, past the end: a hole of zeros.
    write_all(a, "/root/d/f", Some(13), b"!").await.unwrap();
    assert_eq!(
        read_all(a, "/root/d/f", 0, None).await.unwrap(),
        b"hello world\0\0!"
    );
    let st = within(T, a.stat("/root/d/f", true)).await.unwrap();
    assert_eq!((st.size, st.mode), (14, 0o100600));
    // The errors the real agent gives, with its codes.
    let code = |r: Result<Vec<u8>, AgentError>| r.unwrap_err().code();
    assert_eq!(
        code(read_all(a, "/nope", 0, None).await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(read_all(a, "/root", 0, None).await),
        Some(ErrorCode::IsDirectory)
    );
    let e = write_all(a, "/no/such/dir/f", Some(0), b"x")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    let e = write_all(a, "/root/d", None, b"x").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::IsDirectory), "{e}");
}

#[tokio::test]
async fn fs_operations_and_directory_paging() {
    let a = FakeAgent::new();
    let a: &dyn Agent = &a;
    within(T, a.mkdir("/root/big", 0o750)).await.unwrap();
    let e = within(T, a.mkdir("/root/big", 0o750)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Exists));
    let e = within(T, a.mkdir("/none/x", 0o750)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    let n = hutch_proto::DIR_PAGE * 2 + 5;
    for i in 0..n {
        write_all(a, &format!("/root/big/{i:04}"), None, b"x")
            .await
            .unwrap();
    }
    let (mut names, mut skip, mut pages) = (Vec::new(), 0, 0);
    loop {
        let p = within(T, a.read_dir("/root/big", skip)).await.unwrap();
        assert!(p.entries.len() <= hutch_proto::DIR_PAGE);
        names.extend(p.entries.into_iter().map(|e| e.name));
        pages += 1;
        if !p.more {
            break;
        }
        skip = p.next;
    }
    assert_eq!((names.len(), pages), (n, 3));
    assert_eq!(names[0], "0000");
    let e = within(T, a.rmdir("/root/big")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotEmpty));
    let e = within(T, a.remove("/root/big")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::IsDirectory));
    within(T, a.rename("/root/big", "/tmp/moved"))
        .await
        .unwrap();
    assert!(within(T, a.stat("/tmp/moved/0003", true)).await.is_ok());
    within(T, a.remove("/tmp/moved/0003")).await.unwrap();
    let e = within(T, a.stat("/tmp/moved/0003", false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    // Symlinks: readlink gives the target, stat follows, lstat does not, realpath resolves.
    within(T, a.symlink("moved/0004", "/tmp/link"))
        .await
        .unwrap();
    assert_eq!(
        within(T, a.readlink("/tmp/link")).await.unwrap(),
        "moved/0004"
    );
    assert_eq!(
        within(T, a.stat("/tmp/link", true)).await.unwrap().mode,
        0o100600
    );
    assert_eq!(
        within(T, a.stat("/tmp/link", false)).await.unwrap().mode,
        0o120777
    );
    let real = within(T, a.realpath("/root/../tmp/./link")).await.unwrap();
    assert_eq!(real, "/tmp/moved/0004");
    within(T, a.chmod("/tmp/link", 0o400)).await.unwrap();
    assert_eq!(
        within(T, a.stat("/tmp/moved/0004", true))
            .await
            .unwrap()
            .mode,
        0o100400
    );
    let e = within(T, a.stat("/etc/pass\0wd", true)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument));
}

#[tokio::test]
async fn exec_builtins_stdin_exit_codes_and_refusals() {
    let fake = FakeAgent::new();
    let a: &dyn Agent = &fake;
    let (ev, exit) = run(a, argv(&["echo", "hi", "there"]), b"").await;
    assert!(matches!(ev[0], ExecEvent::Started { .. }));
    assert_eq!(ev[1..], [ExecEvent::Stdout("hi there\n".into())]);
    assert_eq!(exit, exited(0));
    let (ev, exit) = run(a, argv(&["cat"]), b"piped").await;
    assert_eq!(ev[1..], [ExecEvent::Stdout("piped".into())]);
    assert_eq!(exit, exited(0));
    assert_eq!(run(a, argv(&["false"]), b"").await.1, exited(1));
    let (ev, exit) = run(a, argv(&["nonesuch"]), b"").await;
    assert!(matches!(&ev[1], ExecEvent::Stderr(b) if b.starts_with(b"hutch: cannot run")));
    assert_eq!(exit, exited(127));
    // An empty argv is refused, as by the agent.
    let mut s = a.exec(argv(&[])).unwrap();
    let e = s.next().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
    assert_eq!(fake.execs().len(), 5);
}

#[tokio::test]
async fn exec_signals_timeouts_and_scripts() {
    let fake = FakeAgent::new();
    let a: &dyn Agent = &fake;
    let mut s = a.exec(argv(&["sleep", "1000"])).unwrap();
    assert!(matches!(
        s.next().await.unwrap(),
        Some(ExecEvent::Started { .. })
    ));
    assert_eq!(within(T, a.health()).await.unwrap().processes, 1);
    s.handle().signal(15).unwrap();
    let e = within(T, s.next()).await.unwrap().unwrap();
    assert_eq!(
        e,
        ExecEvent::Exited {
            code: None,
            signal: Some(15),
            timed_out: false
        }
    );
    // A stream given up on: the process sees its input end (the builtin sleep is killed).
    let mut s = a.exec(argv(&["sleep", "1000"])).unwrap();
    assert!(matches!(
        s.next().await.unwrap(),
        Some(ExecEvent::Started { .. })
    ));
    let h = s.handle();
    s.cancel();
    assert!(matches!(h.stdin(b"x").await, Err(AgentError::Closed)));
    for _ in 0..100 {
        if fake.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.running(), 0);
    let req = ExecRequest {
        timeout_ms: Some(50),
        ..argv(&["sleep", "1000"])
    };
    let (_, exit) = run(a, req, b"").await;
    assert_eq!(
        exit,
        ExecEvent::Exited {
            code: None,
            signal: Some(9),
            timed_out: true
        }
    );
    // A script of one's own: output interleaved with input, a resize seen.
    let fake = FakeAgent::new().with_exec(|req, mut p| async move {
        p.stdout(req.argv.join(","));
        let mut seen = Vec::new();
        while let Some(i) = p.input().await {
            match i {
                FakeInput::Eof => break,
                i => seen.push(format!("{i:?}")),
            }
        }
        p.stderr(seen.join(";"));
        FakeExit::Code(7)
    });
    let mut s = fake.exec(argv(&["a", "b"])).unwrap();
    let h = s.handle();
    h.resize(TtySize { rows: 1, cols: 2 }).unwrap();
    h.stdin(b"x").await.unwrap();
    h.eof().await.unwrap();
    let mut got = Vec::new();
    while let Some(e) = within(T, s.next()).await.unwrap() {
        got.push(e);
    }
    assert_eq!(got[1], ExecEvent::Stdout("a,b".into()));
    assert_eq!(
        got[2],
        ExecEvent::Stderr("Resize(TtySize { rows: 1, cols: 2 });Stdin(b\"x\")".into())
    );
    assert_eq!(got[3], exited(7));
    // Input after the exit is refused like on a real stream.
    assert!(matches!(h.stdin(b"late").await, Err(AgentError::Closed)));
}

#[tokio::test]
async fn health_export_and_shutdown() {
    let fake = FakeAgent::new();
    fake.set_layer(vec![7u8; 100_000]);
    let a: &dyn Agent = &fake;
    let h = within(T, a.health()).await.unwrap();
    assert!(h.ready);
    let mut r = a.export_changes().unwrap();
    let mut n = 0;
    while let Some(b) = within(T, r.next()).await.unwrap() {
        n += b.len();
    }
    assert_eq!(n, 100_000);
    within(T, a.shutdown()).await.unwrap();
    assert!(matches!(within(T, a.health()).await, Err(AgentError::Lost)));
    assert!(matches!(a.exec(argv(&["true"])), Err(AgentError::Lost)));
    fake.set_lost(false);
    assert!(within(T, a.health()).await.is_ok());
}

#[tokio::test]
async fn restored_is_checked_kept_and_renames_the_fake() {
    let a = FakeAgent::new();
    a.put_file("/etc/hostname", b"fake\n").unwrap();
    // The same VM resuming: nothing about it changes.
    let plain = RestoreInfo::now(&[1; 8], None);
    within(T, a.restored(plain.clone())).await.unwrap();
    assert_eq!(a.last_restore(), Some(plain));
    assert_eq!(a.hostname(), "fake");
    // A copy: new name and machine id.
    let copy = RestoreInfo::now(
        &[2; 8],
        Some(Identity {
            hostname: "copy".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            net: Some(NetIdentity {
                ip: "10.0.0.9".parse().unwrap(),
                gw: "10.0.0.1".parse().unwrap(),
                dns: "10.0.0.1".parse().unwrap(),
                domain: "hutch.internal".into(),
                mtu: Some(1500),
                mac: "02:68:0a:00:00:09".into(),
            }),
        }),
    );
    within(T, a.restored(copy.clone())).await.unwrap();
    assert_eq!(a.last_restore(), Some(copy.clone()));
    assert_eq!(a.hostname(), "copy");
    assert_eq!(a.file("/etc/hostname").unwrap(), b"copy\n");
    assert_eq!(
        a.file("/etc/machine-id").unwrap(),
        b"0123456789abcdef0123456789abcdef\n"
    );
    // Refused like the agent refuses it, and not kept.
    let mut bad = copy;
    bad.identity.as_mut().unwrap().hostname = "Bad_Name".into();
    let e = within(T, a.restored(bad)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    assert_eq!((a.restores(), a.hostname().as_str()), (2, "copy"));
    a.set_lost(true);
    let e = within(T, a.restored(RestoreInfo::now(&[3], None))).await;
    assert!(matches!(e, Err(AgentError::Lost)));
}

#[tokio::test]
async fn watch_reports_the_fakes_own_changes() {
    use FsEventKind::*;
    let fake = FakeAgent::new();
    let a: &dyn Agent = &fake;
    let ev = |name: &str, kind| FsEvent {
        name: name.into(),
        kind,
    };
    let code = |r: Result<WatchStream, AgentError>| r.err().and_then(|e| e.code());
    assert_eq!(
        code(within(T, a.watch("/nope", false)).await),
        Some(ErrorCode::NotFound)
    );
    fake.put_file("/root/f", b"x").unwrap();
    assert_eq!(
        code(within(T, a.watch("/root/f", false)).await),
        Some(ErrorCode::NotADirectory)
    );
    let mut flat = within(T, a.watch("/root", false)).await.unwrap();
    let mut deep = within(T, a.watch("/root/", true)).await.unwrap();
    write_all(a, "/root/d/g", None, b"hi").await.unwrap();
    within(T, a.chmod("/root/f", 0o600)).await.unwrap();
    within(T, a.rename("/root/f", "/root/h")).await.unwrap();
    within(T, a.remove("/root/h")).await.unwrap();
    let flat_want = [
        ev("d", Create),
        ev("f", Chmod),
        ev("f", Rename),
        ev("h", Create),
        ev("h", Remove),
    ];
    for want in flat_want.iter().cloned() {
        assert_eq!(within(T, flat.next()).await.unwrap(), Some(want));
    }
    let deep_want = [ev("d", Create), ev("d/g", Create), ev("d/g", Write)];
    for want in deep_want.into_iter().chain(flat_want.into_iter().skip(1)) {
        assert_eq!(within(T, deep.next()).await.unwrap(), Some(want));
    }
    // Removing the watched directory ends its watch.
    within(T, a.mkdir("/tmp/w", 0o755)).await.unwrap();
    let mut w = within(T, a.watch("/tmp/w", false)).await.unwrap();
    within(T, a.rmdir("/tmp/w")).await.unwrap();
    let e = within(T, w.next()).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    assert_eq!(w.next().await.unwrap(), None);
    // Dropped watches are forgotten; at most MAX_WATCH_STREAMS at once.
    drop((flat, deep));
    let mut held = Vec::new();
    for _ in 0..hutch_proto::watch::MAX_WATCH_STREAMS {
        held.push(within(T, a.watch("/tmp", false)).await.unwrap());
    }
    assert_eq!(
        code(within(T, a.watch("/tmp", false)).await),
        Some(ErrorCode::ResourceExhausted)
    );
    held.pop();
    within(T, a.watch("/tmp", false)).await.unwrap();
}
