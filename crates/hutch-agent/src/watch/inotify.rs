//! The kernel side of one watch stream: its own inotify instance, one inotify watch per
//! directory (the watched one and, when recursive, every directory under it), and the kernel's
//! events as [`Change`]s named relative to the watched directory.
//!
//! A recursive watch follows its tree as it changes: a directory made in it is watched and
//! scanned, and what it already holds is reported as created (entries made before its watch was
//! set would be missed otherwise; one made just as the watch was set may be reported twice). A
//! directory moved in is watched with everything under it (reported as one `create`, as the
//! kernel does); one moved within the tree keeps its watches under its new name; one moved out
//! loses them. Subdirectories are never followed through symlinks.
//!
//! Closing the instance (dropping [`Inotify`]) removes all its watches at once.

use hutch_proto::ErrorCode;
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The events a watch asks for on every directory.
const EVENTS: u32 = libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_ATTRIB
    | libc::IN_ONLYDIR;
/// Reads of queued events per [`Inotify::read`], so a flood cannot keep the caller from sending.
const READS_PER_CALL: usize = 16;
/// The size of `struct inotify_event` without its name.
const HEADER: usize = 16;

/// A refused or ended watch: the protocol's code and a message for people.
pub type Refusal = (ErrorCode, String);

/// What the kernel reported for one entry, before writes are coalesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raw {
    Create,
    MovedTo,
    Modify,
    CloseWrite,
    Delete,
    MovedFrom,
    Attrib,
}

/// One change: the entry's path relative to the watched directory, and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub name: String,
    pub raw: Raw,
}

/// One watch stream's inotify instance; see the module doc.
pub struct Inotify {
    fd: OwnedFd,
    /// The watched directory as the host named it (subdirectories are watched by paths under
    /// it).
    root: String,
    root_wd: i32,
    recursive: bool,
    /// Watched directories by watch descriptor: their path relative to `root` ("" for itself).
    dirs: HashMap<i32, String>,
    max: usize,
    /// Directories moved away during the current read: unwatched at its end unless they were
    /// moved back into the tree meanwhile.
    moved: Vec<String>,
    buf: Vec<u8>,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn under(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// The protocol's code for a failed `inotify_add_watch`: its ENOSPC is the kernel's limit of
/// watches, not a full disk.
fn watch_code(e: &io::Error) -> ErrorCode {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => ErrorCode::ResourceExhausted,
        _ => crate::sys::io_code(e),
    }
}

impl Inotify {
    /// Watches directory `path` (following a symlink to it), and with `recursive` every
    /// directory under it, at most `max` directories in all.
    pub fn open(path: &str, recursive: bool, max: usize) -> Result<Inotify, Refusal> {
        let c = CString::new(path).map_err(|_| {
            (
                ErrorCode::InvalidArgument,
                format!("{path:?}: a NUL in the path"),
            )
        })?;
        // SAFETY: inotify_init1 takes only flags.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err((crate::sys::io_code(&e), format!("inotify: {e}")));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a valid fd and a NUL-terminated path that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), EVENTS) };
        if wd < 0 {
            let e = io::Error::last_os_error();
            return Err((watch_code(&e), format!("{path}: {e}")));
        }
        let mut me = Inotify {
            fd,
            root: path.trim_end_matches('/').to_string(),
            root_wd: wd,
            recursive,
            dirs: HashMap::from([(wd, String::new())]),
            max,
            moved: Vec::new(),
            buf: vec![0; 64 * 1024],
        };
        if recursive {
            me.scan("", None)?;
        }
        Ok(me)
    }

    /// The inotify fd, to poll.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Directories watched now.
    #[cfg(test)]
    pub fn watches(&self) -> usize {
        self.dirs.len()
    }

    fn full(&self, rel: &str) -> String {
        if rel.is_empty() && self.root.is_empty() {
            "/".to_string()
        } else if rel.is_empty() {
            self.root.clone()
        } else {
            format!("{}/{rel}", self.root)
        }
    }

