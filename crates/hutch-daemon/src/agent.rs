//! The host side of the agent protocol: one multiplexed connection per VM over the unix socket
//! QEMU serves for the VM's virtio-serial port.
//!
//! Everything the guest can make hutchd hold is bounded:
//! - each stream queues at most [`WINDOW`](hutch_proto::WINDOW) bytes of output (the agent may send only what it has
//!   credit for; credit goes back as the stream's consumer takes data) and [`MAX_CONTROL_QUEUED`]
//!   bytes of control messages; a connection has at most [`MAX_STREAMS`] streams;
//! - the decoder holds at most one frame of [`MAX_PAYLOAD`](hutch_proto::MAX_PAYLOAD) bytes;
//! - what goes to the guest waits in a bounded queue (stdin data, [`OUT_QUEUE`] chunks) or in a
//!   small control lane (requests, signals, cancels, coalesced credit; [`MAX_CONTROL_OUT`] frames).
//!
//! A guest that breaks the protocol (a malformed or oversized frame, data beyond its credit, an
//! excessive grant, a flood of control messages) loses its connection: every open stream ends
//! with [`AgentError::Lost`], and the client reconnects with a fresh handshake (the agent then
//! kills what the old connection started). The socket path stays the client's, so callers keep
//! one [`AgentClient`] per VM across reconnections.

use hutch_proto::credit::{RecvCredit, SendCredit};
use hutch_proto::{Decoder, Frame, Hello, HelloAck, Kind, Request, Response};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Notify};

/// Streams one connection may have open at once.
pub const MAX_STREAMS: usize = 256;
/// Control-message bytes (responses) one stream may have queued unread.
pub const MAX_CONTROL_QUEUED: usize = 512 * 1024;
/// Stdin chunks waiting for the connection's writer.
pub const OUT_QUEUE: usize = 16;
/// Control frames (requests, signals, cancels) waiting for the writer.
pub const MAX_CONTROL_OUT: usize = 4096;
/// Largest stdin chunk sent in one frame.
const STDIN_CHUNK: usize = 64 * 1024;
/// How long a reconnection waits for the agent's handshake answer.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("connection to the guest agent was lost")]
    Lost,
    #[error("agent protocol: {0}")]
    Proto(String),
    #[error(
        "the guest agent speaks protocol v{agent}, hutchd v{host}: the VM boots an old or foreign \
         hutch-agent; rebuild it (`make agent`) and restart the VM"
    )]
    Version { agent: u32, host: u32 },
    #[error("the guest agent already has {0} streams open; try again later")]
    TooManyStreams(usize),
    #[error("the guest agent is not taking input")]
    Busy,
    #[error("the stream has ended")]
    Closed,
}

/// One stream's share of the connection.
#[derive(Default)]
struct Slot {
    st: Mutex<SlotState>,
    readable: Notify,
    writable: Notify,
}

