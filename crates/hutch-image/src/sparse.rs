//! GNU sparse files in tar streams, made into files with holes.
//!
//! GNU tar's `--sparse` stores only a file's data segments and a map of where they go. Three
//! encodings are read:
//! - old GNU (`--format=gnu`): type `S`, up to 4 map slots in the header and, while
//!   `isextended` is set, extension blocks of 21 slots each between the header and the data;
//!   the real size is the header's `realsize` field.
//! - PAX 1.0 (`--format=posix`, GNU tar's default `--sparse-version`): records
//!   `GNU.sparse.major=1`, `GNU.sparse.minor=0`, `GNU.sparse.name`, `GNU.sparse.realsize`; the
//!   map is decimal lines at the start of the entry's data (the count, then offset and length
//!   for each segment), padded to a block.
//! - PAX 0.1: records `GNU.sparse.size`, `GNU.sparse.numblocks`, `GNU.sparse.name` and the map
//!   as `GNU.sparse.map=OFF,LEN,OFF,LEN...`.
//!
//! Anything else (PAX 0.0's repeated `GNU.sparse.offset`/`numbytes`, other versions) is refused
//! as unsupported. These are hostile inputs: the number of segments is capped
//! ([`MAX_SEGMENTS`]) before a segment is stored, the 1.0 map text is capped ([`MAX_MAP_TEXT`],
//! lines of at most 20 digits) before it is read, and segments must be sorted, must not overlap
//! and must lie within the real size (checked arithmetic throughout). The caller counts the
//! holes against its byte budget, so a file's apparent size is paid for even where no data is
//! stored. Data segments are written at their offsets on the descriptor the caller created
//! (`pwrite`, never through a path) and the file's length is then set to the real size.

use crate::ImageError;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

/// Segments in one sparse file's map, at most.
pub const MAX_SEGMENTS: usize = 65536;
/// A number in a PAX 1.0 map line: at most this many digits (`u64::MAX` has 20).
const MAX_DIGITS: usize = 20;
/// A PAX 1.0 map's text, at most: the count line and two lines per segment, each of at most
/// 20 digits and a newline, rounded up to a block.
pub const MAX_MAP_TEXT: u64 =
    ((1 + 2 * MAX_SEGMENTS as u64) * (MAX_DIGITS as u64 + 1)).next_multiple_of(512);

/// One data segment: `len` bytes of data that belong at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub offset: u64,
    pub len: u64,
}

/// Where a sparse file's data goes, and how long the file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseMap {
    pub real_size: u64,
    pub segments: Vec<Segment>,
}

fn bad(m: impl Into<String>) -> ImageError {
    ImageError::BadLayer(m.into())
}

fn too_many(path: &str) -> ImageError {
    ImageError::Limit(format!(
        "sparse file {path} has more than {MAX_SEGMENTS} segments"
    ))
}

impl SparseMap {
    /// Checks the map against the entry it came with: segments sorted, not overlapping,
    /// within the real size; their lengths must add up to `data`, the bytes the entry
    /// carries. Returns the bytes of holes (the real size less the data).
    pub fn check(&self, data: u64, path: &str) -> Result<u64, ImageError> {
        if self.segments.len() > MAX_SEGMENTS {
            return Err(too_many(path));
        }
        let mut end = 0u64;
        let mut total = 0u64;
        for s in &self.segments {
            if s.offset < end {
                return Err(bad(format!(
                    "sparse file {path}: segment at {} overlaps or comes before the one ending at {end}",
                    s.offset
                )));
            }
            end = s.offset.checked_add(s.len).ok_or_else(|| {
                bad(format!(
                    "sparse file {path}: segment {}+{} overflows",
                    s.offset, s.len
                ))
            })?;
            if end > self.real_size {
                return Err(bad(format!(
                    "sparse file {path}: segment {}+{} ends past its size {}",
                    s.offset, s.len, self.real_size
                )));
            }
            // Cannot overflow: the segments are disjoint and within the real size.
            total += s.len;
        }
        if total != data {
            return Err(bad(format!(
                "sparse file {path}: its map describes {total} bytes of data, the entry holds {data}"
            )));
        }
        Ok(self.real_size - total)
    }
}

/// Parses one decimal number of a sparse map.
fn number(v: &[u8], path: &str) -> Result<u64, ImageError> {
    if v.is_empty() || v.len() > MAX_DIGITS || !v.iter().all(u8::is_ascii_digit) {
        return Err(bad(format!(
            "sparse file {path}: bad number {:?} in its map",
            String::from_utf8_lossy(&v[..v.len().min(40)])
        )));
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            bad(format!(
                "sparse file {path}: number out of range in its map"
            ))
        })
}

