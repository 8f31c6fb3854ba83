//! The scratch places every program expects, whatever its image ships (docs/images.md,
//! "Scratch space"):
//! - `/tmp`: a directory on the VM's writable layer (disk-backed, so big temporary files do not
//!   eat guest RAM; kept across stop/start, as in a container), made if the image has none,
//!   mode 1777 enforced on every boot (as systemd-tmpfiles does).
//! - `/run`: a tmpfs, mode 1777, fresh on every boot (no stale pid files or sockets after a
//!   stop/start), seeded with what the image has in `/run` (directories such as `/run/mysqld`
//!   that images prepare at build time, with their owners and modes).
//! - `/dev/shm`: a tmpfs, mode 1777 (mounted by `init`, on the guest's devtmpfs).
//!
//! Runs after the switch into the image's root, so every path, and any symlink the image has
//! there, resolves inside the guest's root.

use crate::sys;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const STICKY: u32 = 0o1777;
/// Bounds on seeding `/run` from the image: entries and bytes of file content.
const SEED_MAX_ENTRIES: usize = 4096;
const SEED_MAX_BYTES: u64 = 16 << 20;

fn warn(msg: impl std::fmt::Display) {
    eprintln!("hutch-agent: {msg}");
}

pub fn setup() -> io::Result<()> {
    tmp()?;
    run()
}

fn tmp() -> io::Result<()> {
    let p = Path::new("/tmp");
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            if m.mode() & 0o7777 != STICKY {
                fs::set_permissions(p, fs::Permissions::from_mode(STICKY))?;
            }
        }
        Ok(_) => warn("/tmp is not a directory in this image; left as it is"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(p)?;
            fs::set_permissions(p, fs::Permissions::from_mode(STICKY))?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

fn run() -> io::Result<()> {
    let p = Path::new("/run");
    // The image's /run, kept open: once the tmpfs covers it, /proc/self/fd/N still reaches it.
    let image_run = match fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
        // A directory, or a link to one (followed, inside the guest's root).
        Ok(_) if p.is_dir() => Some(fs::File::open(p)?),
        Ok(_) => {
            warn("/run is not a directory in this image; no tmpfs there");
            return Ok(());
        }
    };
    sys::mount(
        "tmpfs",
        p,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777,size=20%"),
    )?;
    if let Some(f) = image_run {
        let src = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        let mut budget = (SEED_MAX_ENTRIES, SEED_MAX_BYTES);
        if let Err(e) = copy_tree(&src, p, &mut budget) {
            warn(format!("/run: copying the image's /run stopped: {e}"));
        }
    }
    Ok(())
}

/// Copies directories, regular files and symlinks under `src` into `dst` with their owners and
/// modes, within `budget` (entries, bytes); other kinds (fifos, sockets, devices) are skipped.
fn copy_tree(src: &Path, dst: &Path, budget: &mut (usize, u64)) -> io::Result<()> {
    for e in fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let m = fs::symlink_metadata(&from)?;
        if budget.0 == 0 {
            return Err(io::Error::other(format!(
                "more than {SEED_MAX_ENTRIES} entries"
            )));
        }
        budget.0 -= 1;
        let ft = m.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()))?;
            continue;
        }
        if ft.is_dir() {
            fs::create_dir(&to)?;
        } else if ft.is_file() {
            if m.len() > budget.1 {
                return Err(io::Error::other(format!(
                    "more than {SEED_MAX_BYTES} bytes of files"
                )));
            }
            budget.1 -= m.len();
            fs::copy(&from, &to)?;
        } else {
            continue;
        }
        // Owner first: a chown clears set-id bits that the mode then restores.
        std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        if ft.is_dir() {
            copy_tree(&from, &to, budget)?;
        }
    }
    Ok(())
}
