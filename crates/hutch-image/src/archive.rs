//! Reading image archives: OCI image layouts (a directory, or a tar of one as written by
//! `skopeo copy ... oci-archive:`) and `docker save` tarballs.

use crate::{io_err, Found, ImageError, ImageStore};
use serde::Deserialize;
use serde_json::json;
use std::path::{Component, Path, PathBuf};

const MAX_JSON: u64 = 4 << 20;

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

/// Lexically resolves `rel` (relative to `base`, itself relative to the archive root); None if
/// it leaves the archive.
fn inside(base: &Path, rel: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Extracts an image archive (plain or gzip tar) into `dest`, refusing any entry that would land
/// outside it.
pub(crate) fn extract_archive(src: &Path, dest: &Path) -> Result<(), ImageError> {
    let r = crate::unpack::open_layer(src).map_err(|e| match e {
        ImageError::Io { .. } => e,
        other => bad(other.to_string()),
    })?;
    let mut ar = tar::Archive::new(r);
    let mut n = 0;
    for e in ar
        .entries()
        .map_err(|e| bad(format!("{}: {e}", src.display())))?
    {
        let mut e = e.map_err(|e| bad(format!("{}: {e}", src.display())))?;
        n += 1;
        let p = e.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let rel = inside(Path::new(""), &p)
            .ok_or_else(|| bad(format!("archive entry {} escapes the archive", p.display())))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&rel);
        match e.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(io_err("extracting archive"))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err("extracting archive"))?;
                }
                let mut f = std::fs::File::create(&target).map_err(io_err("extracting archive"))?;
                std::io::copy(&mut e, &mut f)
                    .map_err(|err| bad(format!("truncated archive at {}: {err}", p.display())))?;
            }
            tar::EntryType::Symlink => {
                // docker save links duplicate layers to one another; only links that stay
                // inside the archive are kept.
                let link = e
                    .link_name()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or_default();
                let parent = rel.parent().unwrap_or(Path::new(""));
                if link.is_absolute() || inside(parent, &link).is_none() {
                    return Err(bad(format!(
                        "archive symlink {} points outside the archive",
                        p.display()
                    )));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err("extracting archive"))?;
                }
                std::os::unix::fs::symlink(&link, &target).map_err(io_err("extracting archive"))?;
            }
            _ => {}
        }
    }
    if n == 0 {
        return Err(bad(format!("{} is empty", src.display())));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
pub(crate) struct Index {
    pub manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
pub(crate) struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn read_json<T: for<'a> Deserialize<'a>>(p: &Path) -> Result<T, ImageError> {
    let m = std::fs::metadata(p).map_err(|_| bad(format!("{} is missing", p.display())))?;
    if m.len() > MAX_JSON {
        return Err(bad(format!(
            "{} is larger than {MAX_JSON} bytes",
            p.display()
        )));
    }
    let b = std::fs::read(p).map_err(io_err(format!("reading {}", p.display())))?;
    serde_json::from_slice(&b).map_err(|e| bad(format!("{}: {e}", p.display())))
}

fn layout_blob(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| bad(format!("bad digest {digest:?}")))?;
    if alg != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("unsupported digest {digest:?}")));
    }
    let p = dir.join("blobs").join(alg).join(hex);
    if !p.is_file() {
        return Err(bad(format!("blob {digest} is missing from the layout")));
    }
    Ok(p)
}

fn import_blob(store: &ImageStore, dir: &Path, digest: &str) -> Result<(), ImageError> {
    let p = layout_blob(dir, digest)?;
    let f = std::fs::File::open(&p).map_err(io_err(format!("reading {}", p.display())))?;
    store.add_blob(f, Some(digest))?;
    Ok(())
}