/// Old GNU map slots (the header's 4, or an extension block's 21), appended to `out`. A slot
/// whose length field is empty ends the list, as with GNU tar.
pub(crate) fn old_gnu_slots(
    slots: &[tar::GnuSparseHeader],
    out: &mut Vec<Segment>,
    path: &str,
) -> Result<(), ImageError> {
    for s in slots {
        if s.numbytes[0] == 0 {
            break;
        }
        if out.len() >= MAX_SEGMENTS {
            return Err(too_many(path));
        }
        let field = |r: std::io::Result<u64>| {
            r.map_err(|e| bad(format!("sparse file {path}: bad map slot: {e}")))
        };
        out.push(Segment {
            offset: field(s.offset())?,
            len: field(s.length())?,
        });
    }
    Ok(())
}

/// The `GNU.sparse.*` PAX records of one entry.
#[derive(Debug, Default)]
pub(crate) struct PaxSparse {
    pub major: Option<u64>,
    pub minor: Option<u64>,
    pub name: Option<Vec<u8>>,
    /// `GNU.sparse.realsize` (1.0).
    pub realsize: Option<u64>,
    /// `GNU.sparse.size` (0.0 and 0.1: the real size).
    pub size: Option<u64>,
    pub numblocks: Option<u64>,
    pub map: Option<Vec<u8>>,
    /// `GNU.sparse.offset` / `GNU.sparse.numbytes` (0.0) or an unknown `GNU.sparse.*` key.
    pub other: Option<String>,
    pub seen: bool,
}

/// How a PAX sparse entry's map is to be had.
pub(crate) enum PaxKind {
    /// 1.0: the map is at the start of the data; the real size is known.
    V1 { real_size: u64 },
    /// 0.1: the map came in the records.
    V01(SparseMap),
}

impl PaxSparse {
    /// Takes one PAX record; false if it is not a `GNU.sparse.*` one.
    pub fn record(&mut self, k: &[u8], v: &[u8], path: &str) -> Result<bool, ImageError> {
        let Some(key) = k.strip_prefix(b"GNU.sparse.") else {
            return Ok(false);
        };
        self.seen = true;
        let n = || number(v, path);
        match key {
            b"major" => self.major = Some(n()?),
            b"minor" => self.minor = Some(n()?),
            b"name" => self.name = Some(v.to_vec()),
            b"realsize" => self.realsize = Some(n()?),
            b"size" => self.size = Some(n()?),
            b"numblocks" => self.numblocks = Some(n()?),
            b"map" => self.map = Some(v.to_vec()),
            other => {
                self.other = Some(format!("GNU.sparse.{}", String::from_utf8_lossy(other)));
            }
        }
        Ok(true)
    }

    /// Which format the records describe; refuses all but 1.0 and 0.1.
    pub fn kind(&self, path: &str) -> Result<PaxKind, ImageError> {
        let unsupported = |what: String| {
            ImageError::Unsupported(format!(
                "sparse file {path} in GNU sparse format {what} (GNU tar writes 1.0 by default)"
            ))
        };
        if self.major.is_some() || self.minor.is_some() {
            return match (self.major, self.minor) {
                (Some(1), Some(0)) if self.map.is_none() && self.other.is_none() => {
                    let real_size = self.realsize.ok_or_else(|| {
                        bad(format!("sparse file {path}: no GNU.sparse.realsize record"))
                    })?;
                    Ok(PaxKind::V1 { real_size })
                }
                (Some(1), Some(0)) => Err(bad(format!(
                    "sparse file {path}: format 1.0 with 0.x records"
                ))),
                (a, b) => Err(unsupported(format!(
                    "{}.{}",
                    a.map_or("?".into(), |a| a.to_string()),
                    b.map_or("?".into(), |b| b.to_string())
                ))),
            };
        }
        if let Some(other) = &self.other {
            return Err(unsupported(format!("0.0 ({other})")));
        }
        let Some(map) = &self.map else {
            return Err(unsupported("0.0 (no map)".into()));
        };
        let real_size = self
            .size
            .or(self.realsize)
            .ok_or_else(|| bad(format!("sparse file {path}: no GNU.sparse.size record")))?;
        // The record is already bounded by the PAX header cap; count before storing.
        // An empty map is no segment at all.
        let fields = if map.is_empty() {
            0
        } else {
            map.split(|&b| b == b',').count()
        };
        if fields % 2 != 0 {
            return Err(bad(format!(
                "sparse file {path}: GNU.sparse.map is not offset,length pairs"
            )));
        }
        if fields / 2 > MAX_SEGMENTS {
            return Err(too_many(path));
        }
        let mut segments = Vec::with_capacity(fields / 2);
        let mut it = map.split(|&b| b == b',').take(fields);
        while let (Some(o), Some(l)) = (it.next(), it.next()) {
            segments.push(Segment {
                offset: number(o, path)?,
                len: number(l, path)?,
            });
        }
        if self.numblocks.is_some_and(|n| n != segments.len() as u64) {
            return Err(bad(format!(
                "sparse file {path}: GNU.sparse.numblocks does not match its map"
            )));
        }
        Ok(PaxKind::V01(SparseMap {
            real_size,
            segments,
        }))
    }
}

