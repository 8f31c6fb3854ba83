//! hutch's VM network on one host: a bridge hutch owns, a persistent TAP per VM (created by
//! ioctl, owned by the VM's QEMU uid, isolated from the other ports), addresses from one subnet,
//! and the nftables rules of [`nft`]; `rate_in` is a tc token bucket on the TAP. See
//! docs/networking.md.

pub mod nft;
pub mod overlay;
pub mod tap;

pub use nft::VmPolicy;

use hutch_core::net::Ipv4Net;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The default VM subnet: clear of Docker's (172.17.0.0/16, and its pools in 172.16.0.0/12 and
/// 192.168.0.0/16), Podman's (10.88.0.0/16) and Kubernetes' usual service and pod ranges.
pub const DEFAULT_SUBNET: &str = "10.123.0.0/16";
pub const DEFAULT_BRIDGE: &str = "hutch0";
/// The VM network's MTU unless `hutchd --mtu` says otherwise.
pub const DEFAULT_MTU: u32 = 1500;
/// The metadata service's port on the gateway address.
pub const DEFAULT_METADATA_PORT: u16 = 8169;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {message}")]
    Tool { tool: &'static str, message: String },
    #[error("{0}")]
    Config(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let context = context.into();
    move |source| NetError::Io { context, source }
}

/// One host's VM network.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// The bridge's name (also names the nftables tables unless `table` says otherwise).
    pub bridge: String,
    pub subnet: Ipv4Net,
    /// Name of hutch's `inet` and `bridge` tables.
    pub table: String,
    /// Port of hutch's DNS on the gateway address.
    pub dns_port: u16,
    /// Port of the metadata service on the gateway address (169.254.169.254:80 is sent there).
    pub metadata_port: u16,
    /// Port of the name check on the gateway address: TCP 80 and 443 of VMs whose egress is
    /// restricted by domain is sent there (Host / TLS SNI checked, then passed on).
    pub egress_port: u16,
    /// MTU of the bridge, the TAPs and the guests' NICs.
    pub mtu: u32,
}

impl NetConfig {
    /// A configuration checked for use: a subnet with room for VMs, a usable bridge name.
    pub fn new(bridge: &str, subnet: Ipv4Net) -> Result<NetConfig, NetError> {
        if subnet.prefix() > 30 || subnet.prefix() < 8 {
            return Err(NetError::Config(format!(
                "subnet {subnet}: the prefix must be between /8 and /30"
            )));
        }
        let ok_name = !bridge.is_empty()
            && bridge.len() < 16
            && bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !bridge.starts_with("ht");
        if !ok_name {
            return Err(NetError::Config(format!(
                "bridge name {bridge:?}: 1-15 letters, digits, - or _, not starting with \"ht\" (the TAPs' prefix)"
            )));
        }
        Ok(NetConfig {
            bridge: bridge.into(),
            subnet,
            table: bridge.replace('-', "_"),
            dns_port: 53,
            // Not 80: a web server on the host's wildcard address must not keep hutchd from
            // starting (guests still use 169.254.169.254:80; nftables sends it here).
            metadata_port: DEFAULT_METADATA_PORT,
            egress_port: DEFAULT_METADATA_PORT + 1,
            mtu: DEFAULT_MTU,
        })
    }

    /// The host's address on the VM network: the subnet's first address.
    /// The VXLAN device that joins nodes sharing this subnet (overlay.rs).
    pub fn overlay(&self) -> String {
        let b = &self.bridge;
        format!("{}-x", &b[..b.len().min(13)])
    }

