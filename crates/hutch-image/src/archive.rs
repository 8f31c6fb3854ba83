//! Reading image archives: OCI image layouts (a directory, or a tar of one as written by
//! `skopeo copy ... oci-archive:`) and `docker save` tarballs.
//!
//! An archive is untrusted input. It is extracted through a [`hutch_fs::Root`] in
//! [`Mode::Beneath`]: entries are created with `O_EXCL` relative to their resolved parent, and
//! any path that would leave the staging directory (`..`, an absolute symlink, a chain of
//! relative ones) is refused by the kernel. The stream obeys the store's [`Limits`] (entries and
//! decompressed bytes, sparse files counting at their full size) and the tar extension and
//! sparse map caps; sparse files are extracted with holes. Files inside are then read through
//! the same root, JSON documents with size caps, blobs by [`Digest`] against their descriptors.

use crate::oci::{is_index, pick, Index, Manifest, MAX_CONFIG, MAX_JSON};
use crate::tarstream::{for_each_entry, BadName, Budget};
use crate::unpack::{fs_err, Limits};
use crate::{Digest, Found, ImageError, ImageStore};
use hutch_fs::{FsError, Mode, Root};
use serde::Deserialize;
use serde_json::json;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Normalises an image reference: `busybox` -> `busybox:latest`; refuses malformed ones.
pub fn normalize_ref(r: &str) -> Result<String, ImageError> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:@".contains(&b))
        && !r.starts_with(['/', ':', '.', '-'])
        && !r.contains("//")
        && !r.contains("..");
    if !ok {
        return Err(ImageError::BadArchive(format!(
            "invalid image name {r:?} (lowercase letters, digits and . _ - / : @ only)"
        )));
    }
    let last = r.rsplit('/').next().unwrap_or(r);
    if last.contains(':') || r.contains('@') {
        Ok(r.to_string())
    } else {
        Ok(format!("{r}:latest"))
    }
}

fn bad(m: impl Into<String>) -> ImageError {
    ImageError::BadArchive(m.into())
}

/// A hutch-fs error met while reading an archive: an archive problem unless it is the host's.
fn arch_err(e: FsError) -> ImageError {
    match e {
        FsError::Io { .. } | FsError::NoOpenat2 => fs_err(e),
        other => bad(other.to_string()),
    }
}

/// Normal components of an archive entry name or link; `..` and NUL are refused.
fn clean(p: &[u8]) -> Result<PathBuf, ImageError> {
    crate::tarstream::entry_path(p).map_err(|e| match e {
        BadName::Nul => bad("NUL in an archive entry name"),
        BadName::Escapes => bad(format!(
            "archive entry {} escapes the archive",
            String::from_utf8_lossy(p)
        )),
    })
}

