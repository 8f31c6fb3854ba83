//! The typed streams of the agent client: [`ExecStream`] (with its [`ExecHandle`] for input,
//! signals and resizes), [`FileRead`] (file contents, exported layers) and [`FileWrite`]; the
//! directory watch's [`WatchStream`](super::WatchStream) is in `watch.rs`.
//!
//! They decode what a stream carries into events and results, the same way whatever carries
//! it: a [`Transport`] is the real connection's [`RawStream`](super::conn::RawStream) or a fake
//! agent's in-memory stream. `next` is cancel-safe (a caller's timeout loses nothing), so callers
//! bound their waits with [`within`](super::within); a write cut short by a timeout leaves a
//! stream only fit to be dropped. Dropping a stream before its end cancels it in the guest.

use super::AgentError;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use hutch_proto::{Request, Response, TtySize};
use std::sync::{Arc, Weak};

/// What arrives on a stream.
#[derive(Debug)]
pub(crate) enum Incoming {
    Stdout(Bytes),
    Stderr(Bytes),
    Answer(Response),
}

/// One stream's way to and from the agent.
pub(crate) trait Transport: Send + Sync {
    /// The next item; None once the connection is lost and everything queued was taken.
    /// Cancel-safe.
    fn recv(&self) -> BoxFuture<'_, Option<Incoming>>;
    /// Sends input (stdin, file contents) within the stream's credit; [`AgentError::Closed`]
    /// once the stream has its final answer.
    fn send<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<(), AgentError>>;
    /// Ends the input.
    fn eof(&self) -> BoxFuture<'_, Result<(), AgentError>>;
    /// Sends a request that acts on this stream (signal, resize, cancel) without waiting.
    fn control(&self, req: Request) -> Result<(), AgentError>;
    /// The stream's owner gave up on it: cancel it in the guest unless it has its final answer,
    /// and fail any send waiting for credit (and later ones) with [`AgentError::Closed`], even
    /// while another task still holds the transport. Also done when the transport is dropped.
    fn close(&self);
}

/// The name of an answer, for errors (never its contents: a hostile guest chooses those).
pub(crate) fn answer_name(r: &Response) -> &'static str {
    match r {
        Response::Started { .. } => "started",
        Response::Exited { .. } => "exited",
        Response::Done { .. } => "done",
        Response::Health { .. } => "health",
        Response::FsAttr { .. } => "fs_attr",
        Response::FsDir { .. } => "fs_dir",
        Response::FsPath { .. } => "fs_path",
        Response::Error { .. } => "error",
        Response::Watching => "watching",
        Response::FsEvent(_) => "fs_event",
    }
}

/// An answer that does not belong where it came.
pub(crate) fn unexpected(r: &Response, want: &str) -> AgentError {
    AgentError::Proto(format!(
        "the agent answered {} where {want} was due",
        answer_name(r)
    ))
}

/// What happens to a process, in order: `Started`, its output, then `Exited`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The process runs (for a detached process, the last event of the stream).
    Started {
        pid: i32,
    },
    Stdout(Bytes),
    /// Process stderr (a `tty` process has none: its terminal output is all `Stdout`).
    Stderr(Bytes),
    /// The process ended; all its output came before. `code` for an exit, `signal` for a kill.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
}

/// A running process's events; see [`ExecStream::next`]. Dropping it before `Exited` kills the
/// process.
pub struct ExecStream {
    t: Arc<dyn Transport>,
    done: bool,
    /// Kept for as long as the stream lives (the VM's activity session, see `holding`).
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl ExecStream {
    pub(crate) fn new(t: Arc<dyn Transport>) -> ExecStream {
        ExecStream {
            t,
            done: false,
            _held: None,
        }
    }

    /// The stream, keeping `x` until it is dropped (an activity session keeps the VM from
    /// being auto-paused while the process runs).
    pub fn holding(mut self, x: impl std::any::Any + Send + Sync) -> ExecStream {
        self._held = Some(Box::new(x));
        self
    }

    /// The next event; `Ok(None)` after `Exited`. An error ends the stream: the agent refused
    /// the request ([`AgentError::Guest`]), the connection was lost ([`AgentError::Lost`]), or
    /// the agent answered out of turn ([`AgentError::Proto`]). Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.done {
            return Ok(None);
        }
        let item = self.t.recv().await;
        let ev = match item {
            Some(Incoming::Stdout(b)) => ExecEvent::Stdout(b),
            Some(Incoming::Stderr(b)) => ExecEvent::Stderr(b),
            Some(Incoming::Answer(Response::Started { pid })) => ExecEvent::Started { pid },
            Some(Incoming::Answer(Response::Exited {
                code,
                signal,
                timed_out,
            })) => {
                self.done = true;
                ExecEvent::Exited {
                    code,
                    signal,
                    timed_out,
                }
            }
            Some(Incoming::Answer(Response::Error { code, message })) => {
                self.done = true;
                return Err(AgentError::guest(code, &message));
            }
            Some(Incoming::Answer(other)) => {
                self.done = true;
                return Err(unexpected(&other, "a process event"));
            }
            None => {
                self.done = true;
                return Err(AgentError::Lost);
            }
        };
        Ok(Some(ev))
    }

    /// A handle for the process's input, signals and terminal size, usable from another task.
    pub fn handle(&self) -> ExecHandle {
        ExecHandle {
            t: Arc::downgrade(&self.t),
        }
    }

    /// Gives up on the process: the agent kills it.
    pub fn cancel(self) {
        drop(self)
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        // A handle may be inside a send (holding the transport): the stream ends now anyway.
        self.t.close();
    }
}

