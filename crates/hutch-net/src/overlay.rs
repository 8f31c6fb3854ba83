//! One VM network over several nodes: nodes whose hutchd use the same `--subnet` route each
//! other's VMs, so that a VM keeps its address wherever it runs (live migration) and VMs on
//! different nodes reach each other. Routed, not bridged: every VM is a /32 behind its node's
//! gateway (the guest routes everything there), and a node sends what is for a VM elsewhere to
//! that node through a VXLAN device used as a point-to-point link per peer:
//!
//! - the device `BRIDGE-x` (VNI [`VNI`], UDP port [`PORT`], no learning) has a MAC made from the
//!   node's address ([`mac_of`]); each peer is a permanent neighbour (its address at its MAC)
//!   and a forwarding entry (that MAC at its address);
//! - each VM of another node is a route `IP/32 via PEER dev BRIDGE-x onlink`, and what VMs send
//!   to a peer's host goes back through the device too (rule `from SUBNET lookup 4799`);
//! - hutch's rules (nft.rs) let in from the device only what goes to the bridge, take VXLAN
//!   packets only from peers (`peers` set), keep VMs' traffic to other nodes' VMs to their
//!   account (the account's set holds its VMs on other nodes too), and masquerade none of it.
//!
//! The bridge has the same MAC on every node of a subnet ([`crate::NetConfig::gateway_mac`]).

use crate::{run, NetError, Network};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

/// The VXLAN network identifier of hutch's overlay.
pub const VNI: u32 = 0x68_75;
/// The overlay's UDP port (not 4789: other overlays on the host, Docker's, use that one).
pub const PORT: u16 = 4799;
/// The routing table (and rule preference) for what VMs send to peers' hosts: through the
/// overlay, as those hosts' packets to the VMs came (so that strict reverse path filtering on
/// their underlay interface has nothing to drop).
pub const TABLE: u32 = 4799;
/// VXLAN's overhead (outer IPv4, UDP, VXLAN and inner Ethernet headers).
const OVERHEAD: u32 = 50;

/// The overlay MAC of the node at `ip`.
pub fn mac_of(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:68:78:{:02x}:{:02x}:{:02x}", o[1] ^ o[0], o[2], o[3])
}

/// A VM that runs on another node of the shared subnet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteVm {
    pub ip: Ipv4Addr,
    pub account: Option<String>,
    /// Its node's address.
    pub node: Ipv4Addr,
}

/// What this node made of the overlay (so that a sync runs commands only for changes).
#[derive(Default)]
pub(crate) struct State {
    /// The device exists, made for this local address.
    local: Option<Ipv4Addr>,
    peers: BTreeSet<Ipv4Addr>,
    routes: BTreeMap<Ipv4Addr, Ipv4Addr>,
    /// What the `peers` set holds.
    nft_peers: BTreeSet<Ipv4Addr>,
    /// Remote VMs' addresses in account sets.
    accounts: BTreeMap<Ipv4Addr, Option<String>>,
    /// Addresses of the VMs whose TAP is on this node's bridge.
    pub(crate) attached: HashSet<Ipv4Addr>,
}

