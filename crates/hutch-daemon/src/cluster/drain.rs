//! `hutch drain NODE` (`POST /api/v1/nodes/{name}/drain`, admin only; docs/cluster.md): the
//! node is cordoned and marked draining, then the node itself moves its VMs away, one at a
//! time, each to the node the scheduler picks: running VMs live, paused ones with their saved
//! state and stopped ones with their disk (migrate.rs; the guest of neither runs meanwhile).
//! Its warm pool VMs are removed instead (their pools refill on the nodes that keep them). A
//! request to another node is passed to the node being drained. When every VM moved, the node
//! is left cordoned (no longer draining): ready to be stopped or upgraded.

use super::nodes::{NodeRecord, NODES};
use super::schedule::{choose, Need};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::{admin_only, Service};
use hutch_core::cluster::{DrainFailure, Drained};
use hutch_core::VmState;
use hutch_store::kv::StoreExt;
use std::sync::Arc;

impl Service {
    pub async fn drain(self: &Arc<Self>, caller: &Caller, node: &str) -> Result<Drained, ApiError> {
        admin_only(caller, "draining nodes")?;
        let c = self.clustered("draining")?;
        self.mark_draining(&c, node, true).await?;
        if node != c.name() {
            if !self.node_live(node).await? {
                return Err(ApiError::Conflict(format!(
                    "node {node} is down: its VMs cannot be moved (their disks are there); it \
                     stays cordoned"
                )));
            }
            return self
                .node_json(
                    &c,
                    node,
                    "POST",
                    &format!("/api/v1/nodes/{node}/drain"),
                    &(),
                )
                .await;
        }
        let mut out = Drained {
            node: node.to_string(),
            migrated: Vec::new(),
            failed: Vec::new(),
        };
        let mut vms = self.records.local_vms().await?;
        vms.sort_by_key(|v| v.key());
        for mut vm in vms {
            // A warm pool VM is not moved: it goes, and its pool is refilled on its nodes. One
            // claimed meanwhile is a VM like any other.
            if let Some(pool) = vm.pool.clone() {
                self.delete_pool_vm(&vm.id, &pool).await;
                match self.records.vm_by_id(&vm.id).await? {
                    Some(v) if v.pool.is_none() => vm = v,
                    _ => continue,
                }
            }
            let name = vm.key();
            let r = match vm.state {
                VmState::Running | VmState::Paused | VmState::Stopped => {
                    let nodes = self.nodes(&Caller::local_admin()).await?;
                    match choose(
                        &nodes,
                        Need {
                            mem_mib: vm.mem_mib,
                        },
                        None,
                        c.opts.placement,
                        &Default::default(),
                    ) {
                        Ok(to) => self.migrate_vm(&c, vm, &to).await,
                        Err(e) => Err(e),
                    }
                }
                s => Err(ApiError::Conflict(format!(
                    "it is {}: only running, paused and stopped VMs move (start or delete it, \
                     then drain again)",
                    s.as_str()
                ))),
            };
            match r {
                Ok(m) => out.migrated.push(m),
                Err(e) => out.failed.push(DrainFailure {
                    name,
                    error: e.to_string(),
                }),
            }
        }
        // Pool VMs a refill was making as the drain began (a refill checks before each VM
        // whether this node still keeps pools; it no longer does).
        let late: Vec<(String, String)> = self.records.fold_local_vms(|it| {
            it.filter(|v| v.state != VmState::Creating)
                .filter_map(|v| Some((v.id.clone(), v.pool.clone()?)))
                .collect()
        });
        for (id, pool) in late {
            self.delete_pool_vm(&id, &pool).await;
        }
        if out.failed.is_empty() {
            self.mark_draining(&c, node, false).await?;
        }
        Ok(out)
    }

    /// Cordons node `name` and sets whether it is draining.
    async fn mark_draining(
        &self,
        c: &super::Cluster,
        name: &str,
        draining: bool,
    ) -> Result<(), ApiError> {
        c.store
            .update_json::<NodeRecord, ApiError, _>(&format!("{NODES}{name}"), |r| {
                r.cordoned = true;
                r.draining = draining;
                Ok(())
            })
            .await?;
        Ok(())
    }
}