#[derive(Default)]
struct SlotState {
    queue: VecDeque<Frame>,
    recv: RecvCredit,
    send: SendCredit,
    control_bytes: usize,
    /// The final answer arrived: no more input is taken.
    finished: bool,
    /// The connection is gone.
    lost: bool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct ControlOut {
    frames: VecDeque<Frame>,
    /// Credit due to the agent per stream, coalesced.
    credit: HashMap<u32, u32>,
}

/// One live connection.
struct Conn {
    data_out: mpsc::Sender<Vec<u8>>,
    control: Mutex<ControlOut>,
    control_ready: Notify,
    routes: Mutex<HashMap<u32, Arc<Slot>>>,
    next: AtomicU32,
    alive: AtomicBool,
    /// The client to tell when this connection is lost (set once the client exists).
    owner: OnceLock<Weak<AgentClient>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Conn {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Slot>>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_control(&self, f: Frame) -> Result<(), AgentError> {
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        if c.frames.len() >= MAX_CONTROL_OUT {
            return Err(AgentError::Busy);
        }
        c.frames.push_back(f);
        drop(c);
        self.control_ready.notify_one();
        Ok(())
    }

    fn push_credit(&self, stream: u32, n: u32) {
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let due = c.credit.entry(stream).or_default();
        *due = due.saturating_add(n);
        drop(c);
        self.control_ready.notify_one();
    }

    /// Marks the connection dead and wakes every stream.
    /// Marks the connection dead, wakes every stream and has the client reconnect.
    fn lose(&self) {
        let was_alive = self.alive.swap(false, Ordering::SeqCst);
        for slot in self.routes().values() {
            slot.lock().lost = true;
            slot.readable.notify_one();
            slot.writable.notify_one();
        }
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        if was_alive {
            if let Some(client) = self.owner.get().and_then(Weak::upgrade) {
                client.reconnect();
            }
        }
    }

    /// Routes one frame from the agent; an error is a protocol violation.
    fn dispatch(&self, f: Frame) -> Result<(), String> {
        let Some(slot) = self.routes().get(&f.stream).cloned() else {
            // A stream we gave up on (or never opened): nothing is kept.
            return Ok(());
        };
        let mut st = slot.lock();
        match f.kind {
            Kind::Credit => {
                let n = f.credit_amount().map_err(|e| e.to_string())?;
                st.send.grant(n).map_err(|e| e.to_string())?;
                drop(st);
                slot.writable.notify_one();
            }
            Kind::Stdout | Kind::Stderr => {
                if f.payload.is_empty() {
                    return Ok(());
                }
                st.recv
                    .received(f.payload.len())
                    .map_err(|e| format!("stream {}: {e}", f.stream))?;
                st.queue.push_back(f);
                drop(st);
                slot.readable.notify_one();
            }
            Kind::Response => {
                let len = f.payload.len();
                if st.control_bytes + len > MAX_CONTROL_QUEUED {
                    return Err(format!(
                        "stream {}: more than {MAX_CONTROL_QUEUED} bytes of unread responses",
                        f.stream
                    ));
                }
                if let Ok(
                    Response::Exited { .. } | Response::Done { .. } | Response::Error { .. },
                ) = f.parse::<Response>("response")
                {
                    st.finished = true;
                    slot.writable.notify_one();
                }
                st.control_bytes += len;
                st.queue.push_back(f);
                drop(st);
                slot.readable.notify_one();
            }
            // Host-bound kinds only; anything else from the agent is ignored.
            _ => {}
        }
        Ok(())
    }

    /// Connects and completes the handshake, retrying until `timeout` (the guest may still be
    /// booting: the handshake is answered once its root is mounted).
    async fn establish(
        socket: &Path,
        timeout: Duration,
        owner: Option<Weak<AgentClient>>,
    ) -> Result<(Arc<Conn>, HelloAck), AgentError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(_) => return Err(AgentError::Timeout(timeout)),
            }
        };
        let (rd, wr) = stream.into_split();
        let (data_out, data_rx) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
        let conn = Arc::new(Conn {
            data_out,
            control: Mutex::default(),
            control_ready: Notify::new(),
            routes: Mutex::default(),
            // Stream ids start at a random point so frames of an earlier connection cannot be
            // mistaken for ours.
            next: AtomicU32::new(rand::random::<u32>() | 1),
            alive: AtomicBool::new(true),
            owner: OnceLock::new(),
            tasks: Mutex::default(),
        });
        if let Some(o) = owner {
            // Before any frame is read, so a loss right after the handshake reconnects too.
            let _ = conn.owner.set(o);
        }
        let nonce: u64 = rand::random();
        let (hello_tx, mut hello_rx) = mpsc::channel::<HelloAck>(4);
        let w = tokio::spawn(writer(conn.clone(), wr, data_rx));
        let r = tokio::spawn(reader(conn.clone(), rd, nonce, hello_tx));
        conn.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([w.abort_handle(), r.abort_handle()]);
        let hello = Frame::json(
            Kind::Hello,
            0,
            &Hello {
                nonce,
                version: hutch_proto::VERSION,
            },
        );
        let result = loop {
            if !conn.alive.load(Ordering::SeqCst) {
                break Err(AgentError::Lost);
            }
            conn.push_control(hello.clone())?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(AgentError::Timeout(timeout));
            }
            match tokio::time::timeout(left.min(Duration::from_secs(2)), hello_rx.recv()).await {
                Ok(Some(ack)) if ack.version != hutch_proto::VERSION => {
                    break Err(AgentError::Version {
                        agent: ack.version,
                        host: hutch_proto::VERSION,
                    })
                }
                Ok(Some(ack)) => break Ok(ack),
                Ok(None) => break Err(AgentError::Lost),
                Err(_) => continue, // resend the hello
            }
        };
        match result {
            Ok(ack) => Ok((conn, ack)),
            Err(e) => {
                conn.lose();
                Err(e)
            }
        }
    }
}

