//! Reading untrusted tar streams with bounds. The `tar` crate reads GNU long names/links and
//! PAX records into memory whole, however large the header says they are; here the archive is
//! read raw and those extension headers are handled by us, each refused before it is read when
//! it is larger than a fixed cap. The decompressed stream is counted as it is read (headers,
//! padding and data alike) and reading stops at a byte budget; entries are counted against an
//! entry budget. The stream is walked by this module (the `tar` crate only parses headers), so
//! that what follows a header is always read here: GNU sparse entries (old GNU `S` with its
//! extension blocks, PAX 1.0 and 0.1) are read with bounds (see `sparse`) and handed on with
//! their map; consumers write them with `sparse::write_data`, holes staying holes.
//! A sparse file's holes count against the byte budget as if they had been read, so its
//! apparent size is paid for in full.

use crate::sparse::{self, PaxKind, PaxSparse, Segment, SparseMap};
use crate::ImageError;
use std::io::Read;

/// Why an entry name was refused by [`entry_path`].
pub(crate) enum BadName {
    Nul,
    Escapes,
}

/// The normal components of a tar entry name or link target (`.`, `/` and empty components
/// dropped); `..` and NUL are refused.
pub(crate) fn entry_path(p: &[u8]) -> Result<std::path::PathBuf, BadName> {
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Component, Path};
    if p.contains(&0) {
        return Err(BadName::Nul);
    }
    let mut out = std::path::PathBuf::new();
    for c in Path::new(std::ffi::OsStr::from_bytes(p)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(BadName::Escapes),
        }
    }
    Ok(out)
}

/// A GNU long name or long link name: at most this many bytes (PATH_MAX is 4096).
pub const MAX_LONG_NAME: u64 = 64 << 10;
/// One PAX extension header (all its records): at most this many bytes.
pub const MAX_PAX: u64 = 1 << 20;

/// One entry's metadata, extensions applied.
pub(crate) struct Meta {
    pub path: Vec<u8>,
    pub link: Option<Vec<u8>>,
    pub kind: tar::EntryType,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Bytes of data the entry carries (for a sparse file: its segments' data, after the map).
    pub size: u64,
    /// For a sparse file: where its data goes and its real size.
    pub sparse: Option<SparseMap>,
    /// `SCHILY.xattr.*` PAX records: (name, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// The file's apparent size: the real size of a sparse file, else its data size.
    pub fn real_size(&self) -> u64 {
        self.sparse.as_ref().map_or(self.size, |m| m.real_size)
    }

    pub fn path_lossy(&self) -> String {
        String::from_utf8_lossy(&self.path)
            .chars()
            .take(300)
            .collect()
    }
}

/// Budgets for one stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Decompressed bytes that may be read, holes of sparse files included.
    pub bytes: u64,
    /// Entries (not counting extension headers) that may be seen.
    pub entries: u64,
    /// What the byte budget is, for messages ("layer", "image", "archive").
    pub what: &'static str,
    pub entries_what: &'static str,
}

/// What reading a stream used up.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Used {
    /// Decompressed bytes read plus the holes of sparse files.
    pub bytes: u64,
    pub entries: u64,
}

/// A reader that counts bytes and fails past its cap.
struct Counted<R> {
    inner: R,
    n: u64,
    cap: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.n > self.cap {
            return Err(std::io::Error::other("byte limit reached"));
        }
        // Read at most one byte past the cap, enough to know it was passed.
        let room = (self.cap - self.n).saturating_add(1);
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let k = self.inner.read(&mut buf[..len])?;
        self.n += k as u64;
        if self.n > self.cap {
            return Err(std::io::Error::other("byte limit reached"));
        }
        Ok(k)
    }
}

fn bad(m: impl Into<String>) -> ImageError {
    ImageError::BadLayer(m.into())
}

fn read_ext(e: &mut impl Read, size: u64, cap: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    if size > cap {
        return Err(ImageError::Limit(format!(
            "{what} header of {size} bytes (at most {cap})"
        )));
    }
    let mut v = Vec::with_capacity(size as usize);
    e.take(size)
        .read_to_end(&mut v)
        .map_err(|err| bad(format!("reading {what} header: {err}")))?;
    if v.len() as u64 != size {
        return Err(bad(format!("truncated {what} header")));
    }
    Ok(v)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn num(v: &[u8], what: &str) -> Result<u64, ImageError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad PAX {what} record")))
}

/// Reads one 512-byte block; false at the end of the stream (nothing read).
fn read_block(r: &mut impl Read, b: &mut [u8; 512]) -> Result<bool, ImageError> {
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(bad("reading tar stream: truncated header block")),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(format!("reading tar stream: {e}"))),
        }
    }
    Ok(true)
}

