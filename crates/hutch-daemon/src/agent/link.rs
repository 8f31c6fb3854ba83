//! Agent streams carried between nodes: a byte stream (a "link", which the cluster opens to the
//! node that runs the VM, authenticated) carries one agent stream at a time, in the agent
//! protocol's own frames.
//!
//! - [`LinkedAgent`] is the [`Agent`] of a VM on another node: each operation takes a link,
//!   sends its request as the first frame of a new stream, then input (stdin, file contents,
//!   signals, resizes) as frames; what comes back (output, answers) is what the VM's agent said.
//! - [`serve_link`] is the other end, on the VM's node: it opens each request on the VM's own
//!   agent connection and pumps both ways.
//! - A link whose stream ended cleanly (its final answer) is kept by the front door a few
//!   seconds ([`IdleLinks`]) for the next stream to the same VM for the same caller, when the
//!   far end said it serves several ([`Opened::reusable`]): an SFTP session, whose every
//!   request is a stream, pays for connecting once. Each stream on a link has a higher id than
//!   the last; the far end drops what is left of the last stream's input.
//!
//! Flow control is the link's: each end reads only as fast as its consumer takes, so a reader
//! that stops stalls the guest (through the agent connection's credit), and nothing piles up
//! in either hutchd. Dropping a stream before its end drops its link; the far end then drops its
//! agent stream, which cancels it in the guest. A link carries only what a front door may ask
//! for a user (processes, files, fs operations, watches, health), never shutdown, restore or
//! export.

use super::client::Opener;
use super::stream::{Incoming, Transport};
use super::{Agent, AgentError, ErrorCode, OUT_QUEUE};
use futures_util::future::BoxFuture;
use hutch_proto::{Decoder, Frame, Kind, Request, Response};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// A link's byte stream.
pub trait LinkIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkIo for T {}

/// A link just opened.
pub struct Opened {
    pub io: Box<dyn LinkIo>,
    /// The far end serves more than one stream on it, one after another.
    pub reusable: bool,
}

/// Opens a link: a refusal of the far end comes back as [`AgentError::Guest`].
pub type Connect = Arc<dyn Fn() -> BoxFuture<'static, Result<Opened, AgentError>> + Send + Sync>;

/// The first stream's id on a link.
const STREAM: u32 = 1;
/// How long the front door keeps an idle link (well within the far end's [`IDLE_TIMEOUT`]).
const KEEP_IDLE: Duration = Duration::from_secs(5);
/// How long the VM's node waits for the next stream on a link.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle links kept per destination, and in all.
const IDLE_PER_KEY: usize = 4;
const IDLE_MAX: usize = 256;
/// How long a stream that ended may take to finish writing the frame it was writing.
const WRITER_STOP: Duration = Duration::from_secs(2);
/// Largest input chunk in one frame.
const CHUNK: usize = 64 * 1024;
/// Items received and not yet taken by the stream's consumer.
const IN_QUEUE: usize = 16;
/// Signals and resizes waiting to go out.
const CONTROL_QUEUE: usize = 64;
/// How long the VM's node waits for a link's request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A link between two streams.
struct Idle {
    io: Box<dyn LinkIo>,
    dec: Decoder,
    /// The id of the stream it carried last.
    last: u32,
    since: Instant,
}

/// Links kept open between streams, by destination (node, VM, whom they act for); see the
/// module doc. A sweep closes those idle too long.
#[derive(Default)]
pub struct IdleLinks {
    inner: std::sync::Mutex<IdleInner>,
}

#[derive(Default)]
struct IdleInner {
    links: HashMap<String, Vec<Idle>>,
    sweeping: bool,
}

impl IdleInner {
    fn prune(&mut self) {
        for v in self.links.values_mut() {
            v.retain(|l| l.since.elapsed() < KEEP_IDLE);
        }
        self.links.retain(|_, v| !v.is_empty());
    }
}

impl IdleLinks {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdleInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept link to `key` that is still open, the most recently used first.
    fn take(&self, key: &str) -> Option<Idle> {
        let mut g = self.lock();
        let v = g.links.get_mut(key)?;
        let mut found = None;
        while let Some(mut l) = v.pop() {
            if l.since.elapsed() < KEEP_IDLE && still_open(&mut l.io) {
                found = Some(l);
                break;
            }
        }
        if v.is_empty() {
            g.links.remove(key);
        }
        found
    }

