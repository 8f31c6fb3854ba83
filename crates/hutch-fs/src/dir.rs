//! [`Dir`]: one resolved directory of a [`Root`], acted on by plain names. Every call is a
//! `*at` system call on the directory's descriptor that never follows a symlink in the name.

use crate::{is_plain, sys, FsError, Kind, Root, Stat};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// How deep [`Dir::remove_all`] descends (each level holds a descriptor).
const MAX_DEPTH: usize = 512;

/// A directory inside a [`Root`].
#[derive(Debug)]
pub struct Dir<'r> {
    root: &'r Root,
    /// An O_PATH descriptor of the directory.
    fd: OwnedFd,
    /// Its path relative to the root, as asked for (for messages).
    rel: PathBuf,
}

/// Flags for opening one name in a directory: the name must be a plain component, so nothing
/// is followed at all.
const ONE: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

impl<'r> Dir<'r> {
    pub(crate) fn new(root: &'r Root, fd: OwnedFd, rel: PathBuf) -> Dir<'r> {
        Dir { root, fd, rel }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The directory's path relative to its root.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    fn name_ok(&self, name: &OsStr) -> Result<(), FsError> {
        if is_plain(name) {
            Ok(())
        } else {
            Err(FsError::BadPath {
                path: self.rel.join(name).display().to_string(),
                why: "not a plain file name",
            })
        }
    }

    fn err(&self, name: &OsStr, e: io::Error) -> FsError {
        self.root.err(&self.rel.join(name), e)
    }

    fn open(&self, name: &OsStr, flags: libc::c_int, mode: u32) -> Result<OwnedFd, FsError> {
        self.name_ok(name)?;
        sys::openat2(self.fd(), name, flags | libc::O_NOFOLLOW, mode, ONE)
            .map_err(|e| self.err(name, e))
    }

    /// Creates a new regular file (`O_CREAT | O_EXCL | O_NOFOLLOW`), open for writing.
    pub fn create_file(&self, name: &OsStr, mode: u32) -> Result<File, FsError> {
        let fd = self.open(
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            mode & 0o7777,
        )?;
        Ok(File::from(fd))
    }

    /// Removes whatever non-directory is at `name`, then creates a new regular file there. A
    /// directory in the way is an error ([`FsError::Exists`]).
    pub fn replace_file(&self, name: &OsStr, mode: u32) -> Result<File, FsError> {
        self.name_ok(name)?;
        match sys::unlinkat(self.fd(), name, false) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                return Err(FsError::Exists(self.rel.join(name).display().to_string()))
            }
            Err(e) => return Err(self.err(name, e)),
        }
        self.create_file(name, mode)
    }

    /// Opens a regular file read-write, creating it if absent; anything else there is an error.
    pub fn open_rw(&self, name: &OsStr, mode: u32) -> Result<File, FsError> {
        match self.open(name, libc::O_RDWR | libc::O_NONBLOCK, 0) {
            Ok(fd) => self.regular(name, File::from(fd)),
            Err(FsError::NotFound(_)) => Ok(File::from(self.open(
                name,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                mode & 0o7777,
            )?)),
            Err(e) => Err(e),
        }
    }

    /// Opens an existing regular file for reading (not through a symlink).
    pub fn open_file(&self, name: &OsStr) -> Result<File, FsError> {
        let f = File::from(self.open(name, libc::O_RDONLY | libc::O_NONBLOCK, 0)?);
        self.regular(name, f)
    }

    /// `f` (opened non-blocking, so a FIFO planted there cannot hang the open) if it is a
    /// regular file, made blocking again; anything else is an error.
    fn regular(&self, name: &OsStr, f: File) -> Result<File, FsError> {
        let st = sys::fstatat(f.as_fd(), OsStr::new("")).map_err(|e| self.err(name, e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FsError::BadPath {
                path: self.rel.join(name).display().to_string(),
                why: "not a regular file",
            });
        }
        crate::set_blocking(&f).map_err(|e| self.err(name, e))?;
        Ok(f)
    }

    /// The subdirectory `name` (a symlink there is refused, not followed).
    pub fn subdir(&self, name: &OsStr) -> Result<Dir<'r>, FsError> {
        let fd = self.open(name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok(Dir::new(self.root, fd, self.rel.join(name)))
    }

    pub fn mkdir(&self, name: &OsStr, mode: u32) -> Result<(), FsError> {
        self.name_ok(name)?;
        sys::mkdirat(self.fd(), name, mode & 0o7777).map_err(|e| self.err(name, e))
    }

    pub fn mkfifo(&self, name: &OsStr, mode: u32) -> Result<(), FsError> {
        self.name_ok(name)?;
        sys::mkfifoat(self.fd(), name, mode).map_err(|e| self.err(name, e))
    }

    /// Makes `name` a symlink holding `target` (text; never resolved here).
    pub fn symlink(&self, target: &Path, name: &OsStr) -> Result<(), FsError> {
        self.name_ok(name)?;
        sys::symlinkat(target.as_os_str(), self.fd(), name).map_err(|e| self.err(name, e))
    }

    /// Makes `name` here a hard link to `src_name` in `src` (a directory of the same root).
    /// A symlink source is linked itself; a directory source is refused by the kernel.
    pub fn hard_link(&self, src: &Dir<'_>, src_name: &OsStr, name: &OsStr) -> Result<(), FsError> {
        self.name_ok(name)?;
        src.name_ok(src_name)?;
        if src.root.id() != self.root.id() {
            return Err(FsError::CrossRoot(
                self.rel.join(name).display().to_string(),
            ));
        }
        sys::linkat(src.fd(), src_name, self.fd(), name).map_err(|e| self.err(name, e))
    }

    /// Removes a file, symlink or empty directory. Ok(false) if nothing was there.
    pub fn remove(&self, name: &OsStr) -> Result<bool, FsError> {
        self.name_ok(name)?;
        match sys::unlinkat(self.fd(), name, false) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                sys::unlinkat(self.fd(), name, true).map_err(|e| self.err(name, e))?;
                Ok(true)
            }
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Removes `name` and, if it is a directory, all it holds. Ok(false) if nothing was there.
    pub fn remove_all(&self, name: &OsStr) -> Result<bool, FsError> {
        self.name_ok(name)?;
        self.remove_all_depth(name, 0)
    }

    fn remove_all_depth(&self, name: &OsStr, depth: usize) -> Result<bool, FsError> {
        let st = match sys::fstatat(self.fd(), name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(self.err(name, e)),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            if depth >= MAX_DEPTH {
                return Err(FsError::BadPath {
                    path: self.rel.join(name).display().to_string(),
                    why: "directory tree too deep to remove",
                });
            }
            let sub = self.subdir(name)?;
            for child in sub.entries()? {
                sub.remove_all_depth(&child, depth + 1)?;
            }
            sys::unlinkat(self.fd(), name, true).map_err(|e| self.err(name, e))?;
        } else {
            sys::unlinkat(self.fd(), name, false).map_err(|e| self.err(name, e))?;
        }
        Ok(true)
    }

    /// The names in this directory.
    pub fn entries(&self) -> Result<Vec<OsString>, FsError> {
        let fd = sys::openat2(
            self.fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
            ONE,
        )
        .map_err(|e| self.root.err(&self.rel, e))?;
        sys::list_dir(fd.as_fd()).map_err(|e| self.root.err(&self.rel, e))
    }

    /// Facts about `name` (a symlink is described, not followed).
    pub fn stat(&self, name: &OsStr) -> Result<Stat, FsError> {
        self.name_ok(name)?;
        let st = sys::fstatat(self.fd(), name).map_err(|e| self.err(name, e))?;
        Ok(Stat::from_raw(&st))
    }

    /// Facts about `name`, None if it does not exist.
    pub fn try_stat(&self, name: &OsStr) -> Result<Option<Stat>, FsError> {
        match self.stat(name) {
            Ok(s) => Ok(Some(s)),
            Err(FsError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn read_link(&self, name: &OsStr) -> Result<PathBuf, FsError> {
        self.name_ok(name)?;
        sys::readlinkat(self.fd(), name)
            .map(PathBuf::from)
            .map_err(|e| self.err(name, e))
    }

    /// Changes the owner of `name` itself (a symlink's own owner, never its target's).
    pub fn lchown(&self, name: &OsStr, uid: u32, gid: u32) -> Result<(), FsError> {
        self.name_ok(name)?;
        sys::lchownat(self.fd(), name, uid, gid).map_err(|e| self.err(name, e))
    }

    /// Sets the permission bits of `name` (setuid/setgid/sticky included). A symlink is left
    /// alone (Linux symlinks have no mode of their own); it is never followed.
    pub fn chmod(&self, name: &OsStr, mode: u32) -> Result<(), FsError> {
        self.name_ok(name)?;
        match sys::lchmodat(self.fd(), name, mode & 0o7777) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => match self.stat(name)?.kind {
                Kind::Symlink => Ok(()),
                _ => Err(self.err(name, e)),
            },
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Sets extended attribute `attr` on `name` (a regular file or directory; refused on
    /// anything else, a symlink included, rather than risk following it).
    pub fn set_xattr(&self, name: &OsStr, attr: &[u8], value: &[u8]) -> Result<(), FsError> {
        let kind = self.stat(name)?.kind;
        let fd = match kind {
            Kind::File => self.open(name, libc::O_RDONLY | libc::O_NONBLOCK, 0)?,
            Kind::Dir => self.open(name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?,
            _ => {
                return Err(FsError::BadPath {
                    path: self.rel.join(name).display().to_string(),
                    why: "extended attributes only on files and directories",
                })
            }
        };
        sys::fsetxattr(fd.as_fd(), attr, value).map_err(|e| self.err(name, e))
    }
}
