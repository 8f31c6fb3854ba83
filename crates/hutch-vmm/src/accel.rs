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
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("hutch-accel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
