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
}

/// The longest start or ready command (bytes).
pub const MAX_CMD: usize = 4096;
