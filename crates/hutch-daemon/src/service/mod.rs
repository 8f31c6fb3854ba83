//! The control plane: every operation on VMs, images, accounts and tokens, for a [`Caller`].
//! Names are resolved in the caller's namespace here (tenancy.rs), requests validated, quotas
//! and host admission applied, and desired state recorded; then the node runtime
//! (`crate::node`) is asked to act. Nothing here knows HTTP or SSH: the front doors (REST in
//! `api`, SSH/SFTP in `ssh`, `sftp`) parse, call the service and render; errors are mapped to
//! each front door's statuses at its edge.
//!
//! Modules: `vms` (lifecycle), `tenancy` (names, quotas, admission), `images`, `files` (exec and
//! files in a VM), `accounts` (accounts, tokens, invites), `restart` (restart policies),
//! `ops` (status, metrics), `timers` (TTL, keepalive, auto-pause and auto-resume).

pub mod accounts;
pub mod clone_repo;
pub mod files;
pub mod images;
pub mod net;
pub mod ops;
pub mod pools;
pub mod restart;
#[cfg(test)]
mod snapshot_tests;
pub mod snapshots;
pub mod templates;
pub mod tenancy;
#[cfg(any(test, feature = "fakes"))]
pub mod testing;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod timer_tests;
pub mod timers;
pub mod vms;

pub use tenancy::{Admission, Ask, Reservation};
pub use vms::{CreateVm, ExecVm, DEFAULT_MEM_MIB, DEFAULT_VCPUS};

use crate::auth::{Caller, Tokens};
use crate::error::ApiError;
use crate::node::{Node, NodeConfig};
use crate::records::Records;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct Service {
    pub node: Arc<Node>,
    pub records: Records,
    pub images: Arc<hutch_image::ImageStore>,
    /// Pulls, imports and commits hold it shared; garbage collection holds it exclusively, so it
    /// never deletes the blobs of an image still being made.
    pub image_ops: tokio::sync::RwLock<()>,
    pub tokens: Tokens,
    pub admission: Admission,
    /// Admitted creates and starts whose records do not count yet (see `admit`).
    pending: tenancy::Pending,
    /// Snapshot, pause and restore work holds it shared; collecting unused layers and snapshot
    /// files holds it exclusively, so it never removes files being made.
    pub snap_ops: tokio::sync::RwLock<()>,
    /// One per VM id (and per pull): lifecycle operations on one VM never interleave.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Lifecycle events (fed from the store's watch, see events.rs).
    pub events: crate::events::EventBus,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Wakes the warm pools' refill task (pools.rs).
    pub pool_wake: Arc<tokio::sync::Notify>,
    /// Pool VMs restored but not warmed up yet: not claimable (pools.rs).
    pub(crate) warming: Mutex<std::collections::HashSet<String>>,
    /// The HTTP(S) proxy, once it runs (share links, `hutch ca`).
    pub front: std::sync::OnceLock<crate::net::proxy::Front>,
    /// The E2B-compatible API, once it runs (the proxy serves it on its domain too).
    pub e2b: std::sync::OnceLock<crate::e2b::Served>,
    /// When VMs were last used, for auto-pause (timers.rs).
    pub activity: Arc<timers::Activity>,
    /// This hutchd's membership, when it runs as a cluster node (`--etcd`).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// Links to other nodes' VMs kept between agent streams (agent/link.rs).
    pub(crate) idle_links: Arc<crate::agent::link::IdleLinks>,
    /// Unix seconds this service started.
    pub started_at: u64,
}

impl Service {
    pub fn new(node: Arc<Node>, tokens: Tokens, admission: Admission) -> Service {
        Service {
            records: node.records.clone(),
            images: node.images.clone(),
            metrics: node.metrics.clone(),
            node,
            image_ops: tokio::sync::RwLock::new(()),
            snap_ops: tokio::sync::RwLock::new(()),
            tokens,
            admission,
            pending: Default::default(),
            locks: Mutex::new(HashMap::new()),
            events: Default::default(),
            front: Default::default(),
            e2b: Default::default(),
            pool_wake: Default::default(),
            warming: Default::default(),
            activity: Default::default(),
            cluster: Default::default(),
            idle_links: Default::default(),
            started_at: hutch_core::now(),
        }
    }

    /// The node's configuration.
    pub fn cfg(&self) -> &NodeConfig {
        &self.node.cfg
    }

    pub(crate) fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        l.entry(key.to_string()).or_default().clone()
    }

    pub(crate) fn drop_lock(&self, key: &str) {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Starts what runs beside the requests: the event feed, the restart reconciler and the
    /// reaper of VM timers.
    pub fn start_background(self: &Arc<Self>) {
        crate::events::follow(self.clone());
        restart::reconcile(self.clone());
        self.start_pools();
        timers::reap_in_background(self);
        if self.cluster.get().is_some() {
            self.serve_intents();
            self.start_failover();
            self.start_overlay();
            self.collect_copies();
        }
    }
}

/// A caller's identity check for admin-only operations.
pub(crate) fn admin_only(caller: &Caller, what: &str) -> Result<(), ApiError> {
    if caller.admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!("{what} is for admins")))
    }
}
