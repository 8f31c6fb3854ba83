//! A client for OCI distribution-spec registries (Docker Hub, GHCR, Debian's docker-registry, ...):
//! references, credentials, Basic and Bearer-token auth, manifests and blobs, push.
//!
//! Everything fetched is bounded and verified: manifests and token answers have size limits
//! enforced while they stream, blobs are checked against their digest and descriptor size
//! before they enter the store. Blob downloads resume from a partial file with an HTTP Range
//! request whose answer must carry the matching `Content-Range`. Every connection keeps to the
//! client's [`Egress`] policy and [`Timeouts`] (see [`crate::egress`]).

pub use crate::challenge::{docker_config_credentials, parse_challenge, Challenge, Credentials};
use crate::egress::{Egress, Timeouts};
use crate::{Digest, ImageError};
use base64::Engine;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use std::path::Path;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

pub const MAX_MANIFEST: u64 = crate::oci::MAX_JSON;
/// A token service's answer: at most this many bytes.
pub const MAX_TOKEN: u64 = 1 << 20;

/// A parsed image reference: `alpine` = `docker.io/library/alpine:latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

fn bad_ref(s: &str, why: &str) -> ImageError {
    ImageError::Registry(format!("invalid image reference {s:?}: {why}"))
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let d = Digest::parse(d).map_err(|e| bad_ref(s, &e.to_string()))?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (first, remainder) = match rest.split_once('/') {
            Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => (Some(f), r),
            _ => (None, rest),
        };
        let registry = first.unwrap_or("docker.io").to_string();
        let (repo, tag) = match remainder.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), Some(t.to_string())),
            _ => (remainder.to_string(), None),
        };
        let repository = if registry == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        let ok_repo = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !ok_repo {
            return Err(bad_ref(
                s,
                "repository must be lowercase letters, digits, '.', '_', '-' and '/'",
            ));
        }
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad_ref(s, "bad tag"));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".into())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository:tag` or `registry/repository@digest`.
    pub fn canonical(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}/{}@{d}", self.registry, self.repository),
            (None, Some(t)) => format!("{}/{}:{t}", self.registry, self.repository),
            (None, None) => format!("{}/{}", self.registry, self.repository),
        }
    }

    /// What to ask the registry for: the digest if given, else the tag.
    pub fn target(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    fn host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

/// Whether a registry address (`HOST`, `HOST:PORT`, `[IPV6]:PORT`) is this machine's loopback
/// by its spelling alone: `localhost`, an IPv4 address in 127.0.0.0/8, or `[::1]` (and its
/// IPv4-mapped form of 127.0.0.0/8). Names are not resolved: `registry.example` that happens
/// to resolve to 127.0.0.1 is not loopback here.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        },
        None => registry.split(':').next().unwrap_or(registry),
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if registry.starts_with('[') {
        return host.parse::<std::net::Ipv6Addr>().is_ok_and(|a| {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        });
    }
    host.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|a| a.is_loopback())
}

/// Whether hutch speaks plain HTTP to `registry`: when asked to (`--insecure`), and always to a
/// loopback registry ([`is_loopback_registry`]), as Docker allows without configuration. Every
/// other registry is HTTPS only. Loopback goes straight to HTTP, without trying HTTPS first:
/// hutch trusts only the public web PKI (webpki roots), which issues no certificate for
/// `localhost` or `127.0.0.1`, so an HTTPS attempt there could never verify.
pub fn plain_http(registry: &str, insecure: bool) -> bool {
    insecure || is_loopback_registry(registry)
}

/// One registry connection for one repository.
pub struct Registry {
    http: reqwest::Client,
    base: String,
    pub reference: Reference,
    creds: Option<Credentials>,
    auth: tokio::sync::Mutex<Option<String>>,
    push: bool,
    egress: Egress,
    timeouts: Timeouts,
}

