//! Image operations of the service: pull, push, commit (a VM's changes as a new image) and
//! garbage collection, with the caller's namespace and registry egress policy applied.

use super::Service;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::node::internal;
use hutch_core::Image;
use std::time::Duration;

impl Service {
    /// Makes a new image from a running VM's changes since boot (a consistent snapshot: the
    /// guest's writable filesystem is frozen while it is read).
    pub async fn commit(
        &self,
        caller: &Caller,
        name: &str,
        reference: &str,
        comment: &str,
    ) -> Result<Image, ApiError> {
        hutch_image::normalize_ref(reference).map_err(|e| ApiError::Invalid(e.to_string()))?;
        let _ops = self.image_ops.read().await;
        let vm = self.vm_for(caller, name).await?;
        let client = self.node.client(&vm)?;
        let base = self.image_of(&vm).await?.ok_or_else(|| {
            ApiError::Conflict(format!("the image of {name} is no longer in the store"))
        })?;
        let tmp = self.images.tmp_dir()?;
        let tar = tmp.path().join("layer.tar");
        let mut f = tokio::fs::File::create(&tar).await.map_err(internal)?;
        // A guest cannot make the layer bigger than its disk (plus tar headers).
        let max = (vm.disk_gib.max(1) << 30).saturating_mul(2);
        self.export_changes(name, &client, &mut f, max).await?;
        drop(f);
        let reference = reference.to_string();
        let comment = comment.to_string();
        let img = tokio::task::block_in_place(|| {
            self.images.commit_layer(&base, &tar, &reference, &comment)
        })?;
        crate::crash::point("commit.built");
        let img = self.store_image(caller.owner(), img).await?;
        tracing::info!(vm = name, image = %img.key(), digest = %img.digest, "committed");
        Ok(img)
    }

    /// Imports the OCI layout or archive at `path` on hutchd's host: for the admin only (an
    /// account must not make hutchd read the host's files).
    pub async fn import_host_path(
        &self,
        caller: &Caller,
        path: &std::path::Path,
        name: Option<String>,
    ) -> Result<Image, ApiError> {
        super::admin_only(caller, "importing from a path on hutchd's host")?;
        if !path.exists() {
            return Err(ApiError::Invalid(format!(
                "{} does not exist on the daemon's host",
                path.display()
            )));
        }
        self.import(caller, path, name).await
    }

    /// Imports an archive hutchd holds (an upload) into `caller`'s namespace.
    pub async fn import(
        &self,
        caller: &Caller,
        path: &std::path::Path,
        name: Option<String>,
    ) -> Result<Image, ApiError> {
        let _ops = self.image_ops.read().await;
        crate::crash::point("import.uploaded");
        let (images, p) = (self.images.clone(), path.to_path_buf());
        let img = tokio::task::spawn_blocking(move || images.import(&p, name.as_deref()))
            .await
            .map_err(internal)??;
        crate::crash::point("import.built");
        let img = self.store_image(caller.owner(), img).await?;
        tracing::info!(image = %img.key(), digest = %img.digest, "imported image");
        Ok(img)
    }

    /// Removes blobs and root filesystems no image or VM uses (admins).
    pub async fn gc(&self, caller: &Caller) -> Result<hutch_image::GcStats, ApiError> {
        super::admin_only(caller, "/api/v1/images/gc")?;
        // Pulls, imports and commits in progress finish first; gc waits for them a bounded
        // time and then gives up rather than queueing every later pull behind it.
        let _ops = tokio::time::timeout(Duration::from_secs(60), self.image_ops.write())
            .await
            .map_err(|_| {
                ApiError::Conflict(
                    "image operations are in progress; try garbage collection again later".into(),
                )
            })?;
        let mut keep = std::collections::HashSet::new();
        for i in self.records.images().await? {
            keep.insert(i.digest);
            keep.insert(i.config_digest);
            keep.extend(i.layers);
        }
        for v in self.list().await? {
            keep.insert(v.image_digest);
            keep.extend(v.image_config_digest);
            keep.extend(v.image_layers);
        }
        let st = tokio::task::block_in_place(|| self.images.gc(&keep))?;
        tracing::info!(?st, "garbage collection");
        Ok(st)
    }

    /// Pushes a stored image to `reference` (default: its own name).
    pub async fn push(
        &self,
        caller: &Caller,
        image: &str,
        reference: Option<&str>,
        insecure: bool,
        creds: Option<hutch_image::registry::Credentials>,
    ) -> Result<String, ApiError> {
        let img = self.image_for(caller, image).await?;
        let target = reference.unwrap_or(&img.name).to_string();
        // Accounts push to public addresses only, unless the admin allowed private ones.
        let egress = hutch_image::Egress {
            allow_private: caller.admin || self.cfg().registry_allow_private,
            allow_addrs: Vec::new(),
        };
        Ok(self
            .images
            .push_with(
                &img,
                &target,
                insecure,
                creds,
                egress,
                hutch_image::Timeouts::default(),
            )
            .await?)
    }

    /// Pulls an image (one pull per reference at a time) and records it.
    pub async fn pull(
        &self,
        caller: &Caller,
        reference: &str,
        opts: hutch_image::PullOptions,
        progress: &mut (dyn FnMut(hutch_image::PullEvent) + Send),
    ) -> Result<Image, ApiError> {
        let r = hutch_image::registry::Reference::parse(reference)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        let owner = caller.owner();
        let lock = self.lock_for(&format!(
            "pull:{}",
            hutch_core::image_key(owner.as_deref(), &r.canonical())
        ));
        let _g = lock.lock().await;
        let _ops = self.image_ops.read().await;
        // Bytes fetched, for the metrics: the last progress of each blob, less where a resumed
        // download started.
        let mut fetched: std::collections::HashMap<String, u64> = Default::default();
        let mut counting = |e: hutch_image::PullEvent| {
            match &e {
                hutch_image::PullEvent::Progress { digest, done, .. } => {
                    fetched.insert(digest.clone(), *done);
                }
                hutch_image::PullEvent::Blob {
                    digest,
                    cached: true,
                    ..
                } => {
                    fetched.remove(digest);
                }
                hutch_image::PullEvent::Blob {
                    digest,
                    resumed_from,
                    ..
                } => {
                    if let Some(d) = fetched.get_mut(digest) {
                        *d = d.saturating_sub(*resumed_from);
                    }
                }
                _ => {}
            }
            progress(e)
        };
        let pulled = self.images.pull(reference, &opts, &mut counting).await;
        self.metrics.pull_bytes.fetch_add(
            fetched.values().sum::<u64>(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let img = pulled?;
        crate::crash::point("pull.fetched");
        let img = self.store_image(owner, img).await?;
        tracing::info!(image = %img.key(), digest = %img.digest, "pulled image");
        Ok(img)
    }
}
