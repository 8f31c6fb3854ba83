//! Live migration, the source's side (`hutch migrate VM --to NODE`; docs/cluster.md). The node
//! that runs the VM drives it:
//!
//! 1. The record goes `running` -> `migrating` (compare-and-swap): nothing else changes the VM
//!    meanwhile.
//! 2. The target prepares (arrive.rs): the image's root filesystem with the same bytes as here
//!    (copied from this node when it has none; refused when it built different ones), admission,
//!    a fresh disk, its TAP, a QEMU waiting for the state with the disk exported over NBD.
//! 3. Two byte streams to the target, HTTP connections upgraded (the admin token; TLS pinned to
//!    the certificate the target recorded): the NBD export and the migration stream. QEMU gets
//!    its ends as descriptors; hutchd copies bytes.
//! 4. QEMU mirrors the whole writable disk, then sends RAM and devices; the guest pauses for
//!    the switch-over only.
//! 5. The target runs the guest and moves the record to itself (compare-and-swap from
//!    `migrating` here). This node then removes its stopped copy.
//!
//! A paused or stopped VM moves the same way "at rest": step 4 starts from a QEMU that loads its
//! saved state (or its disk) and never runs the guest (`Node::hold`), and in step 5 the target
//! saves it again (or just keeps the disk) and records it paused (or stopped).
//!
//! Before step 5 anything that fails leaves the VM running here, the target's half undone. A
//! crash of this hutchd leaves the QEMU here running (QEMU resumes when its stream breaks) and
//! the target's half expires; a crash after step 5 leaves a stopped QEMU here that the restart
//! removes (its record is the target's).

use super::forward::node_upgrade;
use super::schedule::{choose, Need};
use super::Cluster;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::{admin_only, Service};
use axum::body::Body;
use axum::extract::Request;
use hutch_core::cluster::Migrated;
use hutch_core::{Event, Vm, VmState};
use hutch_vmm::VmHandle;
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

pub(crate) const MIGRATIONS: &str = "/api/v1/cluster/migrations";

/// `POST /api/v1/cluster/migrations`: node to node, the source asks the target to prepare.
#[derive(Debug, Serialize, Deserialize)]
pub struct Arrive {
    /// The VM's id (its record says `migrating` on `from`).
    pub vm: String,
    pub from: String,
    /// The SHA-256 of the source's root filesystem of the VM's image.
    pub rootfs_sha256: String,
    /// What it was before the move: running (it moves live), paused or stopped (it moves at
    /// rest and stays so).
    #[serde(default = "running")]
    pub was: VmState,
}

fn running() -> VmState {
    VmState::Running
}

/// The target's answer: the migration's id for the streams and the finish.
#[derive(Debug, Serialize, Deserialize)]
pub struct Arriving {
    pub id: String,
}

/// `POST /api/v1/cluster/migrations/{id}/finish`: the VM runs on the target.
#[derive(Debug, Serialize, Deserialize)]
pub struct Finished {
    pub vm: Vm,
    /// From the finish request to the guest running (ms).
    pub resumed_ms: u64,
}

impl Service {
    /// Moves VM `name` (on this node) to node `to`: a running one live, a paused or stopped
    /// one at rest (its guest does not run meanwhile).
    pub async fn migrate(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        to: &str,
    ) -> Result<Migrated, ApiError> {
        // Resolved as the caller first: who cannot see the VM learns nothing of it.
        let vm = self.vm_for(caller, name).await?;
        admin_only(caller, "migrating VMs")?;
        let c = self.clustered("migration")?;
        self.migrate_vm(&c, vm, to).await
    }

