//! Cluster nodes as `hutch nodes` and `GET /api/v1/nodes` show them (rendered here, once).

use crate::mib;
use crate::status::HostCapacity;
use serde::{Deserialize, Serialize};

/// Where a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Its hutchd holds its lease and takes new VMs.
    Ready,
    /// Holds its lease but takes no new VMs (`hutch cordon`).
    Cordoned,
    /// Cordoned, and its VMs are being moved away (`hutch drain`).
    Draining,
    /// Its lease expired: hutchd is dead or cut off from etcd. Its VMs are `lost`.
    Down,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Cordoned => "cordoned",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        }
    }
}

/// One node of the cluster (a single hutchd shows itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    pub cordoned: bool,
    /// Where other nodes reach its API (`--advertise`).
    pub advertise: Option<String>,
    pub version: String,
    pub roles: Vec<String>,
    /// Unix seconds it first joined.
    pub joined_at: u64,
    /// Unix seconds of its last heartbeat (None: down).
    pub seen_at: Option<u64>,
    /// VMs recorded on it, and how many of them use memory (starting, running, ...).
    pub vms: u64,
    pub active: u64,
    /// Its capacity and use as of its last heartbeat (None: down).
    pub capacity: Option<HostCapacity>,
}

impl NodeView {
    /// vCPUs not taken by active VMs.
    pub fn free_vcpus(&self) -> Option<u64> {
        self.capacity
            .as_ref()
            .map(|c| u64::from(c.cpus).saturating_sub(c.vcpus_active))
    }

    /// Guest memory admission still allows, in MiB.
    pub fn free_mem_mib(&self) -> Option<u64> {
        self.capacity
            .as_ref()
            .map(|c| c.mem_limit_mib.saturating_sub(c.mem_active_mib))
    }

    /// The `hutch nodes` table.
    pub fn table(nodes: &[NodeView]) -> String {
        let mut s = format!(
            "{:<16} {:<9} {:>4} {:>10} {:>10} {:>10} {:<8} {}\n",
            "NAME", "STATE", "VMS", "FREE CPU", "FREE MEM", "FREE DISK", "VERSION", "ADDRESS"
        );
        for n in nodes {
            let (cpu, mem, disk) = match &n.capacity {
                Some(c) => (
                    format!("{}/{}", n.free_vcpus().unwrap_or(0), c.cpus),
                    mib(n.free_mem_mib().unwrap_or(0)),
                    mib(c.disk_free_mib),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            s.push_str(&format!(
                "{:<16} {:<9} {:>4} {:>10} {:>10} {:>10} {:<8} {}\n",
                n.name,
                n.state.as_str(),
                n.vms,
                cpu,
                mem,
                disk,
                n.version,
                n.advertise.as_deref().unwrap_or("-")
            ));
        }
        s
    }
}

/// `GET /api/v1/stats`: the cluster in sums.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    /// Nodes by state.
    pub nodes: std::collections::BTreeMap<String, u64>,
    /// VMs by state.
    pub vms: std::collections::BTreeMap<String, u64>,
    /// Sums over the live nodes.
    pub cpus: u64,
    pub vcpus_active: u64,
    pub mem_limit_mib: u64,
    pub mem_active_mib: u64,
    pub disk_free_mib: u64,
}

impl ClusterStats {
    pub fn of(nodes: &[NodeView], vms: &[crate::Vm]) -> ClusterStats {
        let mut s = ClusterStats {
            nodes: Default::default(),
            vms: Default::default(),
            cpus: 0,
            vcpus_active: 0,
            mem_limit_mib: 0,
            mem_active_mib: 0,
            disk_free_mib: 0,
        };
        for n in nodes {
            *s.nodes.entry(n.state.as_str().into()).or_default() += 1;
            if let Some(c) = &n.capacity {
                s.cpus += u64::from(c.cpus);
                s.vcpus_active += c.vcpus_active;
                s.mem_limit_mib += c.mem_limit_mib;
                s.mem_active_mib += c.mem_active_mib;
                s.disk_free_mib += c.disk_free_mib;
            }
        }
        for v in vms {
            *s.vms.entry(v.state.as_str().into()).or_default() += 1;
        }
        s
    }
}

/// `POST /api/v1/sandboxes/{name}/migrate` (`hutch migrate NAME --to NODE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The node to move it to.
    pub to: String,
}

/// What a live migration did (`hutch migrate`, and per VM `hutch drain`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migrated {
    /// The VM as recorded now, on its new node.
    pub vm: crate::Vm,
    pub from: String,
    pub to: String,
    /// How long the guest did not run: QEMU's switch-over on the source plus the target's
    /// taking over (ms).
    pub downtime_ms: u64,
    /// From the request to the VM running on the target (ms).
    pub total_ms: u64,
    /// Bytes sent for the writable disk and for RAM and device state (as they went over the
    /// wire: zero areas and pages cost next to nothing).
    pub disk_bytes: u64,
    pub ram_bytes: u64,
}

impl Migrated {
    /// One line for people (a VM moved at rest, paused or stopped, had no guest to pause).
    pub fn line(&self) -> String {
        let how = match self.vm.state {
            crate::VmState::Running => format!("guest paused {} ms", self.downtime_ms),
            s => format!("{}, as it was", s.as_str()),
        };
        format!(
            "moved {} from {} to {} in {:.1} s ({how}; {} of disk, {} of RAM sent)",
            self.vm.name,
            self.from,
            self.to,
            self.total_ms as f64 / 1000.0,
            crate::mib(self.disk_bytes >> 20),
            crate::mib(self.ram_bytes >> 20),
        )
    }
}

/// What `hutch drain NODE` did (`POST /api/v1/nodes/{name}/drain`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drained {
    pub node: String,
    /// Every VM moved, in the order they went.
    pub migrated: Vec<Migrated>,
    /// The VMs that could not be moved (they stay on the node, which stays cordoned).
    pub failed: Vec<DrainFailure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainFailure {
    pub name: String,
    pub error: String,
}
