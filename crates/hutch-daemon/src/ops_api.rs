//! Operating hutch over REST: the lifecycle event stream (`GET /api/v1/events`), host status
//! (`GET /api/v1/status`) and Prometheus metrics (`GET /metrics`, admin only).

use crate::api::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::manager::Manager;
use crate::metrics::{allocated_bytes, process_usage, VmUsage};
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hutch_core::status::{HostCapacity, QuotaUse, Status};
use hutch_core::VmState;
use std::collections::BTreeMap;
use tokio::sync::broadcast::error::RecvError;

/// Lifecycle events as they happen, one JSON object per line (`application/x-ndjson`), for as
/// long as the client reads. An account sees its own VMs' events only. A client that falls
/// behind gets a `{"kind":"lagged","missed":N}` line and continues.
pub async fn events(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let mut rx = m.events.subscribe();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(async move {
        loop {
            let line = match rx.recv().await {
                Ok(e) if caller.sees(e.owner.as_deref()) => serde_json::to_vec(&e),
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    serde_json::to_vec(&serde_json::json!({"kind": "lagged", "missed": n}))
                }
                Err(RecvError::Closed) => return,
            };
            let Ok(mut line) = line else { continue };
            line.push(b'\n');
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream_from(body_rx);
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl Manager {
    /// The host at a glance for `caller` (see [`Status`]).
    pub fn status(&self, caller: &Caller) -> Result<Status, ApiError> {
        let mine = self.vms_of(caller)?;
        let mut vms = BTreeMap::new();
        for v in &mine {
            *vms.entry(v.state.as_str().to_string()).or_insert(0) += 1;
        }
        let host = if caller.admin {
            let all = self.list()?;
            let active = all.iter().filter(|v| v.state.uses_memory());
            let (total, free) = disk_mib(&self.cfg.data_dir);
            Some(HostCapacity {
                cpus: self.host_cpus(),
                vcpus_active: active.clone().map(|v| u64::from(v.vcpus)).sum(),
                mem_mib: self.host_mem_mib(),
                mem_active_mib: active.map(|v| v.mem_mib).sum(),
                mem_limit_mib: (self.host_mem_mib() as f64 * self.admission.mem_overcommit) as u64,
                disk_total_mib: total,
                disk_free_mib: free,
            })
        } else {
            None
        };
        let quota = match caller.owner() {
            Some(acct) if !caller.admin => Some(QuotaUse {
                quota: self.quota_of(&acct)?,
                account: acct,
                vms: mine.len() as u64,
                vcpus: mine.iter().map(|v| u64::from(v.vcpus)).sum(),
                mem_mib: mine.iter().map(|v| v.mem_mib).sum(),
                disk_gib: mine.iter().map(|v| v.disk_gib).sum(),
            }),
            _ => None,
        };
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            qemu: self.cfg.qemu_version.clone(),
            accel: self.cfg.accel.as_str().into(),
            kernel: self.cfg.bundle.release.clone(),
            vms,
            host,
            quota,
        })
    }

    /// The Prometheus exposition text.
    pub fn metrics_text(&self) -> Result<String, ApiError> {
        let all = self.list()?;
        let counts: Vec<(&'static str, usize)> = VmState::ALL
            .iter()
            .map(|s| (s.as_str(), all.iter().filter(|v| v.state == *s).count()))
            .collect();
        let usage: Vec<VmUsage> = all
            .iter()
            .map(|v| {
                let (cpu, mem) = match self.handle(v).filter(|h| self.vmm.is_alive(h)) {
                    Some(h) => process_usage(h.pid),
                    None => (None, None),
                };
                VmUsage {
                    name: v.name.clone(),
                    owner: v.owner.clone().unwrap_or_default(),
                    cpu_seconds: cpu,
                    memory_bytes: mem,
                    disk_bytes: allocated_bytes(&self.vm_dir(&v.id).join("disk.qcow2")),
                }
            })
            .collect();
        Ok(self.metrics.render(&counts, &usage))
    }
}

/// (total, free) MiB of the filesystem holding `dir`.
fn disk_mib(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes only into the zeroed struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let f = st.f_frsize as u64;
    (
        (st.f_blocks as u64).saturating_mul(f) >> 20,
        (st.f_bavail as u64).saturating_mul(f) >> 20,
    )
}

pub async fn status(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<Status>, ApiError> {
    Ok(Json(m.status(&caller)?))
}

pub async fn metrics(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Response, ApiError> {
    if !caller.admin {
        return Err(ApiError::Forbidden("/metrics is for admins".into()));
    }
    let m2 = m.clone();
    let text = tokio::task::spawn_blocking(move || m2.metrics_text())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// `POST /api/v1/admin/recover`: rebuilds the VM records the state store lost (see rebuild.rs).
pub async fn recover(
    State(m): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<Vec<crate::rebuild::Recovered>>, ApiError> {
    if !caller.admin {
        return Err(ApiError::Forbidden("recover is for admins".into()));
    }
    Ok(Json(m.rebuild().await?))
}
