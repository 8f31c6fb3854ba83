//! Auto-scaling (boxcutter's): the leader watches the share of guest memory in use across the
//! ready nodes (against what their admission allows) and runs the admin's commands:
//!
//! - above `--scale-up-at` percent: `--scale-up-cmd` (e.g. start a VM or a machine that runs
//!   another hutchd with `--etcd`), with `HUTCH_SCALE=up`, `HUTCH_CLUSTER_MEM_PCT` and
//!   `HUTCH_NODES` (ready nodes) in its environment;
//! - below `--scale-down-at` percent, with more than one ready node: the newest idle node (no VM
//!   recorded on it; never the leader) is cordoned, `--scale-down-cmd` runs with `HUTCH_NODE` set
//!   to it (it should stop that node's hutchd and release the machine), and once the node's lease
//!   is gone its record is removed. A command that fails leaves the node cordoned, for the admin.
//!
//! One command at a time, then `--scale-cooldown` before the next decision. Commands run
//! through `sh -c` with a 10-minute bound; their output goes to hutchd's log.

use super::nodes::{NodeRecord, LIVE, NODES};
use super::Cluster;
use crate::auth::Caller;
use crate::service::Service;
use hutch_core::cluster::{NodeState, NodeView};
use hutch_store::kv::{Compare, Store, StoreExt, Txn};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `--scale-*`.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub up_cmd: Option<String>,
    pub down_cmd: Option<String>,
    /// Percent of the ready nodes' guest memory limit in use.
    pub up_at: f64,
    pub down_at: f64,
    pub cooldown: Duration,
}

/// How long a scaling command may run.
const CMD_LIMIT: Duration = Duration::from_secs(600);

/// The leader's scaling state: the last decision, and whether a command runs.
#[derive(Default)]
pub struct Scaler {
    last: std::sync::Mutex<Option<Instant>>,
    busy: std::sync::atomic::AtomicBool,
}

/// What to do now, from the nodes' figures (pure, for the unit tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Up { pct: u64, nodes: usize },
    Down { node: String, pct: u64 },
    Nothing,
}

pub fn decide(o: &ScaleOptions, nodes: &[NodeView], leader: &str) -> Decision {
    let ready: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Ready && n.roles.iter().any(|r| r == "node"))
        .collect();
    let (used, limit) = ready
        .iter()
        .filter_map(|n| n.capacity.as_ref())
        .fold((0u64, 0u64), |(u, l), c| {
            (u + c.mem_active_mib, l + c.mem_limit_mib)
        });
    if limit == 0 {
        return Decision::Nothing;
    }
    let pct = used as f64 * 100.0 / limit as f64;
    if o.up_cmd.is_some() && pct >= o.up_at {
        return Decision::Up {
            pct: pct.round() as u64,
            nodes: ready.len(),
        };
    }
    if o.down_cmd.is_some() && pct <= o.down_at && ready.len() > 1 {
        let idle = ready
            .iter()
            .filter(|n| n.vms == 0 && n.name != leader)
            .max_by(|a, b| a.joined_at.cmp(&b.joined_at).then(a.name.cmp(&b.name)));
        if let Some(n) = idle {
            return Decision::Down {
                node: n.name.clone(),
                pct: pct.round() as u64,
            };
        }
    }
    Decision::Nothing
}

