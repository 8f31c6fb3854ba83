//! Processes and files in a running VM, through its agent, streamed with bounded memory: exec,
//! file reads and writes (whole or at an offset), filesystem operations, and the export of a
//! VM's changes for commit. Every wait on the guest has a bound, so a guest that never answers
//! makes the call fail with a clear error instead of hanging.

use super::timers::InUse;
use super::{ExecVm, Service};
use crate::agent::{within, Agent, AgentError, ExecStream, FileRead, FileWrite};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::node::internal;
use bytes::Bytes;
use hutch_core::image_env;
use hutch_proto::ExecRequest;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the agent has to answer a request (start a process, open a file, take the next
/// chunk of input, finish a file operation).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent has to answer a health check.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// During an export, the longest pause between two pieces of the layer.
pub const EXPORT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest an export may take in all.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Offsets and lengths beyond this cannot be seeked to in the guest (off_t is signed).
pub const MAX_OFFSET: u64 = i64::MAX as u64;

/// `offset + len`, refused when it overflows or leaves the range a guest file can have.
pub fn checked_end(offset: u64, len: u64) -> Result<u64, ApiError> {
    offset
        .checked_add(len)
        .filter(|&end| end <= MAX_OFFSET)
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "offset {offset} + length {len} is beyond the largest file offset ({MAX_OFFSET})"
            ))
        })
}

pub fn check_path(p: &str) -> Result<(), ApiError> {
    if !p.starts_with('/') {
        return Err(ApiError::Invalid(format!("path {p:?} must be absolute")));
    }
    Ok(())
}

/// The guest did not answer in time (409, naming the VM), or another agent error.
pub fn no_answer(name: &str, what: &str, e: AgentError) -> ApiError {
    match e {
        AgentError::Timeout(d) => ApiError::Conflict(format!(
            "the agent of {name} did not answer {what} within {}s",
            d.as_secs()
        )),
        e => e.into(),
    }
}

/// A file being read from the guest: data chunks as the consumer takes them.
pub struct FileReader {
    name: String,
    inner: FileRead,
    /// A first chunk read ahead (to learn whether the file opens).
    first: Option<Bytes>,
    /// The VM is in use while the file is read (no auto-pause).
    _use: InUse,
}

impl FileReader {
    /// The next chunk; `Ok(None)` at the end of the file.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ApiError> {
        if let Some(b) = self.first.take() {
            return Ok(Some(b));
        }
        within(ANSWER_TIMEOUT, self.inner.next())
            .await
            .map_err(|e| no_answer(&self.name, "a file read", e))
    }
}

/// A file being written in the guest: feed chunks, then [`FileWriter::finish`].
pub struct FileWriter {
    name: String,
    inner: FileWrite,
    /// The VM is in use while the file is written.
    _use: InUse,
}

impl FileWriter {
    /// Sends a chunk, waiting (boundedly) for the guest to take the previous ones.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ApiError> {
        within(ANSWER_TIMEOUT, self.inner.write(data))
            .await
            .map_err(|e| no_answer(&self.name, "a file write", e))
    }

    /// Ends the file; returns the bytes the guest wrote.
    pub async fn finish(self) -> Result<u64, ApiError> {
        within(ANSWER_TIMEOUT, self.inner.finish())
            .await
            .map_err(|e| no_answer(&self.name, "a file write", e))
    }
}

/// `agent`, acting on files as guest user `user` when one is given.
pub fn as_user(agent: Arc<dyn Agent>, user: Option<&str>) -> Arc<dyn Agent> {
    match user {
        Some(u) => Arc::new(crate::agent::AsUser {
            inner: agent,
            user: u.to_string(),
        }),
        None => agent,
    }
}

