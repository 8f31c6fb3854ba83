//! Request types of the API, shared by hutchd (which parses them) and the CLI (which sends
//! them), with their defaults in one place. Responses are the domain types themselves
//! ([`crate::Vm`], [`crate::Image`], [`crate::VmEvent`], [`crate::status::Status`]).

use serde::{Deserialize, Serialize};

/// The defaults of a create, the one place they live (REST, SSH and the CLI all use them).
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEM_MIB: u64 = 256;

/// A request to create a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: Option<String>,
    pub image: String,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    pub disk_gib: Option<u64>,
    /// Run the image's Entrypoint + Cmd as the VM's main process.
    #[serde(default)]
    pub run: bool,
    /// What happens when its QEMU exits without `hutch stop` (default: no).
    #[serde(default)]
    pub restart: crate::RestartPolicy,
}

fn one() -> u32 {
    DEFAULT_VCPUS
}
fn default_mem() -> u64 {
    DEFAULT_MEM_MIB
}

impl Default for CreateVm {
    fn default() -> Self {
        CreateVm {
            name: None,
            image: String::new(),
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            disk_gib: None,
            run: false,
            restart: Default::default(),
        }
    }
}
