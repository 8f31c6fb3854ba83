//! Live migration between two QEMUs over QMP, on descriptors hutchd hands in: QEMU itself
//! opens no socket and resolves no address (it runs chrooted, docs/security.md), and hutchd
//! carries both streams between the nodes (docs/cluster.md).
//!
//! - The target is launched with [`crate::VmSpec::migration_in`] (`-incoming defer -S`);
//!   [`receive`] exports its writable disk over NBD on a listening socket and waits for the
//!   migration stream on a connected one.
//! - The source ([`send`]) mirrors its writable disk, whole (`sync=full`: the target's disk
//!   may have other backing files), into that export, with guest writes copied synchronously
//!   once the mirror is in step (`write-blocking`), then migrates RAM and devices. It ends
//!   stopped (`postmigrate`), the mirror gone, its disk unchanged.
//! - [`complete`] on the target closes the export and lets the guest run.

use crate::qmp::Blocking;
use crate::VmmError;
use serde_json::json;
use std::os::fd::RawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// The NBD export name of the target's writable disk.
const EXPORT: &str = "hutch-data";
/// The block node of the source's mirror target.
const MIRROR_NODE: &str = "hutch-mirror";
const MIRROR_JOB: &str = "hutch-mirror";
/// How long the disk copy may take to get in step.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the RAM copy may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);
/// The pause QEMU aims at when it switches over (ms).
pub const DOWNTIME_LIMIT_MS: u64 = 300;

/// What a migration moved and how long it took, as the source saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sent {
    /// Bytes of disk the mirror copied.
    pub disk_bytes: u64,
    /// Bytes of RAM and device state sent.
    pub ram_bytes: u64,
    /// The guest's pause on the source: QEMU's switch-over and the mirror's end (ms).
    pub downtime_ms: u64,
    /// From the start of the disk copy to the end of the RAM copy (ms).
    pub total_ms: u64,
}

fn qmp(path: &Path) -> Result<Blocking, VmmError> {
    Blocking::connect(path, Duration::from_secs(30))
}

/// Target: serves the writable disk (block node `data`) over NBD on `listener` (a listening
/// unix socket) and starts waiting for the migration stream on `stream` (a connected socket).
pub fn receive(qmp_socket: &Path, listener: RawFd, stream: RawFd) -> Result<(), VmmError> {
    let mut q = qmp(qmp_socket)?;
    q.execute_with_fd("getfd", Some(json!({ "fdname": "hutch-nbd" })), listener)?;
    q.execute(
        "nbd-server-start",
        Some(json!({ "addr": { "type": "fd", "data": { "str": "hutch-nbd" } } })),
    )?;
    q.execute(
        "block-export-add",
        Some(json!({ "type": "nbd", "id": EXPORT, "node-name": "data",
                     "name": EXPORT, "writable": true })),
    )?;
    q.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            // The disk stays with the NBD export until complete() takes it back.
            { "capability": "late-block-activate", "state": true },
            { "capability": "x-ignore-shared", "state": false },
        ]})),
    )?;
    q.execute_with_fd("getfd", Some(json!({ "fdname": "hutch-mig" })), stream)?;
    q.execute("migrate-incoming", Some(json!({ "uri": "fd:hutch-mig" })))?;
    Ok(())
}

/// Source: copies the disk into the target's export (`disk`: a connected socket to it), then
/// RAM and devices (`state`: a connected socket to the target's stream). On error the source
/// runs on as before (the mirror and half-sent state are dropped).
pub fn send(qmp_socket: &Path, disk: RawFd, state: RawFd) -> Result<Sent, VmmError> {
    let t0 = Instant::now();
    let mut q = qmp(qmp_socket)?;
    let r = send_on(&mut q, disk, state, t0);
    if r.is_err() {
        abandon(&mut q);
    }
    r
}

