//! Malformed and abusive input to both listeners: dropped or closed, never a crash, and the
//! listener keeps answering.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hickory_proto::op::{MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RecordType;
use hutch_dns::{serve_guest_with, serve_public, DnsServer, GuestDns, Limits, PublicDns};
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;

async fn guest(limits: Limits) -> DnsServer {
    let cfg = GuestDns {
        domain: "hutch.test".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: vec![],
    };
    serve_guest_with(cfg, Arc::new(FakeDir::default()), limits)
        .await
        .unwrap()
}

async fn public() -> DnsServer {
    let cfg = PublicDns {
        domain: "pub.test".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        address: Ipv4Addr::new(203, 0, 113, 80),
    };
    serve_public(cfg, Arc::new(FakeDir::default()))
        .await
        .unwrap()
}

/// Sends raw bytes over UDP; whether anything came back within 300 ms.
async fn udp_raw(server: std::net::SocketAddr, bytes: &[u8]) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, server).await.unwrap();
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
        .await
        .is_ok()
}

#[tokio::test]
async fn malformed_datagrams_are_dropped() {
    for server in [guest(Limits::default()).await, public().await] {
        let udp = server.local_addrs().0;
        let mut response = query("web.pub.test", RecordType::A, false);
        response.metadata.message_type = MessageType::Response;
        let valid = query("web.pub.test", RecordType::A, false)
            .to_vec()
            .unwrap();
        let mut oversized = valid.clone();
        oversized.resize(5000, 0);
        let junk: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x42],
            vec![0xff; 12],
            vec![0x42, 0x42, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c],
            valid[..valid.len() - 3].to_vec(),
            (0..600u32).map(|i| (i * 7919 % 251) as u8).collect(),
            response.to_vec().unwrap(),
            oversized,
        ];
        for bytes in &junk {
            assert!(!udp_raw(udp, bytes).await, "answered {bytes:02x?}");
        }
        // Still serving.
        assert!(udp_raw(udp, &valid).await);
    }
}

#[tokio::test]
async fn odd_but_well_formed_queries_get_error_codes() {
    let server = guest(Limits::default()).await;
    let (udp, tcp) = server.local_addrs();
    let mut two = query("web", RecordType::A, false);
    two.add_query(two.queries[0].clone());
    assert_eq!(
        udp_ask(udp, ALICE, &two).await.metadata.response_code,
        ResponseCode::FormErr
    );
    let mut none = query("web", RecordType::A, false);
    none.queries.clear();
    assert_eq!(
        tcp_ask(tcp, ALICE, &none).await.metadata.response_code,
        ResponseCode::FormErr
    );
    let mut notify = query("web", RecordType::A, false);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(
        udp_ask(udp, ALICE, &notify).await.metadata.response_code,
        ResponseCode::NotImp
    );
    let mut chaos = query("version.bind", RecordType::TXT, false);
    chaos.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
    assert_eq!(
        udp_ask(udp, ALICE, &chaos).await.metadata.response_code,
        ResponseCode::Refused
    );
}

#[tokio::test]
async fn garbage_and_oversized_tcp_close_the_connection() {
    // Default limits: a 10 s idle time, so closing within 2 s is the server's doing.
    for server in [guest(Limits::default()).await, public().await] {
        let tcp = server.local_addrs().1;
        // A message of garbage.
        let mut s = tcp_connect(tcp, ALICE).await;
        let mut bytes = vec![0, 10];
        bytes.extend_from_slice(&[0xfe; 10]);
        s.write_all(&bytes).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(2)).await);
        // A length over the bound: closed without waiting for the body.
        let mut s = tcp_connect(tcp, ALICE).await;
        s.write_all(&[0xff, 0xff, 0, 0]).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(2)).await);
        let mut s = tcp_connect(tcp, ALICE).await;
        s.write_all(&[0x10, 0x01]).await.unwrap();
        assert!(
            closed_within(&mut s, Duration::from_secs(2)).await,
            "4097 bytes"
        );
        // A zero length.
        let mut s = tcp_connect(tcp, ALICE).await;
        s.write_all(&[0, 0]).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(2)).await);
        // A good query followed by garbage: the answer, then the close.
        let mut s = tcp_connect(tcp, ALICE).await;
        write_framed(&mut s, &query("web.pub.test", RecordType::A, false))
            .await
            .unwrap();
        assert!(read_framed(&mut s).await.is_some());
        s.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(2)).await);
        // Still serving.
        let resp = tcp_ask(tcp, ALICE, &query("web", RecordType::A, false)).await;
        assert_eq!(resp.metadata.id, 0x4242);
    }
}

#[tokio::test]
async fn tcp_serves_several_queries_then_closes_when_idle() {
    let limits = Limits {
        tcp_idle: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = guest(limits).await;
    let tcp = server.local_addrs().1;
    let mut s = tcp_connect(tcp, ALICE).await;
    let mut q2 = query("vm-0a1b.hutch.test", RecordType::A, false);
    q2.metadata.id = 7;
    // Two queries in one write.
    let mut bytes = Vec::new();
    for q in [query("web", RecordType::A, false), q2] {
        let b = q.to_vec().unwrap();
        bytes.extend_from_slice(&(b.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&b);
    }
    s.write_all(&bytes).await.unwrap();
    assert_eq!(read_framed(&mut s).await.unwrap().metadata.id, 0x4242);
    assert_eq!(read_framed(&mut s).await.unwrap().metadata.id, 7);
    // Then nothing: closed after the idle time, not before.
    assert!(!closed_within(&mut s, Duration::from_millis(200)).await);
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    // Half a message, then silence.
    let mut s = tcp_connect(tcp, ALICE).await;
    s.write_all(&[0, 40, 1, 2]).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn tcp_connections_are_bounded() {
    let limits = Limits {
        max_tcp_connections: 2,
        ..Limits::default()
    };
    let server = guest(limits).await;
    let tcp = server.local_addrs().1;
    let mut a = tcp_connect(tcp, ALICE).await;
    let b = tcp_connect(tcp, ALICE).await;
    // Make sure both were accepted and are being served.
    write_framed(&mut a, &query("web", RecordType::A, false))
        .await
        .unwrap();
    assert!(read_framed(&mut a).await.is_some());
    let mut c = tcp_connect(tcp, ALICE).await;
    assert!(
        closed_within(&mut c, Duration::from_secs(2)).await,
        "third connection kept"
    );
    drop(b);
    // A slot comes free once the server sees the close.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut d = tcp_connect(tcp, ALICE).await;
        if write_framed(&mut d, &query("web", RecordType::A, false))
            .await
            .is_ok()
            && tokio::time::timeout(Duration::from_millis(500), read_framed(&mut d))
                .await
                .ok()
                .flatten()
                .is_some()
        {
            ok = true;
            break;
        }
    }
    assert!(ok, "no slot came free");
}
