//! Pulling an image from a registry into the store.

use crate::archive::{pick, Index, Manifest, INDEX_TYPES};
use crate::registry::{partial_path, Credentials, Reference, Registry, MAX_MANIFEST};
use crate::{io_err, Found, ImageError, ImageStore};
use hutch_core::Image;
use std::collections::HashMap;
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
}

impl ImageStore {
    /// Moves a verified partial download into the blob store.
    fn adopt(&self, partial: &std::path::Path, digest: &str) -> Result<(), ImageError> {
        std::fs::rename(partial, self.blob_path(digest)).map_err(io_err("storing blob"))
    }

    async fn fetch(
        &self,
        reg: &Registry,
        digest: &str,
        size: u64,
        max: u64,
        progress: &mut (dyn FnMut(PullEvent) + Send),
    ) -> Result<(), ImageError> {
        let lock = self.blob_locks.get(digest);
        let _g = lock.lock().await;
        if self.blob_path(digest).exists() {
            progress(PullEvent::Blob {
                digest: digest.into(),
                cached: true,
                resumed_from: 0,
            });
            return Ok(());
        }
        if size > max {
            return Err(ImageError::Limit(format!(
                "blob {digest} of {size} bytes exceeds the limit of {max}"
            )));
        }
        let partial = partial_path(&self.root, digest);
        let d = digest.to_string();
        // Progress at the start, the end, and every 1% (at least 1 MiB) in between.
        let step = (size / 100).max(1 << 20);
        let mut last: Option<u64> = None;
        let resumed = reg
            .fetch_blob(digest, size, &partial, |done| {
                if last.is_none_or(|l| done == size || done.saturating_sub(l) >= step) {
                    last = Some(done);
                    progress(PullEvent::Progress {
                        digest: d.clone(),
                        done,
                        total: size,
                    })
                }
            })
            .await?;
        self.adopt(&partial, digest)?;
        progress(PullEvent::Blob {
            digest: digest.into(),
            cached: false,
            resumed_from: resumed,
        });
        Ok(())
    }

    /// Pulls `reference` (linux/amd64 from multi-arch indexes), verifying every blob, and builds
    /// its root filesystem. Blobs already in the store are not downloaded again; partial
    /// downloads left by an interrupted pull are resumed.
    pub async fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &mut (dyn FnMut(PullEvent) + Send),
    ) -> Result<Image, ImageError> {
        let r = Reference::parse(reference)?;
        let name = crate::normalize_ref(opts.name.as_deref().unwrap_or(&r.canonical()))?;
        let reg = Registry::new(r.clone(), opts.insecure, opts.creds.clone(), false)?;
        let (mut body, mut media, mut digest) = reg.manifest(r.target()).await?;
        for _ in 0..3 {
            let is_index = INDEX_TYPES.contains(&media.as_str())
                || serde_json::from_slice::<serde_json::Value>(&body)
                    .is_ok_and(|v| v.get("manifests").is_some());
            if !is_index {
                break;
            }
            let idx: Index = serde_json::from_slice(&body)
                .map_err(|e| ImageError::BadArchive(format!("index: {e}")))?;
            let d = pick(&idx.manifests)?;
            (body, media, digest) = reg.manifest(&d.digest).await?;
        }
        let manifest: Manifest = serde_json::from_slice(&body)
            .map_err(|e| ImageError::BadArchive(format!("manifest {digest}: {e}")))?;
        if media.contains("distribution.manifest.v1") {
            return Err(ImageError::Unsupported("Docker schema 1 manifests".into()));
        }
        progress(PullEvent::Resolved {
            reference: r.canonical(),
            digest: digest.clone(),
            layers: manifest
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.size))
                .collect(),
        });
        self.fetch(
            &reg,
            &manifest.config.digest,
            manifest.config.size,
            8 << 20,
            progress,
        )
        .await?;
        for l in &manifest.layers {
            self.fetch(&reg, &l.digest, l.size, self.limits.max_bytes, progress)
                .await?;
        }
        // The manifest goes in last: a manifest in the store means its blobs are too.
        self.add_blob(body.as_slice(), Some(&digest))?;
        debug_assert!(body.len() as u64 <= MAX_MANIFEST);
        progress(PullEvent::Building);
        let found = Found {
            manifest_digest: digest,
            config_digest: manifest.config.digest,
            layers: manifest.layers.into_iter().map(|l| l.digest).collect(),
            name: None,
        };
        tokio::task::block_in_place(|| self.finish(found, name))
    }
}
