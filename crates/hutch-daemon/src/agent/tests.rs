//! The real client against a scripted agent peer on a unix socket: frames in, frames out. The
//! peer is shared with `watch_tests`.

use super::*;
use hutch_proto::{Decoder, Frame, Hello, HelloAck, Kind, Request, Response};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// The agent's end of one connection.
pub(super) struct Peer {
    pub(super) s: UnixStream,
    dec: Decoder,
}

impl Peer {
    /// Accepts a connection and answers its hello with `version`.
    async fn accept_with(l: &UnixListener, version: u32) -> Peer {
        let (s, _) = l.accept().await.unwrap();
        let mut p = Peer {
            s,
            dec: Decoder::new(),
        };
        let hello: Hello = loop {
            let f = p.frame().await;
            if f.kind == Kind::Hello {
                break f.parse("hello").unwrap();
            }
        };
        let ack = HelloAck {
            nonce: hello.nonce,
            version,
            hostname: "fake".into(),
            kernel: "0".into(),
            uptime_ms: 0,
        };
        p.send(Frame::json(Kind::Hello, 0, &ack)).await;
        p
    }

    pub(super) async fn accept(l: &UnixListener) -> Peer {
        Peer::accept_with(l, hutch_proto::VERSION).await
    }

    /// The next frame from the host; panics if it hangs up.
    pub(super) async fn frame(&mut self) -> Frame {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(f) = self.dec.next_frame() {
                return f;
            }
            let n = self.s.read(&mut buf).await.unwrap();
            assert!(n > 0, "host closed");
            self.dec.push(&buf[..n]);
        }
    }

    /// The next request (hellos and credit skipped).
    pub(super) async fn request(&mut self) -> (u32, Request) {
        loop {
            let f = self.frame().await;
            if f.kind == Kind::Request {
                return (f.stream, f.parse("request").unwrap());
            }
        }
    }

    pub(super) async fn send(&mut self, f: Frame) {
        self.s.write_all(&f.encode().unwrap()).await.unwrap();
    }

    pub(super) async fn answer(&mut self, id: u32, r: &Response) {
        self.send(Frame::json(Kind::Response, id, r)).await;
    }

    /// Waits until the host hangs up.
    pub(super) async fn hung_up(mut self) {
        let mut buf = [0u8; 1024];
        while matches!(self.s.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

pub(super) fn socket() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let l = UnixListener::bind(&sock).unwrap();
    (dir, sock, l)
}

pub(super) async fn client(sock: &std::path::Path) -> Arc<AgentClient> {
    AgentClient::connect(sock, Duration::from_secs(5))
        .await
        .unwrap()
        .0
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        stdin: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn mismatched_agent_is_refused_clearly() {
    let (_d, sock, l) = socket();
    let server = async { Peer::accept_with(&l, 1).await };
    let (_, r) = tokio::join!(server, AgentClient::connect(&sock, Duration::from_secs(5)));
    let e = r.err().expect("a v1 agent must be refused");
    assert!(
        matches!(e, AgentError::Version { agent: 1, host } if host == hutch_proto::VERSION),
        "{e}"
    );
    assert!(e.to_string().contains("make agent"), "{e}");
}

#[tokio::test]
async fn exec_events_come_in_order_and_input_goes_out() {
    let (_d, sock, l) = socket();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (id, req) = p.request().await;
        assert!(
            matches!(req, Request::Exec(ref r) if r.argv == ["cat"]),
            "{req:?}"
        );
        p.answer(id, &Response::Started { pid: 42 }).await;
        p.send(Frame::new(Kind::Stdout, id, b"one".to_vec())).await;
        p.send(Frame::new(Kind::Stderr, id, b"two".to_vec())).await;
        p.send(Frame::new(Kind::Stdout, id, b"three".to_vec()))
            .await;
        // What the host sends on the stream: stdin, then a resize and a signal, then EOF.
        let mut got = Vec::new();
        loop {
            let f = p.frame().await;
            match f.kind {
                Kind::Stdin => got.push(format!("in:{}", String::from_utf8_lossy(&f.payload))),
                Kind::Request => got.push(format!("{:?}", f.parse::<Request>("r").unwrap())),
                Kind::StdinEof => break,
                _ => continue,
            }
            assert_eq!(f.stream, id);
        }
        let r = Response::Exited {
            code: Some(3),
            signal: None,
            timed_out: false,
        };
        p.answer(id, &r).await;
        (got, p)
    });
    let c = client(&sock).await;
    let mut s = c.exec(exec(&["cat"])).unwrap();
    let mut events = Vec::new();
    for _ in 0..4 {
        events.push(s.next().await.unwrap().unwrap());
    }
    let h = s.handle();
    // Data and control go out in two lanes (control first): pause between them so the peer's
    // record has one order.
    let pause = || tokio::time::sleep(Duration::from_millis(100));
    h.stdin(b"hello").await.unwrap();
    pause().await;
    h.resize(TtySize { rows: 5, cols: 7 }).unwrap();
    h.signal(15).unwrap();
    pause().await;
    h.eof().await.unwrap();
    events.push(s.next().await.unwrap().unwrap());
    assert_eq!(s.next().await.unwrap(), None, "nothing after the exit");
    assert_eq!(
        events,
        vec![
            ExecEvent::Started { pid: 42 },
            ExecEvent::Stdout("one".into()),
            ExecEvent::Stderr("two".into()),
            ExecEvent::Stdout("three".into()),
            ExecEvent::Exited {
                code: Some(3),
                signal: None,
                timed_out: false
            },
        ]
    );
    let (got, _p) = peer.await.unwrap();
    assert_eq!(
        got,
        vec![
            "in:hello".to_string(),
            "Resize(TtySize { rows: 5, cols: 7 })".into(),
            "Signal { signal: 15 }".into()
        ]
    );
    // The stream has its answer: more input is refused, not sent.
    assert!(matches!(h.stdin(b"late").await, Err(AgentError::Closed)));
    drop(s);
    assert!(matches!(h.signal(9), Err(AgentError::Closed)));
    assert_eq!(c.open_streams(), 0);
}

