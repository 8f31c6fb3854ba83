//! SFTP into a VM (so `scp` and `sftp` work): the SFTP subsystem of an `ssh VM@host` session,
//! carried out through the guest agent's file and filesystem operations.
//!
//! Nothing is staged on the host: every read and write goes to the guest at its offset, as one
//! agent request of at most [`MAX_IO`] bytes, so an SFTP session holds no file data beyond the
//! request in flight (no per-session quota is needed). Offsets are checked: `offset + len`
//! beyond the largest guest file offset is refused with a clear message, never wrapped. A
//! session holds at most [`MAX_HANDLES`] handles, at most [`MAX_DIRS`] of them directories
//! (each keeps its listing until read), so a client that never closes them is bounded too.

use crate::agent::{within, Agent, AgentError, DirPage as AgentPage, ErrorCode};
use crate::error::ApiError;
use crate::service::files::{checked_end, ANSWER_TIMEOUT};
use crate::service::timers::InUse;
use crate::service::Service;
use futures_util::future::BoxFuture;
use hutch_proto::FileAttr;
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode,
};
use russh_sftp::server::StatusReply;
use std::collections::HashMap;
use std::sync::Arc;

/// Most bytes one SFTP read returns (clients ask for 32-256 KiB). As in OpenSSH's sftp-server,
/// 1 KiB under 256 KiB, so that the reply fits in the 256 KiB packets clients accept.
pub const MAX_IO: u32 = 255 * 1024;
/// Most handles one SFTP session may hold open (OpenSSH's sftp-server is bounded by its fds).
pub const MAX_HANDLES: usize = 1024;
/// Most directory handles among them: each holds its listing (up to an agent frame).
pub const MAX_DIRS: usize = 16;

enum Open {
    File {
        path: String,
        /// Where the next write goes for a handle opened with APPEND (SFTP offsets ignored).
        append_at: Option<u64>,
    },
    /// A directory: the page readdir returns next, fetched from the agent one page at a time,
    /// so a handle holds at most one page (`hutch_proto::DIR_PAGE` entries) however large the
    /// directory.
    Dir { path: String, page: DirPage },
}

/// Empty listing pages readdir skips in a row before it gives up on the guest.
const MAX_EMPTY_PAGES: usize = 16;

/// One page of a directory listing and where the next starts.
#[derive(Clone)]
struct DirPage {
    files: Vec<File>,
    more: bool,
    next: u64,
}

pub struct VmSftp {
    m: Arc<Service>,
    caller: crate::auth::Caller,
    vm: String,
    handles: HashMap<String, Open>,
    next: u64,
    /// The VM is in use (not auto-paused) while the session lasts.
    _use: InUse,
}

impl VmSftp {
    pub fn new(m: Arc<Service>, caller: crate::auth::Caller, vm: String, u: InUse) -> VmSftp {
        VmSftp {
            m,
            caller,
            vm,
            handles: HashMap::new(),
            next: 1,
            _use: u,
        }
    }

    fn handle(&mut self, o: Open) -> String {
        let h = format!("h{}", self.next);
        self.next += 1;
        self.handles.insert(h.clone(), o);
        h
    }

    /// Refuses a new handle (a directory with `dir`) past the session's limits.
    fn room(&self, dir: bool) -> Result<(), StatusReply> {
        let dirs = || {
            let d = self.handles.values();
            d.filter(|o| matches!(o, Open::Dir { .. })).count()
        };
        if self.handles.len() >= MAX_HANDLES || (dir && dirs() >= MAX_DIRS) {
            let what = if dir { "directory handles" } else { "handles" };
            return Err(
                StatusCode::Failure.with_message(format!("too many open {what}; close some first"))
            );
        }
        Ok(())
    }

    /// The VM's agent, looked up for every request (the VM may have stopped meanwhile).
    async fn agent(&self) -> Result<Arc<dyn Agent>, StatusReply> {
        self.m.agent(&self.caller, &self.vm).await.map_err(code)
    }

    /// The agent's answer within [`ANSWER_TIMEOUT`], its errors as SFTP statuses.
    async fn ask<T>(&self, f: BoxFuture<'_, Result<T, AgentError>>) -> Result<T, StatusReply> {
        within(ANSWER_TIMEOUT, f)
            .await
            .map_err(|e| agent_status(&self.vm, e))
    }

