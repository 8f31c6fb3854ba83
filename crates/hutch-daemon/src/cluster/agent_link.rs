//! Any node is a front door for a VM's processes and files: SSH sessions (`ssh VM@any-node`),
//! SFTP and scp, and everything else the service does through a VM's agent, for a VM that runs
//! on another node. The front door's service gets a [`LinkedAgent`] for such a VM, whose every
//! stream is a link (`agent/link.rs`) to the VM's node: `POST /api/v1/cluster/agent/{id}`,
//! upgraded to a byte stream, with the cluster's admin token and `X-Hutch-Act-As` naming the
//! caller's account, over TLS pinned as for forwarding. The VM's node authorizes the caller on
//! the VM it resolves, wakes it if auto-paused, and holds it in use while the stream lasts.

use super::forward;
use crate::agent::link::{serve_link, Connect, LinkIo, LinkedAgent, Opened};
use crate::agent::{Agent, AgentError, ErrorCode};
use crate::api::{ApiPath, AppState};
use crate::auth::{Caller, NodeToken};
use crate::error::ApiError;
use crate::service::Service;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use hutch_core::{Vm, VmState};
use std::sync::Arc;

/// How long opening a link to another node may take (an interactive session has no other
/// bound on it).
const LINK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/api/v1/cluster/agent/{id}", post(open))
}

/// The VM's node's end: one agent stream of VM `id` for the caller the front door acts for.
async fn open(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    node: Option<Extension<NodeToken>>,
    ApiPath(id): ApiPath<String>,
    req: Request,
) -> Result<Response, ApiError> {
    forward::node_only(&node, "an agent link")?;
    m.clustered("agent links")?;
    let vm = m.vm_here(&caller, &id).await?;
    let (vm, in_use) = m.wake(vm).await?;
    m.node.client(&vm)?;
    m.metrics
        .agent_links_total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Each stream on the link gets the VM's agent connection of the moment.
    let (node, metrics) = (m.node.clone(), m.metrics.clone());
    let agent = move || {
        metrics
            .agent_streams_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        node.client(&vm).map_err(refused)
    };
    let mut resp = forward::upgrade_with(req, "an agent link", move |io| async move {
        serve_link(io, agent).await;
        drop(in_use);
    })?;
    resp.headers_mut().insert(
        LINK_HEADER,
        axum::http::HeaderValue::from_static(LINK_STREAMS),
    );
    Ok(resp)
}

/// The far end's answer that it serves several streams on a link, one after another.
const LINK_HEADER: &str = "x-hutch-link";
const LINK_STREAMS: &str = "streams";

/// A refusal of the VM's node, as the agent error its stream ends with.
fn refused(e: ApiError) -> AgentError {
    let code = match e.status().as_u16() {
        404 => ErrorCode::NotFound,
        403 => ErrorCode::PermissionDenied,
        400 => ErrorCode::InvalidArgument,
        409 | 503 => ErrorCode::Busy,
        _ => ErrorCode::Io,
    };
    AgentError::guest(code, &e.to_string())
}

impl Service {
    /// VM `id`, which `caller` may see, when it runs on this node (for a node-to-node request:
    /// 404 for a VM it may not see, 409 for one on another node).
    pub(crate) async fn vm_here(&self, caller: &Caller, id: &str) -> Result<Vm, ApiError> {
        let vm = self
            .records
            .vm_by_id(id)
            .await?
            .filter(|v| caller.sees(v.owner.as_deref()))
            .ok_or_else(|| ApiError::vm(id))?;
        if !self.records.is_local(&vm) {
            return Err(ApiError::Conflict(format!(
                "{} runs on node {}, not here",
                vm.name,
                vm.node.as_deref().unwrap_or("?")
            )));
        }
        Ok(vm)
    }

    /// The node that runs `vm` when it is not this one.
    pub(crate) fn runs_elsewhere(&self, vm: &Vm) -> Option<String> {
        self.cluster.get()?;
        if self.records.is_local(vm) {
            return None;
        }
        vm.node.clone()
    }

    /// The agent of `vm`, which `caller` may use (the caller checked): this node's connection
    /// to it, or, for a VM on another node, links to that node acting for `caller`.
    pub(crate) fn agent_of(
        self: &Arc<Self>,
        caller: &Caller,
        vm: &Vm,
    ) -> Result<Arc<dyn Agent>, ApiError> {
        let Some(node) = self.runs_elsewhere(vm) else {
            return self.node.client(vm);
        };
        if vm.state != VmState::Running && !crate::service::timers::wakes_on_use(vm) {
            return Err(ApiError::Conflict(format!(
                "{} is {}; run: hutch start {}",
                vm.name,
                vm.state.as_str(),
                vm.name
            )));
        }
        let path = format!("/api/v1/cluster/agent/{}", vm.id);
        // An admin acts as the cluster's admin; an account as itself.
        let act_as = (!caller.admin).then(|| caller.account.clone());
        // Kept between streams per node, VM and caller (a link acts for one caller).
        let key = format!("{node}/{}/{}", vm.id, act_as.as_deref().unwrap_or(""));
        let m = self.clone();
        let connect: Connect = Arc::new(move || {
            let (m, node, path, act_as) = (m.clone(), node.clone(), path.clone(), act_as.clone());
            Box::pin(async move {
                let c = m.clustered("agent links").map_err(refused)?;
                if !m.node_live(&node).await.map_err(refused)? {
                    return Err(refused(ApiError::Capacity(format!(
                        "the VM is lost: its node {node} is down"
                    ))));
                }
                let up = forward::node_upgrade_headers(&m, &c, &node, &path, act_as.as_deref());
                let up = tokio::time::timeout(LINK_TIMEOUT, up)
                    .await
                    .map_err(|_| {
                        refused(ApiError::Capacity(format!(
                            "node {node} did not open an agent link within {}s",
                            LINK_TIMEOUT.as_secs()
                        )))
                    })?
                    .map_err(refused)?;
                let (up, headers) = up;
                Ok(Opened {
                    io: Box::new(hyper_util::rt::TokioIo::new(up)) as Box<dyn LinkIo>,
                    reusable: headers
                        .get(LINK_HEADER)
                        .is_some_and(|v| v.as_bytes() == LINK_STREAMS.as_bytes()),
                })
            })
        });
        let agent = LinkedAgent::new(connect).keeping(self.idle_links.clone(), key);
        Ok(Arc::new(agent))
    }
}
