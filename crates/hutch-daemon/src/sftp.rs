//! SFTP into a VM (so `scp` and `sftp` work): the SFTP subsystem of an `ssh VM@host` session,
//! carried out through the guest agent's file and filesystem operations.
//!
//! Open files are staged on the host: a file opened for reading is fetched whole at open, one
//! opened for writing is collected and written whole at close (writes at any offset).

use crate::error::ApiError;
use crate::manager::Manager;
use hutch_proto::{FileAttr, FsRequest, Response};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Biggest file staged for one open handle.
const MAX_FILE: usize = 1 << 30;

enum Open {
    Read(Vec<u8>),
    Write {
        path: String,
        data: Vec<u8>,
        mode: Option<u32>,
    },
    Dir(Option<Vec<File>>),
}

pub struct VmSftp {
    m: Arc<Manager>,
    vm: String,
    handles: HashMap<String, Open>,
    next: u64,
}

impl VmSftp {
    pub fn new(m: Arc<Manager>, vm: String) -> VmSftp {
        VmSftp {
            m,
            vm,
            handles: HashMap::new(),
            next: 1,
        }
    }

    fn handle(&mut self, o: Open) -> String {
        let h = format!("h{}", self.next);
        self.next += 1;
        self.handles.insert(h.clone(), o);
        h
    }

    async fn fs(&self, req: FsRequest) -> Result<Response, StatusCode> {
        self.m.fs(&self.vm, req).await.map_err(code)
    }

    async fn attr_of(&self, path: String, follow: bool) -> Result<FileAttributes, StatusCode> {
        match self
            .fs(FsRequest::Stat {
                path: abs(&path),
                follow,
            })
            .await?
        {
            Response::FsAttr { attr } => Ok(attrs(&attr)),
            _ => Err(StatusCode::Failure),
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

fn code(e: ApiError) -> StatusCode {
    match e {
        ApiError::NotFound { .. } => StatusCode::NoSuchFile,
        ApiError::Invalid(m) if m.contains("ermission") => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    }
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
    type Error = StatusCode;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported
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
        let path = abs(&filename);
        let h = if pflags.intersects(
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::APPEND,
        ) {
            let data =
                if pflags.contains(OpenFlags::TRUNCATE) || !pflags.contains(OpenFlags::APPEND) {
                    Vec::new()
                } else {
                    self.m.read_file(&self.vm, &path).await.unwrap_or_default()
                };
            let mode = attrs.permissions.map(|p| p & 0o7777);
            Open::Write { path, data, mode }
        } else {
            Open::Read(self.m.read_file(&self.vm, &path).await.map_err(code)?)
        };
        Ok(Handle {
            id,
            handle: self.handle(h),
        })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(Open::Write { path, data, mode }) => {
                self.m
                    .write_file(&self.vm, &path, mode, &data)
                    .await
                    .map_err(code)?;
                Ok(Self::ok(id))
            }
            Some(_) => Ok(Self::ok(id)),
            None => Err(StatusCode::Failure),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        match self.handles.get(&handle) {
            Some(Open::Read(d)) => {
                let start = offset.min(d.len() as u64) as usize;
                if start >= d.len() {
                    return Err(StatusCode::Eof);
                }
                let end = (start + len as usize).min(d.len());
                Ok(Data {
                    id,
                    data: d[start..end].to_vec(),
                })
            }
            _ => Err(StatusCode::Failure),
        }
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        match self.handles.get_mut(&handle) {
            Some(Open::Write { data: buf, .. }) => {
                let end = offset as usize + data.len();
                if end > MAX_FILE {
                    return Err(StatusCode::Failure);
                }
                if buf.len() < end {
                    buf.resize(end, 0);
                }
                buf[offset as usize..end].copy_from_slice(&data);
                Ok(Self::ok(id))
            }
            _ => Err(StatusCode::Failure),
        }
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
        let a = match self.handles.get(&handle) {
            Some(Open::Read(d)) => FileAttributes {
                size: Some(d.len() as u64),
                permissions: Some(0o100644),
                ..Default::default()
            },
            Some(Open::Write { data, mode, .. }) => FileAttributes {
                size: Some(data.len() as u64),
                permissions: Some(0o100000 | mode.unwrap_or(0o644)),
                ..Default::default()
            },
            _ => return Err(StatusCode::Failure),
        };
        Ok(Attrs { id, attrs: a })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        if let Some(p) = attrs.permissions {
            self.fs(FsRequest::Chmod {
                path: abs(&path),
                mode: p,
            })
            .await?;
        }
        Ok(Self::ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        if let (Some(Open::Write { mode, .. }), Some(p)) =
            (self.handles.get_mut(&handle), attrs.permissions)
        {
            *mode = Some(p & 0o7777);
        }
        Ok(Self::ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let entries = match self.fs(FsRequest::ReadDir { path: abs(&path) }).await? {
            Response::FsDir { entries } => entries,
            _ => return Err(StatusCode::Failure),
        };
        let files = entries
            .iter()
            .map(|e| File {
                filename: e.name.clone(),
                longname: longname(&e.name, &e.attr),
                attrs: attrs(&e.attr),
            })
            .collect();
        Ok(Handle {
            id,
            handle: self.handle(Open::Dir(Some(files))),
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.handles.get_mut(&handle) {
            Some(Open::Dir(files)) => match files.take() {
                Some(files) => Ok(Name { id, files }),
                None => Err(StatusCode::Eof),
            },
            _ => Err(StatusCode::Failure),
        }
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        self.fs(FsRequest::Remove {
            path: abs(&filename),
        })
        .await?;
        Ok(Self::ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let mode = attrs.permissions.unwrap_or(0o755);
        self.fs(FsRequest::Mkdir {
            path: abs(&path),
            mode,
        })
        .await?;
        Ok(Self::ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        self.fs(FsRequest::Rmdir { path: abs(&path) }).await?;
        Ok(Self::ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = abs(&path);
        let real = match self.fs(FsRequest::Realpath { path: p.clone() }).await {
            Ok(Response::FsPath { path }) => path,
            _ => p,
        };
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
        self.fs(FsRequest::Rename {
            from: abs(&oldpath),
            to: abs(&newpath),
        })
        .await?;
        Ok(Self::ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        match self.fs(FsRequest::Readlink { path: abs(&path) }).await? {
            Response::FsPath { path } => {
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
            _ => Err(StatusCode::Failure),
        }
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        self.fs(FsRequest::Symlink {
            target: targetpath,
            link: abs(&linkpath),
        })
        .await?;
        Ok(Self::ok(id))
    }
}
