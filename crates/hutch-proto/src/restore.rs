//! The `restored` request: what the host tells an agent whose VM was just restored from a
//! memory snapshot (a new QEMU process resumed the saved guest), and the rules its fields
//! follow. Both ends check them with [`RestoreInfo::validate`]: the host before it sends, the
//! agent before it changes anything, so a bad request changes nothing in the guest.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::time::{SystemTime, UNIX_EPOCH};

/// Most entropy bytes one request may carry (decoded).
pub const MAX_ENTROPY: usize = 512;
/// The NIC MTUs a guest may be given (the boot command line's `hutch.mtu` follows the same).
pub const MTU_RANGE: RangeInclusive<u32> = 576..=65535;
/// Longest search domain.
pub const MAX_DOMAIN: usize = 253;
/// Earliest and latest wall clock a restore may set, in seconds since the Unix epoch
/// (2000-01-01 and 2200-01-01): outside them the host sent seconds or milliseconds, or its
/// clock is broken, and the guest's clock would be worse for it.
const CLOCK_SECS: RangeInclusive<u64> = 946_684_800..=7_258_118_400;

/// What the host tells the agent of a VM just restored from a snapshot; answered with `done`
/// once all of it is applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreInfo {
    /// Host wall clock, nanoseconds since the Unix epoch, when the request was made.
    pub time_ns: u64,
    /// Fresh random bytes from the host (hex, 1 to [`MAX_ENTROPY`] bytes decoded) for the
    /// guest's RNG.
    pub entropy: String,
    /// A new identity for a copy; None when the same VM resumes.
    #[serde(default)]
    pub identity: Option<Identity>,
}

/// The identity of a copy of a VM (a fork, a claimed warm VM, a VM made from a template).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// The VM's name: 1 to 63 characters of `a-z`, `0-9` and `-`, not starting or ending
    /// with `-` (hutch's VM name rules).
    pub hostname: String,
    /// 32 lowercase hex digits, not all zero, written to /etc/machine-id.
    pub machine_id: String,
    /// The copy's network, as the kernel command line gives it at boot (None: no network
    /// change).
    #[serde(default)]
    pub net: Option<NetIdentity>,
}

/// A copy's network: the words `hutch.ip`, `hutch.gw`, `hutch.dns`, `hutch.domain` and
/// `hutch.mtu` of the boot command line, and the NIC's MAC address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetIdentity {
    /// The VM's address (a /32 on its NIC).
    pub ip: Ipv4Addr,
    /// The host's address: a host route to it and the default route through it.
    pub gw: Ipv4Addr,
    /// The resolver for /etc/resolv.conf.
    pub dns: Ipv4Addr,
    /// Search domain (empty: none): letters, digits, `.` and `-`, at most [`MAX_DOMAIN`].
    #[serde(default)]
    pub domain: String,
    /// The NIC's MTU, within [`MTU_RANGE`] (None: left as it is).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The NIC's new MAC address, `xx:xx:xx:xx:xx:xx` (unicast, not all zero).
    pub mac: String,
}

/// Why a [`RestoreInfo`] was refused (the agent answers `invalid_argument`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid restore request: {0}")]
pub struct InvalidRestore(pub String);

fn invalid(msg: String) -> InvalidRestore {
    InvalidRestore(msg)
}

impl RestoreInfo {
    /// A request stamped with the host's clock now, carrying `entropy` (hex-encoded here).
    pub fn now(entropy: &[u8], identity: Option<Identity>) -> RestoreInfo {
        let time_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        RestoreInfo {
            time_ns,
            entropy: to_hex(entropy),
            identity,
        }
    }

    /// Checks every field; the first problem found is the error.
    pub fn validate(&self) -> Result<(), InvalidRestore> {
        let secs = self.time_ns / 1_000_000_000;
        if !CLOCK_SECS.contains(&secs) {
            return Err(invalid(format!(
                "time_ns {} is not a wall clock between 2000 and 2200",
                self.time_ns
            )));
        }
        self.entropy_bytes()?;
        match &self.identity {
            Some(id) => id.validate(),
            None => Ok(()),
        }
    }

