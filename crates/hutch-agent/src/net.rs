//! The guest's network, from the kernel command line hutchd wrote (`hutch.ip`, `hutch.gw`,
//! `hutch.dns`, `hutch.domain`, `hutch.mtu`): loopback up; the virtio NIC gets the VM's address as a /32
//! with a host route to the gateway and the default route through it (so every packet goes to
//! the host, where hutch's rules apply; no DHCP); /etc/resolv.conf and /etc/hosts point at
//! hutch's resolver and name the VM. A VM restored from a snapshot as a copy goes through the
//! same code with its new network ([`set_mac`], [`reconfigure`]; see `restore`).

use hutch_proto::restore::{valid_domain, NetIdentity, MTU_RANGE};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub ip: Ipv4Addr,
    pub gw: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub domain: String,
    /// The NIC's MTU (None: the driver's default).
    pub mtu: Option<i32>,
}

impl GuestNet {
    /// From the command line's `hutch.*` words; None when the VM has no network.
    pub fn from_params(param: impl Fn(&str) -> Option<String>) -> Option<GuestNet> {
        let ip = param("hutch.ip")?.parse().ok()?;
        let gw = param("hutch.gw")?.parse().ok()?;
        let dns = param("hutch.dns")
            .and_then(|d| d.parse().ok())
            .unwrap_or(gw);
        let domain = param("hutch.domain")
            .filter(|d| valid_domain(d))
            .unwrap_or_default();
        let mtu = param("hutch.mtu")
            .and_then(|m| m.parse().ok())
            .filter(|m| MTU_RANGE.contains(m))
            .and_then(|m| i32::try_from(m).ok());
        Some(GuestNet {
            ip,
            gw,
            dns,
            domain,
            mtu,
        })
    }

