//! Processes and files in a running VM, through its agent, streamed with bounded memory: exec,
//! file reads and writes (whole or at an offset), filesystem operations, and the export of a
//! VM's changes for commit. Every wait on the guest has a bound, so a guest that never answers
//! makes the call fail with a clear error instead of hanging.

use crate::agent::{AgentClient, AgentError, AgentStream};
use crate::error::ApiError;
use crate::manager::{ExecVm, Manager};
use hutch_core::image_env;
use hutch_proto::{ExecRequest, Kind, Request, Response};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the agent has to answer a request (start a process, open a file, take the next
/// chunk of input, finish a file operation).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// During an export, the longest pause between two pieces of the layer.
pub const EXPORT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest an export may take in all.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Offsets and lengths beyond this cannot be seeked to in the guest (off_t is signed).
pub const MAX_OFFSET: u64 = i64::MAX as u64;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

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

pub fn file_error(code: &str, message: String) -> ApiError {
    match code {
        "not_found" => ApiError::NotFound {
            kind: "file",
            name: message,
        },
        "is_directory" | "permission_denied" => ApiError::Invalid(message),
        _ => ApiError::Internal(message),
    }
}

/// The guest did not answer in time.
fn no_answer(name: &str, what: &str, e: AgentError) -> ApiError {
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
    stream: AgentStream,
    /// A first chunk read ahead (to learn whether the file opens).
    first: Option<Vec<u8>>,
    done: bool,
}

impl FileReader {
    /// The next chunk; `Ok(None)` at the end of the file.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, ApiError> {
        if let Some(b) = self.first.take() {
            return Ok(Some(b));
        }
        if self.done {
            return Ok(None);
        }
        loop {
            let f = self
                .stream
                .rx
                .recv_within(ANSWER_TIMEOUT)
                .await
                .map_err(|e| no_answer(&self.name, "a file read", e))?;
            match f.kind {
                Kind::Stdout => return Ok(Some(f.payload)),
                Kind::Response => match f.parse::<Response>("response").map_err(internal)? {
                    Response::Done { .. } => {
                        self.done = true;
                        return Ok(None);
                    }
                    Response::Error { code, message } => return Err(file_error(&code, message)),
                    _ => {}
                },
                _ => {}
            }
        }
    }
}

/// A file being written in the guest: feed chunks, then [`FileWriter::finish`].
pub struct FileWriter {
    name: String,
    client: Arc<AgentClient>,
    stream: AgentStream,
}

impl FileWriter {
    /// Sends a chunk, waiting (boundedly) for the guest to take the previous ones.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ApiError> {
        let sent =
            tokio::time::timeout(ANSWER_TIMEOUT, self.client.send_stdin(self.stream.id, data))
                .await;
        match sent {
            Ok(Ok(())) => Ok(()),
            // The agent ended the stream early: its answer says why.
            Ok(Err(AgentError::Closed)) => Err(self.answer().await.err().unwrap_or_else(|| {
                ApiError::Internal("the agent ended the file write early".into())
            })),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(no_answer(
                &self.name,
                "a file write",
                AgentError::Timeout(ANSWER_TIMEOUT),
            )),
        }
    }

    /// Ends the file; returns the bytes the guest wrote.
    pub async fn finish(mut self) -> Result<u64, ApiError> {
        tokio::time::timeout(ANSWER_TIMEOUT, self.client.send_eof(self.stream.id))
            .await
            .map_err(|_| {
                no_answer(
                    &self.name,
                    "a file write",
                    AgentError::Timeout(ANSWER_TIMEOUT),
                )
            })??;
        self.answer().await
    }

    async fn answer(&mut self) -> Result<u64, ApiError> {
        loop {
            let f = self
                .stream
                .rx
                .recv_within(ANSWER_TIMEOUT)
                .await
                .map_err(|e| no_answer(&self.name, "a file write", e))?;
            if f.kind == Kind::Response {
                match f.parse::<Response>("response").map_err(internal)? {
                    Response::Done { bytes } => return Ok(bytes),
                    Response::Error { code, message } => return Err(file_error(&code, message)),
                    _ => {}
                }
            }
        }
    }
}

