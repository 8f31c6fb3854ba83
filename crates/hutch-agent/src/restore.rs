//! The `restored` request: the VM was just resumed from a memory snapshot by a new QEMU, and
//! the guest fixes what that broke. Its clock stood still while the VM was saved, so it is set
//! to the host's; its RNG state is the snapshot's (every copy would draw the same numbers), so
//! the host's fresh entropy is credited to the kernel pool and the kernel reseeds at once. A
//! copy (a fork, a claimed warm VM, a VM made from a template) also takes on a new identity:
//! hostname, /etc/hostname when the image has one, /etc/machine-id, and its own network (MAC
//! address, IPv4 address, routes, resolv.conf and /etc/hosts, set the way boot sets them).
//!
//! The request is checked whole before anything changes; then every step is tried, and the
//! answer is `done` when all of them worked, else an `error` naming each step that failed
//! (with the code of the first).

use crate::net::{self, GuestNet};
use crate::serve::Shared;
use crate::sys;
use hutch_proto::{ErrorCode, Identity, Response, RestoreInfo};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

/// What the guest is now, as boot or the last restore made it: the name the handshake
/// reports, and the network a renamed VM's /etc/hosts line and a later restore start from.
#[derive(Debug, Clone)]
pub struct GuestState {
    pub hostname: String,
    pub net: Option<GuestNet>,
}

/// One restore at a time (the host sends one per restore, but a stream could repeat it).
static RESTORING: Mutex<()> = Mutex::new(());

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool and credit their entropy.
const RNDADDENTROPY: libc::c_ulong = (1 << 30) | (8 << 16) | ((b'R' as libc::c_ulong) << 8) | 3;
/// `_IO('R', 0x07)`: reseed the kernel's CRNG from the input pool now (Linux 4.17+).
const RNDRESEEDCRNG: libc::c_ulong = ((b'R' as libc::c_ulong) << 8) | 7;

/// `struct rand_pool_info` with room for the most entropy a request carries.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; hutch_proto::restore::MAX_ENTROPY],
}

/// Handles `restored` on `stream`: applies it, then answers.
pub fn restored(shared: &Shared, gen: u64, stream: u32, info: RestoreInfo) {
    match apply(&shared.guest, &info) {
        Ok(()) => {
            eprintln!("hutch-agent: restored from a snapshot");
            shared.respond(gen, stream, &Response::Done { bytes: 0 });
        }
        Err((code, message)) => {
            eprintln!("hutch-agent: restore: {message}");
            shared.error(gen, stream, code, message);
        }
    }
}

/// Checks `info` and applies it; the error is the code of the first failed step and what
/// failed in each.
fn apply(guest: &Mutex<GuestState>, info: &RestoreInfo) -> Result<(), (ErrorCode, String)> {
    let invalid = |e: hutch_proto::InvalidRestore| (ErrorCode::InvalidArgument, e.to_string());
    info.validate().map_err(invalid)?;
    let entropy = info.entropy_bytes().map_err(invalid)?;
    let _one = RESTORING.lock().unwrap_or_else(|e| e.into_inner());
    let mut failed: Vec<(ErrorCode, String)> = Vec::new();
    let mut step = |what: &str, r: io::Result<()>| match r {
        Ok(()) => true,
        Err(e) => {
            failed.push((sys::io_code(&e), format!("{what}: {e}")));
            false
        }
    };
    step("setting the clock", set_clock(info.time_ns));
    step("adding entropy", add_entropy(&entropy));
    if let Some(id) = &info.identity {
        take_identity(guest, id, &mut step);
    }
    match failed.first() {
        None => Ok(()),
        Some((code, _)) => {
            let all: Vec<&str> = failed.iter().map(|(_, m)| m.as_str()).collect();
            Err((*code, all.join("; ")))
        }
    }
}

/// Gives the guest `id`; `step` records each step's outcome and says whether it worked.
fn take_identity(
    guest: &Mutex<GuestState>,
    id: &Identity,
    step: &mut impl FnMut(&str, io::Result<()>) -> bool,
) {
    let lock = || guest.lock().unwrap_or_else(|e| e.into_inner());
    let was = lock().clone();
    if step("sethostname", sys::sethostname(&id.hostname)) {
        lock().hostname = id.hostname.clone();
    }
    let root = Path::new("/");
    step("/etc/hostname", write_hostname(root, &id.hostname));
    step("/etc/machine-id", write_machine_id(root, &id.machine_id));
    match &id.net {
        Some(n) => {
            let new = GuestNet::from_identity(n);
            if let Ok(mac) = n.mac_bytes() {
                step("setting the MAC address", net::set_mac(mac));
            }
            let r = net::reconfigure(&new, was.net.as_ref(), &id.hostname, &was.hostname);
            if step("network", r) {
                lock().net = Some(new);
            }
        }
        None => {
            let r = net::rename(was.net.as_ref(), &id.hostname, &was.hostname);
            step("/etc/hosts", r);
        }
    }
}

fn set_clock(time_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Adds `bytes` (at most `MAX_ENTROPY`) to the kernel's pool, credited as fully random, and
/// has the kernel reseed from it now; a kernel that refuses the ioctl gets them written to
/// /dev/urandom (mixed in, not credited).
fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/urandom")?;
    let n = bytes.len().min(hutch_proto::restore::MAX_ENTROPY);
    let mut info = PoolInfo {
        entropy_count: (n * 8) as libc::c_int,
        buf_size: n as libc::c_int,
        buf: [0; hutch_proto::restore::MAX_ENTROPY],
    };
    info.buf[..n].copy_from_slice(&bytes[..n]);
    // SAFETY: info is a rand_pool_info whose buf holds buf_size bytes; it outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &info as *const PoolInfo) };
    if r < 0 {
        eprintln!(
            "hutch-agent: RNDADDENTROPY: {}; mixing the entropy in uncredited",
            io::Error::last_os_error()
        );
        return f.write_all(&bytes[..n]);
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        // The CRNG takes the new entropy at its next scheduled reseed instead.
        eprintln!("hutch-agent: RNDRESEEDCRNG: {}", io::Error::last_os_error());
    }
    Ok(())
}