    /// [`Service::migrate`] of a VM already resolved (`hutch drain` too).
    pub(crate) async fn migrate_vm(
        self: &Arc<Self>,
        c: &Arc<Cluster>,
        vm: Vm,
        to: &str,
    ) -> Result<Migrated, ApiError> {
        let from = c.name().to_string();
        if vm.node.as_deref() == Some(to) {
            return Err(ApiError::Invalid(format!(
                "{} already runs on node {to}",
                vm.name
            )));
        }
        if !self.records.is_local(&vm) {
            return Err(ApiError::Conflict(format!(
                "{} runs on node {}, not on {from}",
                vm.name,
                vm.node.as_deref().unwrap_or("none")
            )));
        }
        let nodes = self.nodes(&Caller::local_admin()).await?;
        choose(
            &nodes,
            Need {
                mem_mib: vm.mem_mib,
            },
            Some(to),
            c.opts.placement,
            &Default::default(),
        )?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let vm = self.by_id(&vm.id, &vm.name).await?;
        let was = vm.state;
        if !matches!(was, VmState::Running | VmState::Paused | VmState::Stopped) {
            return Err(ApiError::Conflict(format!(
                "{} is {}: only running (live), paused or stopped VMs move",
                vm.name,
                vm.state.as_str()
            )));
        }
        let (images, d) = (self.images.clone(), vm.image_digest.clone());
        let sha = tokio::task::spawn_blocking(move || images.rootfs_sha256(&d))
            .await
            .map_err(crate::node::internal)?
            .map_err(|e| ApiError::Internal(format!("the VM's root filesystem here: {e}")))?;
        let image = self.image_of(&vm).await?.ok_or_else(|| {
            ApiError::Conflict(format!(
                "the image of {} is no longer in the store",
                vm.name
            ))
        })?;
        let vm = self.node.transition(&vm.id, Event::Migrate, |_| {}).await?;
        // A running VM moves live; a paused or stopped one from a QEMU that never runs it.
        let h = match was {
            VmState::Running => self
                .node
                .handle(&vm)
                .ok_or_else(|| ApiError::Conflict(format!("{} has no process", vm.name))),
            _ => {
                let mut at_rest = vm.clone();
                at_rest.state = was;
                self.node.hold(&at_rest, &image).await
            }
        };
        let r = match h {
            Ok(h) => {
                let r = self.send_to(c, &vm, &h, to, sha, was).await;
                if r.is_err() && was != VmState::Running {
                    self.node.unhold(&vm, &h).await;
                }
                r
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(m) => {
                tracing::info!(vm = %vm.key(), from = %from, to, downtime_ms = m.downtime_ms, total_ms = m.total_ms, "vm migrated");
                Ok(m)
            }
            Err(e) => {
                // The VM stays here as it was; the record says so again (unless it changed
                // meanwhile).
                let ev = match was {
                    VmState::Paused => Event::Saved,
                    VmState::Stopped => Event::Halted,
                    _ => Event::Done,
                };
                let back = self
                    .records
                    .update_vm(&vm.id, |r: &mut Vm| {
                        if r.state == VmState::Migrating && self.records.is_local(r) {
                            r.apply(&ev)
                                .map_err(|d| ApiError::Conflict(format!("{} {d}", r.name)))?;
                        }
                        Ok::<(), ApiError>(())
                    })
                    .await;
                if let Err(b) = back {
                    tracing::warn!(vm = %vm.key(), error = %b, "recording a VM whose migration failed");
                }
                tracing::warn!(vm = %vm.key(), to, error = %e, "migration failed; the vm stays here");
                Err(e)
            }
        }
    }

    async fn send_to(
        self: &Arc<Self>,
        c: &Arc<Cluster>,
        vm: &Vm,
        h: &VmHandle,
        to: &str,
        rootfs_sha256: String,
        was: VmState,
    ) -> Result<Migrated, ApiError> {
        let t0 = Instant::now();
        let from = c.name().to_string();
        let ask = Arrive {
            vm: vm.id.clone(),
            from: from.clone(),
            rootfs_sha256,
            was,
        };
        let Arriving { id } = self.node_json(c, to, "POST", MIGRATIONS, &ask).await?;
        let path = |what: &str| format!("{MIGRATIONS}/{id}{what}");
        let sent = async {
            let disk = node_upgrade(self, c, to, &path("/disk"), None).await?;
            let state = node_upgrade(self, c, to, &path("/state"), None).await?;
            let (disk_q, disk_h) = UnixStream::pair().map_err(crate::node::internal)?;
            let (state_q, state_h) = UnixStream::pair().map_err(crate::node::internal)?;
            let pumps = [
                tokio::spawn(splice(disk, disk_h)),
                tokio::spawn(splice(state, state_h)),
            ];
            let (vmm, h2) = (self.node.vmm.clone(), h.clone());
            let sent = tokio::task::spawn_blocking(move || {
                vmm.migrate_send(&h2, disk_q.as_raw_fd(), state_q.as_raw_fd())
            })
            .await
            .map_err(crate::node::internal)?
            .map_err(ApiError::from)?;
            Ok::<_, ApiError>((sent, pumps, Instant::now()))
        }
        .await;
        let (mut sent, pumps, stopped) = match sent {
            Ok(s) => s,
            Err(e) => {
                self.abort_at(c, to, &id).await;
                return Err(e);
            }
        };
        // The guest is stopped from here until the target runs it: at once.
        let asked = stopped.elapsed().as_millis() as u64;
        let finished: Result<Finished, ApiError> =
            self.node_json(c, to, "POST", &path("/finish"), &()).await;
        // What went over the wire, once both streams closed (QEMU's own counts are of the
        // disk's size and of the RAM's pages, zeros included).
        let [disk_bytes, ram_bytes] = pumps.map(|p| async move {
            tokio::time::timeout(std::time::Duration::from_secs(5), p)
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|(_, out)| out)
        });
        if let Some(b) = disk_bytes.await {
            sent.disk_bytes = b;
        }
        if let Some(b) = ram_bytes.await {
            sent.ram_bytes = b;
        }
        let (moved, resumed_ms) = match finished {
            Ok(f) => (f.vm, f.resumed_ms),
            // The answer may be lost after the target took the VM: the record tells.
            Err(e) => match self.records.reload_vm(&vm.id).await {
                Ok(Some(v)) if v.node.as_deref() == Some(to) => (v, 0),
                _ => {
                    self.abort_at(c, to, &id).await;
                    if was == VmState::Running {
                        let (vmm, h2) = (self.node.vmm.clone(), h.clone());
                        let _ = tokio::task::spawn_blocking(move || vmm.resume(&h2)).await;
                    }
                    return Err(e);
                }
            },
        };
        let _ = self.records.reload_vm(&vm.id).await;
        self.node.departed(vm, h).await;
        // Its address is routed to its new node now, not in a while.
        if let Err(e) = self.sync_overlay().await {
            tracing::warn!(error = %e, "cluster: routing a migrated VM");
        }
        Ok(Migrated {
            vm: moved,
            from,
            to: to.to_string(),
            // QEMU's switch-over, the finish asked, the target's taking over (the request's
            // one-way trip is not counted: a fraction of a millisecond on a LAN).
            downtime_ms: sent.downtime_ms + asked + resumed_ms,
            total_ms: t0.elapsed().as_millis() as u64,
            disk_bytes: sent.disk_bytes,
            ram_bytes: sent.ram_bytes,
        })
    }