    /// The entropy, decoded.
    pub fn entropy_bytes(&self) -> Result<Vec<u8>, InvalidRestore> {
        let b = from_hex(&self.entropy)
            .ok_or_else(|| invalid("entropy is not an even number of hex digits".into()))?;
        if b.is_empty() || b.len() > MAX_ENTROPY {
            return Err(invalid(format!(
                "entropy has {} bytes, not 1 to {MAX_ENTROPY}",
                b.len()
            )));
        }
        Ok(b)
    }
}

impl Identity {
    pub fn validate(&self) -> Result<(), InvalidRestore> {
        validate_hostname(&self.hostname)?;
        let id = &self.machine_id;
        let lower_hex = id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if id.len() != 32 || !lower_hex || id.bytes().all(|b| b == b'0') {
            return Err(invalid(format!(
                "machine_id {id:?} is not 32 lowercase hex digits (not all zero)"
            )));
        }
        match &self.net {
            Some(n) => n.validate(),
            None => Ok(()),
        }
    }
}

impl NetIdentity {
    pub fn validate(&self) -> Result<(), InvalidRestore> {
        let unusable = |a: Ipv4Addr| {
            a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback()
        };
        for (what, a) in [("ip", self.ip), ("gw", self.gw), ("dns", self.dns)] {
            if unusable(a) {
                return Err(invalid(format!("{what} {a} cannot be a host's address")));
            }
        }
        if self.ip == self.gw {
            return Err(invalid(format!("ip and gw are both {}", self.ip)));
        }
        if !valid_domain(&self.domain) {
            return Err(invalid(format!(
                "domain {:?} must be at most {MAX_DOMAIN} letters, digits, '.' and '-'",
                self.domain
            )));
        }
        if let Some(m) = self.mtu.filter(|m| !MTU_RANGE.contains(m)) {
            return Err(invalid(format!(
                "mtu {m} is not within {}..={}",
                MTU_RANGE.start(),
                MTU_RANGE.end()
            )));
        }
        self.mac_bytes().map(|_| ())
    }

    /// The MAC address as bytes: six hex octets separated by `:` (either case), unicast and
    /// not all zero.
    pub fn mac_bytes(&self) -> Result<[u8; 6], InvalidRestore> {
        let bad = || {
            invalid(format!(
                "mac {:?} is not a unicast xx:xx:xx:xx:xx:xx",
                self.mac
            ))
        };
        let mut out = [0u8; 6];
        let mut parts = self.mac.split(':');
        for o in out.iter_mut() {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *o = from_hex(p)
                .and_then(|v| v.first().copied())
                .ok_or_else(bad)?;
        }
        if parts.next().is_some() || out[0] & 1 == 1 || out == [0; 6] {
            return Err(bad());
        }
        Ok(out)
    }
}

/// Checks a hostname against hutch's VM name rules (an RFC 1123 label in lowercase).
pub fn validate_hostname(name: &str) -> Result<(), InvalidRestore> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "hostname {name:?} must be 1 to 63 lowercase letters, digits and '-', not starting \
             or ending with '-'"
        )))
    }
}

