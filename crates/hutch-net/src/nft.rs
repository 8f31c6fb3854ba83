//! The nftables rules of hutch's VM network: one `inet` table and one `bridge` table, both named
//! after the network (nothing else on the host is touched). [`full`] renders both whole (applied
//! atomically at start, replacing what was there); [`vm`] and [`remove_vm`] change one VM's part
//! in place (a few ms, on the create path).
//!
//! Policy, for traffic a VM sends (the bridge's ports are isolated, so everything a VM sends
//! reaches the host first):
//! - bridge table, per port: the source MAC and IPv4 address must be the VM's own (ARP too);
//!   anything else (IPv6, other ethertypes, spoofed frames) is dropped; `rate_out` is policed here.
//! - to the host: only hutch's DNS and metadata ports on the gateway address (and ping).
//! - to other VMs: only the same account's, in modes internal and internet.
//! - elsewhere: mode internet only; `deny_out` first, then `allow_out` (when there is any allow
//!   rule, everything else is dropped), addresses resolved for allowed domains included.
//! - nothing from outside may open a connection to a VM (port forwards are made by hutchd on the
//!   host, so they come from the host).

use crate::NetConfig;
use hutch_core::net::{Ipv4Net, NetMode};
use std::fmt::Write;
use std::net::Ipv4Addr;

/// What the rules need to know about one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmPolicy {
    /// The VM id (hex; names its chains and sets).
    pub id: String,
    pub account: Option<String>,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub tap: String,
    pub mode: NetMode,
    pub allow: Vec<Ipv4Net>,
    pub deny: Vec<Ipv4Net>,
    /// Whether anything is allowed by rule (then the rest is not).
    pub restricted: bool,
    /// Whether its TCP 80/443 goes through hutchd's Host/SNI check (allowed by domain).
    pub name_checked: bool,
    /// Addresses hutch's resolver answered for the VM's allowed domains.
    pub resolved: Vec<Ipv4Addr>,
    /// Bits per second out of the VM.
    pub rate_out: Option<u64>,
}