    /// Tells the target to undo its half (best effort: its half also expires).
    async fn abort_at(&self, c: &Cluster, to: &str, id: &str) {
        let req = Request::builder()
            .method("DELETE")
            .uri(format!("{MIGRATIONS}/{id}"))
            .body(Body::empty());
        if let Ok(req) = req {
            if let Err(e) = super::forward::node_request(self, c, to, req).await {
                tracing::warn!(node = to, error = %e, "undoing a migration's target half");
            }
        }
    }

    /// A JSON request to node `to`'s API; its JSON answer, or its error as an error.
    pub(crate) async fn node_json<T: serde::de::DeserializeOwned>(
        &self,
        c: &Cluster,
        to: &str,
        method: &str,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ApiError> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                serde_json::to_vec(body).map_err(crate::node::internal)?,
            ))
            .map_err(crate::node::internal)?;
        let resp = super::forward::node_request(self, c, to, req).await?;
        let status = resp.status();
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| ApiError::Capacity(format!("node {to}: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(ApiError::from_remote(status, &bytes, to));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::Internal(format!("node {to} answered {path} with {e}")))
    }
}

/// Copies bytes both ways between an upgraded connection and a local socket until both ends
/// are done: how many went each way (in from the connection, out to it).
pub(crate) async fn splice(up: hyper::upgrade::Upgraded, sock: UnixStream) -> (u64, u64) {
    let r = async {
        sock.set_nonblocking(true)?;
        let mut s = tokio::net::UnixStream::from_std(sock)?;
        let mut io = hyper_util::rt::TokioIo::new(up);
        tokio::io::copy_bidirectional(&mut io, &mut s).await
    }
    .await;
    r.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "a migration stream ended");
        (0, 0)
    })
}