    /// Keeps `l` for the next stream to `key`.
    fn put(self: &Arc<Self>, key: String, l: Idle) {
        let mut g = self.lock();
        g.prune();
        if g.links.values().map(Vec::len).sum::<usize>() >= IDLE_MAX {
            return;
        }
        let v = g.links.entry(key).or_default();
        if v.len() >= IDLE_PER_KEY {
            v.remove(0);
        }
        v.push(l);
        if !g.sweeping {
            g.sweeping = true;
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(KEEP_IDLE).await;
                    let Some(me) = weak.upgrade() else { return };
                    let mut g = me.lock();
                    g.prune();
                    if g.links.is_empty() {
                        g.sweeping = false;
                        return;
                    }
                }
            });
        }
    }

    /// Links kept now.
    pub fn len(&self) -> usize {
        self.lock().links.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether an idle link is still open: nothing may arrive on it between streams, so anything
/// ready to read (its end, an error, stray bytes) means it is not.
fn still_open(io: &mut Box<dyn LinkIo>) -> bool {
    use futures_util::FutureExt;
    let mut b = [0u8; 1];
    io.read(&mut b).now_or_never().is_none()
}

/// The agent of a VM on another node; see the module doc.
pub struct LinkedAgent {
    connect: Connect,
    keep: Option<(Arc<IdleLinks>, String)>,
}

impl LinkedAgent {
    pub fn new(connect: Connect) -> LinkedAgent {
        LinkedAgent {
            connect,
            keep: None,
        }
    }

    /// Keeps links between streams in `idle`, under `key`: one destination (node, VM, caller).
    pub fn keeping(mut self, idle: Arc<IdleLinks>, key: String) -> LinkedAgent {
        self.keep = Some((idle, key));
        self
    }
}

/// How a stream gets its link.
enum Start {
    Kept(Idle),
    Connect(BoxFuture<'static, Result<Opened, AgentError>>),
}

impl Opener for LinkedAgent {
    fn open_stream(&self, req: &Request) -> Result<Arc<dyn Transport>, AgentError> {
        if !crosses_nodes(req) {
            return Err(AgentError::guest(
                ErrorCode::Unsupported,
                "this request does not go to another node",
            ));
        }
        let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
        let (data_tx, data_rx) = mpsc::channel(OUT_QUEUE);
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
        let kept = self.keep.as_ref().and_then(|(idle, key)| idle.take(key));
        let start = match kept {
            Some(l) => Start::Kept(l),
            None => Start::Connect((self.connect)()),
        };
        let task = tokio::spawn(run_link(
            start,
            req.clone(),
            Pipes {
                incoming: in_tx,
                data: data_rx,
                control: ctl_rx,
            },
            self.keep.clone(),
        ));
        Ok(Arc::new(LinkStream {
            incoming: tokio::sync::Mutex::new(in_rx),
            data: data_tx,
            control: ctl_tx,
            finished: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            task: task.abort_handle(),
        }))
    }

    fn alive(&self) -> bool {
        true
    }
}

/// What a front door may ask of another node's VM.
fn crosses_nodes(req: &Request) -> bool {
    matches!(
        req,
        Request::Exec(_)
            | Request::ReadFile { .. }
            | Request::WriteFile { .. }
            | Request::Fs(_)
            | Request::FsAs { .. }
            | Request::Health
            | Request::Watch { .. }
    )
}

/// The front door's end of one link.
struct LinkStream {
    incoming: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    data: mpsc::Sender<Frame>,
    control: mpsc::Sender<Frame>,
    finished: AtomicBool,
    closed: AtomicBool,
    task: tokio::task::AbortHandle,
}

impl LinkStream {
    fn check(&self) -> Result<(), AgentError> {
        if self.finished.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst) {
            return Err(AgentError::Closed);
        }
        Ok(())
    }

    /// The link is gone: Closed if this end closed it, else Lost.
    fn gone(&self) -> AgentError {
        if self.closed.load(Ordering::SeqCst) {
            AgentError::Closed
        } else {
            AgentError::Lost
        }
    }

    async fn send_inner(&self, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(CHUNK) {
            self.check()?;
            let f = Frame::new(Kind::Stdin, STREAM, chunk.to_vec());
            self.data.send(f).await.map_err(|_| self.gone())?;
        }
        Ok(())
    }
}

impl Transport for LinkStream {
    fn recv(&self) -> BoxFuture<'_, Option<Incoming>> {
        Box::pin(async move {
            let item = self.incoming.lock().await.recv().await;
            if let Some(Incoming::Answer(r)) = &item {
                if r.ends_stream() {
                    self.finished.store(true, Ordering::SeqCst);
                }
            }
            item
        })
    }

    fn send<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<(), AgentError>> {
        Box::pin(self.send_inner(data))
    }

    fn eof(&self) -> BoxFuture<'_, Result<(), AgentError>> {
        Box::pin(async move {
            self.check()?;
            let f = Frame::new(Kind::StdinEof, STREAM, Vec::new());
            self.data.send(f).await.map_err(|_| self.gone())
        })
    }

    fn control(&self, req: Request) -> Result<(), AgentError> {
        self.check()?;
        match self
            .control
            .try_send(Frame::json(Kind::Request, STREAM, &req))
        {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(AgentError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.gone()),
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

impl Drop for LinkStream {
    fn drop(&mut self) {
        self.close();
    }
}

/// A refusal as the answer that ends a stream.
fn refusal(e: AgentError) -> Response {
    match e {
        AgentError::Guest { code, message } => Response::Error { code, message },
        e => Response::Error {
            code: ErrorCode::Io,
            message: e.to_string(),
        },
    }
}

/// Writes `f` and flushes it: a TLS stream keeps what it was given until it is flushed, and a
/// link may then wait for an answer to exactly that frame.
async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), AgentError> {
    let b = f.encode().map_err(|e| AgentError::Proto(e.to_string()))?;
    w.write_all(&b).await.map_err(|_| AgentError::Lost)?;
    w.flush().await.map_err(|_| AgentError::Lost)
}

/// The next frame of a link; None at its end. A malformed or oversized frame is an error.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    dec: &mut Decoder,
    buf: &mut [u8],
) -> Result<Option<Frame>, AgentError> {
    loop {
        if let Some(f) = dec
            .next_frame_strict()
            .map_err(|e| AgentError::Proto(format!("node link: {e}")))?
        {
            return Ok(Some(f));
        }
        let n = r.read(buf).await.map_err(|_| AgentError::Lost)?;
        if n == 0 {
            return Ok(None);
        }
        dec.push(&buf[..n]);
    }
}

