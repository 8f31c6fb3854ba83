//! Templates (a VM booted once, set up by a start command, snapshotted when its ready command
//! succeeds) and warm pools of VMs restored from them (docs/templates.md).

use serde::{Deserialize, Serialize};

/// Where a template's build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateStatus {
    Building,
    Ready,
    Failed,
}

impl TemplateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateStatus::Building => "building",
            TemplateStatus::Ready => "ready",
            TemplateStatus::Failed => "failed",
        }
    }
}

/// A template, as its record holds it (`templates/OWNER/NAME`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    #[serde(default)]
    pub owner: Option<String>,
    /// The image it boots, as the user named it.
    pub image: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    #[serde(default)]
    pub disk_gib: Option<u64>,
    /// Run (detached, `sh -c`) once the VM has booted.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// Run (`sh -c`) until it exits 0; then the VM is snapshotted.
    #[serde(default)]
    pub ready_cmd: Option<String>,
    pub status: TemplateStatus,
    /// Why the last build failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The key of the (hidden) snapshot VMs start from, once built.
    #[serde(default)]
    pub snapshot: Option<String>,
    pub created_at: u64,
    #[serde(default)]
    pub built_at: Option<u64>,
    /// Milliseconds the last successful build took (boot, start, ready, snapshot).
    #[serde(default)]
    pub build_ms: Option<u64>,
    /// Builds started so far.
    #[serde(default)]
    pub builds: u32,
}

impl Template {
    /// Its key among its owner's templates (`alice/py`, or `py` for the admin's).
    pub fn key(&self) -> String {
        crate::vm_key(self.owner.as_deref(), &self.name)
    }
}

/// A warm pool of a template's VMs (`pools/OWNER/TEMPLATE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// The template's key.
    pub template: String,
    #[serde(default)]
    pub owner: Option<String>,
    /// Ready VMs to keep.
    pub min: u32,
    /// When fewer than `min` are ready, refill up to this many.
    pub max: u32,
    /// The nodes that keep it, each `min`..`max` VMs (a cluster): empty, the node holding the
    /// template's snapshot; [`ALL_NODES`], every ready node; else these nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

impl Pool {
    /// Whether node `here` keeps this pool; `home` is the node holding its snapshot's files
    /// (None, and `here` None, on a single node).
    pub fn kept_on(&self, here: Option<&str>, home: Option<&str>) -> bool {
        match self.nodes.as_slice() {
            [] => home.is_none() || home == here,
            [all] if all == ALL_NODES => true,
            names => here.is_some_and(|h| names.iter().any(|n| n == h)),
        }
    }
}

/// A pool's `nodes` entry that means every ready node.
pub const ALL_NODES: &str = "*";

/// The most nodes a pool names.
pub const MAX_POOL_NODES: usize = 64;

/// A `--nodes` flag's value as [`SetPool::nodes`]: `all` (or `*`) is every ready node, an
/// empty string the snapshot's node, else names separated by commas.
pub fn parse_pool_nodes(s: &str) -> Vec<String> {
    match s.trim() {
        "all" | ALL_NODES => vec![ALL_NODES.to_string()],
        s => s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect(),
    }
}

/// A pool's VMs on one node (`PoolView::by_node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolNodeView {
    pub node: String,
    pub ready: u32,
    pub starting: u32,
}

/// A pool as `hutch pool ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    pub template: String,
    pub min: u32,
    pub max: u32,
    /// Running and claimable now.
    pub ready: u32,
    /// Being restored.
    pub starting: u32,
    /// Where it is kept (see [`Pool::nodes`]); each of these keeps `min`..`max`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// In a cluster: its VMs per node (`ready` and `starting` are their sums).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_node: Vec<PoolNodeView>,
}

/// The most VMs one pool keeps.
pub const MAX_POOL: u32 = 64;

/// `POST /templates`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    pub image: String,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    #[serde(default)]
    pub disk_gib: Option<u64>,
    #[serde(default)]
    pub start_cmd: Option<String>,
    #[serde(default)]
    pub ready_cmd: Option<String>,
}

fn one() -> u32 {
    crate::api::DEFAULT_VCPUS
}
fn default_mem() -> u64 {
    crate::api::DEFAULT_MEM_MIB
}

/// `PUT /pools/{template}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPool {
    pub min: u32,
    #[serde(default)]
    pub max: Option<u32>,
    /// Which nodes keep it (a cluster; see [`Pool::nodes`]); absent, as it was (a new pool:
    /// the snapshot's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
}

/// The longest start or ready command (bytes).
pub const MAX_CMD: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_pools_are_kept() {
        let pool = |nodes: &[&str]| Pool {
            template: "t".into(),
            owner: None,
            min: 1,
            max: 1,
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        };
        // A single node keeps every pool; in a cluster, by default, the snapshot's node.
        assert!(pool(&[]).kept_on(None, None));
        assert!(pool(&[]).kept_on(Some("n2"), Some("n2")));
        assert!(!pool(&[]).kept_on(Some("n1"), Some("n2")));
        assert!(pool(&["*"]).kept_on(Some("n1"), Some("n2")));
        assert!(pool(&["n1", "n3"]).kept_on(Some("n3"), Some("n2")));
        assert!(!pool(&["n1", "n3"]).kept_on(Some("n2"), Some("n2")));
        assert!(!pool(&["n1"]).kept_on(None, None));
        // The `--nodes` flag.
        assert_eq!(parse_pool_nodes("all"), ["*"]);
        assert_eq!(parse_pool_nodes(" * "), ["*"]);
        assert_eq!(parse_pool_nodes("n1, n2,,"), ["n1", "n2"]);
        assert!(parse_pool_nodes("").is_empty());
    }
}
