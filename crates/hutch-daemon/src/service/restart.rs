//! Restart policies (`hutch new --restart no|on-failure|always`): a reconciler that follows the
//! event feed and starts a `failed` VM again when its policy says so, with exponential back-off,
//! through the same path a user's `hutch start` takes. The desired state is the record: a VM
//! someone stopped or deleted meanwhile is left alone. At start it also looks at every VM that
//! is already failed (the node marks VMs whose QEMU died while hutchd or the host was down).

use super::Service;
use hutch_core::{Vm, VmState};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Longest wait between two automatic restarts of one VM.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A VM that ran this long before failing starts its back-off afresh.
pub const STABLE_AFTER: u64 = 300;

/// How long to wait before restart number `n` (0-based): 1 s, 2 s, 4 s, ... up to a minute.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.min(6)).min(MAX_BACKOFF)
}

/// Follows `failed` events (subscribed before this returns, so none is missed).
pub fn reconcile(s: Arc<Service>) {
    let mut rx = s.events.subscribe();
    tokio::spawn(async move {
        s.restart_failed().await;
        loop {
            match rx.recv().await {
                Ok(e) if e.kind == "failed" => {
                    // From the store: the in-memory view may not have this change yet.
                    if let Ok(Some(v)) = s.records.vm_stored(&e.id).await {
                        s.consider_restart(v);
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => s.restart_failed().await,
                Err(RecvError::Closed) => return,
            }
        }
    });
}

impl Service {
    /// Considers every failed VM.
    async fn restart_failed(self: &Arc<Self>) {
        if let Ok(vms) = self.list().await {
            for v in vms.into_iter().filter(|v| v.state == VmState::Failed) {
                self.consider_restart(v);
            }
        }
    }

    /// Schedules the restart of failed `vm` if its policy asks for one.
    pub(crate) fn consider_restart(self: &Arc<Self>, vm: Vm) {
        // Another node's VM is its runtime's to restart.
        if vm.state != VmState::Failed
            || !vm.restart.restarts(vm.clean_exit)
            || !self.records.is_local(&vm)
        {
            return;
        }
        let ran_long = vm
            .started_at
            .is_some_and(|t| hutch_core::now().saturating_sub(t) >= STABLE_AFTER);
        let n = if ran_long { 0 } else { vm.restarts };
        let delay = backoff(n);
        tracing::info!(vm = %vm.key(), restart = n + 1, ?delay, "restart policy: starting it again");
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let lock = me.lock_for(&vm.id);
            let guard = lock.lock().await;
            match me.records.vm_stored(&vm.id).await {
                Ok(Some(v)) if v.state == VmState::Failed && v.restart.restarts(v.clean_exit) => {}
                _ => return,
            }
            if let Err(e) = me.start_locked(&vm.id, n + 1).await {
                tracing::warn!(vm = %vm.key(), error = %e, "automatic restart failed");
                drop(guard);
                // A boot that failed made a `failed` event of its own; a start refused before
                // it began (no room on the host) did not: try again later.
                if let Ok(Some(v)) = me.records.vm_stored(&vm.id).await {
                    if v.state == VmState::Failed && v.restarts == vm.restarts {
                        me.consider_restart(Vm {
                            restarts: n + 1,
                            ..v
                        });
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let s: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
