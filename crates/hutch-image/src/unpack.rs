//! Applying OCI layer tarballs to a directory, exactly per the OCI image spec's changeset rules:
//! whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`) hide only what lower layers
//! made, hardlinks, symlinks, ownership, modes (setuid included) and xattrs are kept, device nodes
//! are skipped.
//!
//! Nothing is ever written outside the root: every file is made through a [`hutch_fs::Root`] in
//! [`Mode::InRoot`], so the kernel resolves symlinks met on the way as if the root were `/` (as
//! they will be inside the VM), the last component is never followed, and an entry is replaced
//! (unlinked, then created with `O_EXCL`), never written through. `..` in entry names and hard
//! link targets is refused outright. GNU sparse files become files with holes (data written at
//! its offsets on the descriptor just created, see `sparse`). The stream is bounded by
//! [`Limits`]: entries, and decompressed bytes per layer and per image (sparse files counting at
//! their full size); tar extension headers and sparse maps have fixed caps (see `tarstream`).

use crate::tarstream::{for_each_entry, BadName, Budget, Meta};
use crate::ImageError;
use hutch_fs::{Dir, FsError, Kind, Mode, Root};
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Bounds against layer and archive bombs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries in one image (all layers together), or in one archive.
    pub max_entries: u64,
    /// Decompressed bytes of one image (all layers' tar streams together); also the most an
    /// archive may decompress to and the largest blob a pull fetches.
    pub max_bytes: u64,
    /// Decompressed bytes of one layer's tar stream (the smaller of this and `max_bytes` holds).
    pub max_layer_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1_000_000,
            max_bytes: 32 << 30,
            max_layer_bytes: 16 << 30,
        }
    }
}

/// What applying layers did, summed over layers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub entries: u64,
    /// Decompressed tar bytes read, plus the holes of sparse files (their full size counts).
    pub bytes: u64,
    pub skipped_devices: u64,
}

fn bad(msg: impl Into<String>) -> ImageError {
    ImageError::BadLayer(msg.into())
}

/// A hutch-fs error met while applying a layer.
pub(crate) fn fs_err(e: FsError) -> ImageError {
    match e {
        FsError::NoOpenat2 => ImageError::Unsupported(e.to_string()),
        FsError::Io { path, source } => ImageError::Io {
            context: path,
            source,
        },
        other => bad(other.to_string()),
    }
}

/// Splits a tar entry path into normal components; refuses `..` and NUL.
fn clean(path: &[u8]) -> Result<PathBuf, ImageError> {
    crate::tarstream::entry_path(path).map_err(|e| match e {
        BadName::Nul => bad("NUL in an entry name"),
        BadName::Escapes => bad(format!(
            "entry {} escapes the root",
            String::from_utf8_lossy(path)
        )),
    })
}

/// Opens a layer blob, undoing its compression (detected from the first bytes).
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let io = |e| ImageError::Io {
        context: path.display().to_string(),
        source: e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(io)?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    let f = std::io::BufReader::with_capacity(256 * 1024, f);
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(f)))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        let d = zstd::stream::read::Decoder::with_buffer(f).map_err(io)?;
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
    let r = Root::open(root, Mode::InRoot).map_err(fs_err)?;
    apply_layer_in(&r, layer, limits, stats)
}

/// [`apply_layer`] on an open root (which should be in [`Mode::InRoot`]).
pub fn apply_layer_in(
    root: &Root,
    layer: impl Read,
    limits: Limits,
    stats: &mut Stats,
) -> Result<(), ImageError> {
    let left = limits.max_bytes.saturating_sub(stats.bytes);
    let budget = Budget {
        bytes: left.min(limits.max_layer_bytes),
        entries: limits.max_entries.saturating_sub(stats.entries),
        what: if limits.max_layer_bytes < left {
            "layer"
        } else {
            "image"
        },
        entries_what: "image",
    };
    let mut made: HashSet<PathBuf> = HashSet::new();
    let mut skipped = 0;
    let used = for_each_entry(layer, budget, |m, data| {
        if apply_entry(root, m, data, &mut made)? {
            skipped += 1;
        }
        Ok(())
    });
    let used = used?;
    stats.entries += used.entries;
    stats.bytes += used.bytes;
    stats.skipped_devices += skipped;
    Ok(())
}

