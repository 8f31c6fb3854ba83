//! Finding or fetching the guest kernel.

use crate::{io_err, GuestError};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A guest kernel image and, when it has loadable modules, their `/lib/modules/RELEASE` directory.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub modules_dir: Option<PathBuf>,
    pub release: String,
}

impl Kernel {
    /// A kernel the user supplies. `modules_dir` is its `/lib/modules/RELEASE` directory, needed
    /// when virtio drivers are modules; without it the drivers must be built in.
    pub fn user(image: &Path, modules_dir: Option<&Path>) -> Result<Kernel, GuestError> {
        if !image.is_file() {
            return Err(GuestError::Io {
                context: format!("kernel {}", image.display()),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let release = match modules_dir {
            Some(d) => d
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "custom".into()),
            None => "custom".into(),
        };
        if let Some(d) = modules_dir {
            if !d.join("modules.dep").exists() {
                run(Command::new("depmod")
                    .arg("-b")
                    .arg(d.join("../../.."))
                    .arg(&release))?;
            }
        }
        Ok(Kernel {
            image: image.to_path_buf(),
            modules_dir: modules_dir.map(Path::to_path_buf),
            release,
        })
    }
}

fn run(cmd: &mut Command) -> Result<String, GuestError> {
    let out = cmd
        .output()
        .map_err(|e| GuestError::Fetch(format!("running {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(GuestError::Fetch(format!(
            "{:?} {:?} failed: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The distribution's cloud kernel (`linux-image-cloud-amd64` on Debian), downloaded with
/// `apt-get download` and unpacked into `cache/kernel/RELEASE` on first use; later calls reuse it
/// without touching the network.
pub fn fetch_distro_kernel(cache: &Path, package: &str) -> Result<Kernel, GuestError> {
    let root = cache.join("kernel");
    if let Some(k) = find_unpacked(&root)? {
        return Ok(k);
    }
    std::fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
    let tmp = tempfile::tempdir_in(&root).map_err(io_err("creating download dir"))?;
    tracing::info!(package, "downloading guest kernel package");
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(tmp.path()))?;
    let meta = only_deb(tmp.path())?;
    // The cloud package is a metapackage; its first dependency is the versioned image package.
    let depends = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&meta)
        .arg("Depends"))?;
    let image_pkg = depends
        .split(',')
        .map(|d| d.trim().split([' ', '|']).next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-"))
        .unwrap_or(package)
        .to_string();
    std::fs::remove_file(&meta).map_err(io_err("removing metapackage"))?;
    if image_pkg != package {
        run(Command::new("apt-get")
            .args(["download", "-q", &image_pkg])
            .current_dir(tmp.path()))?;
    }
    let deb = only_deb(tmp.path())?;
    let stage = tmp.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&stage))?;
    let release = std::fs::read_dir(stage.join("lib/modules"))
        .map_err(io_err("package has no /lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .next()
        .ok_or_else(|| GuestError::Fetch("package has no module directory".into()))?;
    run(Command::new("depmod").arg("-b").arg(&stage).arg(&release))?;
    let dest = root.join(&release);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&stage, &dest)
        .map_err(io_err(format!("installing kernel into {}", dest.display())))?;
    find_unpacked(&root)?.ok_or_else(|| GuestError::Fetch(format!("no vmlinuz in {image_pkg}")))
}

fn only_deb(dir: &Path) -> Result<PathBuf, GuestError> {
    std::fs::read_dir(dir)
        .map_err(io_err("listing download dir"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| GuestError::Fetch("apt-get download produced no .deb".into()))
}

fn find_unpacked(root: &Path) -> Result<Option<Kernel>, GuestError> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(None);
    };
    let mut found: Vec<Kernel> = rd
        .flatten()
        .filter_map(|e| {
            let release = e.file_name().to_string_lossy().to_string();
            let image = e.path().join(format!("boot/vmlinuz-{release}"));
            let modules = e.path().join(format!("lib/modules/{release}"));
            (image.exists() && modules.join("modules.dep").exists()).then_some(Kernel {
                image,
                modules_dir: Some(modules),
                release,
            })
        })
        .collect();
    found.sort_by(|a, b| a.release.cmp(&b.release));
    Ok(found.pop())
}
