//! The service's operations on one VM that only its own node can do (its console, snapshot,
//! fork, copy, keepalive), asked through another node: run there through that node's REST API,
//! acting for the caller ([`ACT_AS`]). REST requests are forwarded whole before they reach the
//! service (forward.rs); this serves the service's other callers, the SSH front door's commands.

use crate::auth::{Caller, ACT_AS};
use crate::error::ApiError;
use crate::service::Service;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, Method};
use hutch_core::Vm;
use serde::de::DeserializeOwned;

/// Largest answer taken from another node (a console tail is at most 16 MiB).
const MAX_ANSWER: usize = 32 << 20;

impl Service {
    /// For `vm` on another node: `method /api/v1/sandboxes/{vm}/{sub}` (with JSON `body`) run
    /// there for `caller`, and its answer; None when `vm` is this node's.
    pub(crate) async fn on_owner(
        &self,
        caller: &Caller,
        vm: &Vm,
        method: Method,
        sub: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<Bytes>, ApiError> {
        let Some(node) = self.runs_elsewhere(vm) else {
            return Ok(None);
        };
        let c = self.clustered("asking another node")?;
        if !self.node_live(&node).await? {
            return Err(ApiError::Capacity(format!(
                "{} is lost: its node {node} is down",
                vm.name
            )));
        }
        let mut req = Request::builder().method(method).uri(format!(
            "/api/v1/sandboxes/{}/{sub}",
            vm.key().replace('/', "%2F")
        ));
        if !caller.admin {
            req = req.header(ACT_AS, &caller.account);
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let req = req
            .body(body)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let resp = super::forward::node_request(self, &c, &node, req).await?;
        let status = resp.status();
        let limited = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
        let bytes = http_body_util::BodyExt::collect(limited)
            .await
            .map_err(|e| ApiError::Internal(format!("node {node}'s answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(ApiError::from_remote(status, &bytes, &node));
        }
        Ok(Some(bytes))
    }

    /// [`Service::on_owner`], its answer decoded from JSON.
    pub(crate) async fn on_owner_json<T: DeserializeOwned>(
        &self,
        caller: &Caller,
        vm: &Vm,
        method: Method,
        sub: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<T>, ApiError> {
        match self.on_owner(caller, vm, method, sub, body).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ApiError::Internal(format!("another node's answer to {sub}: {e}"))),
        }
    }
}
