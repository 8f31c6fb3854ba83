//! A client for OCI distribution-spec registries (Docker Hub, GHCR, Debian's docker-registry, ...):
//! references, credentials, Basic and Bearer-token auth, manifests and blobs, push.
//!
//! Everything fetched is bounded and verified: manifests and configs have size limits, blobs are
//! checked against their digest and descriptor size before they enter the store. Blob downloads
//! resume from a partial file with an HTTP Range request.

use crate::ImageError;
use base64::Engine;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

pub const MAX_MANIFEST: u64 = 4 << 20;

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
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad_ref(s, "only sha256 digests"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad_ref(s, "malformed digest"));
                }
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

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

/// Credentials for `registry` from a docker config file (`~/.docker/config.json` format).
pub fn docker_config_credentials(registry: &str, config: &Path) -> Option<Credentials> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(config).ok()?).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let keys: Vec<String> = if registry == "docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ]
    } else {
        vec![
            registry.into(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
    };
    let entry = keys.iter().find_map(|k| auths.get(k))?;
    if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
        let dec = base64::engine::general_purpose::STANDARD.decode(a).ok()?;
        let (u, p) = std::str::from_utf8(&dec).ok()?.split_once(':')?;
        return Some(Credentials {
            username: u.into(),
            password: p.into(),
        });
    }
    Some(Credentials {
        username: entry.get("username")?.as_str()?.into(),
        password: entry.get("password")?.as_str()?.into(),
    })
}

/// A challenge from `WWW-Authenticate`.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, params) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let (mut service, mut scope) = (None, None);
    // key="value" pairs; values may contain commas (scopes), so split on `",`.
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (v, next) = if let Some(stripped) = after.strip_prefix('"') {
            let end = stripped.find('"')?;
            (
                &stripped[..end],
                stripped[end + 1..].trim_start_matches(',').trim_start(),
            )
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (
                &after[..end],
                after[end..].trim_start_matches(',').trim_start(),
            )
        };
        match k.trim() {
            "realm" => realm = Some(v.to_string()),
            "service" => service = Some(v.to_string()),
            "scope" => scope = Some(v.to_string()),
            _ => {}
        }
        rest = next;
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
        scope,
    })
}

/// One registry connection for one repository.
pub struct Registry {
    http: reqwest::Client,
    base: String,
    pub reference: Reference,
    creds: Option<Credentials>,
    auth: tokio::sync::Mutex<Option<String>>,
    push: bool,
}

fn reg_err(m: impl std::fmt::Display) -> ImageError {
    ImageError::Registry(m.to_string())
}

pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