impl Service {
    /// One scaling decision (the leader's loop calls it every second).
    pub(crate) async fn autoscale(self: &Arc<Self>, c: &Arc<Cluster>) {
        let Some(o) = c.opts.scale.clone() else {
            return;
        };
        let sc = &c.scaler;
        if sc.busy.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Some(t) = *sc.last.lock().unwrap_or_else(|e| e.into_inner()) {
            if t.elapsed() < o.cooldown {
                return;
            }
        }
        let Ok(nodes) = self.nodes(&Caller::local_admin()).await else {
            return;
        };
        let d = decide(&o, &nodes, c.name());
        if d == Decision::Nothing {
            return;
        }
        sc.busy.store(true, std::sync::atomic::Ordering::SeqCst);
        *sc.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let (c, o) = (c.clone(), o.clone());
        tokio::spawn(async move {
            match d {
                Decision::Up { pct, nodes } => {
                    tracing::info!(pct, nodes, "cluster: scaling up");
                    let cmd = o.up_cmd.unwrap_or_default();
                    run(
                        &cmd,
                        &[
                            ("HUTCH_SCALE", "up".into()),
                            ("HUTCH_CLUSTER_MEM_PCT", pct.to_string()),
                            ("HUTCH_NODES", nodes.to_string()),
                        ],
                    )
                    .await;
                }
                Decision::Down { node, pct } => {
                    tracing::info!(%node, pct, "cluster: scaling down");
                    scale_down(&c, &o, &node, pct).await;
                }
                Decision::Nothing => {}
            }
            *c.scaler.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            c.scaler
                .busy
                .store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

/// Cordons `node`, runs the command, and removes the node's record once its lease is gone.
async fn scale_down(c: &Cluster, o: &ScaleOptions, node: &str, pct: u64) {
    let key = format!("{NODES}{node}");
    let cordon = c
        .store
        .update_json::<NodeRecord, hutch_store::kv::StoreError, _>(&key, |r| {
            r.cordoned = true;
            Ok(())
        })
        .await;
    if let Err(e) = cordon {
        tracing::warn!(%node, error = %e, "cluster: cordoning a node to scale down");
        return;
    }
    let cmd = o.down_cmd.clone().unwrap_or_default();
    let ok = run(
        &cmd,
        &[
            ("HUTCH_SCALE", "down".into()),
            ("HUTCH_NODE", node.to_string()),
            ("HUTCH_CLUSTER_MEM_PCT", pct.to_string()),
        ],
    )
    .await;
    if !ok {
        tracing::warn!(%node, "cluster: the scale-down command failed; the node stays cordoned");
        return;
    }
    // Its hutchd should be stopping: wait for its lease to go (a VM placed on it meanwhile, or
    // a hutchd that runs on, keeps the node).
    let t = Instant::now() + c.opts.lease_ttl * 3;
    while Instant::now() < t {
        if let Ok(None) = c.store.get(&format!("{LIVE}{node}")).await {
            let txn = Txn::new()
                .when(Compare::Absent(format!("{LIVE}{node}")))
                .delete(key.clone());
            if let Ok(out) = c.store.txn(txn).await {
                if out.is_committed() {
                    tracing::info!(%node, "cluster: node removed");
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::warn!(%node, "cluster: the node still holds its lease after the scale-down command; left cordoned");
}

/// Runs `cmd` through `sh -c` with `env`; whether it exited 0 within [`CMD_LIMIT`].
async fn run(cmd: &str, env: &[(&str, String)]) -> bool {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c").arg(cmd).kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(std::process::Stdio::null());
    match tokio::time::timeout(CMD_LIMIT, c.output()).await {
        Ok(Ok(out)) => {
            tracing::info!(
                cmd,
                status = %out.status,
                stdout = %String::from_utf8_lossy(&out.stdout).trim(),
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "cluster: scaling command"
            );
            out.status.success()
        }
        Ok(Err(e)) => {
            tracing::warn!(cmd, error = %e, "cluster: scaling command did not start");
            false
        }
        Err(_) => {
            tracing::warn!(
                cmd,
                "cluster: scaling command ran past {CMD_LIMIT:?}; killed"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hutch_core::status::HostCapacity;

    fn node(name: &str, joined: u64, vms: u64, used: u64) -> NodeView {
        NodeView {
            name: name.into(),
            state: NodeState::Ready,
            cordoned: false,
            advertise: None,
            version: "0".into(),
            roles: vec!["node".into()],
            joined_at: joined,
            seen_at: Some(0),
            vms,
            active: vms,
            capacity: Some(HostCapacity {
                cpus: 2,
                vcpus_active: 0,
                mem_mib: 1000,
                mem_active_mib: used,
                mem_limit_mib: 1000,
                disk_total_mib: 1000,
                disk_free_mib: 1000,
            }),
        }
    }

    fn opts() -> ScaleOptions {
        ScaleOptions {
            up_cmd: Some("up".into()),
            down_cmd: Some("down".into()),
            up_at: 80.0,
            down_at: 20.0,
            cooldown: Duration::from_secs(1),
        }
    }

    #[test]
    fn up_down_and_nothing() {
        let o = opts();
        assert_eq!(
            decide(&o, &[node("a", 1, 3, 900)], "a"),
            Decision::Up { pct: 90, nodes: 1 }
        );
        assert_eq!(decide(&o, &[node("a", 1, 3, 500)], "a"), Decision::Nothing);
        // Below the threshold: the newest idle node that is not the leader goes.
        let ns = [node("a", 1, 1, 100), node("b", 2, 0, 0), node("c", 3, 0, 0)];
        assert_eq!(
            decide(&o, &ns, "a"),
            Decision::Down {
                node: "c".into(),
                pct: 3
            }
        );
        assert_eq!(
            decide(&o, &ns, "c"),
            Decision::Down {
                node: "b".into(),
                pct: 3
            }
        );
        // A lone node, or no idle one, stays.
        assert_eq!(decide(&o, &[node("a", 1, 0, 0)], "a"), Decision::Nothing);
        let busy = [node("a", 1, 1, 100), node("b", 2, 1, 100)];
        assert_eq!(decide(&o, &busy, "a"), Decision::Nothing);
        // Without the commands, nothing.
        let none = ScaleOptions {
            up_cmd: None,
            down_cmd: None,
            ..opts()
        };
        assert_eq!(
            decide(&none, &[node("a", 1, 3, 900)], "a"),
            Decision::Nothing
        );
    }
}
