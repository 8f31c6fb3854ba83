//! `hutch nodes`, `hutch cordon NODE`, `hutch uncordon NODE`, `hutch migrate NAME --to NODE`,
//! `hutch drain NODE` (docs/cluster.md).

use crate::client::{seg, Client};
use crate::render::out_json;
use anyhow::Result;
use hutch_core::cluster::{Drained, Migrated, NodeView};
use hyper::Method;

/// Lists the cluster's nodes (the host alone on a single node).
pub async fn nodes(c: &Client, json: bool) -> Result<()> {
    let v = c.json(Method::GET, "/api/v1/nodes", None).await?;
    if json {
        out_json(&v);
    } else {
        let nodes: Vec<NodeView> = serde_json::from_value(v)?;
        print!("{}", NodeView::table(&nodes));
    }
    Ok(())
}

/// Cordons (`on`) or uncordons a node.
pub async fn cordon(c: &Client, node: &str, on: bool, json: bool) -> Result<()> {
    let verb = if on { "cordon" } else { "uncordon" };
    let v = c
        .json(
            Method::POST,
            &format!("/api/v1/nodes/{}/{verb}", seg(node)),
            None,
        )
        .await?;
    if json {
        out_json(&v);
    } else {
        let n: NodeView = serde_json::from_value(v)?;
        println!("{}: {}", n.name, n.state.as_str());
    }
    Ok(())
}

/// Moves VM `name` to node `to`, live.
pub async fn migrate(c: &Client, name: &str, to: &str, json: bool) -> Result<()> {
    let body = serde_json::json!({ "to": to });
    let v = c
        .json(
            Method::POST,
            &format!("/api/v1/sandboxes/{}/migrate", seg(name)),
            Some(body),
        )
        .await?;
    if json {
        out_json(&v);
    } else {
        let m: Migrated = serde_json::from_value(v)?;
        println!("{}", m.line());
    }
    Ok(())
}

/// Cordons node `node` and moves its VMs away.
pub async fn drain(c: &Client, node: &str, json: bool) -> Result<()> {
    let v = c
        .json(
            Method::POST,
            &format!("/api/v1/nodes/{}/drain", seg(node)),
            None,
        )
        .await?;
    if json {
        out_json(&v);
        return Ok(());
    }
    let d: Drained = serde_json::from_value(v)?;
    for m in &d.migrated {
        println!("{}", m.line());
    }
    for f in &d.failed {
        eprintln!("{}: {}", f.name, f.error);
    }
    if !d.failed.is_empty() {
        anyhow::bail!(
            "{} of the VMs on {node} could not be moved; it stays cordoned",
            d.failed.len()
        );
    }
    println!("{node} is drained: {} VMs moved", d.migrated.len());
    Ok(())
}