impl Registry {
    /// `insecure` allows plain HTTP (only when asked for).
    pub fn new(
        reference: Reference,
        insecure: bool,
        creds: Option<Credentials>,
        push: bool,
    ) -> Result<Registry, ImageError> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(15))
            .user_agent(concat!("hutch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(reg_err)?;
        let scheme = if insecure { "http" } else { "https" };
        let base = format!(
            "{scheme}://{}/v2/{}",
            reference.host(),
            reference.repository
        );
        Ok(Registry {
            http,
            base,
            reference,
            creds,
            auth: tokio::sync::Mutex::new(None),
            push,
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
                let mut m = format!("cannot reach registry {}: {e}", self.host());
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    m.push_str(&format!(": {s}"));
                    src = s.source();
                }
                if m.contains("InvalidContentType") || m.contains("corrupt message") {
                    m.push_str(" (is it a plain-HTTP registry? pull with --insecure)");
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
        let mut rb = self.http.get(realm).query(&q);
        if let Some(c) = &self.creds {
            rb = rb.basic_auth(&c.username, Some(&c.password));
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| reg_err(format!("token service {realm}: {e}")))?;
        if !resp.status().is_success() {
            return Err(reg_err(format!(
                "token service {realm} refused: {}",
                resp.status()
            )));
        }
        let v: serde_json::Value = resp
            .json()
            .await
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
    pub async fn manifest(&self, target: &str) -> Result<(Vec<u8>, String, String), ImageError> {
        let url = format!("{}/manifests/{target}", self.base);
        let resp = self
            .send(|c| c.get(&url).header(reqwest::header::ACCEPT, MANIFEST_TYPES))
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
        if resp.content_length().is_some_and(|l| l > MAX_MANIFEST) {
            return Err(reg_err(format!(
                "manifest of {} is larger than {MAX_MANIFEST} bytes",
                self.reference.canonical()
            )));
        }
        let mut body = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            body.extend_from_slice(&chunk.map_err(reg_err)?);
            if body.len() as u64 > MAX_MANIFEST {
                return Err(reg_err(format!(
                    "manifest of {} is larger than {MAX_MANIFEST} bytes",
                    self.reference.canonical()
                )));
            }
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if target.starts_with("sha256:") && target != digest {
            return Err(ImageError::DigestMismatch {
                digest: target.into(),
                actual: digest,
            });
        }
        Ok((body, media, digest))
    }

    /// Downloads blob `digest` of `size` bytes into `partial` (resuming what is there) and
    /// verifies it; `progress(done)` is called as bytes arrive. Returns the offset resumed from.
    pub async fn fetch_blob(
        &self,
        digest: &str,
        size: u64,
        partial: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ImageError> {
        let have = tokio::fs::metadata(partial)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let have = if have > size { 0 } else { have };
        let url = format!("{}/blobs/{digest}", self.base);
        let mut resumed = 0;
        // Hashed as it arrives; None: nothing was fetched, hash what is on disk.
        let mut hasher: Option<Sha256> = None;
        if have < size {
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
            let append = status == reqwest::StatusCode::PARTIAL_CONTENT;
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(partial)
                .await
                .map_err(crate::io_err(format!("writing {}", partial.display())))?;
            let mut done = if append { have } else { 0 };
            resumed = if append { have } else { 0 };
            let mut h = if append {
                hash_prefix(partial, have).await?
            } else {
                Sha256::new()
            };
            progress(done);
            let mut s = resp.bytes_stream();
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| reg_err(format!("downloading {digest}: {e}")))?;
                done += chunk.len() as u64;
                if done > size {
                    return Err(reg_err(format!(
                        "blob {digest} is larger than its descriptor says ({size} bytes)"
                    )));
                }
                f.write_all(&chunk)
                    .await
                    .map_err(crate::io_err("writing blob"))?;
                h.update(&chunk);
                progress(done);
            }
            f.flush().await.map_err(crate::io_err("writing blob"))?;
            if done < size {
                return Err(reg_err(format!(
                    "blob {digest} ended after {done} of {size} bytes"
                )));
            }
            hasher = Some(h);
        }
        let actual = match hasher {
            Some(h) => format!("sha256:{}", hex::encode(h.finalize())),
            None => hash_prefix(partial, size)
                .await
                .map(|h| format!("sha256:{}", hex::encode(h.finalize())))?,
        };
        if actual != digest {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(ImageError::DigestMismatch {
                digest: digest.into(),
                actual,
            });
        }
        Ok(resumed)
    }

    pub async fn has_blob(&self, digest: &str) -> Result<bool, ImageError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let r = self.send(|c| c.head(&url)).await?;
        match r.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.status_error("blob check", r.status())),
        }
    }

    /// Uploads a blob (monolithic: POST for a session, PUT with the digest).
    pub async fn push_blob(&self, digest: &str, path: &Path) -> Result<(), ImageError> {
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

/// The hash state after the first `len` bytes of `p` (the part of a download already on disk).
async fn hash_prefix(p: &Path, len: u64) -> Result<Sha256, ImageError> {
    let p = p.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<Sha256> {
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?.take(len);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h);
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(reg_err)?
    .map_err(crate::io_err("hashing blob"))
}

pub fn sha256_file(p: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Where partial downloads live (kept across restarts, so pulls resume).
pub fn partial_path(root: &Path, digest: &str) -> PathBuf {
    root.join("partial")
        .join(digest.trim_start_matches("sha256:"))
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
    fn challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/node:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/node:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn docker_config() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw:with:colons");
        std::fs::write(&p, format!(r#"{{"auths":{{"localhost:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"u","password":"p"}}}}}}"#)).unwrap();
        let c = docker_config_credentials("localhost:5000", &p).unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("bob", "pw:with:colons")
        );
        assert_eq!(
            docker_config_credentials("docker.io", &p).unwrap().username,
            "u"
        );
        assert!(docker_config_credentials("ghcr.io", &p).is_none());
    }
}
