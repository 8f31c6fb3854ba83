//! Root filesystems that move between nodes. A live migration needs the target to hold the
//! very bytes the guest mounted on the source (the guest's caches point into them), and
//! `mkfs.erofs` stamps each build with its time: a rebuild from the same layers is the same
//! tree but not the same image. So a node that lacks an image's root filesystem takes a copy of
//! a peer's, verified against the SHA-256 the peer gave ([`ImageStore::install_rootfs`]), and
//! two copies are compared by their hashes ([`ImageStore::rootfs_sha256`]).

use crate::{erofs_complete, io_err, Digest, ImageError, ImageStore};
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The SHA-256 of a file, as lowercase hex.
pub fn file_sha256(p: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(p).map_err(io_err(format!("opening {}", p.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", p.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl ImageStore {
    /// Whether the root filesystem of manifest `manifest_digest` is built here.
    pub fn has_rootfs(&self, manifest_digest: &str) -> bool {
        erofs_complete(&self.rootfs_path(manifest_digest))
    }

    /// The SHA-256 (hex) of this node's root filesystem of manifest `manifest_digest`.
    pub fn rootfs_sha256(&self, manifest_digest: &str) -> Result<String, ImageError> {
        Digest::parse(manifest_digest)?;
        file_sha256(&self.rootfs_path(manifest_digest))
    }

    /// Makes `file`, a root filesystem of manifest `manifest_digest` that a peer sent with
    /// SHA-256 `sha256`, this node's: checked (hash, EROFS superblock), flushed, renamed into
    /// place. A node that has one already keeps its own (the caller compares the hashes).
    pub fn install_rootfs(
        &self,
        manifest_digest: &str,
        file: &Path,
        sha256: &str,
    ) -> Result<PathBuf, ImageError> {
        let out = self.rootfs_path(manifest_digest);
        Digest::parse(manifest_digest)?;
        if self.has_rootfs(manifest_digest) {
            return Ok(out);
        }
        let actual = file_sha256(file)?;
        if actual != sha256 {
            return Err(ImageError::DigestMismatch {
                digest: format!("root filesystem sha256:{sha256}"),
                actual: format!("sha256:{actual}"),
            });
        }
        if !erofs_complete(file) {
            return Err(ImageError::Build(
                "the root filesystem a peer sent is not a complete EROFS image".into(),
            ));
        }
        hutch_fs::durable::sync_path(file).map_err(io_err("flushing rootfs"))?;
        std::fs::rename(file, &out).map_err(io_err("storing rootfs"))?;
        hutch_fs::durable::sync_dir(&self.root.join("rootfs"))
            .map_err(io_err("flushing rootfs"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str =
        "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    /// A peer's root filesystem is taken only when it hashes to what the peer said and is a
    /// whole EROFS image; a node keeps the one it has.
    #[test]
    fn a_peers_root_filesystem_is_checked_before_it_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&d.path().join("images")).unwrap();
        let junk = d.path().join("junk");
        std::fs::write(&junk, vec![7u8; 8192]).unwrap();
        let junk_sha = file_sha256(&junk).unwrap();
        // Another hash than the peer claimed: refused, nothing kept.
        let e = store
            .install_rootfs(MANIFEST, &junk, &"0".repeat(64))
            .unwrap_err();
        assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
        assert!(!store.has_rootfs(MANIFEST) && junk.exists());
        // The hash it claimed, but no EROFS image: refused.
        let e = store
            .install_rootfs(MANIFEST, &junk, &junk_sha)
            .unwrap_err();
        assert!(matches!(e, ImageError::Build(_)), "{e}");
        assert!(!store.has_rootfs(MANIFEST));
        // A real one (where mkfs.erofs is installed, as the tests' set-up does).
        let tree = d.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("f"), b"hi").unwrap();
        let img = d.path().join("img.erofs");
        let made = std::process::Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&img)
            .arg(&tree)
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("mkfs.erofs not found: the rest skipped");
            return;
        }
        let sha = file_sha256(&img).unwrap();
        store.install_rootfs(MANIFEST, &img, &sha).unwrap();
        assert!(store.has_rootfs(MANIFEST));
        assert_eq!(store.rootfs_sha256(MANIFEST).unwrap(), sha);
        // A second copy does not replace the one VMs here may run from.
        let other = d.path().join("other.erofs");
        std::fs::write(tree.join("g"), b"more").unwrap();
        std::process::Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&other)
            .arg(&tree)
            .status()
            .unwrap();
        let other_sha = file_sha256(&other).unwrap();
        store.install_rootfs(MANIFEST, &other, &other_sha).unwrap();
        assert_eq!(store.rootfs_sha256(MANIFEST).unwrap(), sha);
        // A manifest digest that is no digest names no file.
        assert!(store.install_rootfs("../../x", &other, &other_sha).is_err());
    }
}
