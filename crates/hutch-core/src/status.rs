//! `hutch status`: the host at a glance (boxcutter's `status`), as REST returns it and as the
//! CLI and the SSH front door print it (rendered here, once).

use crate::{mib, Quota};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What `GET /api/v1/status` answers. Accounts see their own VMs and quota; the host's
/// capacity is for the admin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub qemu: String,
    pub accel: String,
    pub kernel: String,
    /// The caller's VMs (every VM for the admin) by state name.
    pub vms: BTreeMap<String, usize>,
    #[serde(default)]
    pub host: Option<HostCapacity>,
    #[serde(default)]
    pub quota: Option<QuotaUse>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCapacity {
    pub cpus: u32,
    /// vCPUs of VMs that are starting or running.
    pub vcpus_active: u64,
    pub mem_mib: u64,
    /// Guest memory of VMs that are starting or running, and what admission allows in all.
    pub mem_active_mib: u64,
    pub mem_limit_mib: u64,
    pub disk_total_mib: u64,
    pub disk_free_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaUse {
    pub account: String,
    pub quota: Quota,
    pub vms: u64,
    pub vcpus: u64,
    pub mem_mib: u64,
    pub disk_gib: u64,
}

impl Status {
    pub fn render(&self) -> String {
        let mut s = format!(
            "hutch {}  qemu {}  accel {}  guest kernel {}\n",
            self.version, self.qemu, self.accel, self.kernel
        );
        let total: usize = self.vms.values().sum();
        let by: Vec<String> = self.vms.iter().map(|(k, v)| format!("{v} {k}")).collect();
        s.push_str(&format!(
            "VMs:     {total}{}\n",
            if by.is_empty() {
                String::new()
            } else {
                format!(" ({})", by.join(", "))
            }
        ));
        if let Some(h) = &self.host {
            s.push_str(&format!(
                "CPU:     {} vCPUs active on {} host CPUs\n",
                h.vcpus_active, h.cpus
            ));
            s.push_str(&format!(
                "Memory:  {} of {} guest memory in use (host has {}); {} free\n",
                mib(h.mem_active_mib),
                mib(h.mem_limit_mib),
                mib(h.mem_mib),
                mib(h.mem_limit_mib.saturating_sub(h.mem_active_mib))
            ));
            s.push_str(&format!(
                "Disk:    {} free of {}\n",
                mib(h.disk_free_mib),
                mib(h.disk_total_mib)
            ));
        }
        if let Some(q) = &self.quota {
            s.push_str(&format!(
                "Quota:   account {}: {}/{} VMs, {}/{} vCPUs, {}/{} memory, {}/{} GiB disk\n",
                q.account,
                q.vms,
                q.quota.vms,
                q.vcpus,
                q.quota.vcpus,
                mib(q.mem_mib),
                mib(q.quota.mem_mib),
                q.disk_gib,
                q.quota.disk_gib
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_it_has() {
        let mut st = Status {
            version: "0.1.0".into(),
            qemu: "10.0.2".into(),
            accel: "tcg".into(),
            kernel: "6.1.0-40-cloud-amd64".into(),
            vms: [("running".to_string(), 2), ("stopped".to_string(), 1)].into(),
            host: Some(HostCapacity {
                cpus: 2,
                vcpus_active: 2,
                mem_mib: 24 * 1024,
                mem_active_mib: 512,
                mem_limit_mib: 24 * 1024,
                disk_total_mib: 100 * 1024,
                disk_free_mib: 60 * 1024,
            }),
            quota: None,
        };
        let r = st.render();
        assert!(r.contains("VMs:     3 (2 running, 1 stopped)"), "{r}");
        assert!(r.contains("512M of 24G guest memory"), "{r}");
        assert!(!r.contains("Quota"));
        st.host = None;
        st.quota = Some(QuotaUse {
            account: "alice".into(),
            quota: Quota::default(),
            vms: 1,
            vcpus: 1,
            mem_mib: 256,
            disk_gib: 10,
        });
        let r = st.render();
        assert!(
            r.contains("account alice: 1/20 VMs") && !r.contains("CPU:"),
            "{r}"
        );
    }
}