/// Rewrites `root`/etc/hostname with `name`, if the image has the file.
fn write_hostname(root: &Path, name: &str) -> io::Result<()> {
    let p = root.join("etc/hostname");
    if p.symlink_metadata().is_err() {
        return Ok(());
    }
    net::replace_file(&p, &format!("{name}\n"))
}

/// Writes `id` to `root`/etc/machine-id (mode 0444, replaced whole) when the file or /etc
/// exists, and to /var/lib/dbus/machine-id when that is a file of its own (not a link to the
/// first).
fn write_machine_id(root: &Path, id: &str) -> io::Result<()> {
    let etc = root.join("etc");
    let main = etc.join("machine-id");
    if main.symlink_metadata().is_ok() || etc.is_dir() {
        replace_ro(&main, &format!("{id}\n"))?;
    }
    let dbus = root.join("var/lib/dbus/machine-id");
    if dbus.symlink_metadata().is_ok_and(|m| m.is_file()) {
        replace_ro(&dbus, &format!("{id}\n"))?;
    }
    Ok(())
}

/// Replaces `p` with a read-only (0444) file holding `text`, by renaming a new file over it.
fn replace_ro(p: &Path, text: &str) -> io::Result<()> {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = p.with_file_name(format!(".{name}.hutch-new"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    // The umask may have taken bits away; 0444 whatever it is.
    f.set_permissions(std::fs::Permissions::from_mode(0o444))?;
    drop(f);
    std::fs::rename(&tmp, p).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hutch_proto::NetIdentity;
    use std::net::Ipv4Addr;

    fn info() -> RestoreInfo {
        let id = Identity {
            hostname: "copy".into(),
            machine_id: "00112233445566778899aabbccddeeff".into(),
            net: Some(NetIdentity {
                ip: Ipv4Addr::new(10, 0, 0, 9),
                gw: Ipv4Addr::new(10, 0, 0, 1),
                dns: Ipv4Addr::new(10, 0, 0, 1),
                domain: String::new(),
                mtu: None,
                mac: "02:68:0a:00:00:09".into(),
            }),
        };
        RestoreInfo::now(&[1; 32], Some(id))
    }

    #[test]
    fn bad_requests_are_refused_before_anything_changes() {
        let guest = Mutex::new(GuestState {
            hostname: "orig".into(),
            net: None,
        });
        let mut bad = info();
        bad.identity.as_mut().unwrap().hostname = "Not a name".into();
        let mut odd = info();
        odd.entropy = "abc".into();
        let mut mac = info();
        mac.identity.as_mut().unwrap().net.as_mut().unwrap().mac = "ff:ff:ff:ff:ff:ff".into();
        let mut clock = info();
        clock.time_ns = 5;
        for i in [bad, odd, mac, clock] {
            let (code, msg) = apply(&guest, &i).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");
            assert!(msg.starts_with("invalid restore request"), "{msg}");
        }
        assert_eq!(guest.lock().unwrap().hostname, "orig");
    }

    #[test]
    fn the_pool_info_is_laid_out_like_the_kernels() {
        assert_eq!(std::mem::offset_of!(PoolInfo, buf), 8);
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn machine_id_and_hostname_files() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        // No /etc: nothing written.
        write_machine_id(root, "00112233445566778899aabbccddeeff").unwrap();
        write_hostname(root, "copy").unwrap();
        assert!(!root.join("etc").exists());
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/dbus")).unwrap();
        std::fs::write(root.join("var/lib/dbus/machine-id"), "old\n").unwrap();
        write_hostname(root, "copy").unwrap();
        assert!(
            !root.join("etc/hostname").exists(),
            "made where the image had none"
        );
        write_machine_id(root, "00112233445566778899aabbccddeeff").unwrap();
        for p in ["etc/machine-id", "var/lib/dbus/machine-id"] {
            let p = root.join(p);
            let text = std::fs::read_to_string(&p).unwrap();
            assert_eq!(text, "00112233445566778899aabbccddeeff\n");
            let mode = p.metadata().unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o444, "{}", p.display());
        }
        // Replaced again (the 0444 file is no obstacle); a link to the first is left alone.
        std::fs::remove_file(root.join("var/lib/dbus/machine-id")).unwrap();
        std::os::unix::fs::symlink("/etc/machine-id", root.join("var/lib/dbus/machine-id"))
            .unwrap();
        write_machine_id(root, "ffeeddccbbaa99887766554433221100").unwrap();
        let text = std::fs::read_to_string(root.join("etc/machine-id")).unwrap();
        assert_eq!(text, "ffeeddccbbaa99887766554433221100\n");
        assert!(root
            .join("var/lib/dbus/machine-id")
            .symlink_metadata()
            .unwrap()
            .is_symlink());
        assert!(!root.join("etc/.machine-id.hutch-new").exists());
        std::fs::write(root.join("etc/hostname"), "orig\n").unwrap();
        write_hostname(root, "copy").unwrap();
        let text = std::fs::read_to_string(root.join("etc/hostname")).unwrap();
        assert_eq!(text, "copy\n");
    }
}
