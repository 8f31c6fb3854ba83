//! Agent streams carried between nodes: one byte stream (a "link", which the cluster opens to the
//! node that runs the VM, authenticated) per agent stream, in the agent protocol's own frames.
//!
//! - [`LinkedAgent`] is the [`Agent`] of a VM on another node: each operation connects a link,
//!   sends its request as the first frame, then input (stdin, file contents, signals, resizes)
//!   as frames; what comes back (output, answers) is what the VM's agent said.
//! - [`serve_link`] is the other end, on the VM's node: it opens the request on the VM's own
//!   agent connection and pumps both ways.
//!
//! Flow control is the link's: each end reads only as fast as its consumer takes, so a reader
//! that stops stalls the guest (through the agent connection's credit), and nothing piles up
//! in either hutchd. Dropping a stream drops its link; the far end then drops its agent stream,
//! which cancels it in the guest. A link carries only what a front door may ask for a user
//! (processes, files, fs operations, watches, health), never shutdown, restore or export.

use super::client::Opener;
use super::stream::{Incoming, Transport};
use super::{Agent, AgentError, ErrorCode, OUT_QUEUE};
use futures_util::future::BoxFuture;
use hutch_proto::{Decoder, Frame, Kind, Request, Response};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// A link's byte stream.
pub trait LinkIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkIo for T {}

/// Opens a link: a refusal of the far end comes back as [`AgentError::Guest`].
pub type Connect =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Box<dyn LinkIo>, AgentError>> + Send + Sync>;

/// The stream id on a link (a link carries one stream).
const STREAM: u32 = 1;
/// Largest input chunk in one frame.
const CHUNK: usize = 64 * 1024;
/// Items received and not yet taken by the stream's consumer.
const IN_QUEUE: usize = 16;
/// Signals and resizes waiting to go out.
const CONTROL_QUEUE: usize = 64;
/// How long the VM's node waits for a link's request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent of a VM on another node; see the module doc.
pub struct LinkedAgent {
    connect: Connect,
}

impl LinkedAgent {
    pub fn new(connect: Connect) -> LinkedAgent {
        LinkedAgent { connect }
    }
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
        let task = tokio::spawn(run_link(
            (self.connect)(),
            req.clone(),
            in_tx,
            data_rx,
            ctl_rx,
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

/// The front door's link task: connects, sends the request, then carries input out and what
/// comes back in, until the stream's final answer, the link's end, or the stream's close.
async fn run_link(
    connect: BoxFuture<'static, Result<Box<dyn LinkIo>, AgentError>>,
    req: Request,
    incoming: mpsc::Sender<Incoming>,
    mut data: mpsc::Receiver<Frame>,
    mut control: mpsc::Receiver<Frame>,
) {
    let io = match connect.await {
        Ok(io) => io,
        Err(e) => {
            let _ = incoming.send(Incoming::Answer(refusal(e))).await;
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(io);
    let writer = async {
        write_frame(&mut wr, &Frame::json(Kind::Request, STREAM, &req)).await?;
        loop {
            let f = tokio::select! {
                biased;
                Some(f) = control.recv() => f,
                Some(f) = data.recv() => f,
                else => return Ok(()),
            };
            write_frame(&mut wr, &f).await?;
        }
    };
    let reader = async {
        let (mut dec, mut buf) = (Decoder::new(), vec![0u8; CHUNK]);
        while let Some(f) = read_frame(&mut rd, &mut dec, &mut buf).await? {
            let item = match f.kind {
                Kind::Stdout => Incoming::Stdout(f.payload.into()),
                Kind::Stderr => Incoming::Stderr(f.payload.into()),
                Kind::Response => Incoming::Answer(
                    f.parse::<Response>("response")
                        .map_err(|e| AgentError::Proto(e.to_string()))?,
                ),
                k => return Err(AgentError::Proto(format!("node link: a {k:?} frame"))),
            };
            let end = matches!(&item, Incoming::Answer(r) if r.ends_stream());
            if incoming.send(item).await.is_err() || end {
                break;
            }
        }
        Ok::<(), AgentError>(())
    };
    let r = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "node link ended");
    }
}

/// The VM's node's end of a link: reads the request, opens it on `agent` (only what
/// [`LinkedAgent`] sends), then pumps both ways until the final answer or the link's end.
pub async fn serve_link(io: impl LinkIo, agent: Arc<dyn Agent>) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let (mut dec, mut buf) = (Decoder::new(), vec![0u8; CHUNK]);
    let first = tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut rd, &mut dec, &mut buf));
    let req = match first.await {
        Ok(Ok(Some(f))) if f.kind == Kind::Request => f.parse::<Request>("request").ok(),
        _ => None,
    };
    let refuse = |m: &str| Response::Error {
        code: ErrorCode::InvalidArgument,
        message: m.into(),
    };
    let opened = match req {
        Some(r) if crosses_nodes(&r) => agent.relay(&r).map_err(refusal),
        Some(_) => Err(refuse("this request does not go over a node link")),
        None => Err(refuse("a node link must begin with a request")),
    };
    let relay = match opened {
        Ok(r) => r,
        Err(answer) => {
            let _ = write_frame(&mut wr, &Frame::json(Kind::Response, STREAM, &answer)).await;
            return;
        }
    };
    let out = async {
        while let Some(item) = relay.0.recv().await {
            let (f, end) = match item {
                Incoming::Stdout(b) => (Frame::new(Kind::Stdout, STREAM, b.to_vec()), false),
                Incoming::Stderr(b) => (Frame::new(Kind::Stderr, STREAM, b.to_vec()), false),
                Incoming::Answer(r) => (Frame::json(Kind::Response, STREAM, &r), r.ends_stream()),
            };
            write_frame(&mut wr, &f).await?;
            if end {
                break;
            }
        }
        Ok::<(), AgentError>(())
    };
    let input = async {
        while let Some(f) = read_frame(&mut rd, &mut dec, &mut buf).await? {
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
                    _ => return Err(AgentError::Proto("node link: an unexpected request".into())),
                },
                k => return Err(AgentError::Proto(format!("node link: a {k:?} frame"))),
            }
        }
        Ok::<(), AgentError>(())
    };
    let r = tokio::select! {
        r = out => r,
        r = input => r,
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "node link ended");
    }
    // Dropping the relay cancels an unfinished stream in the guest.
}
