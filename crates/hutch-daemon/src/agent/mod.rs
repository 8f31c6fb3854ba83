//! The host side of the agent protocol: one multiplexed connection per VM over the unix socket
//! QEMU serves for the VM's virtio-serial port, and the typed client everything else uses.
//!
//! Callers see the [`Agent`] trait: [`Agent::exec`] gives an [`ExecStream`] of [`ExecEvent`]s
//! (and an [`ExecHandle`] for stdin, signals and resizes), [`Agent::read_file`] and
//! [`Agent::export_changes`] a [`FileRead`], [`Agent::write_file`] a [`FileWrite`], and the
//! filesystem operations, [`Agent::health`], [`Agent::shutdown`] and [`Agent::restored`] typed
//! results; [`Agent::watch`] a [`WatchStream`] of a guest directory's [`FsEvent`]s. A request
//! the agent refuses is [`AgentError::Guest`] with an [`ErrorCode`]; each edge (HTTP in
//! `error.rs`, SFTP in `sftp.rs`, SSH in `ssh.rs`) maps codes to its own statuses. Nothing
//! outside this module decodes frames. [`AgentClient`] is the real implementation;
//! `fake::FakeAgent` (tests and the `fakes` feature) an in-memory one.
//!
//! Everything the guest can make hutchd hold is bounded:
//! - each stream queues at most [`WINDOW`](hutch_proto::WINDOW) bytes of output or watch events
//!   (the agent may send only what it has credit for; credit goes back as the stream's consumer
//!   takes them) and
//!   [`MAX_CONTROL_QUEUED`] bytes of control messages; a connection has at most [`MAX_STREAMS`]
//!   streams;
//! - the decoder holds at most one frame of [`MAX_PAYLOAD`](hutch_proto::MAX_PAYLOAD) bytes;
//! - what goes to the guest waits in a bounded queue (stdin data, [`OUT_QUEUE`] chunks) or in a
//!   small control lane (requests, signals, cancels, coalesced credit; [`MAX_CONTROL_OUT`]
//!   frames);
//! - an error message from the guest is cleaned of control characters and cut to
//!   [`MAX_MESSAGE`] bytes before anyone sees it.
//!
//! A guest that breaks the protocol (a malformed or oversized frame, a response that does not
//! decode, data beyond its credit, an excessive grant, a flood of control messages) loses its
//! connection: every open stream ends with [`AgentError::Lost`], and the client reconnects with a
//! fresh handshake (the agent then kills what the old connection started). The socket path stays
//! the client's, so callers keep one [`AgentClient`] per VM across reconnections.

mod client;
mod conn;
#[cfg(any(test, feature = "fakes"))]
pub mod fake;
#[cfg(test)]
mod fake_tests;
pub mod link;
#[cfg(test)]
mod link_tests;
mod stream;
#[cfg(test)]
mod tests;
mod watch;
#[cfg(test)]
mod watch_tests;

pub use conn::{AgentClient, MAX_CONTROL_OUT, MAX_CONTROL_QUEUED, MAX_STREAMS, OUT_QUEUE};
pub use hutch_proto::{
    DirEntry, ErrorCode, ExecRequest, FileAttr, FsEvent, FsEventKind, FsRequest, Identity,
    NetIdentity, RestoreInfo, TtySize,
};
pub use stream::{ExecEvent, ExecHandle, ExecStream, FileRead, FileWrite};
pub use watch::WatchStream;

use futures_util::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// One agent stream opened as it is, to be carried elsewhere ([`link::serve_link`]).
pub struct Relay(pub(crate) Arc<dyn stream::Transport>);

/// Longest guest error message passed on, in bytes (a path of PATH_MAX and then some).
pub const MAX_MESSAGE: usize = 8192;

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
    #[error(
        "the request is {0} bytes, over the {max}-byte limit of the agent protocol",
        max = hutch_proto::MAX_PAYLOAD
    )]
    RequestTooLarge(usize),
    /// The agent refused or failed the request.
    #[error("{message}")]
    Guest { code: ErrorCode, message: String },
}

impl AgentError {
    /// The agent's refusal, its message made safe to show (control characters replaced, at most
    /// [`MAX_MESSAGE`] bytes).
    pub fn guest(code: ErrorCode, message: &str) -> AgentError {
        let mut end = message.len().min(MAX_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        AgentError::Guest {
            code,
            message: hutch_core::clean_text(&message[..end]),
        }
    }

    /// The agent's code, for a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Guest { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The agent's answer to a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub ready: bool,
    pub uptime_ms: u64,
    pub processes: u32,
}

/// One page of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirPage {
    pub entries: Vec<DirEntry>,
    /// More entries follow, from position `next` on (the `skip` of the next page).
    pub more: bool,
    pub next: u64,
}

/// The answer to an [`FsRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsAnswer {
    Attr(FileAttr),
    Dir(DirPage),
    Path(String),
    Done,
}

