//! Warm pools (docs/templates.md): VMs restored from a template ahead of time, waiting
//! (`Vm::pool`) until a create claims one. A claim renames the VM, gives it the caller's name
//! and a new machine identity in the guest, in one store transaction and one agent request:
//! no boot, no restore. A background task keeps every pool filled within host capacity; pools
//! and their VMs are records, so they survive a restart of hutchd.

use super::Service;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::records::{POOLS, SNAPSHOTS, TEMPLATES};
use hutch_core::snapshot::Snapshot;
use hutch_core::template::{
    Pool, PoolNodeView, PoolView, SetPool, Template, TemplateStatus, ALL_NODES, MAX_POOL,
    MAX_POOL_NODES,
};
use hutch_core::timers::VmTimers;
use hutch_core::{names, Vm, VmState};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The pools' gauges in the Prometheus exposition format.
pub fn pools_text(pools: &[PoolView]) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    for (name, help, pick) in [
        ("hutch_pool_ready", "Warm pool VMs ready to be claimed.", 0),
        (
            "hutch_pool_target",
            "Warm pool VMs a pool keeps ready (its min).",
            1,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in pools {
            let v = if pick == 0 { p.ready } else { p.min };
            let t = p.template.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(o, "{name}{{template=\"{t}\"}} {v}");
        }
    }
    o
}

/// How long after a claim its pool is refilled.
const REFILL_AFTER_CLAIM: Duration = Duration::from_millis(500);

/// How often pools are checked when nothing signals a change.
const REFILL_EVERY: Duration = Duration::from_secs(5);

impl Service {
    /// Sets the warm pool of `caller`'s template `template`: `min` ready VMs, refilled up to
    /// `max` (default `min`) when fewer are ready, on each of its nodes. `min` 0 removes the
    /// pool.
    pub async fn set_pool(
        self: &Arc<Self>,
        caller: &Caller,
        template: &str,
        req: SetPool,
    ) -> Result<PoolView, ApiError> {
        let t = self.template_for(caller, template).await?;
        let max = req.max.unwrap_or(req.min);
        if req.min > MAX_POOL || max > MAX_POOL || max < req.min {
            return Err(ApiError::Invalid(format!(
                "min and max must be 0 to {MAX_POOL}, with min <= max (got {} and {max})",
                req.min
            )));
        }
        let nodes = match req.nodes {
            Some(n) => self.pool_nodes(n).await?,
            None => self
                .records
                .get::<Pool>(POOLS, &t.key())
                .await?
                .map(|p| p.nodes)
                .unwrap_or_default(),
        };
        let p = Pool {
            template: t.key(),
            owner: t.owner.clone(),
            min: req.min,
            max,
            nodes,
        };
        if req.min == 0 {
            self.remove_pool(&t.key()).await?;
        } else {
            self.records.put(POOLS, &t.key(), &p).await?;
            self.pools_changed();
        }
        Ok(self.pool_view(&p, false))
    }

    /// Checks a pool's `nodes`: known nodes that run VMs, or [`ALL_NODES`] alone; none on a
    /// single node.
    async fn pool_nodes(&self, nodes: Vec<String>) -> Result<Vec<String>, ApiError> {
        if nodes.is_empty() {
            return Ok(nodes);
        }
        if self.cluster.get().is_none() {
            return Err(ApiError::Invalid(
                "nodes: this hutchd runs alone (nodes are for clusters, hutchd --etcd)".into(),
            ));
        }
        if nodes.len() > MAX_POOL_NODES {
            return Err(ApiError::Invalid(format!(
                "nodes: at most {MAX_POOL_NODES} (got {})",
                nodes.len()
            )));
        }
        if nodes.iter().any(|n| n == ALL_NODES) {
            return match nodes.len() {
                1 => Ok(nodes),
                _ => Err(ApiError::Invalid("nodes: \"*\" (all) stands alone".into())),
            };
        }
        let known = self.nodes(&Caller::local_admin()).await?;
        for (i, n) in nodes.iter().enumerate() {
            if nodes[..i].contains(n) {
                return Err(ApiError::Invalid(format!("nodes: {n:?} twice")));
            }
            let k = known
                .iter()
                .find(|k| k.name == *n)
                .ok_or_else(|| ApiError::NotFound {
                    kind: "node",
                    name: n.clone(),
                })?;
            if !k.roles.iter().any(|r| r == "node") {
                return Err(ApiError::Invalid(format!(
                    "nodes: {n} does not run VMs (its roles: {})",
                    k.roles.join(",")
                )));
            }
        }
        Ok(nodes)
    }

