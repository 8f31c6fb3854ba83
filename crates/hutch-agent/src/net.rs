//! The guest's network, from the kernel command line hutchd wrote (`hutch.ip`, `hutch.gw`,
//! `hutch.dns`, `hutch.domain`, `hutch.mtu`): loopback up; the virtio NIC gets the VM's address as a /32
//! with a host route to the gateway and the default route through it (so every packet goes to
//! the host, where hutch's rules apply; no DHCP); /etc/resolv.conf and /etc/hosts point at
//! hutch's resolver and name the VM.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

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
            .filter(|d| {
                d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            })
            .unwrap_or_default();
        let mtu = param("hutch.mtu")
            .and_then(|m| m.parse().ok())
            .filter(|m| (576..=65535).contains(m));
        Some(GuestNet {
            ip,
            gw,
            dns,
            domain,
            mtu,
        })
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

fn ioctl<T>(s: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: `arg` points to the structure `req` expects and lives across the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn up(s: &OwnedFd, dev: &str) -> io::Result<()> {
    let mut r = ifreq(dev);
    ioctl(s, libc::SIOCGIFFLAGS as _, &mut r, "SIOCGIFFLAGS")?;
    // SAFETY: the flags member of the union is the one SIOCGIFFLAGS filled in.
    unsafe {
        r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    ioctl(s, libc::SIOCSIFFLAGS as _, &mut r, "SIOCSIFFLAGS")
}

fn route(
    s: &OwnedFd,
    dst: Ipv4Addr,
    mask: Ipv4Addr,
    gw: Option<Ipv4Addr>,
    dev: &str,
) -> io::Result<()> {
    let mut name: Vec<libc::c_char> = dev.bytes().map(|b| b as libc::c_char).collect();
    name.push(0);
    // SAFETY: rtentry is plain old data; all-zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(dst);
    rt.rt_genmask = sockaddr(mask);
    rt.rt_flags = libc::RTF_UP;
    match gw {
        Some(g) => {
            rt.rt_gateway = sockaddr(g);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        None => rt.rt_flags |= libc::RTF_HOST,
    }
    rt.rt_dev = name.as_mut_ptr();
    match ioctl(s, libc::SIOCADDRT as _, &mut rt, "SIOCADDRT") {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// The first network interface other than `lo`, waiting up to 5 s for the driver to probe it.
fn nic() -> io::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
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
        if Instant::now() > deadline {
            return Err(io::Error::other("no network interface appeared"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Brings loopback up (always) and configures the NIC when `net` says so. Runs in the guest's
/// root (after the switch), so it can write /etc.
pub fn configure(net: Option<&GuestNet>, hostname: &str) -> io::Result<()> {
    let s = socket()?;
    up(&s, "lo")?;
    let Some(n) = net else {
        return write_hosts(None, hostname, "");
    };
    let dev = nic()?;
    let mut r = ifreq(&dev);
    r.ifr_ifru.ifru_addr = sockaddr(n.ip);
    ioctl(&s, libc::SIOCSIFADDR as _, &mut r, "SIOCSIFADDR")?;
    let mut r = ifreq(&dev);
    r.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::BROADCAST);
    ioctl(&s, libc::SIOCSIFNETMASK as _, &mut r, "SIOCSIFNETMASK")?;
    if let Some(mtu) = n.mtu {
        let mut r = ifreq(&dev);
        r.ifr_ifru.ifru_mtu = mtu;
        ioctl(&s, libc::SIOCSIFMTU as _, &mut r, "SIOCSIFMTU")?;
    }
    up(&s, &dev)?;
    route(&s, n.gw, Ipv4Addr::BROADCAST, None, &dev)?;
    route(
        &s,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Some(n.gw),
        &dev,
    )?;
    let mut conf = format!("nameserver {}\n", n.dns);
    if !n.domain.is_empty() {
        conf.push_str(&format!("search {}\n", n.domain));
    }
    replace_file(Path::new("/etc/resolv.conf"), &conf)?;
    write_hosts(Some(n.ip), hostname, &n.domain)
}

/// /etc/hosts naming localhost and the VM (its own lines replace earlier ones of these names).
fn write_hosts(ip: Option<Ipv4Addr>, hostname: &str, domain: &str) -> io::Result<()> {
    let p = Path::new("/etc/hosts");
    let old = std::fs::read_to_string(p).unwrap_or_default();
    let fqdn = if domain.is_empty() {
        String::new()
    } else {
        format!("{hostname}.{domain} ")
    };
    let own = match ip {
        Some(ip) => format!("{ip}\t{fqdn}{hostname}\n"),
        None => format!("127.0.1.1\t{hostname}\n"),
    };
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
    out.push_str(&own);
    for l in old.lines() {
        let names: Vec<&str> = l.split_whitespace().skip(1).collect();
        if names.iter().any(|n| *n == "localhost" || *n == hostname) || l.trim().is_empty() {
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    replace_file(p, &out)
}

/// Writes `p` anew (a symlink there, e.g. to systemd-resolved's file, is replaced).
fn replace_file(p: &Path, text: &str) -> io::Result<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    if p.symlink_metadata().is_ok_and(|m| !m.is_file()) {
        std::fs::remove_file(p)?;
    }
    std::fs::write(p, text)
}
