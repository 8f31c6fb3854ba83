//! The QEMU version hutch needs, and the check hutchd runs at start.
//!
//! Snapshots rely on QEMU >= 8.2 (`mapped-ram`, `x-ignore-shared`, `file:` migration), so an
//! older QEMU is refused up front with a message that says where a newer one comes from, instead
//! of failing later in the middle of a VM operation.

use crate::VmmError;
use std::path::Path;
use std::process::Command;

/// The oldest QEMU hutch runs with.
pub const MIN_QEMU: (u32, u32) = (8, 2);

/// Parses the first line of `qemu-system-x86_64 --version`
/// (`QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2...)`) into (major, minor, micro).
pub fn parse_version(out: &str) -> Option<(u32, u32, u32)> {
    let line = out.lines().next()?;
    let rest = line.split("version ").nth(1)?;
    let v = rest.split_whitespace().next()?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let major = it.next()??;
    let minor = it.next()??;
    let micro = it.next().flatten().unwrap_or(0);
    Some((major, minor, micro))
}

/// Runs `binary --version` and refuses a QEMU older than [`MIN_QEMU`].
pub fn check_qemu(binary: &Path) -> Result<(u32, u32, u32), VmmError> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| {
            VmmError::Version(format!(
                "cannot run {}: {e}; install QEMU >= {}.{} (scripts/install-deps.sh does: on \
                 Debian 12 from bookworm-backports, on Debian 13 and Ubuntu 24.04 from main)",
                binary.display(),
                MIN_QEMU.0,
                MIN_QEMU.1
            ))
        })?;
    if !out.status.success() {
        return Err(VmmError::Version(format!(
            "{} --version failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v = parse_version(&text).ok_or_else(|| {
        VmmError::Version(format!(
            "cannot read the version of {} from {:?}",
            binary.display(),
            text.lines().next().unwrap_or("")
        ))
    })?;
    if (v.0, v.1) < MIN_QEMU {
        return Err(VmmError::Version(format!(
            "{} is QEMU {}.{}.{}; hutch needs >= {}.{}. On Debian 12 install qemu-system-x86 and \
             qemu-utils together from bookworm-backports (`apt-get install -t bookworm-backports \
             qemu-system-x86 qemu-utils`, or run scripts/install-deps.sh); Debian 13 and Ubuntu \
             24.04 carry a new enough QEMU in main",
            binary.display(),
            v.0,
            v.1,
            v.2,
            MIN_QEMU.0,
            MIN_QEMU.1
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_and_plain_versions() {
        assert_eq!(
            parse_version(
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
            ),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some((7, 2, 19))
        );
        assert_eq!(parse_version("QEMU emulator version 8.2"), Some((8, 2, 0)));
        assert_eq!(parse_version("something else"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn refuses_old_and_missing_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old-qemu");
        std::fs::write(
            &old,
            "#!/bin/sh\necho 'QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)'\n",
        )
        .unwrap();
        std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = check_qemu(&old).unwrap_err().to_string();
        assert!(
            e.contains("7.2.19") && e.contains("bookworm-backports"),
            "{e}"
        );
        let e = check_qemu(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot run"), "{e}");
        let new = dir.path().join("new-qemu");
        std::fs::write(&new, "#!/bin/sh\necho 'QEMU emulator version 9.1.0'\n").unwrap();
        std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert_eq!(check_qemu(&new).unwrap(), (9, 1, 0));
    }
}