fn reg_err(m: impl std::fmt::Display) -> ImageError {
    ImageError::Registry(m.to_string())
}

pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

impl Registry {
    /// `insecure` asks for plain HTTP (loopback registries get it anyway: [`plain_http`]).
    /// Any destination the host can reach is allowed (the admin's view); see
    /// [`Registry::with_policy`].
    pub fn new(
        reference: Reference,
        insecure: bool,
        creds: Option<Credentials>,
        push: bool,
    ) -> Result<Registry, ImageError> {
        Self::with_policy(
            reference,
            insecure,
            creds,
            push,
            Egress::OPEN,
            Timeouts::default(),
        )
    }

    /// A client that connects only where `egress` allows, within `timeouts`.
    pub fn with_policy(
        reference: Reference,
        insecure: bool,
        creds: Option<Credentials>,
        push: bool,
        egress: Egress,
        timeouts: Timeouts,
    ) -> Result<Registry, ImageError> {
        let http = crate::egress::client(egress.clone(), timeouts)?;
        let scheme = if plain_http(&reference.registry, insecure) {
            "http"
        } else {
            "https"
        };
        let base = format!(
            "{scheme}://{}/v2/{}",
            reference.host(),
            reference.repository
        );
        let url = reqwest::Url::parse(&base)
            .map_err(|e| reg_err(format!("registry address {base}: {e}")))?;
        egress.check_url(&url)?;
        Ok(Registry {
            http,
            base,
            reference,
            creds,
            auth: tokio::sync::Mutex::new(None),
            push,
            egress,
            timeouts,
        })
    }

    fn host(&self) -> &str {
        self.reference.host()
    }

