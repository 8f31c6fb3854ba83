//! The live stream of lifecycle events (`hutch events`, `GET /api/v1/events`). Events are not
//! published by the code that changes VMs: one task follows the store's watch on `vms/` and
//! turns every change of a VM's state into an event, so whatever writes a record (the control
//! plane, the node runtime, later another node of a cluster) is seen the same way, in revision
//! order, once.
//!
//! Subscribers get events from the moment they subscribe; one that falls more than [`BUFFER`]
//! events behind is told how many it missed (it never slows the feed).

use crate::records::VMS;
use crate::service::Service;
use hutch_core::{Vm, VmEvent, VmState};
use hutch_store::kv::{EventKind, StoreError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it misses some.
pub const BUFFER: usize = 1024;

pub struct EventBus {
    tx: broadcast::Sender<VmEvent>,
    seq: AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(BUFFER).0,
            seq: AtomicU64::new(0),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventBus {
    /// Publishes what `vm` (its record now) going from `prev` (None: just created) means.
    pub fn change(&self, prev: Option<&Vm>, vm: &Vm) {
        let Some(prev) = prev else {
            return; // `creating`: announced as `created` once it runs
        };
        if vm.recreated.is_some() && prev.recreated != vm.recreated {
            self.publish(vm, "recreated", vm.recreated.clone());
        }
        if vm.migrated.is_some() && prev.node != vm.node {
            self.publish(vm, "migrated", vm.migrated.clone());
        }
        if prev.state == vm.state {
            return;
        }
        if vm.state == VmState::Starting && vm.restarts > prev.restarts {
            self.publish(vm, "restarting", prev.reason.clone());
        }
        self.publish(
            vm,
            VmEvent::kind_of(prev.state, vm.state),
            vm.reason.clone(),
        );
    }

    /// Publishes one event about `vm`.
    pub fn publish(&self, vm: &Vm, kind: &str, reason: Option<String>) {
        let e = VmEvent {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: now_ms(),
            kind: kind.to_string(),
            vm: vm.name.clone(),
            owner: vm.owner.clone(),
            id: vm.id.clone(),
            state: vm.state,
            reason,
        };
        tracing::info!(vm = %vm.key(), kind, state = vm.state.as_str(), "event");
        // No subscriber is fine.
        let _ = self.tx.send(e);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.tx.subscribe()
    }
}

/// Follows the store's `vms/` watch for as long as the service lives (list, then watch from
/// the list's revision; after a compaction or a lost connection, again).
pub fn follow(s: Arc<Service>) {
    let weak = Arc::downgrade(&s);
    drop(s);
    tokio::spawn(async move {
        loop {
            let Some(s) = weak.upgrade() else { return };
            let kv = s.records.kv().clone();
            drop(s);
            let snap = match kv.range(VMS).await {
                Ok(snap) => snap,
                Err(e) => {
                    tracing::warn!(error = %e, "event feed: listing VMs");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut known: HashMap<String, Vm> = snap
                .kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice::<Vm>(&kv.value).ok())
                .map(|v| (v.id.clone(), v))
                .collect();
            let mut w = match kv.watch(VMS, snap.revision).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "event feed: watching VMs");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                let ev = match w.next().await {
                    Ok(ev) => ev,
                    Err(StoreError::Compacted { .. }) => break,
                    Err(StoreError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "event feed");
                        break;
                    }
                };
                let Some(s) = weak.upgrade() else { return };
                let id = ev.key[VMS.len()..].to_string();
                match ev.kind {
                    EventKind::Put => {
                        let Some(vm) = ev
                            .value
                            .as_deref()
                            .and_then(|b| serde_json::from_slice::<Vm>(b).ok())
                        else {
                            continue;
                        };
                        let prev = known.insert(id, vm.clone());
                        s.events.change(prev.as_ref(), &vm);
                    }
                    EventKind::Delete => {
                        if let Some(prev) = known.remove(&id) {
                            s.events.publish(&prev, "deleted", None);
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_become_events_in_order_and_lag_is_reported() {
        let bus = EventBus::default();
        let mut early = bus.subscribe();
        let mut vm: Vm = serde_json::from_value(serde_json::json!({
            "id": "abc", "name": "web", "image": "busybox", "image_digest": "sha256:00",
            "vcpus": 1, "mem_mib": 64, "disk_gib": 1, "state": "creating", "reason": null,
            "pid": null, "accel": null, "created_at": 0, "started_at": null, "boot_ms": null,
            "kernel": null
        }))
        .unwrap();
        bus.change(None, &vm);
        let creating = vm.clone();
        vm.state = VmState::Running;
        bus.change(Some(&creating), &vm);
        bus.change(Some(&vm.clone()), &vm); // no state change: no event
        let running = vm.clone();
        vm.state = VmState::Failed;
        vm.reason = Some("killed".into());
        bus.change(Some(&running), &vm);
        let failed = vm.clone();
        vm.state = VmState::Starting;
        vm.restarts = 1;
        bus.change(Some(&failed), &vm);
        bus.publish(&vm, "deleted", None);
        let mut kinds = Vec::new();
        while let Ok(e) = early.try_recv() {
            kinds.push(e.kind);
        }
        assert_eq!(
            kinds,
            ["created", "failed", "restarting", "starting", "deleted"]
        );
        for _ in 0..BUFFER + 5 {
            bus.publish(&vm, "stopped", None);
        }
        assert!(matches!(
            early.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }
}