    /// The pools of `caller`'s templates, with how many VMs are ready (on every node).
    pub async fn pools_of(&self, caller: &Caller) -> Result<Vec<PoolView>, ApiError> {
        self.views(caller, false).await
    }

    async fn views(&self, caller: &Caller, local: bool) -> Result<Vec<PoolView>, ApiError> {
        let mut v: Vec<PoolView> = self
            .records
            .list::<Pool>(POOLS)
            .await?
            .into_iter()
            .filter(|p| caller.sees(p.owner.as_deref()))
            .map(|p| self.pool_view(&p, local))
            .collect();
        v.sort_by(|a, b| a.template.cmp(&b.template));
        Ok(v)
    }

    /// Every pool's counts on this node (metrics: each node reports its own; a pool it does
    /// not keep has a target of 0 here).
    pub async fn all_pools(&self) -> Vec<PoolView> {
        let Ok(plan) = self.pool_plan().await else {
            return Vec::new();
        };
        let mut v = self
            .views(&Caller::local_admin(), true)
            .await
            .unwrap_or_default();
        for p in &mut v {
            if plan.get(&p.template).is_none_or(|k| k.kept.is_none()) {
                (p.min, p.max) = (0, 0);
            }
        }
        v
    }

    /// `p` as shown: its VMs on every node (`local`: on this one only).
    fn pool_view(&self, p: &Pool, local: bool) -> PoolView {
        let by_node = self.pool_counts_by_node(&p.template);
        let here = self.records.local_node();
        let mut v = PoolView {
            template: p.template.clone(),
            min: p.min,
            max: p.max,
            ready: 0,
            starting: 0,
            nodes: p.nodes.clone(),
            by_node: Vec::new(),
        };
        for (node, (ready, starting)) in by_node {
            if local && node != here {
                continue;
            }
            v.ready += ready;
            v.starting += starting;
            if let Some(node) = node.filter(|_| !local) {
                v.by_node.push(PoolNodeView {
                    node,
                    ready,
                    starting,
                });
            }
        }
        v
    }

    /// (ready, being made) VMs of pool `key` on this node; a VM warming up is still being made.
    fn pool_counts(&self, key: &str) -> (u32, u32) {
        let here = self.records.local_node();
        self.pool_counts_by_node(key)
            .remove(&here)
            .unwrap_or_default()
    }

    /// (ready, being made) VMs of pool `key` by node. Whether another node's VM has warmed up
    /// is not known here: running, it counts as ready.
    fn pool_counts_by_node(&self, key: &str) -> BTreeMap<Option<String>, (u32, u32)> {
        let warming = self
            .warming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.records.fold_vms(|it| {
            let mut m: BTreeMap<Option<String>, (u32, u32)> = BTreeMap::new();
            for v in it.filter(|v| v.pool.as_deref() == Some(key)) {
                let e = m.entry(v.node.clone()).or_default();
                match v.state {
                    VmState::Running if !warming.contains(&v.id) => e.0 += 1,
                    VmState::Running | VmState::Creating => e.1 += 1,
                    _ => {}
                }
            }
            m
        })
    }

    /// Removes pool `key` and its idle VMs.
    pub(crate) async fn remove_pool(self: &Arc<Self>, key: &str) -> Result<(), ApiError> {
        self.records.delete(POOLS, key).await?;
        self.drain_pool(key).await
    }

    /// Deletes this node's idle VMs of pool `key` (a rebuild or removal of its template; the
    /// other nodes' go at their next refill, see [`Service::tidy_pools`]).
    pub(crate) async fn drain_pool(self: &Arc<Self>, key: &str) -> Result<(), ApiError> {
        let idle: Vec<Vm> = self.records.fold_local_vms(|it| {
            it.filter(|v| v.pool.as_deref() == Some(key) && v.state != VmState::Creating)
                .cloned()
                .collect()
        });
        for v in idle {
            self.delete_pool_vm(&v.id, key).await;
        }
        Ok(())
    }

