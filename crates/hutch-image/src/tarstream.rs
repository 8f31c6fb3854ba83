//! Reading untrusted tar streams with bounds. The `tar` crate reads GNU long names/links and
//! PAX records into memory whole, however large the header says they are; here the archive is
//! read raw and those extension headers are handled by us, each refused before it is read when
//! it is larger than a fixed cap. The decompressed stream is counted as it is read (headers,
//! padding and data alike) and reading stops at a byte budget; entries are counted against an
//! entry budget. Sparse entries are refused (layers written by Docker, BuildKit, Buildah and
//! skopeo never hold them).

use crate::ImageError;
use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

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
    /// Bytes of data the entry carries.
    pub size: u64,
    /// `SCHILY.xattr.*` PAX records: (name, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
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
    /// Decompressed bytes that may be read.
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
    pub bytes: u64,
    pub entries: u64,
}

/// A reader that counts bytes and fails past its cap.
struct Counted<R> {
    inner: R,
    n: Rc<Cell<u64>>,
    cap: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.n.get() > self.cap {
            return Err(std::io::Error::other("byte limit reached"));
        }
        // Read at most one byte past the cap, enough to know it was passed.
        let room = (self.cap - self.n.get()).saturating_add(1);
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let k = self.inner.read(&mut buf[..len])?;
        self.n.set(self.n.get() + k as u64);
        if self.n.get() > self.cap {
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

/// Calls `f` for each entry of the tar stream `r`, within `budget`. Errors from `f` stop the
/// walk and are returned as they are.
pub(crate) fn for_each_entry<R: Read>(
    r: R,
    budget: Budget,
    mut f: impl FnMut(&Meta, &mut dyn Read) -> Result<(), ImageError>,
) -> Result<Used, ImageError> {
    let count = Rc::new(Cell::new(0u64));
    let mut ar = tar::Archive::new(Counted {
        inner: r,
        n: count.clone(),
        cap: budget.bytes,
    });
    let over = || {
        ImageError::Limit(format!(
            "the {} decompresses to more than {} bytes",
            budget.what, budget.bytes
        ))
    };
    let tar_err = |e: std::io::Error, count: &Rc<Cell<u64>>| {
        if count.get() > budget.bytes {
            over()
        } else {
            bad(format!("reading tar stream: {e}"))
        }
    };
    let mut used = Used::default();
    let entries = ar.entries().map_err(|e| tar_err(e, &count))?.raw(true);
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| tar_err(e, &count))?;
        let h = entry.header().clone();
        let kind = h.entry_type();
        let size = entry.size();
        let res = (|| -> Result<Option<Meta>, ImageError> {
            if kind.is_gnu_longname() || kind.is_gnu_longlink() {
                let slot = if kind.is_gnu_longname() {
                    &mut long_name
                } else {
                    &mut long_link
                };
                if slot.is_some() {
                    return Err(bad("two GNU long name headers for one entry"));
                }
                *slot = Some(trim_nul(read_ext(
                    &mut entry,
                    size,
                    MAX_LONG_NAME,
                    "GNU long name",
                )?));
                return Ok(None);
            }
            if kind.is_pax_local_extensions() {
                if pax.is_some() {
                    return Err(bad("two PAX headers for one entry"));
                }
                pax = Some(read_ext(&mut entry, size, MAX_PAX, "PAX")?);
                return Ok(None);
            }
            if kind.is_pax_global_extensions() {
                read_ext(&mut entry, size, MAX_PAX, "PAX global")?;
                return Ok(None);
            }
            if kind.is_gnu_sparse() {
                return Err(ImageError::Unsupported(format!(
                    "sparse file {} in a tar stream (write the layer without --sparse)",
                    String::from_utf8_lossy(&h.path_bytes())
                )));
            }
            let mut m = Meta {
                path: long_name
                    .take()
                    .unwrap_or_else(|| h.path_bytes().into_owned()),
                link: long_link
                    .take()
                    .or_else(|| h.link_name_bytes().map(|l| l.into_owned())),
                kind,
                // Empty numeric fields (some writers leave them blank) read as defaults.
                mode: h.mode().unwrap_or(0o644) & 0o7777,
                uid: h.uid().unwrap_or(0),
                gid: h.gid().unwrap_or(0),
                size,
                xattrs: Vec::new(),
            };
            if let Some(p) = pax.take() {
                for rec in tar::PaxExtensions::new(&p) {
                    let rec = rec.map_err(|e| bad(format!("bad PAX record: {e}")))?;
                    let (k, v) = (rec.key_bytes(), rec.value_bytes());
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
                        _ if k.starts_with(b"GNU.sparse.") => {
                            return Err(ImageError::Unsupported(format!(
                                "sparse file {} in a tar stream (write the layer without --sparse)",
                                m.path_lossy()
                            )))
                        }
                        _ => {
                            if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                                m.xattrs.push((name.to_vec(), v.to_vec()));
                            }
                        }
                    }
                }
            }
            Ok(Some(m))
        })();
        let meta = match res {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) if count.get() > budget.bytes => {
                drop(e);
                return Err(over());
            }
            Err(e) => return Err(e),
        };
        used.entries += 1;
        if used.entries > budget.entries {
            return Err(ImageError::Limit(format!(
                "the {} has more than {} entries",
                budget.entries_what, budget.entries
            )));
        }
        if size > budget.bytes {
            return Err(over());
        }
        match f(&meta, &mut entry) {
            Err(_) if count.get() > budget.bytes => return Err(over()),
            r => r?,
        }
    }
    if long_name.is_some() || long_link.is_some() || pax.is_some() {
        return Err(bad("extension header without an entry after it"));
    }
    used.bytes = count.get();
    Ok(used)
}