impl Network {
    /// Makes the overlay match: `local`, this node's address (None: no overlay); `peers`, the
    /// other nodes sharing this subnet; `remote`, the VMs running on them. A VM whose TAP is
    /// here (it is arriving, or leaving) is not routed away.
    pub fn sync_overlay(
        &self,
        local: Option<Ipv4Addr>,
        peers: &[Ipv4Addr],
        remote: &[RemoteVm],
    ) -> Result<(), NetError> {
        let mut st = self.overlay.lock().unwrap_or_else(|e| e.into_inner());
        let dev = self.cfg.overlay();
        let peers: BTreeSet<Ipv4Addr> = peers
            .iter()
            .copied()
            .filter(|p| Some(*p) != local)
            .collect();
        let local = match local {
            Some(l) if !peers.is_empty() => l,
            _ => {
                if st.local.is_some() {
                    self.drop_overlay(&mut st)?;
                }
                return Ok(());
            }
        };
        if st.local != Some(local) {
            self.drop_overlay(&mut st)?;
            self.make_device(&dev, local)?;
            st.local = Some(local);
        }
        let table = TABLE.to_string();
        for p in st.peers.difference(&peers).copied().collect::<Vec<_>>() {
            let (ip, mac) = (p.to_string(), mac_of(p));
            let _ = run(
                "ip",
                &["route", "del", &format!("{ip}/32"), "table", &table],
                None,
            );
            let _ = run("ip", &["neigh", "del", &ip, "dev", &dev], None);
            let _ = run(
                "bridge",
                &["fdb", "del", &mac, "dev", &dev, "dst", &ip, "self"],
                None,
            );
            st.peers.remove(&p);
        }
        for p in peers
            .difference(&st.peers.clone())
            .copied()
            .collect::<Vec<_>>()
        {
            let (ip, mac) = (p.to_string(), mac_of(p));
            run(
                "ip",
                &[
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    &mac,
                    "dev",
                    &dev,
                    "nud",
                    "permanent",
                ],
                None,
            )?;
            run(
                "bridge",
                &[
                    "fdb",
                    "replace",
                    &mac,
                    "dev",
                    &dev,
                    "dst",
                    &ip,
                    "self",
                    "permanent",
                ],
                None,
            )?;
            // VMs' answers to the peer's host go back the way its packets came.
            let host = format!("{ip}/32");
            run(
                "ip",
                &[
                    "route", "replace", &host, "via", &ip, "dev", &dev, "onlink", "table", &table,
                ],
                None,
            )?;
            st.peers.insert(p);
        }
        let t = &self.cfg.table;
        let mut script = String::new();
        if st.nft_peers != peers {
            let _ = writeln!(script, "flush set inet {t} peers");
            let list: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
            let _ = writeln!(
                script,
                "add element inet {t} peers {{ {} }}",
                list.join(", ")
            );
            st.nft_peers = peers.clone();
        }
        let want: BTreeMap<Ipv4Addr, &RemoteVm> = remote
            .iter()
            .filter(|r| peers.contains(&r.node) && !st.attached.contains(&r.ip))
            .map(|r| (r.ip, r))
            .collect();
        for (ip, _) in st.routes.clone() {
            if !want.contains_key(&ip) {
                let _ = run(
                    "ip",
                    &["route", "del", &format!("{ip}/32"), "dev", &dev],
                    None,
                );
                st.routes.remove(&ip);
            }
        }
        for (ip, r) in &want {
            if st.routes.get(ip) != Some(&r.node) {
                run(
                    "ip",
                    &[
                        "route",
                        "replace",
                        &format!("{ip}/32"),
                        "via",
                        &r.node.to_string(),
                        "dev",
                        &dev,
                        "onlink",
                        "src",
                        &local.to_string(),
                    ],
                    None,
                )?;
                st.routes.insert(*ip, r.node);
            }
        }
        for (ip, acct) in st.accounts.clone() {
            let keep = want.get(&ip).is_some_and(|r| r.account == acct);
            if !keep {
                // A VM here with this address owns its element (its own rules put it there).
                if !st.attached.contains(&ip) {
                    let set = crate::nft::acct_set(acct.as_deref());
                    let _ = writeln!(script, "add set inet {t} {set} {{ type ipv4_addr; }}");
                    let _ = writeln!(script, "add element inet {t} {set} {{ {ip} }}");
                    let _ = writeln!(script, "delete element inet {t} {set} {{ {ip} }}");
                }
                st.accounts.remove(&ip);
            }
        }
        for (ip, r) in &want {
            if !st.accounts.contains_key(ip) {
                let set = crate::nft::acct_set(r.account.as_deref());
                let _ = writeln!(script, "add set inet {t} {set} {{ type ipv4_addr; }}");
                let _ = writeln!(script, "add element inet {t} {set} {{ {ip} }}");
                st.accounts.insert(*ip, r.account.clone());
            }
        }
        if script.is_empty() {
            return Ok(());
        }
        let _g = self.locked();
        crate::nft_apply(&script)
    }

    fn make_device(&self, dev: &str, local: Ipv4Addr) -> Result<(), NetError> {
        if crate::tap::exists(dev) {
            run("ip", &["link", "del", dev], None)?;
        }
        run(
            "ip",
            &[
                "link",
                "add",
                dev,
                "type",
                "vxlan",
                "id",
                &VNI.to_string(),
                "dstport",
                &PORT.to_string(),
                "local",
                &local.to_string(),
                "nolearning",
            ],
            None,
        )?;
        let mtu = (self.cfg.mtu.saturating_sub(OVERHEAD)).max(576).to_string();
        run(
            "ip",
            &[
                "link",
                "set",
                dev,
                "address",
                &mac_of(local),
                "mtu",
                &mtu,
                "up",
            ],
            None,
        )?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
        // What other nodes' hosts send to this node's VMs comes in here, and the way back to
        // them is the underlay: reverse path filtering must be loose here, and the kernel
        // drops everything an interface without an address receives when filtering at all.
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"), "2");
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{local}/32"),
                "dev",
                dev,
                "noprefixroute",
            ],
            None,
        )?;
        let (pref, sub) = (TABLE.to_string(), self.cfg.subnet.to_string());
        let _ = run("ip", &["rule", "del", "pref", &pref], None);
        run(
            "ip",
            &["rule", "add", "pref", &pref, "from", &sub, "lookup", &pref],
            None,
        )
    }

    /// Removes the device (its routes and neighbours go with it) and remote VMs' set elements.
    fn drop_overlay(&self, st: &mut State) -> Result<(), NetError> {
        let dev = self.cfg.overlay();
        if crate::tap::exists(&dev) {
            run("ip", &["link", "del", &dev], None)?;
        }
        let _ = run("ip", &["rule", "del", "pref", &TABLE.to_string()], None);
        let t = &self.cfg.table;
        let mut script = format!("flush set inet {t} peers\n");
        for (ip, acct) in std::mem::take(&mut st.accounts) {
            if st.attached.contains(&ip) {
                continue;
            }
            let set = crate::nft::acct_set(acct.as_deref());
            let _ = writeln!(script, "add set inet {t} {set} {{ type ipv4_addr; }}");
            let _ = writeln!(script, "add element inet {t} {set} {{ {ip} }}");
            let _ = writeln!(script, "delete element inet {t} {set} {{ {ip} }}");
        }
        st.local = None;
        st.nft_peers.clear();
        st.peers.clear();
        st.routes.clear();
        let _g = self.locked();
        crate::nft_apply(&script)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_local_unicast_and_distinct() {
        let a = mac_of("192.168.1.2".parse().unwrap());
        let b = mac_of("192.168.1.3".parse().unwrap());
        assert_eq!(a, "02:68:78:68:01:02");
        assert_ne!(a, b);
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10, "locally administered, unicast");
    }
}