impl Manager {
    /// Starts a process; returns the stream its output and exit arrive on. Stdin given whole
    /// (JSON `stdin`) is fed in the background within the stream's credit; with `stream_stdin`
    /// the caller feeds it with [`AgentClient::send_stdin`].
    pub fn exec(
        &self,
        name: &str,
        req: ExecVm,
    ) -> Result<(Arc<AgentClient>, AgentStream), ApiError> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(ApiError::Invalid("argv must name a program".into()));
        }
        let vm = self.get(name)?;
        let client = self.client(&vm)?;
        let stdin = match &req.stdin {
            Some(s) => Some(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s)
                    .map_err(|e| ApiError::Invalid(format!("stdin is not base64: {e}")))?,
            ),
            None => None,
        };
        let image = self.image_of(&vm)?;
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
        let r = Request::Exec(ExecRequest {
            argv: req.argv,
            env,
            cwd,
            user,
            stdin: stdin.is_some() || req.stream_stdin,
            timeout_ms: req.timeout_secs.map(|s| s.saturating_mul(1000)),
            detach: false,
            tty: req.tty,
        });
        let stream = client.open(&r)?;
        if let Some(data) = stdin {
            let (c, id) = (client.clone(), stream.id);
            tokio::spawn(async move {
                if c.send_stdin(id, &data).await.is_ok() {
                    let _ = c.send_eof(id).await;
                }
            });
        }
        Ok((client, stream))
    }

    /// Asks the guest agent how it is.
    pub async fn agent_health(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        let vm = self.get(name)?;
        let client = self.client(&vm)?;
        let mut s = client.open(&Request::Health)?;
        let f =
            s.rx.recv_within(Duration::from_secs(10))
                .await
                .map_err(|e| no_answer(name, "a health check", e))?;
        match f.parse::<Response>("response").map_err(internal)? {
            Response::Health {
                ready,
                uptime_ms,
                processes,
            } => Ok(serde_json::json!({
                "ready": ready, "uptime_ms": uptime_ms, "processes": processes
            })),
            other => Err(internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// A filesystem operation in the guest (SFTP); returns the agent's answer.
    pub async fn fs(&self, name: &str, req: hutch_proto::FsRequest) -> Result<Response, ApiError> {
        let vm = self.get(name)?;
        let client = self.client(&vm)?;
        let mut s = client.open(&Request::Fs(req))?;
        loop {
            let f =
                s.rx.recv_within(ANSWER_TIMEOUT)
                    .await
                    .map_err(|e| no_answer(name, "a file operation", e))?;
            if f.kind == Kind::Response {
                return match f.parse::<Response>("response").map_err(internal)? {
                    Response::Error { code, message } => Err(file_error(&code, message)),
                    r => Ok(r),
                };
            }
        }
    }

    /// Opens `path` for reading from `offset` (`len` bytes, or to its end). Errors of the open
    /// (no such file, a directory) come here, before any data.
    pub async fn open_read(
        &self,
        name: &str,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileReader, ApiError> {
        check_path(path)?;
        checked_end(offset, len.unwrap_or(0))?;
        let vm = self.get(name)?;
        let client = self.client(&vm)?;
        let stream = client.open(&Request::ReadFile {
            path: path.into(),
            offset,
            len,
        })?;
        let mut r = FileReader {
            name: name.to_string(),
            stream,
            first: None,
            done: false,
        };
        r.first = r.next().await?;
        Ok(r)
    }

    /// Opens `path` for writing: created or truncated (parents made) without `offset`, written
    /// in place at `offset` otherwise.
    pub async fn open_write(
        &self,
        name: &str,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWriter, ApiError> {
        check_path(path)?;
        if let Some(o) = offset {
            checked_end(o, 0)?;
        }
        let vm = self.get(name)?;
        let client = self.client(&vm)?;
        let stream = client.open(&Request::WriteFile {
            path: path.into(),
            mode,
            offset,
        })?;
        Ok(FileWriter {
            name: name.to_string(),
            client,
            stream,
        })
    }

    /// Reads a whole small file (at most `max` bytes; more is an error).
    pub async fn read_file(&self, name: &str, path: &str, max: u64) -> Result<Vec<u8>, ApiError> {
        let mut r = self.open_read(name, path, 0, None).await?;
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
        &self,
        name: &str,
        path: &str,
        mode: Option<u32>,
        data: &[u8],
    ) -> Result<u64, ApiError> {
        let mut w = self.open_write(name, path, mode, None).await?;
        w.write(data).await?;
        w.finish().await
    }

    /// Streams the VM's changes since boot into `out` (an OCI layer tar), within
    /// [`EXPORT_IDLE_TIMEOUT`] between pieces, [`EXPORT_TIMEOUT`] in all and `max_bytes`.
    pub(crate) async fn export_changes(
        &self,
        name: &str,
        client: &Arc<AgentClient>,
        out: &mut tokio::fs::File,
        max_bytes: u64,
    ) -> Result<u64, ApiError> {
        use tokio::io::AsyncWriteExt;
        let mut s = client.open(&Request::ExportChanges)?;
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
            let fr =
                s.rx.recv_within(EXPORT_IDLE_TIMEOUT.min(left))
                    .await
                    .map_err(|e| no_answer(name, "the export of its changes", e))?;
            match fr.kind {
                Kind::Stdout => {
                    total += fr.payload.len() as u64;
                    if total > max_bytes {
                        return Err(ApiError::Conflict(format!(
                            "the changes of {name} are over {max_bytes} bytes"
                        )));
                    }
                    out.write_all(&fr.payload).await.map_err(internal)?;
                    crate::crash::point("commit.exporting");
                }
                Kind::Response => match fr.parse::<Response>("response").map_err(internal)? {
                    Response::Done { .. } => break,
                    Response::Error { message, .. } => {
                        return Err(ApiError::Internal(format!(
                            "exporting the changes of {name}: {message}"
                        )))
                    }
                    _ => {}
                },
                _ => {}
            }
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