/// A stream's channels to and from its link task.
struct Pipes {
    incoming: mpsc::Sender<Incoming>,
    data: mpsc::Receiver<Frame>,
    control: mpsc::Receiver<Frame>,
}

/// The front door's link task: takes or connects a link, sends the request, then carries input
/// out and what comes back in, until the stream's final answer, the link's end, or the
/// stream's close. A link whose stream ended cleanly is kept (`keep`) before the final answer
/// is handed over, so that the stream's consumer finds it for its next request.
async fn run_link(
    start: Start,
    req: Request,
    pipes: Pipes,
    keep: Option<(Arc<IdleLinks>, String)>,
) {
    let Pipes {
        incoming,
        mut data,
        mut control,
    } = pipes;
    let (io, mut dec, sid, reusable) = match start {
        Start::Kept(l) => (l.io, l.dec, l.last + 1, true),
        Start::Connect(c) => match c.await {
            Ok(o) => (o.io, Decoder::new(), STREAM, o.reusable),
            Err(e) => {
                let _ = incoming.send(Incoming::Answer(refusal(e))).await;
                return;
            }
        },
    };
    let (mut rd, mut wr) = tokio::io::split(io);
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let ended = {
        let writer = async {
            write_frame(&mut wr, &Frame::json(Kind::Request, sid, &req)).await?;
            loop {
                // Stopped only between frames, so that the link stays whole.
                let mut f = tokio::select! {
                    biased;
                    _ = &mut done_rx => return Ok(()),
                    Some(f) = control.recv() => f,
                    Some(f) = data.recv() => f,
                };
                f.stream = sid;
                write_frame(&mut wr, &f).await?;
            }
        };
        let reader = async {
            let mut buf = vec![0u8; CHUNK];
            while let Some(f) = read_frame(&mut rd, &mut dec, &mut buf).await? {
                if f.stream != sid {
                    return Err(AgentError::Proto(
                        "node link: a frame of another stream".into(),
                    ));
                }
                let item = match f.kind {
                    Kind::Stdout => Incoming::Stdout(f.payload.into()),
                    Kind::Stderr => Incoming::Stderr(f.payload.into()),
                    Kind::Response => Incoming::Answer(
                        f.parse::<Response>("response")
                            .map_err(|e| AgentError::Proto(e.to_string()))?,
                    ),
                    k => return Err(AgentError::Proto(format!("node link: a {k:?} frame"))),
                };
                if matches!(&item, Incoming::Answer(r) if r.ends_stream()) {
                    return Ok(Some(item));
                }
                if incoming.send(item).await.is_err() {
                    break;
                }
            }
            Ok::<_, AgentError>(None)
        };
        tokio::pin!(writer);
        let end = tokio::select! {
            r = reader => r,
            w = &mut writer => w.map(|()| None),
        };
        match end {
            Ok(Some(last)) => {
                let _ = done_tx.send(());
                let stopped = tokio::time::timeout(WRITER_STOP, &mut writer).await;
                Some((last, matches!(stopped, Ok(Ok(())))))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "node link ended");
                None
            }
        }
    };
    let Some((last, whole)) = ended else {
        return;
    };
    if let Some((idle, key)) = keep.filter(|_| whole && reusable && sid < u32::MAX) {
        let io = rd.unsplit(wr);
        idle.put(
            key,
            Idle {
                io,
                dec,
                last: sid,
                since: Instant::now(),
            },
        );
    }
    let _ = incoming.send(last).await;
}

