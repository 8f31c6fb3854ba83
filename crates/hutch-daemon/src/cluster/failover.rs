//! When a node goes down, and when it comes back.
//!
//! - **One leader** runs the cluster-wide reconcilers: the node holding `cluster/leader`, a key
//!   bound to its membership lease (taken with compare-and-swap when absent; gone with the
//!   lease).
//! - **Failover** (the leader, every second): each VM with `--restart always` recorded on a
//!   `down` node is made again on a node the scheduler picks, from its image, under its name.
//!   Its disk was on the lost node: the new VM says so (`recreated`, shown by `describe` and
//!   as a `recreated` event). The old record goes in one compare-and-swap on its revision, so
//!   of two leaders (an old one cut off) one moves it, once.
//! - **Fencing**: a node that loses its lease (cut off from etcd past the TTL, by its own
//!   clock, which errs early) freezes its VMs (their vCPUs stop) before any other node can
//!   have made them again. When it holds a lease again, each frozen VM still recorded on it
//!   runs on; each that was moved or deleted meanwhile is stopped and removed. A node whose
//!   hutchd was killed cannot fence: its VMs run on until that hutchd starts again, which
//!   then removes what was moved (at start, a VM without a local record is removed).

use super::intents::Op;
use super::nodes::LIVE;
use super::Cluster;
use crate::auth::Caller;
use crate::records::{name_key, LEASES, VMS};
use crate::service::Service;
use hutch_core::api::CreateVm;
use hutch_core::cluster::NodeState;
use hutch_core::{RestartPolicy, Vm, VmState};
use hutch_store::kv::{Compare, Store, StoreExt, Txn};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

pub const LEADER: &str = "cluster/leader";

impl Cluster {
    /// Whether this node is the leader now (taking the key when nobody holds it).
    pub async fn lead(&self) -> bool {
        if !self.opts.roles.control {
            return false;
        }
        let Some(lease) = self.lease().filter(|l| l.is_alive()) else {
            return false;
        };
        match self.store.get(LEADER).await {
            Ok(Some(kv)) => kv.value == self.name().as_bytes(),
            Ok(None) => {
                let txn = Txn::new()
                    .when(Compare::Absent(LEADER.into()))
                    .put(LEADER, self.name().as_bytes().to_vec());
                match self.store.run_txn(txn, Some(lease.id())).await {
                    Ok(out) if out.is_committed() => {
                        tracing::info!(node = %self.name(), "cluster: leading");
                        true
                    }
                    _ => false,
                }
            }
            Err(_) => false,
        }
    }
}