impl FsAnswer {
    fn name(&self) -> &'static str {
        match self {
            FsAnswer::Attr(_) => "fs_attr",
            FsAnswer::Dir(_) => "fs_dir",
            FsAnswer::Path(_) => "fs_path",
            FsAnswer::Done => "done",
        }
    }

    fn unexpected(&self, want: &str) -> AgentError {
        AgentError::Proto(format!(
            "the agent answered {} where {want} was due",
            self.name()
        ))
    }
}

/// What hutchd asks of a guest agent. Opening a stream does not wait (the errors of a file that
/// does not open come with its first chunk or answer); the other methods complete with the
/// agent's answer and have no timeout of their own: bound them with [`within`].
pub trait Agent: Send + Sync {
    /// Runs a process.
    fn exec(&self, req: ExecRequest) -> Result<ExecStream, AgentError>;

    /// Reads `path` from `offset`, `len` bytes or to its end.
    fn read_file(&self, path: &str, offset: u64, len: Option<u64>) -> Result<FileRead, AgentError>;

    /// Writes `path`: created or truncated (parents made) without `offset`, written in place
    /// at `offset` (created if missing, never truncated) with it.
    fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWrite, AgentError>;

    /// The VM's changes since boot as an OCI layer tar.
    fn export_changes(&self) -> Result<FileRead, AgentError>;

    /// A filesystem operation; the typed methods below are the usual way in.
    fn fs(&self, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>>;

    /// [`Agent::read_file`] as guest user `user` (its permissions). An implementation that
    /// cannot act as a user refuses (the default), never acts as root instead.
    fn read_file_as(
        &self,
        user: &str,
        _path: &str,
        _offset: u64,
        _len: Option<u64>,
    ) -> Result<FileRead, AgentError> {
        Err(no_users(user))
    }

    /// [`Agent::write_file`] as guest user `user`: its permissions, and what it makes is its.
    fn write_file_as(
        &self,
        user: &str,
        _path: &str,
        _mode: Option<u32>,
        _offset: Option<u64>,
    ) -> Result<FileWrite, AgentError> {
        Err(no_users(user))
    }

    /// [`Agent::fs`] as guest user `user`.
    fn fs_as(&self, user: &str, _req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
        let e = no_users(user);
        Box::pin(async move { Err(e) })
    }

    fn health(&self) -> BoxFuture<'_, Result<Health, AgentError>>;

    /// Asks the guest to stop everything and power off; returns once the agent agreed.
    fn shutdown(&self) -> BoxFuture<'_, Result<(), AgentError>>;

    /// Tells the guest its VM was just restored from a memory snapshot: it sets its clock,
    /// reseeds its RNG and, with an identity, becomes that copy (hostname, machine id,
    /// network). Returns once all of it is applied; a request that does not pass
    /// [`RestoreInfo::validate`] is refused with [`ErrorCode::InvalidArgument`].
    fn restored(&self, info: RestoreInfo) -> BoxFuture<'_, Result<(), AgentError>>;

    /// Watches directory `path` in the guest (and, when `recursive`, every directory under it);
    /// resolves once the agent's watches are set. Refusals: [`ErrorCode::NotFound`],
    /// [`ErrorCode::NotADirectory`], [`ErrorCode::PermissionDenied`], and
    /// [`ErrorCode::ResourceExhausted`] beyond the agent's
    /// [`MAX_WATCH_STREAMS`](hutch_proto::watch::MAX_WATCH_STREAMS) watches or
    /// [`MAX_WATCHES`](hutch_proto::watch::MAX_WATCHES) directories in one. Events are named
    /// relative to `path` (`sub/file.txt` in a recursive watch); see [`FsEventKind`] for their
    /// kinds and [`WatchStream`] for how it ends. Dropping the stream (or this future) cancels
    /// the watch.
    fn watch(&self, path: &str, recursive: bool) -> BoxFuture<'_, Result<WatchStream, AgentError>>;

    /// Whether the connection is up (or coming back); false once it is gone for good.
    fn is_alive(&self) -> bool {
        true
    }

    /// Opens a stream with `req` as it is, for [`link::serve_link`] to carry to another node.
    /// An implementation without raw streams refuses (the default).
    fn relay(&self, _req: &hutch_proto::Request) -> Result<Relay, AgentError> {
        Err(AgentError::guest(
            ErrorCode::Unsupported,
            "this agent's streams cannot be carried to another node",
        ))
    }

    /// `stat` (`follow`) or `lstat`.
    fn stat(&self, path: &str, follow: bool) -> BoxFuture<'_, Result<FileAttr, AgentError>> {
        let f = self.fs(FsRequest::Stat {
            path: path.into(),
            follow,
        });
        Box::pin(async move {
            match f.await? {
                FsAnswer::Attr(a) => Ok(a),
                other => Err(other.unexpected("fs_attr")),
            }
        })
    }