/// Extension headers seen, waiting for the entry they describe.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// Calls `f` for each entry of the tar stream `r`, within `budget`. Errors from `f` stop the
/// walk and are returned as they are.
pub(crate) fn for_each_entry<R: Read>(
    r: R,
    budget: Budget,
    mut f: impl FnMut(&Meta, &mut dyn Read) -> Result<(), ImageError>,
) -> Result<Used, ImageError> {
    let mut s = Counted {
        inner: r,
        n: 0,
        cap: budget.bytes,
    };
    let mut used = Used::default();
    let mut pending = Pending::default();
    loop {
        match next_entry(&mut s, &mut pending, &mut used, budget, &mut f) {
            Ok(true) => {}
            Ok(false) => break,
            // Whatever failed, past the cap the cap is the reason.
            Err(e) if s.n > budget.bytes && !matches!(e, ImageError::Limit(_)) => {
                return Err(ImageError::Limit(format!(
                    "the {} decompresses to more than {} bytes",
                    budget.what, budget.bytes
                )))
            }
            Err(e) => return Err(e),
        }
    }
    if pending.long_name.is_some() || pending.long_link.is_some() || pending.pax.is_some() {
        return Err(bad("extension header without an entry after it"));
    }
    used.bytes = s.n;
    Ok(used)
}

/// Reads one header and what follows it; false at the end of the archive.
fn next_entry<R: Read>(
    s: &mut Counted<R>,
    pending: &mut Pending,
    used: &mut Used,
    budget: Budget,
    f: &mut impl FnMut(&Meta, &mut dyn Read) -> Result<(), ImageError>,
) -> Result<bool, ImageError> {
    let mut block = [0u8; 512];
    // The end: the end of the stream, or a zero block (as `tar` without --ignore-zeros).
    if !read_block(s, &mut block)? || block.iter().all(|&b| b == 0) {
        return Ok(false);
    }
    let h = tar::Header::from_byte_slice(&block).clone();
    let sum: u32 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + 8 * 32;
    if h.cksum().ok() != Some(sum) {
        return Err(bad("reading tar stream: archive header checksum mismatch"));
    }
    let kind = h.entry_type();
    let size = h
        .entry_size()
        .map_err(|e| bad(format!("reading tar stream: {e}")))?;
    let padding = (512 - size % 512) % 512;
    let name = || String::from_utf8_lossy(&h.path_bytes()).into_owned();

    // Old GNU sparse: the map's extension blocks come between the header and the data.
    let mut old_sparse = None;
    if kind.is_gnu_sparse() {
        let gnu = h
            .as_gnu()
            .ok_or_else(|| bad(format!("sparse entry {} without a GNU header", name())))?;
        let mut segments: Vec<Segment> = Vec::new();
        sparse::old_gnu_slots(&gnu.sparse, &mut segments, &name())?;
        let mut more = gnu.is_extended();
        let mut blocks = 0;
        while more {
            // Blocks of empty slots still cost reading: as many as the largest map needs.
            blocks += 1;
            if blocks > sparse::MAX_SEGMENTS.div_ceil(21) {
                return Err(ImageError::Limit(format!(
                    "sparse file {}: more map extension blocks than {} segments need",
                    name(),
                    sparse::MAX_SEGMENTS
                )));
            }
            let mut ext = tar::GnuExtSparseHeader::new();
            if !read_block(s, ext.as_mut_bytes())? {
                return Err(bad(format!("sparse entry {}: truncated map", name())));
            }
            sparse::old_gnu_slots(&ext.sparse, &mut segments, &name())?;
            more = ext.is_extended();
        }
        let real_size = gnu
            .real_size()
            .map_err(|e| bad(format!("sparse entry {}: bad real size: {e}", name())))?;
        old_sparse = Some(SparseMap {
            real_size,
            segments,
        });
    }

    let mut data = (&mut *s).take(size);
    let res = entry(&h, size, old_sparse, &mut data, pending, used, budget, f);
    // Whatever the consumer left of the data, and the padding, are skipped.
    let rest = data.limit();
    if res.is_ok() && rest > 0 {
        let k = std::io::copy(&mut data, &mut std::io::sink())
            .map_err(|e| bad(format!("reading tar stream: {e}")))?;
        if k != rest {
            return Err(bad("reading tar stream: truncated entry data"));
        }
    }
    res?;
    let k = std::io::copy(&mut (&mut *s).take(padding), &mut std::io::sink())
        .map_err(|e| bad(format!("reading tar stream: {e}")))?;
    if k != padding {
        return Err(bad("reading tar stream: truncated entry padding"));
    }
    Ok(true)
}

