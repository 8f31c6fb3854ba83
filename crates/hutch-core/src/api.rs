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
    /// The image to boot (empty when the VM starts from a snapshot).
    #[serde(default)]
    pub image: String,
    /// Start from this snapshot (`hutch snapshot`) instead of booting an image: its memory,
    /// processes and disk, with a new identity. Its size is the snapshot's.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Start from this template (a warm pool VM when one is ready).
    #[serde(default)]
    pub template: Option<String>,
    /// Lifetime (`10m`, `1h`); `keepalive` extends it.
    #[serde(default)]
    pub ttl: Option<String>,
    /// What happens when the TTL runs out: delete (default) or pause.
    #[serde(default)]
    pub on_expire: Option<crate::timers::OnExpire>,
    /// Pause after this long without exec, file, SSH or proxy activity; resume on activity.
    #[serde(default)]
    pub auto_pause: Option<String>,
    /// Resume by itself when paused and used (exec, files, SSH, the proxy), with or without
    /// auto-pause.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_resume: bool,
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
    /// none, internal or internet (default: internet where hutchd has a VM network).
    #[serde(default)]
    pub net: Option<crate::net::NetMode>,
    /// CIDRs and domains the VM may reach (then nothing else); repeatable.
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// CIDRs and domains the VM may not reach.
    #[serde(default)]
    pub deny_out: Vec<String>,
    /// Rate limits into / out of the VM (`10mbit`).
    #[serde(default)]
    pub rate_in: Option<String>,
    #[serde(default)]
    pub rate_out: Option<String>,
    /// A git repository cloned into the VM at its first boot.
    #[serde(default)]
    pub clone: Option<String>,
    /// Where it is cloned (default: /root/REPO, or the image's working directory's REPO).
    #[serde(default)]
    pub clone_dir: Option<String>,
    /// The cluster node to run it on (default: the scheduler picks one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
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
            snapshot: None,
            template: None,
            ttl: None,
            on_expire: None,
            auto_pause: None,
            auto_resume: false,
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            disk_gib: None,
            run: false,
            restart: Default::default(),
            net: None,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            rate_in: None,
            rate_out: None,
            clone: None,
            clone_dir: None,
            node: None,
        }
    }
}

/// `POST /images` with a JSON body: import the OCI layout or archive at `path` on hutchd's host
/// (admin only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    pub path: String,
    pub name: Option<String>,
}

/// `POST /images/pull`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    pub reference: String,
    /// Plain HTTP for a registry off loopback (loopback registries always use it).
    #[serde(default)]
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Record it under this name instead of the reference.
    pub name: Option<String>,
}

/// `POST /images/push`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushImage {
    pub image: String,
    pub reference: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// `POST /sandboxes/{name}/commit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitVm {
    pub reference: String,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub push: bool,
    #[serde(default)]
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// `POST /sandboxes/{name}/clone`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneVm {
    pub name: Option<String>,
}

/// `POST /sandboxes/{name}/snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotVm {
    pub name: String,
}

/// `POST /sandboxes/{name}/fork`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkVm {
    /// How many copies (default 1).
    pub count: Option<u32>,
    /// Names are PREFIX-1 ... PREFIX-N (default: the VM's name followed by -fork).
    pub name: Option<String>,
}

/// `POST /sandboxes/{name}/keepalive`: the TTL runs `secs` (default: the VM's own TTL) from now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keepalive {
    /// A duration (`10m`) or seconds.
    pub duration: Option<String>,
}

/// `POST /sandboxes/{name}/exec`: run a process in a VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecVm {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: std::collections::HashMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Standard input, base64.
    pub stdin: Option<String>,
    pub timeout_secs: Option<u64>,
    /// Run on a terminal of (rows, columns) (SSH sessions with a PTY; not part of the REST body).
    #[serde(skip)]
    pub tty: Option<(u16, u16)>,
    /// Keep stdin open for streaming (SSH sessions, the streaming exec form) instead of sending
    /// `stdin` whole (not part of the REST body).
    #[serde(skip)]
    pub stream_stdin: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_take_their_defaults() {
        let c: CreateVm = serde_json::from_str(r#"{"image":"busybox"}"#).unwrap();
        assert_eq!(
            c,
            CreateVm {
                image: "busybox".into(),
                ..Default::default()
            }
        );
        let back: CreateVm = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_json::from_str::<CreateVm>(r#"{"image":"x","bogus":1}"#).is_err());
        let e: ExecVm = serde_json::from_str(r#"{"argv":["true"]}"#).unwrap();
        assert_eq!((e.tty, e.stream_stdin), (None, false));
        assert!(serde_json::to_value(&e).unwrap().get("tty").is_none());
    }
}
