//! Pulling images from the CLI: `hutch image pull` with progress, registry credentials, and
//! `hutch new` pulling a missing image first, as `docker run` does (client-side: the create
//! says the image is not found, the CLI pulls it with progress and creates again).

use crate::client::*;
use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use hyper::Method;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::PathBuf;

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

/// Pulls with per-layer progress bars on a terminal, a line per layer otherwise (all on
/// stderr, so `--json` output stays clean); the pulled image.
pub(crate) async fn pull(c: &Client, req: &hutch_core::api::PullImage) -> Result<Value> {
    let body = serde_json::to_value(req)?;
    let r = c
        .send(
            Method::POST,
            "/api/v1/images/pull",
            "application/json",
            Bytes::from(body.to_string()),
        )
        .await?;
    let tty = std::io::stderr().is_terminal();
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bars: HashMap<String, indicatif::ProgressBar> = HashMap::new();
    // Without a terminal: the layers (not the config blob) get one line each when they are in.
    let mut layers: HashSet<String> = HashSet::new();
    ndjson(r, |ev| {
        let digest = ev["digest"].as_str().unwrap_or("").to_string();
        match ev["type"].as_str().unwrap_or("") {
            "resolved" => {
                let ls = ev["layers"].as_array().cloned().unwrap_or_default();
                if !tty {
                    let total: u64 = ls.iter().map(|l| l[1].as_u64().unwrap_or(0)).sum();
                    eprintln!(
                        "{}: {} layers, {:.1} MB",
                        ev["reference"].as_str().unwrap_or(""),
                        ls.len(),
                        total as f64 / 1e6
                    );
                }
                for l in ls {
                    let d = l[0].as_str().unwrap_or("").to_string();
                    if tty {
                        let b = multi.add(indicatif::ProgressBar::new(l[1].as_u64().unwrap_or(0)));
                        b.set_style(style.clone());
                        b.set_prefix(short(&d));
                        bars.insert(d, b);
                    } else {
                        layers.insert(d);
                    }
                }
            }
            "progress" => {
                if let Some(b) = bars.get(&digest) {
                    b.set_position(ev["done"].as_u64().unwrap_or(0));
                }
            }
            "blob" => {
                let msg = if ev["cached"] == true {
                    "already present".to_string()
                } else if ev["resumed_from"].as_u64().unwrap_or(0) > 0 {
                    format!("downloaded (resumed at {} bytes)", ev["resumed_from"])
                } else {
                    "downloaded".to_string()
                };
                if let Some(b) = bars.get(&digest) {
                    b.set_position(b.length().unwrap_or(0));
                    b.finish_with_message(msg);
                } else if layers.contains(&digest) {
                    eprintln!("{}: {msg}", short(&digest));
                }
            }
            "building" => {
                if tty {
                    let _ = multi.println("building root filesystem...");
                } else {
                    eprintln!("building root filesystem...");
                }
            }
            "done" => return Ok(Some(ev["image"].clone())),
            "error" => bail!("{}", ev["message"].as_str().unwrap_or("pull failed")),
            _ => {}
        }
        Ok(None)
    })
    .await
}

/// Whether `reference` names the registry it lives in (`HOST[:PORT]/REPO[:TAG|@DIGEST]`, HOST
/// with a `.` or `:`, or `localhost`), so that `hutch new` may pull it when it is missing. A
/// bare `busybox` or `team/app` is more likely a local image's name (or a typo) than a wish to
/// pull from Docker Hub.
pub(crate) fn names_registry(reference: &str) -> bool {
    let Some((first, _)) = reference.split_once('/') else {
        return false;
    };
    (first.contains('.') || first.contains(':') || first == "localhost")
        && hutch_image::registry::Reference::parse(reference).is_ok()
}

/// Whether `e` is the API saying that the image of a create does not exist.
fn image_missing(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiFailure>().is_some_and(|f| {
        f.status == hyper::StatusCode::NOT_FOUND
            && f.code == "not_found"
            && f.message.starts_with("image ")
    })
}

/// `hutch new`: creates (and boots) a VM; when its image is missing and its reference names a
/// registry, pulls it first with progress, then creates again. The new VM.
pub(crate) async fn create(c: &Client, req: &hutch_core::api::CreateVm) -> Result<Value> {
    let path = "/api/v1/sandboxes";
    let body = serde_json::to_value(req)?;
    let first = c.json(Method::POST, path, Some(body.clone())).await;
    let e = match first {
        Err(e) if image_missing(&e) => e,
        other => return other,
    };
    let image = req.image.as_str();
    if !names_registry(image) {
        bail!(
            "{e}: import it (hutch image import PATH --name {image}) or pull it \
             (hutch image pull {image}); hutch new pulls a missing image by itself only when \
             its reference names a registry (e.g. docker.io/library/{image})"
        );
    }
    eprintln!("Unable to find image '{image}' locally; pulling it");
    let (username, password) = resolve_creds(image, None)?;
    let req = hutch_core::api::PullImage {
        reference: image.to_string(),
        username,
        password,
        ..Default::default()
    };
    let img = pull(c, &req).await?;
    eprintln!(
        "pulled {} ({})",
        img["name"].as_str().unwrap_or(""),
        img["digest"].as_str().unwrap_or("")
    );
    c.json(Method::POST, path, Some(body)).await
}

/// Credentials for the registry of `reference`: `--creds USER:PASS`, else the docker config.
pub(crate) fn resolve_creds(
    reference: &str,
    flag: Option<String>,
) -> Result<(Option<String>, Option<String>)> {
    if let Some(c) = flag {
        let (u, p) = c
            .split_once(':')
            .ok_or_else(|| anyhow!("--creds must be USER:PASS"))?;
        return Ok((Some(u.into()), Some(p.into())));
    }
    let r = hutch_image::registry::Reference::parse(reference)?;
    Ok(docker_config()
        .and_then(|p| hutch_image::registry::docker_config_credentials(&r.registry, &p))
        .map(|c| (Some(c.username), Some(c.password)))
        .unwrap_or((None, None)))
}

/// The docker client's config file: $DOCKER_CONFIG/config.json or ~/.docker/config.json.
fn docker_config() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
    Some(dir.join("config.json"))
}

#[cfg(test)]
mod tests {
    use super::names_registry;

    #[test]
    fn pullable_references() {
        for r in [
            "127.0.0.1:5000/team/app:1",
            "localhost/app",
            "localhost:5000/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "docker.io/library/alpine",
            "ghcr.io/o/r:tag",
            "[::1]:5000/app:1",
        ] {
            assert!(names_registry(r), "{r}");
        }
        for r in [
            "busybox",
            "busybox:latest",
            "team/app",
            "~alice/busybox",
            "ghcr.io/UPPER/x",
            "ghcr.io/",
        ] {
            assert!(!names_registry(r), "{r}");
        }
    }
}
