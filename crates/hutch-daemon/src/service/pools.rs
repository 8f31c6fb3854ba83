//! Warm pools (docs/templates.md): VMs restored from a template ahead of time, waiting
//! (`Vm::pool`) until a create claims one. A claim renames the VM, gives it the caller's name
//! and a new machine identity in the guest, in one store transaction and one agent request:
//! no boot, no restore. A background task keeps every pool filled within host capacity; pools
//! and their VMs are records, so they survive a restart of hutchd.

use super::Service;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::records::{POOLS, SNAPSHOTS};
use hutch_core::snapshot::Snapshot;
use hutch_core::template::{Pool, PoolView, SetPool, Template, TemplateStatus, MAX_POOL};
use hutch_core::timers::VmTimers;
use hutch_core::{names, Vm, VmState};
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
    /// `max` (default `min`) when fewer are ready. `min` 0 removes the pool.
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
        if req.min == 0 {
            self.remove_pool(&t.key()).await?;
        } else {
            let p = Pool {
                template: t.key(),
                owner: t.owner.clone(),
                min: req.min,
                max,
            };
            self.records.put(POOLS, &t.key(), &p).await?;
            self.pools_changed();
        }
        Ok(self.pool_view(&t.key(), req.min, max))
    }

    /// The pools of `caller`'s templates, with how many VMs are ready.
    pub async fn pools_of(&self, caller: &Caller) -> Result<Vec<PoolView>, ApiError> {
        let mut v: Vec<PoolView> = self
            .records
            .list::<Pool>(POOLS)
            .await?
            .into_iter()
            .filter(|p| caller.sees(p.owner.as_deref()))
            .map(|p| self.pool_view(&p.template, p.min, p.max))
            .collect();
        v.sort_by(|a, b| a.template.cmp(&b.template));
        Ok(v)
    }

    /// Every pool's counts (metrics).
    pub async fn all_pools(&self) -> Vec<PoolView> {
        self.pools_of(&Caller::local_admin())
            .await
            .unwrap_or_default()
    }

    fn pool_view(&self, key: &str, min: u32, max: u32) -> PoolView {
        let (ready, starting) = self.pool_counts(key);
        PoolView {
            template: key.to_string(),
            min,
            max,
            ready,
            starting,
        }
    }

    /// (ready, being made) VMs of pool `key`; a VM warming up is still being made.
    fn pool_counts(&self, key: &str) -> (u32, u32) {
        let warming = self
            .warming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.records.fold_local_vms(|it| {
            let (mut ready, mut starting) = (0, 0);
            for v in it.filter(|v| v.pool.as_deref() == Some(key)) {
                match v.state {
                    VmState::Running if !warming.contains(&v.id) => ready += 1,
                    VmState::Running | VmState::Creating => starting += 1,
                    _ => {}
                }
            }
            (ready, starting)
        })
    }

    /// Removes pool `key` and its idle VMs.
    pub(crate) async fn remove_pool(self: &Arc<Self>, key: &str) -> Result<(), ApiError> {
        self.records.delete(POOLS, key).await?;
        self.drain_pool(key).await
    }

    /// Deletes the idle VMs of pool `key` (a rebuild or removal of its template).
    pub(crate) async fn drain_pool(self: &Arc<Self>, key: &str) -> Result<(), ApiError> {
        let idle: Vec<Vm> = self.records.fold_local_vms(|it| {
            it.filter(|v| v.pool.as_deref() == Some(key) && v.state != VmState::Creating)
                .cloned()
                .collect()
        });
        for v in idle {
            let _ = self.delete_unchecked(&v).await;
        }
        Ok(())
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
                    tracing::warn!(vm = %vm.name, error = %e, "a claimed pool VM did not take its identity; removed");
                    let _ = self.delete_unchecked(&vm).await;
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

    /// One pass over the pools: each that has fewer than `min` ready gets VMs up to `max`,
    /// one at a time, while the host and the owner's quota admit them.
    async fn refill(self: &Arc<Self>) {
        let Ok(pools) = self.records.list::<Pool>(POOLS).await else {
            return;
        };
        for p in pools {
            let (ready, starting) = self.pool_counts(&p.template);
            if ready + starting >= p.min {
                continue;
            }
            let Ok(Some(t)) = self
                .records
                .get::<Template>(crate::records::TEMPLATES, &p.template)
                .await
            else {
                continue;
            };
            let Some(snap_key) = t
                .snapshot
                .clone()
                .filter(|_| t.status != TemplateStatus::Failed)
            else {
                continue;
            };
            let Ok(Some(snap)) = self.records.get::<Snapshot>(SNAPSHOTS, &snap_key).await else {
                continue;
            };
            // A pool is refilled where its template's snapshot files are.
            if !self.records.is_here(snap.node.as_deref()) {
                continue;
            }
            let owner = Caller {
                account: t.owner.clone().unwrap_or_default(),
                admin: t.owner.is_none(),
            };
            for _ in (ready + starting)..p.max {
                let name = format!("pool-{}", &names::random_id()[..8]);
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

    /// Deletes `vm` for the system (pool upkeep), whatever account owns it.
    async fn delete_unchecked(self: &Arc<Self>, vm: &Vm) -> Result<(), ApiError> {
        let caller = Caller::local_admin();
        let shown = hutch_core::vm_key(vm.owner.as_deref(), &vm.name);
        self.delete(&caller, &shown).await
    }
}
