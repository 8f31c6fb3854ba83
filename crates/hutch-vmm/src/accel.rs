//! Choosing the accelerator: KVM only where it can run a stock kernel, else TCG.

use crate::VmmError;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(format!(
                "unknown accelerator {s:?} (expected auto, kvm or tcg)"
            )),
        }
    }
}

/// Picks the accelerator and says why. `root` is the filesystem root to inspect (`/` in
/// production; a fake tree in tests).
pub fn detect_accel(choice: AccelChoice, root: &Path) -> Result<(Accel, String), VmmError> {
    let kvm_dev = root.join("dev/kvm");
    let pvm = root.join("sys/module/kvm_pvm").exists();
    let kvm_ok = || -> Result<(), String> {
        if !kvm_dev.exists() {
            return Err("/dev/kvm does not exist".into());
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&kvm_dev)
            .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        if pvm {
            return Err("/dev/kvm is PVM (kvm_pvm loaded), which cannot run a stock kernel".into());
        }
        Ok(())
    };
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, "tcg forced by configuration".into())),
        AccelChoice::Kvm => match kvm_ok() {
            Ok(()) => Ok((Accel::Kvm, "kvm forced by configuration".into())),
            Err(e) if pvm && kvm_dev.exists() => Ok((
                Accel::Kvm,
                format!("kvm forced by configuration although {e}"),
            )),
            Err(e) => Err(VmmError::Accel("kvm", e)),
        },
        AccelChoice::Auto => match kvm_ok() {
            Ok(()) => Ok((Accel::Kvm, "hardware KVM available".into())),
            Err(e) => Ok((Accel::Tcg, format!("{e}; using TCG software emulation"))),
        },
    }
}

/// Whether confined QEMUs (each its own uid, with /dev/kvm's group as a supplementary group)
/// can open `/dev/kvm` under `root`: it must be group read-write, for a group other than root's
/// (giving QEMU root's group would give it far more than KVM). Debian's udev makes it
/// `0660 root:kvm`; some hosts leave it `0600 root:root`.
pub fn kvm_for_confined(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(root.join("dev/kvm")).map_err(|e| format!("/dev/kvm: {e}"))?;
    if m.mode() & 0o060 != 0o060 || m.gid() == 0 {
        return Err(format!(
            "/dev/kvm is mode {:o}, group {}: confined QEMUs reach it through its group; make it \
             0660 with a group of its own (chgrp kvm /dev/kvm; chmod 0660 /dev/kvm), or run \
             hutchd with --jail off",
            m.mode() & 0o777,
            m.gid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_falls_back_to_tcg_and_missing_kvm_refuses_forced_kvm() {
        let d = tempfile_dir();
        std::fs::create_dir_all(d.join("dev")).unwrap();
        let (a, why) = detect_accel(AccelChoice::Auto, &d).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("does not exist"), "{why}");
        assert!(detect_accel(AccelChoice::Kvm, &d).is_err());
        std::fs::write(d.join("dev/kvm"), b"").unwrap();
        std::fs::create_dir_all(d.join("sys/module/kvm_pvm")).unwrap();
        let (a, why) = detect_accel(AccelChoice::Auto, &d).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("PVM"), "{why}");
        std::fs::remove_dir_all(d.join("sys")).unwrap();
        assert_eq!(detect_accel(AccelChoice::Auto, &d).unwrap().0, Accel::Kvm);
        assert_eq!(detect_accel(AccelChoice::Tcg, &d).unwrap().0, Accel::Tcg);
        // A 0600 root:root /dev/kvm (as on some hosts) is not for confined QEMUs.
        use std::os::unix::fs::PermissionsExt;
        let kvm = d.join("dev/kvm");
        std::fs::set_permissions(&kvm, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = kvm_for_confined(&d).unwrap_err();
        assert!(e.contains("0660"), "{e}");
        std::fs::set_permissions(&kvm, std::fs::Permissions::from_mode(0o660)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Group root is refused too; another group passes.
            assert!(kvm_for_confined(&d).is_err());
            std::os::unix::fs::chown(&kvm, None, Some(65534)).unwrap();
            assert_eq!(kvm_for_confined(&d), Ok(()));
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("hutch-accel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