/// Handles one header: an extension is stored in `pending`, an entry is given to `f` with the
/// pending extensions applied.
#[allow(clippy::too_many_arguments)]
fn entry<R: Read>(
    h: &tar::Header,
    size: u64,
    old_sparse: Option<SparseMap>,
    data: &mut std::io::Take<&mut Counted<R>>,
    pending: &mut Pending,
    used: &mut Used,
    budget: Budget,
    f: &mut impl FnMut(&Meta, &mut dyn Read) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let kind = h.entry_type();
    if kind.is_gnu_longname() || kind.is_gnu_longlink() {
        let slot = if kind.is_gnu_longname() {
            &mut pending.long_name
        } else {
            &mut pending.long_link
        };
        if slot.is_some() {
            return Err(bad("two GNU long name headers for one entry"));
        }
        *slot = Some(trim_nul(read_ext(
            data,
            size,
            MAX_LONG_NAME,
            "GNU long name",
        )?));
        return Ok(());
    }
    if kind.is_pax_local_extensions() {
        if pending.pax.is_some() {
            return Err(bad("two PAX headers for one entry"));
        }
        pending.pax = Some(read_ext(data, size, MAX_PAX, "PAX")?);
        return Ok(());
    }
    if kind.is_pax_global_extensions() {
        read_ext(data, size, MAX_PAX, "PAX global")?;
        return Ok(());
    }
    let mut m = Meta {
        path: pending
            .long_name
            .take()
            .unwrap_or_else(|| h.path_bytes().into_owned()),
        link: pending
            .long_link
            .take()
            .or_else(|| h.link_name_bytes().map(|l| l.into_owned())),
        // An old GNU sparse file is a regular file once its map is read.
        kind: if kind.is_gnu_sparse() {
            tar::EntryType::Regular
        } else {
            kind
        },
        // Empty numeric fields (some writers leave them blank) read as defaults.
        mode: h.mode().unwrap_or(0o644) & 0o7777,
        uid: h.uid().unwrap_or(0),
        gid: h.gid().unwrap_or(0),
        size,
        sparse: old_sparse,
        xattrs: Vec::new(),
    };
    let mut pax_sparse = PaxSparse::default();
    if let Some(p) = pending.pax.take() {
        for rec in tar::PaxExtensions::new(&p) {
            let rec = rec.map_err(|e| bad(format!("bad PAX record: {e}")))?;
            let (k, v) = (rec.key_bytes(), rec.value_bytes());
            if pax_sparse.record(k, v, &m.path_lossy())? {
                continue;
            }
            match k {
                b"path" => m.path = v.to_vec(),
                b"linkpath" => m.link = Some(v.to_vec()),
                b"uid" => m.uid = num(v, "uid")?,
                b"gid" => m.gid = num(v, "gid")?,
                b"size" => {
                    if num(v, "size")? != size {
                        return Err(ImageError::Unsupported(format!(
                            "PAX size record overriding the header of {}",
                            m.path_lossy()
                        )));
                    }
                }
                _ => {
                    if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                        m.xattrs.push((name.to_vec(), v.to_vec()));
                    }
                }
            }
        }
    }
    if pax_sparse.seen {
        if let Some(name) = pax_sparse.name.take() {
            m.path = name;
        }
        let path = m.path_lossy();
        if m.sparse.is_some() {
            return Err(bad(format!(
                "sparse file {path}: both an old GNU map and GNU.sparse PAX records"
            )));
        }
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            return Err(bad(format!("GNU.sparse records on {path}, not a file")));
        }
        m.sparse = Some(match pax_sparse.kind(&path)? {
            PaxKind::V01(map) => map,
            PaxKind::V1 { real_size } => {
                let (segments, took) = sparse::read_v1_map(data, size, &path)?;
                m.size = size - took;
                SparseMap {
                    real_size,
                    segments,
                }
            }
        });
    }

    used.entries += 1;
    if used.entries > budget.entries {
        return Err(ImageError::Limit(format!(
            "the {} has more than {} entries",
            budget.entries_what, budget.entries
        )));
    }
    let over = |what: String| {
        ImageError::Limit(format!(
            "the {} decompresses to more than {} bytes{what}",
            budget.what, budget.bytes
        ))
    };
    if let Some(map) = &m.sparse {
        let path = m.path_lossy();
        let holes = map.check(m.size, &path)?;
        // The holes are paid for as if they had been read: the file's apparent size is what
        // the root filesystem may have to hold.
        let s = data.get_mut();
        s.n = s.n.saturating_add(holes);
        if s.n > budget.bytes {
            return Err(over(format!(
                " (sparse file {path} counts at its full size, {})",
                map.real_size
            )));
        }
    }
    if m.real_size() > budget.bytes {
        return Err(over(String::new()));
    }
    f(&m, data)
}