    /// Sends a request built by `build`, authenticating and retrying once on a 401.
    async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ImageError> {
        for attempt in 0..2 {
            let mut rb = build(&self.http);
            if let Some(a) = self.auth.lock().await.clone() {
                rb = rb.header(reqwest::header::AUTHORIZATION, a);
            }
            let resp = rb.send().await.map_err(|e| {
                let mut m = format!("cannot reach registry {}: {}", self.host(), chain(&e));
                if m.contains("InvalidContentType") || m.contains("corrupt message") {
                    m.push_str(" (is it a plain-HTTP registry? use --insecure)");
                }
                reg_err(m)
            })?;
            if resp.status() != reqwest::StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            let header = match challenge {
                Some(Challenge::Basic) => {
                    let c = self.creds.as_ref().ok_or_else(|| {
                        reg_err(format!("registry {} requires credentials (use --creds USER:PASS or docker login)", self.host()))
                    })?;
                    let raw = format!("{}:{}", c.username, c.password);
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(raw)
                    )
                }
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope,
                }) => self.token(&realm, service, scope).await?,
                None => return Ok(resp),
            };
            *self.auth.lock().await = Some(header);
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn token(
        &self,
        realm: &str,
        service: Option<String>,
        scope: Option<String>,
    ) -> Result<String, ImageError> {
        let action = if self.push { "pull,push" } else { "pull" };
        let scope =
            scope.unwrap_or_else(|| format!("repository:{}:{action}", self.reference.repository));
        let mut q = vec![("scope", scope)];
        if let Some(s) = service {
            q.push(("service", s));
        }
        let url = reqwest::Url::parse(realm)
            .map_err(|e| reg_err(format!("token service {realm:?}: {e}")))?;
        self.egress.check_url(&url)?;
        let mut rb = self.http.get(url).query(&q).timeout(self.timeouts.document);
        if let Some(c) = &self.creds {
            rb = rb.basic_auth(&c.username, Some(&c.password));
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| reg_err(format!("token service {realm}: {}", chain(&e))))?;
        if !resp.status().is_success() {
            return Err(reg_err(format!(
                "token service {realm} refused: {}",
                resp.status()
            )));
        }
        let body = read_capped(resp, MAX_TOKEN, "token service answer").await?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| reg_err(format!("token service {realm}: {e}")))?;
        let t = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .ok_or_else(|| reg_err("token service gave no token"))?;
        Ok(format!("Bearer {t}"))
    }

    fn status_error(&self, what: &str, status: reqwest::StatusCode) -> ImageError {
        let r = self.reference.canonical();
        match status.as_u16() {
            401 => reg_err(format!("{what} of {r}: authentication failed (401)")),
            403 => reg_err(format!("{what} of {r}: access denied (403)")),
            404 => reg_err(format!("{what} of {r}: not found (404)")),
            s => reg_err(format!("{what} of {r}: registry answered {s}")),
        }
    }

    /// Fetches a manifest or index by tag or digest: (bytes, media type, digest).
    pub async fn manifest(&self, target: &str) -> Result<(Vec<u8>, String, Digest), ImageError> {
        let want = if target.starts_with("sha256:") {
            Some(Digest::parse(target)?)
        } else {
            None
        };
        let url = format!("{}/manifests/{target}", self.base);
        let resp = self
            .send(|c| {
                c.get(&url)
                    .header(reqwest::header::ACCEPT, MANIFEST_TYPES)
                    .timeout(self.timeouts.document)
            })
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error("manifest", resp.status()));
        }
        let media = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .to_string();
        let body = read_capped(
            resp,
            MAX_MANIFEST,
            &format!("manifest of {}", self.reference.canonical()),
        )
        .await?;
        let digest = Digest::of(&body);
        if let Some(want) = want {
            if want != digest {
                return Err(ImageError::DigestMismatch {
                    digest: want.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        Ok((body, media, digest))
    }

    /// Downloads blob `digest` of `size` bytes into `file` (a partial download: what it holds
    /// is resumed with a Range request) and verifies it; `progress(done)` is called as bytes
    /// arrive. Returns the offset resumed from. A transfer cut off midway is
    /// [`ImageError::Interrupted`] (the partial file is worth keeping); any other error means
    /// its content is useless.
    pub async fn fetch_blob(
        &self,
        digest: &Digest,
        size: u64,
        file: std::fs::File,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ImageError> {
        let reader = file
            .try_clone()
            .map_err(crate::io_err("partial download"))?;
        let mut f = tokio::fs::File::from_std(file);
        let io = |what: &'static str| crate::io_err(format!("{what} of blob {digest}"));
        let mut have = f.metadata().await.map_err(io("partial download"))?.len();
        if have > size {
            f.set_len(0)
                .await
                .map_err(io("truncating partial download"))?;
            have = 0;
        }
        let url = format!("{}/blobs/{digest}", self.base);
        let mut resumed = 0;
        // Hashed as it arrives; when nothing is left to fetch, what is on disk is hashed.
        let hasher = if have < size {
            let resp = self
                .send(|c| {
                    let rb = c.get(&url);
                    if have > 0 {
                        rb.header(reqwest::header::RANGE, format!("bytes={have}-"))
                    } else {
                        rb
                    }
                })
                .await?;
            let status = resp.status();
            if !status.is_success() {
                return Err(self.status_error(&format!("blob {digest}"), status));
            }
            let append = match status.as_u16() {
                200 => false,
                206 if have > 0 => {
                    let cr = resp
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if !content_range_ok(cr, have, size) {
                        return Err(reg_err(format!(
                            "blob {digest}: asked for bytes {have}- of {size}, \
                             the registry answered Content-Range {:?}",
                            cr.chars().take(100).collect::<String>()
                        )));
                    }
                    true
                }
                s => {
                    return Err(reg_err(format!(
                        "blob {digest}: unexpected answer {s} from the registry"
                    )))
                }
            };
            let start = if append { have } else { 0 };
            if let Some(l) = resp.content_length() {
                if start.checked_add(l) != Some(size) {
                    return Err(reg_err(format!(
                        "blob {digest}: the registry announces {l} bytes from offset {start}, \
                         its descriptor says {size} in all"
                    )));
                }
            }
            let mut h = if append {
                hash_prefix(reader, have).await?
            } else {
                Sha256::new()
            };
            f.set_len(start).await.map_err(io("writing"))?;
            f.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(io("writing"))?;
            let mut done = start;
            resumed = start;
            progress(done);
            let mut s = resp.bytes_stream();
            while let Some(chunk) = s.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        f.flush().await.map_err(io("writing"))?;
                        return Err(ImageError::Interrupted(format!(
                            "downloading {digest}: {}",
                            chain(&e)
                        )));
                    }
                };
                done += chunk.len() as u64;
                if done > size {
                    return Err(reg_err(format!(
                        "blob {digest} is larger than its descriptor says ({size} bytes)"
                    )));
                }
                f.write_all(&chunk).await.map_err(io("writing"))?;
                sha2::Digest::update(&mut h, &chunk);
                progress(done);
            }
            f.flush().await.map_err(io("writing"))?;
            if done < size {
                return Err(reg_err(format!(
                    "blob {digest} ended after {done} of {size} bytes"
                )));
            }
            h
        } else {
            drop(f);
            hash_prefix(reader, size).await?
        };
        let actual = Digest::from_hasher(sha2::Digest::finalize(hasher).into());
        if actual != *digest {
            return Err(ImageError::DigestMismatch {
                digest: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(resumed)
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, ImageError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let r = self.send(|c| c.head(&url)).await?;
        match r.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.status_error("blob check", r.status())),
        }
    }

    /// Uploads a blob (monolithic: POST for a session, PUT with the digest).
    pub async fn push_blob(&self, digest: &Digest, path: &Path) -> Result<(), ImageError> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        let url = format!("{}/blobs/uploads/", self.base);
        let r = self
            .send(|c| c.post(&url).header(reqwest::header::CONTENT_LENGTH, 0))
            .await?;
        if r.status().as_u16() != 202 {
            return Err(self.status_error("blob upload", r.status()));
        }
        let loc = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| reg_err("upload session without Location"))?
            .to_string();
        let loc = if loc.starts_with('/') {
            let scheme = if self.base.starts_with("http://") {
                "http"
            } else {
                "https"
            };
            format!("{scheme}://{}{loc}", self.host())
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={digest}");
        let put_url =
            reqwest::Url::parse(&put).map_err(|e| reg_err(format!("upload location: {e}")))?;
        self.egress.check_url(&put_url)?;
        let data: bytes::Bytes = tokio::fs::read(path)
            .await
            .map_err(crate::io_err(format!("reading {}", path.display())))?
            .into();
        let r = self
            .send(|c| {
                c.put(&put)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(data.clone())
            })
            .await?;
        if r.status().as_u16() != 201 {
            return Err(self.status_error("blob upload", r.status()));
        }
        Ok(())
    }

    pub async fn put_manifest(
        &self,
        tag: &str,
        body: &[u8],
        media: &str,
    ) -> Result<(), ImageError> {
        let url = format!("{}/manifests/{tag}", self.base);
        let body = bytes::Bytes::copy_from_slice(body);
        let r = self
            .send(|c| {
                c.put(&url)
                    .header(reqwest::header::CONTENT_TYPE, media)
                    .body(body.clone())
            })
            .await?;
        if r.status().as_u16() != 201 {
            return Err(self.status_error("manifest upload", r.status()));
        }
        Ok(())
    }
}

