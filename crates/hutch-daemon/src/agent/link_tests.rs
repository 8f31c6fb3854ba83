//! Node links (link.rs) between a [`LinkedAgent`] and [`serve_link`] over an in-memory byte
//! stream, with the fake agent behind the far end: processes with input, output and exit codes
//! cross whole; a signal crosses; a refusal of the far end ends the stream with its code;
//! a dropped stream is cancelled at the far end; what a link may not carry is refused at both
//! ends; a link that does not begin with a request, or sends garbage, starts nothing.

use super::fake::FakeAgent;
use super::link::{serve_link, Connect, IdleLinks, LinkIo, LinkedAgent, Opened};
use super::*;
use hutch_proto::{Decoder, Frame, Kind, Request, Response};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

/// The far end's agents: always `far`.
fn agents(far: Arc<FakeAgent>) -> impl Fn() -> Result<Arc<dyn Agent>, AgentError> + Send {
    move || Ok(far.clone() as Arc<dyn Agent>)
}

/// A linked agent whose links are served by `far` (each link its own in-memory stream). Both
/// ends buffer what they write until it is flushed, as TLS does: a frame left unflushed stalls
/// its stream here as it would between nodes.
fn linked(far: Arc<FakeAgent>) -> LinkedAgent {
    LinkedAgent::new(links(far, true).0)
}

/// Connects links to `far` (whose end says whether it serves several streams: `reusable`);
/// counts them and keeps their far ends' tasks (to end them).
fn links(
    far: Arc<FakeAgent>,
    reusable: bool,
) -> (Connect, Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>) {
    let served = Arc::new(Mutex::new(Vec::new()));
    let s2 = served.clone();
    let connect: Connect = Arc::new(move || {
        let (far, served) = (far.clone(), s2.clone());
        Box::pin(async move {
            let (near, other) = tokio::io::duplex(64 * 1024);
            let other = tokio::io::BufStream::new(other);
            let task = tokio::spawn(serve_link(other, agents(far)));
            served.lock().unwrap().push(task);
            Ok(Opened {
                io: Box::new(tokio::io::BufStream::new(near)) as Box<dyn LinkIo>,
                reusable,
            })
        })
    });
    (connect, served)
}

fn argv(a: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: a.iter().map(|s| s.to_string()).collect(),
        stdin: true,
        ..Default::default()
    }
}

/// The stream's output and exit, to its end.
async fn finish(mut s: ExecStream) -> (Vec<u8>, Vec<u8>, ExecEvent) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match within(T, s.next()).await.unwrap() {
            Some(ExecEvent::Stdout(b)) => out.extend_from_slice(&b),
            Some(ExecEvent::Stderr(b)) => err.extend_from_slice(&b),
            Some(ExecEvent::Started { .. }) => {}
            Some(e @ ExecEvent::Exited { .. }) => return (out, err, e),
            None => panic!("the stream ended without an exit"),
        }
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
async fn processes_cross_a_link_whole() {
    let far = Arc::new(FakeAgent::new());
    let a = linked(far.clone());
    // Input larger than a frame and the link's buffer, echoed back.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let s = a.exec(argv(&["cat"])).unwrap();
    let h = s.handle();
    let feed = {
        let data = data.clone();
        tokio::spawn(async move {
            h.stdin(&data).await.unwrap();
            h.eof().await.unwrap();
        })
    };
    let (out, err, exit) = finish(s).await;
    feed.await.unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data && err.is_empty());
    assert_eq!(exit, exited(0));

    let (out, _, exit) = finish(a.exec(argv(&["echo", "hi"])).unwrap()).await;
    assert_eq!((out.as_slice(), exit), (&b"hi\n"[..], exited(0)));
    let (_, err, exit) = finish(a.exec(argv(&["nope"])).unwrap()).await;
    assert!(String::from_utf8_lossy(&err).contains("cannot run"));
    assert_eq!(exit, exited(127));
    let (_, _, exit) = finish(a.exec(argv(&["false"])).unwrap()).await;
    assert_eq!(exit, exited(1));
    assert_eq!(far.execs().len(), 4);
}

