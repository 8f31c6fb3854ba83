//! Snapshots: a VM's memory, device state and disk, frozen so that new VMs start from them
//! (docs/snapshots.md), and what a VM's record keeps about its own memory and disk layers.

use serde::{Deserialize, Serialize};

/// Where a VM's RAM and disk come from, and its saved state while it is paused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMemory {
    /// The snapshot whose memory file the VM's RAM maps copy-on-write; None: the VM's own
    /// memory file (a cold boot, or a VM that has been paused and resumed since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Frozen disk layers under the VM's writable disk, top first (`DATA_DIR/layers/ID.qcow2`),
    /// above the empty filesystem every disk starts from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// Its saved state, while it is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<SavedState>,
    /// The snapshot it was made from (name, for people), when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// Device state (and RAM, when it is not in a memory file) written by a pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The RAM is in the VM's memory file, not in the state.
    pub ram_in_file: bool,
    pub bytes: u64,
    /// When it was saved (Unix seconds).
    pub at: u64,
}

/// A snapshot of a VM, as its record holds it (`snapshots/ID`, named per owner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    /// The account that owns it; None: the local admin.
    #[serde(default)]
    pub owner: Option<String>,
    /// The VM it was taken from (its name then, and its id).
    pub vm: String,
    pub vm_id: String,
    pub created_at: u64,
    /// What a VM made from it is: these are the source VM's.
    pub image: String,
    pub image_digest: String,
    #[serde(default)]
    pub image_config_digest: Option<String>,
    #[serde(default)]
    pub image_layers: Vec<String>,
    #[serde(default)]
    pub image_config: Option<crate::ImageConfig>,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub disk_gib: u64,
    #[serde(default)]
    pub run: bool,
    /// The network settings copies get (their address is their own).
    #[serde(default)]
    pub net: crate::net::VmNet,
    /// Its RAM is in its memory file (restores map it); otherwise in its state.
    pub ram_in_file: bool,
    /// Its disk: frozen layers, top first.
    pub layers: Vec<String>,
    /// Bytes its state and memory file take on disk.
    pub bytes: u64,
    /// Milliseconds the source VM was stopped to take it.
    #[serde(default)]
    pub pause_ms: u64,
    /// Hidden from listings: made for one operation (a fork) and removed after it.
    #[serde(default)]
    pub internal: bool,
    /// The cluster node whose disk holds its files (None on a single node): VMs made from it
    /// prefer it; another node copies the files first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Snapshot {
    /// Its key among its owner's snapshots (`alice/base`, or `base` for the admin's).
    pub fn key(&self) -> String {
        match &self.owner {
            Some(o) => format!("{o}/{}", self.name),
            None => self.name.clone(),
        }
    }
}