/// The hash state after the first `len` bytes of `f` (the part of a download already on disk).
async fn hash_prefix(f: std::fs::File, len: u64) -> Result<Sha256, ImageError> {
    tokio::task::spawn_blocking(move || -> std::io::Result<Sha256> {
        use std::os::unix::fs::FileExt;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < len {
            let want = buf.len().min((len - off) as usize);
            let n = f.read_at(&mut buf[..want], off)?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            sha2::Digest::update(&mut h, &buf[..n]);
            off += n as u64;
        }
        Ok(h)
    })
    .await
    .map_err(reg_err)?
    .map_err(crate::io_err("hashing blob"))
}

/// Whether `Content-Range` says the answer holds bytes `from`..`size` of a `size`-byte blob.
fn content_range_ok(h: &str, from: u64, size: u64) -> bool {
    let Some(rest) = h.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((a, b)) = range.split_once('-') else {
        return false;
    };
    let total_ok = total == "*" || total.parse::<u64>().ok() == Some(size);
    a.parse::<u64>().ok() == Some(from) && b.parse::<u64>().ok() == Some(size - 1) && total_ok
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut m = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        m.push_str(&format!(": {s}"));
        src = s.source();
    }
    m
}

/// Reads a response body, failing as soon as it passes `max` bytes (announced or streamed).
async fn read_capped(resp: reqwest::Response, max: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let too_big = || reg_err(format!("{what} is larger than {max} bytes"));
    if resp.content_length().is_some_and(|l| l > max) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| reg_err(format!("reading {what}: {}", chain(&e))))?;
        if (body.len() + chunk.len()) as u64 > max {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub fn sha256_file(p: &Path) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut h, &buf[..n]);
    }
    Ok(Digest::from_hasher(sha2::Digest::finalize(h).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("alpine").unwrap();
        assert_eq!(r.canonical(), "docker.io/library/alpine:latest");
        assert_eq!(r.host(), "registry-1.docker.io");
        assert_eq!(
            Reference::parse("node:22-alpine").unwrap().canonical(),
            "docker.io/library/node:22-alpine"
        );
        assert_eq!(
            Reference::parse("user/app").unwrap().canonical(),
            "docker.io/user/app:latest"
        );
        let r = Reference::parse("localhost:5000/team/app:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "team/app", Some("1"))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/o/r@{d}")).unwrap();
        assert_eq!((r.tag, r.digest.as_deref()), (None, Some(d.as_str())));
        for bad in ["", "UPPER/x", "a@sha256:zz", "a:b c", "a//b"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_registries_speak_plain_http() {
        for r in [
            "localhost",
            "localhost:5000",
            "LocalHost:5000",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.8.9.10:80",
            "[::1]",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert!(is_loopback_registry(r), "{r}");
            assert!(plain_http(r, false), "{r}");
        }
        // Everything else needs --insecure for plain HTTP: private and public addresses,
        // names that merely start or end like loopback ones, malformed forms.
        for r in [
            "docker.io",
            "ghcr.io",
            "10.0.0.5:5000",
            "192.168.1.2",
            "0.0.0.0:5000",
            "128.0.0.1:5000",
            "localhost.example.com:5000",
            "my-localhost:5000",
            "127.0.0.1.nip.io:5000",
            "127.1:5000",
            "[::2]:5000",
            "[::1]x",
            "[::1",
            "::1",
        ] {
            assert!(!is_loopback_registry(r), "{r}");
            assert!(!plain_http(r, false), "{r}");
            assert!(plain_http(r, true), "{r}");
        }
        // The reference's registry is what is judged (`alpine` is Docker Hub).
        let r = Reference::parse("127.0.0.1:5000/team/app:1").unwrap();
        assert!(plain_http(&r.registry, false));
        let r = Reference::parse("alpine").unwrap();
        assert!(!plain_http(&r.registry, false));
    }

    #[test]
    fn content_ranges() {
        assert!(content_range_ok("bytes 10-99/100", 10, 100));
        assert!(content_range_ok("bytes 10-99/*", 10, 100));
        for bad in [
            "bytes 0-99/100",
            "bytes 10-98/100",
            "bytes 10-99/101",
            "bytes */100",
            "10-99/100",
            "",
            "bytes 10-99",
        ] {
            assert!(!content_range_ok(bad, 10, 100), "{bad}");
        }
    }
}