impl Service {
    /// The agent of `caller`'s running VM `name`. A use of the VM: counted as activity, and a
    /// paused VM with auto-pause set is resumed first (timers.rs).
    pub async fn agent(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> Result<Arc<dyn Agent>, ApiError> {
        Ok(self.agent_in_use(caller, name).await?.0)
    }

    /// The same, with the use held until the guard is dropped.
    async fn agent_in_use(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> Result<(Arc<dyn Agent>, InUse), ApiError> {
        let (vm, u) = self.use_vm(caller, name).await?;
        Ok((self.agent_of(caller, &vm)?, u))
    }

    /// Starts a process; returns its events. Stdin given whole (JSON `stdin`) is fed in the
    /// background within the stream's credit; with `stream_stdin` the caller feeds it through
    /// the stream's [`handle`](ExecStream::handle). The VM is in use (not auto-paused) for as
    /// long as the stream lives.
    pub async fn exec(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: ExecVm,
    ) -> Result<ExecStream, ApiError> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(ApiError::Invalid("argv must name a program".into()));
        }
        let (vm, in_use) = self.use_vm(caller, name).await?;
        let client = self.agent_of(caller, &vm)?;
        self.metrics
            .execs_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stdin = match &req.stdin {
            Some(s) => Some(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s)
                    .map_err(|e| ApiError::Invalid(format!("stdin is not base64: {e}")))?,
            ),
            None => None,
        };
        let image = self.image_of(&vm).await?;
        let icfg = image.map(|i| i.config).unwrap_or_default();
        let mut env = image_env(&icfg, &vm.name);
        env.extend(req.env.clone());
        let cwd = req
            .cwd
            .clone()
            .or_else(|| Some(icfg.working_dir.clone()).filter(|w| !w.is_empty()));
        let user = req
            .user
            .clone()
            .or_else(|| Some(icfg.user.clone()).filter(|u| !u.is_empty()));
        let stream = client
            .exec(ExecRequest {
                argv: req.argv,
                env,
                cwd,
                user,
                stdin: stdin.is_some() || req.stream_stdin,
                timeout_ms: req.timeout_secs.map(|s| s.saturating_mul(1000)),
                detach: false,
                tty: req
                    .tty
                    .map(|(rows, cols)| hutch_proto::TtySize { rows, cols }),
            })?
            .holding(in_use);
        if let Some(data) = stdin {
            let h = stream.handle();
            tokio::spawn(async move {
                if h.stdin(&data).await.is_ok() {
                    let _ = h.eof().await;
                }
            });
        }
        Ok(stream)
    }

    /// Asks the guest agent how it is. Not a use of the VM: a health check neither resumes a
    /// paused VM nor keeps one from being auto-paused (on another node, its link holds it in
    /// use while it asks).
    pub async fn agent_health(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let client = self.agent_of(caller, &self.vm_for(caller, name).await?)?;
        let h = within(HEALTH_TIMEOUT, client.health())
            .await
            .map_err(|e| no_answer(name, "a health check", e))?;
        Ok(serde_json::json!({
            "ready": h.ready, "uptime_ms": h.uptime_ms, "processes": h.processes
        }))
    }

    /// Opens `path` for reading from `offset` (`len` bytes, or to its end). Errors of the open
    /// (no such file, a directory) come here, before any data.
    pub async fn open_read(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileReader, ApiError> {
        self.open_read_as(caller, name, None, path, offset, len)
            .await
    }

    /// [`Service::open_read`] as guest user `user` (its permissions), or root.
    pub async fn open_read_as(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        user: Option<&str>,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileReader, ApiError> {
        check_path(path)?;
        checked_end(offset, len.unwrap_or(0))?;
        let (agent, u) = self.agent_in_use(caller, name).await?;
        let agent = as_user(agent, user);
        let inner = agent.read_file(path, offset, len)?;
        let mut r = FileReader {
            name: name.to_string(),
            inner,
            first: None,
            _use: u,
        };
        r.first = r.next().await?;
        Ok(r)
    }

    /// Opens `path` for writing: created or truncated (parents made) without `offset`, written
    /// in place at `offset` otherwise.
    pub async fn open_write(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWriter, ApiError> {
        self.open_write_as(caller, name, None, path, mode, offset)
            .await
    }

    /// [`Service::open_write`] as guest user `user`: its permissions, and the file is its.
    pub async fn open_write_as(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        user: Option<&str>,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWriter, ApiError> {
        check_path(path)?;
        if let Some(o) = offset {
            checked_end(o, 0)?;
        }
        let (agent, u) = self.agent_in_use(caller, name).await?;
        let agent = as_user(agent, user);
        let inner = agent.write_file(path, mode, offset)?;
        Ok(FileWriter {
            name: name.to_string(),
            inner,
            _use: u,
        })
    }

    /// Reads a whole small file (at most `max` bytes; more is an error).
    pub async fn read_file(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        path: &str,
        max: u64,
    ) -> Result<Vec<u8>, ApiError> {
        let mut r = self.open_read(caller, name, path, 0, None).await?;
        let mut out = Vec::new();
        while let Some(b) = r.next().await? {
            if out.len() as u64 + b.len() as u64 > max {
                return Err(ApiError::TooLarge(format!("{path} is over {max} bytes")));
            }
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    /// Writes a whole file from memory.
    pub async fn write_file(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        path: &str,
        mode: Option<u32>,
        data: &[u8],
    ) -> Result<u64, ApiError> {
        let mut w = self.open_write(caller, name, path, mode, None).await?;
        w.write(data).await?;
        w.finish().await
    }

    /// Streams the VM's changes since boot into `out` (an OCI layer tar), within
    /// [`EXPORT_IDLE_TIMEOUT`] between pieces, [`EXPORT_TIMEOUT`] in all and `max_bytes`.
    pub(crate) async fn export_changes(
        &self,
        name: &str,
        client: &Arc<dyn Agent>,
        out: &mut tokio::fs::File,
        max_bytes: u64,
    ) -> Result<u64, ApiError> {
        use tokio::io::AsyncWriteExt;
        let mut layer = client.export_changes()?;
        let deadline = Instant::now() + EXPORT_TIMEOUT;
        let mut total = 0u64;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::Conflict(format!(
                    "exporting the changes of {name} took over {}s",
                    EXPORT_TIMEOUT.as_secs()
                )));
            }
            let piece = match within(EXPORT_IDLE_TIMEOUT.min(left), layer.next()).await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(AgentError::Guest { message, .. }) => {
                    return Err(ApiError::Internal(format!(
                        "exporting the changes of {name}: {message}"
                    )))
                }
                Err(e) => return Err(no_answer(name, "the export of its changes", e)),
            };
            total += piece.len() as u64;
            if total > max_bytes {
                return Err(ApiError::Conflict(format!(
                    "the changes of {name} are over {max_bytes} bytes"
                )));
            }
            out.write_all(&piece).await.map_err(internal)?;
            crate::crash::point("commit.exporting");
        }
        out.flush().await.map_err(internal)?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_checked() {
        assert_eq!(checked_end(10, 20).unwrap(), 30);
        assert!(checked_end(u64::MAX - 5, 10).is_err());
        assert!(checked_end(u64::MAX, 0).is_err());
        assert!(checked_end(MAX_OFFSET, 1).is_err());
        assert_eq!(checked_end(MAX_OFFSET, 0).unwrap(), MAX_OFFSET);
    }
}
