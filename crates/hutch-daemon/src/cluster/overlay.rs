//! The VM network shared by nodes with the same `--subnet` (hutch-net's overlay.rs has the
//! mechanism): every second, and at once after a migration, each node routes the VMs that run
//! on its peers to them. A node records its subnet and its overlay address (its `--advertise`
//! host) in its node record; peers are the live nodes with the same subnet.

use super::nodes::{NodeRecord, LIVE, NODES};
use crate::error::ApiError;
use crate::service::Service;
use hutch_net::overlay::RemoteVm;
use hutch_store::kv::StoreExt;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

/// The IPv4 address of `--advertise HOST:PORT` (resolved when HOST is a name).
pub async fn overlay_address(advertise: Option<&str>) -> Option<Ipv4Addr> {
    let a = advertise?;
    tokio::net::lookup_host(a)
        .await
        .ok()?
        .find_map(|s| match s.ip() {
            std::net::IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
            _ => None,
        })
}

impl Service {
    /// Routes the VMs of peers sharing this node's subnet to them (no-op without a cluster or
    /// a VM network).
    pub(crate) async fn sync_overlay(&self) -> Result<(), ApiError> {
        let (Some(c), Some(net)) = (self.cluster.get().cloned(), self.node.net.clone()) else {
            return Ok(());
        };
        let sub = net.settings.cfg.subnet;
        let (recs, _) = c.store.list_json::<NodeRecord>(NODES).await?;
        let live: HashSet<String> = c
            .store
            .list_json::<super::nodes::Live>(LIVE)
            .await?
            .0
            .into_iter()
            .map(|v| v.key[LIVE.len()..].to_string())
            .collect();
        let mut local = None;
        let mut peers: HashMap<String, Ipv4Addr> = HashMap::new();
        for r in recs.into_iter().map(|r| r.value) {
            if r.subnet.as_deref() != Some(sub.to_string().as_str()) {
                continue;
            }
            let Some(ip) = r.overlay else { continue };
            if r.name == c.name() {
                local = Some(ip);
            } else if live.contains(&r.name) {
                peers.insert(r.name, ip);
            }
        }
        let remote: Vec<RemoteVm> = self.records.fold_vms(|it| {
            it.filter(|v| v.state.has_process())
                .filter_map(|v| {
                    let node = *peers.get(v.node.as_deref()?)?;
                    let ip = v.net.ipv4.filter(|ip| sub.contains(*ip))?;
                    Some(RemoteVm {
                        ip,
                        account: v.owner.clone(),
                        node,
                    })
                })
                .collect()
        });
        let peers: Vec<Ipv4Addr> = peers.into_values().collect();
        tokio::task::spawn_blocking(move || net.host.sync_overlay(local, &peers, &remote))
            .await
            .map_err(crate::node::internal)?
            .map_err(|e| ApiError::Internal(format!("the shared VM network: {e}")))
    }

    /// Keeps the overlay in step, every second.
    pub(crate) fn start_overlay(self: &Arc<Self>) {
        if self.node.net.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(s) = weak.upgrade() else { return };
                match s.sync_overlay().await {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cluster: syncing the shared VM network");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
