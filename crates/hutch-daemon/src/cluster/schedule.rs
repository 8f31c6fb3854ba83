//! Placement: which node runs a new VM (`hutchd --placement spread|binpack`, `hutch new --node`).
//!
//! A node is a candidate when it is `ready` (holds its lease, not cordoned nor draining), has
//! the `node` role, and its last heartbeat shows room for the VM's memory (within admission's
//! limit) and disk. Preferred nodes come first: for a template, those with a ready warm-pool
//! VM of it; else, for a snapshot or template, the node holding the snapshot's files. Then
//! `spread` picks the node with the most free memory, `binpack` the one with the least that
//! still fits (ties: fewer VMs, then the name). The chosen node admits the VM again itself, on
//! its own figures; a VM is recorded once, by the node that runs it, so it is never placed
//! twice.

use crate::error::ApiError;
use hutch_core::cluster::{NodeState, NodeView};
use std::collections::HashMap;

/// A node with less free disk than this takes no new VM.
const MIN_DISK_MIB: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    #[default]
    Spread,
    Binpack,
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Placement, String> {
        match s {
            "spread" => Ok(Placement::Spread),
            "binpack" => Ok(Placement::Binpack),
            other => Err(format!("{other:?}: spread or binpack")),
        }
    }
}

/// What a new VM needs.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub mem_mib: u64,
}

/// Nodes a new VM should go to when they can take it.
#[derive(Debug, Clone, Default)]
pub struct Prefer {
    /// Ready warm-pool VMs of its template, by node: a claim needs no room of its own.
    pub pools: HashMap<String, u32>,
    /// The node holding its snapshot's files (no copy needed there).
    pub home: Option<String>,
}

