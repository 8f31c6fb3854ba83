//! [`Agent::watch`] of the real client against the scripted agent peer of `tests`: the request
//! on the wire, `watching` and refusals, events in order, credit spent by events and returned
//! as they are taken, cancel on drop, and a guest that overruns its credit or answers out of
//! turn.

use super::tests::{client, socket, Peer};
use super::*;
use hutch_proto::credit::RETURN_AT;
use hutch_proto::{Frame, Kind, Request, Response, WINDOW};
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(5);

fn event(name: &str, kind: FsEventKind) -> FsEvent {
    FsEvent {
        name: name.into(),
        kind,
    }
}

/// The wire size of an `fs_event` answer.
fn size(e: &FsEvent) -> usize {
    Frame::json(Kind::Response, 1, &Response::FsEvent(e.clone()))
        .payload
        .len()
}

#[tokio::test]
async fn a_watch_is_set_then_yields_events_and_dropping_it_cancels() {
    let (_d, sock, l) = socket();
    let events = vec![
        event("a", FsEventKind::Create),
        event("a", FsEventKind::Write),
        event("sub/b.txt", FsEventKind::Rename),
        event("c", FsEventKind::Unknown),
    ];
    let sent = events.clone();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let f = loop {
            let f = p.frame().await;
            if f.kind == Kind::Request {
                break f;
            }
        };
        let json: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "watch", "path": "/root/w", "recursive": true})
        );
        let id = f.stream;
        p.answer(id, &Response::Watching).await;
        for e in sent {
            p.answer(id, &Response::FsEvent(e)).await;
        }
        // The host drops the stream: a cancel follows.
        let (cid, req) = p.request().await;
        assert_eq!((cid, req), (id, Request::Cancel));
        // A refusal ends its stream: no cancel for it.
        let (id, _) = p.request().await;
        let r = Response::Error {
            code: ErrorCode::NotADirectory,
            message: "/etc/passwd: Not a directory (os error 20)".into(),
        };
        p.answer(id, &r).await;
        let (id, _) = p.request().await;
        let r = Response::Error {
            code: ErrorCode::ResourceExhausted,
            message: "the guest already has 64 directory watches".into(),
        };
        p.answer(id, &r).await;
        let (next, req) = p.request().await;
        assert_eq!(req, Request::Health, "no cancel for a refused watch");
        let h = Response::Health {
            ready: true,
            uptime_ms: 1,
            processes: 0,
        };
        p.answer(next, &h).await;
        p.hung_up().await;
    });
    let c = client(&sock).await;
    let mut w = within(T, c.watch("/root/w", true)).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..events.len() {
        got.push(within(T, w.next()).await.unwrap().unwrap());
    }
    assert_eq!(got, events);
    drop(w);
    let e = within(T, c.watch("/etc/passwd", false))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(ErrorCode::NotADirectory), "{e}");
    let e = within(T, c.watch("/", false)).await.err().unwrap();
    assert_eq!(e.code(), Some(ErrorCode::ResourceExhausted), "{e}");
    within(T, c.health()).await.unwrap();
    assert_eq!(c.open_streams(), 0);
    drop(c);
    peer.await.unwrap();
}

#[tokio::test]
async fn events_spend_credit_returned_as_they_are_taken_and_an_overrun_is_cut_off() {
    let (_d, sock, l) = socket();
    let big = event(&"n".repeat(1000), FsEventKind::Write);
    let per = size(&big);
    let fit = WINDOW as usize / per;
    let (taken_tx, mut taken_rx) = tokio::sync::mpsc::channel::<()>(1);
    let e = big.clone();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (id, _) = p.request().await;
        p.answer(id, &Response::Watching).await;
        // A window's worth, then nothing until credit comes back.
        for _ in 0..fit {
            p.answer(id, &Response::FsEvent(e.clone())).await;
        }
        taken_rx.recv().await.unwrap();
        let mut granted = 0u64;
        while granted < u64::from(RETURN_AT) {
            let f = p.frame().await;
            if f.kind == Kind::Credit {
                assert_eq!(f.stream, id);
                granted += u64::from(f.credit_amount().unwrap());
            }
        }
        // More than was granted back (the host takes nothing meanwhile): a protocol violation.
        let f = Frame::json(Kind::Response, id, &Response::FsEvent(e.clone()));
        let b = f.encode().unwrap();
        for _ in 0..fit {
            if p.s.write_all(&b).await.is_err() {
                break;
            }
        }
        p.hung_up().await;
        granted
    });
    let c = client(&sock).await;
    let mut w = within(T, c.watch("/w", false)).await.unwrap();
    // Taking events gives credit back, in batches.
    let take = RETURN_AT as usize / per + 1;
    for _ in 0..take {
        assert_eq!(within(T, w.next()).await.unwrap(), Some(big.clone()));
    }
    taken_tx.send(()).await.unwrap();
    let granted = within(T, async { Ok(peer.await.unwrap()) }).await.unwrap() as usize;
    assert!(granted <= take * per, "{granted}");
    // The overrun cut the connection: what was within credit, then the end.
    let mut n = take;
    let end = loop {
        match within(T, w.next()).await {
            Ok(Some(_)) => n += 1,
            other => break other,
        }
    };
    assert!(matches!(end, Err(AgentError::Lost)), "{end:?}");
    assert_eq!(n, fit + (WINDOW as usize - fit * per + granted) / per);
    assert_eq!(w.next().await.unwrap(), None, "a lost watch stays ended");
}

#[tokio::test]
async fn answers_out_of_turn_are_protocol_errors() {
    let (_d, sock, l) = socket();
    let peer = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (id, _) = p.request().await;
        p.answer(id, &Response::Started { pid: 1 }).await;
        // The stream is not over for the host's books: it gives it up.
        assert_eq!(p.request().await, (id, Request::Cancel));
        let (id, _) = p.request().await;
        p.answer(id, &Response::Watching).await;
        p.answer(id, &Response::Done { bytes: 0 }).await;
        p.hung_up().await;
    });
    let c = client(&sock).await;
    let e = within(T, c.watch("/w", false)).await.err().unwrap();
    assert!(matches!(e, AgentError::Proto(_)), "{e}");
    let mut w = within(T, c.watch("/w", false)).await.unwrap();
    let e = within(T, w.next()).await.unwrap_err();
    assert!(e.to_string().contains("done where a watch event"), "{e}");
    assert_eq!(w.next().await.unwrap(), None);
    drop(w);
    drop(c);
    peer.await.unwrap();
}
