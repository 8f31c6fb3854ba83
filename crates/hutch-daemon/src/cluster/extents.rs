//! Sparse files between nodes. A snapshot's memory file is mostly holes (RAM the guest never
//! touched) and so are its disk layers: such a file goes as its data only, in records
//! `OFFSET LEN DATA` (offset and length big-endian u64s), offsets increasing. The sender finds
//! the data with `SEEK_DATA`/`SEEK_HOLE` and leaves out chunks of zeros too; the receiver writes
//! each record where it goes, leaves the rest a hole, and hashes the whole file (zeros in the
//! gaps), which must be what the sender announced. A receiver asks for it
//! (`Accept: application/x-hutch-extents`); a sender that does not know it sends the file whole.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The records' media type.
pub const CONTENT_TYPE: &str = "application/x-hutch-extents";

/// Largest record the sender makes (the receiver takes any length within the file).
const CHUNK: usize = 256 * 1024;

/// Length of a record's head.
const HEAD: usize = 16;

/// The records of `f`'s data; see the module doc.
pub fn extents_stream(
    f: std::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let r = send_extents(&f, |b| tx.blocking_send(Ok(b)).is_ok());
        if let Err(e) = r {
            let _ = tx.blocking_send(Err(e));
        }
    });
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `lseek(2)` for `SEEK_DATA`/`SEEK_HOLE`: None past the last data.
fn seek(f: &std::fs::File, at: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a file descriptor `f` owns; it only moves the file's offset, which
    // nothing here uses (reads are positioned).
    let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Calls `emit` with each record of `f`'s data; stops early when it returns false.
fn send_extents(f: &std::fs::File, mut emit: impl FnMut(Bytes) -> bool) -> std::io::Result<()> {
    let size = f.metadata()?.len();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let Some(start) = seek(f, pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(f, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|b| *b != 0) {
                let mut rec = Vec::with_capacity(HEAD + n);
                rec.extend_from_slice(&at.to_be_bytes());
                rec.extend_from_slice(&(n as u64).to_be_bytes());
                rec.extend_from_slice(&buf[..n]);
                if !emit(Bytes::from(rec)) {
                    return Ok(());
                }
            }
            at += n as u64;
        }
        pos = end.max(start + 1);
    }
    Ok(())
}

/// Hashes `n` zeros, letting other tasks run every few MiB (a hole of gigabytes is seconds of
/// hashing).
async fn hash_zeros(h: &mut Sha256, mut n: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut since = 0u64;
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
        since += k as u64;
        if since >= 4 << 20 {
            since = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// Writes the records of a `size`-byte file in `body` to `path` (holes where no record is);
/// the SHA-256 of the whole file. Records out of order, overlapping, empty, past `size` or cut
/// short are refused.
pub async fn receive_extents<B>(body: B, path: &Path, size: u64) -> Result<String, String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use futures_util::StreamExt;
    let err = |e: String| format!("{}: {e}", path.display());
    let f = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
    let mut h = Sha256::new();
    // The file's bytes hashed so far: data and the zeros before it.
    let mut hashed = 0u64;
    let mut head = Vec::with_capacity(HEAD);
    // The record being received: where its next byte goes, and how many are left.
    let mut rec: Option<(u64, u64)> = None;
    let mut body = http_body_util::BodyStream::new(body);
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|e| err(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let mut d = &data[..];
        while !d.is_empty() {
            match rec {
                None => {
                    let k = (HEAD - head.len()).min(d.len());
                    head.extend_from_slice(&d[..k]);
                    d = &d[k..];
                    if head.len() < HEAD {
                        continue;
                    }
                    let at = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
                    let len = u64::from_be_bytes(head[8..].try_into().unwrap_or_default());
                    head.clear();
                    if len == 0 || at < hashed || at.checked_add(len).is_none_or(|e| e > size) {
                        return Err(err(format!(
                            "a record of {len} bytes at {at} (after {hashed} of {size})"
                        )));
                    }
                    hash_zeros(&mut h, at - hashed).await;
                    hashed = at;
                    rec = Some((at, len));
                }
                Some((at, left)) => {
                    let n = (left.min(d.len() as u64)) as usize;
                    let part = &d[..n];
                    if part.iter().any(|b| *b != 0) {
                        f.write_all_at(part, at).map_err(|e| err(e.to_string()))?;
                    }
                    h.update(part);
                    hashed += n as u64;
                    d = &d[n..];
                    rec = (left > n as u64).then_some((at + n as u64, left - n as u64));
                }
            }
        }
    }
    if rec.is_some() || !head.is_empty() {
        return Err(err("the records were cut short".into()));
    }
    hash_zeros(&mut h, size - hashed).await;
    f.set_len(size).map_err(|e| err(e.to_string()))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
#[path = "extents_tests.rs"]
mod tests;
