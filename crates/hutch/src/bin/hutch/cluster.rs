//! `hutch nodes`, `hutch cordon NODE`, `hutch uncordon NODE` (docs/cluster.md).

use crate::client::{seg, Client};
use crate::render::out_json;
use anyhow::Result;
use hutch_core::cluster::NodeView;
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
