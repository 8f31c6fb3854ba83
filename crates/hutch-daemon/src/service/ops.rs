//! Operating the service: `hutch status` (host capacity at a glance) and the Prometheus
//! exposition text.

use super::Service;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::metrics::{allocated_bytes, process_usage, VmUsage};
use hutch_core::status::{HostCapacity, QuotaUse, Status};
use hutch_core::VmState;
use std::collections::BTreeMap;

impl Service {
    /// This host's capacity and what its VMs (this node's, in a cluster) take of it.
    pub async fn host_capacity(&self) -> HostCapacity {
        let (vcpus_active, mem_active_mib) = self.records.fold_local_vms(|it| {
            it.filter(|v| v.state.uses_memory())
                .fold((0u64, 0u64), |(c, m), v| {
                    (c + u64::from(v.vcpus), m + v.mem_mib)
                })
        });
        let dir = self.cfg().data_dir.clone();
        let (total, free) = tokio::task::spawn_blocking(move || super::tenancy::disk_mib(&dir))
            .await
            .unwrap_or((0, 0));
        let mem = self.node.host_mem_mib();
        HostCapacity {
            cpus: self.node.host_cpus(),
            vcpus_active,
            mem_mib: mem,
            mem_active_mib,
            mem_limit_mib: (mem as f64 * self.admission.mem_overcommit) as u64,
            disk_total_mib: total,
            disk_free_mib: free,
        }
    }

    /// The host at a glance for `caller` (see [`Status`]): the host's figures for the admin,
    /// its own VMs and quota for an account.
    pub async fn status(&self, caller: &Caller) -> Result<Status, ApiError> {
        let mine = self.vms_of(caller).await?;
        let mut vms = BTreeMap::new();
        for v in &mine {
            *vms.entry(v.state.as_str().to_string()).or_insert(0) += 1;
        }
        let host = if caller.admin {
            Some(self.host_capacity().await)
        } else {
            None
        };
        let quota = match caller.owner() {
            Some(acct) if !caller.admin => {
                let u = super::accounts::usage(&mine, &acct);
                Some(QuotaUse {
                    quota: self.quota_of(&acct).await?,
                    account: acct,
                    vms: u64::from(u.vms),
                    vcpus: u64::from(u.vcpus),
                    mem_mib: u.mem_mib,
                    disk_gib: u.disk_gib,
                })
            }
            _ => None,
        };
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            qemu: self.cfg().qemu_version.clone(),
            accel: self.cfg().accel.as_str().into(),
            kernel: self.cfg().bundle.release.clone(),
            vms,
            host,
            quota,
        })
    }

    /// The Prometheus exposition text (admins).
    pub async fn metrics_text(&self, caller: &Caller) -> Result<String, ApiError> {
        super::admin_only(caller, "/metrics")?;
        let all = self.list().await?;
        let pools = super::pools::pools_text(&self.all_pools().await);
        let node = self.node.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let counts: Vec<(&'static str, usize)> = VmState::ALL
                .iter()
                .map(|s| (s.as_str(), all.iter().filter(|v| v.state == *s).count()))
                .collect();
            let usage: Vec<VmUsage> = all
                .iter()
                .map(|v| {
                    let (cpu, mem) = match node.handle(v).filter(|h| node.vmm.is_alive(h)) {
                        Some(h) => process_usage(h.pid),
                        None => (None, None),
                    };
                    VmUsage {
                        name: v.name.clone(),
                        owner: v.owner.clone().unwrap_or_default(),
                        cpu_seconds: cpu,
                        memory_bytes: mem,
                        disk_bytes: allocated_bytes(&node.vm_dir(&v.id).join("disk.qcow2")),
                    }
                })
                .collect();
            metrics.render(&counts, &usage) + &pools
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
    }
}
