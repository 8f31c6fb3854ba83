//! Any node's HTTP(S) proxy serves the VMs of every node. A VM whose address this node reaches
//! (its own, or one on a node sharing its VM network through the overlay) is connected to
//! directly; any other (nodes with separate subnets, or a node without a VM network) is reached
//! through its node: `POST /api/v1/cluster/dial/{id}/{port}`, upgraded to a byte stream, with
//! the cluster's admin token, TLS pinned as for forwarding. The proxy that took the request has
//! authorized it; the VM's node connects to the port of its own VM only, wakes the VM if it is
//! auto-paused and holds it in use for as long as the connection lasts.

use super::forward;
use crate::api::{ApiPath, AppState};
use crate::auth::{Caller, NodeToken};
use crate::error::ApiError;
use crate::service::{admin_only, Service};
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use hutch_core::{Vm, VmState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long the VM's port has to accept, and the other node to open the stream.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/api/v1/cluster/dial/{id}/{port}", post(dial))
}

/// The VM's node's end: a TCP connection to port `port` of its VM `id`, as a byte stream.
async fn dial(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    node: Option<Extension<NodeToken>>,
    ApiPath((id, port)): ApiPath<(String, u16)>,
    req: Request,
) -> Result<Response, ApiError> {
    forward::node_only(&node, "dialing a VM's port")?;
    admin_only(&caller, "dialing a VM's port")?;
    m.clustered("dialing a VM's port")?;
    if port == 0 {
        return Err(ApiError::Invalid("port must be 1 to 65535".into()));
    }
    let vm = m.vm_here(&caller, &id).await?;
    let (vm, in_use) = m.wake(vm).await?;
    let ip = match (vm.state, vm.net.ipv4) {
        (VmState::Running, Some(ip)) => ip,
        (VmState::Running, None) => {
            return Err(ApiError::Conflict(format!("{} has no address", vm.name)))
        }
        (s, _) => return Err(ApiError::Conflict(format!("{} is {}", vm.name, s.as_str()))),
    };
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect((ip, port)))
        .await
        .map_err(|_| ApiError::Conflict(format!("port {port} of {} did not answer", vm.name)))?
        .map_err(|e| {
            ApiError::Conflict(format!(
                "nothing answers on port {port} of {}: {e}",
                vm.name
            ))
        })?;
    let _ = tcp.set_nodelay(true);
    m.metrics.dials_total.fetch_add(1, Ordering::Relaxed);
    forward::upgrade_with(req, "a proxied connection", move |mut io| async move {
        let mut tcp = tcp;
        if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut tcp).await {
            tracing::debug!(error = %e, "a proxied connection through this node ended");
        }
        drop(in_use);
    })
}

impl Service {
    /// Whether this node's proxy connects to another node's `vm` through that node: when it
    /// cannot reach the VM's address, and for a VM that pauses when idle (its node must see
    /// its use, and wakes it).
    pub(crate) fn dials_through(&self, vm: &Vm) -> bool {
        self.runs_elsewhere(vm).is_some()
            && (!self.reaches(vm) || vm.timers.auto_pause_secs.is_some() || vm.timers.auto_resume)
    }

    /// Whether this node reaches `vm`'s address itself: a VM of its own, or one on a node that
    /// shares its VM network (the overlay routes it).
    pub(crate) fn reaches(&self, vm: &Vm) -> bool {
        if self.runs_elsewhere(vm).is_none() {
            return true;
        }
        match (&self.node.net, vm.net.ipv4) {
            (Some(net), Some(ip)) => net.settings.cfg.subnet.contains(ip),
            _ => false,
        }
    }

    /// A connection to port `port` of VM `id` on node `node`, through that node.
    pub(crate) async fn dial_through(
        self: &Arc<Self>,
        node: &str,
        id: &str,
        port: u16,
    ) -> Result<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, ApiError> {
        let c = self.clustered("dialing through another node")?;
        if !self.node_live(node).await? {
            return Err(ApiError::Capacity(format!(
                "the VM is lost: its node {node} is down"
            )));
        }
        let path = format!("/api/v1/cluster/dial/{id}/{port}");
        let up = tokio::time::timeout(
            DIAL_TIMEOUT,
            forward::node_upgrade(self, &c, node, &path, None),
        )
        .await
        .map_err(|_| ApiError::Capacity(format!("node {node} did not answer in time")))??;
        Ok(hyper_util::rt::TokioIo::new(up))
    }
}
