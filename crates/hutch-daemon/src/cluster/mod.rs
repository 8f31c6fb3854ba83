//! hutchd as one node of a cluster on etcd (`hutchd --etcd`): the shared state is etcd (every
//! record, through `hutch_store_etcd::EtcdStore`), the shared secrets are copied from it
//! (`secrets`), and membership is a lease (`nodes`): each node keeps `live/NAME` bound to its
//! lease and refreshed with its capacity; when the lease expires (hutchd dead, or cut off from
//! etcd), etcd deletes it and every node sees that node `down`.
//!
//! Which VMs a node runs is in their records (`Vm::node`): a node's runtime recovers, restarts,
//! reaps and pools only its own (`Records::is_local`), so that a VM recorded elsewhere is never
//! run here; at start, a node stops what it still runs of VMs recorded elsewhere.

pub mod agent_link;
pub mod arrive;
pub mod blobs;
pub mod dial;
pub mod drain;
pub mod extents;
pub mod failover;
pub mod forward;
pub mod intents;
pub mod migrate;
pub mod nodes;
pub mod overlay;
pub mod owner_call;
pub mod route;
pub mod scale;
pub mod schedule;
pub mod secrets;
pub mod snap_files;

use hutch_store_etcd::{EtcdOptions, EtcdStore, Lease};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What this hutchd does in the cluster (`--roles`); all by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Serves the API and schedules.
    pub control: bool,
    /// Runs VMs.
    pub node: bool,
    /// Serves the HTTP(S) proxy to VM ports.
    pub proxy: bool,
    /// Serves DNS.
    pub dns: bool,
}

impl Default for Roles {
    fn default() -> Self {
        Roles {
            control: true,
            node: true,
            proxy: true,
            dns: true,
        }
    }
}

impl Roles {
    /// Parses `control,node,proxy,dns` (any non-empty subset).
    pub fn parse(s: &str) -> Result<Roles, String> {
        let mut r = Roles {
            control: false,
            node: false,
            proxy: false,
            dns: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "control" => r.control = true,
                "node" => r.node = true,
                "proxy" => r.proxy = true,
                "dns" => r.dns = true,
                "all" => r = Roles::default(),
                other => {
                    return Err(format!(
                        "unknown role {other:?}: roles are control, node, proxy, dns"
                    ))
                }
            }
        }
        if r == (Roles {
            control: false,
            node: false,
            proxy: false,
            dns: false,
        }) {
            return Err("--roles needs at least one role".into());
        }
        Ok(r)
    }

    pub fn names(&self) -> Vec<String> {
        [
            (self.control, "control"),
            (self.node, "node"),
            (self.proxy, "proxy"),
            (self.dns, "dns"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| n.to_string())
        .collect()
    }
}

/// `hutchd --etcd ...`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub etcd: EtcdOptions,
    /// This node's name (`--node-name`; the host name by default).
    pub node_name: String,
    /// Where other nodes reach this one's API (`--advertise HOST:PORT`).
    pub advertise: Option<String>,
    pub roles: Roles,
    /// Membership lease TTL: a node is `down` this long after its hutchd stopped renewing.
    pub lease_ttl: Duration,
    /// How new VMs are spread over the nodes (`--placement`).
    pub placement: schedule::Placement,
    /// Auto-scaling commands and thresholds (`--scale-*`); None: off.
    pub scale: Option<scale::ScaleOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Store(#[from] hutch_store::kv::StoreError),
    #[error("shared secrets: {0}")]
    Secrets(#[from] secrets::SecretsError),
    #[error("{0}")]
    Invalid(String),
}

/// This hutchd's membership in the cluster.
pub struct Cluster {
    pub store: EtcdStore,
    pub opts: ClusterOptions,
    /// The lease `live/NAME` is bound to; replaced when it is lost and granted again.
    lease: Mutex<Option<Arc<Lease>>>,
    /// The leader's auto-scaling state.
    pub(crate) scaler: scale::Scaler,
    /// Migrations this node is the target of, prepared and not finished.
    pub(crate) arrivals: arrive::Arrivals,
}

impl crate::service::Service {
    /// This node's cluster, for `what`, which only a cluster does (a clear 400 otherwise).
    pub(crate) fn clustered(&self, what: &str) -> Result<Arc<Cluster>, crate::error::ApiError> {
        self.cluster.get().cloned().ok_or_else(|| {
            crate::error::ApiError::Invalid(format!(
                "{what} is for the nodes of a cluster: this hutchd runs alone (hutchd --etcd)"
            ))
        })
    }
}

impl Cluster {
    /// Connects to etcd; checks the node name.
    pub async fn connect(opts: ClusterOptions) -> Result<Arc<Cluster>, ClusterError> {
        hutch_core::names::validate_name(&opts.node_name)
            .map_err(|e| ClusterError::Invalid(format!("--node-name: {e}")))?;
        let store = EtcdStore::connect(&opts.etcd).await?;
        Ok(Arc::new(Cluster {
            store,
            opts,
            lease: Mutex::new(None),
            scaler: Default::default(),
            arrivals: Default::default(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.opts.node_name
    }

    /// The current lease, if this node holds one.
    pub fn lease(&self) -> Option<Arc<Lease>> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_lease(&self, l: Option<Arc<Lease>>) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = l;
    }
}
