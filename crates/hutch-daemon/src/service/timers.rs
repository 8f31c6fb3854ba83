//! VM timers (`hutch_core::timers`): a TTL that deletes or pauses a VM when it runs out,
//! `keepalive` that extends it, and auto-pause after a time without activity, with the
//! auto-resume of a paused VM when a request needs it (docs/snapshots.md).
//!
//! Activity is kept in memory ([`Activity`]): when each VM was last used (exec, files, SSH,
//! HTTP through the proxy) and how many uses are in progress (a running process, an SFTP
//! session). The reaper ([`reap_in_background`]) looks at every VM about once a second. It
//! acts under the VM's lock, and so does a request that wakes a VM, so a use that begins while
//! the reaper decides is seen by it. Deadlines are in the records, so they hold across hutchd
//! restarts; idle time after a restart counts from the restart.

use super::Service;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::http::Method;
use hutch_core::api::{CreateVm, Keepalive};
use hutch_core::timers::{parse_duration, show_duration, OnExpire, VmTimers};
use hutch_core::{Vm, VmState};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How often the reaper looks, unless a test changes it ([`Activity::set_tick`]).
pub const TICK: Duration = Duration::from_secs(1);

/// The timers a create asks for (validated).
pub fn timers_of(req: &CreateVm) -> Result<VmTimers, ApiError> {
    let parse = |what: &str, v: &Option<String>| -> Result<Option<u64>, ApiError> {
        v.as_deref()
            .map(|s| parse_duration(s).map_err(|e| ApiError::Invalid(format!("{what}: {e}"))))
            .transpose()
    };
    let ttl_secs = parse("ttl", &req.ttl)?;
    if req.on_expire.is_some() && ttl_secs.is_none() {
        return Err(ApiError::Invalid("on_expire needs a ttl".into()));
    }
    Ok(VmTimers {
        ttl_secs,
        deadline: ttl_secs.map(|t| hutch_core::now() + t),
        on_expire: req.on_expire.unwrap_or_default(),
        auto_pause_secs: parse("auto_pause", &req.auto_pause)?,
        auto_resume: req.auto_resume,
    })
}

/// When VMs were last used and which uses are in progress (in memory only).
pub struct Activity {
    /// When this service started: no VM counts as idle for longer.
    since: Instant,
    vms: Mutex<HashMap<String, Use>>,
    /// VMs the reaper is acting on (one action per VM at a time).
    reaping: Mutex<HashSet<String>>,
    tick_ms: AtomicU64,
}

#[derive(Clone, Copy)]
struct Use {
    last: Instant,
    /// Uses in progress ([`InUse`] guards alive).
    open: u32,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            since: Instant::now(),
            vms: Mutex::default(),
            reaping: Mutex::default(),
            tick_ms: AtomicU64::new(TICK.as_millis() as u64),
        }
    }
}

impl Activity {
    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Use>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// VM `id` was used now.
    pub fn touch(&self, id: &str) {
        let now = Instant::now();
        self.vms()
            .entry(id.to_string())
            .and_modify(|u| u.last = now)
            .or_insert(Use { last: now, open: 0 });
    }

    /// A use of VM `id` that lasts until the guard is dropped; it counts as activity when it
    /// begins and when it ends, and the VM is not auto-paused meanwhile.
    pub fn begin(self: &Arc<Self>, id: &str) -> InUse {
        let now = Instant::now();
        self.vms()
            .entry(id.to_string())
            .and_modify(|u| {
                u.last = now;
                u.open += 1;
            })
            .or_insert(Use { last: now, open: 1 });
        InUse {
            a: self.clone(),
            id: id.to_string(),
        }
    }

    /// Whether a use of VM `id` is in progress.
    pub fn busy(&self, id: &str) -> bool {
        self.vms().get(id).is_some_and(|u| u.open > 0)
    }

    /// How long `vm` has gone unused at `now` (Unix seconds) and `at`: since its last use,
    /// its (re)start, or this service's start, whichever came last.
    pub fn idle(&self, vm: &Vm, now: u64, at: Instant) -> Duration {
        let started = Duration::from_secs(now.saturating_sub(vm.started_at.unwrap_or(0)));
        let used = self
            .vms()
            .get(&vm.id)
            .map(|u| at.saturating_duration_since(u.last))
            .unwrap_or(Duration::MAX);
        started
            .min(used)
            .min(at.saturating_duration_since(self.since))
    }

    /// How often the reaper looks (tests make it look often).
    pub fn set_tick(&self, d: Duration) {
        self.tick_ms
            .store(d.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms.load(Ordering::Relaxed))
    }

    /// Marks VM `id` as being reaped; None when it already is.
    fn claim(self: &Arc<Self>, id: &str) -> Option<Reaping> {
        let mut r = self.reaping.lock().unwrap_or_else(|e| e.into_inner());
        r.insert(id.to_string()).then(|| Reaping {
            a: self.clone(),
            id: id.to_string(),
        })
    }
}