/// Whether `d` may be the guest's search domain (empty for none).
pub fn valid_domain(d: &str) -> bool {
    d.len() <= MAX_DOMAIN
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// `bytes` as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Hex digits (either case) as bytes; None for an odd length or a non-hex character.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Request;

    fn net() -> NetIdentity {
        NetIdentity {
            ip: Ipv4Addr::new(10, 123, 0, 7),
            gw: Ipv4Addr::new(10, 123, 0, 1),
            dns: Ipv4Addr::new(10, 123, 0, 1),
            domain: "hutch.internal".into(),
            mtu: Some(1500),
            mac: "02:68:0a:7b:00:07".into(),
        }
    }

    fn info() -> RestoreInfo {
        let id = Identity {
            hostname: "web-2".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            net: Some(net()),
        };
        RestoreInfo::now(&[7; 64], Some(id))
    }

    fn refused(f: impl FnOnce(&mut RestoreInfo)) -> String {
        let mut i = info();
        f(&mut i);
        i.validate().expect_err("must be refused").to_string()
    }

    fn id(i: &mut RestoreInfo) -> &mut Identity {
        i.identity.as_mut().unwrap()
    }

    fn nid(i: &mut RestoreInfo) -> &mut NetIdentity {
        id(i).net.as_mut().unwrap()
    }

    #[test]
    fn a_good_request_passes_and_has_its_json_shape() {
        let i = info();
        i.validate().unwrap();
        assert_eq!(i.entropy_bytes().unwrap(), vec![7; 64]);
        let r = Request::Restored(i.clone());
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"op":"restored","time_ns":"#), "{s}");
        assert!(s.contains(r#""ip":"10.123.0.7""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        // The same VM resuming: no identity (absent or null).
        let plain = format!(
            r#"{{"op":"restored","time_ns":{},"entropy":"ab"}}"#,
            i.time_ns
        );
        match serde_json::from_str::<Request>(&plain).unwrap() {
            Request::Restored(r) => {
                assert_eq!(r.identity, None);
                r.validate().unwrap();
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_fields_are_refused() {
        assert!(refused(|i| i.time_ns = 0).contains("time_ns"));
        // Seconds, not nanoseconds.
        assert!(refused(|i| i.time_ns = 1_700_000_000).contains("time_ns"));
        assert!(refused(|i| i.time_ns = u64::MAX).contains("time_ns"));
        for e in ["", "abc", "zz", "0x00", &"00".repeat(MAX_ENTROPY + 1)] {
            let e = e.to_string();
            assert!(refused(|i| i.entropy = e).contains("entropy"));
        }
        for h in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            "../x",
            "a b",
            &"a".repeat(64),
        ] {
            let h = h.to_string();
            assert!(refused(|i| id(i).hostname = h).contains("hostname"));
        }
        for m in [
            "",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789abcdef0123456789abcdeg",
            &"0".repeat(32),
        ] {
            let m = m.to_string();
            assert!(refused(|i| id(i).machine_id = m).contains("machine_id"));
        }
        for mac in [
            "",
            "02:68:0a:7b:00",
            "02:68:0a:7b:00:07:08",
            "02-68-0a-7b-00-07",
            "2:68:0a:7b:00:07:0",
            "02:68:0a:7b:00:0g",
            "03:68:0a:7b:00:07",
            "00:00:00:00:00:00",
            "+2:68:0a:7b:00:07",
        ] {
            let mac = mac.to_string();
            assert!(refused(|i| nid(i).mac = mac).contains("mac"));
        }
        assert!(refused(|i| nid(i).ip = Ipv4Addr::UNSPECIFIED).contains("ip"));
        assert!(refused(|i| nid(i).gw = Ipv4Addr::BROADCAST).contains("gw"));
        assert!(refused(|i| nid(i).dns = Ipv4Addr::new(224, 0, 0, 1)).contains("dns"));
        assert!(refused(|i| nid(i).ip = Ipv4Addr::new(10, 123, 0, 1)).contains("both"));
        assert!(refused(|i| nid(i).domain = "a;b".into()).contains("domain"));
        assert!(refused(|i| nid(i).domain = "a".repeat(254)).contains("domain"));
        assert!(refused(|i| nid(i).mtu = Some(575)).contains("mtu"));
        assert!(refused(|i| nid(i).mtu = Some(65536)).contains("mtu"));
    }

    #[test]
    fn macs_and_hex() {
        let mut n = net();
        assert_eq!(n.mac_bytes().unwrap(), [2, 0x68, 10, 0x7b, 0, 7]);
        n.mac = "52:54:00:AB:cd:EF".into();
        assert_eq!(n.mac_bytes().unwrap(), [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&all)).unwrap(), all);
        assert_eq!(to_hex(&[0, 0xa5, 0xff]), "00a5ff");
        assert_eq!(from_hex("é0"), None);
        assert_eq!(from_hex(""), Some(vec![]));
    }
}