/// Extracts an image archive (plain, gzip or zstd tar) into the empty directory `dest`, within
/// `limits`. Directories, regular files, symlinks and hard links are made (through `dest` as a
/// [`hutch_fs::Root`]); other entry types are skipped.
pub(crate) fn extract_archive(src: &Path, dest: &Path, limits: Limits) -> Result<(), ImageError> {
    let r = crate::unpack::open_layer(src).map_err(|e| match e {
        ImageError::Io { .. } => e,
        other => bad(other.to_string()),
    })?;
    let root = Root::open(dest, Mode::Beneath).map_err(fs_err)?;
    let budget = Budget {
        bytes: limits.max_bytes,
        entries: limits.max_entries,
        what: "archive",
        entries_what: "archive",
    };
    let used = for_each_entry(r, budget, |m, data| {
        let rel = clean(&m.path)?;
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            return Ok(());
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        match m.kind {
            tar::EntryType::Directory => {
                root.create_dir_all(&rel, 0o755).map_err(arch_err)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let dir = root.create_dir_all(parent, 0o755).map_err(arch_err)?;
                // A later entry of the same name wins, as with tar; the old one is unlinked,
                // never written through.
                let mut f = dir.replace_file(&name, 0o644).map_err(arch_err)?;
                crate::sparse::write_data(
                    &mut f,
                    data,
                    m.size,
                    m.sparse.as_ref(),
                    &m.path_lossy(),
                    bad,
                )?;
            }
            tar::EntryType::Symlink => {
                // docker save links duplicate layers to one another. The link is stored as it
                // is; reading through it later resolves beneath the archive or fails.
                let link = m
                    .link
                    .as_deref()
                    .filter(|l| !l.is_empty() && !l.contains(&0))
                    .ok_or_else(|| bad(format!("bad symlink {}", m.path_lossy())))?;
                let dir = root.create_dir_all(parent, 0o755).map_err(arch_err)?;
                dir.symlink(Path::new(OsStr::from_bytes(link)), &name)
                    .map_err(arch_err)?;
            }
            tar::EntryType::Link => {
                let link = clean(m.link.as_deref().unwrap_or_default())?;
                let dir = root.create_dir_all(parent, 0o755).map_err(arch_err)?;
                let (sdir, sname) = root.parent(&link).map_err(arch_err)?;
                dir.hard_link(&sdir, &sname, &name).map_err(arch_err)?;
            }
            _ => {}
        }
        Ok(())
    })?;
    if used.entries == 0 {
        return Err(bad(format!("{} is empty", src.display())));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Reads a file of the archive, refusing more than `max` bytes (checked while reading).
fn read_small(root: &Root, rel: &Path, max: u64) -> Result<Vec<u8>, ImageError> {
    let f = root.open_file(rel).map_err(|e| match e {
        FsError::NotFound(_) => bad(format!("{} is missing from the archive", rel.display())),
        e => arch_err(e),
    })?;
    let mut v = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut v)
        .map_err(crate::io_err(format!("reading {}", rel.display())))?;
    if v.len() as u64 > max {
        return Err(ImageError::Limit(format!(
            "{} is larger than {max} bytes",
            rel.display()
        )));
    }
    Ok(v)
}

fn read_json<T: for<'a> Deserialize<'a>>(root: &Root, rel: &str) -> Result<T, ImageError> {
    let b = read_small(root, Path::new(rel), MAX_JSON)?;
    serde_json::from_slice(&b).map_err(|e| bad(format!("{rel}: {e}")))
}

/// Copies blob `digest` of the layout into the store, checking its size and digest.
fn import_blob(
    store: &ImageStore,
    root: &Root,
    digest: &Digest,
    size: u64,
) -> Result<(), ImageError> {
    if store.has_blob_sized(digest, size) {
        return Ok(());
    }
    let rel = PathBuf::from("blobs/sha256").join(digest.hex());
    let f = root.open_file(&rel).map_err(|e| match e {
        FsError::NotFound(_) => bad(format!("blob {digest} is missing from the layout")),
        e => arch_err(e),
    })?;
    store.add_blob(f, Some(digest), Some(size), size)?;
    Ok(())
}

/// Locates the image in an extracted archive (or a layout directory) and copies its blobs into
/// the store.
pub(crate) fn find_image(store: &ImageStore, dir: &Path) -> Result<Found, ImageError> {
    let root = Root::open(dir, Mode::Beneath).map_err(fs_err)?;
    let exists = |n: &str| root.stat(Path::new(n)).is_ok();
    if exists("index.json") {
        let index: Index = read_json(&root, "index.json")?;
        let top = pick(&index.manifests)?;
        let name = top.annotations.get("io.containerd.image.name").cloned();
        let mut desc = top.clone();
        // Nested indexes (multi-arch images): descend to the linux/amd64 manifest.
        for _ in 0..4 {
            if !crate::oci::INDEX_TYPES.contains(&desc.media_type.as_str()) {
                break;
            }
            desc.check("index", &crate::oci::INDEX_TYPES, MAX_JSON)?;
            import_blob(store, &root, &desc.digest, desc.size)?;
            let nested = Index::parse(&store.read_blob(&desc.digest, MAX_JSON)?)?;
            desc = pick(&nested.manifests)?.clone();
        }
        desc.check("manifest", &crate::oci::MANIFEST_TYPES, MAX_JSON)?;
        import_blob(store, &root, &desc.digest, desc.size)?;
        let body = store.read_blob(&desc.digest, MAX_JSON)?;
        if is_index("", &body) {
            return Err(bad("too many nested indexes"));
        }
        let manifest = Manifest::parse(&body, &store.limits)?;
        import_blob(store, &root, &manifest.config.digest, manifest.config.size)?;
        for l in &manifest.layers {
            import_blob(store, &root, &l.digest, l.size)?;
        }
        return Ok(Found {
            manifest_digest: desc.digest,
            layers: manifest.layer_digests(),
            config_digest: manifest.config.digest,
            name,
        });
    }
    if exists("manifest.json") {
        let entries: Vec<DockerEntry> = read_json(&root, "manifest.json")?;
        let e = entries
            .into_iter()
            .next()
            .ok_or_else(|| bad("manifest.json lists no image"))?;
        if e.layers.len() > crate::oci::MAX_LAYERS {
            return Err(ImageError::Limit(format!(
                "{} layers, more than {}",
                e.layers.len(),
                crate::oci::MAX_LAYERS
            )));
        }
        let open = |rel: &str| -> Result<std::fs::File, ImageError> {
            let p = clean(rel.as_bytes())?;
            root.open_file(&p).map_err(|err| match err {
                FsError::NotFound(_) => bad(format!("{rel} is missing from the archive")),
                err => arch_err(err),
            })
        };
        let cfg = read_small(&root, &clean(e.config.as_bytes())?, MAX_CONFIG)?;
        let config_digest = store.add_blob(cfg.as_slice(), None, None, MAX_CONFIG)?;
        let mut layers = Vec::new();
        let mut descs = Vec::new();
        let mut total: u64 = 0;
        for l in &e.layers {
            let f = open(l)?;
            let d = store.add_blob(f, None, None, store.limits.max_bytes - total)?;
            let size = store.blob_size(&d)?;
            total += size;
            descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": size}));
            layers.push(d);
        }
        // Record the image as an OCI manifest, so every image has a manifest digest.
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": cfg.len()},
            "layers": descs,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| bad(e.to_string()))?;
        let manifest_digest = store.add_blob(bytes.as_slice(), None, None, MAX_JSON)?;
        return Ok(Found {
            manifest_digest,
            config_digest,
            layers,
            name: e.repo_tags.and_then(|t| t.into_iter().next()),
        });
    }
    Err(bad(
        "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs() {
        assert_eq!(normalize_ref("busybox").unwrap(), "busybox:latest");
        assert_eq!(
            normalize_ref("localhost:5000/app").unwrap(),
            "localhost:5000/app:latest"
        );
        assert_eq!(
            normalize_ref("localhost:5000/app:1").unwrap(),
            "localhost:5000/app:1"
        );
        for bad in ["", "Busy", "a b", "../x", "/x", "a//b"] {
            assert!(normalize_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entry_names() {
        assert_eq!(clean(b"./a//b/").unwrap(), PathBuf::from("a/b"));
        assert!(clean(b"a/../../b").is_err());
        assert!(clean(b"a\0b").is_err());
    }
}
