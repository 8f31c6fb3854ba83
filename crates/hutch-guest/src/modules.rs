//! Resolving kernel module names to files, dependencies first, through `modules.dep`.

use crate::{io_err, GuestError};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    norm(file.split(".ko").next().unwrap_or(file))
}

/// Returns the module files needed for `wanted` under `dir` (a `/lib/modules/RELEASE`
/// directory), each after the modules it depends on. Wanted names that are built into the
/// kernel (listed in `modules.builtin`) are skipped.
pub fn resolve_modules(dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>, GuestError> {
    let dep_path = dir.join("modules.dep");
    let dep = std::fs::read_to_string(&dep_path)
        .map_err(io_err(format!("reading {}", dep_path.display())))?;
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    let mut by_name: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((file, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(str::to_string).collect();
        by_name.insert(module_name(file), (file.to_string(), deps));
    }
    let by_file: HashMap<&str, &Vec<String>> =
        by_name.values().map(|(f, d)| (f.as_str(), d)).collect();

    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit<'a>(
        file: &'a str,
        by_file: &HashMap<&'a str, &'a Vec<String>>,
        seen: &mut HashSet<&'a str>,
        order: &mut Vec<&'a str>,
    ) {
        if !seen.insert(file) {
            return;
        }
        if let Some(deps) = by_file.get(file) {
            for d in deps.iter() {
                visit(d, by_file, seen, order);
            }
        }
        order.push(file);
    }
    for w in wanted {
        let n = norm(w);
        match by_name.get(&n) {
            Some((file, _)) => visit(file, &by_file, &mut seen, &mut order),
            None if builtin.contains(&n) => continue,
            None => return Err(GuestError::MissingModule(w.to_string())),
        }
    }
    order
        .into_iter()
        .map(|f| {
            if !f.ends_with(".ko") {
                return Err(GuestError::CompressedModule(f.to_string()));
            }
            Ok(dir.join(f))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first_and_builtins_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("modules.dep"),
            "kernel/v/virtio_pci.ko: kernel/v/virtio_pci_modern_dev.ko kernel/v/virtio.ko kernel/v/virtio_ring.ko\n\
             kernel/v/virtio_pci_modern_dev.ko:\n\
             kernel/v/virtio.ko:\n\
             kernel/v/virtio_ring.ko:\n\
             kernel/b/virtio_blk.ko: kernel/v/virtio.ko kernel/v/virtio_ring.ko\n\
             kernel/fs/erofs.ko: kernel/lib/libcrc32c.ko\n\
             kernel/lib/libcrc32c.ko:\n",
        )
        .unwrap();
        std::fs::write(d.path().join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let got =
            resolve_modules(d.path(), &["virtio_blk", "virtio-pci", "ext4", "erofs"]).unwrap();
        let rel: Vec<_> = got
            .iter()
            .map(|p| {
                p.strip_prefix(d.path())
                    .unwrap()
                    .to_string_lossy()
                    .to_string()
            })
            .collect();
        assert_eq!(
            rel,
            [
                "kernel/v/virtio.ko",
                "kernel/v/virtio_ring.ko",
                "kernel/b/virtio_blk.ko",
                "kernel/v/virtio_pci_modern_dev.ko",
                "kernel/v/virtio_pci.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/fs/erofs.ko",
            ]
        );
        assert!(matches!(
            resolve_modules(d.path(), &["nope"]),
            Err(GuestError::MissingModule(_))
        ));
    }
}
