//! hutch-fs: the one way hutch makes or opens files named by untrusted input (image archives,
//! layer tarballs, registry digests, SFTP paths, commit exports).
//!
//! A [`Root`] holds a directory descriptor. Every path given to it is resolved by the kernel with
//! `openat2(2)` under `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` ([`Mode::Beneath`]: anything that
//! would leave the root, `..` or an absolute or relative symlink, is an error) or
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS` ([`Mode::InRoot`]: symlinks and `..` resolve as if
//! the root were `/`, as they will inside the VM; used to apply image layers). No textual check
//! decides where a path lands, so chains of symlinks cannot walk out.
//!
//! The last component of a path is never followed: files are opened with `O_NOFOLLOW`, created
//! with `O_CREAT | O_EXCL`, and every other change (mkdir, symlink, hard link, unlink, rename,
//! chown, chmod, xattr) is made with a `*at` call relative to the descriptor of the resolved
//! parent directory, with `AT_SYMLINK_NOFOLLOW` where the call has it. Replacing an entry
//! unlinks it first, so nothing is ever written through an existing link. Hard links are made
//! only between two entries of the same root.
//!
//! The API, for other crates (the daemon's SFTP server included):
//! - [`Root::open`]`(path, mode)`: the root; it must be a real directory (not a symlink).
//! - Path-based calls on a root, each resolving its parent under the root:
//!   [`Root::open_file`], [`Root::create_file`], [`Root::replace_file`], [`Root::open_rw`],
//!   [`Root::create_dir_all`], [`Root::mkdir`], [`Root::symlink`], [`Root::hard_link`],
//!   [`Root::remove`], [`Root::remove_all`], [`Root::rename`], [`Root::stat`],
//!   [`Root::read_dir`], [`Root::read_link`].
//! - [`Dir`]: a resolved directory of a root ([`Root::dir`], [`Root::create_dir_all`]) whose
//!   calls take one plain name (no `/`, `.` or `..`), for loops that work in one directory:
//!   layer application resolves each entry's parent once and acts on the name.
//!
//! If the kernel has no `openat2` (Linux < 5.6), every call fails with [`FsError::NoOpenat2`];
//! there is no weaker fallback.

mod dir;
pub mod durable;
mod sys;

pub use dir::Dir;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// How symlinks met while resolving a path are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Followed only while they stay beneath the root; absolute symlinks and any escape fail.
    Beneath,
    /// Followed as if the root were `/` (a chroot): `..` and absolute targets are clamped.
    InRoot,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} leads outside {root}")]
    Escapes { path: String, root: String },
    #[error("{path}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("{0}: too many levels of symbolic links")]
    Loop(String),
    #[error("{0} is not a directory")]
    NotDir(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("hard link {0} would join two different roots")]
    CrossRoot(String),
    #[error(
        "the kernel has no openat2(2) (Linux 5.6 or newer is needed); \
         hutch refuses to handle untrusted files without it"
    )]
    NoOpenat2,
}

impl FsError {
    /// The underlying OS error, if this is one.
    pub fn os_error(&self) -> Option<i32> {
        match self {
            FsError::Io { source, .. } => source.raw_os_error(),
            FsError::NotFound(_) => Some(libc::ENOENT),
            FsError::Exists(_) => Some(libc::EEXIST),
            FsError::NotDir(_) => Some(libc::ENOTDIR),
            _ => None,
        }
    }

    /// Whether this says the path does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FsError::NotFound(_))
    }
}

/// What an entry is (never following a symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// `lstat`-like facts about an entry.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub kind: Kind,
    /// Permission bits, setuid/setgid/sticky included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
}

impl Stat {
    pub(crate) fn from_raw(st: &libc::stat) -> Stat {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => Kind::File,
        };
        Stat {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: st.st_nlink,
        }
    }
}

/// A directory that untrusted paths are resolved beneath.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    mode: Mode,
    path: PathBuf,
    /// (st_dev, st_ino) of the root directory: hard links are made only within one root.
    id: (u64, u64),
}

/// The most symlinks `create_dir_all` follows through dangling links before giving up (the
/// kernel's own limit for one lookup is 40).
const MAX_HOPS: usize = 40;

impl Root {
    /// Opens `path` (which must be a directory, not a symlink to one) as a root.
    pub fn open(path: &Path, mode: Mode) -> Result<Root, FsError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| FsError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
        let fd = OwnedFd::from(f);
        let st = sys::fstatat(fd.as_fd(), OsStr::new("")).map_err(|e| FsError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let root = Root {
            fd,
            mode,
            path: path.to_path_buf(),
            id: (st.st_dev, st.st_ino),
        };
        // Fail now, clearly, on a kernel without openat2.
        root.open_dir_fd(Path::new(""))?;
        Ok(root)
    }

    /// The host path the root was opened at (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn id(&self) -> (u64, u64) {
        self.id
    }

    fn resolve_flags(&self) -> u64 {
        let base = match self.mode {
            Mode::Beneath => libc::RESOLVE_BENEATH,
            Mode::InRoot => libc::RESOLVE_IN_ROOT,
        };
        base | libc::RESOLVE_NO_MAGICLINKS
    }

    /// Maps an OS error met while resolving `rel` to an error that says what happened.
    pub(crate) fn err(&self, rel: &Path, e: io::Error) -> FsError {
        let path = rel.display().to_string();
        match e.raw_os_error() {
            Some(libc::ENOSYS) => FsError::NoOpenat2,
            Some(libc::EXDEV) => FsError::Escapes {
                path,
                root: self.path.display().to_string(),
            },
            Some(libc::ELOOP) => FsError::Loop(path),
            Some(libc::ENOTDIR) => FsError::NotDir(path),
            Some(libc::EEXIST) => FsError::Exists(path),
            Some(libc::ENOENT) => FsError::NotFound(path),
            _ => FsError::Io { path, source: e },
        }
    }

    /// `openat2` of `rel` under this root's resolution rules.
    pub(crate) fn openat2(
        &self,
        rel: &Path,
        flags: libc::c_int,
        mode: u32,
    ) -> Result<OwnedFd, FsError> {
        let p: &OsStr = if rel.as_os_str().is_empty() {
            OsStr::new(".")
        } else {
            rel.as_os_str()
        };
        sys::openat2(self.fd(), p, flags, mode, self.resolve_flags()).map_err(|e| self.err(rel, e))
    }

    fn open_dir_fd(&self, rel: &Path) -> Result<OwnedFd, FsError> {
        self.openat2(rel, libc::O_PATH | libc::O_DIRECTORY, 0)
    }

    /// The directory `rel` (symlinks on the way, the last one included, resolved by the root's
    /// rules).
    pub fn dir(&self, rel: &Path) -> Result<Dir<'_>, FsError> {
        Ok(Dir::new(self, self.open_dir_fd(rel)?, rel.to_path_buf()))
    }

    /// The parent directory of `rel`, resolved, and its last component (a plain name).
    pub fn parent(&self, rel: &Path) -> Result<(Dir<'_>, OsString), FsError> {
        let (parent, name) = split(rel)?;
        Ok((self.dir(&parent)?, name))
    }

    /// Opens an existing regular file for reading; a symlink in the last component is refused.
    pub fn open_file(&self, rel: &Path) -> Result<File, FsError> {
        let fd = self.openat2(rel, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0)?;
        let f = File::from(fd);
        let st = sys::fstatat(f.as_fd(), OsStr::new("")).map_err(|e| self.err(rel, e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FsError::BadPath {
                path: rel.display().to_string(),
                why: "not a regular file",
            });
        }
        set_blocking(&f).map_err(|e| self.err(rel, e))?;
        Ok(f)
    }

    /// Creates a new regular file for writing (`O_CREAT | O_EXCL | O_NOFOLLOW`): fails if
    /// anything, a symlink included, is already there.
    pub fn create_file(&self, rel: &Path, mode: u32) -> Result<File, FsError> {
        let (d, name) = self.parent(rel)?;
        d.create_file(&name, mode)
    }

    /// Creates a regular file, first removing whatever non-directory is there (never writing
    /// through it).
    pub fn replace_file(&self, rel: &Path, mode: u32) -> Result<File, FsError> {
        let (d, name) = self.parent(rel)?;
        d.replace_file(&name, mode)
    }

    /// Opens a regular file read-write, creating it (with `O_EXCL`) if it is absent; a symlink
    /// or other non-regular entry in its place is an error. For downloads that resume.
    pub fn open_rw(&self, rel: &Path, mode: u32) -> Result<File, FsError> {
        let (d, name) = self.parent(rel)?;
        d.open_rw(&name, mode)
    }

    /// Creates the directory `rel` and any missing parents, resolving existing symlinks by the
    /// root's rules (in [`Mode::InRoot`], a dangling symlink on the way gets its target made, as
    /// a chroot would). Returns the directory.
    pub fn create_dir_all(&self, rel: &Path, mode: u32) -> Result<Dir<'_>, FsError> {
        let mut comps = components(rel)?;
        let mut hops = 0;
        'restart: loop {
            match self.open_dir_fd(&join(&comps)) {
                Ok(fd) => return Ok(Dir::new(self, fd, join(&comps))),
                Err(FsError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            let mut parent = self.open_dir_fd(Path::new(""))?;
            for i in 0..comps.len() {
                let prefix = join(&comps[..=i]);
                match self.open_dir_fd(&prefix) {
                    Ok(fd) => {
                        parent = fd;
                        continue;
                    }
                    Err(FsError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
                let name = comps[i].clone();
                if !is_plain(&name) {
                    return Err(self.err(&prefix, io::Error::from_raw_os_error(libc::ENOENT)));
                }
                match sys::mkdirat(parent.as_fd(), &name, mode) {
                    Ok(()) => {
                        parent = sys::openat2(
                            parent.as_fd(),
                            &name,
                            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                            0,
                            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
                        )
                        .map_err(|e| self.err(&prefix, e))?;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        // A dangling symlink: go on through its target.
                        let target = sys::readlinkat(parent.as_fd(), &name).map_err(|e| {
                            if e.raw_os_error() == Some(libc::EINVAL) {
                                FsError::NotDir(prefix.display().to_string())
                            } else {
                                self.err(&prefix, e)
                            }
                        })?;
                        hops += 1;
                        if hops > MAX_HOPS {
                            return Err(FsError::Loop(rel.display().to_string()));
                        }
                        let target = PathBuf::from(target);
                        let mut next = if target.is_absolute() {
                            if self.mode == Mode::Beneath {
                                return Err(FsError::Escapes {
                                    path: rel.display().to_string(),
                                    root: self.path.display().to_string(),
                                });
                            }
                            Vec::new()
                        } else {
                            comps[..i].to_vec()
                        };
                        next.extend(components(&target)?);
                        next.extend_from_slice(&comps[i + 1..]);
                        comps = next;
                        continue 'restart;
                    }
                    Err(e) => return Err(self.err(&prefix, e)),
                }
            }
            return Ok(Dir::new(self, parent, join(&comps)));
        }
    }

    /// Creates one directory (its parent must exist).
    pub fn mkdir(&self, rel: &Path, mode: u32) -> Result<(), FsError> {
        let (d, name) = self.parent(rel)?;
        d.mkdir(&name, mode)
    }

    /// Makes `rel` a symlink holding `target` (stored as text, never resolved here).
    pub fn symlink(&self, target: &Path, rel: &Path) -> Result<(), FsError> {
        let (d, name) = self.parent(rel)?;
        d.symlink(target, &name)
    }

    /// Makes `new` a hard link to the existing entry `existing` (not followed if a symlink);
    /// both are resolved beneath this root.
    pub fn hard_link(&self, existing: &Path, new: &Path) -> Result<(), FsError> {
        let (sd, sname) = self.parent(existing)?;
        let (d, name) = self.parent(new)?;
        d.hard_link(&sd, &sname, &name)
    }

    /// Removes a file, symlink or empty directory. Ok(false) if nothing was there.
    pub fn remove(&self, rel: &Path) -> Result<bool, FsError> {
        let (d, name) = self.parent(rel)?;
        d.remove(&name)
    }

    /// Removes an entry and, for a directory, everything in it (never following symlinks).
    pub fn remove_all(&self, rel: &Path) -> Result<bool, FsError> {
        let (d, name) = self.parent(rel)?;
        d.remove_all(&name)
    }

    /// Renames `from` to `to`, both beneath this root.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<(), FsError> {
        let (fd, fname) = self.parent(from)?;
        let (td, tname) = self.parent(to)?;
        sys::renameat(fd.fd(), &fname, td.fd(), &tname).map_err(|e| self.err(from, e))
    }

    /// Facts about `rel` (a symlink in the last component is described, not followed).
    pub fn stat(&self, rel: &Path) -> Result<Stat, FsError> {
        if components(rel)?.is_empty() {
            let st = sys::fstatat(self.fd(), OsStr::new("")).map_err(|e| self.err(rel, e))?;
            return Ok(Stat::from_raw(&st));
        }
        let (d, name) = self.parent(rel)?;
        d.stat(&name)
    }

    /// The names in directory `rel`.
    pub fn read_dir(&self, rel: &Path) -> Result<Vec<OsString>, FsError> {
        self.dir(rel)?.entries()
    }

    /// The target text of symlink `rel`.
    pub fn read_link(&self, rel: &Path) -> Result<PathBuf, FsError> {
        let (d, name) = self.parent(rel)?;
        d.read_link(&name)
    }
}

/// Sets extended attribute `attr` on an open file (one made through a [`Root`]).
pub fn set_xattr_fd(f: &File, attr: &[u8], value: &[u8]) -> io::Result<()> {
    sys::fsetxattr(f.as_fd(), attr, value)
}

fn set_blocking(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt;

/// Whether `n` is one plain path component: not empty, not `.` or `..`, no `/` or NUL.
pub fn is_plain(n: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let b = n.as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0)
}

/// The components of `rel` as the kernel will walk them (`.` and a leading `/` dropped: every
/// path is taken relative to the root).
fn components(rel: &Path) -> Result<Vec<OsString>, FsError> {
    use std::os::unix::ffi::OsStrExt;
    if rel.as_os_str().as_bytes().contains(&0) {
        return Err(FsError::BadPath {
            path: rel.display().to_string(),
            why: "NUL in path",
        });
    }
    Ok(rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect())
}

fn join(comps: &[OsString]) -> PathBuf {
    comps.iter().collect()
}

/// Splits `rel` into its parent and a plain last name; refuses a path that names the root
/// itself or ends in `..`.
fn split(rel: &Path) -> Result<(PathBuf, OsString), FsError> {
    let mut comps = components(rel)?;
    match comps.pop() {
        Some(n) if is_plain(&n) => Ok((join(&comps), n)),
        _ => Err(FsError::BadPath {
            path: rel.display().to_string(),
            why: "does not end in a file name",
        }),
    }
}

#[cfg(test)]
mod tests;
