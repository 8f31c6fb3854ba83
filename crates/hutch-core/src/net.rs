//! A VM's network, as recorded with it and as users spell it: mode, address, egress rules,
//! rate limits, port forwards. The host side (bridge, TAPs, nftables, tc) is `hutch-net`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// What a VM's network reaches (`hutch new --net`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// No NIC at all.
    #[default]
    None,
    /// hutch's services on the host (DNS, metadata) and the same account's VMs.
    Internal,
    /// Internal, plus NAT out through the host.
    Internet,
}

impl NetMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetMode::None => "none",
            NetMode::Internal => "internal",
            NetMode::Internet => "internet",
        }
    }
}

impl fmt::Display for NetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NetParseError(pub String);

fn bad(s: String) -> NetParseError {
    NetParseError(s)
}

impl FromStr for NetMode {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(NetMode::None),
            "internal" => Ok(NetMode::Internal),
            "internet" => Ok(NetMode::Internet),
            _ => Err(bad(format!(
                "unknown network mode {:?} (none, internal or internet)",
                crate::clean_text(s)
            ))),
        }
    }
}

/// An IPv4 network `ADDR/PREFIX`, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Net, NetParseError> {
        if prefix > 32 {
            return Err(bad(format!("prefix /{prefix} is over /32")));
        }
        let a = u32::from(addr) & Self::mask_of(prefix);
        Ok(Ipv4Net {
            addr: Ipv4Addr::from(a),
            prefix,
        })
    }
    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    pub fn mask(&self) -> u32 {
        Self::mask_of(self.prefix)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }
    /// Number of addresses, including network and broadcast.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
    /// The `i`-th address of the network.
    pub fn nth(&self, i: u64) -> Option<Ipv4Addr> {
        (i < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + i as u32))
    }
    pub fn overlaps(&self, o: &Ipv4Net) -> bool {
        self.contains(o.addr) || o.contains(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetParseError;
    /// `A.B.C.D/N`, or a bare address (`/32`). Host bits must be zero.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = crate::clean_text(s);
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| bad(format!("{shown:?} is not an IPv4 address or CIDR")))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad(format!("{shown:?}: the prefix must be 0 to 32")))?;
        let n = Ipv4Net::new(addr, prefix)?;
        if n.addr != addr {
            return Err(bad(format!(
                "{shown:?} has host bits set (did you mean {n}?)"
            )));
        }
        Ok(n)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One `--allow-out` / `--deny-out` entry: a network, or a domain (which also covers its
/// subdomains; enforced through hutch's resolver).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EgressRule {
    Net(Ipv4Net),
    Domain(String),
}

/// Most egress rules one VM may have, each list.
pub const MAX_EGRESS_RULES: usize = 64;

impl EgressRule {
    /// Whether domain rule `self` covers `fqdn` (lowercase, no trailing dot).
    pub fn covers(&self, fqdn: &str) -> bool {
        match self {
            EgressRule::Domain(d) => {
                fqdn == d
                    || (fqdn.len() > d.len() && fqdn.ends_with(d.as_str()) && {
                        fqdn.as_bytes()[fqdn.len() - d.len() - 1] == b'.'
                    })
            }
            EgressRule::Net(_) => false,
        }
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressRule::Net(n) => n.fmt(f),
            EgressRule::Domain(d) => f.write_str(d),
        }
    }
}

impl FromStr for EgressRule {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = crate::clean_text(s);
        if s.chars().next().is_some_and(|c| c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == '/')
        {
            return s.parse().map(EgressRule::Net);
        }
        let d = s.trim_end_matches('.').to_ascii_lowercase();
        let d = d.strip_prefix("*.").unwrap_or(&d).to_string();
        let ok = !d.is_empty()
            && d.len() <= 253
            && d.contains('.')
            && d.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(bad(format!(
                "{shown:?} is neither a CIDR (10.0.0.0/8) nor a domain name (example.com)"
            )));
        }
        Ok(EgressRule::Domain(d))
    }
}

impl Serialize for EgressRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a list of rules, bounded.
pub fn parse_rules(list: &[String], flag: &str) -> Result<Vec<EgressRule>, NetParseError> {
    if list.len() > MAX_EGRESS_RULES {
        return Err(bad(format!(
            "at most {MAX_EGRESS_RULES} {flag} rules ({} given)",
            list.len()
        )));
    }
    let mut v = list
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<EgressRule>, _>>()
        .map_err(|e| bad(format!("{flag}: {}", e.0)))?;
    v.sort();
    v.dedup();
    Ok(v)
}

/// Slowest and fastest rate limits accepted, bits per second.
pub const MIN_RATE: u64 = 8_000;
pub const MAX_RATE: u64 = 100_000_000_000;

/// Parses a rate: a number with a unit `kbit`, `mbit`, `gbit` (bits per second, powers of
/// 1000) or `bit`; e.g. `10mbit`. Returns bits per second.
pub fn parse_rate(s: &str) -> Result<u64, NetParseError> {
    let shown = crate::clean_text(s);
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| {
        bad(format!(
            "rate {shown:?} must be a number and a unit, like 10mbit"
        ))
    })?;
    let mult = match unit {
        "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        _ => {
            return Err(bad(format!(
                "rate {shown:?}: the unit must be bit, kbit, mbit or gbit"
            )))
        }
    };
    let r = n
        .checked_mul(mult)
        .filter(|r| (MIN_RATE..=MAX_RATE).contains(r))
        .ok_or_else(|| bad(format!("rate {shown:?} must be between 8kbit and 100gbit")))?;
    Ok(r)
}

