//! TAP devices and bridge ports, by ioctl (no process spawned on the create path).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq` with the members used here (name, then flags or ifindex), 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

fn ioctl(fd: &impl AsRawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `fd` is open; `arg` is an integer or a pointer to an IfReq that outlives the call,
    // as the request expects.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_ifreq(fd: &impl AsRawFd, req: libc::c_ulong, r: &mut IfReq) -> io::Result<()> {
    ioctl(fd, req, r as *mut IfReq as libc::c_ulong)
}

fn tun() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
}

/// Opens TAP `name` (creating it when missing) on a new descriptor: the queue QEMU uses.
pub fn open(name: &str, vnet_hdr: bool) -> io::Result<File> {
    let f = tun()?;
    let mut r = IfReq::new(name)?;
    r.set_short(IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 });
    ioctl_ifreq(&f, TUNSETIFF, &mut r)?;
    Ok(f)
}

/// Creates TAP `name` (or takes the existing one), persistent, owned by `uid`/`gid`.
pub fn create(name: &str, owner: Option<u32>) -> io::Result<()> {
    let f = open(name, false)?;
    if let Some(uid) = owner {
        ioctl(&f, TUNSETOWNER, uid as libc::c_ulong)?;
        ioctl(&f, TUNSETGROUP, uid as libc::c_ulong)?;
    }
    ioctl(&f, TUNSETPERSIST, 1)
}

/// Deletes TAP `name` (gone once no process holds it open); Ok when it did not exist.
pub fn delete(name: &str) -> io::Result<()> {
    if !exists(name) {
        return Ok(());
    }
    let f = open(name, false)?;
    ioctl(&f, TUNSETPERSIST, 0)
}

pub fn exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn index(name: &str) -> io::Result<libc::c_int> {
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i as libc::c_int)
    }
}

/// Makes `port` a port of `bridge` (no-op when it already is), isolated from the other ports
/// (so VMs reach each other only through the host's routing and rules), with `mtu`, and up.
pub fn attach(bridge: &str, port: &str, mtu: u32) -> io::Result<()> {
    let s = inet_socket()?;
    let master = std::fs::read_link(format!("/sys/class/net/{port}/master")).ok();
    let on_bridge = master
        .as_ref()
        .and_then(|m| m.file_name())
        .is_some_and(|m| m == bridge);
    if !on_bridge {
        let mut r = IfReq::new(bridge)?;
        r.set_int(index(port)?);
        ioctl_ifreq(&s, SIOCBRADDIF, &mut r)?;
    }
    std::fs::write(format!("/sys/class/net/{port}/brport/isolated"), "1")?;
    let mut r = IfReq::new(port)?;
    r.set_int(mtu as libc::c_int);
    ioctl_ifreq(&s, libc::SIOCSIFMTU, &mut r)?;
    set_up(&s, port)
}

fn set_up(s: &OwnedFd, name: &str) -> io::Result<()> {
    let mut r = IfReq::new(name)?;
    ioctl_ifreq(s, libc::SIOCGIFFLAGS, &mut r)?;
    let flags = r.short() | libc::IFF_UP as libc::c_short;
    r.set_short(flags);
    ioctl_ifreq(s, libc::SIOCSIFFLAGS, &mut r)
}

/// The ports of `bridge`.
pub fn ports(bridge: &str) -> Vec<String> {
    std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
}
