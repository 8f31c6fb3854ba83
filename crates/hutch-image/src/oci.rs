//! The OCI/Docker documents hutch reads (descriptors, image manifests, indexes), typed and
//! checked where they are parsed: every digest is a [`Digest`], sizes are unsigned and bounded,
//! and a descriptor whose media type is not one hutch knows for its place is refused before
//! anything is fetched or opened for it.

use crate::{Digest, ImageError, Limits};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Manifests, indexes and `index.json`/`manifest.json` files: at most this many bytes.
pub const MAX_JSON: u64 = 4 << 20;
/// Image configs: at most this many bytes.
pub const MAX_CONFIG: u64 = 8 << 20;
/// Layers one manifest may list.
pub const MAX_LAYERS: usize = 1000;

pub(crate) const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
pub(crate) const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
pub(crate) const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];
pub(crate) const LAYER_TYPES: [&str; 10] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

fn bad(m: impl Into<String>) -> ImageError {
    ImageError::BadArchive(m.into())
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

impl Descriptor {
    /// Refuses a descriptor whose media type is not in `types` or whose size exceeds `max`.
    pub fn check(&self, what: &str, types: &[&str], max: u64) -> Result<(), ImageError> {
        if !types.contains(&self.media_type.as_str()) {
            return Err(bad(format!(
                "{what} {} has unsupported media type {:?}",
                self.digest,
                self.media_type.chars().take(100).collect::<String>()
            )));
        }
        if self.size > max {
            return Err(ImageError::Limit(format!(
                "{what} {} is {} bytes, more than the limit of {max}",
                self.digest, self.size
            )));
        }
        Ok(())
    }
}

/// An image index (manifest list).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Manifest {
    /// Parses and checks a manifest: known media types for it, its config and each layer; the
    /// config within [`MAX_CONFIG`], each layer within the image's byte limit.
    pub fn parse(body: &[u8], limits: &Limits) -> Result<Manifest, ImageError> {
        let m: Manifest =
            serde_json::from_slice(body).map_err(|e| bad(format!("image manifest: {e}")))?;
        if let Some(t) = &m.media_type {
            if !MANIFEST_TYPES.contains(&t.as_str()) {
                return Err(bad(format!(
                    "unsupported manifest media type {:?}",
                    t.chars().take(100).collect::<String>()
                )));
            }
        }
        m.config.check("config", &CONFIG_TYPES, MAX_CONFIG)?;
        if m.layers.len() > MAX_LAYERS {
            return Err(ImageError::Limit(format!(
                "{} layers, more than {MAX_LAYERS}",
                m.layers.len()
            )));
        }
        let mut total: u64 = 0;
        for l in &m.layers {
            l.check("layer", &LAYER_TYPES, limits.max_bytes)?;
            total = total.saturating_add(l.size);
        }
        if total > limits.max_bytes {
            return Err(ImageError::Limit(format!(
                "layers of {total} bytes in all, more than the limit of {}",
                limits.max_bytes
            )));
        }
        Ok(m)
    }

    pub fn layer_digests(&self) -> Vec<Digest> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }
}

impl Index {
    pub fn parse(body: &[u8]) -> Result<Index, ImageError> {
        serde_json::from_slice(body).map_err(|e| bad(format!("image index: {e}")))
    }
}

/// Whether a document (by media type, or by shape when the type is missing) is an index.
pub(crate) fn is_index(media: &str, body: &[u8]) -> bool {
    if INDEX_TYPES.contains(&media) {
        return true;
    }
    if MANIFEST_TYPES.contains(&media) {
        return false;
    }
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        manifests: Option<serde::de::IgnoredAny>,
        #[serde(default, rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(body).is_ok_and(|p| {
        p.manifests.is_some()
            || p.media_type
                .is_some_and(|t| INDEX_TYPES.contains(&t.as_str()))
    })
}