#[tokio::test]
async fn a_response_that_does_not_decode_ends_every_stream_with_lost() {
    let (_d, sock, l) = socket();
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (a, _) = p.request().await;
        let (_b, _) = p.request().await;
        p.answer(a, &Response::Started { pid: 1 }).await;
        rx.recv().await.unwrap();
        p.send(Frame::new(
            Kind::Response,
            a,
            b"{\"type\":\"started\"".to_vec(),
        ))
        .await;
        p.hung_up().await;
    });
    let c = client(&sock).await;
    let mut a = c.exec(exec(&["a"])).unwrap();
    let mut b = c.read_file("/x", 0, None).unwrap();
    assert_eq!(a.next().await.unwrap(), Some(ExecEvent::Started { pid: 1 }));
    tx.send(()).await.unwrap();
    assert!(matches!(a.next().await, Err(AgentError::Lost)));
    assert!(matches!(b.next().await, Err(AgentError::Lost)));
    assert_eq!(a.next().await.unwrap(), None, "a lost stream stays ended");
    peer.await.unwrap();
}

#[tokio::test]
async fn refusals_are_typed_and_their_messages_made_safe() {
    let (_d, sock, l) = socket();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (id, _) = p.request().await;
        let hostile = format!("\x1b]0;pwned\x07{}", "é".repeat(MAX_MESSAGE));
        let json = serde_json::json!({"type": "error", "code": {"new": 1}, "message": hostile});
        p.send(Frame::new(
            Kind::Response,
            id,
            json.to_string().into_bytes(),
        ))
        .await;
        let (id, _) = p.request().await;
        let r = Response::Error {
            code: ErrorCode::NotFound,
            message: "/nope: No such file or directory (os error 2)".into(),
        };
        p.answer(id, &r).await;
        p.hung_up().await;
    });
    let c = client(&sock).await;
    let mut s = c.exec(exec(&["x"])).unwrap();
    match s.next().await {
        Err(AgentError::Guest { code, message }) => {
            assert_eq!(code, ErrorCode::Unknown);
            assert!(message.len() <= MAX_MESSAGE, "{}", message.len());
            let head: String = message.chars().take(12).collect();
            assert_eq!(head, "?]0;pwned?éé");
        }
        other => panic!("{other:?}"),
    }
    let e = within(Duration::from_secs(5), c.stat("/nope", true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    drop(c);
    peer.await.unwrap();
}

#[tokio::test]
async fn fs_answers_are_checked() {
    let (_d, sock, l) = socket();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        // stat: a proper answer, then one of the wrong kind.
        let (id, _) = p.request().await;
        let attr = FileAttr {
            size: 9,
            mode: 0o100644,
            ..Default::default()
        };
        p.answer(id, &Response::FsAttr { attr }).await;
        let (id, _) = p.request().await;
        p.answer(id, &Response::FsPath { path: "/".into() }).await;
        // read_dir: a page that claims more but does not advance.
        let (id, req) = p.request().await;
        assert!(matches!(
            req,
            Request::Fs(FsRequest::ReadDir { skip: 5, .. })
        ));
        let page = Response::FsDir {
            entries: vec![],
            more: true,
            next: 5,
        };
        p.answer(id, &page).await;
        // health.
        let (id, _) = p.request().await;
        let h = Response::Health {
            ready: true,
            uptime_ms: 7,
            processes: 2,
        };
        p.answer(id, &h).await;
        p.hung_up().await;
    });
    let c = client(&sock).await;
    let t = Duration::from_secs(5);
    assert_eq!(within(t, c.stat("/f", true)).await.unwrap().size, 9);
    let e = within(t, c.stat("/f", true)).await.unwrap_err();
    assert!(matches!(e, AgentError::Proto(_)), "{e}");
    let e = within(t, c.read_dir("/d", 5)).await.unwrap_err();
    assert!(e.to_string().contains("does not advance"), "{e}");
    let h = within(t, c.health()).await.unwrap();
    assert_eq!((h.ready, h.uptime_ms, h.processes), (true, 7, 2));
    drop(c);
    peer.await.unwrap();
}

