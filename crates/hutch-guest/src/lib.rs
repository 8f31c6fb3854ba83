//! The guest boot bundle: a kernel plus an initramfs with `hutch-agent` as `/init` and exactly the
//! kernel modules the guest needs, resolved through `modules.dep`.
//!
//! The kernel comes from the distribution's cloud kernel package (fetched once with
//! `apt-get download` into the cache directory) unless the user supplies one. The initramfs is
//! cached by a hash of the agent binary, the kernel release and the module set, so it is rebuilt
//! only when one of them changes.

mod cpio;
mod kernel;
mod modules;

pub use kernel::{fetch_distro_kernel, Kernel};
pub use modules::resolve_modules;

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Modules the guest needs: virtio transport, disks, the agent's serial port, the image and
/// overlay filesystems, and networking for later. Names not built as modules are skipped.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "erofs",
    "overlay",
    "ext4",
];

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching the guest kernel failed: {0}")]
    Fetch(String),
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    MissingModule(String),
    #[error("compressed kernel module {0} is not supported; supply uncompressed modules")]
    CompressedModule(String),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
    let context = context.into();
    move |source| GuestError::Io { context, source }
}

/// Everything QEMU needs to boot a hutch guest.
#[derive(Debug, Clone)]
pub struct BootBundle {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
}

/// Returns the boot bundle for `kernel` and `agent`, building the initramfs into `cache` if no
/// up-to-date one is there.
pub fn ensure_bundle(
    cache: &Path,
    kernel: &Kernel,
    agent: &Path,
) -> Result<BootBundle, GuestError> {
    let agent_bytes =
        std::fs::read(agent).map_err(io_err(format!("reading agent {}", agent.display())))?;
    let mods = match &kernel.modules_dir {
        Some(dir) => resolve_modules(dir, GUEST_MODULES)?,
        None => Vec::new(),
    };
    let mut h = Sha256::new();
    h.update(&agent_bytes);
    h.update(kernel.release.as_bytes());
    for m in &mods {
        h.update(m.as_os_str().as_encoded_bytes());
        h.update(b"\0");
    }
    let key = hex::encode(&h.finalize()[..8]);
    let initrd = cache.join(format!("initramfs-{}-{key}.cpio", kernel.release));
    if !initrd.exists() {
        std::fs::create_dir_all(cache).map_err(io_err(format!("creating {}", cache.display())))?;
        tracing::info!(path = %initrd.display(), modules = mods.len(), "building guest initramfs");
        let tmp = tempfile::NamedTempFile::new_in(cache).map_err(io_err("creating initramfs"))?;
        let mut w = cpio::Writer::new(std::io::BufWriter::new(tmp.as_file()));
        let w_err = io_err("writing initramfs");
        build_initramfs(&mut w, kernel, &mods, &agent_bytes).map_err(w_err)?;
        drop(w);
        hutch_fs::durable::sync_file(tmp.as_file()).map_err(io_err("flushing initramfs"))?;
        tmp.persist(&initrd)
            .map_err(|e| io_err("saving initramfs")(e.error))?;
        hutch_fs::durable::sync_dir(cache).map_err(io_err("flushing initramfs"))?;
    }
    Ok(BootBundle {
        kernel: kernel.image.clone(),
        initrd,
        release: kernel.release.clone(),
    })
}

fn build_initramfs<W: std::io::Write>(
    w: &mut cpio::Writer<W>,
    kernel: &Kernel,
    mods: &[PathBuf],
    agent: &[u8],
) -> std::io::Result<()> {
    for d in [
        "dev",
        "proc",
        "sys",
        "hutch",
        "hutch/root",
        "hutch/lower",
        "hutch/data",
        "lib",
        "lib/modules",
    ] {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, agent)?;
    let mut load = String::new();
    if let Some(dir) = &kernel.modules_dir {
        let base = format!("lib/modules/{}", kernel.release);
        let mut made = std::collections::BTreeSet::new();
        for m in mods {
            let rel = m.strip_prefix(dir).unwrap_or(m);
            let target = format!("{base}/{}", rel.display());
            // Create every parent directory once, outermost first.
            let mut parents: Vec<_> = Path::new(&target).ancestors().skip(1).collect();
            parents.reverse();
            for p in parents {
                let p = p.to_string_lossy().to_string();
                if !p.is_empty() && p != "lib" && p != "lib/modules" && made.insert(p.clone()) {
                    w.dir(&p, 0o755)?;
                }
            }
            w.file(&target, 0o644, &std::fs::read(m)?)?;
            load.push_str(&format!("/{target}\n"));
        }
    }
    w.file("hutch/modules.load", 0o644, load.as_bytes())?;
    w.finish()
}
