//! Domain types shared by the daemon, the store and the CLI: VM and image records, names, ids.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub mod api;
pub mod cluster;
pub mod lifecycle;
pub mod names;
pub mod net;
pub mod render;
pub mod snapshot;
pub mod status;
pub mod template;
pub mod timers;

pub use lifecycle::{Denied, Event, RestartPolicy, VmEvent, VmState};

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A VM as stored and as returned by the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vm {
    pub id: String,
    pub name: String,
    /// The image reference the VM was created from, as the user named it.
    pub image: String,
    /// Manifest digest of that image.
    pub image_digest: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub disk_gib: u64,
    pub state: VmState,
    /// Why the VM is `failed` (QEMU died, the boot did not finish, ...); None in other states.
    pub reason: Option<String>,
    pub pid: Option<u32>,
    pub accel: Option<String>,
    pub created_at: u64,
    pub started_at: Option<u64>,
    /// Milliseconds from QEMU launch to the agent answering, for the last start.
    pub boot_ms: Option<u64>,
    /// Guest kernel release reported by the agent.
    pub kernel: Option<String>,
    /// Microseconds it took to create the VM's writable disk.
    #[serde(default)]
    pub disk_us: Option<u64>,
    /// Whether the image's Entrypoint + Cmd runs as the VM's main process (at every start).
    #[serde(default)]
    pub run: bool,
    /// Guest pid of that main process in the current boot.
    #[serde(default)]
    pub main_pid: Option<i32>,
    /// The account that owns the VM; None: the local admin (unix socket, static admin token).
    #[serde(default)]
    pub owner: Option<String>,
    /// The config digest, layers and runtime config of the image the VM was made from, kept
    /// with the VM so that re-pulling a moving tag or deleting the image never breaks it.
    #[serde(default)]
    pub image_config_digest: Option<String>,
    #[serde(default)]
    pub image_layers: Vec<String>,
    #[serde(default)]
    pub image_config: Option<ImageConfig>,
    /// How the VM's QEMU is confined (uid, chroot, cgroup limits); kept while it is stopped so
    /// a restart keeps the same uid. None: not confined (hutchd --jail off, or never started).
    #[serde(default)]
    pub confinement: Option<Confinement>,
    /// What happens when its QEMU exits without `hutch stop` (`hutch new --restart`).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Automatic restarts since the VM last ran for a while (restart back-off).
    #[serde(default)]
    pub restarts: u32,
    /// Its last QEMU exited with status 0 (the guest powered off by itself): restart policy
    /// `on-failure` leaves such a VM alone.
    #[serde(default)]
    pub clean_exit: bool,
    /// Its network (mode `none` for VMs made before hutch had networking).
    #[serde(default)]
    pub net: net::VmNet,
    /// Microseconds setting up its network (TAP, rules, rates) took, at the last start.
    #[serde(default)]
    pub net_us: Option<u64>,
    /// Its memory, disk layers and saved state (docs/snapshots.md).
    #[serde(default)]
    pub mem: snapshot::VmMemory,
    /// Its TTL and auto-pause.
    #[serde(default)]
    pub timers: timers::VmTimers,
    /// The template whose warm pool it waits in (`OWNER/NAME` key), until a create claims it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The cluster node that runs it (`hutchd --node-name`); None on a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Made again by the cluster from its image after its node went down: what happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreated: Option<String>,
    /// Moved here from another node (`hutch migrate`, `hutch drain`): how and from where
    /// ("live from node n1", "at rest (paused) from node n1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated: Option<String>,
    /// Shown, never stored: its node is down (lease expired), so what it does is unknown.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
}

impl Vm {
    /// Its state as shown: `lost` while its node is down.
    pub fn shown_state(&self) -> &'static str {
        if self.lost {
            "lost"
        } else {
            self.state.as_str()
        }
    }

    /// Applies a lifecycle event: the new state, and the reason kept exactly while `failed`.
    pub fn apply(&mut self, event: &Event) -> Result<VmState, Denied> {
        let next = self.state.on(event)?;
        self.state = next;
        self.reason = match next {
            VmState::Failed => event
                .reason()
                .map(str::to_string)
                .or(self.reason.take())
                .or_else(|| Some("failed".into())),
            _ => None,
        };
        Ok(next)
    }

    /// The VM's key in the store: its name in its owner's namespace (`alice/web`), or the bare
    /// name for the local admin's VMs. Account names and VM names never contain `/`.
    pub fn key(&self) -> String {
        vm_key(self.owner.as_deref(), &self.name)
    }

    /// The image the VM was made from, as recorded with the VM (None for records written before
    /// hutch kept it).
    pub fn recorded_image(&self) -> Option<Image> {
        Some(Image {
            name: self.image.clone(),
            digest: self.image_digest.clone(),
            config_digest: self.image_config_digest.clone()?,
            layers: self.image_layers.clone(),
            config: self.image_config.clone()?,
            architecture: "amd64".into(),
            rootfs_size: 0,
            created_at: self.created_at,
            owner: None,
        })
    }
}

