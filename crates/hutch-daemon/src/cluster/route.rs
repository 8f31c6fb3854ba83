//! Where the service's lifecycle operations run in a cluster: a create goes to the node the
//! scheduler picks (or the one holding its snapshot's files); an operation on an existing VM to
//! the node recorded in it. Work for another node goes as an intent (intents.rs). A VM whose
//! node is down is `lost`: it can be deleted (its record goes; the node, when back, stops
//! what it still runs of it), nothing else.

use super::intents::Op;
use super::schedule::{choose, Need, Prefer};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::Service;
use hutch_core::api::CreateVm;
use hutch_core::cluster::NodeState;
use hutch_core::snapshot::Snapshot;
use hutch_core::{Vm, VmState};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Which lifecycle operation, for [`Service::elsewhere`].
#[derive(Clone, Copy, Debug)]
pub enum Life {
    Start,
    Stop,
    Pause,
    Resume,
    Delete { graceful: bool },
}

impl Service {
    /// The node that must run new VM `req` when it is not this one (None: here).
    pub(crate) async fn place(
        &self,
        caller: &Caller,
        req: &CreateVm,
    ) -> Result<Option<String>, ApiError> {
        let Some(c) = self.cluster.get() else {
            if let Some(n) = &req.node {
                return Err(ApiError::Invalid(format!(
                    "node {n:?}: this hutchd runs alone (nodes are for clusters, hutchd --etcd)"
                )));
            }
            return Ok(None);
        };
        // A VM made from a snapshot (or a template's) prefers a node with a ready warm-pool
        // VM of the template, else the node holding the snapshot's files; elsewhere (pinned, or
        // that node full or cordoned) the files are copied first (snap_files.rs).
        let (snap, pool) = match (&req.snapshot, &req.template) {
            (Some(s), _) => (Some(self.snapshot_for(caller, s).await?), None),
            (None, Some(t)) => {
                let t = self.template_for(caller, t).await?;
                let snap = match &t.snapshot {
                    Some(k) => {
                        self.records
                            .get::<Snapshot>(crate::records::SNAPSHOTS, k)
                            .await?
                    }
                    None => None,
                };
                (snap, Some(t.key()))
            }
            _ => (None, None),
        };
        let admin = Caller::local_admin();
        let nodes = self.nodes(&admin).await?;
        let prefer = Prefer {
            pools: match (pool, &snap) {
                (Some(k), Some(s)) => self.ready_pool_vms(&k, &s.name),
                _ => HashMap::new(),
            },
            home: snap.as_ref().and_then(|s| s.node.clone()),
        };
        let need = Need {
            mem_mib: snap.as_ref().map_or(req.mem_mib, |s| s.mem_mib),
        };
        let chosen = choose(&nodes, need, req.node.as_deref(), c.opts.placement, &prefer)?;
        Ok((chosen != c.name()).then_some(chosen))
    }

    /// Running VMs of warm pool `key` made from snapshot `snap` (the template's current
    /// build), by node.
    fn ready_pool_vms(&self, key: &str, snap: &str) -> HashMap<String, u32> {
        self.records.fold_vms(|it| {
            let mut m = HashMap::new();
            let claimable = |v: &&Vm| {
                v.pool.as_deref() == Some(key)
                    && v.state == VmState::Running
                    && v.mem.from.as_deref() == Some(snap)
            };
            for v in it.filter(claimable) {
                if let Some(n) = &v.node {
                    *m.entry(n.clone()).or_default() += 1;
                }
            }
            m
        })
    }

    /// Creates `req` on the node placement picks: here, or through an intent there.
    pub(crate) async fn create_placed(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateVm,
    ) -> Result<Option<Vm>, ApiError> {
        match self.place(caller, &req).await? {
            None => Ok(None),
            Some(node) => {
                let vm = self
                    .remote(&node, caller, Op::Create { req: Box::new(req) })
                    .await?;
                vm.map(Some)
                    .ok_or_else(|| ApiError::Internal(format!("node {node} made no VM")))
            }
        }
    }

    /// Runs `life` on `caller`'s VM `name` where it lives when that is not here: Some(outcome)
    /// then (None for a delete), None when it is this node's to do.
    pub(crate) async fn elsewhere(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        life: Life,
    ) -> Result<Option<Option<Vm>>, ApiError> {
        if self.cluster.get().is_none() {
            return Ok(None);
        }
        let vm = self.vm_for(caller, name).await?;
        if self.records.is_local(&vm) {
            return Ok(None);
        }
        let Some(node) = vm.node.clone() else {
            return Ok(None);
        };
        let (name, id) = (name.to_string(), vm.id.clone());
        if !self.node_live(&node).await? {
            return match life {
                Life::Delete { .. } => {
                    self.delete_lost(&vm).await?;
                    Ok(Some(None))
                }
                _ => Err(ApiError::Capacity(format!(
                    "{} is lost: its node {node} is down (delete it, or wait for the node)",
                    vm.name
                ))),
            };
        }
        let op = match life {
            Life::Start => Op::Start { name, id },
            Life::Stop => Op::Stop { name, id },
            Life::Pause => Op::Pause { name, id },
            Life::Resume => Op::Resume { name, id },
            Life::Delete { graceful } => Op::Delete { name, id, graceful },
        };
        self.remote(&node, caller, op).await.map(Some)
    }

    /// Removes the record of a VM whose node is down: the node, back, stops what it still
    /// runs of it (a VM it runs without a record).
    async fn delete_lost(&self, vm: &Vm) -> Result<(), ApiError> {
        tracing::warn!(vm = %vm.key(), node = ?vm.node, "deleting a lost VM's record; its node cleans up when it is back");
        self.records.delete_vm(vm).await?;
        Ok(())
    }

    /// Marks the VMs whose node is down `lost` (shown, never stored).
    pub async fn mark_lost(&self, vms: &mut [Vm]) {
        if self.cluster.get().is_none() {
            return;
        }
        let Ok(nodes) = self.nodes(&Caller::local_admin()).await else {
            return;
        };
        let down: HashSet<&str> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Down)
            .map(|n| n.name.as_str())
            .collect();
        for v in vms {
            if v.node.as_deref().is_some_and(|n| down.contains(n)) && v.state != VmState::Stopped {
                v.lost = true;
            }
        }
    }
}
