//! The UDP and TCP loops both listeners share: parsing, bounds, framing and truncation. What to
//! answer is the [`Handler`]'s business.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::{DnsError, Limits};

/// The largest UDP answer sent to a client that did not advertise more (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// The largest UDP answer sent at all, whatever the client advertises (the DNS flag day value:
/// fits every path MTU without fragmentation).
pub(crate) const MAX_UDP: usize = 1232;
/// The largest TCP answer (the length prefix is 16 bits).
const MAX_TCP: usize = 65535;

/// What a handler does with one query.
pub(crate) enum Step {
    /// Answer this now.
    Reply(Message),
    /// Answer with what the future gives (None: no answer; over TCP the connection is closed).
    /// A handler returns this only while holding a bounded permit, so the number of pending
    /// futures stays bounded.
    Later(Pin<Box<dyn Future<Output = Option<Message>> + Send>>),
}

pub(crate) trait Handler: Send + Sync + 'static {
    /// `query` parsed and known to be a query (QR clear); `client` is the peer address.
    fn handle(&self, client: SocketAddr, query: Message) -> Step;
}

/// Parses a client's message; None for anything that is not a well-formed query.
fn parse_query(bytes: &[u8]) -> Option<Message> {
    let msg = Message::from_vec(bytes).ok()?;
    if msg.metadata.message_type != MessageType::Query {
        return None;
    }
    Some(msg)
}

/// How large a UDP answer to `query` may be: what it advertises in EDNS, within 512..=1232.
fn udp_limit(query: &Message) -> usize {
    match &query.edns {
        Some(edns) => usize::from(edns.max_payload()).clamp(CLASSIC_UDP, MAX_UDP),
        None => CLASSIC_UDP,
    }
}

/// Encodes `resp` in at most `limit` bytes: whole, else with the records dropped and TC set
/// (the client retries over TCP), else not at all.
pub(crate) fn encode(resp: &Message, limit: usize) -> Option<Vec<u8>> {
    match resp.to_vec() {
        Ok(bytes) if bytes.len() <= limit => return Some(bytes),
        Ok(_) => {}
        Err(e) => tracing::debug!("dns: answer does not encode: {e}"),
    }
    let short = resp.truncate().to_vec().ok()?;
    (short.len() <= limit).then_some(short)
}

/// Binds UDP and TCP on `listen`; with port 0, one port free for both.
pub(crate) async fn bind(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let bind_err = |source| DnsError::Bind {
        addr: listen,
        source,
    };
    let mut last = None;
    for _ in 0..if listen.port() == 0 { 8 } else { 1 } {
        let udp = UdpSocket::bind(listen).await.map_err(bind_err)?;
        let addr = udp.local_addr().map_err(bind_err)?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(bind_err(last.unwrap_or_else(|| {
        std::io::Error::other("no port free for both UDP and TCP")
    })))
}

pub(crate) async fn udp_loop<H: Handler>(
    sock: Arc<UdpSocket>,
    handler: Arc<H>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    // One byte more than accepted, so an oversized datagram is seen as such.
    let mut buf = vec![0u8; limits.max_query_len + 1];
    let mut pending = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = pending.join_next(), if !pending.is_empty() => {}
            received = sock.recv_from(&mut buf) => {
                let (n, peer) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!("dns: udp receive: {e}");
                        continue;
                    }
                };
                if n > limits.max_query_len {
                    continue;
                }
                let Some(query) = parse_query(&buf[..n]) else {
                    tracing::trace!(%peer, "dns: dropped a malformed datagram");
                    continue;
                };
                let limit = udp_limit(&query);
                match handler.handle(peer, query) {
                    Step::Reply(resp) => send_udp(&sock, peer, &resp, limit).await,
                    Step::Later(fut) => {
                        let sock = sock.clone();
                        pending.spawn(async move {
                            if let Some(resp) = fut.await {
                                send_udp(&sock, peer, &resp, limit).await;
                            }
                        });
                    }
                }
            }
        }
    }
}

async fn send_udp(sock: &UdpSocket, peer: SocketAddr, resp: &Message, limit: usize) {
    let Some(bytes) = encode(resp, limit) else {
        return;
    };
    if let Err(e) = sock.send_to(&bytes, peer).await {
        tracing::debug!(%peer, "dns: udp send: {e}");
    }
}

pub(crate) async fn tcp_loop<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_tcp_connections));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: do not spin.
                        tracing::debug!("dns: tcp accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "dns: tcp connection refused, at the limit");
                    drop(stream);
                    continue;
                };
                let handler = handler.clone();
                let limits = limits.clone();
                conns.spawn(async move {
                    serve_conn(stream, peer, handler, limits).await;
                    drop(slot);
                });
            }
        }
    }
}

/// Serves length-prefixed queries on one connection, one at a time, until the peer goes away,
/// sends something malformed or oversized, or is idle for `limits.tcp_idle`.
async fn serve_conn<H: Handler>(
    mut stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    limits: Limits,
) {
    let idle = limits.tcp_idle;
    loop {
        let mut len = [0u8; 2];
        if !matches!(timeout(idle, stream.read_exact(&mut len)).await, Ok(Ok(_))) {
            return;
        }
        let n = usize::from(u16::from_be_bytes(len));
        if n == 0 || n > limits.max_query_len {
            tracing::debug!(%peer, len = n, "dns: tcp message length out of bounds");
            return;
        }
        let mut buf = vec![0u8; n];
        if !matches!(timeout(idle, stream.read_exact(&mut buf)).await, Ok(Ok(_))) {
            return;
        }
        let Some(query) = parse_query(&buf) else {
            tracing::debug!(%peer, "dns: malformed tcp message, closing");
            return;
        };
        let resp = match handler.handle(peer, query) {
            Step::Reply(resp) => resp,
            Step::Later(fut) => match fut.await {
                Some(resp) => resp,
                None => return,
            },
        };
        let Some(bytes) = encode(&resp, MAX_TCP) else {
            return;
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        // encode() bounds the length to 65535.
        framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        framed.extend_from_slice(&bytes);
        if !matches!(timeout(idle, stream.write_all(&framed)).await, Ok(Ok(_))) {
            return;
        }
    }
}