/// The store key of VM `name` owned by `owner` (see [`Vm::key`]).
pub fn vm_key(owner: Option<&str>, name: &str) -> String {
    match owner {
        Some(a) => format!("{a}/{name}"),
        None => name.to_string(),
    }
}

/// The store key of image `name` (normalised reference) owned by `owner`: the bare name for the
/// shared library (the admin's images), `~alice/NAME` for an account's private image. `~` never
/// occurs in a reference, so the two namespaces cannot collide.
pub fn image_key(owner: Option<&str>, name: &str) -> String {
    match owner {
        Some(a) => format!("~{a}/{name}"),
        None => name.to_string(),
    }
}

/// The confinement of one VM's QEMU process (docs/architecture.md, "Confinement").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Confinement {
    /// The unprivileged uid (and gid, the same number) QEMU runs as.
    pub uid: u32,
    pub gid: u32,
    /// The empty directory QEMU chroots into once it has opened its files.
    #[serde(default)]
    pub jail: Option<String>,
    /// QEMU's seccomp filter (`-sandbox on,...`).
    #[serde(default)]
    pub seccomp: bool,
    #[serde(default)]
    pub cgroup: Option<CgroupLimits>,
}

impl Confinement {
    /// The `Jail:` and `Cgroup:` lines of `describe`, as the CLI and the SSH front door print
    /// them (docs/architecture.md, "Confinement").
    pub fn describe(c: Option<&Confinement>) -> String {
        let Some(c) = c else {
            return "  Jail:    none (not started, or hutchd --jail off)\n".into();
        };
        let mut s = format!(
            "  Jail:    uid {}, chroot {}, seccomp {}\n",
            c.uid,
            c.jail.as_deref().unwrap_or("-"),
            if c.seccomp { "on" } else { "off" }
        );
        if let Some(g) = &c.cgroup {
            s.push_str(&format!(
                "  Cgroup:  v{} {}: memory {}, cpu {:.2} ({}/{} us), pids {}\n",
                g.version,
                g.path,
                mib(g.memory_max_bytes >> 20),
                g.cpu_quota_us as f64 / g.cpu_period_us.max(1) as f64,
                g.cpu_quota_us,
                g.cpu_period_us,
                g.pids_max
            ));
        }
        s
    }
}

/// A VM's cgroup and the limits written to it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CgroupLimits {
    /// 1 or 2.
    pub version: u8,
    /// The cgroup's path below each hierarchy's root, e.g. `/hutch/NODE/ID`.
    pub path: String,
    pub memory_max_bytes: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub pids_max: u64,
}

/// An SSH identity: an account is a set of public keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Account {
    pub name: String,
    pub admin: bool,
    /// OpenSSH public key lines.
    pub keys: Vec<String>,
    pub created_at: u64,
    /// Limits the admin set for this account; None: the daemon's defaults.
    #[serde(default)]
    pub quota: Option<Quota>,
}

/// What one account's VMs may add up to (all its VMs, running or stopped: a stopped VM keeps
/// its disk and can be started at any time).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Quota {
    pub vms: u32,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub disk_gib: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            vms: 20,
            vcpus: 16,
            mem_mib: 32 * 1024,
            disk_gib: 500,
        }
    }
}

/// The runtime configuration an image asks for (the OCI image config's `config` object).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub exposed_ports: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// An image in the local store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    /// Normalised reference, e.g. `busybox:latest`.
    pub name: String,
    /// Digest of the (OCI) manifest; keys the shared root filesystem.
    pub digest: String,
    pub config_digest: String,
    pub layers: Vec<String>,
    pub config: ImageConfig,
    pub architecture: String,
    /// Bytes of the unpacked root filesystem image.
    pub rootfs_size: u64,
    pub created_at: u64,
    /// The account whose private image this is; None: the shared library (the admin's).
    #[serde(default)]
    pub owner: Option<String>,
}

impl Image {
    /// The image's key in the store (see [`image_key`]).
    pub fn key(&self) -> String {
        image_key(self.owner.as_deref(), &self.name)
    }
}

/// A memory size in MiB as people write it: `512M`, `2G`.
pub fn mib(m: u64) -> String {
    if m >= 1024 && m.is_multiple_of(1024) {
        format!("{}G", m / 1024)
    } else {
        format!("{m}M")
    }
}

/// Left-aligned text columns separated by two spaces, as the CLI and the SSH front door print.
pub fn table(rows: Vec<Vec<String>>) -> String {
    let n = rows.first().map(|r| r.len()).unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The environment of a process started in a VM: image Env, then defaults for what is unset.
pub fn image_env(cfg: &ImageConfig, hostname: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for kv in &cfg.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.entry("HOSTNAME".into())
        .or_insert_with(|| hostname.to_string());
    env
}

/// Guest-controlled text made safe to show: control characters (terminal escapes included)
/// become `?`, except newlines and tabs.
pub fn clean_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_text_strips_escapes() {
        assert_eq!(
            clean_text("ok\x1b]0;pwned\x07\x1b[2J\r\nnext\tcol\u{9b}31m"),
            "ok?]0;pwned??[2J?\nnext\tcol?31m"
        );
    }
}
