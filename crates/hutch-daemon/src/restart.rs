//! Restart policies (`hutch new --restart no|on-failure|always`): a `failed` VM whose policy
//! says so is started again, with exponential back-off, by the same start path a user's
//! `hutch start` takes. The desired state is the record: a VM someone stopped or deleted
//! meanwhile is left alone.

use crate::manager::Manager;
use hutch_core::{Vm, VmState};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait between two automatic restarts of one VM.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A VM that ran this long before failing starts its back-off afresh.
pub const STABLE_AFTER: u64 = 300;

/// How long to wait before restart number `n` (0-based): 1 s, 2 s, 4 s, ... up to a minute.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.min(6)).min(MAX_BACKOFF)
}

impl Manager {
    /// Schedules the restart of failed `vm` if its policy asks for one. `clean`: the guest
    /// powered off by itself.
    pub(crate) fn consider_restart(self: &Arc<Self>, vm: Vm, clean: bool) {
        if !vm.restart.restarts(clean) {
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
            let key = vm.key();
            let lock = me.lock_for(&key);
            let _g = lock.lock().await;
            let still = match me.get(&key) {
                Ok(v)
                    if v.id == vm.id && v.state == VmState::Failed && v.restart.restarts(clean) =>
                {
                    v
                }
                _ => return,
            };
            let counted = me.store.update(hutch_store::VMS, &key, |v: &mut Vm| {
                v.restarts = n + 1;
            });
            if counted.is_err() {
                return;
            }
            me.events
                .publish(&still, "restarting", still.reason.clone());
            if let Err(e) = me.start_locked(&key).await {
                tracing::warn!(vm = %key, error = %e, "automatic restart failed");
                if let Ok(v) = me.get(&key) {
                    if v.id == vm.id && v.state == VmState::Failed {
                        drop(_g);
                        me.consider_restart(v, false);
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