#[tokio::test]
async fn a_signal_crosses_and_a_dropped_stream_is_cancelled_far_away() {
    let far = Arc::new(FakeAgent::new());
    let a = linked(far.clone());
    let mut s = a.exec(argv(&["sleep", "100"])).unwrap();
    assert!(matches!(
        within(T, s.next()).await.unwrap(),
        Some(ExecEvent::Started { .. })
    ));
    s.handle().signal(15).unwrap();
    let (_, _, exit) = finish(s).await;
    assert_eq!(
        exit,
        ExecEvent::Exited {
            code: None,
            signal: Some(15),
            timed_out: false
        }
    );

    let mut s = a.exec(argv(&["sleep", "100"])).unwrap();
    within(T, s.next()).await.unwrap();
    assert_eq!(far.running(), 1);
    drop(s);
    let gone = async {
        while far.running() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(T, gone)
        .await
        .expect("the far process was not cancelled");
}

#[tokio::test]
async fn refusals_end_the_stream_with_their_code() {
    // The far node refused the link (a VM that moved, an account that may not see it).
    let connect: Connect = Arc::new(|| {
        Box::pin(async {
            Err(AgentError::guest(
                ErrorCode::NotFound,
                "node n2: sandbox \"web\" not found",
            ))
        })
    });
    let a = LinkedAgent::new(connect);
    let mut s = a.exec(argv(&["true"])).unwrap();
    match within(T, s.next()).await {
        Err(AgentError::Guest { code, message }) => {
            assert_eq!(code, ErrorCode::NotFound);
            assert!(message.contains("node n2"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // What a link may not carry is refused before any link opens...
    let far = Arc::new(FakeAgent::new());
    let a = linked(far.clone());
    assert!(matches!(
        within(T, a.shutdown()).await,
        Err(AgentError::Guest {
            code: ErrorCode::Unsupported,
            ..
        })
    ));
    assert!(a.export_changes().is_err());
    // ...and by the far end, whoever sends it.
    for req in [Request::Shutdown, Request::ExportChanges, Request::Cancel] {
        let answer = raw_link(far.clone(), Frame::json(Kind::Request, 1, &req)).await;
        assert!(
            matches!(
                answer,
                Some(Response::Error {
                    code: ErrorCode::InvalidArgument,
                    ..
                })
            ),
            "{req:?}: {answer:?}"
        );
    }
    assert!(far.execs().is_empty());
}

/// Sends `first` on a fresh link to `far` and returns the answer that comes back, if any.
async fn raw_link(far: Arc<FakeAgent>, first: Frame) -> Option<Response> {
    let (mut near, other) = tokio::io::duplex(64 * 1024);
    let other = tokio::io::BufStream::new(other);
    let served = tokio::spawn(serve_link(other, agents(far)));
    near.write_all(&first.encode().unwrap()).await.unwrap();
    let mut buf = Vec::new();
    within(T, async {
        Ok::<_, AgentError>(near.read_to_end(&mut buf).await)
    })
    .await
    .unwrap()
    .unwrap();
    within(T, async { Ok::<_, AgentError>(served.await) })
        .await
        .unwrap()
        .unwrap();
    let mut d = Decoder::new();
    d.push(&buf);
    let f = d.next_frame_strict().unwrap()?;
    assert_eq!(f.kind, Kind::Response);
    f.parse("response").ok()
}

#[tokio::test]
async fn a_link_that_is_not_a_request_starts_nothing() {
    let far = Arc::new(FakeAgent::new());
    // Stdin first, a response, and garbage: each answered with a refusal or cut, never run.
    let stdin = Frame::new(Kind::Stdin, 1, b"echo hi".to_vec());
    let answer = raw_link(far.clone(), stdin).await;
    assert!(matches!(answer, Some(Response::Error { .. })), "{answer:?}");
    let resp = Frame::json(Kind::Response, 1, &Response::Watching);
    assert!(matches!(
        raw_link(far.clone(), resp).await,
        Some(Response::Error { .. })
    ));
    let (mut near, other) = tokio::io::duplex(1024);
    let served = tokio::spawn(serve_link(other, agents(far.clone())));
    near.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    within(T, async { Ok::<_, AgentError>(served.await) })
        .await
        .unwrap()
        .unwrap();
    assert!(far.execs().is_empty());
}

#[tokio::test]
async fn a_link_carries_stream_after_stream() {
    let far = Arc::new(FakeAgent::new());
    let (connect, served) = links(far.clone(), true);
    let idle = Arc::new(IdleLinks::default());
    let a = LinkedAgent::new(connect).keeping(idle.clone(), "n2/vm/".into());
    // One after another: one link, kept between them.
    for i in 0..20 {
        let (out, _, exit) = finish(a.exec(argv(&["echo", &i.to_string()])).unwrap()).await;
        assert_eq!((out, exit), (format!("{i}\n").into_bytes(), exited(0)));
    }
    assert_eq!(served.lock().unwrap().len(), 1);
    assert_eq!(idle.len(), 1);
    // Input the last stream left unread is dropped at the far end, not taken for the next:
    // cat's stdin is still being fed when its process is stopped by a signal.
    let s = a.exec(argv(&["cat"])).unwrap();
    let h = s.handle();
    h.stdin(b"x").await.unwrap();
    h.signal(9).unwrap();
    let _ = finish(s).await;
    let (out, _, _) = finish(a.exec(argv(&["echo", "after"])).unwrap()).await;
    assert_eq!(out, b"after\n");
    // Two at once: a second link; both kept.
    let (s1, s2) = (
        a.exec(argv(&["cat"])).unwrap(),
        a.exec(argv(&["cat"])).unwrap(),
    );
    for s in [&s1, &s2] {
        s.handle().eof().await.unwrap();
    }
    let _ = tokio::join!(finish(s1), finish(s2));
    let opened = served.lock().unwrap().len();
    assert_eq!((opened, idle.len()), (2, 2));
    // A stream dropped before its end takes its link with it.
    let mut s = a.exec(argv(&["sleep", "100"])).unwrap();
    within(T, s.next()).await.unwrap();
    drop(s);
    assert_eq!(idle.len(), 1);
    // A link whose far end ended meanwhile (its node restarted) is not used: a new one is.
    for t in served.lock().unwrap().drain(..) {
        t.abort();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (out, _, _) = finish(a.exec(argv(&["echo", "again"])).unwrap()).await;
    assert_eq!(out, b"again\n");
    assert_eq!(served.lock().unwrap().len(), 1, "a new link");
}

#[tokio::test]
async fn a_link_is_kept_only_when_its_far_end_serves_several() {
    let far = Arc::new(FakeAgent::new());
    let (connect, served) = links(far, false);
    let idle = Arc::new(IdleLinks::default());
    let a = LinkedAgent::new(connect).keeping(idle.clone(), "k".into());
    for _ in 0..3 {
        finish(a.exec(argv(&["true"])).unwrap()).await;
    }
    assert_eq!((served.lock().unwrap().len(), idle.len()), (3, 0));
}

#[tokio::test]
async fn streams_on_a_link_go_forward_only() {
    let far = Arc::new(FakeAgent::new());
    let (mut near, other) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(serve_link(other, agents(far.clone())));
    let echo = |id: u32, w: &str| {
        let req = Request::Exec(argv(&["echo", w]));
        Frame::json(Kind::Request, id, &req).encode().unwrap()
    };
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 4096];
    // The frames of one stream, to its final answer.
    let mut answered = async |near: &mut tokio::io::DuplexStream| {
        let mut ids = Vec::new();
        loop {
            let n = within(T, async { Ok::<_, AgentError>(near.read(&mut buf).await) })
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "the link closed: {ids:?}");
            dec.push(&buf[..n]);
            while let Some(f) = dec.next_frame_strict().unwrap() {
                ids.push(f.stream);
                if f.kind == Kind::Response
                    && f.parse::<Response>("response").unwrap().ends_stream()
                {
                    return ids;
                }
            }
        }
    };
    // Stream 1; then input and a signal of stream 1 that came too late, and stream 5: it is
    // answered.
    near.write_all(&echo(1, "one")).await.unwrap();
    assert!(answered(&mut near).await.iter().all(|id| *id == 1));
    let late = Frame::new(Kind::Stdin, 1, b"late".to_vec());
    near.write_all(&late.encode().unwrap()).await.unwrap();
    // (A signal too: a Ctrl-C as the process ended.)
    let sig = Frame::json(Kind::Request, 1, &Request::Signal { signal: 2 });
    near.write_all(&sig.encode().unwrap()).await.unwrap();
    near.write_all(&echo(5, "five")).await.unwrap();
    assert!(answered(&mut near).await.iter().all(|id| *id == 5));
    // A stream id that goes back closes the link, and runs nothing.
    near.write_all(&echo(3, "three")).await.unwrap();
    let mut rest = Vec::new();
    within(T, async {
        Ok::<_, AgentError>(near.read_to_end(&mut rest).await)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(rest.is_empty());
    within(T, async { Ok::<_, AgentError>(served.await) })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(far.execs().len(), 2);
}