    /// A restored copy's network (already validated: `NetIdentity::validate`).
    pub fn from_identity(n: &NetIdentity) -> GuestNet {
        GuestNet {
            ip: n.ip,
            gw: n.gw,
            dns: n.dns,
            domain: n.domain.clone(),
            mtu: n.mtu.and_then(|m| i32::try_from(m).ok()),
        }
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the bytes are a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    r
}

/// The ioctl's error keeps its errno (for callers that look at it); see [`ioctl`].
fn ioctl_raw<T>(s: &OwnedFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` points to the structure `req` expects and lives across the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `e` with the name of the call that failed.
fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn ioctl<T>(s: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
    ioctl_raw(s, req, arg).map_err(|e| context(e, what))
}

/// Brings `dev` up (`up`) or down.
fn set_up(s: &OwnedFd, dev: &str, up: bool) -> io::Result<()> {
    let mut r = ifreq(dev);
    ioctl(s, libc::SIOCGIFFLAGS as _, &mut r, "SIOCGIFFLAGS")?;
    // SAFETY: the flags member of the union is the one SIOCGIFFLAGS filled in.
    unsafe {
        if up {
            r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        } else {
            r.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
        }
    }
    ioctl(s, libc::SIOCSIFFLAGS as _, &mut r, "SIOCSIFFLAGS")
}

/// A route of the NIC: the host route to the gateway, or the default route through it.
struct Route {
    dst: Ipv4Addr,
    mask: Ipv4Addr,
    gw: Option<Ipv4Addr>,
}

/// The routes the guest has through gateway `gw`.
fn routes(gw: Ipv4Addr) -> [Route; 2] {
    [
        Route {
            dst: gw,
            mask: Ipv4Addr::BROADCAST,
            gw: None,
        },
        Route {
            dst: Ipv4Addr::UNSPECIFIED,
            mask: Ipv4Addr::UNSPECIFIED,
            gw: Some(gw),
        },
    ]
}

/// Adds (`add`) or deletes `r` on `dev`. Adding one that exists is not an error, nor is
/// deleting one that is gone.
fn route(s: &OwnedFd, r: &Route, dev: &str, add: bool) -> io::Result<()> {
    let mut name: Vec<libc::c_char> = dev.bytes().map(|b| b as libc::c_char).collect();
    name.push(0);
    // SAFETY: rtentry is plain old data; all-zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(r.dst);
    rt.rt_genmask = sockaddr(r.mask);
    rt.rt_flags = libc::RTF_UP;
    match r.gw {
        Some(g) => {
            rt.rt_gateway = sockaddr(g);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        None => rt.rt_flags |= libc::RTF_HOST,
    }
    rt.rt_dev = name.as_mut_ptr();
    let (req, what, ignored) = if add {
        (libc::SIOCADDRT, "SIOCADDRT", libc::EEXIST)
    } else {
        (libc::SIOCDELRT, "SIOCDELRT", libc::ESRCH)
    };
    match ioctl_raw(s, req as _, &mut rt) {
        Err(e) if e.raw_os_error() == Some(ignored) => Ok(()),
        r => r.map_err(|e| context(e, what)),
    }
}

/// The first network interface other than `lo`, waiting up to `wait` for the driver to probe
/// it.
fn nic(wait: Duration) -> io::Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n != "lo")
            .collect();
        names.sort();
        if let Some(n) = names.into_iter().next() {
            return Ok(n);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no network interface appeared",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Brings loopback up (always) and configures the NIC when `net` says so. Runs in the guest's
/// root (after the switch), so it can write /etc.
pub fn configure(net: Option<&GuestNet>, hostname: &str) -> io::Result<()> {
    let s = socket()?;
    set_up(&s, "lo", true)?;
    let Some(n) = net else {
        return write_hosts(None, hostname, None);
    };
    let dev = nic(Duration::from_secs(5))?;
    address(&s, &dev, n)?;
    write_names(n, hostname, None)
}

/// Gives a restored copy its new network `n`, configured as at boot, and /etc/hosts names
/// `hostname` instead of `previous`. `old` is the network the guest had: its routes through
/// another gateway go (a new address drops them anyway; the same address keeps them). The NIC
/// must exist already.
pub fn reconfigure(
    n: &GuestNet,
    old: Option<&GuestNet>,
    hostname: &str,
    previous: &str,
) -> io::Result<()> {
    let s = socket()?;
    let dev = nic(Duration::ZERO)?;
    if let Some(old) = old.filter(|o| o.gw != n.gw) {
        // The default route first: the host route is its way to the gateway.
        for r in routes(old.gw).iter().rev() {
            route(&s, r, &dev, false)?;
        }
    }
    address(&s, &dev, n)?;
    write_names(n, hostname, Some(previous))
}

/// Renames the VM in /etc/hosts (a copy without a network change): its line names `hostname`
/// instead of `previous`, at the address of `net` (127.0.1.1 without one).
pub fn rename(net: Option<&GuestNet>, hostname: &str, previous: &str) -> io::Result<()> {
    write_hosts(net, hostname, Some(previous))
}

/// Whether the virtio-net device of `dev` negotiated VIRTIO_NET_F_CTRL_MAC_ADDR (the driver
/// then tells the device of a new MAC); None when sysfs does not say (not virtio).
fn ctrl_mac_addr(dev: &str) -> Option<bool> {
    const VIRTIO_NET_F_CTRL_MAC_ADDR: usize = 23;
    let f = std::fs::read_to_string(format!("/sys/class/net/{dev}/device/features")).ok()?;
    Some(f.as_bytes().get(VIRTIO_NET_F_CTRL_MAC_ADDR) == Some(&b'1'))
}

/// Gives the NIC the MAC address `mac`. virtio-net changes it while the link is up when the
/// device offers CTRL_MAC_ADDR (QEMU's default); a driver that refuses while up (EBUSY) gets
/// it with the link down for a moment.
pub fn set_mac(mac: [u8; 6]) -> io::Result<()> {
    let s = socket()?;
    let dev = nic(Duration::ZERO)?;
    let mut r = ifreq(&dev);
    ioctl(&s, libc::SIOCGIFHWADDR as _, &mut r, "SIOCGIFHWADDR")?;
    // SAFETY: SIOCGIFHWADDR filled in the hwaddr member of the union.
    let now = unsafe { r.ifr_ifru.ifru_hwaddr.sa_data };
    if now.iter().zip(mac).all(|(a, b)| *a as u8 == b) {
        return Ok(());
    }
    if ctrl_mac_addr(&dev) == Some(false) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{dev}'s virtio-net device does not offer CTRL_MAC_ADDR: the host would not \
                 learn a new MAC"
            ),
        ));
    }
    let mut r = ifreq(&dev);
    // SAFETY: an all-zero sockaddr is valid; the MAC goes into its first six data bytes.
    let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (d, b) in hw.sa_data.iter_mut().zip(mac) {
        *d = b as libc::c_char;
    }
    r.ifr_ifru.ifru_hwaddr = hw;
    match ioctl_raw(&s, libc::SIOCSIFHWADDR as _, &mut r) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            set_up(&s, &dev, false)?;
            let set = ioctl(&s, libc::SIOCSIFHWADDR as _, &mut r, "SIOCSIFHWADDR");
            let up = set_up(&s, &dev, true);
            set.and(up)
        }
        r => r.map_err(|e| context(e, "SIOCSIFHWADDR")),
    }
}

/// `dev` gets `n`'s address as a /32 and its MTU, comes up, and routes to and through the
/// gateway.
fn address(s: &OwnedFd, dev: &str, n: &GuestNet) -> io::Result<()> {
    let mut r = ifreq(dev);
    r.ifr_ifru.ifru_addr = sockaddr(n.ip);
    ioctl(s, libc::SIOCSIFADDR as _, &mut r, "SIOCSIFADDR")?;
    let mut r = ifreq(dev);
    r.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::BROADCAST);
    ioctl(s, libc::SIOCSIFNETMASK as _, &mut r, "SIOCSIFNETMASK")?;
    if let Some(mtu) = n.mtu {
        let mut r = ifreq(dev);
        r.ifr_ifru.ifru_mtu = mtu;
        ioctl(s, libc::SIOCSIFMTU as _, &mut r, "SIOCSIFMTU")?;
    }
    set_up(s, dev, true)?;
    for r in routes(n.gw) {
        route(s, &r, dev, true)?;
    }
    Ok(())
}

/// /etc/resolv.conf and /etc/hosts for `n`.
fn write_names(n: &GuestNet, hostname: &str, previous: Option<&str>) -> io::Result<()> {
    let mut conf = format!("nameserver {}\n", n.dns);
    if !n.domain.is_empty() {
        conf.push_str(&format!("search {}\n", n.domain));
    }
    replace_file(Path::new("/etc/resolv.conf"), &conf)?;
    write_hosts(Some(n), hostname, previous)
}

fn write_hosts(net: Option<&GuestNet>, hostname: &str, previous: Option<&str>) -> io::Result<()> {
    let p = Path::new("/etc/hosts");
    let old = std::fs::read_to_string(p).unwrap_or_default();
    replace_file(p, &hosts(&old, net, hostname, previous))
}

/// /etc/hosts naming localhost and the VM: its own lines replace earlier ones of these names
/// (and of `previous`, the VM's name before a restore gave it a new one); other lines stay.
fn hosts(old: &str, net: Option<&GuestNet>, hostname: &str, previous: Option<&str>) -> String {
    let own = match net {
        Some(n) if !n.domain.is_empty() => {
            format!("{}\t{hostname}.{} {hostname}\n", n.ip, n.domain)
        }
        Some(n) => format!("{}\t{hostname}\n", n.ip),
        None => format!("127.0.1.1\t{hostname}\n"),
    };
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
    out.push_str(&own);
    let ours = |name: &str| name == "localhost" || name == hostname || Some(name) == previous;
    for l in old.lines() {
        let mut names = l.split_whitespace().skip(1);
        if names.any(ours) || l.trim().is_empty() {
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Writes `p` anew (a symlink there, e.g. to systemd-resolved's file, is replaced).
pub fn replace_file(p: &Path, text: &str) -> io::Result<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    if p.symlink_metadata().is_ok_and(|m| !m.is_file()) {
        std::fs::remove_file(p)?;
    }
    std::fs::write(p, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(domain: &str) -> GuestNet {
        GuestNet {
            ip: Ipv4Addr::new(10, 0, 0, 9),
            gw: Ipv4Addr::new(10, 0, 0, 1),
            dns: Ipv4Addr::new(10, 0, 0, 1),
            domain: domain.into(),
            mtu: None,
        }
    }

    #[test]
    fn hosts_name_the_vm_and_keep_other_lines() {
        let image = "127.0.0.1 localhost\n\n10.9.9.9 db.internal db\n";
        let boot = hosts(image, Some(&net("hutch.internal")), "web", None);
        assert_eq!(
            boot,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n\
             10.0.0.9\tweb.hutch.internal web\n10.9.9.9 db.internal db\n"
        );
        // Boot again (same name): nothing doubles.
        assert_eq!(
            hosts(&boot, Some(&net("hutch.internal")), "web", None),
            boot
        );
        assert_eq!(
            hosts(image, None, "web", None),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\tweb\n\
             10.9.9.9 db.internal db\n"
        );
    }

    #[test]
    fn a_renamed_copy_replaces_the_old_name() {
        let boot = hosts("10.9.9.9 db\n", Some(&net("hutch.internal")), "web", None);
        // A copy with a new address and name: the old name's line is gone.
        let mut copy = net("hutch.internal");
        copy.ip = Ipv4Addr::new(10, 0, 0, 23);
        let renamed = hosts(&boot, Some(&copy), "web-2", Some("web"));
        assert_eq!(
            renamed,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n\
             10.0.0.23\tweb-2.hutch.internal web-2\n10.9.9.9 db\n"
        );
        assert!(!renamed.contains("\tweb.") && !renamed.contains(" web\n"));
        // Without a network the name moves to 127.0.1.1, once.
        let plain = hosts("127.0.1.1\tweb\n", None, "web-2", Some("web"));
        assert_eq!(plain.matches("127.0.1.1").count(), 1, "{plain}");
        assert!(plain.contains("127.0.1.1\tweb-2\n") && !plain.contains("\tweb\n"));
        // A name that merely starts like the old one stays.
        let other = hosts("10.1.1.1 webby\n", None, "web-2", Some("web"));
        assert!(other.contains("10.1.1.1 webby\n"), "{other}");
    }

    #[test]
    fn boot_and_restore_share_the_network_rules() {
        let words = [
            ("hutch.ip", "10.0.0.9"),
            ("hutch.gw", "10.0.0.1"),
            ("hutch.domain", "hutch.internal"),
            ("hutch.mtu", "1400"),
        ];
        let param = |k: &str| {
            words
                .iter()
                .find(|(w, _)| *w == k)
                .map(|(_, v)| v.to_string())
        };
        let boot = GuestNet::from_params(param).unwrap();
        let restored = GuestNet::from_identity(&NetIdentity {
            ip: Ipv4Addr::new(10, 0, 0, 9),
            gw: Ipv4Addr::new(10, 0, 0, 1),
            dns: Ipv4Addr::new(10, 0, 0, 1),
            domain: "hutch.internal".into(),
            mtu: Some(1400),
            mac: "02:68:0a:00:00:09".into(),
        });
        assert_eq!(boot, restored);
        // Out-of-range MTUs and bad domains are dropped at boot (and refused at restore).
        let bad = |k: &str| match k {
            "hutch.mtu" => Some("70000".to_string()),
            "hutch.domain" => Some("a;b".to_string()),
            _ => param(k),
        };
        let n = GuestNet::from_params(bad).unwrap();
        assert_eq!((n.mtu, n.domain.as_str()), (None, ""));
    }
}