/// Applies one entry; true if it was a device node (skipped).
fn apply_entry(
    root: &Root,
    m: &Meta,
    data: &mut dyn Read,
    made: &mut HashSet<PathBuf>,
) -> Result<bool, ImageError> {
    let rel = clean(&m.path)?;
    let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
        return Ok(false); // the root itself
    };
    let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    let name_b = name.as_bytes();

    if name_b == b".wh..wh..opq" {
        let dir = root.create_dir_all(&parent_rel, 0o755).map_err(fs_err)?;
        for child in dir.entries().map_err(fs_err)? {
            if !made.contains(&parent_rel.join(&child)) {
                dir.remove_all(&child).map_err(fs_err)?;
            }
        }
        return Ok(false);
    }
    if let Some(hidden) = name_b.strip_prefix(b".wh.") {
        let hidden = OsStr::from_bytes(hidden);
        if !hutch_fs::is_plain(hidden) {
            return Err(bad(format!("bad whiteout {}", m.path_lossy())));
        }
        let dir = root.create_dir_all(&parent_rel, 0o755).map_err(fs_err)?;
        dir.remove_all(hidden).map_err(fs_err)?;
        return Ok(false);
    }

    let dir = root.create_dir_all(&parent_rel, 0o755).map_err(fs_err)?;
    let existing = dir.try_stat(&name).map_err(fs_err)?;
    let uid = u32::try_from(m.uid).map_err(|_| bad(format!("uid {} out of range", m.uid)))?;
    let gid = u32::try_from(m.gid).map_err(|_| bad(format!("gid {} out of range", m.gid)))?;
    let clear = |dir: &Dir<'_>| -> Result<(), ImageError> {
        if existing.is_some() {
            dir.remove_all(&name).map_err(fs_err)?;
        }
        Ok(())
    };
    match m.kind {
        tar::EntryType::Directory => {
            if !existing.is_some_and(|s| s.kind == Kind::Dir) {
                clear(&dir)?;
                dir.mkdir(&name, 0o755).map_err(fs_err)?;
            }
        }
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            if existing.is_some_and(|s| s.kind == Kind::Dir) {
                clear(&dir)?;
            }
            let mut f = dir.replace_file(&name, 0o600).map_err(fs_err)?;
            // Sparse files: segments written at their offsets, the rest left as holes.
            crate::sparse::write_data(
                &mut f,
                data,
                m.size,
                m.sparse.as_ref(),
                &m.path_lossy(),
                bad,
            )?;
            // chown clears setuid/setgid, so the mode is set after it.
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io(&rel))?;
            f.set_permissions(std::fs::Permissions::from_mode(m.mode))
                .map_err(io(&rel))?;
            // On the descriptor just written: whatever the mode, nothing is reopened.
            for (k, v) in &m.xattrs {
                hutch_fs::set_xattr_fd(&f, k, v).map_err(io(&rel))?;
            }
            made.insert(rel);
            return Ok(false);
        }
        tar::EntryType::Symlink => {
            let link = m
                .link
                .as_deref()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| bad(format!("symlink {} without target", m.path_lossy())))?;
            if link.contains(&0) {
                return Err(bad("NUL in a symlink target"));
            }
            clear(&dir)?;
            dir.symlink(Path::new(OsStr::from_bytes(link)), &name)
                .map_err(fs_err)?;
        }
        tar::EntryType::Link => {
            let link = m
                .link
                .as_deref()
                .ok_or_else(|| bad(format!("hardlink {} without target", m.path_lossy())))?;
            hard_link(root, &dir, &name, existing.map(|s| s.ino), link, m)?;
            made.insert(rel);
            return Ok(false); // a hardlink shares the inode's owner and mode
        }
        tar::EntryType::Fifo => {
            clear(&dir)?;
            dir.mkfifo(&name, m.mode).map_err(fs_err)?;
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            // The guest's devtmpfs provides device nodes; images do not get to make them.
            return Ok(true);
        }
        _ => return Ok(false),
    }
    dir.lchown(&name, uid, gid).map_err(fs_err)?;
    if m.kind != tar::EntryType::Symlink {
        dir.chmod(&name, m.mode).map_err(fs_err)?;
        set_xattrs(&dir, &name, m)?;
    }
    made.insert(rel);
    Ok(false)
}

fn hard_link(
    root: &Root,
    dir: &Dir<'_>,
    name: &OsString,
    existing_ino: Option<u64>,
    link: &[u8],
    m: &Meta,
) -> Result<(), ImageError> {
    let link_rel = clean(link)?;
    let missing = || {
        bad(format!(
            "hardlink {} to missing {}",
            m.path_lossy(),
            String::from_utf8_lossy(link)
        ))
    };
    let (sdir, sname) = root.parent(&link_rel).map_err(|e| match e {
        FsError::NotFound(_) => missing(),
        FsError::BadPath { .. } => bad(format!("hardlink {} to the root", m.path_lossy())),
        e => fs_err(e),
    })?;
    let st = sdir.try_stat(&sname).map_err(fs_err)?.ok_or_else(missing)?;
    if st.kind == Kind::Dir {
        return Err(bad(format!("hardlink {} to a directory", m.path_lossy())));
    }
    if existing_ino == Some(st.ino) {
        return Ok(());
    }
    if existing_ino.is_some() {
        dir.remove_all(name).map_err(fs_err)?;
    }
    dir.hard_link(&sdir, &sname, name).map_err(fs_err)
}

fn set_xattrs(dir: &Dir<'_>, name: &OsStr, m: &Meta) -> Result<(), ImageError> {
    for (k, v) in &m.xattrs {
        dir.set_xattr(name, k, v).map_err(fs_err)?;
    }
    Ok(())
}

fn io(rel: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |e| ImageError::Io {
        context: rel.display().to_string(),
        source: e,
    }
}
