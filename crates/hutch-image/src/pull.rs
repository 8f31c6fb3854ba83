//! Pulling an image from a registry into the store: descriptors checked before any fetch,
//! blobs downloaded to `partial/HEX` (opened through the store's [`hutch_fs::Root`], never
//! through a link) and renamed into `blobs/` once verified.

use crate::egress::{Egress, Timeouts};
use crate::oci::{is_index, pick, Descriptor, Index, Manifest};
use crate::registry::{Credentials, Reference, Registry, MAX_MANIFEST};
use crate::unpack::fs_err;
use crate::{Digest, Found, ImageError, ImageStore};
use hutch_core::Image;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a pull reports as it goes.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PullEvent {
    /// The manifest is known: its digest and the layers to fetch.
    Resolved {
        reference: String,
        digest: String,
        layers: Vec<(String, u64)>,
    },
    /// Bytes of one blob so far (at the start, the end, and every 1% or 1 MiB).
    Progress {
        digest: String,
        done: u64,
        total: u64,
    },
    /// A blob is in the store; `cached` if nothing was downloaded, `resumed_from` > 0 if a
    /// partial download was continued.
    Blob {
        digest: String,
        cached: bool,
        resumed_from: u64,
    },
    /// All blobs are in; the root filesystem is being built.
    Building,
}

/// Locks keyed by blob digest, so two pulls never fetch the same blob at once.
#[derive(Default)]
pub struct BlobLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl BlobLocks {
    fn get(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(digest.to_string()).or_default().clone()
    }
}

pub struct PullOptions {
    pub insecure: bool,
    pub creds: Option<Credentials>,
    /// Store under this name instead of the canonical reference.
    pub name: Option<String>,
    /// Connect to loopback, link-local and private addresses too (the admin, or a non-admin
    /// account when the admin allowed it). Off: those are refused, redirects and token realms
    /// included.
    pub allow_private: bool,
    /// Private addresses allowed even without `allow_private` (registries the admin vouches
    /// for).
    pub allow_addrs: Vec<std::net::IpAddr>,
    /// Connect, read and document timeouts.
    pub timeouts: Timeouts,
}

impl Default for PullOptions {
    /// Public registries only, default timeouts, no credentials.
    fn default() -> Self {
        PullOptions {
            insecure: false,
            creds: None,
            name: None,
            allow_private: false,
            allow_addrs: Vec::new(),
            timeouts: Timeouts::default(),
        }
    }
}

impl ImageStore {
    fn partial_rel(digest: &Digest) -> PathBuf {
        Path::new("partial").join(digest.hex())
    }

    async fn fetch(
        &self,
        reg: &Registry,
        desc: &Descriptor,
        progress: &mut (dyn FnMut(PullEvent) + Send),
    ) -> Result<(), ImageError> {
        let (digest, size) = (&desc.digest, desc.size);
        let lock = self.blob_locks.get(digest.as_str());
        let _g = lock.lock().await;
        if self.has_blob_sized(digest, size) {
            progress(PullEvent::Blob {
                digest: digest.to_string(),
                cached: true,
                resumed_from: 0,
            });
            return Ok(());
        }
        let rel = Self::partial_rel(digest);
        let file = self.dir.open_rw(&rel, 0o600).map_err(fs_err)?;
        let d = digest.to_string();
        // Progress at the start, the end, and every 1% (at least 1 MiB) in between.
        let step = (size / 100).max(1 << 20);
        let mut last: Option<u64> = None;
        let res = reg
            .fetch_blob(digest, size, file, |done| {
                if last.is_none_or(|l| done == size || done.saturating_sub(l) >= step) {
                    last = Some(done);
                    progress(PullEvent::Progress {
                        digest: d.clone(),
                        done,
                        total: size,
                    })
                }
            })
            .await;
        let resumed = match res {
            Ok(r) => r,
            Err(e) => {
                // What arrived before a cut-off is kept for the next pull to resume; anything
                // else is useless or hostile and goes.
                if !matches!(e, ImageError::Interrupted(_)) {
                    let _ = self.dir.remove(&rel);
                }
                return Err(e);
            }
        };
        // Flushed before it is renamed into place, and its directory after.
        let flushed = self
            .dir
            .open_file(&rel)
            .map_err(fs_err)
            .and_then(|f| f.sync_all().map_err(crate::io_err("flushing blob")));
        if let Err(e) = flushed {
            let _ = self.dir.remove(&rel);
            return Err(e);
        }
        if let Err(e) = self.dir.rename(&rel, &Self::blob_rel(digest)) {
            let _ = self.dir.remove(&rel);
            return Err(fs_err(e));
        }
        hutch_fs::durable::sync_dir(&self.root.join("blobs/sha256"))
            .map_err(crate::io_err("flushing blob directory"))?;
        progress(PullEvent::Blob {
            digest: digest.to_string(),
            cached: false,
            resumed_from: resumed,
        });
        Ok(())
    }

    /// Pulls `reference` (linux/amd64 from multi-arch indexes), verifying every blob, and builds
    /// its root filesystem. Blobs already in the store are not downloaded again; partial
    /// downloads left by an interrupted pull are resumed. Every descriptor is checked (digest,
    /// media type, size within [`crate::Limits`]) before anything is fetched for it.
    pub async fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &mut (dyn FnMut(PullEvent) + Send),
    ) -> Result<Image, ImageError> {
        let r = Reference::parse(reference)?;
        let name = crate::normalize_ref(opts.name.as_deref().unwrap_or(&r.canonical()))?;
        let egress = Egress {
            allow_private: opts.allow_private,
            allow_addrs: opts.allow_addrs.clone(),
        };
        let reg = Registry::with_policy(
            r.clone(),
            opts.insecure,
            opts.creds.clone(),
            false,
            egress,
            opts.timeouts,
        )?;
        let (mut body, mut media, mut digest) = reg.manifest(r.target()).await?;
        let mut depth = 0;
        while is_index(&media, &body) {
            depth += 1;
            if depth > 3 {
                return Err(ImageError::BadArchive("too many nested indexes".into()));
            }
            let idx = Index::parse(&body)?;
            let d = pick(&idx.manifests)?;
            d.check("manifest", &KNOWN_MANIFESTS, MAX_MANIFEST)?;
            (body, media, digest) = reg.manifest(d.digest.as_str()).await?;
        }
        if media.contains("distribution.manifest.v1") {
            return Err(ImageError::Unsupported("Docker schema 1 manifests".into()));
        }
        let manifest = Manifest::parse(&body, &self.limits)?;
        progress(PullEvent::Resolved {
            reference: r.canonical(),
            digest: digest.to_string(),
            layers: manifest
                .layers
                .iter()
                .map(|l| (l.digest.to_string(), l.size))
                .collect(),
        });
        self.fetch(&reg, &manifest.config, progress).await?;
        for l in &manifest.layers {
            self.fetch(&reg, l, progress).await?;
        }
        // The manifest goes in last: a manifest in the store means its blobs are too.
        self.add_blob(body.as_slice(), Some(&digest), None, MAX_MANIFEST)?;
        progress(PullEvent::Building);
        let found = Found {
            manifest_digest: digest,
            layers: manifest.layer_digests(),
            config_digest: manifest.config.digest,
            name: None,
        };
        tokio::task::block_in_place(|| self.finish(found, name))
    }
}

/// Index entries may name manifests or (nested) indexes.
const KNOWN_MANIFESTS: [&str; 4] = [
    crate::oci::MANIFEST_TYPES[0],
    crate::oci::MANIFEST_TYPES[1],
    crate::oci::INDEX_TYPES[0],
    crate::oci::INDEX_TYPES[1],
];
