//! `hutchd --ssh-pool`: SSH by destination address, as boxd does. Each VM has one pool address
//! (unique within its account; accounts share addresses). A connection to a pool address lands
//! in the VM that the logged-in key's account has there, whatever user name the client sent, so
//! `ssh myvm.<domain>` works like `ssh myvm@host`. An account with no VM at that address is
//! refused at login.

use crate::service::Service;
use hutch_core::Account;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The pool address a connection came in on (None: not a pool address).
pub fn pool_addr(m: &Service, local: Option<SocketAddr>) -> Option<Ipv4Addr> {
    let pool = m.node.net.as_ref()?.settings.ssh_pool?;
    match local?.ip() {
        IpAddr::V4(a) if pool.contains(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped().filter(|a| pool.contains(*a)),
        _ => None,
    }
}

/// The name (as `account` names it) of its VM at pool address `ip`.
pub fn vm_at(m: &Service, account: &Account, ip: Ipv4Addr) -> Option<String> {
    let owner = (!account.admin).then_some(account.name.as_str());
    m.records
        .find_local_vm(|v| v.net.ssh_addr == Some(ip) && v.owner.as_deref() == owner)
        .map(|v| v.name)
}
