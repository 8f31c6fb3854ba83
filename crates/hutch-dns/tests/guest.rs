//! The guest resolver over real sockets on 127.0.0.1, against a fake upstream.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RecordType};
use hutch_dns::{serve_guest, serve_guest_with, DnsServer, GuestDns, Limits};

async fn guest(upstream: Vec<SocketAddr>, limits: Limits) -> (DnsServer, Arc<FakeDir>) {
    let dir = Arc::new(FakeDir::default());
    let cfg = GuestDns {
        domain: "hutch.test".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream,
    };
    let server = serve_guest_with(cfg, dir.clone(), limits).await.unwrap();
    (server, dir)
}

#[tokio::test]
async fn own_vm_bare_and_qualified_over_udp_and_tcp() {
    let up = fake_upstream(Mode::Normal).await;
    let dir = Arc::new(FakeDir::default());
    let cfg = GuestDns {
        domain: "Hutch.Test.".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: vec![up.addr],
    };
    let server = serve_guest(cfg, dir.clone()).await.unwrap();
    let (udp, tcp) = server.local_addrs();
    assert_eq!(udp.port(), tcp.port());
    for name in [
        "web",
        "web.hutch.test.",
        "WEB.Hutch.TEST",
        "vm-0a1b.hutch.test",
    ] {
        for edns in [false, true] {
            let q = query(name, RecordType::A, edns);
            for resp in [udp_ask(udp, ALICE, &q).await, tcp_ask(tcp, ALICE, &q).await] {
                assert_eq!(resp.metadata.id, 0x4242);
                assert_eq!(resp.metadata.response_code, ResponseCode::NoError, "{name}");
                assert_eq!(a_records(&resp), vec![WEB], "{name}");
                assert_eq!(resp.queries, q.queries, "the question comes back as asked");
                assert!(resp.queries[0].name().eq_case(q.queries[0].name()));
                assert!(resp.answers[0].name.eq_case(q.queries[0].name()));
                assert_eq!(resp.edns.is_some(), edns);
            }
        }
    }
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 0);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 0);
    assert!(
        dir.asked.lock().unwrap().is_empty(),
        "VM names are not egress"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn other_accounts_and_unknown_vms_are_nxdomain() {
    let up = fake_upstream(Mode::Normal).await;
    let (server, _) = guest(vec![up.addr], Limits::default()).await;
    let (udp, tcp) = server.local_addrs();
    let code = |m: hickory_proto::op::Message| (m.metadata.response_code, a_records(&m));
    let nx = (ResponseCode::NXDomain, vec![]);
    // bob's VM, asked by alice, and the other way round.
    assert_eq!(
        code(udp_ask(udp, ALICE, &query("db", RecordType::A, false)).await),
        nx
    );
    assert_eq!(
        code(tcp_ask(tcp, ALICE, &query("db.hutch.test", RecordType::A, false)).await),
        nx
    );
    assert_eq!(
        code(udp_ask(udp, BOB, &query("web.hutch.test", RecordType::A, false)).await),
        nx
    );
    assert_eq!(
        code(udp_ask(udp, BOB, &query("db.hutch.test", RecordType::A, false)).await),
        (ResponseCode::NoError, vec![DB])
    );
    for name in [
        "nosuch",
        "nosuch.hutch.test",
        "x.web.hutch.test",
        "a.b.web.hutch.test",
    ] {
        assert_eq!(
            code(udp_ask(udp, ALICE, &query(name, RecordType::A, false)).await),
            nx,
            "{name}"
        );
    }
    // AAAA and other types: empty NOERROR for a VM the client may see, else NXDOMAIN.
    for rtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
        let own = udp_ask(udp, ALICE, &query("web.hutch.test", rtype, false)).await;
        assert_eq!(code(own), (ResponseCode::NoError, vec![]));
        let other = udp_ask(udp, ALICE, &query("db", rtype, false)).await;
        assert_eq!(code(other), nx);
    }
    assert_eq!(
        up.udp_queries.load(Ordering::SeqCst),
        0,
        "hutch's names never go upstream"
    );
}

