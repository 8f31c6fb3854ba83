//! Images: a content-addressed blob store, import of OCI layouts/archives and `docker save`
//! tarballs, and the shared read-only root filesystem built once per manifest digest.
//!
//! On disk, under the image root:
//! ```text
//! blobs/sha256/HEX        every manifest, config and layer, verified against its digest
//! rootfs/HEX.erofs        the unpacked layers of manifest sha256:HEX as an EROFS image
//! partial/HEX             a blob being downloaded (kept across restarts: pulls resume)
//! tmp/                    work in progress; never read as a result
//! ```
//!
//! Every name under the store is made from a parsed [`Digest`] (64 lowercase hex digits), and
//! files are created and renamed through a [`hutch_fs::Root`] on the store directory, so no
//! input can name a path outside it. What each boundary does, and which test proves it, is in
//! docs/images.md.

mod archive;
mod challenge;
mod commit;
mod digest;
pub mod egress;
pub mod oci;
mod pull;
pub mod registry;
pub mod rootfs;
mod sparse;
mod tarstream;
pub mod unpack;

pub use archive::normalize_ref;
pub use commit::rfc3339;
pub use digest::{Digest, DigestError};
pub use egress::{Egress, Timeouts};
pub use pull::{PullEvent, PullOptions};
pub use tarstream::{MAX_LONG_NAME, MAX_PAX};
pub use unpack::{Limits, Stats};

