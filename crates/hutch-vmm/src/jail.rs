//! Confining one QEMU: its own unprivileged uid, an empty chroot, a cgroup, seccomp.
//!
//! QEMU's own `-run-with user=` and `-daemonize` cannot be combined with
//! `-sandbox elevateprivileges=deny,spawn=deny` (the filter, installed early, kills QEMU when it
//! later calls setgid/setsid/fork; measured with QEMU 10.0), so hutchd does that part itself, in
//! the forked child before `exec` ([`drop_privileges`]): new session, join the cgroup, drop every
//! capability but `CAP_SYS_CHROOT` (kept as an ambient capability so it survives `exec`), switch to
//! the VM's uid/gid, `no_new_privs`. QEMU then opens what hutchd handed it as file descriptors and,
//! right before the guest runs, chroots (`-run-with chroot=`) into an empty directory it cannot
//! write, where the retained `CAP_SYS_CHROOT` is useless: there is no directory to escape through.

use crate::cgroup::{Cgroups, Limits};
use std::os::fd::RawFd;
use std::path::PathBuf;

/// Memory a QEMU process needs beyond guest RAM, MiB (measured: docs/architecture.md,
/// "Confinement"; TCG's translation cache is capped by `tb-size` to keep this bounded).
pub const DEFAULT_MEM_OVERHEAD_MIB: u64 = 160;
/// Threads QEMU may make besides its vCPUs (main loop, RCU, monitor I/O, up to 64 block I/O
/// workers, ...); QEMU aborts when it cannot create a thread, so this is generous.
pub const PIDS_BASE: u64 = 128;
pub const CPU_PERIOD_US: u64 = 100_000;

/// The node-wide confinement settings (hutchd options).
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// First uid of the range VMs get their uid from (gid = uid).
    pub uid_base: u32,
    pub uid_count: u32,
    /// Parent of the per-VM empty chroot directories (`DIR/ID`).
    pub dir: PathBuf,
    /// None: the host offers no usable cgroups (QEMU then runs without limits; logged).
    pub cgroups: Option<Cgroups>,
    pub mem_overhead_mib: u64,
}

impl JailConfig {
    /// The cgroup limits of a VM of this size.
    pub fn limits(&self, vcpus: u32, mem_mib: u64) -> Limits {
        Limits {
            memory_bytes: (mem_mib + self.mem_overhead_mib) << 20,
            cpu_quota_us: u64::from(vcpus.max(1)) * CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
            pids: PIDS_BASE + u64::from(vcpus),
        }
    }

    pub fn jail_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Whether `uid` lies in the configured range.
    pub fn owns_uid(&self, uid: u32) -> bool {
        uid >= self.uid_base && uid - self.uid_base < self.uid_count
    }
}

/// The lowest uid of `base..base+count` not in `used`.
pub fn allocate_uid(base: u32, count: u32, used: &[u32]) -> Option<u32> {
    (0..count)
        .filter_map(|i| base.checked_add(i))
        .find(|u| !used.contains(u))
}

/// The real uids of every process on the host (so a uid another hutchd's VM runs as is not
/// handed out again while it runs).
pub fn uids_in_use() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The identity QEMU drops to in the child.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the group of /dev/kvm when KVM is used).
    pub groups: Vec<u32>,
}