    /// Entries of directory `path` from position `skip` on, one agent page (the agent client
    /// refuses a page that claims more but does not advance).
    async fn dir_page(&self, path: &str, skip: u64) -> Result<DirPage, StatusReply> {
        let a = self.agent().await?;
        let AgentPage {
            entries,
            more,
            next,
        } = self.ask(a.read_dir(path, skip)).await?;
        Ok(DirPage {
            files: entries
                .iter()
                .map(|e| File {
                    filename: e.name.clone(),
                    longname: longname(&e.name, &e.attr),
                    attrs: attrs(&e.attr),
                })
                .collect(),
            more,
            next,
        })
    }

    async fn guest_stat(&self, path: &str, follow: bool) -> Result<FileAttr, StatusReply> {
        let a = self.agent().await?;
        self.ask(a.stat(path, follow)).await
    }

    /// Writes `data` to `path` (see [`Agent::write_file`] for `offset`), in one agent request.
    async fn put(
        &self,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
        data: &[u8],
    ) -> Result<(), StatusReply> {
        let a = self.agent().await?;
        let mut w = a
            .write_file(path, mode, offset)
            .map_err(|e| agent_status(&self.vm, e))?;
        self.ask(Box::pin(w.write(data))).await?;
        self.ask(Box::pin(w.finish())).await?;
        Ok(())
    }

    async fn attr_of(&self, path: String, follow: bool) -> Result<FileAttributes, StatusReply> {
        Ok(attrs(&self.guest_stat(&abs(&path), follow).await?))
    }

    fn file(&self, handle: &str) -> Result<&str, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File { path, .. }) => Ok(path),
            _ => Err(StatusCode::Failure.with_message("not an open file handle")),
        }
    }

    fn ok(id: u32) -> Status {
        Status {
            id,
            status_code: StatusCode::Ok,
            error_message: "Ok".into(),
            language_tag: "en-US".into(),
        }
    }
}

/// The SFTP status of a host-side error (the VM is gone or stopped, an offset out of range).
fn code(e: ApiError) -> StatusReply {
    let c = match &e {
        ApiError::NotFound { .. } => StatusCode::NoSuchFile,
        ApiError::Forbidden(_) => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    c.with_message(e.to_string())
}

/// The SFTP status of what the agent of `vm` answered: by its error code, with its message.
fn agent_status(vm: &str, e: AgentError) -> StatusReply {
    let c = match e.code() {
        Some(ErrorCode::NotFound) => StatusCode::NoSuchFile,
        Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => StatusCode::PermissionDenied,
        Some(ErrorCode::Unsupported) => StatusCode::OpUnsupported,
        _ => StatusCode::Failure,
    };
    let message = match e {
        AgentError::Timeout(d) => {
            format!("the agent of {vm} did not answer within {}s", d.as_secs())
        }
        e => e.to_string(),
    };
    c.with_message(message)
}

/// Relative SFTP paths are relative to root's home.
fn abs(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else if p.is_empty() || p == "." {
        "/root".into()
    } else {
        format!("/root/{p}")
    }
}

fn attrs(a: &FileAttr) -> FileAttributes {
    FileAttributes {
        size: Some(a.size),
        uid: Some(a.uid),
        user: None,
        gid: Some(a.gid),
        group: None,
        permissions: Some(a.mode),
        atime: Some(a.atime.max(0) as u32),
        mtime: Some(a.mtime.max(0) as u32),
    }
}

fn longname(name: &str, a: &FileAttr) -> String {
    let kind = match a.mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        _ => '-',
    };
    let mut perms = String::new();
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        perms.push(if a.mode & (0o400 >> i) != 0 { c } else { '-' });
    }
    format!(
        "{kind}{perms} 1 {} {} {} Jan 1 00:00 {name}",
        a.uid, a.gid, a.size
    )
}

