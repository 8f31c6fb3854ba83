//! Test helpers: a fake directory, a fake upstream server (UDP and TCP on 127.0.0.1), and
//! clients. Nothing here leaves the machine.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hutch_dns::Directory;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::timeout;

pub const ALICE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
pub const BOB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
pub const WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
pub const DB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 6);

/// One `resolved` call: client, fqdn, addresses, ttl.
pub type Resolved = (Ipv4Addr, String, Vec<Ipv4Addr>, u32);

/// alice (127.0.0.1) owns `web` (also called `vm-0a1b`); bob (127.0.0.2) owns `db`.
/// Names ending in `example.com` may be resolved; `web` and `api` are public.
#[derive(Default)]
pub struct FakeDir {
    pub asked: Mutex<Vec<(Ipv4Addr, String)>>,
    pub resolved: Mutex<Vec<Resolved>>,
}

impl Directory for FakeDir {
    fn vm_address(&self, client: Ipv4Addr, vm: &str) -> Option<Ipv4Addr> {
        let vms: HashMap<&str, (Ipv4Addr, Ipv4Addr)> = [
            ("web", (ALICE, WEB)),
            ("vm-0a1b", (ALICE, WEB)),
            ("db", (BOB, DB)),
        ]
        .into_iter()
        .collect();
        let (owner, addr) = vms.get(vm)?;
        (*owner == client).then_some(*addr)
    }
    fn may_resolve(&self, client: Ipv4Addr, fqdn: &str) -> bool {
        self.asked.lock().unwrap().push((client, fqdn.to_string()));
        fqdn == "example.com" || fqdn.ends_with(".example.com")
    }
    fn resolved(&self, client: Ipv4Addr, fqdn: &str, addrs: &[Ipv4Addr], ttl: u32) {
        self.resolved
            .lock()
            .unwrap()
            .push((client, fqdn.to_string(), addrs.to_vec(), ttl));
    }
    fn public_vm(&self, label: &str) -> bool {
        label == "web" || label == "api"
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Answers from its zone, truncating UDP answers larger than the query allows.
    Normal,
    /// Over UDP answers only with TC set and no records; TCP answers in full.
    TruncateUdp,
    /// First sends an answer with another id and one to another question, then the right one.
    JunkFirst,
    /// Only sends answers with another id.
    WrongIdOnly,
    /// Never answers (UDP); closes TCP connections.
    Silent,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub udp_queries: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
    /// The ids the upstream saw.
    pub ids: Arc<Mutex<Vec<u16>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn n(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// The fake upstream's zone.
fn zone(name: &Name) -> Option<Vec<Record>> {
    let lower = name.to_lowercase().to_ascii();
    let a = |owner: &str, ttl, ip: [u8; 4]| {
        Record::from_rdata(n(owner), ttl, RData::A(A::new(ip[0], ip[1], ip[2], ip[3])))
    };
    match lower.as_str() {
        "www.example.com." => Some(vec![
            Record::from_rdata(
                n("www.example.com."),
                300,
                RData::CNAME(CNAME(n("edge.cdn.test."))),
            ),
            Record::from_rdata(
                n("edge.cdn.test."),
                60,
                RData::CNAME(CNAME(n("e1.cdn.test."))),
            ),
            a("e1.cdn.test.", 120, [192, 0, 2, 1]),
            a("e1.cdn.test.", 30, [192, 0, 2, 2]),
            // Off the chain: must not reach `resolved`.
            a("unrelated.test.", 5, [198, 51, 100, 7]),
        ]),
        "plain.example.com." => Some(vec![a("plain.example.com.", 90, [192, 0, 2, 10])]),
        "big.example.com." => Some(
            (1..=40)
                .map(|i| a("big.example.com.", 100, [192, 0, 2, i]))
                .collect(),
        ),
        _ => None,
    }
}

fn zone_answer(query: &Message) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = query.queries.clone();
    match zone(query.queries[0].name()) {
        Some(records) if query.queries[0].query_type() == RecordType::A => {
            resp.answers = records;
        }
        Some(_) => {}
        None => resp.metadata.response_code = ResponseCode::NXDomain,
    }
    resp
}

fn answers(query: &Message, mode: Mode, tcp: bool) -> Vec<Message> {
    let good = zone_answer(query);
    match mode {
        Mode::Silent => vec![],
        Mode::TruncateUdp if !tcp => vec![good.truncate()],
        Mode::JunkFirst => {
            let mut wrong_id = good.clone();
            wrong_id.metadata.id = query.metadata.id.wrapping_add(1);
            wrong_id.answers = vec![Record::from_rdata(
                query.queries[0].name().clone(),
                1,
                RData::A(A::new(6, 6, 6, 6)),
            )];
            let mut wrong_q = wrong_id.clone();
            wrong_q.metadata.id = query.metadata.id;
            wrong_q.queries = vec![Query::query(n("evil.test."), RecordType::A)];
            vec![wrong_id, wrong_q, good]
        }
        Mode::WrongIdOnly => {
            let mut wrong = good;
            wrong.metadata.id = query.metadata.id.wrapping_add(1);
            vec![wrong]
        }
        _ => {
            if !tcp {
                let limit = query.edns.as_ref().map_or(512, |e| e.max_payload()) as usize;
                if good.to_vec().unwrap().len() > limit {
                    return vec![good.truncate()];
                }
            }
            vec![good]
        }
    }
}

pub async fn fake_upstream(mode: Mode) -> FakeUpstream {
    // One port for both: the kernel picks a free UDP port, whose TCP twin another process
    // may hold (tests run in parallel); then another pick.
    let mut tries = 0;
    let (udp, addr, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        match TcpListener::bind(addr).await {
            Ok(tcp) => break (udp, addr, tcp),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => tries += 1,
            Err(e) => panic!("binding the fake upstream's TCP port {addr}: {e}"),
        }
    };
    let udp_queries = Arc::new(AtomicUsize::new(0));
    let tcp_queries = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(Vec::new()));
    let (uq, uids) = (udp_queries.clone(), ids.clone());
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((len, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(query) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            uq.fetch_add(1, Ordering::SeqCst);
            uids.lock().unwrap().push(query.metadata.id);
            for resp in answers(&query, mode, false) {
                let _ = udp.send_to(&resp.to_vec().unwrap(), peer).await;
            }
        }
    });
    let (tq, tids) = (tcp_queries.clone(), ids.clone());
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                continue;
            };
            let (tq, tids) = (tq.clone(), tids.clone());
            tokio::spawn(async move {
                while let Some(query) = read_framed(&mut stream).await {
                    tq.fetch_add(1, Ordering::SeqCst);
                    tids.lock().unwrap().push(query.metadata.id);
                    let out = answers(&query, mode, true);
                    if out.is_empty() {
                        return;
                    }
                    for resp in out {
                        if write_framed(&mut stream, &resp).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    FakeUpstream {
        addr,
        udp_queries,
        tcp_queries,
        ids,
        tasks: vec![udp_task, tcp_task],
    }
}

/// An address where nothing listens (UDP nor TCP).
pub async fn dead_address() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.local_addr().unwrap()
}

pub async fn read_framed(stream: &mut TcpStream) -> Option<Message> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.ok()?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf).await.ok()?;
    Message::from_vec(&buf).ok()
}

