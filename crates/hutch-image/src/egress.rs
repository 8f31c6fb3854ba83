//! Where hutch may connect when it talks to a registry on someone's behalf, and for how long.
//!
//! [`Egress`] says whether private destinations are allowed. When they are not (a pull asked
//! for by a non-admin account, unless the admin opted in), connections to loopback,
//! link-local, private (RFC 1918, IPv6 ULA, CGNAT 100.64/10), unspecified, multicast, broadcast
//! and reserved addresses, and to IPv6 forms embedding such an IPv4 address (mapped,
//! compatible, NAT64, 6to4) are refused. The check is made on the addresses a name resolves to,
//! at connect time, by the client's DNS resolver, and on literal IP hosts in every URL (the
//! registry's, a token realm's, each redirect's), so a redirect or a token realm cannot lead
//! anywhere the registry's own address could not. System proxies are not used then (the proxy
//! would do the resolving). Redirects are capped at [`MAX_REDIRECTS`].
//!
//! [`Timeouts`]: every request has a connect and a read (idle) timeout, and small documents
//! (manifests, tokens) a deadline for the whole answer.

use crate::ImageError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Redirects one request may follow.
pub const MAX_REDIRECTS: usize = 5;

/// The registry egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// Connect to loopback, link-local and private addresses too.
    pub allow_private: bool,
    /// Private addresses allowed all the same (a registry the admin vouches for).
    pub allow_addrs: Vec<IpAddr>,
}

impl Egress {
    /// Anything the host can reach (the admin).
    pub const OPEN: Egress = Egress {
        allow_private: true,
        allow_addrs: Vec::new(),
    };
    /// Public addresses only (non-admin accounts by default).
    pub const PUBLIC: Egress = Egress {
        allow_private: false,
        allow_addrs: Vec::new(),
    };

    /// Whether connecting to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow_private || !is_private(ip) || self.allow_addrs.contains(&ip)
    }

    /// Refuses a URL whose scheme is not HTTP(S) or whose host is a literal address this
    /// policy forbids (names are checked when they resolve).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), ImageError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ImageError::Registry(format!(
                "refusing {} URL {url}",
                url.scheme()
            )));
        }
        // The URL parser has already normalised literal addresses (`2130706433`, `0x7f.1`).
        let host = url
            .host_str()
            .ok_or_else(|| ImageError::Registry(format!("URL {url} has no host")))?;
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(()); // a name: checked when it resolves
        };
        if self.allows(ip) {
            Ok(())
        } else {
            Err(refused(&ip.to_string()))
        }
    }
}

fn refused(what: &str) -> ImageError {
    ImageError::Registry(format!(
        "refusing to connect to {what}: a private, loopback or link-local address \
         (the admin can allow these with hutchd --registry-allow-private)"
    ))
}

/// Timeouts for registry requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing a connection (TCP and TLS).
    pub connect: Duration,
    /// Between two reads of an answer (a stalled download fails after this).
    pub read: Duration,
    /// The whole of a small document: a manifest, an index, a token.
    pub document: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(15),
            read: Duration::from_secs(60),
            document: Duration::from_secs(60),
        }
    }
}

/// Whether `ip` is loopback, link-local, private, unspecified, multicast, broadcast, reserved,
/// or an IPv6 address embedding such an IPv4 address.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_private_v4(a),
        IpAddr::V6(a) => is_private_v6(a),
    }
}

fn is_private_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_multicast()
        || a.is_broadcast()
        || o[0] == 0 // 0.0.0.0/8 "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || o[0] >= 240 // 240.0.0.0/4 reserved
}

fn is_private_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    if let Some(v4) = a.to_ipv4_mapped() {
        return is_private_v4(v4);
    }
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96).
    if s[..6] == [0, 0, 0, 0, 0, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return a.is_loopback() || a.is_unspecified() || is_private_v4(v4);
    }
    // 6to4 (2002:AABB:CCDD::/48 carries a.b.c.d).
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return is_private_v4(v4);
    }
    a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] == 0x2001 && s[1] == 0) // Teredo (embeds a client address)
        || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
}

/// A DNS resolver that drops the addresses `egress` forbids, and fails when none is left.
struct Resolver {
    egress: Egress,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let n = addrs.len();
            let ok: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| egress.allows(a.ip()))
                .collect();
            if ok.is_empty() {
                let msg = if n == 0 {
                    format!("{host} has no address")
                } else {
                    refused(&host).to_string()
                };
                return Err(msg.into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client that keeps to `egress` and `timeouts`.
pub(crate) fn client(egress: Egress, timeouts: Timeouts) -> Result<reqwest::Client, ImageError> {
    let redirects = egress.clone();
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        match redirects.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e.to_string()),
        }
    });
    let mut b = reqwest::Client::builder()
        .connect_timeout(timeouts.connect)
        .read_timeout(timeouts.read)
        .redirect(policy)
        .dns_resolver(Arc::new(Resolver {
            egress: egress.clone(),
        }))
        .user_agent(concat!("hutch/", env!("CARGO_PKG_VERSION")));
    if !egress.allow_private {
        b = b.no_proxy();
    }
    b.build().map_err(|e| ImageError::Registry(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for a in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(is_private(ip), "{a}");
            assert!(!Egress::PUBLIC.allows(ip), "{a}");
            assert!(Egress::OPEN.allows(ip), "{a}");
        }
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!is_private(ip), "{a}");
        }
    }

    #[test]
    fn literal_hosts_in_urls() {
        let p = Egress::PUBLIC;
        for u in [
            "http://127.0.0.1:5000/v2/",
            "https://[::1]/token",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:7f00:1]/",
            "http://2130706433/",
            "http://0x7f.1/",
        ] {
            let url = reqwest::Url::parse(u).unwrap();
            assert!(p.check_url(&url).is_err(), "{u}");
            assert!(Egress::OPEN.check_url(&url).is_ok(), "{u}");
        }
        assert!(p
            .check_url(&reqwest::Url::parse("file:///etc/passwd").unwrap())
            .is_err());
        assert!(p
            .check_url(&reqwest::Url::parse("https://registry.example/v2/").unwrap())
            .is_ok());
    }
}