#[tokio::test]
async fn an_abandoned_stream_is_cancelled_and_a_refused_write_says_why() {
    let (_d, sock, l) = socket();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (a, _) = p.request().await;
        p.answer(a, &Response::Started { pid: 1 }).await;
        let (id, req) = p.request().await;
        assert_eq!((id, req), (a, Request::Cancel));
        let (w, req) = p.request().await;
        assert!(matches!(
            req,
            Request::WriteFile {
                offset: Some(0),
                ..
            }
        ));
        let r = Response::Error {
            code: ErrorCode::PermissionDenied,
            message: "/ro: Permission denied (os error 13)".into(),
        };
        p.answer(w, &r).await;
        p.hung_up().await;
    });
    let c = client(&sock).await;
    let mut s = c.exec(exec(&["sleep"])).unwrap();
    assert_eq!(s.next().await.unwrap(), Some(ExecEvent::Started { pid: 1 }));
    s.cancel();
    let mut w = c.write_file("/ro", None, Some(0)).unwrap();
    // The refusal arrives while the host writes (or, at the latest, at the end).
    let mut r = Ok(());
    for _ in 0..50 {
        r = w.write(&[1u8; 65536]).await;
        if r.is_err() {
            break;
        }
    }
    let e = match r {
        Err(e) => e,
        Ok(()) => w.finish().await.unwrap_err(),
    };
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    // A request that cannot fit a frame is refused before it is sent.
    let huge = ExecRequest {
        argv: vec!["x".repeat(hutch_proto::MAX_PAYLOAD)],
        ..Default::default()
    };
    assert!(matches!(c.exec(huge), Err(AgentError::RequestTooLarge(_))));
    drop(c);
    peer.await.unwrap();
}