    /// The entries of directory `path` from position `skip` on, one page. A page that says more
    /// follow must advance (`next > skip`), or a guest could keep a caller paging for ever.
    fn read_dir(&self, path: &str, skip: u64) -> BoxFuture<'_, Result<DirPage, AgentError>> {
        let f = self.fs(FsRequest::ReadDir {
            path: path.into(),
            skip,
        });
        Box::pin(async move {
            match f.await? {
                FsAnswer::Dir(p) if p.more && p.next <= skip => Err(AgentError::Proto(format!(
                    "the guest's directory listing does not advance (page at {skip} says the \
                     next is at {})",
                    p.next
                ))),
                FsAnswer::Dir(p) => Ok(p),
                other => Err(other.unexpected("fs_dir")),
            }
        })
    }

    fn mkdir(&self, path: &str, mode: u32) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.fs(FsRequest::Mkdir {
            path: path.into(),
            mode,
        }))
    }

    /// Removes a file (not a directory).
    fn remove(&self, path: &str) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.fs(FsRequest::Remove { path: path.into() }))
    }

    /// Removes an empty directory.
    fn rmdir(&self, path: &str) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.fs(FsRequest::Rmdir { path: path.into() }))
    }

    fn rename(&self, from: &str, to: &str) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.fs(FsRequest::Rename {
            from: from.into(),
            to: to.into(),
        }))
    }

    /// The canonical path (symlinks resolved).
    fn realpath(&self, path: &str) -> BoxFuture<'_, Result<String, AgentError>> {
        path_answer(self.fs(FsRequest::Realpath { path: path.into() }))
    }

    /// The target of a symlink.
    fn readlink(&self, path: &str) -> BoxFuture<'_, Result<String, AgentError>> {
        path_answer(self.fs(FsRequest::Readlink { path: path.into() }))
    }

    /// Makes `link` a symlink to `target`.
    fn symlink(&self, target: &str, link: &str) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.fs(FsRequest::Symlink {
            target: target.into(),
            link: link.into(),
        }))
    }

    /// Sets the permission bits of `path`.
    fn chmod(&self, path: &str, mode: u32) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.fs(FsRequest::Chmod {
            path: path.into(),
            mode,
        }))
    }
}

fn no_users(user: &str) -> AgentError {
    AgentError::guest(
        ErrorCode::Unsupported,
        &format!("this agent cannot act as user {user}"),
    )
}

/// An agent whose file operations (reads, writes, fs requests) run as one guest user; exec,
/// watches and the rest pass through unchanged.
pub struct AsUser {
    pub inner: Arc<dyn Agent>,
    pub user: String,
}

impl Agent for AsUser {
    fn exec(&self, req: ExecRequest) -> Result<ExecStream, AgentError> {
        self.inner.exec(req)
    }
    fn read_file(&self, path: &str, offset: u64, len: Option<u64>) -> Result<FileRead, AgentError> {
        self.inner.read_file_as(&self.user, path, offset, len)
    }
    fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWrite, AgentError> {
        self.inner.write_file_as(&self.user, path, mode, offset)
    }
    fn export_changes(&self) -> Result<FileRead, AgentError> {
        self.inner.export_changes()
    }
    fn fs(&self, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
        self.inner.fs_as(&self.user, req)
    }
    fn health(&self) -> BoxFuture<'_, Result<Health, AgentError>> {
        self.inner.health()
    }
    fn shutdown(&self) -> BoxFuture<'_, Result<(), AgentError>> {
        self.inner.shutdown()
    }
    fn restored(&self, info: RestoreInfo) -> BoxFuture<'_, Result<(), AgentError>> {
        self.inner.restored(info)
    }
    fn watch(&self, path: &str, recursive: bool) -> BoxFuture<'_, Result<WatchStream, AgentError>> {
        self.inner.watch(path, recursive)
    }
    fn is_alive(&self) -> bool {
        self.inner.is_alive()
    }
}

fn done(f: BoxFuture<'_, Result<FsAnswer, AgentError>>) -> BoxFuture<'_, Result<(), AgentError>> {
    Box::pin(async move {
        match f.await? {
            FsAnswer::Done => Ok(()),
            other => Err(other.unexpected("done")),
        }
    })
}

fn path_answer(
    f: BoxFuture<'_, Result<FsAnswer, AgentError>>,
) -> BoxFuture<'_, Result<String, AgentError>> {
    Box::pin(async move {
        match f.await? {
            FsAnswer::Path(p) => Ok(p),
            other => Err(other.unexpected("fs_path")),
        }
    })
}

/// `f`, or [`AgentError::Timeout`] if it takes longer than `limit`.
pub async fn within<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, AgentError>>,
) -> Result<T, AgentError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(AgentError::Timeout(limit)))
}
