//! The public listener over real sockets on 127.0.0.1.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use hutch_dns::{serve_public, DnsServer, PublicDns};

const PROXY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);

async fn public() -> DnsServer {
    let cfg = PublicDns {
        domain: "Pub.Test".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        address: PROXY,
    };
    serve_public(cfg, Arc::new(FakeDir::default()))
        .await
        .unwrap()
}

fn has_soa(msg: &Message) -> bool {
    msg.authorities.len() == 1 && matches!(msg.authorities[0].data, RData::SOA(_))
}

#[tokio::test]
async fn answers_the_apex_public_vms_and_names_beneath_them() {
    let server = public().await;
    let (udp, tcp) = server.local_addrs();
    for name in [
        "pub.test",
        "web.pub.test",
        "API.Pub.Test",
        "x.web.pub.test",
        "a.b.c.api.pub.test",
    ] {
        for resp in [
            udp_ask(udp, ALICE, &query(name, RecordType::A, false)).await,
            tcp_ask(tcp, BOB, &query(name, RecordType::A, true)).await,
        ] {
            assert_eq!(resp.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(resp.metadata.authoritative);
            assert!(!resp.metadata.recursion_available);
            assert_eq!(a_records(&resp), vec![PROXY], "{name}");
            assert_eq!(resp.metadata.id, 0x4242);
        }
    }
    // Other types for names that exist: empty, with the SOA; the apex's SOA is answered.
    let resp = udp_ask(udp, ALICE, &query("web.pub.test", RecordType::AAAA, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.answers.is_empty() && has_soa(&resp));
    let resp = udp_ask(udp, ALICE, &query("pub.test", RecordType::SOA, false)).await;
    assert!(matches!(resp.answers[0].data, RData::SOA(_)));
}

#[tokio::test]
async fn other_names_under_the_domain_are_nxdomain() {
    let server = public().await;
    let (udp, tcp) = server.local_addrs();
    // The label right before the domain decides: `web.nosuch` is under `nosuch`.
    for name in ["nosuch.pub.test", "web.nosuch.pub.test", "db.pub.test"] {
        let resp = udp_ask(udp, ALICE, &query(name, RecordType::A, false)).await;
        assert_eq!(
            resp.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(resp.answers.is_empty());
        assert!(has_soa(&resp), "{name}");
        let resp = tcp_ask(tcp, ALICE, &query(name, RecordType::AAAA, false)).await;
        assert_eq!(
            resp.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
    }
}

#[tokio::test]
async fn names_outside_the_domain_are_refused() {
    let server = public().await;
    let (udp, tcp) = server.local_addrs();
    for name in [
        "example.com",
        "web",
        "test",
        "pub.test.example.com",
        "xpub.test",
        "web.xpub.test",
    ] {
        for resp in [
            udp_ask(udp, ALICE, &query(name, RecordType::A, false)).await,
            tcp_ask(tcp, ALICE, &query(name, RecordType::A, false)).await,
        ] {
            assert_eq!(resp.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(resp.answers.is_empty() && resp.authorities.is_empty());
        }
    }
    // No zone transfers either.
    let resp = tcp_ask(tcp, ALICE, &query("pub.test", RecordType::AXFR, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn answers_are_small() {
    let server = public().await;
    let (udp, _) = server.local_addrs();
    let q = query("web.pub.test", RecordType::A, true);
    let qlen = q.to_vec().unwrap().len();
    let resp = udp_ask(udp, ALICE, &q).await;
    let rlen = resp.to_vec().unwrap().len();
    assert!(rlen <= qlen + 100, "query {qlen} bytes, answer {rlen}");
}
