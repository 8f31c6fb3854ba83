//! File operations as a guest user: the thread that runs one takes the user's filesystem
//! credentials, so the kernel checks its permissions and what it makes is its. Only the calling
//! thread changes (raw system calls, not libc's process-wide wrappers), and every such operation
//! runs on a thread of its own that ends with it.

use std::io;

/// Makes this thread act on files as `spec` (`name`, `uid`, `name:group`, `uid:gid`, resolved
/// in the guest's /etc/passwd and /etc/group): its fsuid and fsgid, no supplementary groups
/// (as a process hutch runs as that user), and so none of root's file capabilities.
pub fn become_user(spec: &str) -> io::Result<()> {
    let (uid, gid, _) = crate::exec::resolve_user(spec)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain system calls on this thread's credentials; a null list of length 0.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::syscall(libc::SYS_setfsgid, gid as libc::c_long);
        libc::syscall(libc::SYS_setfsuid, uid as libc::c_long);
        // setfs*id return the previous value and never fail visibly: read them back.
        let now_uid = libc::syscall(libc::SYS_setfsuid, -1 as libc::c_long) as u32;
        let now_gid = libc::syscall(libc::SYS_setfsgid, -1 as libc::c_long) as u32;
        if now_uid != uid || now_gid != gid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("could not act as {spec} ({uid}:{gid})"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own, as the tests run as root: nobody cannot read a 0600 file of
    /// root's, root (another thread) still can, and a file nobody makes is nobody's.
    #[test]
    fn a_thread_acts_as_the_user_and_only_it() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (s2, made) = (secret.clone(), d.path().join("made"));
        let m2 = made.clone();
        std::thread::spawn(move || {
            become_user("65534:65534").unwrap();
            let e = std::fs::read(&s2).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            std::fs::write(&m2, "x").unwrap();
        })
        .join()
        .unwrap();
        assert_eq!(
            std::fs::read(&secret).unwrap(),
            b"s",
            "other threads keep root's rights"
        );
        assert_eq!(std::fs::metadata(&made).unwrap().uid(), 65534);
        assert!(std::thread::spawn(|| become_user("no-such-user"))
            .join()
            .unwrap()
            .is_err());
    }
}