#[tokio::test]
async fn dropping_the_stream_ends_a_send_blocked_on_credit_and_cancels() {
    let (_d, sock, l) = socket();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (id, _) = p.request().await;
        p.answer(id, &Response::Started { pid: 1 }).await;
        // Take stdin, never grant credit, until the host cancels.
        let mut got = 0usize;
        loop {
            let f = p.frame().await;
            match f.kind {
                Kind::Stdin => got += f.payload.len(),
                Kind::Request => {
                    assert_eq!(
                        (f.stream, f.parse::<Request>("r").unwrap()),
                        (id, Request::Cancel)
                    );
                    return got;
                }
                _ => {}
            }
        }
    });
    let c = client(&sock).await;
    let mut s = c.exec(exec(&["never-reads"])).unwrap();
    assert_eq!(s.next().await.unwrap(), Some(ExecEvent::Started { pid: 1 }));
    let h = s.handle();
    let send = tokio::spawn(async move { h.stdin(&vec![0u8; 1 << 20]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!send.is_finished(), "the send waits for credit");
    drop(s);
    let r = within(Duration::from_secs(5), async { Ok(send.await.unwrap()) }).await;
    assert!(matches!(r, Ok(Err(AgentError::Closed))), "{r:?}");
    let got = within(Duration::from_secs(5), async { Ok(peer.await.unwrap()) })
        .await
        .unwrap();
    assert_eq!(
        got,
        hutch_proto::WINDOW as usize,
        "stdin kept to its credit"
    );
    assert_eq!(c.open_streams(), 0);
}

#[tokio::test]
async fn data_beyond_credit_or_oversized_drops_and_reconnects() {
    let (_d, sock, l) = socket();
    let (hung_up_tx, mut hung_up) = mpsc::channel::<()>(1);
    let sock2 = sock.clone();
    let host = tokio::spawn(async move {
        let c = client(&sock2).await;
        let mut s = c.read_file("/dev/zero", 0, None).unwrap();
        // Nothing is consumed (so no credit returned) until the agent has been cut off.
        hung_up.recv().await.unwrap();
        // The fake agent overran its credit: the stream ends as lost, nothing beyond the
        // window was kept.
        let mut got = 0usize;
        let end = loop {
            match s.next().await {
                Ok(Some(b)) => got += b.len(),
                other => break other,
            }
        };
        assert!(matches!(end, Err(AgentError::Lost)), "{end:?}");
        assert!(got <= hutch_proto::WINDOW as usize, "{got}");
        c
    });
    // First connection: more data than the window, never waiting for credit.
    let mut p = Peer::accept(&l).await;
    let (id, _) = p.request().await;
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..8 {
        let b = Frame::new(Kind::Stdout, id, chunk.clone())
            .encode()
            .unwrap();
        if p.s.write_all(&b).await.is_err() {
            break;
        }
    }
    p.hung_up().await;
    hung_up_tx.send(()).await.unwrap();
    let c = host.await.unwrap();
    // Second connection: the client came back by itself; now an oversized frame.
    let mut p = Peer::accept(&l).await;
    let mut h = b"HU\x04\x00\x00\x00\x00\x01".to_vec();
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    p.s.write_all(&h).await.unwrap();
    p.hung_up().await;
    // Third connection: the client reconnects again and works.
    let c2 = c.clone();
    let probe = tokio::spawn(async move {
        loop {
            if c2.is_alive() {
                if let Ok(h) = within(Duration::from_secs(5), c2.health()).await {
                    return h;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut p = Peer::accept(&l).await;
    let (id, _) = p.request().await;
    let r = Response::Health {
        ready: true,
        uptime_ms: 1,
        processes: 0,
    };
    p.answer(id, &r).await;
    let h = probe.await.unwrap();
    assert!(h.ready);
}

#[tokio::test]
async fn a_silent_agent_times_out() {
    let (_d, sock, l) = socket();
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let server = tokio::spawn(async move {
        let _p = Peer::accept(&l).await;
        let _ = rx.recv().await;
    });
    let c = client(&sock).await;
    let r = within(Duration::from_millis(300), c.health()).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))));
    tx.send(()).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn restored_goes_out_as_json_and_its_answer_is_typed() {
    let (_d, sock, l) = socket();
    let info = RestoreInfo::now(
        &[0xab; 16],
        Some(Identity {
            hostname: "copy-1".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            net: None,
        }),
    );
    let sent = info.clone();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        // The request on the wire, as JSON: the op tag and the fields beside it.
        let f = loop {
            let f = p.frame().await;
            if f.kind == Kind::Request {
                break f;
            }
        };
        let json: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(json["op"], "restored");
        assert_eq!(json["time_ns"], sent.time_ns);
        assert_eq!(json["entropy"], "ab".repeat(16));
        assert_eq!(json["identity"]["hostname"], "copy-1");
        assert_eq!(json["identity"]["net"], serde_json::Value::Null);
        assert_eq!(f.parse::<Request>("r").unwrap(), Request::Restored(sent));
        p.answer(f.stream, &Response::Done { bytes: 0 }).await;
        // A refusal, then an answer of the wrong kind.
        let (id, _) = p.request().await;
        let r = Response::Error {
            code: ErrorCode::InvalidArgument,
            message: "invalid restore request: mac \"x\"".into(),
        };
        p.answer(id, &r).await;
        let (id, _) = p.request().await;
        p.answer(id, &Response::FsPath { path: "/".into() }).await;
        p.hung_up().await;
    });
    let c = client(&sock).await;
    let t = Duration::from_secs(5);
    within(t, c.restored(info.clone())).await.unwrap();
    let e = within(t, c.restored(info.clone())).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    assert!(e.to_string().contains("mac"), "{e}");
    let e = within(t, c.restored(info)).await.unwrap_err();
    assert!(matches!(e, AgentError::Proto(_)), "{e}");
    assert_eq!(c.open_streams(), 0);
    drop(c);
    peer.await.unwrap();
}
