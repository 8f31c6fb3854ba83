//! [`Agent`] for the real connection: each operation opens a stream with its request and
//! decodes the answers through the typed streams.

use super::conn::{AgentClient, RawStream};
use super::stream::{one_answer, unexpected};
use super::{
    Agent, AgentError, DirPage, ExecStream, FileRead, FileWrite, FsAnswer, Health, WatchStream,
};
use futures_util::future::BoxFuture;
use hutch_proto::{ExecRequest, FsRequest, Request, Response, RestoreInfo};
use std::sync::Arc;

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

impl Agent for AgentClient {
    fn is_alive(&self) -> bool {
        AgentClient::is_alive(self)
    }

    fn exec(&self, req: ExecRequest) -> Result<ExecStream, AgentError> {
        Ok(ExecStream::new(Arc::new(self.open(&Request::Exec(req))?)))
    }

    fn read_file(&self, path: &str, offset: u64, len: Option<u64>) -> Result<FileRead, AgentError> {
        self.read(None, path, offset, len)
    }

    fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWrite, AgentError> {
        self.write(None, path, mode, offset)
    }

    fn read_file_as(
        &self,
        user: &str,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileRead, AgentError> {
        self.read(Some(user), path, offset, len)
    }

    fn write_file_as(
        &self,
        user: &str,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWrite, AgentError> {
        self.write(Some(user), path, mode, offset)
    }

    fn fs_as(&self, user: &str, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
        let s = self.open(&Request::FsAs {
            user: user.into(),
            req,
        });
        Box::pin(async move { fs_answer(one_answer(&s?).await?) })
    }

    fn export_changes(&self) -> Result<FileRead, AgentError> {
        Ok(FileRead::new(Arc::new(self.open(&Request::ExportChanges)?)))
    }

    fn fs(&self, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
        let s = self.open(&Request::Fs(req));
        Box::pin(async move { fs_answer(one_answer(&s?).await?) })
    }

    fn health(&self) -> BoxFuture<'_, Result<Health, AgentError>> {
        let s = self.open(&Request::Health);
        Box::pin(async move {
            match one_answer(&s?).await? {
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
        done(self.open(&Request::Shutdown))
    }

    fn restored(&self, info: RestoreInfo) -> BoxFuture<'_, Result<(), AgentError>> {
        done(self.open(&Request::Restored(info)))
    }

    fn watch(&self, path: &str, recursive: bool) -> BoxFuture<'_, Result<WatchStream, AgentError>> {
        let s = self.open(&Request::Watch {
            path: path.into(),
            recursive,
        });
        Box::pin(async move { WatchStream::established(Arc::new(s?)).await })
    }
}

impl AgentClient {
    /// A file read as `user` (root when None).
    fn read(
        &self,
        user: Option<&str>,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileRead, AgentError> {
        let s = self.open(&Request::ReadFile {
            path: path.into(),
            offset,
            len,
            user: user.map(Into::into),
        })?;
        Ok(FileRead::new(Arc::new(s)))
    }

    /// A file write as `user` (root when None).
    fn write(
        &self,
        user: Option<&str>,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWrite, AgentError> {
        let s = self.open(&Request::WriteFile {
            path: path.into(),
            mode,
            offset,
            user: user.map(Into::into),
        })?;
        Ok(FileWrite::new(Arc::new(s)))
    }
}

/// Waits for the `done` that answers a request opened as `s`.
fn done(s: Result<RawStream, AgentError>) -> BoxFuture<'static, Result<(), AgentError>> {
    Box::pin(async move {
        match one_answer(&s?).await? {
            Response::Done { .. } => Ok(()),
            other => Err(unexpected(&other, "done")),
        }
    })
}