/// The VM's node's end of a link: reads each stream's request, opens it on the VM's agent
/// (`agent` gives the current one; only what [`LinkedAgent`] sends), then pumps both ways until
/// the final answer. The link ends when the front door closes it, after [`IDLE_TIMEOUT`]
/// without a stream, or at anything out of order.
pub async fn serve_link<F>(io: impl LinkIo, agent: F)
where
    F: Fn() -> Result<Arc<dyn Agent>, AgentError> + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (mut dec, mut buf) = (Decoder::new(), vec![0u8; CHUNK]);
    let refuse = |m: &str| Response::Error {
        code: ErrorCode::InvalidArgument,
        message: m.into(),
    };
    // The stream served last (0: none yet).
    let mut last = 0u32;
    loop {
        let wait = if last == 0 {
            REQUEST_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        let next = tokio::time::timeout(wait, async {
            loop {
                match read_frame(&mut rd, &mut dec, &mut buf).await {
                    // Input, signals and resizes the last stream no longer takes.
                    Ok(Some(f)) if last > 0 && f.stream == last => {}
                    Ok(Some(f)) if f.kind == Kind::Request && f.stream > last => {
                        return Some((f.stream, f.parse::<Request>("request").ok()));
                    }
                    _ => return None,
                }
            }
        });
        let (sid, req) = match next.await {
            Ok(Some(r)) => r,
            // Closed, idle too long, or out of order after a stream: the link ends.
            _ if last > 0 => return,
            _ => (STREAM, None),
        };
        // A request a link may not carry ends it; one the VM's agent refuses ends its stream.
        let (opened, goes_on) = match &req {
            Some(r) if crosses_nodes(r) => {
                (agent().and_then(|a| a.relay(r)).map_err(refusal), true)
            }
            Some(_) => (
                Err(refuse("this request does not go over a node link")),
                false,
            ),
            None => (Err(refuse("a node link must begin with a request")), false),
        };
        let relay = match opened {
            Ok(r) => r,
            Err(answer) => {
                let sent = write_frame(&mut wr, &Frame::json(Kind::Response, sid, &answer)).await;
                if sent.is_err() || !goes_on {
                    return;
                }
                last = sid;
                continue;
            }
        };
        let out = async {
            while let Some(item) = relay.0.recv().await {
                let (f, end) = match item {
                    Incoming::Stdout(b) => (Frame::new(Kind::Stdout, sid, b.to_vec()), false),
                    Incoming::Stderr(b) => (Frame::new(Kind::Stderr, sid, b.to_vec()), false),
                    Incoming::Answer(r) => (Frame::json(Kind::Response, sid, &r), r.ends_stream()),
                };
                write_frame(&mut wr, &f).await?;
                if end {
                    return Ok(true);
                }
            }
            Ok::<bool, AgentError>(false)
        };
        let input = async {
            while let Some(f) = read_frame(&mut rd, &mut dec, &mut buf).await? {
                if f.stream != sid {
                    return Err(AgentError::Proto(
                        "node link: a frame of another stream".into(),
                    ));
                }
                match f.kind {
                    // Input after the stream ended (or to a process that closed its stdin) is
                    // dropped, as the agent connection itself does.
                    Kind::Stdin => {
                        let _ = relay.0.send(&f.payload).await;
                    }
                    Kind::StdinEof => {
                        let _ = relay.0.eof().await;
                    }
                    Kind::Request => match f.parse::<Request>("request") {
                        // A full control lane drops the signal, as the agent connection refuses it.
                        Ok(r @ (Request::Signal { .. } | Request::Resize(_))) => {
                            let _ = relay.0.control(r);
                        }
                        _ => {
                            return Err(AgentError::Proto(
                                "node link: an unexpected request".into(),
                            ))
                        }
                    },
                    k => return Err(AgentError::Proto(format!("node link: a {k:?} frame"))),
                }
            }
            // The front door closed the link.
            Ok::<bool, AgentError>(false)
        };
        let r = tokio::select! {
            r = out => r,
            r = input => r,
        };
        // Dropping the relay cancels an unfinished stream in the guest.
        drop(relay);
        match r {
            Ok(true) => last = sid,
            Ok(false) => return,
            Err(e) => {
                tracing::debug!(error = %e, "node link ended");
                return;
            }
        }
    }
}