pub(crate) fn acct_set(account: Option<&str>) -> String {
    match account {
        None => "acct_".into(),
        Some(a) => format!(
            "acct_{}",
            a.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

fn elements<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// Rules of the VM's own inet chain (`vm_ID`), one per line, without the `add rule` prefix.
fn vm_rules(c: &NetConfig, v: &VmPolicy) -> Vec<String> {
    // Other VMs, on this node or (a shared network, overlay.rs) on another: the account's only.
    let mut r = vec![
        format!("ip daddr @{} accept", acct_set(v.account.as_deref())),
        format!("ip daddr {} drop", c.subnet),
    ];
    match v.mode {
        NetMode::Internet => {
            r.push(format!("ip daddr @deny_{} drop", v.id));
            if v.restricted {
                r.push(format!("ip daddr @allow_{} accept", v.id));
                r.push("drop".into());
            } else {
                r.push("accept".into());
            }
        }
        NetMode::Internal | NetMode::None => r.push("drop".into()),
    }
    r
}

/// Rules of the VM's bridge port chain (`port_ID`).
fn port_rules(v: &VmPolicy) -> Vec<String> {
    let mut r = Vec::new();
    if let Some(bits) = v.rate_out {
        let bytes = (bits / 8).max(1);
        let burst = (bytes / 20).max(16 * 1024);
        r.push(format!(
            "limit rate over {bytes} bytes/second burst {burst} bytes drop"
        ));
    }
    r.push(format!("ether saddr != {} drop", v.mac));
    r.push(format!("ether type arp arp saddr ip {} return", v.ip));
    r.push(format!("ether type ip ip saddr {} return", v.ip));
    r.push("drop".into());
    r
}

fn allow_elements(v: &VmPolicy) -> Vec<String> {
    let mut e: Vec<String> = v.allow.iter().map(|n| n.to_string()).collect();
    e.extend(v.resolved.iter().map(|a| a.to_string()));
    e
}

/// The statements that (re)define VM `v`'s part, idempotent.
pub fn vm(c: &NetConfig, v: &VmPolicy) -> String {
    let (t, id) = (&c.table, &v.id);
    let mut s = String::new();
    let acct = acct_set(v.account.as_deref());
    let _ = writeln!(s, "add set inet {t} {acct} {{ type ipv4_addr; }}");
    let _ = writeln!(s, "add element inet {t} {acct} {{ {} }}", v.ip);
    for (set, items) in [
        ("allow", allow_elements(v)),
        ("deny", v.deny.iter().map(|n| n.to_string()).collect()),
    ] {
        let _ = writeln!(
            s,
            "add set inet {t} {set}_{id} {{ type ipv4_addr; flags interval; auto-merge; }}"
        );
        let _ = writeln!(s, "flush set inet {t} {set}_{id}");
        if !items.is_empty() {
            let _ = writeln!(
                s,
                "add element inet {t} {set}_{id} {{ {} }}",
                items.join(", ")
            );
        }
    }
    let _ = writeln!(s, "add chain inet {t} vm_{id}");
    let _ = writeln!(s, "flush chain inet {t} vm_{id}");
    for r in vm_rules(c, v) {
        let _ = writeln!(s, "add rule inet {t} vm_{id} {r}");
    }
    let _ = writeln!(s, "add element inet {t} vms {{ {} : jump vm_{id} }}", v.ip);
    // In or out of the name-checked set (add then delete: no error when it was not there).
    let _ = writeln!(s, "add element inet {t} name_checked {{ {} }}", v.ip);
    if !v.name_checked {
        let _ = writeln!(s, "delete element inet {t} name_checked {{ {} }}", v.ip);
    }
    let _ = writeln!(s, "add chain bridge {t} port_{id}");
    let _ = writeln!(s, "flush chain bridge {t} port_{id}");
    for r in port_rules(v) {
        let _ = writeln!(s, "add rule bridge {t} port_{id} {r}");
    }
    let _ = writeln!(
        s,
        "add element bridge {t} ports {{ \"{}\" : jump port_{id} }}",
        v.tap
    );
    s
}

/// Adds addresses to VM `id`'s allowed set (answers for its allowed domains).
pub fn allow_more(c: &NetConfig, id: &str, addrs: &[Ipv4Addr]) -> String {
    format!(
        "add element inet {} allow_{id} {{ {} }}\n",
        c.table,
        elements(addrs.iter())
    )
}

/// The statements that remove VM `v`'s part. Each is wrapped so that a part already gone
/// is no error: the map elements are deleted by re-adding first.
pub fn remove_vm(c: &NetConfig, v: &VmPolicy) -> String {
    let (t, id) = (&c.table, &v.id);
    let acct = acct_set(v.account.as_deref());
    let mut s = vm(c, v);
    let _ = writeln!(s, "delete element inet {t} vms {{ {} }}", v.ip);
    if v.name_checked {
        let _ = writeln!(s, "delete element inet {t} name_checked {{ {} }}", v.ip);
    }
    let _ = writeln!(s, "delete element inet {t} {acct} {{ {} }}", v.ip);
    let _ = writeln!(s, "delete chain inet {t} vm_{id}");
    let _ = writeln!(s, "delete set inet {t} allow_{id}");
    let _ = writeln!(s, "delete set inet {t} deny_{id}");
    let _ = writeln!(s, "delete element bridge {t} ports {{ \"{}\" }}", v.tap);
    let _ = writeln!(s, "delete chain bridge {t} port_{id}");
    s
}

/// Both tables whole, replacing what was there, in one transaction.
pub fn full(c: &NetConfig, vms: &[VmPolicy]) -> String {
    let (t, br, gw, sub) = (&c.table, &c.bridge, c.gateway(), c.subnet);
    let (ov, ov_port) = (c.overlay(), crate::overlay::PORT);
    let (dns, meta, egress) = (c.dns_port, c.metadata_port, c.egress_port);
    let mut s = String::new();
    // Create-then-delete makes the delete valid when the table does not exist yet.
    for fam in ["inet", "bridge"] {
        let _ = writeln!(s, "table {fam} {t}\ndelete table {fam} {t}");
    }
    let _ = write!(
        s,
        "table inet {t} {{
  map vms {{
    type ipv4_addr : verdict
  }}
  set name_checked {{
    type ipv4_addr
  }}
  set peers {{
    type ipv4_addr
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{br}\" ip daddr 169.254.169.254 tcp dport 80 dnat ip to {gw}:{meta}
    iifname \"{br}\" ip saddr @name_checked ip daddr != {sub} tcp dport {{ 80, 443 }} dnat ip to {gw}:{egress}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {sub} oifname != {{ \"{br}\", \"{ov}\" }} masquerade
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{br}\" jump vm_to_host
    udp dport {ov_port} ip saddr != @peers drop
  }}
  chain vm_to_host {{
    ct state established,related accept
    ip daddr {gw} udp dport {dns} accept
    ip daddr {gw} tcp dport {{ {dns}, {meta}, {egress} }} accept
    ip daddr {gw} icmp type echo-request accept
    drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{br}\" jump from_vm
    iifname \"{ov}\" oifname \"{br}\" accept
    iifname \"{ov}\" drop
    oifname \"{ov}\" drop
    oifname \"{br}\" ct state established,related accept
    oifname \"{br}\" drop
  }}
  chain from_vm {{
    ct state established,related accept
    ip saddr vmap @vms
    drop
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname \"{br}\" icmp type redirect drop
  }}
}}
table bridge {t} {{
  map ports {{
    type ifname : verdict
  }}
  chain prerouting {{
    type filter hook prerouting priority filter; policy accept;
    iifname vmap @ports
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"ht*\" oifname \"ht*\" drop
  }}
}}
"
    );
    for v in vms {
        s.push_str(&vm(c, v));
    }
    s
}

/// Deletes both tables (hutchd --net-teardown, tests).
pub fn teardown(c: &NetConfig) -> String {
    let t = &c.table;
    format!("table inet {t}\ndelete table inet {t}\ntable bridge {t}\ndelete table bridge {t}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetConfig {
        NetConfig {
            bridge: "hutch0".into(),
            subnet: "10.123.0.0/16".parse().unwrap(),
            table: "hutch".into(),
            dns_port: 53,
            metadata_port: 80,
            egress_port: 81,
            mtu: 1500,
        }
    }

    fn v(mode: NetMode, restricted: bool) -> VmPolicy {
        VmPolicy {
            id: "0123456789ab".into(),
            account: Some("alice".into()),
            ip: "10.123.0.2".parse().unwrap(),
            mac: "02:68:0a:7b:00:02".into(),
            tap: "ht0123456789ab".into(),
            mode,
            allow: vec!["1.2.3.0/24".parse().unwrap()],
            deny: vec![],
            restricted,
            name_checked: restricted,
            resolved: vec!["5.6.7.8".parse().unwrap()],
            rate_out: Some(10_000_000),
        }
    }

    /// The scripts are valid nftables: `nft -c` parses and checks them against the kernel
    /// without changing anything (skipped where nft is missing or not allowed).
    #[test]
    fn scripts_pass_nft_check() {
        let c = cfg();
        let mut vms = vec![v(NetMode::Internet, true), v(NetMode::Internal, false)];
        vms[1].id = "ba9876543210".into();
        vms[1].ip = "10.123.0.3".parse().unwrap();
        vms[1].tap = "htba9876543210".into();
        vms[1].account = None;
        vms[1].rate_out = None;
        let check = |script: &str| {
            let mut ch = match std::process::Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
            {
                Ok(ch) => ch,
                Err(_) => return None,
            };
            use std::io::Write;
            ch.stdin.take()?.write_all(script.as_bytes()).ok()?;
            let o = ch.wait_with_output().ok()?;
            Some((
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).to_string(),
            ))
        };
        let Some((ok, err)) = check(&full(&c, &vms)) else {
            eprintln!("nft not found: skipped");
            return;
        };
        if err.contains("Operation not permitted") {
            eprintln!("nft -c needs CAP_NET_ADMIN: skipped");
            return;
        }
        assert!(ok, "{err}");
        // A VM's part and its removal check against the full tables (one transaction).
        let script = full(&c, &vms)
            + &remove_vm(&c, &vms[0])
            + &allow_more(&c, &vms[1].id, &["9.9.9.9".parse().unwrap()]);
        let (ok, err) = check(&script).unwrap();
        assert!(ok, "{err}");
        let (ok, _) = check(&(full(&c, &vms) + "add rule inet hutch nosuch drop\n")).unwrap();
        assert!(!ok, "a broken script is refused");
    }

    #[test]
    fn rules_follow_the_mode() {
        let c = cfg();
        let r = vm_rules(&c, &v(NetMode::Internal, false));
        assert_eq!(r.last().unwrap(), "drop");
        assert!(r[0].contains("@acct_616c696365"));
        assert_eq!(r[1], "ip daddr 10.123.0.0/16 drop");
        let r = vm_rules(&c, &v(NetMode::Internet, false));
        assert_eq!(r.last().unwrap(), "accept");
        let r = vm_rules(&c, &v(NetMode::Internet, true));
        assert_eq!(
            &r[r.len() - 2..],
            ["ip daddr @allow_0123456789ab accept", "drop"]
        );
        let s = vm(&c, &v(NetMode::Internet, true));
        assert!(s.contains("add element inet hutch allow_0123456789ab { 1.2.3.0/24, 5.6.7.8 }"));
        assert!(s.contains("limit rate over 1250000 bytes/second"));
        let f = full(&c, &[v(NetMode::Internet, false)]);
        assert!(f.starts_with("table inet hutch\ndelete table inet hutch\n"));
        assert!(f.contains("dnat ip to 10.123.0.1:80"));
        assert!(f.contains("iifname \"hutch0-x\" oifname \"hutch0\" accept"));
        assert!(f.contains("oifname != { \"hutch0\", \"hutch0-x\" } masquerade"));
    }
}