use hutch_core::{Image, ImageConfig};
use hutch_fs::{Mode, Root};
use serde::Deserialize;
use sha2::Sha256;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not an image archive: {0}")]
    BadArchive(String),
    #[error("bad layer: {0}")]
    BadLayer(String),
    #[error("blob {digest} does not match its digest (got {actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("image is for {0}, this host runs linux/amd64")]
    WrongArchitecture(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("layer exceeds limits: {0}")]
    Limit(String),
    #[error("building the root filesystem failed: {0}")]
    Build(String),
    #[error("{0}")]
    Registry(String),
    /// A download cut off midway; what arrived is kept, and pulling again resumes it.
    #[error("{0} (interrupted; pulling again resumes the download)")]
    Interrupted(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcStats {
    pub blobs_removed: u64,
    pub rootfs_removed: u64,
    pub partials_removed: u64,
    pub bytes_freed: u64,
}

/// The on-disk image store.
pub struct ImageStore {
    root: PathBuf,
    /// The store directory, for every file made or renamed in it.
    dir: Root,
    pub limits: Limits,
    blob_locks: pull::BlobLocks,
}

/// The OCI image config, as much of it as hutch uses.
#[derive(Debug, Deserialize, Default)]
struct OciConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<OciRuntimeConfig>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct OciRuntimeConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// An image manifest found in an archive, its blobs already in the store.
pub(crate) struct Found {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub layers: Vec<Digest>,
    /// Name the archive gives the image, if any.
    pub name: Option<String>,
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        for d in ["blobs/sha256", "rootfs", "tmp", "partial"] {
            std::fs::create_dir_all(root.join(d))
                .map_err(io_err(format!("creating {}", root.join(d).display())))?;
        }
        let dir = Root::open(root, Mode::Beneath).map_err(unpack::fs_err)?;
        // Leftovers of an import that crashed are never results.
        for e in dir.read_dir(Path::new("tmp")).map_err(unpack::fs_err)? {
            let _ = dir.remove_all(&Path::new("tmp").join(e));
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
            dir,
            limits: Limits::default(),
            blob_locks: Default::default(),
        })
    }

    fn blob_rel(digest: &Digest) -> PathBuf {
        Path::new("blobs/sha256").join(digest.hex())
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(Self::blob_rel(digest))
    }

    pub(crate) fn has_blob(&self, digest: &Digest) -> bool {
        self.dir.stat(&Self::blob_rel(digest)).is_ok()
    }

    /// Whether the store holds blob `digest` at exactly `size` bytes. A stored blob of another
    /// size (truncated by a crash or a full disk) is removed so that it is fetched again.
    pub(crate) fn has_blob_sized(&self, digest: &Digest, size: u64) -> bool {
        match self.dir.stat(&Self::blob_rel(digest)) {
            Ok(st) if st.size == size => true,
            Ok(st) => {
                tracing::warn!(%digest, have = st.size, want = size, "removing a damaged blob");
                let _ = self.dir.remove(&Self::blob_rel(digest));
                false
            }
            Err(_) => false,
        }
    }

    pub(crate) fn blob_size(&self, digest: &Digest) -> Result<u64, ImageError> {
        Ok(self
            .dir
            .stat(&Self::blob_rel(digest))
            .map_err(unpack::fs_err)?
            .size)
    }

    /// The root filesystem image of a manifest. A string that is not a valid digest gives a
    /// path that never exists.
    pub fn rootfs_path(&self, manifest_digest: &str) -> PathBuf {
        let name = match Digest::parse(manifest_digest) {
            Ok(d) => format!("{}.erofs", d.hex()),
            Err(_) => "invalid-digest".into(),
        };
        self.root.join("rootfs").join(name)
    }

    pub fn tmp_dir(&self) -> Result<tempfile::TempDir, ImageError> {
        tempfile::tempdir_in(self.root.join("tmp")).map_err(io_err("creating temp dir"))
    }

    /// A new temp file in `tmp/` (removed when dropped unless persisted).
    pub(crate) fn tmp_file(&self) -> Result<tempfile::NamedTempFile, ImageError> {
        tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io_err("creating temp file"))
    }

    /// Moves a finished temp file to `rel` in the store (renameat beneath the store root).
    pub(crate) fn persist(
        &self,
        tmp: tempfile::NamedTempFile,
        rel: &Path,
    ) -> Result<(), ImageError> {
        let name = tmp
            .path()
            .file_name()
            .ok_or_else(|| ImageError::Build("temp file without a name".into()))?
            .to_os_string();
        hutch_fs::durable::sync_file(tmp.as_file()).map_err(io_err("flushing blob"))?;
        let path = tmp.into_temp_path();
        self.dir
            .rename(&Path::new("tmp").join(name), rel)
            .map_err(unpack::fs_err)?;
        let dir = self.root.join(rel.parent().unwrap_or(Path::new("")));
        hutch_fs::durable::sync_dir(&dir).map_err(io_err("flushing blob directory"))?;
        // Renamed: nothing is left for the guard to remove.
        let _ = path.keep();
        Ok(())
    }

    /// Copies `src` into the blob store. With `expect`, the content must hash to it; with
    /// `size`, it must be exactly that long; never more than `max` bytes are read. Returns the
    /// digest. On any error nothing is left behind.
    pub(crate) fn add_blob(
        &self,
        src: impl Read,
        expect: Option<&Digest>,
        size: Option<u64>,
        max: u64,
    ) -> Result<Digest, ImageError> {
        if let Some(d) = expect {
            let present = match size {
                Some(s) => self.has_blob_sized(d, s),
                None => self.has_blob(d),
            };
            if present {
                return Ok(d.clone());
            }
        }
        if let Some(s) = size {
            if s > max {
                return Err(ImageError::Limit(format!(
                    "blob of {s} bytes exceeds the limit of {max}"
                )));
            }
        }
        let mut tmp = self.tmp_file()?;
        let mut h = <Sha256 as sha2::Digest>::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut src = src.take(max.saturating_add(1));
        let mut n: u64 = 0;
        loop {
            let k = src.read(&mut buf).map_err(io_err("reading blob"))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > max {
                return Err(ImageError::Limit(format!(
                    "blob is larger than the limit of {max} bytes"
                )));
            }
            sha2::Digest::update(&mut h, &buf[..k]);
            tmp.write_all(&buf[..k]).map_err(io_err("writing blob"))?;
        }
        let actual = Digest::from_hasher(sha2::Digest::finalize(h).into());
        if let Some(d) = expect {
            if *d != actual {
                return Err(ImageError::DigestMismatch {
                    digest: d.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        if let Some(s) = size {
            if s != n {
                return Err(ImageError::BadArchive(format!(
                    "blob {actual} is {n} bytes, its descriptor says {s}"
                )));
            }
        }
        self.persist(tmp, &Self::blob_rel(&actual))?;
        Ok(actual)
    }

    /// Which of `digests` the store lacks (a string that is not a digest is an error).
    pub fn missing_blobs(&self, digests: &[String]) -> Result<Vec<Digest>, ImageError> {
        let mut out = Vec::new();
        for d in digests {
            let d = Digest::parse(d)?;
            if !self.has_blob(&d) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Stores blob `digest` from `src` (another node's copy): it must hash to `digest` and be
    /// at most `self.limits.max_bytes` long; on any error nothing is stored.
    pub fn add_peer_blob(&self, src: impl Read, digest: &Digest) -> Result<(), ImageError> {
        self.add_blob(src, Some(digest), None, self.limits.max_bytes)
            .map(|_| ())
    }

    /// Opens blob `digest` for reading (resolved beneath the store's root).
    pub fn open_blob(&self, digest: &Digest) -> Result<std::fs::File, ImageError> {
        self.dir
            .open_file(&Self::blob_rel(digest))
            .map_err(unpack::fs_err)
    }

    pub(crate) fn read_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>, ImageError> {
        let f = self
            .dir
            .open_file(&Self::blob_rel(digest))
            .map_err(unpack::fs_err)?;
        let mut v = Vec::new();
        f.take(max + 1)
            .read_to_end(&mut v)
            .map_err(io_err(format!("blob {digest}")))?;
        if v.len() as u64 > max {
            return Err(ImageError::BadArchive(format!(
                "blob {digest} is larger than {max} bytes"
            )));
        }
        Ok(v)
    }

    /// Imports an OCI image layout (directory or tar, e.g. `skopeo copy ... oci-archive:`) or a
    /// `docker save` tarball, and builds its root filesystem. `name` overrides the name the
    /// archive carries. Nothing is left behind on failure except verified blobs.
    pub fn import(&self, src: &Path, name: Option<&str>) -> Result<Image, ImageError> {
        let staged;
        let dir = if src.is_dir() {
            src
        } else {
            staged = self.tmp_dir()?;
            archive::extract_archive(src, staged.path(), self.limits)?;
            staged.path()
        };
        let found = archive::find_image(self, dir)?;
        let name = match (name, &found.name) {
            (Some(n), _) => normalize_ref(n)?,
            (None, Some(n)) => normalize_ref(n)?,
            (None, None) => {
                let stem = src
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                normalize_ref(&stem.to_ascii_lowercase())?
            }
        };
        self.finish(found, name)
    }

    pub(crate) fn finish(&self, found: Found, name: String) -> Result<Image, ImageError> {
        let cfg_bytes = self.read_blob(&found.config_digest, oci::MAX_CONFIG)?;
        let cfg: OciConfigFile = serde_json::from_slice(&cfg_bytes)
            .map_err(|e| ImageError::BadArchive(format!("image config: {e}")))?;
        if cfg.architecture != "amd64" || (cfg.os != "linux" && !cfg.os.is_empty()) {
            return Err(ImageError::WrongArchitecture(format!(
                "{}/{}",
                cfg.os, cfg.architecture
            )));
        }
        let rc = cfg.config.unwrap_or_default();
        let config = ImageConfig {
            env: rc.env.unwrap_or_default(),
            entrypoint: rc.entrypoint.unwrap_or_default(),
            cmd: rc.cmd.unwrap_or_default(),
            working_dir: rc.working_dir.unwrap_or_default(),
            user: rc.user.unwrap_or_default(),
            exposed_ports: rc.exposed_ports.unwrap_or_default().into_keys().collect(),
            labels: rc.labels.unwrap_or_default(),
        };
        let layers: Vec<String> = found.layers.into_iter().map(String::from).collect();
        let rootfs = self.build_rootfs(found.manifest_digest.as_str(), &layers)?;
        let rootfs_size = std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0);
        Ok(Image {
            name,
            digest: found.manifest_digest.into(),
            config_digest: found.config_digest.into(),
            layers,
            config,
            architecture: "amd64".into(),
            rootfs_size,
            created_at: hutch_core::now(),
            owner: None,
        })
    }

    /// Builds the EROFS root filesystem of a manifest from its layers, once.
    pub fn build_rootfs(
        &self,
        manifest_digest: &str,
        layers: &[String],
    ) -> Result<PathBuf, ImageError> {
        let manifest = Digest::parse(manifest_digest)?;
        let layers = layers
            .iter()
            .map(|l| Digest::parse(l))
            .collect::<Result<Vec<_>, _>>()?;
        let out = self.rootfs_path(manifest.as_str());
        if out.exists() {
            if erofs_complete(&out) {
                return Ok(out);
            }
            tracing::warn!(path = %out.display(), "rebuilding a truncated root filesystem");
            std::fs::remove_file(&out).map_err(io_err("removing a truncated rootfs"))?;
        }
        let work = self.tmp_dir()?;
        let tree = work.path().join("rootfs");
        std::fs::create_dir(&tree).map_err(io_err("creating rootfs dir"))?;
        std::fs::set_permissions(&tree, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io_err("rootfs dir"))?;
        let tree_root = Root::open(&tree, Mode::InRoot).map_err(unpack::fs_err)?;
        let mut stats = Stats::default();
        for l in &layers {
            let r = unpack::open_layer(&self.blob_path(l))?;
            unpack::apply_layer_in(&tree_root, r, self.limits, &mut stats)?;
        }
        let img = work.path().join("rootfs.erofs");
        let o = Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&img)
            .arg(&tree)
            .output()
            .map_err(io_err("running mkfs.erofs (package erofs-utils)"))?;
        if !o.status.success() {
            return Err(ImageError::Build(
                String::from_utf8_lossy(&o.stderr).trim().to_string(),
            ));
        }
        hutch_fs::durable::sync_path(&img).map_err(io_err("flushing rootfs"))?;
        std::fs::rename(&img, &out).map_err(io_err("storing rootfs"))?;
        hutch_fs::durable::sync_dir(&self.root.join("rootfs"))
            .map_err(io_err("flushing rootfs"))?;
        tracing::info!(
            digest = manifest_digest,
            entries = stats.entries,
            bytes = stats.bytes,
            "built rootfs"
        );
        Ok(out)
    }

    /// Deletes every blob, root filesystem and partial download whose digest is not in `keep`.
    /// The caller guarantees no pull, import or commit runs meanwhile.
    pub fn gc(&self, keep: &std::collections::HashSet<String>) -> Result<GcStats, ImageError> {
        let mut st = GcStats::default();
        let hexes = |dir: &str| -> Result<Vec<(String, PathBuf, u64)>, ImageError> {
            let d = self.root.join(dir);
            let rd = std::fs::read_dir(&d).map_err(io_err(format!("listing {}", d.display())))?;
            Ok(rd
                .flatten()
                .map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    let hex = n.split('.').next().unwrap_or("").to_string();
                    (
                        format!("sha256:{hex}"),
                        e.path(),
                        e.metadata().map(|m| m.len()).unwrap_or(0),
                    )
                })
                .collect())
        };
        for (dir, counter) in [("blobs/sha256", 0), ("rootfs", 1), ("partial", 2)] {
            for (digest, path, size) in hexes(dir)? {
                if keep.contains(&digest) {
                    continue;
                }
                std::fs::remove_file(&path)
                    .map_err(io_err(format!("removing {}", path.display())))?;
                st.bytes_freed += size;
                match counter {
                    0 => st.blobs_removed += 1,
                    1 => st.rootfs_removed += 1,
                    _ => st.partials_removed += 1,
                }
            }
        }
        Ok(st)
    }

    /// Deletes the root filesystem of a manifest (blobs stay until garbage collection).
    pub fn remove_rootfs(&self, manifest_digest: &str) -> Result<(), ImageError> {
        match std::fs::remove_file(self.rootfs_path(manifest_digest)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing rootfs")(e)),
            _ => Ok(()),
        }
    }
}

/// Whether the EROFS image at `p` is as long as its superblock says (a file cut short by a
/// crash is not trusted). The superblock sits at byte 1024: magic 0xE0F5E1E2, the block size's
/// log2 at +12, the block count at +36.
pub fn erofs_complete(p: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(p) else {
        return false;
    };
    let mut sb = [0u8; 64];
    let read = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1024))
        .and_then(|_| f.read_exact(&mut sb));
    if read.is_err() || u32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]) != 0xE0F5_E1E2 {
        return false;
    }
    let bits = u32::from(sb[12]);
    let blocks = u64::from(u32::from_le_bytes([sb[36], sb[37], sb[38], sb[39]]));
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    (9..=16).contains(&bits) && blocks > 0 && len >= blocks << bits
}