/// A use of a VM in progress (see [`Activity::begin`]).
pub struct InUse {
    a: Arc<Activity>,
    id: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let now = Instant::now();
        if let Some(u) = self.a.vms().get_mut(&self.id) {
            u.last = now;
            u.open = u.open.saturating_sub(1);
        }
    }
}

/// The reaper's claim on a VM while it acts on it.
struct Reaping {
    a: Arc<Activity>,
    id: String,
}

impl Drop for Reaping {
    fn drop(&mut self) {
        self.a
            .reaping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Starts the reaper: about every [`TICK`] it deletes or pauses VMs whose TTL ran out and
/// pauses running VMs idle past their auto-pause. It holds the service weakly and ends with it.
pub fn reap_in_background(s: &Arc<Service>) {
    let weak = Arc::downgrade(s);
    tokio::spawn(async move {
        loop {
            let Some(s) = weak.upgrade() else { return };
            let tick = s.activity.tick();
            s.reap(hutch_core::now(), Instant::now());
            drop(s);
            tokio::time::sleep(tick).await;
        }
    });
}

/// What the reaper does to a VM.
#[derive(Clone, Copy)]
enum Due {
    Expired,
    Idle,
}

/// Whether a request that uses `vm` resumes it first: it has auto-pause set and is paused (or
/// on its way there or back).
pub fn wakes_on_use(vm: &Vm) -> bool {
    (vm.timers.auto_pause_secs.is_some() || vm.timers.auto_resume)
        && matches!(
            vm.state,
            VmState::Paused | VmState::Pausing | VmState::Resuming
        )
}

/// States the reaper acts in; it waits out the others (a VM being started, stopped, paused,
/// resumed, snapshotted or deleted) and looks again at its next tick.
fn settled(s: VmState) -> bool {
    matches!(
        s,
        VmState::Running | VmState::Stopped | VmState::Paused | VmState::Failed
    )
}

impl Service {
    /// VM `id` was used now (auto-pause counts from its last use).
    pub fn touch(&self, id: &str) {
        self.activity.touch(id)
    }

    /// `caller`'s VM `name` for a request that uses it (exec, files, SSH, the proxy), with
    /// the use held until the guard is dropped. A paused VM with auto-pause set is resumed
    /// first (see [`Service::wake`]); any other VM is returned as it is.
    pub async fn use_vm(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> Result<(Vm, InUse), ApiError> {
        let vm = self.vm_for(caller, name).await?;
        self.wake(vm).await
    }

    /// `vm` in use. With auto-pause set this happens under the VM's lock, where the reaper
    /// pauses it, and a VM paused (or being paused) is resumed first: of concurrent requests
    /// the first resumes it and the others find it running.
    pub(crate) async fn wake(self: &Arc<Self>, vm: Vm) -> Result<(Vm, InUse), ApiError> {
        // A VM on another node is woken and held there, by each agent link (agent_link.rs).
        if vm.timers.auto_pause_secs.is_none() && !vm.timers.auto_resume
            || self.runs_elsewhere(&vm).is_some()
        {
            let u = self.activity.begin(&vm.id);
            return Ok((vm, u));
        }
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let mut vm = self.by_id(&vm.id, &vm.name).await?;
        if vm.state == VmState::Paused && wakes_on_use(&vm) {
            let t = Instant::now();
            vm = self.resume_locked(&vm.id).await?;
            self.metrics
                .auto_resumed_total
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(vm = %vm.key(), ms = t.elapsed().as_millis() as u64, "auto-resumed for a request");
        }
        let u = self.activity.begin(&vm.id);
        Ok((vm, u))
    }

    /// VM `id` woken for a request the proxy has authorized; the VM as it is then.
    pub async fn wake_id(self: &Arc<Self>, id: &str) -> Result<Vm, ApiError> {
        let vm = self.by_id(id, id).await?;
        Ok(self.wake(vm).await?.0)
    }

    /// Extends the TTL of `caller`'s VM `name`: it now runs out `req.duration` from now, or
    /// the VM's own TTL from now. A VM without a TTL needs a duration (which gives it one).
    pub async fn keepalive(
        &self,
        caller: &Caller,
        name: &str,
        req: Keepalive,
    ) -> Result<Vm, ApiError> {
        let asked = req
            .duration
            .as_deref()
            .map(|d| parse_duration(d).map_err(|e| ApiError::Invalid(format!("keepalive: {e}"))))
            .transpose()?;
        let vm = self.vm_for(caller, name).await?;
        let body = serde_json::to_value(&req).map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Some(v) = self
            .on_owner_json(caller, &vm, Method::POST, "keepalive", Some(body))
            .await?
        {
            return Ok(v);
        }
        let secs = asked.or(vm.timers.ttl_secs).ok_or_else(|| {
            ApiError::Invalid(format!(
                "{name} has no TTL to extend: give a duration (keepalive {name} 10m)"
            ))
        })?;
        // Under the VM's lock: the reaper, which acts under it, sees the new deadline.
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        self.by_id(&vm.id, name).await?;
        let deadline = hutch_core::now() + secs;
        let vm = self
            .records
            .update_vm(&vm.id, |v: &mut Vm| {
                if v.state == VmState::Deleting {
                    return Err(ApiError::Conflict(format!("{} is being deleted", v.name)));
                }
                v.timers.deadline = Some(deadline);
                Ok(())
            })
            .await?;
        tracing::info!(vm = %vm.key(), secs, "keepalive");
        Ok(vm)
    }

    /// After a resume: a VM whose TTL ran out (and paused it) gets its whole TTL again.
    pub(crate) async fn rearm_ttl(&self, vm: Vm) -> Result<Vm, ApiError> {
        match (vm.timers.ttl_secs, vm.timers.deadline) {
            (Some(ttl), None) => {
                let deadline = hutch_core::now() + ttl;
                self.node
                    .update(&vm.id, |v| v.timers.deadline = Some(deadline))
                    .await
            }
            _ => Ok(vm),
        }
    }

    /// One look at every VM at `now` (Unix seconds) and `at`: starts what is due, each VM's
    /// action in a task of its own (never two at once for one VM). Returns their handles.
    pub(crate) fn reap(self: &Arc<Self>, now: u64, at: Instant) -> Vec<JoinHandle<()>> {
        let (due, live): (Vec<(String, Due)>, HashSet<String>) =
            self.records.fold_local_vms(|it| {
                let mut due = Vec::new();
                let mut live = HashSet::new();
                for v in it {
                    live.insert(v.id.clone());
                    if v.timers.deadline.is_some_and(|d| d <= now) {
                        due.push((v.id.clone(), Due::Expired));
                    } else if self.idle_past(v, now, at) {
                        due.push((v.id.clone(), Due::Idle));
                    }
                }
                (due, live)
            });
        self.activity.vms().retain(|id, _| live.contains(id));
        due.into_iter()
            .filter_map(|(id, what)| {
                let claim = self.activity.claim(&id)?;
                let me = self.clone();
                Some(tokio::spawn(async move {
                    let _claim = claim;
                    let r = match what {
                        Due::Expired => me.expire(&id, now).await,
                        Due::Idle => me.idle_pause(&id, now, at).await,
                    };
                    if let Err(e) = r {
                        tracing::warn!(vm = %id, error = %e, "timers: will try again");
                    }
                }))
            })
            .collect()
    }

    /// Whether `vm` runs with auto-pause set, no use in progress, and has been idle that long.
    fn idle_past(&self, vm: &Vm, now: u64, at: Instant) -> bool {
        let Some(after) = vm.timers.auto_pause_secs else {
            return false;
        };
        vm.state == VmState::Running
            && vm.pool.is_none()
            && !self.activity.busy(&vm.id)
            && self.activity.idle(vm, now, at) >= Duration::from_secs(after)
    }

    /// Deletes or pauses VM `id` if its TTL has run out at `now` (looked at again under its
    /// lock: a keepalive may have come first). A paused, stopped or failed VM that is to be
    /// paused is left as it is; the deadline is cleared.
    async fn expire(self: &Arc<Self>, id: &str, now: u64) -> Result<(), ApiError> {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(vm) = self.records.vm_by_id(id).await? else {
            return Ok(());
        };
        if vm.timers.deadline.is_none_or(|d| d > now) || !settled(vm.state) {
            return Ok(());
        }
        let then = vm.timers.on_expire;
        match then {
            OnExpire::Delete => {
                let why = "its TTL ran out: deleting it";
                self.events.publish(&vm, "expired", Some(why.into()));
                self.delete_locked(&vm, true).await?;
            }
            OnExpire::Pause if vm.state == VmState::Running => {
                let why = "its TTL ran out: pausing it";
                self.events.publish(&vm, "expired", Some(why.into()));
                // Cleared as the pause begins; put back if the VM could not be paused (it runs
                // on, and the next tick tries again).
                let old = vm.timers.deadline;
                let r = self.pause_locked(id, |v| v.timers.deadline = None).await;
                if let Err(e) = r {
                    self.node.update(id, |v| v.timers.deadline = old).await?;
                    return Err(e);
                }
            }
            OnExpire::Pause => {
                self.node.update(id, |v| v.timers.deadline = None).await?;
            }
        }
        self.metrics.expired_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm = %vm.key(), then = then.as_str(), "ttl ran out");
        Ok(())
    }

    /// Pauses VM `id` if it is still idle past its auto-pause (looked at again under its lock).
    async fn idle_pause(self: &Arc<Self>, id: &str, now: u64, at: Instant) -> Result<(), ApiError> {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(vm) = self.records.vm_by_id(id).await? else {
            return Ok(());
        };
        if !self.idle_past(&vm, now, at) {
            return Ok(());
        }
        let idle = show_duration(self.activity.idle(&vm, now, at).as_secs().max(1));
        let why = format!("no activity for {idle}: pausing it");
        self.events.publish(&vm, "idle", Some(why));
        self.pause_locked(id, |_| {}).await?;
        self.metrics
            .auto_paused_total
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm = %vm.key(), %idle, "auto-paused");
        Ok(())
    }
}