const CAP_SYS_CHROOT: u32 = 18;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(r: libc::c_long) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs in the forked child right before `exec` (see the module docs); allocates nothing.
///
/// # Safety
/// Call only between `fork` and `exec` of a single-threaded child (`Command::pre_exec`).
/// `procs` are open, writable `cgroup.procs` files; `keep` are descriptors QEMU is told about.
pub unsafe fn drop_privileges(
    procs: &[RawFd],
    keep: &[RawFd],
    who: Option<&Identity>,
) -> std::io::Result<()> {
    // SAFETY: plain system calls on descriptors and values owned by the caller; the pointers
    // passed point to live stack or caller-owned memory of the declared sizes.
    unsafe {
        // A session of its own: no terminal signals from hutchd's, survives hutchd.
        check(libc::setsid() as libc::c_long)?;
        for &fd in procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        for &fd in keep {
            let fl = libc::fcntl(fd, libc::F_GETFD);
            check(fl as libc::c_long)?;
            check(libc::fcntl(fd, libc::F_SETFD, fl & !libc::FD_CLOEXEC) as libc::c_long)?;
        }
        if let Some(id) = who {
            for cap in 0..64u32 {
                if cap == CAP_SYS_CHROOT {
                    continue;
                }
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0 {
                    // EINVAL: past the last capability this kernel knows.
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                        break;
                    }
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::setgroups(id.groups.len(), id.groups.as_ptr()) as libc::c_long)?;
            check(libc::setresgid(id.gid, id.gid, id.gid) as libc::c_long)?;
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long)?;
            check(libc::setresuid(id.uid, id.uid, id.uid) as libc::c_long)?;
            let mut hdr = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let bit = 1u32 << CAP_SYS_CHROOT;
            let data = [
                CapData {
                    effective: bit,
                    permitted: bit,
                    inheritable: bit,
                },
                CapData {
                    effective: 0,
                    permitted: 0,
                    inheritable: 0,
                },
            ];
            check(libc::syscall(
                libc::SYS_capset,
                &mut hdr as *mut CapHeader,
                data.as_ptr(),
            ))?;
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                CAP_SYS_CHROOT as libc::c_ulong,
                0,
                0,
            ) as libc::c_long)?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> JailConfig {
        JailConfig {
            uid_base: 900_000,
            uid_count: 3,
            dir: "/j".into(),
            cgroups: None,
            mem_overhead_mib: 100,
        }
    }

    #[test]
    fn uids_come_from_the_range_lowest_free_first() {
        assert_eq!(allocate_uid(900_000, 3, &[]), Some(900_000));
        assert_eq!(allocate_uid(900_000, 3, &[900_000, 5]), Some(900_001));
        assert_eq!(allocate_uid(900_000, 3, &[900_000, 900_001, 900_002]), None);
        assert_eq!(allocate_uid(u32::MAX, 3, &[u32::MAX]), None);
        let c = cfg();
        assert!(c.owns_uid(900_002) && !c.owns_uid(900_003) && !c.owns_uid(0));
    }

    #[test]
    fn limits_follow_the_vm_size() {
        let l = cfg().limits(2, 256);
        assert_eq!(l.memory_bytes, 356 << 20);
        assert_eq!((l.cpu_quota_us, l.cpu_period_us), (200_000, 100_000));
        assert_eq!(l.pids, PIDS_BASE + 2);
        assert_eq!(cfg().jail_dir("vm1"), PathBuf::from("/j/vm1"));
    }

    #[test]
    fn uids_in_use_sees_this_process() {
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        assert!(uids_in_use().contains(&me));
    }

    /// The drop as a child sees it: uid/gid switched, only CAP_SYS_CHROOT left (ambient too),
    /// no_new_privs, its own session. Needs root; skipped otherwise.
    #[test]
    fn drop_privileges_in_a_child() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root; skipped");
            return;
        }
        use std::os::unix::process::CommandExt;
        let who = Identity {
            uid: 900_123,
            gid: 900_123,
            groups: vec![],
        };
        let mut c = std::process::Command::new("cat");
        c.arg("/proc/self/status");
        // SAFETY: drop_privileges allocates nothing and only makes system calls.
        unsafe { c.pre_exec(move || drop_privileges(&[], &[], Some(&who))) };
        let o = c.output().unwrap();
        assert!(o.status.success());
        let s = String::from_utf8(o.stdout).unwrap();
        let field = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(field("Uid:"), "900123 900123 900123 900123");
        assert_eq!(field("Gid:"), "900123 900123 900123 900123");
        assert_eq!(field("Groups:"), "");
        assert_eq!(field("CapEff:"), "0000000000040000");
        assert_eq!(field("CapAmb:"), "0000000000040000");
        assert_eq!(field("CapBnd:"), "0000000000040000");
        assert_eq!(field("NoNewPrivs:"), "1");
    }
}
