//! The VM network as hutchd runs it: settings, address leases, a VM's host-side setup (TAP,
//! rules, rates, from its record), reconciling after a crash, name lookups for the DNS, and the
//! port forwards ([`ports`]). The host mechanics are in `hutch-net`; docs/networking.md.

pub mod dns;
pub mod egress;
pub mod meta;
pub mod ports;
pub mod proxy;

use crate::error::ApiError;
use crate::records::Records;
use hutch_core::net::{EgressRule, NetMode, VmNet};
use hutch_core::Vm;
use hutch_net::{Network, VmPolicy};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;

pub use hutch_net::{NetConfig, DEFAULT_BRIDGE, DEFAULT_SUBNET};

pub use hutch_dns::host_upstreams;

/// Most addresses kept per VM from answers for its allowed domains.
const MAX_RESOLVED: usize = 4096;

/// hutchd's network options.
#[derive(Debug, Clone)]
pub struct NetSettings {
    pub cfg: NetConfig,
    /// VMs are `<name>.<domain>`.
    pub domain: String,
    /// Resolvers for names outside the domain (default: the host's).
    pub upstream: Vec<SocketAddr>,
    /// Host ports accounts may forward (the admin may use any).
    pub port_range: (u16, u16),
    /// Address port forwards listen on.
    pub port_bind: IpAddr,
    /// Addresses routed to this host, one per VM within an account (`ssh <vm>.<domain>`).
    pub ssh_pool: Option<hutch_core::net::Ipv4Net>,
}

pub struct VmNetwork {
    pub settings: NetSettings,
    pub host: Network,
    /// Addresses answered for each VM's allowed domains (by VM id).
    resolved: Mutex<HashMap<String, Vec<Ipv4Addr>>>,
    /// Addresses handed out whose VM record is not written yet.
    pending: Mutex<HashSet<Ipv4Addr>>,
    /// SSH pool addresses handed out so, by owner.
    ssh_pending: Mutex<HashSet<(Option<String>, Ipv4Addr)>>,
    pub forwards: ports::Forwards,
}

/// An address reserved for a VM being created; released when dropped (by then the record,
/// which holds it for good, is written or the create failed).
pub struct Lease<'a> {
    net: &'a VmNetwork,
    pub ip: Ipv4Addr,
    /// The SSH pool address, with its owner.
    pub ssh: Option<(Option<String>, Ipv4Addr)>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.net
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.ip);
        if let Some(s) = &self.ssh {
            self.net
                .ssh_pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(s);
        }
    }
}

fn net_err(e: hutch_net::NetError) -> ApiError {
    ApiError::Internal(format!("network: {e}"))
}

impl VmNetwork {
    /// Sets up the bridge (blocking: runs `ip`).
    pub fn setup(settings: NetSettings) -> Result<VmNetwork, hutch_net::NetError> {
        let host = Network::setup(settings.cfg.clone())?;
        if let Some(pool) = settings.ssh_pool {
            hutch_net::route_local(pool)?;
        }
        Ok(VmNetwork {
            forwards: ports::Forwards::new(settings.port_bind),
            settings,
            host,
            resolved: Mutex::default(),
            pending: Mutex::default(),
            ssh_pending: Mutex::default(),
        })
    }