fn send_on(q: &mut Blocking, disk: RawFd, state: RawFd, t0: Instant) -> Result<Sent, VmmError> {
    q.execute_with_fd("getfd", Some(json!({ "fdname": "hutch-nbd" })), disk)?;
    q.execute(
        "blockdev-add",
        Some(
            json!({ "driver": "nbd", "node-name": MIRROR_NODE, "export": EXPORT,
                     "server": { "type": "fd", "str": "hutch-nbd" } }),
        ),
    )?;
    q.execute(
        "blockdev-mirror",
        Some(
            json!({ "job-id": MIRROR_JOB, "device": "data", "target": MIRROR_NODE,
                     "sync": "full", "copy-mode": "write-blocking" }),
        ),
    )?;
    let deadline = Instant::now() + MIRROR_TIMEOUT;
    let disk_bytes = loop {
        let jobs = q.execute("query-block-jobs", None)?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == MIRROR_JOB))
            .cloned()
            .ok_or_else(|| VmmError::Qmp("the disk copy ended before it was in step".into()))?;
        if job["ready"].as_bool() == Some(true) {
            break job["offset"].as_u64().unwrap_or(0);
        }
        if Instant::now() > deadline {
            return Err(VmmError::Qmp(format!(
                "the disk copy was not in step after {} s",
                MIRROR_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    q.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            // A busy guest is slowed down until its RAM copy converges.
            { "capability": "auto-converge", "state": true },
            // All of the RAM goes, also when it is a shared file (a QEMU that loaded a paused
            // VM's state was told otherwise, and capabilities stay with the process).
            { "capability": "x-ignore-shared", "state": false },
        ]})),
    )?;
    q.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": DOWNTIME_LIMIT_MS })),
    )?;
    q.execute_with_fd("getfd", Some(json!({ "fdname": "hutch-mig" })), state)?;
    q.execute("migrate", Some(json!({ "uri": "fd:hutch-mig" })))?;
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    let m = loop {
        let m = q.execute("query-migrate", None)?;
        match m["status"].as_str().unwrap_or("") {
            "completed" => break m,
            s @ ("failed" | "cancelled") => {
                return Err(VmmError::Qmp(format!(
                    "the migration {s}: {}",
                    m["error-desc"].as_str().unwrap_or("no reason given")
                )))
            }
            _ if Instant::now() > deadline => {
                return Err(VmmError::Qmp(format!(
                    "the migration did not finish in {} s",
                    MIGRATE_TIMEOUT.as_secs()
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    // The source is stopped: every write reached the target (write-blocking). The mirror is
    // cancelled (the source keeps its own disk) and its NBD connection closed; the guest is
    // still stopped meanwhile, so that counts as downtime too.
    let t = Instant::now();
    drop_mirror(q)?;
    Ok(Sent {
        disk_bytes,
        ram_bytes: m["ram"]["total"].as_u64().unwrap_or(0),
        downtime_ms: m["downtime"].as_u64().unwrap_or(0) + t.elapsed().as_millis() as u64,
        total_ms: t0.elapsed().as_millis() as u64,
    })
}

/// Cancels the mirror job and removes its NBD node, waiting for the job to be gone.
fn drop_mirror(q: &mut Blocking) -> Result<(), VmmError> {
    let _ = q.execute(
        "block-job-cancel",
        Some(json!({ "device": MIRROR_JOB, "force": true })),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = q.execute("query-block-jobs", None)?;
        let running = jobs
            .as_array()
            .is_some_and(|a| a.iter().any(|j| j["device"] == MIRROR_JOB));
        if !running {
            break;
        }
        if Instant::now() > deadline {
            return Err(VmmError::Qmp("the disk copy did not stop".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    q.execute("blockdev-del", Some(json!({ "node-name": MIRROR_NODE })))
        .map(|_| ())
}

/// Undoes what a failed [`send`] left: the migration cancelled, the mirror dropped, the guest
/// running.
fn abandon(q: &mut Blocking) {
    let _ = q.execute("migrate_cancel", None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let m = q.execute("query-migrate", None).unwrap_or_default();
        if !matches!(
            m["status"].as_str(),
            Some("active" | "setup" | "cancelling" | "device" | "pre-switchover")
        ) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = drop_mirror(q);
    if let Ok(st) = q.execute("query-status", None) {
        if st["running"].as_bool() == Some(false)
            && matches!(st["status"].as_str(), Some("postmigrate" | "paused"))
        {
            let _ = q.execute("cont", None);
        }
    }
}

/// Target: once the stream is in, takes the disk back from the NBD export and (`run`) runs the
/// guest.
pub fn complete(qmp_socket: &Path, timeout: Duration, run: bool) -> Result<(), VmmError> {
    let mut q = qmp(qmp_socket)?;
    let deadline = Instant::now() + timeout;
    loop {
        let st = q.execute("query-status", None)?;
        match st["status"].as_str().unwrap_or("") {
            "paused" | "prelaunch" | "postmigrate" => break,
            "running" if run => return Ok(()),
            "inmigrate" if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            other => {
                return Err(VmmError::Qmp(format!(
                    "the migrated VM is {other}, not ready to run"
                )))
            }
        }
    }
    let m = q.execute("query-migrate", None)?;
    if let Some(s @ ("failed" | "cancelled")) = m["status"].as_str() {
        return Err(VmmError::Qmp(format!("the incoming migration {s}")));
    }
    q.execute(
        "block-export-del",
        Some(json!({ "id": EXPORT, "mode": "hard" })),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exports = q.execute("query-block-exports", None)?;
        let gone = exports
            .as_array()
            .is_none_or(|a| a.iter().all(|e| e["id"] != EXPORT));
        if gone {
            break;
        }
        if Instant::now() > deadline {
            return Err(VmmError::Qmp("the disk export did not close".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    q.execute("nbd-server-stop", None)?;
    if run {
        q.execute("cont", None)?;
    } else {
        activate(&mut q)?;
    }
    Ok(())
}

/// Takes a stopped QEMU's disks (activates its block nodes) where the guest does not run yet:
/// QEMU 10 activates them only when it does. Older QEMUs lack the command and activated them
/// already.
pub(crate) fn activate(q: &mut Blocking) -> Result<(), VmmError> {
    match q.execute("blockdev-set-active", Some(json!({ "active": true }))) {
        Err(VmmError::Qmp(m)) if m.contains("not found") => Ok(()),
        r => r.map(|_| ()),
    }
}
