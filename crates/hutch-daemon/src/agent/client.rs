//! [`Agent`] for anything that opens agent streams (an [`Opener`]): the VM's own connection
//! ([`AgentClient`]), or a link to the node that runs the VM (`cluster/agent_link.rs`). Each
//! operation opens a stream with its request and decodes the answers through the typed streams.

use super::conn::AgentClient;
use super::stream::{one_answer, unexpected, Transport};
use super::{
    Agent, AgentError, DirPage, ExecStream, FileRead, FileWrite, FsAnswer, Health, Relay,
    WatchStream,
};
use futures_util::future::BoxFuture;
use hutch_proto::{ExecRequest, FsRequest, Request, Response, RestoreInfo};
use std::sync::Arc;

/// Opens agent streams: the seam under every typed [`Agent`] operation.
pub(crate) trait Opener: Send + Sync {
    /// Opens a stream with `req` (without waiting: errors of the request come as its answer).
    fn open_stream(&self, req: &Request) -> Result<Arc<dyn Transport>, AgentError>;
    /// Whether streams can be opened (or soon will be).
    fn alive(&self) -> bool;
}

impl Opener for AgentClient {
    fn open_stream(&self, req: &Request) -> Result<Arc<dyn Transport>, AgentError> {
        Ok(Arc::new(self.open(req)?))
    }

    fn alive(&self) -> bool {
        AgentClient::is_alive(self)
    }
}

/// The typed form of an fs answer.
pub(crate) fn fs_answer(r: Response) -> Result<FsAnswer, AgentError> {
    Ok(match r {
        Response::FsAttr { attr } => FsAnswer::Attr(attr),
        Response::FsDir {
            entries,
            more,
            next,
        } => FsAnswer::Dir(DirPage {
            entries,
            more,
            next,
        }),
        Response::FsPath { path } => FsAnswer::Path(path),
        Response::Done { .. } => FsAnswer::Done,
        other => return Err(unexpected(&other, "an fs answer")),
    })
}

impl<O: Opener> Agent for O {
    fn is_alive(&self) -> bool {
        self.alive()
    }

    fn relay(&self, req: &Request) -> Result<Relay, AgentError> {
        Ok(Relay(self.open_stream(req)?))
    }

    fn exec(&self, req: ExecRequest) -> Result<ExecStream, AgentError> {
        Ok(ExecStream::new(self.open_stream(&Request::Exec(req))?))
    }

    fn read_file(&self, path: &str, offset: u64, len: Option<u64>) -> Result<FileRead, AgentError> {
        read(self, None, path, offset, len)
    }

    fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWrite, AgentError> {
        write(self, None, path, mode, offset)
    }

    fn read_file_as(
        &self,
        user: &str,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileRead, AgentError> {
        read(self, Some(user), path, offset, len)
    }

    fn write_file_as(
        &self,
        user: &str,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWrite, AgentError> {
        write(self, Some(user), path, mode, offset)
    }

    fn fs_as(&self, user: &str, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
        let s = self.open_stream(&Request::FsAs {
            user: user.into(),
            req,
        });
        Box::pin(async move { fs_answer(one_answer(&*s?).await?) })
    }

    fn export_changes(&self) -> Result<FileRead, AgentError> {
        Ok(FileRead::new(self.open_stream(&Request::ExportChanges)?))
    }

    fn fs(&self, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
        let s = self.open_stream(&Request::Fs(req));
        Box::pin(async move { fs_answer(one_answer(&*s?).await?) })
    }

    fn health(&self) -> BoxFuture<'_, Result<Health, AgentError>> {
        let s = self.open_stream(&Request::Health);
        Box::pin(async move {
            match one_answer(&*s?).await? {
                Response::Health {
                    ready,
                    uptime_ms,
                    processes,
                } => Ok(Health {
                    ready,
                    uptime_ms,
                    processes,
                }),
                other => Err(unexpected(&other, "health")),
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.open_stream(&Request::Shutdown))
    }

    fn restored(&self, info: RestoreInfo) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.open_stream(&Request::Restored(info)))
    }

    fn watch(&self, path: &str, recursive: bool) -> BoxFuture<'_, Result<WatchStream, AgentError>> {
        let s = self.open_stream(&Request::Watch {
            path: path.into(),
            recursive,
        });
        Box::pin(async move { WatchStream::established(s?).await })
    }
}

/// A file read as `user` (root when None).
fn read(
    o: &dyn Opener,
    user: Option<&str>,
    path: &str,
    offset: u64,
    len: Option<u64>,
) -> Result<FileRead, AgentError> {
    let s = o.open_stream(&Request::ReadFile {
        path: path.into(),
        offset,
        len,
        user: user.map(Into::into),
    })?;
    Ok(FileRead::new(s))
}

/// A file write as `user` (root when None).
fn write(
    o: &dyn Opener,
    user: Option<&str>,
    path: &str,
    mode: Option<u32>,
    offset: Option<u64>,
) -> Result<FileWrite, AgentError> {
    let s = o.open_stream(&Request::WriteFile {
        path: path.into(),
        mode,
        offset,
        user: user.map(Into::into),
    })?;
    Ok(FileWrite::new(s))
}

/// Waits for the `done` that answers a request opened as `s`.
fn done(s: Result<Arc<dyn Transport>, AgentError>) -> BoxFuture<'static, Result<(), AgentError>> {
    Box::pin(async move {
        match one_answer(&*s?).await? {
            Response::Done { .. } => Ok(()),
            other => Err(unexpected(&other, "done")),
        }
    })
}