async fn writer(
    conn: Arc<Conn>,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut data: mpsc::Receiver<Vec<u8>>,
) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        {
            let mut c = conn.control.lock().unwrap_or_else(|e| e.into_inner());
            for f in c.frames.drain(..) {
                let _ = f.encode_into(&mut buf);
            }
            for (stream, n) in c.credit.drain() {
                let _ = Frame::credit(stream, n).encode_into(&mut buf);
            }
        }
        if buf.is_empty() {
            tokio::select! {
                biased;
                _ = conn.control_ready.notified() => continue,
                b = data.recv() => match b {
                    Some(b) => buf = b,
                    None => break,
                },
            }
        }
        if wr.write_all(&buf).await.is_err() {
            break;
        }
    }
    conn.lose();
}

async fn reader(
    conn: Arc<Conn>,
    mut rd: tokio::net::unix::OwnedReadHalf,
    nonce: u64,
    hello: mpsc::Sender<HelloAck>,
) {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut synced = false;
    let violation = 'conn: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break None,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        loop {
            if !synced {
                // Until our hello is answered, skip whatever an earlier connection left.
                let Some(f) = dec.next_frame() else { break };
                if let (Kind::Hello, Ok(ack)) = (f.kind, f.parse::<HelloAck>("hello")) {
                    if ack.nonce == nonce {
                        synced = true;
                        let _ = hello.try_send(ack);
                    }
                }
                continue;
            }
            match dec.next_frame_strict() {
                Ok(Some(f)) => {
                    if let Err(e) = conn.dispatch(f) {
                        break 'conn Some(e);
                    }
                }
                Ok(None) => break,
                Err(e) => break 'conn Some(e.to_string()),
            }
        }
    };
    if let Some(e) = &violation {
        tracing::warn!(error = %e, "the guest agent broke the protocol; dropping its connection");
    }
    conn.lose();
}

/// A VM's agent connection, re-established when lost while the VM runs.
pub struct AgentClient {
    socket: PathBuf,
    conn: Mutex<Arc<Conn>>,
    reconnecting: AtomicBool,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.conn().lose();
    }
}

/// Frames of one stream, as they arrive.
pub struct AgentStream {
    pub id: u32,
    pub rx: StreamRx,
}

/// The receiving end of a stream; taking frames returns credit to the agent.
pub struct StreamRx {
    id: u32,
    slot: Arc<Slot>,
    conn: Arc<Conn>,
}

impl StreamRx {
    /// The next frame; None once the connection is lost and everything queued was taken.
    pub async fn recv(&mut self) -> Option<Frame> {
        loop {
            {
                let mut st = self.slot.lock();
                if let Some(f) = st.queue.pop_front() {
                    if f.is_data() {
                        if let Some(g) = st.recv.consumed(f.payload.len()) {
                            self.conn.push_credit(self.id, g);
                        }
                    } else {
                        st.control_bytes -= f.payload.len();
                    }
                    return Some(f);
                }
                if st.lost {
                    return None;
                }
            }
            self.slot.readable.notified().await;
        }
    }

    /// The next frame within `limit`: a guest that never answers is an error, not a hang.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Frame, AgentError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(AgentError::Lost),
            Err(_) => Err(AgentError::Timeout(limit)),
        }
    }
}

impl Drop for StreamRx {
    fn drop(&mut self) {
        self.conn.routes().remove(&self.id);
        self.conn
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .credit
            .remove(&self.id);
        let finished = self.slot.lock().finished;
        if !finished && self.conn.alive.load(Ordering::SeqCst) {
            // Stop the producer (and process) of a stream nobody reads any more.
            let _ = self
                .conn
                .push_control(Frame::json(Kind::Request, self.id, &Request::Cancel));
        }
    }
}

impl AgentClient {
    /// Connects to the agent socket and completes the handshake, retrying until `timeout`.
    pub async fn connect(
        socket: &Path,
        timeout: Duration,
    ) -> Result<(Arc<AgentClient>, HelloAck), AgentError> {
        let (conn, ack) = Conn::establish(socket, timeout, None).await?;
        let client = Arc::new(AgentClient {
            socket: socket.to_path_buf(),
            conn: Mutex::new(conn.clone()),
            reconnecting: AtomicBool::new(false),
        });
        let _ = conn.owner.set(Arc::downgrade(&client));
        if !conn.alive.load(Ordering::SeqCst) {
            client.clone().reconnect();
        }
        Ok((client, ack))
    }

    fn conn(&self) -> Arc<Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_alive(&self) -> bool {
        self.conn().alive.load(Ordering::SeqCst)
    }