/// Input to a running process. It does not keep the stream open: once its [`ExecStream`] is
/// gone, every call (and a send waiting for credit) fails with [`AgentError::Closed`].
#[derive(Clone)]
pub struct ExecHandle {
    t: Weak<dyn Transport>,
}

impl ExecHandle {
    fn transport(&self) -> Result<Arc<dyn Transport>, AgentError> {
        self.t.upgrade().ok_or(AgentError::Closed)
    }

    /// Sends stdin, waiting for the stream's credit (a process that does not read its stdin
    /// stalls the caller here). Requires `stdin: true` in the request.
    pub async fn stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        self.transport()?.send(data).await
    }

    /// Ends stdin (a `tty` process reads ^D).
    pub async fn eof(&self) -> Result<(), AgentError> {
        self.transport()?.eof().await
    }

    /// Sends `signal` to the process group.
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.transport()?.control(Request::Signal { signal })
    }

    /// Resizes the terminal of a `tty` process.
    pub fn resize(&self, size: TtySize) -> Result<(), AgentError> {
        self.transport()?.control(Request::Resize(size))
    }
}

/// Bytes streamed from the guest: a file's contents, or an exported layer.
pub struct FileRead {
    t: Arc<dyn Transport>,
    done: bool,
}

impl FileRead {
    pub(crate) fn new(t: Arc<dyn Transport>) -> FileRead {
        FileRead { t, done: false }
    }

    /// The next chunk; `Ok(None)` at the end. The first call says whether the file opened.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Bytes>, AgentError> {
        while !self.done {
            match self.t.recv().await {
                Some(Incoming::Stdout(b)) => return Ok(Some(b)),
                // File streams have no stderr; whatever a guest sends there is dropped.
                Some(Incoming::Stderr(_)) => {}
                Some(Incoming::Answer(Response::Done { .. })) => self.done = true,
                Some(Incoming::Answer(Response::Error { code, message })) => {
                    self.done = true;
                    return Err(AgentError::guest(code, &message));
                }
                Some(Incoming::Answer(other)) => {
                    self.done = true;
                    return Err(unexpected(&other, "file data"));
                }
                None => {
                    self.done = true;
                    return Err(AgentError::Lost);
                }
            }
        }
        Ok(None)
    }
}

/// A file being written in the guest: [`FileWrite::write`] chunks, then [`FileWrite::finish`].
/// Dropped before `finish`, the write is cancelled (the file keeps what reached it).
pub struct FileWrite {
    t: Arc<dyn Transport>,
}

impl FileWrite {
    pub(crate) fn new(t: Arc<dyn Transport>) -> FileWrite {
        FileWrite { t }
    }

    /// Sends a chunk, waiting for the guest to take the previous ones (the stream's credit).
    pub async fn write(&mut self, data: &[u8]) -> Result<(), AgentError> {
        match self.t.send(data).await {
            // The agent ended the stream early: its answer says why.
            Err(AgentError::Closed) => Err(match self.answer().await {
                Err(e) => e,
                Ok(_) => AgentError::Proto("the agent ended the file write early".into()),
            }),
            r => r,
        }
    }

    /// Ends the file; returns the bytes the guest wrote.
    pub async fn finish(mut self) -> Result<u64, AgentError> {
        self.t.eof().await?;
        self.answer().await
    }

    async fn answer(&mut self) -> Result<u64, AgentError> {
        loop {
            match self.t.recv().await {
                Some(Incoming::Answer(Response::Done { bytes })) => return Ok(bytes),
                Some(Incoming::Answer(Response::Error { code, message })) => {
                    return Err(AgentError::guest(code, &message))
                }
                Some(Incoming::Answer(other)) => return Err(unexpected(&other, "done")),
                Some(Incoming::Stdout(_) | Incoming::Stderr(_)) => {}
                None => return Err(AgentError::Lost),
            }
        }
    }
}

/// The one answer of a request that has no data (fs operations, health, shutdown).
pub(crate) async fn one_answer(t: &dyn Transport) -> Result<Response, AgentError> {
    loop {
        match t.recv().await {
            Some(Incoming::Answer(Response::Error { code, message })) => {
                return Err(AgentError::guest(code, &message))
            }
            Some(Incoming::Answer(r)) => return Ok(r),
            Some(Incoming::Stdout(_) | Incoming::Stderr(_)) => {}
            None => return Err(AgentError::Lost),
        }
    }
}