    /// The bridge's MAC: the same on every node of a shared subnet (made from the gateway
    /// address), so that a VM moved to another node finds its gateway at the MAC it knows.
    pub fn gateway_mac(&self) -> String {
        let o = self.gateway().octets();
        format!("02:68:75:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1).unwrap_or(self.subnet.addr())
    }

    /// Whether `ip` may be given to a VM (inside the subnet, not the network, gateway or
    /// broadcast address).
    pub fn assignable(&self, ip: Ipv4Addr) -> bool {
        let last = self.subnet.nth(self.subnet.size() - 1);
        self.subnet.contains(ip)
            && ip != self.subnet.addr()
            && ip != self.gateway()
            && Some(ip) != last
    }

    /// The lowest assignable address `taken` says is free; None when the subnet is full.
    pub fn allocate(&self, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
        (2..self.subnet.size().saturating_sub(1))
            .filter_map(|i| self.subnet.nth(i))
            .find(|ip| !taken(*ip))
    }

    /// The kernel command line words that tell hutch-agent the VM's network.
    pub fn guest_cmdline(&self, ip: Ipv4Addr, domain: &str) -> String {
        format!(
            "hutch.ip={ip} hutch.gw={} hutch.dns={} hutch.domain={domain} hutch.mtu={}",
            self.gateway(),
            self.gateway(),
            self.mtu
        )
    }
}

/// Runs `prog args` with `input` on stdin; its stderr is the error.
fn run(prog: &'static str, args: &[&str], input: Option<&str>) -> Result<(), NetError> {
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(io(format!("running {prog}")))?;
    if let (Some(i), Some(mut w)) = (input, child.stdin.take()) {
        w.write_all(i.as_bytes())
            .map_err(io(format!("writing to {prog}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io(format!("running {prog}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Tool {
            tool: prog,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Makes the host accept connections to every address of `pool` (a `local` route on lo:
/// the admin routes the pool to this host; hutchd's SSH and proxy listeners then answer there).
pub fn route_local(pool: Ipv4Net) -> Result<(), NetError> {
    run(
        "ip",
        &[
            "route",
            "replace",
            "local",
            &pool.to_string(),
            "dev",
            "lo",
            "table",
            "local",
        ],
        None,
    )
}

/// Applies an nftables script in one transaction.
pub fn nft_apply(script: &str) -> Result<(), NetError> {
    run("nft", &["-f", "-"], Some(script))
}

/// The host side of the VM network: the bridge, the rules, the TAPs.
pub struct Network {
    cfg: NetConfig,
    /// Serializes rule changes (each is one nft transaction, but a VM's remove must not
    /// interleave with its re-add).
    lock: Mutex<()>,
    /// The overlay joining nodes that share the subnet (overlay.rs).
    overlay: Mutex<overlay::State>,
}

impl Network {
    /// Makes sure the bridge exists with the gateway address and is up, that the subnet does not
    /// overlap an address elsewhere on the host, and that the host forwards IPv4.
    pub fn setup(cfg: NetConfig) -> Result<Network, NetError> {
        let br = cfg.bridge.as_str();
        check_overlap(&cfg)?;
        if !tap::exists(br) {
            run("ip", &["link", "add", br, "type", "bridge"], None)?;
        }
        let gw = format!("{}/{}", cfg.gateway(), cfg.subnet.prefix());
        run("ip", &["addr", "replace", &gw, "dev", br], None)?;
        // The gateway's MAC, the same on every node of a subnet. A bridge with VMs on it keeps
        // the MAC they know (they would lose their gateway until their neighbour entry expired):
        // it changes at a start with none attached.
        let mac = cfg.gateway_mac();
        let now =
            std::fs::read_to_string(format!("/sys/class/net/{br}/address")).unwrap_or_default();
        if now.trim() != mac {
            if tap::ports(br).is_empty() {
                run("ip", &["link", "set", br, "address", &mac], None)?;
            } else {
                tracing::warn!(
                    bridge = br,
                    "the bridge keeps its MAC while VMs use it; a VM moved live to or from this \
                     node may miss its gateway for up to a minute until hutchd starts with none"
                );
            }
        }
        run(
            "ip",
            &["link", "set", br, "mtu", &cfg.mtu.to_string(), "up"],
            None,
        )?;
        // Guests get no IPv6; the bridge needs none either.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{br}/disable_ipv6"), "1");
        let fwd = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(fwd)
            .map(|s| s.trim() != "1")
            .unwrap_or(true)
        {
            std::fs::write(fwd, "1").map_err(io("enabling IPv4 forwarding"))?;
            tracing::info!("enabled IPv4 forwarding (net.ipv4.ip_forward=1) for VM traffic");
        }
        Ok(Network {
            cfg,
            lock: Mutex::new(()),
            overlay: Default::default(),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces hutch's tables with the rules for exactly `vms` (start, reconcile).
    pub fn sync(&self, vms: &[VmPolicy]) -> Result<(), NetError> {
        let _g = self.locked();
        nft_apply(&nft::full(&self.cfg, vms))
    }

    /// (Re)writes VM `v`'s rules, then makes its TAP (owned by `uid`) and attaches it.
    pub fn attach(
        &self,
        v: &VmPolicy,
        uid: Option<u32>,
        rate_in: Option<u64>,
    ) -> Result<(), NetError> {
        {
            let _g = self.locked();
            nft_apply(&nft::vm(&self.cfg, v))?;
        }
        self.port(v, uid, rate_in)
    }

    /// Makes VM `v`'s TAP (owned by `uid`) a port of the bridge, with its rate into the VM;
    /// its rules are left as they are (`attach` writes them, `sync` at start writes them all).
    pub fn port(
        &self,
        v: &VmPolicy,
        uid: Option<u32>,
        rate_in: Option<u64>,
    ) -> Result<(), NetError> {
        tap::create(&v.tap, uid).map_err(io(format!("creating TAP {}", v.tap)))?;
        tap::attach(&self.cfg.bridge, &v.tap, self.cfg.mtu).map_err(io(format!(
            "attaching TAP {} to {}",
            v.tap, self.cfg.bridge
        )))?;
        // The host's neighbour entry for the address names this VM's MAC from the start: an
        // address used by a VM deleted a moment ago (or the source of a restored copy) would
        // otherwise keep the old MAC until the entry goes stale (up to ~45 s of lost packets).
        let ip = v.ip.to_string();
        let _ = run(
            "ip",
            &[
                "neigh",
                "replace",
                &ip,
                "lladdr",
                &v.mac,
                "dev",
                &self.cfg.bridge,
                "nud",
                "stale",
            ],
            None,
        );
        self.overlay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attached
            .insert(v.ip);
        // No rate: nothing to run (`update` removes a rate taken away later).
        match rate_in {
            Some(_) => set_rate_in(&v.tap, rate_in),
            None => Ok(()),
        }
    }

    /// Rewrites VM `v`'s rules and rate limits (its TAP exists).
    pub fn update(&self, v: &VmPolicy, rate_in: Option<u64>) -> Result<(), NetError> {
        {
            let _g = self.locked();
            nft_apply(&nft::vm(&self.cfg, v))?;
        }
        set_rate_in(&v.tap, rate_in)
    }

    /// Adds addresses to VM `id`'s allowed set.
    pub fn allow_more(&self, id: &str, addrs: &[Ipv4Addr]) -> Result<(), NetError> {
        if addrs.is_empty() {
            return Ok(());
        }
        let _g = self.locked();
        nft_apply(&nft::allow_more(&self.cfg, id, addrs))
    }

    /// Removes VM `v`'s rules, its TAP and the host's neighbour entry for its address.
    pub fn detach(&self, v: &VmPolicy) -> Result<(), NetError> {
        {
            let _g = self.locked();
            nft_apply(&nft::remove_vm(&self.cfg, v))?;
        }
        self.overlay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attached
            .remove(&v.ip);
        let ip = v.ip.to_string();
        let _ = run("ip", &["neigh", "del", &ip, "dev", &self.cfg.bridge], None);
        tap::delete(&v.tap).map_err(io(format!("deleting TAP {}", v.tap)))
    }

    /// TAPs on the bridge (for reconciling after a crash).
    pub fn taps(&self) -> Vec<String> {
        tap::ports(&self.cfg.bridge)
            .into_iter()
            .filter(|p| p.starts_with("ht"))
            .collect()
    }

    /// Removes the tables and the bridge (and with it nothing a VM still uses: call once no
    /// VM of this network runs).
    pub fn teardown(cfg: &NetConfig) -> Result<(), NetError> {
        nft_apply(&nft::teardown(cfg))?;
        if tap::exists(&cfg.overlay()) {
            run("ip", &["link", "del", &cfg.overlay()], None)?;
            let _ = run(
                "ip",
                &["rule", "del", "pref", &overlay::TABLE.to_string()],
                None,
            );
        }
        if tap::exists(&cfg.bridge) {
            run("ip", &["link", "del", &cfg.bridge], None)?;
        }
        Ok(())
    }
}

/// A tc token bucket on `tap`'s egress (= into the VM), or none.
pub fn set_rate_in(tap: &str, rate: Option<u64>) -> Result<(), NetError> {
    match rate {
        Some(bits) => {
            let burst = ((bits / 8) / 50).max(16 * 1024);
            run(
                "tc",
                &[
                    "qdisc",
                    "replace",
                    "dev",
                    tap,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{bits}bit"),
                    "burst",
                    &burst.to_string(),
                    "latency",
                    "50ms",
                ],
                None,
            )
        }
        None => {
            // Nothing to delete is fine: the default qdisc is what "no limit" means.
            let _ = run("tc", &["qdisc", "del", "dev", tap, "root"], None);
            Ok(())
        }
    }
}

/// Refuses a subnet that overlaps an IPv4 address configured on another interface.
fn check_overlap(cfg: &NetConfig) -> Result<(), NetError> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map_err(io("running ip addr show"))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (Some(dev), Some(pos)) = (w.get(1), w.iter().position(|x| *x == "inet")) else {
            continue;
        };
        if *dev == cfg.bridge {
            continue;
        }
        let Some(net) = w.get(pos + 1).and_then(|a| {
            let (ip, p) = a.split_once('/')?;
            Ipv4Net::new(ip.parse().ok()?, p.parse().ok()?).ok()
        }) else {
            continue;
        };
        if net.overlaps(&cfg.subnet) {
            return Err(NetError::Config(format!(
                "subnet {} overlaps {net} on {dev}: pick another with hutchd --subnet",
                cfg.subnet
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_reserved_addresses() {
        let c = NetConfig::new("hb0", "10.9.0.0/29".parse().unwrap()).unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        let mut taken = vec![];
        while let Some(ip) = c.allocate(|i| taken.contains(&i)) {
            assert!(c.assignable(ip));
            taken.push(ip);
        }
        assert_eq!(taken.len(), 5, "{taken:?}");
        assert!(!c.assignable(Ipv4Addr::new(10, 9, 0, 7)));
        assert!(NetConfig::new("hb0", "10.9.0.0/31".parse().unwrap()).is_err());
        assert!(NetConfig::new("ht0", "10.9.0.0/24".parse().unwrap()).is_err());
        assert!(NetConfig::new("a b", "10.9.0.0/24".parse().unwrap()).is_err());
    }
}