    /// Re-establishes a lost connection in the background, for as long as the client is in use.
    fn reconnect(self: Arc<Self>) {
        if self.reconnecting.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            let mut attempts = 0u32;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(me) = weak.upgrade() else { return };
                attempts += 1;
                match Conn::establish(&me.socket, RECONNECT_TIMEOUT, Some(weak.clone())).await {
                    Ok((conn, _)) => {
                        *me.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
                        me.reconnecting.store(false, Ordering::SeqCst);
                        if me.is_alive() {
                            tracing::info!(socket = %me.socket.display(), attempts, "agent connection re-established");
                            return;
                        }
                        // Lost again before it was installed: keep trying, unless a loss
                        // noticed after the install started another attempt.
                        if me.reconnecting.swap(true, Ordering::SeqCst) {
                            return;
                        }
                    }
                    Err(e) => {
                        if attempts == 1 {
                            tracing::warn!(socket = %me.socket.display(), error = %e, "reconnecting to the guest agent");
                        }
                        drop(me);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// Opens a stream with `req`.
    pub fn open(self: &Arc<Self>, req: &Request) -> Result<AgentStream, AgentError> {
        let conn = self.conn();
        if !conn.alive.load(Ordering::SeqCst) {
            self.clone().reconnect();
            return Err(AgentError::Lost);
        }
        let slot = Arc::new(Slot::default());
        let id = {
            let mut routes = conn.routes();
            if routes.len() >= MAX_STREAMS {
                return Err(AgentError::TooManyStreams(routes.len()));
            }
            let id = loop {
                let id = conn.next.fetch_add(1, Ordering::SeqCst);
                if id != 0 && !routes.contains_key(&id) {
                    break id;
                }
            };
            routes.insert(id, slot.clone());
            id
        };
        let rx = StreamRx {
            id,
            slot,
            conn: conn.clone(),
        };
        conn.push_control(Frame::json(Kind::Request, id, req))?;
        Ok(AgentStream { id, rx })
    }

    /// Sends a control frame (signal, resize) without waiting; stdin goes through
    /// [`AgentClient::send_stdin`], which keeps to the stream's credit.
    pub fn send(&self, frame: Frame) -> Result<(), AgentError> {
        if frame.payload.len() > hutch_proto::MAX_PAYLOAD {
            return Err(AgentError::Proto(format!(
                "a {}-byte frame is over the limit",
                frame.payload.len()
            )));
        }
        let conn = self.conn();
        match frame.kind {
            Kind::Stdin | Kind::StdinEof => {
                let b = frame
                    .encode()
                    .map_err(|e| AgentError::Proto(e.to_string()))?;
                conn.data_out.try_send(b).map_err(|_| AgentError::Busy)
            }
            _ => conn.push_control(frame),
        }
    }

    /// Sends `data` as stdin of `stream`, waiting for credit: a process that does not read its
    /// stdin stalls its sender here, and nothing piles up in hutchd.
    pub async fn send_stdin(&self, stream: u32, mut data: &[u8]) -> Result<(), AgentError> {
        let conn = self.conn();
        let slot = conn
            .routes()
            .get(&stream)
            .cloned()
            .ok_or(AgentError::Closed)?;
        while !data.is_empty() {
            let n = {
                let mut st = slot.lock();
                if st.lost {
                    return Err(AgentError::Lost);
                }
                if st.finished {
                    return Err(AgentError::Closed);
                }
                st.send.take(data.len().min(STDIN_CHUNK))
            };
            if n == 0 {
                slot.writable.notified().await;
                continue;
            }
            let b = Frame::new(Kind::Stdin, stream, data[..n].to_vec())
                .encode()
                .map_err(|e| AgentError::Proto(e.to_string()))?;
            conn.data_out.send(b).await.map_err(|_| AgentError::Lost)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Ends the stdin of `stream` (after everything sent before).
    pub async fn send_eof(&self, stream: u32) -> Result<(), AgentError> {
        let b = Frame::new(Kind::StdinEof, stream, Vec::new())
            .encode()
            .map_err(|e| AgentError::Proto(e.to_string()))?;
        self.conn()
            .data_out
            .send(b)
            .await
            .map_err(|_| AgentError::Lost)
    }

    /// Streams currently open on the live connection (for tests and health).
    pub fn open_streams(&self) -> usize {
        self.conn().routes().len()
    }
}

#[cfg(test)]
mod tests {
    //! The client against a fake agent on a unix socket (the layer below the client).
    use super::*;
    use tokio::net::UnixListener;

    /// Accepts one connection, answers the hello with `version`, then runs `then`.
    async fn fake_agent<F, Fut>(l: &UnixListener, version: u32, then: F)
    where
        F: FnOnce(UnixStream, Decoder) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (mut s, _) = l.accept().await.unwrap();
        let mut dec = Decoder::new();
        let mut buf = vec![0u8; 4096];
        let hello: Hello = loop {
            let n = s.read(&mut buf).await.unwrap();
            dec.push(&buf[..n]);
            if let Some(f) = dec.next_frame() {
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
        let b = Frame::json(Kind::Hello, 0, &ack).encode().unwrap();
        s.write_all(&b).await.unwrap();
        then(s, dec).await;
    }

    /// Reads frames until a request arrives; returns its stream id.
    async fn next_request(s: &mut UnixStream, dec: &mut Decoder) -> u32 {
        let mut buf = vec![0u8; 4096];
        loop {
            while let Some(f) = dec.next_frame() {
                if f.kind == Kind::Request {
                    return f.stream;
                }
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "host closed");
            dec.push(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn mismatched_agent_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = async { fake_agent(&l, 1, |_, _| async {}).await };
        let (_, r) = tokio::join!(server, AgentClient::connect(&sock, Duration::from_secs(5)));
        let e = r.err().expect("a v1 agent must be refused");
        assert!(
            matches!(e, AgentError::Version { agent: 1, host: 2 }),
            "{e}"
        );
        assert!(e.to_string().contains("make agent"), "{e}");
    }

    #[tokio::test]
    async fn data_beyond_credit_or_oversized_drops_and_reconnects() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let (client_tx, mut client_rx) = mpsc::channel(1);
        let (hung_up_tx, mut hung_up) = mpsc::channel::<()>(1);
        let sock2 = sock.clone();
        let host = tokio::spawn(async move {
            let (c, _) = AgentClient::connect(&sock2, Duration::from_secs(5))
                .await
                .unwrap();
            let mut s = c.open(&Request::Health).unwrap();
            // Nothing is consumed (so no credit returned) until the agent has been cut off.
            hung_up.recv().await.unwrap();
            // The fake agent overruns its credit: the stream ends as lost, nothing is kept.
            let mut got = 0usize;
            while let Some(f) = s.rx.recv().await {
                got += f.payload.len();
            }
            assert!(got <= hutch_proto::WINDOW as usize, "{got}");
            client_tx.send(c).await.unwrap();
        });
        // First connection: more data than the window, never waiting for credit.
        fake_agent(&l, hutch_proto::VERSION, |mut s, mut dec| async move {
            let id = next_request(&mut s, &mut dec).await;
            let chunk = vec![0u8; 64 * 1024];
            for _ in 0..8 {
                let b = Frame::new(Kind::Stdout, id, chunk.clone())
                    .encode()
                    .unwrap();
                if s.write_all(&b).await.is_err() {
                    break;
                }
            }
            // Wait until the host hangs up.
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            hung_up_tx.send(()).await.unwrap();
        })
        .await;
        let c = client_rx.recv().await.unwrap();
        host.await.unwrap();
        // Second connection: the client came back by itself; now an oversized frame.
        fake_agent(&l, hutch_proto::VERSION, |mut s, _| async move {
            let mut h = b"HU\x04\x00\x00\x00\x00\x01".to_vec();
            h.extend_from_slice(&u32::MAX.to_be_bytes());
            s.write_all(&h).await.unwrap();
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
        // Third connection: the client reconnects again and works.
        let c2 = c.clone();
        let probe = tokio::spawn(async move {
            let ok = loop {
                if c2.is_alive() {
                    if let Ok(mut s) = c2.open(&Request::Health) {
                        break s.rx.recv_within(Duration::from_secs(5)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            ok.unwrap()
        });
        fake_agent(&l, hutch_proto::VERSION, |mut s, mut dec| async move {
            let id = next_request(&mut s, &mut dec).await;
            let r = Response::Done { bytes: 0 };
            let b = Frame::json(Kind::Response, id, &r).encode().unwrap();
            s.write_all(&b).await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
        })
        .await;
        let f = probe.await.unwrap();
        assert_eq!(f.kind, Kind::Response);
    }

    #[tokio::test]
    async fn a_silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let server = tokio::spawn(async move {
            fake_agent(&l, hutch_proto::VERSION, |s, _| async move {
                let _keep_open = s;
                let _ = rx.recv().await;
            })
            .await
        });
        let (c, _) = AgentClient::connect(&sock, Duration::from_secs(5))
            .await
            .unwrap();
        let mut s = c.open(&Request::Health).unwrap();
        let r = s.rx.recv_within(Duration::from_millis(300)).await;
        assert!(matches!(r, Err(AgentError::Timeout(_))));
        tx.send(()).await.unwrap();
        server.await.unwrap();
    }
}
