//! Applying OCI layer tarballs to a directory, exactly per the OCI image spec's changeset rules:
//! whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`) hide only what lower layers
//! made, hardlinks, symlinks, ownership, modes (setuid included) and xattrs are kept, device nodes
//! are skipped. Nothing is ever written outside the root: `..` entries are refused and symlinks
//! met on the way are resolved as if the root were `/`.

use crate::ImageError;
use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Bounds against layer bombs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1_000_000,
            max_bytes: 32 << 30,
        }
    }
}

/// What applying layers did, summed over layers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    pub skipped_devices: u64,
}

fn bad(msg: impl Into<String>) -> ImageError {
    ImageError::BadLayer(msg.into())
}

fn io(ctx: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |e| ImageError::Io {
        context: format!("{}", ctx.display()),
        source: e,
    }
}

/// Splits a tar entry path into normal components; refuses `..`.
fn clean(path: &Path) -> Result<PathBuf, ImageError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad(format!("entry {} escapes the root", path.display())))
            }
        }
    }
    Ok(out)
}

/// Resolves `rel` inside `root` following symlinks as if `root` were `/`, creating missing
/// directories when `create` is set. Returns the host path of the resolved directory.
fn resolve_dir(root: &Path, rel: &Path, create: bool) -> Result<PathBuf, ImageError> {
    let mut todo: VecDeque<PathBuf> = rel
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c.as_os_str() == ".." {
            cur.pop();
            continue;
        }
        if c.as_os_str() == "." || c.as_os_str() == "/" {
            continue;
        }
        let host = root.join(&cur).join(&c);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(bad(format!(
                        "too many symlinks resolving {}",
                        rel.display()
                    )));
                }
                let target = std::fs::read_link(&host).map_err(io(&host))?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                for (i, t) in target.components().enumerate() {
                    todo.insert(i, PathBuf::from(t.as_os_str()));
                }
            }
            Ok(m) if m.is_dir() => cur.push(&c),
            Ok(_) => {
                return Err(bad(format!(
                    "{} is not a directory",
                    cur.join(&c).display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&host).map_err(io(&host))?;
                std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755))
                    .map_err(io(&host))?;
                cur.push(&c);
            }
            Err(e) => return Err(io(&host)(e)),
        }
    }
    Ok(root.join(cur))
}

fn remove_any(p: &Path) -> Result<(), ImageError> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(io(p)),
        Ok(_) => std::fs::remove_file(p).map_err(io(p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(p)(e)),
    }
}

fn set_xattr(p: &Path, name: &[u8], value: &[u8]) -> Result<(), ImageError> {
    let cp = CString::new(p.as_os_str().as_bytes()).map_err(|_| bad("NUL in path"))?;
    let cn = CString::new(name).map_err(|_| bad("NUL in xattr name"))?;
    // SAFETY: valid C strings and a valid value buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io(p)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Opens a layer blob, undoing its compression (detected from the first bytes).
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(io(path))?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0)).map_err(io(path))?;
    let f = std::io::BufReader::with_capacity(256 * 1024, f);
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(f)))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        let d = zstd::stream::read::Decoder::with_buffer(f).map_err(io(path))?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(f))
    }
}

/// Applies one layer (an uncompressed tar stream) on top of `root`.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    limits: Limits,
    stats: &mut Stats,
) -> Result<(), ImageError> {
    let mut ar = tar::Archive::new(layer);
    let mut made: HashSet<PathBuf> = HashSet::new();
    for entry in ar
        .entries()
        .map_err(|e| bad(format!("reading layer: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("reading layer: {e}")))?;
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(ImageError::Limit(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let raw = entry
            .path()
            .map_err(|e| bad(format!("bad entry name: {e}")))?
            .into_owned();
        let rel = clean(&raw)?;
        let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
            continue; // the root itself
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let name_b = name.as_bytes();

        if name_b == b".wh..wh..opq" {
            let dir = resolve_dir(root, &parent_rel, true)?;
            for child in std::fs::read_dir(&dir).map_err(io(&dir))? {
                let child = child.map_err(io(&dir))?;
                if !made.contains(&parent_rel.join(child.file_name())) {
                    remove_any(&child.path())?;
                }
            }
            continue;
        }
        if let Some(hidden) = name_b.strip_prefix(b".wh.") {
            let dir = resolve_dir(root, &parent_rel, true)?;
            let hidden = OsStr::from_bytes(hidden);
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(bad(format!("bad whiteout {}", raw.display())));
            }
            remove_any(&dir.join(hidden))?;
            continue;
        }

        let dir = resolve_dir(root, &parent_rel, true)?;
        let target = dir.join(&name);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        let uid = entry.header().uid().unwrap_or(0) as u32;
        let gid = entry.header().gid().unwrap_or(0) as u32;
        let existing = std::fs::symlink_metadata(&target).ok();
        match kind {
            tar::EntryType::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    remove_any(&target)?;
                    std::fs::create_dir(&target).map_err(io(&target))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                stats.bytes += size;
                if stats.bytes > limits.max_bytes {
                    return Err(ImageError::Limit(format!(
                        "more than {} bytes of file data",
                        limits.max_bytes
                    )));
                }
                remove_any(&target)?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io(&target))?;
                let copied = std::io::copy(&mut entry, &mut f).map_err(|e| {
                    bad(format!(
                        "truncated or unreadable layer at {}: {e}",
                        raw.display()
                    ))
                })?;
                if copied != size {
                    return Err(bad(format!(
                        "{}: expected {size} bytes, layer had {copied}",
                        raw.display()
                    )));
                }
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| bad(format!("bad symlink: {e}")))?
                    .ok_or_else(|| bad(format!("symlink {} without target", raw.display())))?;
                remove_any(&target)?;
                std::os::unix::fs::symlink(&link, &target).map_err(io(&target))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| bad(format!("bad hardlink: {e}")))?
                    .ok_or_else(|| bad(format!("hardlink {} without target", raw.display())))?;
                let link_rel = clean(&link)?;
                let lname = link_rel
                    .file_name()
                    .ok_or_else(|| bad(format!("hardlink {} to the root", raw.display())))?;
                let ldir = resolve_dir(root, link_rel.parent().unwrap_or(Path::new("")), false)?;
                let src = ldir.join(lname);
                let m = std::fs::symlink_metadata(&src).map_err(|_| {
                    bad(format!(
                        "hardlink {} to missing {}",
                        raw.display(),
                        link.display()
                    ))
                })?;
                if m.is_dir() {
                    return Err(bad(format!("hardlink {} to a directory", raw.display())));
                }
                if src != target {
                    remove_any(&target)?;
                    std::fs::hard_link(&src, &target).map_err(io(&target))?;
                }
                made.insert(rel);
                continue; // a hardlink shares the inode's owner and mode
            }
            tar::EntryType::Fifo => {
                remove_any(&target)?;
                let c =
                    CString::new(target.as_os_str().as_bytes()).map_err(|_| bad("NUL in path"))?;
                // SAFETY: valid C string.
                if unsafe { libc::mkfifo(c.as_ptr(), mode) } < 0 {
                    return Err(io(&target)(std::io::Error::last_os_error()));
                }
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                // The guest's devtmpfs provides device nodes; images do not get to make them.
                stats.skipped_devices += 1;
                continue;
            }
            _ => continue,
        }
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(io(&target))?;
        if kind != tar::EntryType::Symlink {
            // After chown, which clears setuid/setgid bits.
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(io(&target))?;
        }
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    set_xattr(&target, name, ext.value_bytes())?;
                }
            }
        }
        made.insert(rel);
    }
    Ok(())
}
