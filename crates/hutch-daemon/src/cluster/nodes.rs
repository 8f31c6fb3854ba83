//! Nodes: their records, membership by lease, and `hutch nodes` / `cordon` / `uncordon`.
//!
//! ```text
//! nodes/NAME   NodeRecord: address, version, roles, cordoned, when it joined (kept)
//! live/NAME    Live: bound to the node's lease; refreshed every third of the TTL with its
//!              capacity; etcd deletes it when the lease expires (the node is then `down`)
//! ```

use super::Cluster;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::{admin_only, Service};
use hutch_core::cluster::{NodeState, NodeView};
use hutch_core::status::HostCapacity;
use hutch_store::kv::{StoreError, StoreExt, Txn};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

pub const NODES: &str = "nodes/";
pub const LIVE: &str = "live/";

/// What the cluster keeps of a node across its restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub advertise: Option<String>,
    pub version: String,
    pub roles: Vec<String>,
    #[serde(default)]
    pub cordoned: bool,
    #[serde(default)]
    pub draining: bool,
    pub joined_at: u64,
    /// The certificate (PEM chain) its API serves over TLS: other nodes forwarding to it
    /// trust exactly this (None: plain HTTP on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    /// Where its E2B API listens for other nodes (the advertised host, `--e2b-listen`'s port),
    /// and the certificate it serves there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2b: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2b_tls_cert: Option<String>,
    /// Its VM network (`--subnet`; None: `--network off`): nodes with the same one share it
    /// (overlay.rs), at their overlay addresses (the `--advertise` host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<std::net::Ipv4Addr>,
}

/// A live node's heartbeat (bound to its lease).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Live {
    pub lease: i64,
    pub started_at: u64,
    pub seen_at: u64,
    pub capacity: HostCapacity,
}

impl Cluster {
    /// Records this node (its record keeps `cordoned` and `joined_at` across restarts) and
    /// starts the membership task: a lease, `live/NAME` bound to it and refreshed; when the
    /// lease is lost (etcd unreachable past the TTL), a new one and `live/NAME` again.
    pub async fn join(self: &Arc<Self>, service: &Arc<Service>) -> Result<(), StoreError> {
        let key = format!("{NODES}{}", self.name());
        let mut rec = NodeRecord {
            name: self.name().to_string(),
            advertise: self.opts.advertise.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            roles: self.opts.roles.names(),
            cordoned: false,
            draining: false,
            joined_at: hutch_core::now(),
            tls_cert: None,
            e2b: None,
            e2b_tls_cert: None,
            subnet: service
                .node
                .net
                .as_ref()
                .map(|n| n.settings.cfg.subnet.to_string()),
            overlay: super::overlay::overlay_address(self.opts.advertise.as_deref()).await,
        };
        loop {
            let cur = self.store.get_json::<NodeRecord>(&key).await?;
            let txn = match &cur {
                Some(c) => {
                    rec.cordoned = c.value.cordoned;
                    rec.draining = c.value.draining;
                    rec.joined_at = c.value.joined_at;
                    Txn::new().when(hutch_store::kv::Compare::ModRevision(
                        key.clone(),
                        c.revision,
                    ))
                }
                None => Txn::new().when(hutch_store::kv::Compare::Absent(key.clone())),
            };
            if self
                .store
                .run_txn(txn.put_json(&key, &rec)?, None)
                .await?
                .is_committed()
            {
                break;
            }
        }
        let (me, svc) = (self.clone(), Arc::downgrade(service));
        let first = self.beat_once(service).await;
        if let Err(e) = first {
            tracing::warn!(error = %e, "cluster: first heartbeat");
        }
        tokio::spawn(async move { me.membership(svc).await });
        Ok(())
    }

    /// Grants a lease if none is held, and writes `live/NAME` bound to it.
    async fn beat_once(&self, service: &Service) -> Result<(), StoreError> {
        let lease = match self.lease().filter(|l| l.is_alive()) {
            Some(l) => l,
            None => {
                let l = Arc::new(self.store.grant(self.opts.lease_ttl).await?);
                tracing::info!(node = %self.name(), lease = format!("{:x}", l.id()), ttl = ?l.ttl(), "cluster: joined");
                self.set_lease(Some(l.clone()));
                l
            }
        };
        let live = Live {
            lease: lease.id(),
            started_at: service.started_at,
            seen_at: hutch_core::now(),
            capacity: service.host_capacity().await,
        };
        let key = format!("{LIVE}{}", self.name());
        self.store
            .run_txn(Txn::new().put_json(key, &live)?, Some(lease.id()))
            .await?;
        Ok(())
    }

