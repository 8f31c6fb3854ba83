//! Crash points for crash-safety tests: `hutchd --crash-at NAME` aborts the daemon (as a
//! `kill -9` would: no destructors, no cleanup) the first time the named point is reached. Every
//! point sits between two steps of an operation whose interruption restart must repair.
//!
//! Points: create.registered, create.disk, boot.launched, boot.connected, clone.copied,
//! delete.marked, delete.destroyed, commit.exporting, commit.built, pull.fetched,
//! import.uploaded, import.built, pause.saved, snapshot.saved, snapshot.frozen.

use std::sync::OnceLock;

static AT: OnceLock<String> = OnceLock::new();

/// Arms the crash point `name` (once per process).
pub fn arm(name: &str) {
    let _ = AT.set(name.to_string());
    tracing::warn!(
        point = name,
        "crash point armed: hutchd will abort when it gets there"
    );
}

/// Aborts the process if `name` is the armed crash point.
pub fn point(name: &str) {
    if AT.get().is_some_and(|a| a == name) {
        eprintln!("hutchd: crash point {name} reached; aborting");
        std::process::abort();
    }
}
