//! The daemon's secrets on disk (API token, JWT signing key, SSH host key): created 0600 from the
//! first byte, written to a temp file, fsynced and renamed into place (file and directory), and
//! refused at start when their mode lets anyone but their owner read them or another user owns
//! them.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:o}: secrets must be readable by their owner only; \
         fix with: chmod 600 {path} (or delete it to have hutchd make a new one)"
    )]
    LaxMode { path: String, mode: u32 },
    #[error("{path} is owned by uid {uid}, not by hutchd's uid {ours}")]
    Owner { path: String, uid: u32, ours: u32 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a secret; None when it does not exist. Refuses a secret others could read or write.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, SecretError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    check(path, &meta)?;
    std::fs::read(path).map(Some).map_err(io(path))
}

fn check(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretError> {
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.file_type().is_file() || mode & 0o077 != 0 {
        return Err(SecretError::LaxMode {
            path: path.display().to_string(),
            mode,
        });
    }
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    if meta.uid() != ours {
        return Err(SecretError::Owner {
            path: path.display().to_string(),
            uid: meta.uid(),
            ours,
        });
    }
    Ok(())
}

/// Writes a secret atomically: a new 0600 temp file beside it, fsynced, renamed over `path`,
/// and the directory fsynced.
pub fn write(path: &Path, data: &[u8]) -> Result<(), SecretError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let r = f
        .write_all(data)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .and_then(|_| std::fs::File::open(dir)?.sync_all());
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(io(path))
}

/// Reads the secret at `path`, or makes one with `make` and stores it.
pub fn read_or_create(
    path: &Path,
    valid: impl Fn(&[u8]) -> bool,
    make: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, SecretError> {
    if let Some(v) = read(path)? {
        if valid(&v) {
            return Ok(v);
        }
    }
    let v = make();
    write(path, &v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_private_and_lax_modes_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        let v = read_or_create(&p, |v| v.len() == 4, || b"abcd".to_vec()).unwrap();
        assert_eq!(v, b"abcd");
        let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o600);
        assert_eq!(read(&p).unwrap().unwrap(), b"abcd");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(read_or_create(&p, |_| true, Vec::new).is_err());
        // A symlink in place of a secret is refused, not followed.
        let q = d.path().join("link");
        std::os::unix::fs::symlink(&p, &q).unwrap();
        assert!(read(&q).is_err());
        // An invalid (e.g. empty) secret is replaced.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let v = read_or_create(&p, |v| v.len() == 8, || b"12345678".to_vec()).unwrap();
        assert_eq!(v, b"12345678");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            2,
            "no temp file left"
        );
    }
}