    /// Deletes VM `id` if it still waits in pool `key` (not claimed meanwhile: checked under
    /// its lock). Its guest is not asked to shut down: a pool VM holds nothing of anyone's.
    pub(crate) async fn delete_pool_vm(self: &Arc<Self>, id: &str, key: &str) {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let vm = match self.records.vm_by_id(id).await {
            Ok(Some(v)) if v.pool.as_deref() == Some(key) && self.records.is_local(&v) => v,
            _ => return,
        };
        if let Err(e) = self.delete_locked(&vm, false).await {
            tracing::warn!(vm = %vm.name, pool = key, error = %e, "removing a pool VM");
        }
    }

    /// Wakes the refill task.
    pub(crate) fn pools_changed(&self) {
        self.pool_wake.notify_one();
    }

    /// Claims a ready VM of `t`'s pool for a create named `name` (a random name when None):
    /// renamed, its timers set, its guest given the new hostname and a new machine id. None
    /// when no VM is ready.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        t: &Template,
        snap: &Snapshot,
        name: Option<&str>,
        timers: &VmTimers,
    ) -> Result<Option<Vm>, ApiError> {
        let key = t.key();
        loop {
            // The longest-waiting ready VM: warmed up, its start long settled.
            let warming = self
                .warming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let cand = self.records.fold_local_vms(|it| {
                it.filter(|v| {
                    v.pool.as_deref() == Some(key.as_str())
                        && v.state == VmState::Running
                        && !warming.contains(&v.id)
                        // Of the template's current build (an older one's go at the next tidy).
                        && v.mem.from.as_deref() == Some(snap.name.as_str())
                })
                .min_by_key(|v| v.created_at)
                .cloned()
            });
            let Some(cand) = cand else {
                return Ok(None);
            };
            let lock = self.lock_for(&cand.id);
            let _g = lock.lock().await;
            let new_name = match name {
                Some(n) => n.to_string(),
                None => names::random_name(),
            };
            if name.is_some()
                && self
                    .records
                    .vm(&hutch_core::vm_key(t.owner.as_deref(), &new_name))
                    .await?
                    .is_some()
            {
                return Err(ApiError::Conflict(format!(
                    "sandbox {new_name:?} already exists"
                )));
            }
            let t0 = std::time::Instant::now();
            let claimed = self
                .records
                .rename_vm(&cand.id, &new_name, |v| {
                    v.pool = None;
                    v.timers = timers.clone();
                })
                .await?;
            let Some(vm) = claimed else {
                // Claimed by someone else meanwhile (or the name was taken): try the next.
                continue;
            };
            if vm.pool.is_some() || vm.state != VmState::Running {
                continue;
            }
            // Its idle time (auto-pause) counts from the claim, not from its restore.
            self.touch(&vm.id);
            // The refill waits a moment: the VM just handed out gets the CPUs for its first
            // requests instead of sharing them with a restore.
            let wake = self.pool_wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REFILL_AFTER_CLAIM).await;
                wake.notify_one();
            });
            // The guest takes its new name; its address and MAC were its own already.
            let renamed = t0.elapsed();
            match self.node.personalize(&vm).await {
                Ok(()) => {
                    tracing::debug!(vm = %vm.name, ?renamed, total = ?t0.elapsed(), "pool VM claimed");
                    self.metrics
                        .pool_claims
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(Some(vm));
                }
                Err(e) => {
                    // Its lock is held here.
                    tracing::warn!(vm = %vm.name, error = %e, "a claimed pool VM did not take its identity; removed");
                    let _ = self.delete_locked(&vm, false).await;
                }
            }
        }
    }

    /// Starts the task that keeps every pool filled: on a change (a claim, a new pool, a
    /// build) and every few seconds.
    pub(crate) fn start_pools(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(s) = me.upgrade() else { return };
                s.refill().await;
                let wake = s.pool_wake.clone();
                drop(s);
                let _ = tokio::time::timeout(REFILL_EVERY, wake.notified()).await;
            }
        });
    }

    /// One pass over the pools: this node's VMs of pools it no longer keeps (or of an old
    /// build, or beyond `max`) go; then each pool it keeps that has fewer than `min` ready gets
    /// VMs up to `max`, one at a time, while the host and the owner's quota admit them.
    async fn refill(self: &Arc<Self>) {
        let Ok(plan) = self.pool_plan().await else {
            return;
        };
        self.tidy_pools(&plan).await;
        for (p, t, snap) in plan.into_values().filter_map(|k| k.kept) {
            let (ready, starting) = self.pool_counts(&p.template);
            if ready + starting >= p.min || t.status == TemplateStatus::Failed {
                continue;
            }
            let owner = Caller {
                account: t.owner.clone().unwrap_or_default(),
                admin: t.owner.is_none(),
            };
            for _ in (ready + starting)..p.max {
                // Cordoned or draining meanwhile (a refill takes a while): no more.
                if !self.keeps_pools().await.unwrap_or(false) {
                    return;
                }
                let name = format!("pool-{}", &names::random_id()[..8]);
                // On a node other than the snapshot's, its files are copied first (once).
                let r = self
                    .restore_copy(
                        &owner,
                        &snap,
                        Some(name),
                        VmTimers::default(),
                        Some(p.template.clone()),
                    )
                    .await;
                match r {
                    Ok(vm) => {
                        self.warm_up(&vm).await;
                        self.warming
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&vm.id);
                        self.pools_changed();
                    }
                    Err(e) => {
                        tracing::info!(pool = %p.template, error = %e, "pool not refilled for now");
                        break;
                    }
                }
            }
        }
    }

    /// Whether this node keeps pool VMs at all: it runs VMs and takes new ones (not cordoned
    /// nor draining). Its own lease is not asked: a node that lost it for a moment is still
    /// the one that runs its VMs.
    async fn keeps_pools(&self) -> Result<bool, ApiError> {
        let Some(c) = self.cluster.get() else {
            return Ok(true);
        };
        Ok(self
            .nodes(&Caller::local_admin())
            .await?
            .iter()
            .any(|n| n.name == c.name() && !n.cordoned && n.roles.iter().any(|r| r == "node")))
    }

    /// Every pool, whether this node keeps it and from which snapshot. An error (the store
    /// unreachable) gives no plan: nothing is removed on a partial view.
    async fn pool_plan(&self) -> Result<BTreeMap<String, Plan>, ApiError> {
        let open = self.keeps_pools().await?;
        let here = self.records.local_node();
        let mut plan = BTreeMap::new();
        for p in self.records.list::<Pool>(POOLS).await? {
            let t = self.records.get::<Template>(TEMPLATES, &p.template).await?;
            let snap = match t.as_ref().and_then(|t| t.snapshot.clone()) {
                Some(k) => self.records.get::<Snapshot>(SNAPSHOTS, &k).await?,
                None => None,
            };
            let kept = match (t, snap) {
                (Some(t), Some(s)) if open && p.kept_on(here.as_deref(), s.node.as_deref()) => {
                    Some((p.clone(), t, s))
                }
                _ => None,
            };
            plan.insert(p.template.clone(), Plan { kept });
        }
        Ok(plan)
    }

    /// Removes this node's pool VMs that `plan` has no use for: of a pool gone or not kept
    /// here, made from an older build, not running, or beyond the pool's `max`.
    async fn tidy_pools(self: &Arc<Self>, plan: &BTreeMap<String, Plan>) {
        let warming = self
            .warming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut idle: Vec<Vm> = self.records.fold_local_vms(|it| {
            it.filter(|v| v.pool.is_some() && v.state != VmState::Creating)
                .filter(|v| !warming.contains(&v.id))
                .cloned()
                .collect()
        });
        // Oldest first: they are claimed first, and stay when a pool shrinks.
        idle.sort_by_key(|v| v.created_at);
        let mut running: BTreeMap<&str, u32> = BTreeMap::new();
        for v in &idle {
            let key = v.pool.as_deref().unwrap_or_default();
            let keep = match plan.get(key).and_then(|k| k.kept.as_ref()) {
                Some((p, _, snap)) if v.mem.from.as_deref() == Some(snap.name.as_str()) => {
                    let n = running.entry(key).or_default();
                    *n += u32::from(v.state == VmState::Running);
                    v.state == VmState::Running && *n <= p.max
                }
                _ => false,
            };
            if !keep {
                tracing::info!(vm = %v.name, pool = key, "removing a pool VM this node has no use for");
                self.delete_pool_vm(&v.id, key).await;
            }
        }
    }
    /// Runs one process in a new pool VM, so that what a claim's first exec needs is warm in
    /// the guest (under TCG, the code translated; anywhere, the pages faulted in).
    async fn warm_up(&self, vm: &Vm) {
        if let Err(e) = self
            .run_in(vm, "true", false, Some(Duration::from_secs(10)))
            .await
        {
            tracing::debug!(vm = %vm.name, error = %e, "warming up a pool VM");
        }
    }
}

/// What a node does with one pool: keep it (from this template and snapshot), or not.
struct Plan {
    kept: Option<(Pool, Template, Snapshot)>,
}