    /// The lowest free address (not held by a VM record or a create in flight), and with
    /// `--ssh-pool` the lowest pool address `owner` has no VM at.
    pub fn allocate(&self, records: &Records, owner: Option<&str>) -> Result<Lease<'_>, ApiError> {
        let mut lease = self.allocate_ip(records)?;
        if let Some(pool) = self.settings.ssh_pool {
            let mut pending = self.ssh_pending.lock().unwrap_or_else(|e| e.into_inner());
            let used: HashSet<Ipv4Addr> = records.fold_vms(|it| {
                it.filter(|v| v.owner.as_deref() == owner)
                    .filter_map(|v| v.net.ssh_addr)
                    .collect()
            });
            let (first, last) = match pool.size() {
                n if n <= 2 => (0, n),
                n => (1, n - 1),
            };
            let owner = owner.map(str::to_string);
            let ip = (first..last)
                .filter_map(|i| pool.nth(i))
                .find(|ip| !used.contains(ip) && !pending.contains(&(owner.clone(), *ip)))
                .ok_or_else(|| {
                    ApiError::Capacity(format!(
                        "the SSH pool {pool} has no address left for this account"
                    ))
                })?;
            pending.insert((owner.clone(), ip));
            lease.ssh = Some((owner, ip));
        }
        Ok(lease)
    }

    fn allocate_ip(&self, records: &Records) -> Result<Lease<'_>, ApiError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let used: HashSet<Ipv4Addr> =
            records.fold_vms(|it| it.filter_map(|v| v.net.ipv4).collect());
        let ip = self
            .settings
            .cfg
            .allocate(|ip| used.contains(&ip) || pending.contains(&ip))
            .ok_or_else(|| {
                ApiError::Capacity(format!(
                    "the VM network {} has no free address left (hutchd --subnet sets a larger one)",
                    self.settings.cfg.subnet
                ))
            })?;
        pending.insert(ip);
        Ok(Lease {
            net: self,
            ip,
            ssh: None,
        })
    }

    /// What the rules need to know about `vm` (None: it has no NIC).
    pub fn policy(&self, vm: &Vm) -> Option<VmPolicy> {
        let ip = vm.net.ipv4.filter(|_| vm.net.mode != NetMode::None)?;
        let nets = |rules: &[EgressRule]| {
            rules
                .iter()
                .filter_map(|r| match r {
                    EgressRule::Net(n) => Some(*n),
                    EgressRule::Domain(_) => None,
                })
                .collect::<Vec<_>>()
        };
        let resolved = self
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vm.id)
            .cloned()
            .unwrap_or_default();
        Some(VmPolicy {
            id: vm.id.clone(),
            account: vm.owner.clone(),
            ip,
            mac: vm.net.mac.clone().unwrap_or_else(|| VmNet::mac_for(ip)),
            tap: VmNet::tap_name(&vm.id),
            mode: vm.net.mode,
            allow: nets(&vm.net.allow_out),
            deny: nets(&vm.net.deny_out),
            restricted: !vm.net.allow_out.is_empty(),
            name_checked: vm.net.mode == NetMode::Internet
                && vm
                    .net
                    .allow_out
                    .iter()
                    .any(|r| matches!(r, EgressRule::Domain(_))),
            resolved,
            rate_out: vm.net.rate_out,
        })
    }

    /// Creates `vm`'s TAP (owned by its QEMU uid) and writes its rules and rates (blocking).
    pub fn attach(&self, vm: &Vm) -> Result<(), ApiError> {
        let Some(p) = self.policy(vm) else {
            return Ok(());
        };
        let uid = vm.confinement.as_ref().map(|c| c.uid);
        self.host.attach(&p, uid, vm.net.rate_in).map_err(net_err)
    }

    /// Rewrites `vm`'s rules and rates (after `hutch net set`).
    pub fn update(&self, vm: &Vm) -> Result<(), ApiError> {
        let Some(p) = self.policy(vm) else {
            return Ok(());
        };
        // A VM that never started has no TAP yet: its rate is set when it is made.
        let rate_in = vm.net.rate_in.filter(|_| hutch_net::tap::exists(&p.tap));
        self.host.update(&p, rate_in).map_err(net_err)
    }

    /// Removes `vm`'s TAP, rules and port forwards (blocking).
    pub fn detach(&self, vm: &Vm) {
        self.forwards.stop_vm(&vm.id);
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm.id);
        if let Some(p) = self.policy(vm) {
            if let Err(e) = self.host.detach(&p) {
                tracing::warn!(vm = %vm.name, error = %e, "removing the VM's network");
            }
        }
    }

    /// After a start or a crash: the rules for exactly `vms`, no TAP of a VM that is gone, and
    /// the port forwards of the records.
    pub fn reconcile(&self, vms: &[Vm]) -> Result<(), ApiError> {
        let policies: Vec<VmPolicy> = vms.iter().filter_map(|v| self.policy(v)).collect();
        self.host.sync(&policies).map_err(net_err)?;
        let live: HashSet<String> = policies.iter().map(|p| p.tap.clone()).collect();
        for tap in self.host.taps() {
            if !live.contains(&tap) {
                tracing::info!(%tap, "removing a TAP no VM owns (left by a crash)");
                if let Err(e) = hutch_net::tap::delete(&tap) {
                    tracing::warn!(%tap, error = %e, "removing a leftover TAP");
                }
            }
        }
        // TAPs of existing VMs are (re)attached: a crash may have come between making one and
        // attaching it. (Their rules are in the tables `sync` just wrote.)
        for (vm, p) in vms.iter().filter_map(|v| Some((v, self.policy(v)?))) {
            if hutch_net::tap::exists(&p.tap) {
                let uid = vm.confinement.as_ref().map(|c| c.uid);
                if let Err(e) = self.host.port(&p, uid, vm.net.rate_in) {
                    tracing::warn!(vm = %vm.name, error = %e, "re-attaching the VM's TAP");
                }
            }
        }
        Ok(())
    }

    /// Starts the port forwards recorded with `vms` (at start).
    pub async fn restore_forwards(&self, vms: &[Vm]) {
        for vm in vms {
            let Some(ip) = vm.net.ipv4 else { continue };
            for f in &vm.net.ports {
                if let Err(e) = self
                    .forwards
                    .start(&vm.id, f.host, SocketAddr::new(ip.into(), f.vm))
                    .await
                {
                    tracing::warn!(vm = %vm.name, port = f.host, error = %e, "restoring a port forward");
                }
            }
        }
    }

    /// Whether hutch's resolver answered `ip` for one of VM `id`'s allowed domains.
    pub fn was_resolved(&self, id: &str, ip: Ipv4Addr) -> bool {
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_some_and(|l| l.contains(&ip))
    }

    /// Whether `fqdn` may be resolved for the VM at `client` (its domain egress rules).
    pub fn may_resolve(&self, vm: &Vm, fqdn: &str) -> bool {
        let n = &vm.net;
        if n.mode != NetMode::Internet {
            return false;
        }
        if n.deny_out.iter().any(|r| r.covers(fqdn)) {
            return false;
        }
        n.allow_out.is_empty() || n.allow_out.iter().any(|r| r.covers(fqdn))
    }

    /// Answers for an allowed domain: when the VM's egress is restricted, the addresses join
    /// its allowed set (bounded).
    pub fn resolved(&self, vm: &Vm, fqdn: &str, addrs: &[Ipv4Addr]) {
        let n = &vm.net;
        if n.allow_out.is_empty() || !n.allow_out.iter().any(|r| r.covers(fqdn)) {
            return;
        }
        let fresh: Vec<Ipv4Addr> = {
            let mut m = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
            let known = m.entry(vm.id.clone()).or_default();
            let fresh: Vec<Ipv4Addr> = addrs
                .iter()
                .filter(|a| !known.contains(a))
                .copied()
                .take(MAX_RESOLVED.saturating_sub(known.len()))
                .collect();
            known.extend(&fresh);
            fresh
        };
        if let Err(e) = self.host.allow_more(&vm.id, &fresh) {
            tracing::warn!(vm = %vm.name, error = %e, "adding resolved addresses");
        }
    }
}

/// The VM (record) whose address is `ip`.
pub fn vm_at(records: &Records, ip: Ipv4Addr) -> Option<Vm> {
    records.find_vm(|v| v.net.ipv4 == Some(ip))
}

/// The VM called `label` (name or id) in `owner`'s namespace.
pub fn vm_named(records: &Records, owner: Option<&str>, label: &str) -> Option<Vm> {
    records.find_vm(|v| v.owner.as_deref() == owner && (v.name == label || v.id == label))
}