/// Reads a PAX 1.0 map from the start of an entry's data (`size` bytes). Returns the map's
/// segments and the bytes it took (whole blocks).
pub(crate) fn read_v1_map(
    data: &mut dyn Read,
    size: u64,
    path: &str,
) -> Result<(Vec<Segment>, u64), ImageError> {
    let mut lines = Lines {
        buf: Vec::with_capacity(1024),
        pos: 0,
        taken: 0,
        size,
    };
    let n = lines.next(data, path)?;
    if n > MAX_SEGMENTS as u64 {
        return Err(too_many(path));
    }
    let mut segments = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let offset = lines.next(data, path)?;
        let len = lines.next(data, path)?;
        segments.push(Segment { offset, len });
    }
    // The rest of the last block is padding.
    Ok((segments, lines.taken))
}

/// Decimal lines read a block at a time from an entry's data.
struct Lines {
    buf: Vec<u8>,
    pos: usize,
    /// Bytes taken from the data so far (whole blocks).
    taken: u64,
    /// The entry's data size: the map may not run past it.
    size: u64,
}

impl Lines {
    fn next(&mut self, data: &mut dyn Read, path: &str) -> Result<u64, ImageError> {
        loop {
            let rest = &self.buf[self.pos..];
            if let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                let v = number(&rest[..nl], path)?;
                self.pos += nl + 1;
                return Ok(v);
            }
            if !rest.iter().all(u8::is_ascii_digit) {
                return Err(bad(format!(
                    "sparse file {path}: bad number {:?} in its map",
                    String::from_utf8_lossy(&rest[..rest.len().min(40)])
                )));
            }
            if rest.len() > MAX_DIGITS {
                return Err(bad(format!(
                    "sparse file {path}: a line of its map is longer than {MAX_DIGITS} digits"
                )));
            }
            if self.taken + 512 > MAX_MAP_TEXT {
                return Err(ImageError::Limit(format!(
                    "sparse file {path}: its map is larger than {MAX_MAP_TEXT} bytes"
                )));
            }
            if self.taken + 512 > self.size {
                return Err(bad(format!(
                    "sparse file {path}: its map runs past the entry's data"
                )));
            }
            self.buf.drain(..self.pos);
            self.pos = 0;
            let at = self.buf.len();
            self.buf.resize(at + 512, 0);
            data.read_exact(&mut self.buf[at..])
                .map_err(|e| bad(format!("sparse file {path}: reading its map: {e}")))?;
            self.taken += 512;
        }
    }
}

