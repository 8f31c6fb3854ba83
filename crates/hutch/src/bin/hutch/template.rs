//! `hutch template ...` and `hutch pool ...` (docs/templates.md).

use crate::client::{seg, Client};
use crate::render::out_json;
use anyhow::{bail, Result};
use clap::Subcommand;
use hutch_core::template::{CreateTemplate, PoolView, SetPool, Template, TemplateStatus};
use hyper::Method;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Boot IMAGE once, run --start-cmd, wait until --ready-cmd succeeds, snapshot it: then
    /// `hutch new --template NAME` starts VMs from it in milliseconds.
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = hutch_core::api::DEFAULT_VCPUS)]
        vcpu: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = hutch_core::api::DEFAULT_MEM_MIB)]
        mem: u64,
        /// Writable disk size in GiB.
        #[arg(long)]
        disk: Option<u64>,
        /// Started (sh -c, detached) once the VM has booted, e.g. a server.
        #[arg(long = "start-cmd")]
        start_cmd: Option<String>,
        /// Run (sh -c) until it exits 0 (at most 300 s); then the VM is snapshotted.
        #[arg(long = "ready-cmd")]
        ready_cmd: Option<String>,
        /// Return at once instead of waiting for the build.
        #[arg(long = "no-wait")]
        no_wait: bool,
    },
    /// List templates and their build status.
    Ls,
    /// Build a template again (its image changed, say); VMs made from it run on.
    Build {
        name: String,
        #[arg(long = "no-wait")]
        no_wait: bool,
    },
    /// Remove a template and its warm pool (VMs made from it run on).
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Keep MIN VMs of TEMPLATE restored and ready (refilled up to MAX when fewer are ready);
    /// `hutch new --template TEMPLATE` claims one. `--min 0` removes the pool.
    Set {
        template: String,
        #[arg(long)]
        min: u32,
        #[arg(long)]
        max: Option<u32>,
        /// In a cluster, the nodes that each keep MIN..MAX: `all` (every ready node) or
        /// NODE,NODE...; '' for the node holding the template's snapshot (the default).
        /// Left out: as the pool had it.
        #[arg(long)]
        nodes: Option<String>,
    },
    /// List pools: ready VMs against their targets.
    Ls,
    /// Remove a pool and its idle VMs.
    Rm { template: String },
}

fn table(ts: &[Template]) -> String {
    let mut rows = vec![vec![
        "NAME".to_string(),
        "STATUS".into(),
        "IMAGE".into(),
        "VCPU".into(),
        "MEM".into(),
        "BUILD".into(),
    ]];
    for t in ts {
        rows.push(vec![
            match &t.owner {
                Some(o) => format!("{o}/{}", t.name),
                None => t.name.clone(),
            },
            t.status.as_str().to_string(),
            t.image.clone(),
            t.vcpus.to_string(),
            format!("{}M", t.mem_mib),
            t.build_ms
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    hutch_core::table(rows)
}

/// Polls template `name` until its build ends; an error when it failed.
async fn wait_built(c: &Client, name: &str) -> Result<Template> {
    let t0 = Instant::now();
    loop {
        let v = c
            .json(
                Method::GET,
                &format!("/api/v1/templates/{}", seg(name)),
                None,
            )
            .await?;
        let t: Template = serde_json::from_value(v)?;
        match t.status {
            TemplateStatus::Ready => return Ok(t),
            TemplateStatus::Failed => bail!(
                "template {name} failed to build: {}",
                t.error.as_deref().unwrap_or("no reason recorded")
            ),
            TemplateStatus::Building if t0.elapsed() > Duration::from_secs(900) => {
                bail!("template {name} is still building after 15 minutes")
            }
            TemplateStatus::Building => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub async fn template(c: &Client, cmd: TemplateCmd, j: bool) -> Result<()> {
    match cmd {
        TemplateCmd::Create {
            name,
            image,
            vcpu,
            mem,
            disk,
            start_cmd,
            ready_cmd,
            no_wait,
        } => {
            let req = CreateTemplate {
                name: name.clone(),
                image,
                vcpus: vcpu,
                mem_mib: mem,
                disk_gib: disk,
                start_cmd,
                ready_cmd,
            };
            let v = c
                .json(
                    Method::POST,
                    "/api/v1/templates",
                    Some(serde_json::to_value(req)?),
                )
                .await?;
            finish_build(c, &name, v, no_wait, j).await
        }
        TemplateCmd::Build { name, no_wait } => {
            let v = c
                .json(
                    Method::POST,
                    &format!("/api/v1/templates/{}/build", seg(&name)),
                    None,
                )
                .await?;
            finish_build(c, &name, v, no_wait, j).await
        }
        TemplateCmd::Ls => {
            let v = c.json(Method::GET, "/api/v1/templates", None).await?;
            if j {
                out_json(&v);
            } else {
                let ts: Vec<Template> = serde_json::from_value(v)?;
                print!("{}", table(&ts));
            }
            Ok(())
        }
        TemplateCmd::Rm { name } => {
            c.call(
                Method::DELETE,
                &format!("/api/v1/templates/{}", seg(&name)),
                None,
            )
            .await?;
            if !j {
                println!("removed template {name}");
            }
            Ok(())
        }
    }
}

async fn finish_build(
    c: &Client,
    name: &str,
    started: serde_json::Value,
    no_wait: bool,
    j: bool,
) -> Result<()> {
    if no_wait {
        if j {
            out_json(&started);
        } else {
            println!("template {name} building; see: hutch template ls");
        }
        return Ok(());
    }
    let t = wait_built(c, name).await?;
    if j {
        out_json(&serde_json::to_value(&t)?);
    } else {
        println!(
            "template {name} ready in {:.1}s; start VMs with: hutch new --template {name}",
            t.build_ms.unwrap_or(0) as f64 / 1000.0
        );
    }
    Ok(())
}

pub async fn pool(c: &Client, cmd: PoolCmd, j: bool) -> Result<()> {
    let show = |v: &serde_json::Value| -> Result<()> {
        if j {
            out_json(v);
            return Ok(());
        }
        let pools: Vec<PoolView> = match v {
            serde_json::Value::Array(_) => serde_json::from_value(v.clone())?,
            _ => vec![serde_json::from_value(v.clone())?],
        };
        print!("{}", hutch_core::render::pool_table(&pools));
        Ok(())
    };
    match cmd {
        PoolCmd::Set {
            template,
            min,
            max,
            nodes,
        } => {
            let nodes = nodes.as_deref().map(hutch_core::template::parse_pool_nodes);
            let v = c
                .json(
                    Method::PUT,
                    &format!("/api/v1/pools/{}", seg(&template)),
                    Some(serde_json::to_value(SetPool { min, max, nodes })?),
                )
                .await?;
            show(&v)
        }
        PoolCmd::Ls => show(&c.json(Method::GET, "/api/v1/pools", None).await?),
        PoolCmd::Rm { template } => {
            c.call(
                Method::DELETE,
                &format!("/api/v1/pools/{}", seg(&template)),
                None,
            )
            .await?;
            if !j {
                println!("removed the pool of {template}");
            }
            Ok(())
        }
    }
}
