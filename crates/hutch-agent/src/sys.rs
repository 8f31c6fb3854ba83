//! Thin safe wrappers over the syscalls the agent needs, and the protocol's error code of an
//! errno.

use hutch_proto::ErrorCode;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let src = CString::new(src)?;
    let fstype = CString::new(fstype)?;
    let target_c = cstr(target)?;
    let data = data.map(CString::new).transpose()?;
    let data_ptr = data
        .as_ref()
        .map(|d| d.as_ptr() as *const libc::c_void)
        .unwrap_or(std::ptr::null());
    // SAFETY: all pointers are valid NUL-terminated strings (or null for data) that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    };
    check(r).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "mount {} on {}: {e}",
                src.to_string_lossy(),
                target.display()
            ),
        )
    })
}

pub fn move_mount(src: &Path, target: &Path) -> io::Result<()> {
    let s = cstr(src)?;
    let t = cstr(target)?;
    // SAFETY: valid C strings; MS_MOVE ignores fstype and data.
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    })
}

pub fn chroot(p: &Path) -> io::Result<()> {
    let c = cstr(p)?;
    // SAFETY: valid C string.
    check(unsafe { libc::chroot(c.as_ptr()) })
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe a valid byte buffer.
    check(unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) })
}

/// Loads a kernel module from a file; an already loaded module is not an error.
pub fn load_module(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    let params = CString::default();
    use std::os::fd::AsRawFd;
    // SAFETY: finit_module takes an open fd, a NUL-terminated parameter string and flags.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, sig) })
}

/// Syncs and powers the VM off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; PID 1 must never exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Blocks until any child changes state; returns (pid, raw wait status).
pub fn wait_any() -> io::Result<(i32, i32)> {
    let mut status = 0;
    // SAFETY: status points to a valid c_int.
    let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((pid, status))
}

/// A new pseudo-terminal of `size`: (master, slave).
pub fn openpty(size: hutch_proto::TtySize) -> io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: m and s are valid out-pointers; name and termios may be null; ws is a valid winsize.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two fresh fds that nothing else owns.
    let files = unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) };
    for fd in [m, s] {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(files)
}

pub fn set_winsize(fd: i32, size: hutch_proto::TtySize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// Waits until `fd` is readable or `timeout_ms` passes; true when readable.
pub fn poll_in(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is a valid pollfd array of length 1.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && (p.revents & libc::POLLIN) != 0
}

/// The protocol's code for an I/O error: by its errno where it has one, else by its kind.
pub fn io_code(e: &io::Error) -> ErrorCode {
    if let Some(errno) = e.raw_os_error() {
        return match errno {
            libc::ENOENT => ErrorCode::NotFound,
            libc::EEXIST => ErrorCode::Exists,
            libc::EACCES | libc::EPERM => ErrorCode::PermissionDenied,
            libc::ENOTDIR | libc::ELOOP => ErrorCode::NotADirectory,
            libc::EISDIR => ErrorCode::IsDirectory,
            libc::ENOTEMPTY => ErrorCode::NotEmpty,
            libc::EINVAL | libc::EBADF => ErrorCode::InvalidArgument,
            libc::EFBIG | libc::E2BIG | libc::ENAMETOOLONG => ErrorCode::TooLarge,
            libc::ENOSPC | libc::EDQUOT => ErrorCode::NoSpace,
            libc::EROFS => ErrorCode::ReadOnly,
            libc::EBUSY | libc::ETXTBSY => ErrorCode::Busy,
            libc::ENOTSUP | libc::ENOSYS | libc::EXDEV => ErrorCode::Unsupported,
            libc::EMFILE | libc::ENFILE => ErrorCode::ResourceExhausted,
            _ => ErrorCode::Io,
        };
    }
    match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        io::ErrorKind::AlreadyExists => ErrorCode::Exists,
        // E.g. a NUL byte in a path, refused before any system call.
        io::ErrorKind::InvalidInput => ErrorCode::InvalidArgument,
        io::ErrorKind::Unsupported => ErrorCode::Unsupported,
        _ => ErrorCode::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_and_kinds_map_to_codes() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(io_code(&os(libc::ENOENT)), ErrorCode::NotFound);
        assert_eq!(io_code(&os(libc::EACCES)), ErrorCode::PermissionDenied);
        assert_eq!(io_code(&os(libc::EISDIR)), ErrorCode::IsDirectory);
        assert_eq!(io_code(&os(libc::ENOTEMPTY)), ErrorCode::NotEmpty);
        assert_eq!(io_code(&os(libc::EFBIG)), ErrorCode::TooLarge);
        assert_eq!(io_code(&os(libc::ENOSPC)), ErrorCode::NoSpace);
        assert_eq!(io_code(&os(libc::EIO)), ErrorCode::Io);
        assert_eq!(io_code(&os(libc::EMFILE)), ErrorCode::ResourceExhausted);
        // No errno: a NUL in a path is refused before any system call.
        let nul = std::fs::metadata("/etc/pass\0wd").unwrap_err();
        assert_eq!(io_code(&nul), ErrorCode::InvalidArgument);
        assert_eq!(io_code(&io::Error::other("x")), ErrorCode::Io);
    }
}
