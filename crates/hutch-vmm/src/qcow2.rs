//! Reads the backing file of a qcow2 image from its header, so hutchd can open it and hand QEMU
//! a descriptor (a confined QEMU cannot open host paths itself).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A qcow2 image's backing file and its format (`raw` when the header does not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    pub format: String,
}

const MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

fn bad(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string())
}

/// The backing file of the qcow2 image `f` (opened from `image`), if it has one. A relative
/// backing path is relative to the image's directory.
pub fn backing(f: &mut std::fs::File, image: &Path) -> std::io::Result<Option<Backing>> {
    let mut h = [0u8; 104];
    f.seek(SeekFrom::Start(0))?;
    let n = f.read(&mut h)?;
    if n < 72 || &h[..4] != MAGIC {
        return Err(bad("not a qcow2 image"));
    }
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let version = be32(&h, 4);
    let off = u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8]));
    let size = be32(&h, 16) as usize;
    if off == 0 || size == 0 {
        return Ok(None);
    }
    if size > 1023 {
        return Err(bad("qcow2 backing file name too long"));
    }
    let mut name = vec![0u8; size];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut name)?;
    let name = String::from_utf8(name).map_err(|_| bad("backing file name is not UTF-8"))?;
    let header_len = if version >= 3 && n >= 104 {
        u64::from(be32(&h, 100))
    } else {
        72
    };
    // Header extensions: (type, length, data padded to 8) until type 0.
    let mut format = "raw".to_string();
    let mut pos = header_len;
    for _ in 0..64 {
        let mut th = [0u8; 8];
        f.seek(SeekFrom::Start(pos))?;
        if f.read_exact(&mut th).is_err() {
            break;
        }
        let (ty, len) = (be32(&th, 0), be32(&th, 4) as u64);
        if ty == 0 || pos + 8 + len > off {
            break;
        }
        if ty == EXT_BACKING_FORMAT && len < 64 {
            let mut b = vec![0u8; len as usize];
            f.read_exact(&mut b)?;
            format = String::from_utf8_lossy(&b).to_string();
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
    if !["raw", "qcow2"].contains(&format.as_str()) {
        return Err(bad("unsupported backing format"));
    }
    let p = PathBuf::from(&name);
    let path = if p.is_absolute() {
        p
    } else {
        image.parent().unwrap_or(Path::new("/")).join(p)
    };
    Ok(Some(Backing { path, format }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> bool {
        Command::new("qemu-img")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn reads_backing_file_and_format_written_by_qemu_img() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let top = d.path().join("top.qcow2");
        let rel = d.path().join("rel.qcow2");
        let plain = d.path().join("plain.qcow2");
        if !qemu_img(&["--version"]) {
            eprintln!("no qemu-img; skipped");
            return;
        }
        let b = base.to_str().unwrap();
        assert!(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            b,
            top.to_str().unwrap()
        ]));
        assert!(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "top.qcow2",
            rel.to_str().unwrap()
        ]));
        assert!(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            plain.to_str().unwrap(),
            "1M"
        ]));
        let get = |p: &Path| backing(&mut std::fs::File::open(p).unwrap(), p).unwrap();
        assert_eq!(
            get(&top),
            Some(Backing {
                path: base.clone(),
                format: "raw".into()
            })
        );
        assert_eq!(
            get(&rel),
            Some(Backing {
                path: top.clone(),
                format: "qcow2".into()
            })
        );
        assert_eq!(get(&plain), None);
        let err = backing(&mut std::fs::File::open(&base).unwrap(), &base);
        assert!(err.is_err());
    }
}