/// A rate for display (`10mbit`).
pub fn show_rate(bits: u64) -> String {
    for (m, u) in [
        (1_000_000_000, "gbit"),
        (1_000_000, "mbit"),
        (1_000, "kbit"),
    ] {
        if bits.is_multiple_of(m) {
            return format!("{}{u}", bits / m);
        }
    }
    format!("{bits}bit")
}

/// A host TCP port forwarded to a port of the VM (`hutch port add VM HOST:VM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    pub host: u16,
    pub vm: u16,
}

impl FromStr for PortForward {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = crate::clean_text(s);
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
        match s.split_once(':') {
            Some((h, v)) => match (port(h), port(v)) {
                (Some(host), Some(vm)) => Ok(PortForward { host, vm }),
                _ => Err(bad(format!(
                    "{shown:?}: ports must be numbers from 1 to 65535"
                ))),
            },
            None => port(s)
                .map(|p| PortForward { host: p, vm: p })
                .ok_or_else(|| bad(format!("{shown:?} is not HOSTPORT:VMPORT"))),
        }
    }
}

/// A VM's network as recorded with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmNet {
    #[serde(default)]
    pub mode: NetMode,
    /// Its address on the host's VM network (None in mode `none`).
    #[serde(default)]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub allow_out: Vec<EgressRule>,
    #[serde(default)]
    pub deny_out: Vec<EgressRule>,
    /// Bits per second into the VM.
    #[serde(default)]
    pub rate_in: Option<u64>,
    /// Bits per second out of the VM.
    #[serde(default)]
    pub rate_out: Option<u64>,
    #[serde(default)]
    pub ports: Vec<PortForward>,
    /// Ports the HTTPS proxy serves to everyone (`hutch port public`).
    #[serde(default)]
    pub public_ports: Vec<u16>,
    /// Its address from `hutchd --ssh-pool`: `ssh <vm>.<domain>` lands in it (unique within
    /// its account; accounts share addresses, the key tells them apart).
    #[serde(default)]
    pub ssh_addr: Option<Ipv4Addr>,
}

impl VmNet {
    /// The VM's TAP device name (at most 15 bytes: `ht` + the 12-hex id).
    pub fn tap_name(id: &str) -> String {
        let id: String = id.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        format!("ht{}", &id[..id.len().min(13)])
    }

    /// The MAC of the VM with address `ip` (locally administered, unicast).
    pub fn mac_for(ip: Ipv4Addr) -> String {
        let o = ip.octets();
        format!("02:68:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    }
}

/// `POST /vms/{vm}/net`: replaces the VM's egress rules and rates (fields left out stay).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetNet {
    #[serde(default)]
    pub allow_out: Option<Vec<String>>,
    #[serde(default)]
    pub deny_out: Option<Vec<String>>,
    /// A rate, or "" / "off" to remove the limit.
    #[serde(default)]
    pub rate_in: Option<String>,
    #[serde(default)]
    pub rate_out: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let n: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert_eq!(n.size(), 65536);
        assert_eq!("1.2.3.4".parse::<Ipv4Net>().unwrap().prefix(), 32);
        for bad in [
            "10.1.0.1/16",
            "10.0.0.0/33",
            "300.0.0.0/8",
            "10.0.0.0/",
            "x/8",
            "",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().size(), 1 << 32);
    }

    #[test]
    fn rules() {
        let r: EgressRule = "Example.COM.".parse().unwrap();
        assert_eq!(r, EgressRule::Domain("example.com".into()));
        assert!(r.covers("example.com") && r.covers("a.example.com"));
        assert!(!r.covers("badexample.com") && !r.covers("com"));
        assert_eq!(
            "*.pypi.org".parse::<EgressRule>().unwrap(),
            EgressRule::Domain("pypi.org".into())
        );
        assert!(matches!("10.0.0.0/8".parse(), Ok(EgressRule::Net(_))));
        for bad in [
            "10.0.0.1/8",
            "localhost",
            "-a.com",
            "a..com",
            "a b.com",
            "10.0.0.0/99",
        ] {
            assert!(bad.parse::<EgressRule>().is_err(), "{bad}");
        }
        let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
        assert!(parse_rules(&many, "--allow-out").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10mbit").unwrap(), 10_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(show_rate(10_000_000), "10mbit");
        for bad in [
            "",
            "10",
            "mbit",
            "10mb",
            "1bit",
            "999999999999gbit",
            "-1mbit",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes_ports_and_names() {
        assert_eq!("internal".parse::<NetMode>().unwrap(), NetMode::Internal);
        assert!("bridge".parse::<NetMode>().is_err());
        assert_eq!(
            "8080:80".parse::<PortForward>().unwrap(),
            PortForward { host: 8080, vm: 80 }
        );
        assert!("0:80".parse::<PortForward>().is_err());
        assert!("70000:80".parse::<PortForward>().is_err());
        assert_eq!(VmNet::tap_name("0123456789ab"), "ht0123456789ab");
        assert!(VmNet::tap_name("0123456789abcdef").len() <= 15);
        assert_eq!(
            VmNet::mac_for("10.1.2.3".parse().unwrap()),
            "02:68:0a:01:02:03"
        );
    }
}
