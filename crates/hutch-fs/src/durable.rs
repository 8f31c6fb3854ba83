//! Durability: a file written and renamed into place survives a crash or power loss only when
//! its data was flushed before the rename and the directory after it. Every cached artefact
//! hutch keeps (blobs, root filesystems, initramfs, disk templates, VM disks) goes through here.

use std::path::Path;

/// Flushes `file`'s data and metadata to disk.
pub fn sync_file(file: &std::fs::File) -> std::io::Result<()> {
    file.sync_all()
}

/// Flushes the directory `dir` (the entries renamed or created in it) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Flushes the file at `path` and then its directory.
pub fn sync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn syncs_files_and_dirs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        super::sync_path(&p).unwrap();
        super::sync_dir(d.path()).unwrap();
        assert!(super::sync_path(&d.path().join("missing")).is_err());
    }
}