#[tokio::test]
async fn forwards_with_the_clients_id_and_reports_the_cname_chain() {
    let up = fake_upstream(Mode::Normal).await;
    let (server, dir) = guest(vec![up.addr], Limits::default()).await;
    let (udp, tcp) = server.local_addrs();
    let mut q = query("WWW.example.com", RecordType::A, true);
    q.metadata.id = 0x1234;
    let resp = udp_ask(udp, ALICE, &q).await;
    assert_eq!(resp.metadata.id, 0x1234);
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.metadata.recursion_available);
    assert_eq!(resp.queries, q.queries);
    assert!(resp.queries[0].name().eq_case(q.queries[0].name()));
    assert_eq!(resp.answers.len(), 5, "the upstream's answer, whole");
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
    let resolved = dir.resolved.lock().unwrap().clone();
    assert_eq!(
        resolved,
        vec![(
            ALICE,
            "www.example.com".to_string(),
            vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)],
            30
        )]
    );
    assert_eq!(
        dir.asked.lock().unwrap().clone(),
        vec![(ALICE, "www.example.com".to_string())]
    );

    // Over TCP, from bob, another id.
    let mut q = query("plain.example.com", RecordType::A, false);
    q.metadata.id = 0xfffe;
    let resp = tcp_ask(tcp, BOB, &q).await;
    assert_eq!(resp.metadata.id, 0xfffe);
    assert_eq!(a_records(&resp), vec![Ipv4Addr::new(192, 0, 2, 10)]);
    assert_eq!(
        dir.resolved.lock().unwrap().last().unwrap(),
        &(
            BOB,
            "plain.example.com".to_string(),
            vec![Ipv4Addr::new(192, 0, 2, 10)],
            90
        )
    );

    // The upstream's NXDOMAIN is relayed; nothing is reported.
    let before = dir.resolved.lock().unwrap().len();
    let resp = udp_ask(udp, ALICE, &query("gone.example.com", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(dir.resolved.lock().unwrap().len(), before);
}

#[tokio::test]
async fn truncated_upstream_answers_are_asked_again_over_tcp() {
    let up = fake_upstream(Mode::TruncateUdp).await;
    let (server, dir) = guest(vec![up.addr], Limits::default()).await;
    let (udp, _) = server.local_addrs();
    let resp = udp_ask(udp, ALICE, &query("www.example.com", RecordType::A, true)).await;
    assert!(!resp.metadata.truncation);
    assert_eq!(resp.answers.len(), 5);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(dir.resolved.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn answers_too_large_for_the_client_are_truncated_over_udp_only() {
    let up = fake_upstream(Mode::Normal).await;
    let (server, dir) = guest(vec![up.addr], Limits::default()).await;
    let (udp, tcp) = server.local_addrs();
    // 40 A records do not fit 512 bytes: no EDNS, so TC and no records.
    let q = query("big.example.com", RecordType::A, false);
    let resp = udp_ask(udp, ALICE, &q).await;
    assert!(resp.metadata.truncation);
    assert!(resp.answers.is_empty());
    assert_eq!(resp.metadata.id, 0x4242);
    // With EDNS (1232) they fit.
    let resp = udp_ask(udp, ALICE, &query("big.example.com", RecordType::A, true)).await;
    assert!(!resp.metadata.truncation);
    assert_eq!(a_records(&resp).len(), 40);
    let resp = tcp_ask(tcp, ALICE, &q).await;
    assert_eq!(a_records(&resp).len(), 40);
    assert!(dir.resolved.lock().unwrap().iter().all(|r| r.2.len() == 40));
}

#[tokio::test]
async fn names_the_rules_refuse_never_reach_the_upstream() {
    let up = fake_upstream(Mode::Normal).await;
    let (server, dir) = guest(vec![up.addr], Limits::default()).await;
    let (udp, tcp) = server.local_addrs();
    for name in ["blocked.org", "example.com.evil.org", "com"] {
        let resp = udp_ask(udp, ALICE, &query(name, RecordType::A, false)).await;
        let want = if name == "com" {
            ResponseCode::NXDomain
        } else {
            ResponseCode::Refused
        };
        assert_eq!(resp.metadata.response_code, want, "{name}");
        let resp = tcp_ask(tcp, ALICE, &query(name, RecordType::A, false)).await;
        assert_eq!(resp.metadata.response_code, want, "{name}");
    }
    // A label holding a dot would read "x.example.com" as text: refused before the rules.
    let sneaky = Name::from_labels(vec![&b"x.example"[..], b"com"]).unwrap();
    let mut q = query("placeholder.test", RecordType::A, false);
    q.queries[0].set_name(sneaky);
    let resp = udp_ask(udp, ALICE, &q).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::Refused);
    // A zone transfer of an allowed name is refused too.
    let resp = tcp_ask(tcp, ALICE, &query("example.com", RecordType::AXFR, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::Refused);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 0);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 0);
    assert!(dir.resolved.lock().unwrap().is_empty());
    let asked: Vec<String> = dir
        .asked
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.1.clone())
        .collect();
    assert!(asked.contains(&"blocked.org".to_string()));
    assert!(!asked.iter().any(|a| a.starts_with("x")), "{asked:?}");
}

