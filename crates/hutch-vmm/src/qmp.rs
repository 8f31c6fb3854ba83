//! A small typed QMP client over the VM's unix socket.

use crate::VmmError;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub struct QmpClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

fn err(m: impl std::fmt::Display) -> VmmError {
    VmmError::Qmp(m.to_string())
}

/// The run state QEMU reports (`query-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub running: bool,
    pub status: String,
}

impl QmpClient {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<QmpClient, VmmError> {
        let s = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(path))
            .await
            .map_err(|_| err("connect timed out"))?
            .map_err(|e| err(format!("connect {}: {e}", path.display())))?;
        let (r, w) = s.into_split();
        let mut c = QmpClient {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = c.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("unexpected greeting {greeting}")));
        }
        c.execute("qmp_capabilities", None).await?;
        Ok(c)
    }

    async fn read(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
            .await
            .map_err(|_| err("read timed out"))?
            .map_err(err)?;
        if n == 0 {
            return Err(err("connection closed"));
        }
        serde_json::from_str(&line).map_err(err)
    }

    /// Runs a command and returns its `return` value; events in between are skipped.
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await.map_err(err)?;
        loop {
            let v = self.read().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(err(format!(
                    "{cmd}: {}",
                    e["desc"].as_str().unwrap_or("error")
                )));
            }
        }
    }

    pub async fn query_status(&mut self) -> Result<Status, VmmError> {
        let v = self.execute("query-status", None).await?;
        Ok(Status {
            running: v["running"].as_bool().unwrap_or(false),
            status: v["status"].as_str().unwrap_or("").to_string(),
        })
    }

    /// Ends QEMU at once (the guest gets no chance to sync).
    pub async fn quit(&mut self) -> Result<(), VmmError> {
        match self.execute("quit", None).await {
            Ok(_) => Ok(()),
            // QEMU may close the socket before answering.
            Err(VmmError::Qmp(m)) if m.contains("closed") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Connects, negotiates and runs `query-status` without an async runtime; Ok once QEMU's main
/// loop answers (it only does after QEMU finished initialising, chroot included).
pub fn ping_blocking(path: &Path, timeout: Duration) -> Result<(), VmmError> {
    execute_blocking(path, "query-status", timeout).map(|_| ())
}

/// Connects, negotiates and runs one argument-less command without an async runtime; returns
/// the answer line. QEMU's greeting and events are bounded by the timeouts and a line limit.
pub fn execute_blocking(path: &Path, cmd: &str, timeout: Duration) -> Result<String, VmmError> {
    use std::io::{BufRead, Read, Write};
    let s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| err(format!("connect {}: {e}", path.display())))?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    s.set_write_timeout(Some(timeout)).map_err(err)?;
    let mut r = std::io::BufReader::new(s.try_clone().map_err(err)?.take(1 << 20));
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).map_err(err)?;
    if !line.contains("\"QMP\"") {
        return Err(err(format!("unexpected greeting {line:?}")));
    }
    for c in ["qmp_capabilities", cmd] {
        writeln!(w, "{{\"execute\":\"{c}\"}}").map_err(err)?;
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(err)? == 0 {
                return Err(err("connection closed"));
            }
            if line.contains("\"return\"") {
                break;
            }
            if line.contains("\"error\"") {
                return Err(err(format!("{c}: {}", line.trim())));
            }
        }
    }
    Ok(line)
}
