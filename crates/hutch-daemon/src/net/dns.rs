//! What hutch's DNS (crate `hutch-dns`) asks the daemon: names are resolved in the querying
//! VM's account; names outside the domain follow the VM's egress rules, and answers for its
//! allowed domains join its allowed addresses before the VM gets them.

use super::{vm_at, vm_named, VmNetwork};
use crate::records::Records;
use hutch_core::net::NetMode;
use hutch_core::Vm;
use std::net::Ipv4Addr;
use std::sync::Arc;

pub struct Directory {
    pub records: Records,
    pub net: Arc<VmNetwork>,
    /// For the names of the E2B API: `api.<domain>` and `<port>-<sandbox id>.<domain>`.
    pub service: std::sync::Weak<crate::service::Service>,
}

/// The VM a public name's label means: its id, an admin VM's name, or `NAME--ACCOUNT` for an
/// account's VM (names are per account; the label must name one VM on the whole host).
pub fn vm_by_label(records: &Records, label: &str) -> Option<Vm> {
    let label = label.to_ascii_lowercase();
    records
        .find_vm(|v| v.id == label)
        .or_else(|| vm_named(records, None, &label))
        .or_else(|| {
            let (name, account) = label.rsplit_once("--")?;
            vm_named(records, Some(account), name)
        })
}

/// The VM part of a proxy label `<port>-<vm>`.
pub fn port_label(label: &str) -> Option<&str> {
    let (port, rest) = label.split_once('-')?;
    (!port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()))
        .then_some(rest)
}

impl Directory {
    /// Whether `label` is one of the E2B API's names (when it is served).
    fn e2b_name(&self, label: &str) -> bool {
        let Some(s) = self.service.upgrade() else {
            return false;
        };
        let Some(e) = s.e2b.get() else {
            return false;
        };
        label == "api" || port_label(label).is_some_and(|l| e.e2b.route(l).is_some())
    }
}

impl hutch_dns::Directory for Directory {
    fn vm_address(&self, client: Ipv4Addr, vm: &str) -> Option<Ipv4Addr> {
        let me = vm_at(&self.records, client)?;
        let target = vm_named(&self.records, me.owner.as_deref(), vm)?;
        target.net.ipv4.filter(|_| target.net.mode != NetMode::None)
    }

    fn may_resolve(&self, client: Ipv4Addr, fqdn: &str) -> bool {
        vm_at(&self.records, client).is_some_and(|me| self.net.may_resolve(&me, fqdn))
    }

    fn resolved(&self, client: Ipv4Addr, fqdn: &str, addrs: &[Ipv4Addr], _ttl: u32) {
        if let Some(me) = vm_at(&self.records, client) {
            // Before the answer goes out: the VM connects as soon as it has it.
            tokio::task::block_in_place(|| self.net.resolved(&me, fqdn, addrs));
        }
    }

    fn public_vm(&self, label: &str) -> bool {
        vm_by_label(&self.records, label).is_some()
            || port_label(label).is_some_and(|l| vm_by_label(&self.records, l).is_some())
            || self.e2b_name(label)
    }

    fn public_address(&self, label: &str) -> Option<Ipv4Addr> {
        // `<vm>.<domain>` is the VM's SSH pool address (the proxy listens there too);
        // `<port>-<vm>.<domain>` the host's public one.
        vm_by_label(&self.records, label)?.net.ssh_addr
    }
}