pub async fn write_framed(stream: &mut TcpStream, msg: &Message) -> std::io::Result<()> {
    let bytes = msg.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await
}

/// A recursive query with id 0x4242 (and EDNS when `edns`).
pub fn query(name: &str, rtype: RecordType, edns: bool) -> Message {
    let mut msg = Message::new(0x4242, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    let mut name = n(name);
    name.set_fqdn(true);
    msg.add_query(Query::query(name, rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        msg.set_edns(e);
    }
    msg
}

/// Sends `msg` over UDP from `from` and waits up to `wait` for an answer with its id.
pub async fn udp_ask_within(
    server: SocketAddr,
    from: Ipv4Addr,
    msg: &Message,
    wait: Duration,
) -> Option<Message> {
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(from), 0))
        .await
        .unwrap();
    sock.connect(server).await.unwrap();
    sock.send(&msg.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let len = timeout(wait, sock.recv(&mut buf)).await.ok()?.ok()?;
    let resp = Message::from_vec(&buf[..len]).expect("the server sent a malformed answer");
    assert!(len <= 1232, "UDP answer of {len} bytes");
    Some(resp)
}

pub async fn udp_ask(server: SocketAddr, from: Ipv4Addr, msg: &Message) -> Message {
    udp_ask_within(server, from, msg, Duration::from_secs(8))
        .await
        .expect("no UDP answer")
}

pub async fn tcp_connect(server: SocketAddr, from: Ipv4Addr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    sock.connect(server).await.unwrap()
}

pub async fn tcp_ask(server: SocketAddr, from: Ipv4Addr, msg: &Message) -> Message {
    let mut stream = tcp_connect(server, from).await;
    write_framed(&mut stream, msg).await.unwrap();
    timeout(Duration::from_secs(8), read_framed(&mut stream))
        .await
        .expect("no TCP answer in time")
        .expect("no TCP answer")
}

/// Whether the server closes `stream` within `wait` (EOF or reset, having sent nothing).
pub async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    match timeout(wait, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => panic!("the server sent something"),
        Err(_) => false,
    }
}

pub fn a_records(msg: &Message) -> Vec<Ipv4Addr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}