pub(crate) const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Locates the image in an extracted archive and copies its blobs into the store.
pub(crate) fn find_image(store: &ImageStore, dir: &Path) -> Result<Found, ImageError> {
    if dir.join("index.json").is_file() {
        let index: Index = read_json(&dir.join("index.json"))?;
        let top = pick(&index.manifests)?;
        let name = top.annotations.get("io.containerd.image.name").cloned();
        let mut desc_digest = top.digest.clone();
        let mut media = top.media_type.clone();
        // Nested indexes (multi-arch images): descend to the linux/amd64 manifest.
        for _ in 0..4 {
            if !INDEX_TYPES.contains(&media.as_str()) {
                break;
            }
            let p = layout_blob(dir, &desc_digest)?;
            import_blob(store, dir, &desc_digest)?;
            let nested: Index = read_json(&p)?;
            let d = pick(&nested.manifests)?;
            desc_digest = d.digest.clone();
            media = d.media_type.clone();
        }
        import_blob(store, dir, &desc_digest)?;
        let manifest: Manifest = serde_json::from_slice(&store.read_blob(&desc_digest, MAX_JSON)?)
            .map_err(|e| bad(format!("manifest {desc_digest}: {e}")))?;
        import_blob(store, dir, &manifest.config.digest)?;
        for l in &manifest.layers {
            import_blob(store, dir, &l.digest)?;
        }
        return Ok(Found {
            manifest_digest: desc_digest,
            config_digest: manifest.config.digest,
            layers: manifest.layers.into_iter().map(|l| l.digest).collect(),
            name,
        });
    }
    if dir.join("manifest.json").is_file() {
        let entries: Vec<DockerEntry> = read_json(&dir.join("manifest.json"))?;
        let e = entries
            .into_iter()
            .next()
            .ok_or_else(|| bad("manifest.json lists no image"))?;
        let file = |rel: &str| -> Result<PathBuf, ImageError> {
            let r = inside(Path::new(""), Path::new(rel))
                .ok_or_else(|| bad(format!("{rel} escapes the archive")))?;
            let p = dir.join(r);
            std::fs::File::open(&p)
                .map_err(|_| bad(format!("{rel} is missing from the archive")))?;
            Ok(p)
        };
        let open =
            |p: &Path| std::fs::File::open(p).map_err(io_err(format!("reading {}", p.display())));
        let cfg_path = file(&e.config)?;
        if std::fs::metadata(&cfg_path).map(|m| m.len()).unwrap_or(0) > MAX_JSON {
            return Err(bad("image config is too large"));
        }
        let config_digest = store.add_blob(open(&cfg_path)?, None)?;
        let cfg_size = std::fs::metadata(&cfg_path).map(|m| m.len()).unwrap_or(0);
        let mut layers = Vec::new();
        let mut descs = Vec::new();
        for l in &e.layers {
            let p = file(l)?;
            let d = store.add_blob(open(&p)?, None)?;
            let size = std::fs::metadata(store.blob_path(&d))
                .map(|m| m.len())
                .unwrap_or(0);
            descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": size}));
            layers.push(d);
        }
        // Record the image as an OCI manifest, so every image has a manifest digest.
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": cfg_size},
            "layers": descs,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| bad(e.to_string()))?;
        let manifest_digest = store.add_blob(bytes.as_slice(), None)?;
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

pub(crate) fn pick(ds: &[Descriptor]) -> Result<&Descriptor, ImageError> {
    if ds.is_empty() {
        return Err(bad("index lists no manifests"));
    }
    if let Some(d) = ds.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.architecture == "amd64" && p.os == "linux")
    }) {
        return Ok(d);
    }
    if let Some(d) = ds.iter().find(|d| d.platform.is_none()) {
        return Ok(d);
    }
    let have: Vec<String> = ds
        .iter()
        .filter_map(|d| {
            d.platform
                .as_ref()
                .map(|p| format!("{}/{}", p.os, p.architecture))
        })
        .collect();
    Err(ImageError::WrongArchitecture(have.join(", ")))
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
    fn lexical_inside() {
        assert_eq!(
            inside(Path::new("a"), Path::new("../b")),
            Some(PathBuf::from("b"))
        );
        assert_eq!(inside(Path::new("a"), Path::new("../../b")), None);
    }
}
