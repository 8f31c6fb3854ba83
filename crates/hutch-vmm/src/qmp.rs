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

/// A QMP session without an async runtime, for the few commands hutchd runs from blocking
/// code: typed arguments, answers as JSON, events skipped, and a descriptor passed along with a
/// command (`getfd`) over the socket.
pub struct Blocking {
    reader: std::io::BufReader<std::io::Take<std::os::unix::net::UnixStream>>,
    stream: std::os::unix::net::UnixStream,
}

/// The most QMP answer bytes one session reads (QEMU's answers to hutch's commands are small).
const MAX_SESSION_BYTES: u64 = 16 << 20;

impl Blocking {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Blocking, VmmError> {
        let s = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| err(format!("connect {}: {e}", path.display())))?;
        s.set_read_timeout(Some(timeout)).map_err(err)?;
        s.set_write_timeout(Some(timeout)).map_err(err)?;
        use std::io::Read;
        let reader = std::io::BufReader::new(s.try_clone().map_err(err)?.take(MAX_SESSION_BYTES));
        let mut c = Blocking { reader, stream: s };
        let greeting = c.read()?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("unexpected greeting {greeting}")));
        }
        c.execute("qmp_capabilities", None)?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value, VmmError> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(err)? == 0 {
            return Err(err("connection closed"));
        }
        serde_json::from_str(&line).map_err(err)
    }

    fn answer(&mut self, cmd: &str) -> Result<Value, VmmError> {
        loop {
            let v = self.read()?;
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

    fn message(cmd: &str, args: Option<Value>) -> Vec<u8> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        line.into_bytes()
    }

    /// Runs `cmd` and returns its `return` value.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, VmmError> {
        use std::io::Write;
        self.stream
            .write_all(&Self::message(cmd, args))
            .map_err(err)?;
        self.answer(cmd)
    }

    /// Runs `cmd` with descriptor `fd` attached (SCM_RIGHTS), as `getfd` and `add-fd` expect.
    pub fn execute_with_fd(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        fd: std::os::fd::RawFd,
    ) -> Result<Value, VmmError> {
        use std::os::fd::AsRawFd;
        let msg = Self::message(cmd, args);
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes, room for one header and one descriptor,
        // so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::c_int, fd);
        }
        // SAFETY: a valid socket and a fully initialised msghdr.
        let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        if (n as usize) < msg.len() {
            use std::io::Write;
            self.stream.write_all(&msg[n as usize..]).map_err(err)?;
        }
        self.answer(cmd)
    }
}
