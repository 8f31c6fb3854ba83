//! Commit (a VM's changes become a new layer on its image) and push (an image to a registry).
//!
//! The changeset tar comes from the guest, so it is untrusted: it is stored as a blob like any
//! other layer (written to a temp file of the store and renamed in through the store's
//! [`hutch_fs::Root`]), bounded by the image byte limit, and only ever applied by
//! [`crate::unpack`] when the root filesystem is built.

use crate::egress::{Egress, Timeouts};
use crate::registry::{sha256_file, Credentials, Reference, Registry};
use crate::{io_err, Digest, Found, ImageError, ImageStore};
use hutch_core::Image;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// RFC 3339 UTC time of a Unix timestamp (civil-from-days, no calendar crate needed).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl ImageStore {
    fn json_blob(&self, digest: &str) -> Result<Value, ImageError> {
        let digest = Digest::parse(digest)?;
        serde_json::from_slice(&self.read_blob(&digest, crate::oci::MAX_CONFIG)?)
            .map_err(|e| ImageError::BadArchive(format!("blob {digest}: {e}")))
    }

    /// Makes a new image `name` from `base` plus the changeset tar at `layer_tar`.
    pub fn commit_layer(
        &self,
        base: &Image,
        layer_tar: &Path,
        name: &str,
        comment: &str,
    ) -> Result<Image, ImageError> {
        let name = crate::normalize_ref(name)?;
        let diff_id = sha256_file(layer_tar).map_err(io_err("hashing layer"))?;
        let limit = self.limits.max_bytes.min(self.limits.max_layer_bytes);
        let raw_size = std::fs::metadata(layer_tar)
            .map_err(io_err("reading layer"))?
            .len();
        if raw_size > limit {
            return Err(ImageError::Limit(format!(
                "the changes are {raw_size} bytes, more than the limit of {limit}"
            )));
        }
        let gz = self.tmp_file()?;
        {
            let mut enc = flate2::write::GzEncoder::new(
                std::io::BufWriter::new(gz.as_file()),
                flate2::Compression::fast(),
            );
            std::io::copy(
                &mut std::fs::File::open(layer_tar).map_err(io_err("reading layer"))?,
                &mut enc,
            )
            .map_err(io_err("compressing layer"))?;
            enc.finish()
                .map_err(io_err("compressing layer"))?
                .flush()
                .map_err(io_err("compressing layer"))?;
        }
        let layer_size = gz.as_file().metadata().map_err(io_err("layer"))?.len();
        let layer_digest = self.add_blob(
            std::fs::File::open(gz.path()).map_err(io_err("layer"))?,
            None,
            Some(layer_size),
            limit,
        )?;

        let mut manifest = self.json_blob(&base.digest)?;
        let docker = manifest["mediaType"] == DOCKER_MANIFEST;
        let mut config = self.json_blob(&base.config_digest)?;
        let now = rfc3339(hutch_core::now());
        if !config["rootfs"]["diff_ids"].is_array() {
            config["rootfs"] = json!({"type": "layers", "diff_ids": []});
        }
        if let Some(ids) = config["rootfs"]["diff_ids"].as_array_mut() {
            ids.push(json!(diff_id));
        }
        if !config["history"].is_array() {
            config["history"] = json!([]);
        }
        if let Some(h) = config["history"].as_array_mut() {
            h.push(json!({"created": now, "created_by": "hutch commit", "comment": comment}));
        }
        config["created"] = json!(now);
        let cfg_bytes =
            serde_json::to_vec(&config).map_err(|e| ImageError::BadArchive(e.to_string()))?;
        let cfg_digest = self.add_blob(cfg_bytes.as_slice(), None, None, crate::oci::MAX_CONFIG)?;
        manifest["config"]["digest"] = json!(cfg_digest);
        manifest["config"]["size"] = json!(cfg_bytes.len());
        if manifest["config"]["mediaType"].is_null() {
            manifest["config"]["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
        }
        if manifest["mediaType"].is_null() {
            manifest["mediaType"] = json!(OCI_MANIFEST);
        }
        let layer_type = if docker {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        };
        if let Some(ls) = manifest["layers"].as_array_mut() {
            ls.push(json!({"mediaType": layer_type, "digest": layer_digest, "size": layer_size}));
        }
        let m_bytes =
            serde_json::to_vec(&manifest).map_err(|e| ImageError::BadArchive(e.to_string()))?;
        let m_digest = self.add_blob(m_bytes.as_slice(), None, None, crate::oci::MAX_JSON)?;
        let mut layers = base
            .layers
            .iter()
            .map(|l| Digest::parse(l))
            .collect::<Result<Vec<_>, _>>()?;
        layers.push(layer_digest);
        self.finish(
            Found {
                manifest_digest: m_digest,
                config_digest: cfg_digest,
                layers,
                name: None,
            },
            name,
        )
    }

    /// Pushes `image` to `reference` (blobs the registry has are skipped, the manifest last),
    /// to any destination the host can reach (the admin's view; see [`ImageStore::push_with`]).
    pub async fn push(
        &self,
        image: &Image,
        reference: &str,
        insecure: bool,
        creds: Option<Credentials>,
    ) -> Result<String, ImageError> {
        self.push_with(
            image,
            reference,
            insecure,
            creds,
            Egress::OPEN,
            Timeouts::default(),
        )
        .await
    }

    /// [`ImageStore::push`] keeping to an egress policy and timeouts.
    pub async fn push_with(
        &self,
        image: &Image,
        reference: &str,
        insecure: bool,
        creds: Option<Credentials>,
        egress: Egress,
        timeouts: Timeouts,
    ) -> Result<String, ImageError> {
        let r = Reference::parse(reference)?;
        if r.digest.is_some() {
            return Err(ImageError::Registry("push to a tag, not a digest".into()));
        }
        let reg = Registry::with_policy(r.clone(), insecure, creds, true, egress, timeouts)?;
        let config = Digest::parse(&image.config_digest)?;
        reg.push_blob(&config, &self.blob_path(&config)).await?;
        for l in &image.layers {
            let l = Digest::parse(l)?;
            reg.push_blob(&l, &self.blob_path(&l)).await?;
        }
        let digest = Digest::parse(&image.digest)?;
        let body = self.read_blob(&digest, crate::registry::MAX_MANIFEST)?;
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| ImageError::BadArchive(e.to_string()))?;
        let media = v["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_string();
        reg.put_manifest(r.target(), &body, &media).await?;
        Ok(r.canonical())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_521_600), "2026-11-24T12:00:00Z");
    }
}