/// Writes an entry's data into `f`: `size` bytes from the start when `map` is `None`, else
/// each segment at its offset, then the length set to the real size (the rest are holes).
/// `bad` makes the error for data the stream does not hold; failures to write are I/O errors.
pub(crate) fn write_data(
    f: &mut File,
    data: &mut dyn Read,
    size: u64,
    map: Option<&SparseMap>,
    what: &str,
    bad: impl Fn(String) -> ImageError,
) -> Result<(), ImageError> {
    let wio = |e: std::io::Error| ImageError::Io {
        context: format!("writing {what}"),
        source: e,
    };
    let Some(map) = map else {
        let n = std::io::copy(&mut data.take(size), f).map_err(|e| {
            if e.kind() == std::io::ErrorKind::StorageFull {
                wio(e)
            } else {
                bad(format!("truncated or unreadable data at {what}: {e}"))
            }
        })?;
        if n != size {
            return Err(bad(format!(
                "{what}: expected {size} bytes, the stream had {n}"
            )));
        }
        return Ok(());
    };
    let mut buf = vec![0u8; 64 << 10];
    for s in &map.segments {
        let mut done = 0u64;
        while done < s.len {
            let want = (s.len - done).min(buf.len() as u64) as usize;
            let k = data
                .read(&mut buf[..want])
                .map_err(|e| bad(format!("truncated or unreadable data at {what}: {e}")))?;
            if k == 0 {
                return Err(bad(format!(
                    "{what}: the stream ends inside the segment at {}",
                    s.offset
                )));
            }
            // Cannot overflow: the map was checked, offset + len fits.
            f.write_all_at(&buf[..k], s.offset + done).map_err(wio)?;
            done += k as u64;
        }
    }
    f.set_len(map.real_size).map_err(wio)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(real_size: u64, segs: &[(u64, u64)]) -> SparseMap {
        SparseMap {
            real_size,
            segments: segs
                .iter()
                .map(|&(offset, len)| Segment { offset, len })
                .collect(),
        }
    }

    #[test]
    fn maps_are_checked() {
        assert_eq!(
            map(100, &[(0, 10), (50, 10), (100, 0)])
                .check(20, "f")
                .unwrap(),
            80
        );
        assert_eq!(map(1 << 50, &[]).check(0, "f").unwrap(), 1 << 50);
        for (m, data) in [
            (map(100, &[(50, 10), (0, 10)]), 20), // unsorted
            (map(100, &[(0, 10), (5, 10)]), 20),  // overlapping
            (map(100, &[(95, 10)]), 10),          // past the end
            (map(u64::MAX, &[(u64::MAX, 1)]), 1), // overflow
            (map(100, &[(0, 10)]), 11),           // data disagrees
            (map(u64::MAX, &[(0, u64::MAX), (u64::MAX, 1)]), 0),
        ] {
            assert!(
                matches!(m.check(data, "f"), Err(ImageError::BadLayer(_))),
                "{m:?}"
            );
        }
    }

    #[test]
    fn v1_maps_are_bounded() {
        let mut text = b"2\n0\n10\n100\n5\n".to_vec();
        text.resize(512, 0);
        let (segs, took) = read_v1_map(&mut text.as_slice(), 1024, "f").unwrap();
        assert_eq!(took, 512);
        assert_eq!(
            segs,
            vec![
                Segment { offset: 0, len: 10 },
                Segment {
                    offset: 100,
                    len: 5
                }
            ]
        );
        // Too many segments: refused on the count, before reading them.
        let mut text = format!("{}\n", MAX_SEGMENTS + 1).into_bytes();
        text.resize(512, 0);
        let e = read_v1_map(&mut text.as_slice(), 1 << 40, "f").unwrap_err();
        assert!(matches!(e, ImageError::Limit(_)), "{e}");
        // An endless line.
        let e = read_v1_map(&mut std::io::repeat(b'1'), 1 << 40, "f").unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        // Empty lines and NULs are not numbers.
        let e = read_v1_map(&mut b"1\n\n".chain(std::io::repeat(0)), 1 << 40, "f").unwrap_err();
        assert!(e.to_string().contains("bad number"), "{e}");
        // A map that runs past the entry's data.
        let mut text = b"9999\n".to_vec();
        text.resize(512, b'\n');
        text[5..].copy_from_slice(&b"1\n".repeat(256)[..507]);
        let e =
            read_v1_map(&mut text.as_slice().chain(std::io::repeat(b'1')), 512, "f").unwrap_err();
        assert!(e.to_string().contains("runs past"), "{e}");
        // The largest map there may be fits the text cap.
        let mut text = format!("{MAX_SEGMENTS}\n").into_bytes();
        for i in 0..MAX_SEGMENTS as u64 {
            text.extend_from_slice(format!("{}\n{}\n", u64::MAX - 1 - 2 * i, 1).as_bytes());
        }
        text.resize(text.len().next_multiple_of(512), 0);
        assert!(text.len() as u64 <= MAX_MAP_TEXT);
        let (segs, took) = read_v1_map(&mut text.as_slice(), 1 << 40, "f").unwrap();
        assert_eq!((segs.len(), took), (MAX_SEGMENTS, text.len() as u64));
    }

    #[test]
    fn pax_01_maps() {
        let mut p = PaxSparse::default();
        p.record(b"GNU.sparse.size", b"100", "f").unwrap();
        p.record(b"GNU.sparse.numblocks", b"2", "f").unwrap();
        p.record(b"GNU.sparse.map", b"0,10,90,10", "f").unwrap();
        let PaxKind::V01(m) = p.kind("f").unwrap() else {
            panic!("not 0.1")
        };
        assert_eq!(m, map(100, &[(0, 10), (90, 10)]));
        p.record(b"GNU.sparse.map", b"0,10,90", "f").unwrap();
        assert!(p.kind("f").is_err());
        let mut p = PaxSparse::default();
        p.record(b"GNU.sparse.offset", b"0", "f").unwrap();
        assert!(matches!(p.kind("f"), Err(ImageError::Unsupported(_))));
        let mut p = PaxSparse::default();
        p.record(b"GNU.sparse.major", b"2", "f").unwrap();
        p.record(b"GNU.sparse.minor", b"0", "f").unwrap();
        assert!(matches!(p.kind("f"), Err(ImageError::Unsupported(ref m)) if m.contains("2.0")));
    }
}
