//! Exporting the VM's changes (the overlay upper dir) as an OCI layer tar.
//!
//! overlayfs marks a deleted lower entry with a 0/0 character device and a directory that hides
//! the lower one with the xattr `trusted.overlay.opaque=y`; the OCI changeset format says
//! `.wh.NAME` and `DIR/.wh..wh..opq`. Everything else (files, dirs, symlinks, hardlinks within
//! the upper dir, modes, owners, mtimes, xattrs) is written as it is.

use crate::serve::Shared;
use hutch_proto::{Kind, Response};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Sends what is written as Stdout frames.
struct FrameWriter<'a> {
    shared: &'a Shared,
    gen: u64,
    stream: u32,
    buf: Vec<u8>,
    total: u64,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            if self.gen != self.shared.gen() {
                return Err(io::Error::other("host disconnected"));
            }
            self.total += self.buf.len() as u64;
            let chunk = std::mem::take(&mut self.buf);
            if !self
                .shared
                .send_data(self.gen, self.stream, Kind::Stdout, &chunk)
            {
                return Err(io::Error::other("the host gave up on the export"));
            }
        }
        Ok(())
    }
}

/// Keeps a filesystem frozen while alive.
struct Frozen(i32);

impl Frozen {
    fn new(fd: i32) -> io::Result<Frozen> {
        // SAFETY: sync has no preconditions; FIFREEZE takes an fd of the filesystem and no pointer.
        unsafe {
            libc::sync();
            if libc::ioctl(fd, FIFREEZE, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Frozen(fd))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: FITHAW takes an fd of the frozen filesystem and no pointer.
        unsafe {
            libc::ioctl(self.0, FITHAW, 0);
        }
    }
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: c is a valid C string and names a writable buffer of the given size.
    let n = unsafe {
        libc::llistxattr(
            c.as_ptr(),
            names.as_mut_ptr() as *mut libc::c_char,
            names.len(),
        )
    };
    if n <= 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let Ok(cn) = CString::new(name) else { continue };
        let mut val = vec![0u8; 64 * 1024];
        // SAFETY: valid C strings and a writable buffer of the given size.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                val.as_mut_ptr() as *mut libc::c_void,
                val.len(),
            )
        };
        if m >= 0 {
            val.truncate(m as usize);
            out.push((name.to_vec(), val));
        }
    }
    out
}

fn header(md: &std::fs::Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(md.uid() as u64);
    h.set_gid(md.gid() as u64);
    h.set_mtime(md.mtime().max(0) as u64);
    h.set_size(size);
    h
}

/// Files the agent writes at every boot from the VM's network (net.rs): the VM's, not the
/// image's, so a commit leaves them out (as container engines do with theirs).
const RUNTIME_FILES: [&str; 2] = ["etc/hosts", "etc/resolv.conf"];

fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    upper: &Path,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(upper.join(rel))?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let r = rel.join(&name);
        if RUNTIME_FILES.iter().any(|f| r == Path::new(f)) {
            continue;
        }
        let host = upper.join(&r);
        let md = std::fs::symlink_metadata(&host)?;
        let ft = md.file_type();
        if ft.is_char_device() && md.rdev() == 0 {
            let mut wh = std::ffi::OsString::from(".wh.");
            wh.push(&name);
            let mut h = header(&md, tar::EntryType::Regular, 0);
            h.set_mode(0o644);
            b.append_data(&mut h, rel.join(wh), io::empty())?;
            continue;
        }
        let xs: Vec<_> = xattrs(&host)
            .into_iter()
            .filter(|(k, _)| !k.starts_with(b"trusted.overlay."))
            .collect();
        if !xs.is_empty() {
            let pax: Vec<(String, Vec<u8>)> = xs
                .iter()
                .map(|(k, v)| {
                    (
                        format!("SCHILY.xattr.{}", String::from_utf8_lossy(k)),
                        v.clone(),
                    )
                })
                .collect();
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        if ft.is_dir() {
            let mut h = header(&md, tar::EntryType::Directory, 0);
            b.append_data(&mut h, &r, io::empty())?;
            let opaque = xattrs(&host)
                .iter()
                .any(|(k, v)| k == b"trusted.overlay.opaque" && v == b"y");
            if opaque {
                let mut h = header(&md, tar::EntryType::Regular, 0);
                h.set_mode(0o644);
                b.append_data(&mut h, r.join(".wh..wh..opq"), io::empty())?;
            }
            walk(b, upper, &r, links)?;
        } else if ft.is_symlink() {
            let mut h = header(&md, tar::EntryType::Symlink, 0);
            b.append_link(&mut h, &r, std::fs::read_link(&host)?)?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    let mut h = header(&md, tar::EntryType::Link, 0);
                    b.append_link(&mut h, &r, first)?;
                    continue;
                }
                links.insert((md.dev(), md.ino()), r.clone());
            }
            let mut h = header(&md, tar::EntryType::Regular, md.len());
            b.append_data(&mut h, &r, std::fs::File::open(&host)?)?;
        } else if ft.is_fifo() {
            let mut h = header(&md, tar::EntryType::Fifo, 0);
            b.append_data(&mut h, &r, io::empty())?;
        }
        // Sockets and real device nodes are not part of an image.
    }
    Ok(())
}

pub fn export(shared: &Shared, gen: u64, stream: u32) {
    let Some(fd) = shared.data_fd else {
        return shared.error(
            gen,
            stream,
            hutch_proto::ErrorCode::Unsupported,
            "this VM has no writable layer".into(),
        );
    };
    let data = PathBuf::from(format!("/proc/self/fd/{fd}"));
    let result = (|| -> io::Result<u64> {
        let _frozen = Frozen::new(fd)?;
        let mut w = FrameWriter {
            shared,
            gen,
            stream,
            buf: Vec::new(),
            total: 0,
        };
        {
            let mut b = tar::Builder::new(&mut w);
            b.mode(tar::HeaderMode::Complete);
            walk(
                &mut b,
                &data.join("upper"),
                Path::new(""),
                &mut HashMap::new(),
            )?;
            b.finish()?;
        }
        w.flush()?;
        Ok(w.total)
    })();
    match result {
        Ok(bytes) => shared.respond(gen, stream, &Response::Done { bytes }),
        Err(e) => shared.error(
            gen,
            stream,
            hutch_proto::ErrorCode::ExportFailed,
            e.to_string(),
        ),
    }
}
