//! `hutch snapshot`, `hutch pause`, `hutch resume` and `hutch fork` (docs/snapshots.md).

use crate::client::{seg, Client};
use crate::render::{describe, out_json};
use anyhow::Result;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

/// `hutch snapshot VM NAME`, or `hutch snapshot ls|rm`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub cmd: Option<SnapshotCmd>,
    /// The running VM to snapshot (it runs on).
    pub vm: Option<String>,
    /// The snapshot's name (`hutch new --snapshot NAME` starts VMs from it).
    pub name: Option<String>,
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// List snapshots.
    Ls,
    /// Remove a snapshot (VMs made from it run on; its files go with the last of them).
    Rm { name: String },
}

fn snapshot_table(v: &Value) -> String {
    let snaps: Vec<hutch_core::snapshot::Snapshot> =
        serde_json::from_value(v.clone()).unwrap_or_default();
    let mut out = format!(
        "{:<24} {:<20} {:<16} {:>5} {:>8} {:>10} {:>9}\n",
        "NAME", "FROM VM", "IMAGE", "VCPU", "MEM", "SIZE", "PAUSE"
    );
    for s in snaps {
        let name = match &s.owner {
            Some(o) => format!("{o}/{}", s.name),
            None => s.name.clone(),
        };
        out.push_str(&format!(
            "{:<24} {:<20} {:<16} {:>5} {:>6}Mi {:>8.1}Mi {:>7}ms\n",
            name,
            s.vm,
            s.image,
            s.vcpus,
            s.mem_mib,
            s.bytes as f64 / 1048576.0,
            s.pause_ms
        ));
    }
    out
}

pub async fn snapshot(c: &Client, a: SnapshotArgs, j: bool) -> Result<()> {
    match (a.cmd, a.vm, a.name) {
        (Some(SnapshotCmd::Ls), _, _) => {
            let v = c.json(Method::GET, "/api/v1/snapshots", None).await?;
            if j {
                out_json(&v)
            } else {
                print!("{}", snapshot_table(&v))
            }
        }
        (Some(SnapshotCmd::Rm { name }), _, _) => {
            c.call(
                Method::DELETE,
                &format!("/api/v1/snapshots/{}", seg(&name)),
                None,
            )
            .await?;
            if !j {
                println!("removed snapshot {name}");
            }
        }
        (None, Some(vm), Some(name)) => {
            let v = c
                .json(
                    Method::POST,
                    &format!("/api/v1/sandboxes/{}/snapshot", seg(&vm)),
                    Some(serde_json::to_value(hutch_core::api::SnapshotVm {
                        name: name.clone(),
                    })?),
                )
                .await?;
            if j {
                out_json(&v)
            } else {
                println!(
                    "snapshot {name} of {vm}: {:.1} MiB, {vm} stopped for {} ms; start copies with: hutch new --snapshot {name}",
                    v["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                    v["pause_ms"]
                );
            }
        }
        _ => anyhow::bail!(
            "usage: hutch snapshot VM NAME | hutch snapshot ls | hutch snapshot rm NAME"
        ),
    }
    Ok(())
}

/// `hutch pause VM` / `hutch resume VM`.
pub async fn pause_resume(c: &Client, name: &str, resume: bool, j: bool) -> Result<()> {
    let op = if resume { "resume" } else { "pause" };
    let v = c
        .json(
            Method::POST,
            &format!("/api/v1/sandboxes/{}/{op}", seg(name)),
            None,
        )
        .await?;
    if j {
        out_json(&v)
    } else if resume {
        println!("{name} running");
    } else {
        println!("{name} paused");
    }
    Ok(())
}

/// `hutch fork VM [--count N] [--name PREFIX]`.
pub async fn fork(
    c: &Client,
    name: &str,
    count: Option<u32>,
    prefix: Option<String>,
    j: bool,
) -> Result<()> {
    let v = c
        .json(
            Method::POST,
            &format!("/api/v1/sandboxes/{}/fork", seg(name)),
            Some(serde_json::to_value(hutch_core::api::ForkVm {
                count,
                name: prefix,
            })?),
        )
        .await?;
    if j {
        out_json(&v);
    } else if let Some(vms) = v.as_array() {
        if vms.len() == 1 {
            describe(&vms[0]);
        } else {
            let vms: Vec<hutch_core::Vm> = serde_json::from_value(v.clone())?;
            print!("{}", hutch_core::render::vm_table(&vms, None, None));
        }
    }
    Ok(())
}
