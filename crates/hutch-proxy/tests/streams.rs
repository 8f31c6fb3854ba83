//! Streaming through the proxy: WebSocket upgrades, server-sent events, 64 MiB both ways.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hutch_proxy::Limits;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server; records the handshake's `authorization` header (if any).
#[allow(clippy::result_large_err)] // the callback type is tungstenite's
async fn ws_echo(seen_auth: Arc<Mutex<Vec<Option<String>>>>) -> (u16, Task) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let t = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let seen = seen_auth.clone();
            tokio::spawn(async move {
                let cb = |req: &Request, resp: Response| {
                    let a = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap_or("?").to_string());
                    seen.lock().unwrap().push(a);
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        if ws.send(m).await.is_err() {
                            break;
                        }
                    } else if m.is_close() {
                        break;
                    }
                }
            });
        }
    });
    (port, Task(t))
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let env = start(Limits::default()).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (ws_port, _t) = ws_echo(seen.clone()).await;
    let tcp = TcpStream::connect(env.addr).await.unwrap();
    let mut req = format!("ws://{}/chat", env.host(ws_port))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {OWNER}").parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let msg = format!("hello {i}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.into_data().as_ref(), &big[..]);
    ws.close(None).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![None],
        "the token reached the guest"
    );

    // Without credentials the upgrade is refused before the guest sees it.
    let tcp = TcpStream::connect(env.addr).await.unwrap();
    let req = format!("ws://{}/chat", env.host(ws_port))
        .into_client_request()
        .unwrap();
    let err = tokio_tungstenite::client_async(req, tcp).await;
    match err {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected a 401, got {:?}", other.map(|x| x.1)),
    }
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn server_sent_events_flush_through() {
    let env = start(Limits::default()).await;
    let c = client();
    let r = env
        .req(&c, &env.host(env.port), "/sse")
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut s = r.bytes_stream();
    // The backend sends its second event only after the test saw the first.
    let first = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("first event before the backend finished")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"data: one\n\n");
    env.state.sse_go.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .unwrap()
    {
        rest.extend_from_slice(&c.unwrap());
    }
    assert_eq!(rest, b"data: two\n\n");
}

#[tokio::test]
async fn big_upload_and_download_stream_through() {
    let env = start(Limits::default()).await;
    let c = client();
    let host = env.host(env.port);

    let r = env
        .req(&c, &host, "/download")
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(check_stream(r.bytes_stream()).await, BIG);

    const CHUNK: usize = 256 << 10;
    let chunks = futures_util::stream::iter(
        (0..BIG / CHUNK).map(|i| Ok::<_, std::io::Error>(pattern_chunk(i * CHUNK, CHUNK))),
    );
    let r = c
        .post(format!("http://{}/upload", env.addr))
        .header("host", &host)
        .bearer_auth(OWNER)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), format!("{BIG} true"));
}

#[tokio::test]
async fn dropping_the_serve_task_ends_spliced_upgrades() {
    let env = start(Limits::default()).await;
    let (ws_port, _t) = ws_echo(Arc::new(Mutex::new(Vec::new()))).await;
    let tcp = TcpStream::connect(env.addr).await.unwrap();
    let mut req = format!("ws://{}/", env.host(ws_port))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {OWNER}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    assert!(ws.next().await.unwrap().is_ok());
    let Env { tasks, .. } = env;
    drop(tasks);
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the splice outlived the serve task");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
}