impl Service {
    /// Starts the leader's failover loop.
    pub(crate) fn start_failover(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(s) = weak.upgrade() else { return };
                let Some(c) = s.cluster.get().cloned() else {
                    return;
                };
                if c.lead().await {
                    if let Err(e) = s.fail_over().await {
                        tracing::warn!(error = %e, "cluster: failover pass");
                    }
                    s.autoscale(&c).await;
                }
            }
        });
    }

    /// One pass: every restart-always VM of a down node is made again elsewhere.
    async fn fail_over(self: &Arc<Self>) -> Result<(), crate::error::ApiError> {
        let admin = Caller::local_admin();
        let nodes = self.nodes(&admin).await?;
        let down: Vec<&str> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Down)
            .map(|n| n.name.as_str())
            .collect();
        if down.is_empty() {
            return Ok(());
        }
        let moving: Vec<Vm> = self.records.fold_vms(|it| {
            it.filter(|v| {
                v.node.as_deref().is_some_and(|n| down.contains(&n))
                    && v.restart == RestartPolicy::Always
                    && v.pool.is_none()
                    && !matches!(v.state, VmState::Deleting | VmState::Creating)
            })
            .cloned()
            .collect()
        });
        for vm in moving {
            let from = vm.node.clone().unwrap_or_default();
            match self.recreate(&vm, &from).await {
                Ok(Some(node)) => {
                    tracing::warn!(vm = %vm.key(), from = %from, to = %node, "cluster: recreated a restart-always VM of a down node")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(vm = %vm.key(), from = %from, error = %e, "cluster: recreating a VM of a down node")
                }
            }
        }
        Ok(())
    }

    /// Moves `vm`'s record off down node `from` and makes it again where the scheduler says;
    /// the node it went to (None: someone else moved or changed it first).
    async fn recreate(
        self: &Arc<Self>,
        vm: &Vm,
        from: &str,
    ) -> Result<Option<String>, crate::error::ApiError> {
        let c = self
            .cluster
            .get()
            .cloned()
            .ok_or_else(|| crate::error::ApiError::Internal("not a cluster node".into()))?;
        let key = format!("{VMS}{}", vm.id);
        let Some(cur) = c.store.get(&key).await? else {
            return Ok(None);
        };
        // Still down? (It may have come back since the listing.)
        if c.store.get(&format!("{LIVE}{from}")).await?.is_some() {
            return Ok(None);
        }
        let owner = Caller {
            account: vm.owner.clone().unwrap_or_else(|| "admin".into()),
            admin: vm.owner.is_none(),
        };
        let mut req = CreateVm {
            name: Some(vm.name.clone()),
            image: vm.image.clone(),
            vcpus: vm.vcpus,
            mem_mib: vm.mem_mib,
            disk_gib: Some(vm.disk_gib),
            run: vm.run,
            restart: vm.restart,
            net: Some(vm.net.mode),
            ..Default::default()
        };
        let node = match self.place(&owner, &req).await? {
            Some(n) => n,
            None => c.name().to_string(),
        };
        req.node = Some(node.clone());
        // The old record goes first, fenced on its revision: of two movers, one.
        let name = name_key(vm.owner.as_deref(), &vm.name);
        let mut txn = Txn::new()
            .when(Compare::ModRevision(key.clone(), cur.mod_revision))
            .delete(key);
        if let Some(ip) = vm.net.ipv4 {
            txn = txn.delete(format!("{LEASES}{ip}"));
        }
        if let Some(n) = c.store.get_json::<String>(&name).await? {
            if n.value == vm.id {
                txn = txn
                    .when(Compare::ModRevision(name.clone(), n.revision))
                    .delete(name);
            }
        }
        if !c.store.txn(txn).await?.is_committed() {
            return Ok(None);
        }
        let note = format!(
            "recreated on {node} from its image {} at {}: its node {from} went down, and its disk \
             (on {from}) is lost",
            vm.image,
            hutch_core::now()
        );
        let made = if node == c.name() {
            self.create(&owner, req).await
        } else {
            self.remote(&node, &owner, Op::Create { req: Box::new(req) })
                .await
                .and_then(|v| {
                    v.ok_or_else(|| crate::error::ApiError::Internal("no VM made".into()))
                })
        };
        let made = match made {
            Ok(v) => v,
            Err(e) => {
                // Not made: the old record comes back (still on the down node, `lost`), so the
                // VM does not vanish; the next pass tries again.
                if let Err(r) = self.records.create_vm(vm).await {
                    tracing::warn!(vm = %vm.key(), error = %r, "cluster: putting back the record of a VM that could not be recreated");
                }
                return Err(e);
            }
        };
        self.records
            .update_vm(&made.id, |v: &mut Vm| {
                v.recreated = Some(note.clone());
                Ok::<(), crate::error::ApiError>(())
            })
            .await?;
        Ok(Some(node))
    }

    /// Freezes this node's VMs: its lease is lost, so another node may soon make them again.
    pub(crate) async fn fence(self: &Arc<Self>) -> HashMap<String, Vm> {
        let vms = self.records.local_vms().await.unwrap_or_default();
        let mut frozen = HashMap::new();
        for vm in vms {
            let Some(h) = self.node.handle(&vm).filter(|h| self.node.vmm.is_alive(h)) else {
                continue;
            };
            let vmm = self.node.vmm.clone();
            let r = tokio::task::spawn_blocking(move || vmm.pause(&h)).await;
            match r {
                Ok(Ok(())) => {
                    frozen.insert(vm.id.clone(), vm);
                }
                Ok(Err(e)) => tracing::warn!(vm = %vm.key(), error = %e, "fencing: freezing"),
                Err(e) => tracing::warn!(vm = %vm.key(), error = %e, "fencing: freezing"),
            }
        }
        if !frozen.is_empty() {
            tracing::warn!(
                vms = frozen.len(),
                "cluster: lease lost; this node's VMs are frozen until it holds one again"
            );
        }
        frozen
    }

    /// With a lease again: frozen VMs still recorded here run on; the others are removed.
    /// Returns those whose record could not be read (still frozen, for the next try).
    pub(crate) async fn unfence(
        self: &Arc<Self>,
        frozen: HashMap<String, Vm>,
    ) -> HashMap<String, Vm> {
        let mut left = HashMap::new();
        for (id, vm) in frozen {
            let now = match self.records.vm_stored(&id).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(vm = %vm.key(), error = %e, "unfencing: reading its record");
                    left.insert(id, vm);
                    continue;
                }
            };
            match now {
                Some(v) if self.records.is_local(&v) => {
                    if let Some(h) = self.node.handle(&v) {
                        let vmm = self.node.vmm.clone();
                        let _ = tokio::task::spawn_blocking(move || vmm.resume(&h)).await;
                    }
                }
                _ => {
                    tracing::warn!(vm = %vm.key(), "cluster: a frozen VM was moved or deleted while this node was cut off; removing it here");
                    self.node.destroy(&vm).await;
                }
            }
        }
        if left.is_empty() {
            tracing::info!("cluster: lease held again; frozen VMs judged");
        }
        left
    }
}

/// Watches this node's lease: when it has gone unrenewed until a quarter of its TTL before it
/// may expire (or is lost), the node's VMs are frozen; once it is renewed again (or a new one
/// is held), they are judged (`unfence`). Runs for as long as the service lives.
pub(crate) async fn fencing(c: Arc<Cluster>, service: Weak<Service>) {
    let margin = c.opts.lease_ttl / 4;
    let mut frozen: Option<HashMap<String, Vm>> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(s) = service.upgrade() else { return };
        let safe = match c.lease().map(|l| l.state()) {
            Some(hutch_store_etcd::LeaseState::Alive { until }) => {
                std::time::Instant::now() + margin < until
            }
            _ => false,
        };
        match (&mut frozen, safe) {
            (None, false) => frozen = Some(s.fence().await),
            (Some(f), true) => {
                let left = s.unfence(std::mem::take(f)).await;
                frozen = (!left.is_empty()).then_some(left);
            }
            _ => {}
        }
    }
}