impl russh_sftp::server::Handler for VmSftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<russh_sftp::protocol::Version, Self::Error> {
        Ok(russh_sftp::protocol::Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        self.room(false)?;
        let path = abs(&filename);
        let mode = attrs.permissions.map(|p| p & 0o7777);
        let writes = pflags.intersects(
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::APPEND,
        );
        if pflags.contains(OpenFlags::TRUNCATE) {
            self.put(&path, mode, None, &[]).await?;
        } else if writes && pflags.contains(OpenFlags::CREATE) {
            // Created if missing, never truncated.
            self.put(&path, mode, Some(0), &[]).await?;
        }
        let attr = self.guest_stat(&path, true).await?;
        if attr.mode & 0o170000 == 0o040000 {
            return Err(StatusCode::Failure.with_message(format!("{path} is a directory")));
        }
        let append_at = pflags.contains(OpenFlags::APPEND).then_some(attr.size);
        Ok(Handle {
            id,
            handle: self.handle(Open::File { path, append_at }),
        })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(Self::ok(id)),
            None => Err(StatusCode::Failure.with_message("no such handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let len = len.min(MAX_IO);
        checked_end(offset, u64::from(len)).map_err(code)?;
        let path = self.file(&handle)?.to_string();
        let a = self.agent().await?;
        let mut r = a
            .read_file(&path, offset, Some(u64::from(len)))
            .map_err(|e| agent_status(&self.vm, e))?;
        let mut data = Vec::new();
        while let Some(b) = self.ask(Box::pin(r.next())).await? {
            // A guest that sends more than was asked is not believed (nor buffered).
            if data.len() + b.len() > len as usize {
                return Err(StatusCode::Failure.with_message("the guest sent more than was read"));
            }
            data.extend_from_slice(&b);
        }
        if data.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let (path, offset) = match self.handles.get_mut(&handle) {
            Some(Open::File { path, append_at }) => {
                let at = append_at.unwrap_or(offset);
                let end = checked_end(at, data.len() as u64).map_err(code)?;
                if let Some(a) = append_at {
                    *a = end;
                }
                (path.clone(), at)
            }
            _ => return Err(StatusCode::Failure.with_message("not an open file handle")),
        };
        self.put(&path, None, Some(offset), &data).await?;
        Ok(Self::ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        Ok(Attrs {
            id,
            attrs: self.attr_of(path, false).await?,
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        Ok(Attrs {
            id,
            attrs: self.attr_of(path, true).await?,
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let path = self.file(&handle)?.to_string();
        Ok(Attrs {
            id,
            attrs: attrs(&self.guest_stat(&path, true).await?),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        if let Some(p) = attrs.permissions {
            let a = self.agent().await?;
            self.ask(a.chmod(&abs(&path), p)).await?;
        }
        Ok(Self::ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = self.file(&handle)?.to_string();
        if let Some(p) = attrs.permissions {
            let a = self.agent().await?;
            self.ask(a.chmod(&path, p)).await?;
        }
        Ok(Self::ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        self.room(true)?;
        let path = abs(&path);
        // The first page now: a missing or unreadable directory fails the open, as it should.
        let page = self.dir_page(&path, 0).await?;
        Ok(Handle {
            id,
            handle: self.handle(Open::Dir { path, page }),
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        // Pages whose entries all vanished are skipped, a few in a row at most: a guest that
        // answers empty pages for ever does not keep this session looping.
        for _ in 0..MAX_EMPTY_PAGES {
            let (path, next) = match self.handles.get_mut(&handle) {
                Some(Open::Dir { page, .. }) if !page.files.is_empty() => {
                    let files = std::mem::take(&mut page.files);
                    return Ok(Name { id, files });
                }
                Some(Open::Dir { page, .. }) if !page.more => return Err(StatusCode::Eof.into()),
                Some(Open::Dir { path, page }) => (path.clone(), page.next),
                _ => return Err(StatusCode::Failure.into()),
            };
            // The next page (one whose entries all vanished meanwhile is skipped over).
            let page = self.dir_page(&path, next).await?;
            if let Some(Open::Dir { page: p, .. }) = self.handles.get_mut(&handle) {
                *p = page;
            }
        }
        Err(StatusCode::Failure.with_message("the guest's directory listing does not advance"))
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let a = self.agent().await?;
        self.ask(a.remove(&abs(&filename))).await?;
        Ok(Self::ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let mode = attrs.permissions.unwrap_or(0o755);
        let a = self.agent().await?;
        self.ask(a.mkdir(&abs(&path), mode)).await?;
        Ok(Self::ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let a = self.agent().await?;
        self.ask(a.rmdir(&abs(&path))).await?;
        Ok(Self::ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = abs(&path);
        let a = self.agent().await?;
        let real = self.ask(a.realpath(&p)).await.unwrap_or(p);
        let file = File {
            filename: real.clone(),
            longname: real,
            attrs: FileAttributes::default(),
        };
        Ok(Name {
            id,
            files: vec![file],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        let a = self.agent().await?;
        self.ask(a.rename(&abs(&oldpath), &abs(&newpath))).await?;
        Ok(Self::ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let a = self.agent().await?;
        let path = self.ask(a.readlink(&abs(&path))).await?;
        let file = File {
            filename: path.clone(),
            longname: path,
            attrs: FileAttributes::default(),
        };
        Ok(Name {
            id,
            files: vec![file],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        let a = self.agent().await?;
        self.ask(a.symlink(&targetpath, &abs(&linkpath))).await?;
        Ok(Self::ok(id))
    }
}

/// The largest SFTP packet a client may send (russh-sftp's server refuses longer ones without
/// reading them, and then reads the rest as if it were packets).
pub const MAX_CLIENT_PACKET: u32 = 262_144;

/// Follows the packet boundaries of the client -> server SFTP byte stream, so that a packet over
/// [`MAX_CLIENT_PACKET`] ends the session (as OpenSSH's sftp-server does) instead of leaving the
/// server reading a packet's body as packets.
#[derive(Debug, Default)]
pub struct PacketGuard {
    /// Bytes of the current packet's body still to come.
    body_left: u64,
    /// Bytes of the next length prefix seen so far.
    len: [u8; 4],
    len_have: usize,
}

impl PacketGuard {
    /// Takes the next bytes the client sent; an error when a packet announces more than
    /// [`MAX_CLIENT_PACKET`] bytes.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), u32> {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = (self.body_left.min(data.len() as u64)) as usize;
                self.body_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (4 - self.len_have).min(data.len());
            self.len[self.len_have..self.len_have + n].copy_from_slice(&data[..n]);
            self.len_have += n;
            data = &data[n..];
            if self.len_have == 4 {
                let len = u32::from_be_bytes(self.len);
                if len > MAX_CLIENT_PACKET {
                    return Err(len);
                }
                self.body_left = u64::from(len);
                self.len_have = 0;
            }
        }
        Ok(())
    }
}

/// Carries an SFTP session between the SSH channel and the SFTP server's end of the pipe. What
/// the client sends is followed packet by packet: one over the limit ends the session. The
/// channel is borrowed: it must outlive this, as dropping it closes the channel before the exit
/// status could be sent (scp checks it).
pub async fn pump(
    server: tokio::io::DuplexStream,
    chan: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut sr, mut sw) = tokio::io::split(server);
    let (mut cr, mut cw) = tokio::io::split(chan);
    let up = async {
        let mut guard = PacketGuard::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => n,
            };
            if let Err(len) = guard.feed(&buf[..n]) {
                tracing::warn!(len, "sftp packet over the limit; ending the session");
                return false;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return true;
            }
        }
    };
    {
        let down = tokio::io::copy(&mut sr, &mut cw);
        tokio::pin!(down);
        tokio::select! {
            clean = up => {
                if clean {
                    // The client is done sending: let the server answer what it has, then end.
                    let _ = sw.shutdown().await;
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(30), &mut down).await;
                }
            }
            _ = &mut down => {}
        }
    }
    let _ = cw.shutdown().await;
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    fn packet(len: u32) -> Vec<u8> {
        let mut p = len.to_be_bytes().to_vec();
        p.resize(4 + len as usize, 7);
        p
    }

    #[test]
    fn follows_packets_split_anywhere_and_stops_oversized_ones() {
        let mut stream = Vec::new();
        for l in [5, 0, 1000, MAX_CLIENT_PACKET] {
            stream.extend(packet(l));
        }
        for chunk in [1, 3, 7, 4096, stream.len()] {
            let mut g = PacketGuard::default();
            for c in stream.chunks(chunk) {
                g.feed(c).unwrap();
            }
            assert_eq!((g.body_left, g.len_have), (0, 0), "chunks of {chunk}");
        }
        let mut g = PacketGuard::default();
        g.feed(&packet(10)).unwrap();
        g.feed(&(MAX_CLIENT_PACKET + 1).to_be_bytes()[..2]).unwrap();
        assert_eq!(
            g.feed(&(MAX_CLIENT_PACKET + 1).to_be_bytes()[2..]),
            Err(MAX_CLIENT_PACKET + 1)
        );
        assert_eq!(
            PacketGuard::default().feed(&u32::MAX.to_be_bytes()),
            Err(u32::MAX)
        );
    }
}
