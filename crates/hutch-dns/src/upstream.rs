//! Forwarding one question to the upstream servers: UDP from a fresh socket per try (random
//! source port, random id), TCP when the answer is truncated, servers in order, each bounded in
//! time. Answers that do not match the id and the question are dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use crate::server::MAX_UDP;

/// Receive buffer for upstream UDP answers; a datagram that fills it is taken as cut short and
/// the question is asked again over TCP.
const UDP_RECV: usize = 4096;
/// How many CNAMEs are followed when collecting the addresses of an answer.
const MAX_CHAIN: usize = 16;

/// Why one server gave no usable answer.
enum Miss {
    /// Over UDP: truncated (or too large for the buffer); ask again over TCP.
    Truncated,
    /// Anything else: next server.
    Failed(String),
}

/// Asks `servers` in order for `question`, each for at most `per_server` (UDP and the TCP retry
/// together). The first matching answer whose code is not SERVFAIL, REFUSED, NOTIMP or FORMERR
/// is returned; None when there is none.
pub(crate) async fn ask(
    servers: &[SocketAddr],
    question: &Query,
    dnssec_ok: bool,
    checking_disabled: bool,
    per_server: Duration,
) -> Option<Message> {
    for &server in servers {
        let mut req = Message::query();
        req.metadata.recursion_desired = true;
        req.metadata.checking_disabled = checking_disabled;
        req.add_query(question.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP as u16);
        edns.set_dnssec_ok(dnssec_ok);
        req.set_edns(edns);
        let Ok(bytes) = req.to_vec() else {
            return None;
        };
        let attempt = async {
            match over_udp(server, &bytes, req.metadata.id, question).await {
                Err(Miss::Truncated) => over_tcp(server, &bytes, req.metadata.id, question).await,
                other => other,
            }
        };
        match timeout(per_server, attempt).await {
            Ok(Ok(answer)) => match answer.metadata.response_code {
                ResponseCode::ServFail
                | ResponseCode::Refused
                | ResponseCode::NotImp
                | ResponseCode::FormErr => {
                    tracing::debug!(%server, code = %answer.metadata.response_code,
                        "dns: upstream failed the question");
                }
                _ => return Some(answer),
            },
            Ok(Err(Miss::Failed(why))) => tracing::debug!(%server, "dns: upstream: {why}"),
            Ok(Err(Miss::Truncated)) => {}
            Err(_) => tracing::debug!(%server, "dns: upstream timed out"),
        }
    }
    None
}

/// Whether `answer` is the answer to the query with `id` and `question`.
fn matches(answer: &Message, id: u16, question: &Query) -> bool {
    answer.metadata.message_type == MessageType::Response
        && answer.metadata.id == id
        && answer.metadata.op_code == OpCode::Query
        && answer.queries.len() == 1
        && answer.queries[0].name() == question.name()
        && answer.queries[0].query_type() == question.query_type()
        && answer.queries[0].query_class() == question.query_class()
}

async fn over_udp(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, Miss> {
    let fail = |what: &str, e: std::io::Error| Miss::Failed(format!("udp {what}: {e}"));
    let local: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.map_err(|e| fail("bind", e))?;
    // Connected: the kernel drops datagrams from any other address.
    sock.connect(server).await.map_err(|e| fail("connect", e))?;
    sock.send(bytes).await.map_err(|e| fail("send", e))?;
    let mut buf = vec![0u8; UDP_RECV];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|e| fail("receive", e))?;
        if n >= buf.len() {
            return Err(Miss::Truncated);
        }
        let Ok(answer) = Message::from_vec(&buf[..n]) else {
            tracing::debug!(%server, "dns: dropped a malformed upstream answer");
            continue;
        };
        if !matches(&answer, id, question) {
            tracing::debug!(%server, "dns: dropped an upstream answer to another question");
            continue;
        }
        if answer.metadata.truncation {
            return Err(Miss::Truncated);
        }
        return Ok(answer);
    }
}

async fn over_tcp(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, Miss> {
    let fail = |what: &str, e: std::io::Error| Miss::Failed(format!("tcp {what}: {e}"));
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(|e| fail("connect", e))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    // A query with one question is far below 65535 bytes.
    framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    framed.extend_from_slice(bytes);
    stream
        .write_all(&framed)
        .await
        .map_err(|e| fail("send", e))?;
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| fail("receive", e))?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| fail("receive", e))?;
    let answer =
        Message::from_vec(&buf).map_err(|e| Miss::Failed(format!("tcp: malformed answer: {e}")))?;
    if !matches(&answer, id, question) {
        return Err(Miss::Failed("tcp: answer to another question".into()));
    }
    Ok(answer)
}

/// The IPv4 addresses `answer` gives for `name`: its A records and those of the CNAME chain
/// that starts at `name` (in the answer section, class IN), with the least TTL of the records
/// used. Empty when there are none.
pub(crate) fn addresses(answer: &Message, name: &Name) -> (Vec<Ipv4Addr>, u32) {
    let mut chain = vec![name.clone()];
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let next = answer.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target)
                if r.dns_class == DNSClass::IN
                    && chain.last() == Some(&r.name)
                    && !chain.contains(&target.0) =>
            {
                Some((target.0.clone(), r.ttl))
            }
            _ => None,
        });
        let Some((target, t)) = next else { break };
        chain.push(target);
        ttl = ttl.min(t);
    }
    let mut addrs = Vec::new();
    for r in &answer.answers {
        if let RData::A(a) = &r.data {
            if r.dns_class == DNSClass::IN && chain.contains(&r.name) {
                if !addrs.contains(&a.0) {
                    addrs.push(a.0);
                }
                ttl = ttl.min(r.ttl);
            }
        }
    }
    if addrs.is_empty() {
        ttl = 0;
    }
    (addrs, ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::Record;

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn follows_the_chain_only() {
        let mut m = Message::response(1, OpCode::Query);
        m.add_answer(Record::from_rdata(
            n("www.example.com."),
            300,
            RData::CNAME(CNAME(n("Edge.CDN.net."))),
        ));
        m.add_answer(Record::from_rdata(
            n("edge.cdn.net."),
            60,
            RData::CNAME(CNAME(n("e1.cdn.net."))),
        ));
        m.add_answer(Record::from_rdata(
            n("e1.cdn.net."),
            120,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m.add_answer(Record::from_rdata(
            n("e1.cdn.net."),
            30,
            RData::A(A::new(192, 0, 2, 2)),
        ));
        // Not on the chain: must not be collected.
        m.add_answer(Record::from_rdata(
            n("other.example."),
            5,
            RData::A(A::new(198, 51, 100, 9)),
        ));
        let (addrs, ttl) = addresses(&m, &n("WWW.example.com."));
        assert_eq!(
            addrs,
            vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]
        );
        assert_eq!(ttl, 30);
    }

    #[test]
    fn cname_loop_ends() {
        let mut m = Message::response(1, OpCode::Query);
        m.add_answer(Record::from_rdata(
            n("a.example."),
            10,
            RData::CNAME(CNAME(n("b.example."))),
        ));
        m.add_answer(Record::from_rdata(
            n("b.example."),
            10,
            RData::CNAME(CNAME(n("a.example."))),
        ));
        assert_eq!(addresses(&m, &n("a.example.")), (vec![], 0));
    }
}
