//! hutch-hostile: a hostile guest, for hutch's adversarial tests. Never part of a VM's
//! initramfs; tests copy it into a VM and run it as root there.
//!
//! `hutch-hostile oversize` takes a duplicate of the agent's own virtio-serial port descriptor
//! (pidfd_getfd on PID 1, which root in the guest may do) and writes a frame header announcing a
//! payload far over the protocol limit, followed by junk: what a compromised guest could send
//! hutchd. hutchd must drop that connection, stay healthy and reconnect.

use std::io::Write;
use std::os::fd::FromRawFd;

/// The agent's open descriptor on the virtio-serial port.
fn agent_port_fd() -> Option<i32> {
    for e in std::fs::read_dir("/proc/1/fd").ok()?.flatten() {
        let target = std::fs::read_link(e.path()).ok()?;
        if target.to_string_lossy().starts_with("/dev/vport") {
            return e.file_name().to_string_lossy().parse().ok();
        }
    }
    None
}

fn steal(fd: i32) -> std::io::Result<std::fs::File> {
    // SAFETY: raw syscalls with integer arguments; results are checked before use.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, 1, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0);
        libc::close(pidfd as i32);
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor this process owns.
        Ok(std::fs::File::from_raw_fd(dup as i32))
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode != "oversize" {
        eprintln!("usage: hutch-hostile oversize");
        std::process::exit(2);
    }
    let Some(fd) = agent_port_fd() else {
        eprintln!("hutch-hostile: the agent's port descriptor was not found");
        std::process::exit(1);
    };
    let mut port = match steal(fd) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hutch-hostile: pidfd_getfd: {e}");
            std::process::exit(1);
        }
    };
    // "HU", Stdout, flags 0, stream 1, length 0xFFFF_FFF0: far over the 256 KiB limit.
    let mut frame = b"HU\x04\x00\x00\x00\x00\x01\xff\xff\xff\xf0".to_vec();
    frame.extend(std::iter::repeat_n(0x5a, 64 * 1024));
    if let Err(e) = port.write_all(&frame) {
        eprintln!("hutch-hostile: write: {e}");
        std::process::exit(1);
    }
    println!("sent");
}