    async fn membership(self: Arc<Self>, service: Weak<Service>) {
        let every = self.opts.lease_ttl / 3;
        tokio::spawn(super::failover::fencing(self.clone(), service.clone()));
        loop {
            let lost = self.lease();
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = async { match &lost { Some(l) => l.lost().await, None => std::future::pending().await } } => {
                    tracing::warn!(node = %self.name(), "cluster: membership lease lost; joining again");
                    self.set_lease(None);
                }
            }
            let Some(s) = service.upgrade() else { return };
            if let Err(e) = self.beat_once(&s).await {
                tracing::warn!(error = %e, "cluster: heartbeat");
            }
        }
    }
}

impl Cluster {
    /// Records the certificate this node's API serves (other nodes pin it when they forward).
    pub async fn set_tls_cert(&self, pem: Option<String>) -> Result<(), StoreError> {
        self.update_record(|r| r.tls_cert = pem.clone()).await
    }

    /// Records where this node's E2B API listens for other nodes (the advertised host with
    /// `port`; nothing without `--advertise`) and its certificate.
    pub async fn set_e2b(&self, port: u16, pem: Option<String>) -> Result<(), StoreError> {
        let Some(host) = self
            .opts
            .advertise
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, _)| h.to_string())
        else {
            return Ok(());
        };
        let addr = format!("{host}:{port}");
        self.update_record(|r| {
            r.e2b = Some(addr.clone());
            r.e2b_tls_cert = pem.clone();
        })
        .await
    }

    async fn update_record(
        &self,
        mut f: impl FnMut(&mut NodeRecord) + Send,
    ) -> Result<(), StoreError> {
        let key = format!("{NODES}{}", self.name());
        self.store
            .update_json::<NodeRecord, StoreError, _>(&key, |r| {
                f(r);
                Ok(())
            })
            .await?;
        Ok(())
    }
}

impl Service {
    /// The nodes of the cluster (this one alone on a single node). Admin only: capacity is the
    /// host's business.
    pub async fn nodes(&self, caller: &Caller) -> Result<Vec<NodeView>, ApiError> {
        admin_only(caller, "listing nodes")?;
        let counts = self.records.fold_vms(|it| {
            let mut m: HashMap<Option<String>, (u64, u64)> = HashMap::new();
            for v in it {
                let e = m.entry(v.node.clone()).or_default();
                e.0 += 1;
                e.1 += u64::from(v.state.uses_memory());
            }
            m
        });
        let Some(c) = self.cluster.get() else {
            let (vms, active) = counts.get(&None).copied().unwrap_or_default();
            return Ok(vec![NodeView {
                name: local_host_name(),
                state: NodeState::Ready,
                cordoned: false,
                advertise: None,
                version: env!("CARGO_PKG_VERSION").into(),
                roles: super::Roles::default().names(),
                joined_at: self.started_at,
                seen_at: Some(hutch_core::now()),
                vms,
                active,
                capacity: Some(self.host_capacity().await),
            }]);
        };
        let (recs, _) = c.store.list_json::<NodeRecord>(NODES).await?;
        let live: HashMap<String, Live> = c
            .store
            .list_json::<Live>(LIVE)
            .await?
            .0
            .into_iter()
            .map(|v| (v.key[LIVE.len()..].to_string(), v.value))
            .collect();
        let mut out: Vec<NodeView> = recs
            .into_iter()
            .map(|r| {
                let r = r.value;
                let l = live.get(&r.name);
                let state = match (l, r.draining, r.cordoned) {
                    (None, _, _) => NodeState::Down,
                    (Some(_), true, _) => NodeState::Draining,
                    (Some(_), false, true) => NodeState::Cordoned,
                    (Some(_), false, false) => NodeState::Ready,
                };
                let (vms, active) = counts
                    .get(&Some(r.name.clone()))
                    .copied()
                    .unwrap_or_default();
                NodeView {
                    state,
                    cordoned: r.cordoned,
                    advertise: r.advertise,
                    version: r.version,
                    roles: r.roles,
                    joined_at: r.joined_at,
                    seen_at: l.map(|l| l.seen_at),
                    vms,
                    active,
                    capacity: l.map(|l| l.capacity.clone()),
                    name: r.name,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Cordons (no new VMs are placed on it) or uncordons node `name`.
    pub async fn cordon(
        &self,
        caller: &Caller,
        name: &str,
        cordoned: bool,
    ) -> Result<NodeView, ApiError> {
        admin_only(caller, "cordoning nodes")?;
        let c = self.clustered("cordoning")?;
        let key = format!("{NODES}{name}");
        c.store
            .update_json::<NodeRecord, ApiError, _>(&key, |r| {
                r.cordoned = cordoned;
                if !cordoned {
                    r.draining = false;
                }
                Ok(())
            })
            .await?;
        self.nodes(caller)
            .await?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ApiError::NotFound {
                kind: "node",
                name: name.to_string(),
            })
    }
}

/// The host's name, for a single node's `hutch nodes`.
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "local".into())
}