#[tokio::test]
async fn upstream_down_is_servfail_in_bounded_time() {
    let dead = dead_address().await;
    let silent = fake_upstream(Mode::Silent).await;
    let limits = Limits {
        upstream_timeout: Duration::from_millis(600),
        ..Limits::default()
    };
    let (server, dir) = guest(vec![dead, silent.addr], limits.clone()).await;
    let (udp, tcp) = server.local_addrs();
    let start = Instant::now();
    let resp = udp_ask(
        udp,
        ALICE,
        &query("plain.example.com", RecordType::A, false),
    )
    .await;
    let took = start.elapsed();
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(resp.metadata.id, 0x4242);
    assert!(
        took >= Duration::from_millis(500),
        "the silent server was waited for: {took:?}"
    );
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(silent.udp_queries.load(Ordering::SeqCst), 1);
    let start = Instant::now();
    let resp = tcp_ask(
        tcp,
        ALICE,
        &query("plain.example.com", RecordType::A, false),
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert!(start.elapsed() < Duration::from_millis(2500));
    assert!(dir.resolved.lock().unwrap().is_empty());

    // No upstream at all.
    let (server, _) = guest(vec![], limits).await;
    let resp = udp_ask(
        server.local_addrs().0,
        ALICE,
        &query("plain.example.com", RecordType::A, false),
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn servers_are_tried_in_order() {
    let silent = fake_upstream(Mode::Silent).await;
    let good = fake_upstream(Mode::Normal).await;
    let limits = Limits {
        upstream_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (server, _) = guest(vec![silent.addr, good.addr], limits).await;
    let resp = udp_ask(
        server.local_addrs().0,
        ALICE,
        &query("plain.example.com", RecordType::A, false),
    )
    .await;
    assert_eq!(a_records(&resp), vec![Ipv4Addr::new(192, 0, 2, 10)]);
    assert_eq!(silent.udp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(good.udp_queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstream_answers_to_other_queries_are_dropped() {
    let junk = fake_upstream(Mode::JunkFirst).await;
    let (server, dir) = guest(vec![junk.addr], Limits::default()).await;
    let resp = udp_ask(
        server.local_addrs().0,
        ALICE,
        &query("plain.example.com", RecordType::A, false),
    )
    .await;
    assert_eq!(
        a_records(&resp),
        vec![Ipv4Addr::new(192, 0, 2, 10)],
        "not 6.6.6.6"
    );
    assert_eq!(
        dir.resolved.lock().unwrap()[0].2,
        vec![Ipv4Addr::new(192, 0, 2, 10)]
    );
    // The upstream saw a random id of ours, never the client's.
    assert_eq!(junk.ids.lock().unwrap().len(), 1);

    let wrong = fake_upstream(Mode::WrongIdOnly).await;
    let limits = Limits {
        upstream_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let (server, dir) = guest(vec![wrong.addr], limits).await;
    let resp = udp_ask(
        server.local_addrs().0,
        ALICE,
        &query("plain.example.com", RecordType::A, false),
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert!(dir.resolved.lock().unwrap().is_empty());
}

#[tokio::test]
async fn too_many_upstream_queries_in_flight_is_servfail_at_once() {
    let silent = fake_upstream(Mode::Silent).await;
    let limits = Limits {
        max_upstream_in_flight: 1,
        upstream_timeout: Duration::from_millis(1500),
        ..Limits::default()
    };
    let (server, _) = guest(vec![silent.addr], limits).await;
    let udp = server.local_addrs().0;
    let first = tokio::spawn(async move {
        udp_ask(
            udp,
            ALICE,
            &query("plain.example.com", RecordType::A, false),
        )
        .await
    });
    // Let the first one reach the upstream.
    for _ in 0..100 {
        if silent.udp_queries.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(silent.udp_queries.load(Ordering::SeqCst), 1);
    let start = Instant::now();
    let resp = udp_ask(udp, BOB, &query("www.example.com", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        silent.udp_queries.load(Ordering::SeqCst),
        1,
        "the second was not forwarded"
    );
    // VM names are still answered meanwhile.
    let resp = udp_ask(udp, ALICE, &query("web", RecordType::A, false)).await;
    assert_eq!(a_records(&resp), vec![WEB]);
    assert_eq!(
        first.await.unwrap().metadata.response_code,
        ResponseCode::ServFail
    );
}

#[tokio::test]
async fn shutdown_closes_the_sockets() {
    let (server, _) = guest(vec![], Limits::default()).await;
    let (udp, tcp) = server.local_addrs();
    assert_eq!(
        a_records(&udp_ask(udp, ALICE, &query("web", RecordType::A, false)).await),
        vec![WEB]
    );
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(tcp).await.is_err());
    let none = udp_ask_within(
        udp,
        ALICE,
        &query("web", RecordType::A, false),
        Duration::from_millis(300),
    )
    .await;
    assert!(none.is_none());
}