    /// Watches subdirectory `rel` (already watched: it gets its new name). False when it is no
    /// directory (any more).
    fn add(&mut self, rel: &str) -> Result<bool, Refusal> {
        let full = self.full(rel);
        let Ok(c) = CString::new(full.as_str()) else {
            return Ok(false);
        };
        // SAFETY: a valid fd and a NUL-terminated path that outlives the call.
        let wd = unsafe {
            libc::inotify_add_watch(self.fd(), c.as_ptr(), EVENTS | libc::IN_DONT_FOLLOW)
        };
        if wd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Gone, replaced, or not ours to see: nothing to watch there.
                Some(libc::ENOENT | libc::ENOTDIR | libc::EACCES | libc::ELOOP) => Ok(false),
                _ => Err((watch_code(&e), format!("{full}: {e}"))),
            };
        }
        let new = self.dirs.insert(wd, rel.to_string()).is_none();
        if new && self.dirs.len() > self.max {
            return Err((
                ErrorCode::ResourceExhausted,
                format!(
                    "{}: more than {} directories to watch",
                    self.full(""),
                    self.max
                ),
            ));
        }
        Ok(true)
    }

    /// Watches the directories under `rel` (itself watched already); with `report`, reports what
    /// they hold as created.
    fn scan(&mut self, rel: &str, mut report: Option<&mut Vec<Change>>) -> Result<(), Refusal> {
        let mut todo = vec![rel.to_string()];
        while let Some(dir) = todo.pop() {
            let Ok(entries) = std::fs::read_dir(self.full(&dir)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = join(&dir, &e.file_name().to_string_lossy());
                if let Some(out) = report.as_deref_mut() {
                    out.push(Change {
                        name: name.clone(),
                        raw: Raw::Create,
                    });
                }
                // file_type does not follow symlinks.
                if e.file_type().is_ok_and(|t| t.is_dir()) && self.add(&name)? {
                    todo.push(name);
                }
            }
        }
        Ok(())
    }

    /// Takes what the kernel has queued (without waiting) and appends the changes to `out`. An
    /// error ends the watch: the watched directory is gone, or the tree outgrew the limits.
    pub fn read(&mut self, out: &mut Vec<Change>) -> Result<(), Refusal> {
        let r = self.read_queued(out);
        // Directories moved away and not back: stop watching them (their events would carry
        // names that are no longer theirs).
        for gone in std::mem::take(&mut self.moved) {
            let wds: Vec<i32> = self
                .dirs
                .iter()
                .filter(|(_, rel)| under(rel, &gone))
                .map(|(wd, _)| *wd)
                .collect();
            for wd in wds {
                self.dirs.remove(&wd);
                // SAFETY: inotify_rm_watch takes an fd and a watch descriptor.
                unsafe { libc::inotify_rm_watch(self.fd(), wd) };
            }
        }
        r
    }

    fn read_queued(&mut self, out: &mut Vec<Change>) -> Result<(), Refusal> {
        for _ in 0..READS_PER_CALL {
            // SAFETY: buf is a valid, writable buffer of its length.
            let n = unsafe {
                libc::read(
                    self.fd(),
                    self.buf.as_mut_ptr() as *mut libc::c_void,
                    self.buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err((ErrorCode::Io, format!("{}: {e}", self.full("")))),
                }
            }
            let buf = std::mem::take(&mut self.buf);
            let r = self.parse(&buf[..n as usize], out);
            self.buf = buf;
            r?;
        }
        Ok(())
    }

    fn parse(&mut self, mut b: &[u8], out: &mut Vec<Change>) -> Result<(), Refusal> {
        let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        while b.len() >= HEADER {
            let wd = u32_at(b, 0) as i32;
            let mask = u32_at(b, 4);
            let len = (u32_at(b, 12) as usize).min(b.len() - HEADER);
            let name = &b[HEADER..HEADER + len];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(len)];
            self.event(wd, mask, &String::from_utf8_lossy(name), out)?;
            b = &b[HEADER + len..];
        }
        Ok(())
    }

    fn event(
        &mut self,
        wd: i32,
        mask: u32,
        name: &str,
        out: &mut Vec<Change>,
    ) -> Result<(), Refusal> {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            eprintln!(
                "hutch-agent: watch of {}: the kernel's event queue overflowed; events were lost",
                self.full("")
            );
            return Ok(());
        }
        let Some(dir) = self.dirs.get(&wd).cloned() else {
            // A watch removed meanwhile.
            return Ok(());
        };
        if mask & libc::IN_IGNORED != 0 {
            self.dirs.remove(&wd);
            if wd == self.root_wd {
                return Err((
                    ErrorCode::NotFound,
                    format!("{}: the watched directory is gone", self.full("")),
                ));
            }
            return Ok(());
        }
        if name.is_empty() {
            // About a watched directory itself: its parent reports it (or, for the watched
            // one, nobody: changes to it are not its entries').
            return Ok(());
        }
        let rel = join(&dir, name);
        let is_dir = mask & libc::IN_ISDIR != 0;
        let bits = [
            (libc::IN_CREATE, Raw::Create),
            (libc::IN_MOVED_TO, Raw::MovedTo),
            (libc::IN_MODIFY, Raw::Modify),
            (libc::IN_ATTRIB, Raw::Attrib),
            (libc::IN_CLOSE_WRITE, Raw::CloseWrite),
            (libc::IN_MOVED_FROM, Raw::MovedFrom),
            (libc::IN_DELETE, Raw::Delete),
        ];
        for (bit, raw) in bits {
            if mask & bit == 0 {
                continue;
            }
            out.push(Change {
                name: rel.clone(),
                raw,
            });
            if !(is_dir && self.recursive) {
                continue;
            }
            // A new directory's entries are reported; one moved within the tree keeps its
            // watches under its new name, one moved in gets new ones (what it holds was not
            // made here).
            let report = match raw {
                Raw::Create => true,
                Raw::MovedTo => false,
                Raw::MovedFrom => {
                    self.moved.push(rel.clone());
                    continue;
                }
                _ => continue,
            };
            if self.add(&rel)? {
                self.scan(&rel, report.then_some(&mut *out))?;
            }
        }
        Ok(())
    }
}
