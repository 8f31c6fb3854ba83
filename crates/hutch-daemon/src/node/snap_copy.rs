//! A snapshot's files on a node other than the one that took it (cluster): which files a
//! snapshot has, whether this node holds them all, and installing copies received from the
//! snapshot's node. Copies are frozen like the originals; `collect` removes them with the
//! snapshot's record, as it does the originals.

use super::snap::freeze_mode;
use super::{internal, Node};
use crate::error::ApiError;
use hutch_core::snapshot::Snapshot;
use std::path::PathBuf;

impl Node {
    /// The files of `snap` (a name for each, as nodes ask for them, and its path here): its
    /// state, its memory file (when its RAM is in one), and every disk layer under it.
    pub fn snapshot_files(&self, snap: &Snapshot) -> Vec<(String, PathBuf)> {
        let dir = self.snapshot_dir(&snap.id);
        let mut v = vec![("state".to_string(), dir.join("state"))];
        if snap.ram_in_file {
            v.push(("mem".into(), dir.join("mem")));
        }
        for l in &snap.layers {
            v.push((format!("layer-{l}"), self.layer_path(l)));
        }
        v
    }

    /// Whether every file of `snap` is here.
    pub fn has_snapshot_files(&self, snap: &Snapshot) -> bool {
        self.snapshot_files(snap).iter().all(|(_, p)| p.is_file())
    }

    /// Puts the copies of `snap`'s files in `staged` (name, path; same filesystem) in place,
    /// frozen and synced: the layers this node lacks, then the memory file, the state last (its
    /// presence says the rest is there). The caller holds the snapshot lock that `collect`
    /// takes exclusively.
    pub fn install_snapshot_files(
        &self,
        snap: &Snapshot,
        staged: &[(String, PathBuf)],
    ) -> Result<(), ApiError> {
        let io = |what: &str, p: &std::path::Path, e: std::io::Error| {
            ApiError::Internal(format!("{what} {}: {e}", p.display()))
        };
        let wanted = self.snapshot_files(snap);
        let path_of = |name: &str| {
            wanted
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| internal(format!("{name} is not a file of snapshot {}", snap.name)))
        };
        let layers = self.cfg.data_dir.join("layers");
        std::fs::create_dir_all(&layers).map_err(|e| io("creating", &layers, e))?;
        let dir = self.snapshot_dir(&snap.id);
        std::fs::create_dir_all(&dir).map_err(|e| io("creating", &dir, e))?;
        let mut order: Vec<&(String, PathBuf)> = staged.iter().collect();
        // Layers, then the memory file, then the state.
        order.sort_by_key(|(n, _)| match n.as_str() {
            "state" => 2,
            "mem" => 1,
            _ => 0,
        });
        for (name, from) in order {
            let to = path_of(name)?;
            if to.is_file() {
                continue; // a layer this node has already (frozen: the same bytes)
            }
            freeze_mode(from)?;
            std::fs::File::open(from)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("syncing", from, e))?;
            std::fs::rename(from, &to).map_err(|e| io("installing", &to, e))?;
        }
        hutch_fs::durable::sync_dir(&layers).map_err(internal)?;
        hutch_fs::durable::sync_dir(&dir).map_err(internal)?;
        Ok(())
    }
}
