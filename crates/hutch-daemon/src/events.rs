//! The live stream of lifecycle events (`hutch events`, `GET /api/v1/events`): every state
//! change the state machine makes is published here once, after it is persisted.
//!
//! Subscribers get events from the moment they subscribe; one that falls more than
//! [`BUFFER`] events behind is told how many it missed (it never slows the publisher).

use hutch_core::{Event, Vm, VmEvent, VmState};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Publishes the transition of `vm` (its record after the change) from `from` by `event`.
    pub fn transition(&self, vm: &Vm, from: VmState, event: &Event) {
        self.publish(
            vm,
            VmEvent::kind_of(from, event, vm.state),
            vm.reason.clone(),
        );
    }

    /// Publishes an event that is not a transition (created, deleted, restarting).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_events_in_order_and_lag_is_reported() {
        let bus = EventBus::default();
        let mut early = bus.subscribe();
        let vm: Vm = serde_json::from_value(serde_json::json!({
            "id": "abc", "name": "web", "image": "busybox", "image_digest": "sha256:00",
            "vcpus": 1, "mem_mib": 64, "disk_gib": 1, "state": "running", "reason": null,
            "pid": null, "accel": null, "created_at": 0, "started_at": null, "boot_ms": null,
            "kernel": null
        }))
        .unwrap();
        bus.transition(&vm, VmState::Starting, &Event::Booted);
        bus.publish(&vm, "deleted", None);
        let a = early.recv().await.unwrap();
        let b = early.recv().await.unwrap();
        assert_eq!((a.kind.as_str(), a.seq), ("started", 1));
        assert_eq!((b.kind.as_str(), b.seq), ("deleted", 2));
        for _ in 0..BUFFER + 5 {
            bus.publish(&vm, "stopped", None);
        }
        assert!(matches!(
            early.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }
}