/// The node for a new VM. `pin`: `--node`; `prefer`: see [`Prefer`].
pub fn choose(
    nodes: &[NodeView],
    need: Need,
    pin: Option<&str>,
    policy: Placement,
    prefer: &Prefer,
) -> Result<String, ApiError> {
    if let Some(p) = pin {
        let n = nodes
            .iter()
            .find(|n| n.name == p)
            .ok_or_else(|| ApiError::NotFound {
                kind: "node",
                name: p.to_string(),
            })?;
        return match n.state {
            NodeState::Ready if n.roles.iter().any(|r| r == "node") => Ok(n.name.clone()),
            NodeState::Ready => Err(ApiError::Conflict(format!(
                "node {p} does not run VMs (its roles: {})",
                n.roles.join(",")
            ))),
            s => Err(ApiError::Conflict(format!(
                "node {p} is {}: it takes no new VMs",
                s.as_str()
            ))),
        };
    }
    let pooled = |n: &NodeView| prefer.pools.get(&n.name).copied().unwrap_or(0) > 0;
    let open = |n: &NodeView| n.state == NodeState::Ready && n.roles.iter().any(|r| r == "node");
    let fits = |n: &&NodeView| {
        open(n)
            && (pooled(n)
                || (n.free_mem_mib().unwrap_or(0) >= need.mem_mib
                    // Disks are copy-on-write: the node's admission judges them; here, some room.
                    && n.capacity.as_ref().is_some_and(|c| c.disk_free_mib >= MIN_DISK_MIB)))
    };
    let mut cands: Vec<&NodeView> = nodes.iter().filter(fits).collect();
    if cands.is_empty() {
        let ready = nodes.iter().filter(|n| n.state == NodeState::Ready).count();
        return Err(ApiError::Capacity(format!(
            "no node has room for {} MiB of memory ({ready} of {} nodes ready)",
            need.mem_mib,
            nodes.len()
        )));
    }
    if cands.iter().any(|n| pooled(n)) {
        cands.retain(|n| pooled(n));
    } else if let Some(h) = prefer
        .home
        .as_deref()
        .filter(|h| cands.iter().any(|n| n.name == *h))
    {
        cands.retain(|n| n.name == h);
    }
    let free = |n: &NodeView| n.free_mem_mib().unwrap_or(0);
    cands.sort_by(|a, b| {
        let by_mem = match policy {
            Placement::Spread => free(b).cmp(&free(a)),
            Placement::Binpack => free(a).cmp(&free(b)),
        };
        by_mem
            .then(a.active.cmp(&b.active))
            .then(a.name.cmp(&b.name))
    });
    Ok(cands[0].name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hutch_core::status::HostCapacity;

    fn node(name: &str, state: NodeState, free_mem: u64, active: u64) -> NodeView {
        NodeView {
            name: name.into(),
            state,
            cordoned: state == NodeState::Cordoned,
            advertise: None,
            version: "0".into(),
            roles: vec!["control".into(), "node".into()],
            joined_at: 0,
            seen_at: Some(0),
            vms: active,
            active,
            capacity: (state != NodeState::Down).then_some(HostCapacity {
                cpus: 4,
                vcpus_active: 0,
                mem_mib: 8192,
                mem_active_mib: 8192 - free_mem,
                mem_limit_mib: 8192,
                disk_total_mib: 100_000,
                disk_free_mib: 50_000,
            }),
        }
    }

    const NEED: Need = Need { mem_mib: 512 };

    #[test]
    fn spread_and_binpack() {
        let ns = [
            node("a", NodeState::Ready, 4000, 1),
            node("b", NodeState::Ready, 6000, 3),
            node("c", NodeState::Ready, 1000, 0),
        ];
        let none = Prefer::default();
        assert_eq!(
            choose(&ns, NEED, None, Placement::Spread, &none).unwrap(),
            "b"
        );
        assert_eq!(
            choose(&ns, NEED, None, Placement::Binpack, &none).unwrap(),
            "c"
        );
    }

    #[test]
    fn down_cordoned_and_full_nodes_are_skipped() {
        let ns = [
            node("a", NodeState::Down, 0, 0),
            node("b", NodeState::Cordoned, 8000, 0),
            node("c", NodeState::Ready, 100, 0),
            node("d", NodeState::Draining, 8000, 0),
        ];
        let none = Prefer::default();
        let e = choose(&ns, NEED, None, Placement::Spread, &none).unwrap_err();
        assert_eq!(e.code(), "insufficient_capacity");
        let mut ns = ns.to_vec();
        ns.push(node("e", NodeState::Ready, 600, 9));
        assert_eq!(
            choose(&ns, NEED, None, Placement::Spread, &none).unwrap(),
            "e"
        );
    }

    #[test]
    fn pins_and_pools() {
        let ns = [
            node("a", NodeState::Ready, 4000, 0),
            node("b", NodeState::Ready, 2000, 0),
            node("c", NodeState::Cordoned, 8000, 0),
        ];
        let none = Prefer::default();
        assert_eq!(
            choose(&ns, NEED, Some("b"), Placement::Spread, &none).unwrap(),
            "b"
        );
        assert_eq!(
            choose(&ns, NEED, Some("c"), Placement::Spread, &none)
                .unwrap_err()
                .code(),
            "conflict"
        );
        assert_eq!(
            choose(&ns, NEED, Some("zz"), Placement::Spread, &none)
                .unwrap_err()
                .code(),
            "not_found"
        );
        let pools = Prefer {
            pools: HashMap::from([("b".to_string(), 2)]),
            home: Some("a".into()),
        };
        assert_eq!(
            choose(&ns, NEED, None, Placement::Spread, &pools).unwrap(),
            "b"
        );
        // A node with a pool VM to claim needs no room for another VM.
        let full = [
            node("a", NodeState::Ready, 4000, 0),
            node("b", NodeState::Ready, 0, 8),
        ];
        assert_eq!(
            choose(&full, NEED, None, Placement::Spread, &pools).unwrap(),
            "b"
        );
        // No pool VM: the snapshot's node when it has room, else any that has.
        let home = Prefer {
            pools: HashMap::new(),
            home: Some("b".into()),
        };
        assert_eq!(
            choose(&ns, NEED, None, Placement::Spread, &home).unwrap(),
            "b"
        );
        assert_eq!(
            choose(&full, NEED, None, Placement::Spread, &home).unwrap(),
            "a"
        );
    }
}
