//! The multiplexed connection under [`AgentClient`]: handshake, the reader and writer tasks,
//! per-stream queues and credit, protocol-violation handling and reconnection. Everything the
//! guest can make hutchd hold is bounded here (see the module doc of [`crate::agent`]).
//!
//! Streams are opened with [`AgentClient::open`], which gives a [`RawStream`]: the
//! [`Transport`] the typed streams of [`super::stream`] are built on. Nothing outside the agent
//! module sees frames.

use super::stream::{Incoming, Transport};
use super::AgentError;
use futures_util::future::BoxFuture;
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

/// What a stream has received and its consumer not yet taken.
enum Queued {
    /// Stdout or Stderr bytes, counted against the stream's window.
    Data(Kind, Vec<u8>),
    /// A decoded response and its size on the wire (counted against [`MAX_CONTROL_QUEUED`]).
    Answer(Response, usize),
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
    queue: VecDeque<Queued>,
    recv: RecvCredit,
    send: SendCredit,
    control_bytes: usize,
    /// The final answer arrived: no more input is taken.
    finished: bool,
    /// The stream's owner gave up on it: no more input is taken.
    closed: bool,
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
                st.queue.push_back(Queued::Data(f.kind, f.payload));
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
                // A response that does not decode is as malformed as a bad header.
                let r: Response = f
                    .parse("response")
                    .map_err(|e| format!("stream {}: {e}", f.stream))?;
                // A watch's events spend the stream's credit like data (returned as they are
                // taken), so a watch nobody reads stalls in the guest, not here.
                if r.counts_against_window() {
                    st.recv
                        .received(len)
                        .map_err(|e| format!("stream {}: {e}", f.stream))?;
                }
                // Every answer but `started`, `watching` and `fs_event` is a stream's last (an
                // fs, health or shutdown stream has one answer): no input is taken after it,
                // and no cancel is due.
                if r.ends_stream() {
                    st.finished = true;
                    slot.writable.notify_one();
                }
                st.control_bytes += len;
                st.queue.push_back(Queued::Answer(r, len));
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
                    tokio::time::sleep(Duration::from_millis(5)).await
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

/// A VM's agent connection, re-established when lost while the VM runs. Its typed operations
/// are those of the [`Agent`](super::Agent) trait.
pub struct AgentClient {
    socket: PathBuf,
    conn: Mutex<Arc<Conn>>,
    reconnecting: AtomicBool,
    /// This client, for the reconnection task (which must not keep it alive).
    me: Weak<AgentClient>,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.conn().lose();
    }
}

/// One open stream on one connection: its queue, its credit both ways, and the way to the
/// agent. Taking data returns credit to the agent; dropping an unfinished stream cancels it.
pub(crate) struct RawStream {
    id: u32,
    slot: Arc<Slot>,
    conn: Arc<Conn>,
}

impl RawStream {
    async fn recv_inner(&self) -> Option<Incoming> {
        loop {
            {
                let mut st = self.slot.lock();
                if let Some(q) = st.queue.pop_front() {
                    return Some(match q {
                        Queued::Data(kind, data) => {
                            if let Some(g) = st.recv.consumed(data.len()) {
                                self.conn.push_credit(self.id, g);
                            }
                            if kind == Kind::Stderr {
                                Incoming::Stderr(data.into())
                            } else {
                                Incoming::Stdout(data.into())
                            }
                        }
                        Queued::Answer(r, len) => {
                            st.control_bytes -= len;
                            if r.counts_against_window() {
                                if let Some(g) = st.recv.consumed(len) {
                                    self.conn.push_credit(self.id, g);
                                }
                            }
                            Incoming::Answer(r)
                        }
                    });
                }
                if st.lost {
                    return None;
                }
            }
            self.slot.readable.notified().await;
        }
    }

    /// Sends stdin within the stream's credit: a process that does not read its stdin stalls
    /// its sender here, and nothing piles up in hutchd.
    async fn send_inner(&self, mut data: &[u8]) -> Result<(), AgentError> {
        while !data.is_empty() {
            let n = {
                let mut st = self.slot.lock();
                if st.lost {
                    return Err(AgentError::Lost);
                }
                if st.finished || st.closed {
                    return Err(AgentError::Closed);
                }
                st.send.take(data.len().min(STDIN_CHUNK))
            };
            if n == 0 {
                self.slot.writable.notified().await;
                continue;
            }
            let b = Frame::new(Kind::Stdin, self.id, data[..n].to_vec())
                .encode()
                .map_err(|e| AgentError::Proto(e.to_string()))?;
            self.conn
                .data_out
                .send(b)
                .await
                .map_err(|_| AgentError::Lost)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Ends stdin (after everything sent before).
    async fn eof_inner(&self) -> Result<(), AgentError> {
        let b = Frame::new(Kind::StdinEof, self.id, Vec::new())
            .encode()
            .map_err(|e| AgentError::Proto(e.to_string()))?;
        self.conn
            .data_out
            .send(b)
            .await
            .map_err(|_| AgentError::Lost)
    }
}

impl Transport for RawStream {
    fn recv(&self) -> BoxFuture<'_, Option<Incoming>> {
        Box::pin(self.recv_inner())
    }

    fn send<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<(), AgentError>> {
        Box::pin(self.send_inner(data))
    }

    fn eof(&self) -> BoxFuture<'_, Result<(), AgentError>> {
        Box::pin(self.eof_inner())
    }

    fn control(&self, req: Request) -> Result<(), AgentError> {
        self.conn
            .push_control(Frame::json(Kind::Request, self.id, &req))
    }

    fn close(&self) {
        {
            let mut st = self.slot.lock();
            if st.closed {
                return;
            }
            st.closed = true;
        }
        self.slot.writable.notify_one();
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

impl Drop for RawStream {
    fn drop(&mut self) {
        self.close();
    }
}

impl AgentClient {
    /// Connects to the agent socket and completes the handshake, retrying until `timeout`.
    pub async fn connect(
        socket: &Path,
        timeout: Duration,
    ) -> Result<(Arc<AgentClient>, HelloAck), AgentError> {
        let (conn, ack) = Conn::establish(socket, timeout, None).await?;
        let client = Arc::new_cyclic(|me| AgentClient {
            socket: socket.to_path_buf(),
            conn: Mutex::new(conn.clone()),
            reconnecting: AtomicBool::new(false),
            me: me.clone(),
        });
        let _ = conn.owner.set(Arc::downgrade(&client));
        if !conn.alive.load(Ordering::SeqCst) {
            client.reconnect();
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
    fn reconnect(&self) {
        if self.reconnecting.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = self.me.clone();
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
    pub(crate) fn open(&self, req: &Request) -> Result<RawStream, AgentError> {
        let conn = self.conn();
        if !conn.alive.load(Ordering::SeqCst) {
            self.reconnect();
            return Err(AgentError::Lost);
        }
        // The request goes out whole in one frame: refused here if it cannot.
        let mut frame = Frame::json(Kind::Request, 0, req);
        if frame.payload.len() > hutch_proto::MAX_PAYLOAD {
            return Err(AgentError::RequestTooLarge(frame.payload.len()));
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
        let stream = RawStream {
            id,
            slot,
            conn: conn.clone(),
        };
        frame.stream = id;
        conn.push_control(frame)?;
        Ok(stream)
    }

    /// Streams currently open on the live connection (for tests and health).
    pub fn open_streams(&self) -> usize {
        self.conn().routes().len()
    }
}
