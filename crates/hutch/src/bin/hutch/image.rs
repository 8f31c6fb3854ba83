//! `hutch image ...`.

use crate::client::*;
use crate::pull::{pull, resolve_creds};
use crate::render::*;
use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Subcommand;
use hyper::Method;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Import an OCI image layout (directory or tar / oci-archive) or a `docker save` tarball.
    Import {
        path: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull from a registry: `alpine`, `ghcr.io/o/r:tag`, `localhost:5000/app@sha256:...`.
    Pull {
        reference: String,
        /// Plain HTTP for a registry off loopback (loopback registries always use it).
        #[arg(long)]
        insecure: bool,
        /// USER:PASS; default: the registry's entry in ~/.docker/config.json.
        #[arg(long)]
        creds: Option<String>,
        /// Store under this name instead of the reference.
        #[arg(long)]
        name: Option<String>,
    },
    /// Push an image to a registry (to REFERENCE, default its own name).
    Push {
        image: String,
        reference: Option<String>,
        /// Plain HTTP for a registry off loopback (loopback registries always use it).
        #[arg(long)]
        insecure: bool,
        #[arg(long)]
        creds: Option<String>,
    },
    /// Delete blobs and root filesystems no image or VM uses.
    Gc,
    /// List images.
    Ls,
    /// Show an image.
    Inspect { name: String },
    /// Delete an image.
    Rm { name: String },
}

pub async fn image(c: &Client, ic: ImageCmd, j: bool) -> Result<()> {
    match ic {
        ImageCmd::Import { path, name } => {
            let meta = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
            let v = if meta.is_dir() || c.url.is_none() {
                let abs = std::fs::canonicalize(&path)?;
                c.json(
                    Method::POST,
                    "/api/v1/images",
                    Some(serde_json::to_value(hutch_core::api::ImportImage {
                        path: abs.to_string_lossy().into_owned(),
                        name,
                    })?),
                )
                .await?
            } else {
                let data = std::fs::read(&path)?;
                let q = name
                    .map(|n| format!("?name={}", enc(&n)))
                    .unwrap_or_default();
                let r = c
                    .send(
                        Method::POST,
                        &format!("/api/v1/images{q}"),
                        "application/x-tar",
                        Bytes::from(data),
                    )
                    .await?;
                serde_json::from_slice(&finish(r).await?)?
            };
            if j {
                out_json(&v);
            } else {
                println!(
                    "imported {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    v["digest"].as_str().unwrap_or("")
                );
            }
        }
        ImageCmd::Pull {
            reference,
            insecure,
            creds,
            name,
        } => {
            let (username, password) = resolve_creds(&reference, creds)?;
            let req = hutch_core::api::PullImage {
                reference,
                insecure,
                username,
                password,
                name,
            };
            let v = pull(c, &req).await?;
            if j {
                out_json(&v);
            } else {
                println!(
                    "pulled {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    v["digest"].as_str().unwrap_or("")
                );
            }
        }
        ImageCmd::Push {
            image,
            reference,
            insecure,
            creds,
        } => {
            let target = reference.clone().unwrap_or_else(|| image.clone());
            let (username, password) = resolve_creds(&target, creds)?;
            let req = hutch_core::api::PushImage {
                image,
                reference,
                insecure,
                username,
                password,
            };
            let v = c
                .json(
                    Method::POST,
                    "/api/v1/images/push",
                    Some(serde_json::to_value(req)?),
                )
                .await?;
            if j {
                out_json(&v);
            } else {
                println!("pushed {}", v["pushed"].as_str().unwrap_or(""));
            }
        }
        ImageCmd::Gc => {
            let v = c.json(Method::POST, "/api/v1/images/gc", None).await?;
            if j {
                out_json(&v);
            } else {
                println!(
                    "removed {} blobs, {} root filesystems, {} partial downloads; {:.1} MB freed",
                    v["blobs_removed"],
                    v["rootfs_removed"],
                    v["partials_removed"],
                    v["bytes_freed"].as_f64().unwrap_or(0.0) / 1048576.0
                );
            }
        }
        ImageCmd::Ls => {
            let v = c.json(Method::GET, "/api/v1/images", None).await?;
            if j {
                out_json(&v);
            } else {
                let images: Vec<hutch_core::Image> = serde_json::from_value(v)?;
                print!("{}", hutch_core::render::image_table(&images));
            }
        }
        ImageCmd::Inspect { name } => out_json(
            &c.json(Method::GET, &format!("/api/v1/images/{}", enc(&name)), None)
                .await?,
        ),
        ImageCmd::Rm { name } => {
            c.call(
                Method::DELETE,
                &format!("/api/v1/images/{}", enc(&name)),
                None,
            )
            .await?;
            if !j {
                println!("removed {name}");
            }
        }
    }
    Ok(())
}