/// The linux/amd64 entry of an index (or the one without a platform); entries of unknown media
/// types are never chosen.
pub(crate) fn pick(ds: &[Descriptor]) -> Result<&Descriptor, ImageError> {
    let known = |d: &&Descriptor| {
        MANIFEST_TYPES.contains(&d.media_type.as_str())
            || INDEX_TYPES.contains(&d.media_type.as_str())
    };
    let usable: Vec<&Descriptor> = ds.iter().filter(known).collect();
    if usable.is_empty() {
        return Err(bad("index lists no manifest of a supported media type"));
    }
    if let Some(d) = usable.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.architecture == "amd64" && p.os == "linux")
    }) {
        return Ok(d);
    }
    if let Some(d) = usable.iter().find(|d| d.platform.is_none()) {
        return Ok(d);
    }
    let have: Vec<String> = usable
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
    use proptest::prelude::*;

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn manifest(layer_digest: &str, layer_type: &str, size: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":10}},
            "layers":[{{"mediaType":"{layer_type}","digest":"{layer_digest}","size":{size}}}]}}"#,
            hex('a')
        )
    }

    #[test]
    fn manifests_are_checked_when_parsed() {
        let lim = Limits::default();
        let ok = format!("sha256:{}", hex('b'));
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        let m = Manifest::parse(manifest(&ok, gz, "100").as_bytes(), &lim).unwrap();
        assert_eq!(m.layer_digests()[0].as_str(), ok);
        for (d, t, s, want) in [
            ("sha256:../../../../tmp/x", gz, "1", "invalid digest"),
            (&format!("sha256:{}", hex('B')), gz, "1", "lowercase"),
            ("sha256:abc", gz, "1", "64 hex"),
            (ok.as_str(), gz, "-1", "invalid value"),
            (ok.as_str(), gz, "1e3", "invalid type"),
            (ok.as_str(), gz, "99999999999999999999999", ""),
            (ok.as_str(), "text/html", "1", "unsupported media type"),
            (ok.as_str(), gz, &(40u64 << 30).to_string(), "limit"),
        ] {
            let e = Manifest::parse(manifest(d, t, s).as_bytes(), &lim).unwrap_err();
            assert!(e.to_string().contains(want), "{d} {t} {s}: {e}");
        }
    }

    #[test]
    fn pick_skips_unknown_types() {
        let idx = format!(
            r#"{{"manifests":[
            {{"mediaType":"application/x-evil","digest":"sha256:{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            hex('1'),
            hex('2')
        );
        let i = Index::parse(idx.as_bytes()).unwrap();
        assert_eq!(pick(&i.manifests).unwrap().digest.hex(), hex('2'));
        assert!(is_index("", idx.as_bytes()));
        assert!(!is_index(
            "",
            manifest(&format!("sha256:{}", hex('b')), "x", "1").as_bytes()
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever JSON a registry sends, a manifest that parses has only valid digests, known
        /// media types and sizes within the limits.
        #[test]
        fn parsed_manifests_are_within_bounds(
            digest in prop_oneof![
                "sha256:[0-9a-f]{64}",
                "sha256:[0-9a-fA-F./]{0,70}",
                "[a-z0-9]{0,8}:[0-9a-f]{64}",
            ],
            media in prop::sample::select(vec![
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "application/octet-stream",
                "",
            ]),
            size in prop_oneof![Just("0".to_string()), Just("-5".to_string()), (0u64..u64::MAX).prop_map(|n| n.to_string())],
            layers in 0usize..4,
        ) {
            let lim = Limits { max_bytes: 1 << 20, ..Limits::default() };
            let l = format!(r#"{{"mediaType":"{media}","digest":"{digest}","size":{size}}}"#);
            let body = format!(
                r#"{{"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[{}]}}"#,
                hex('c'),
                vec![l; layers].join(",")
            );
            if let Ok(m) = Manifest::parse(body.as_bytes(), &lim) {
                for l in &m.layers {
                    prop_assert!(Digest::parse(l.digest.as_str()).is_ok());
                    prop_assert!(LAYER_TYPES.contains(&l.media_type.as_str()));
                    prop_assert!(l.size <= lim.max_bytes);
                }
            }
        }
    }
}
