//! The VM network in the control plane: a new VM's network from its request, `hutch net set`,
//! port forwards and public ports. Every call is authorized on the resolved VM.

use super::Service;
use crate::auth::Caller;
use crate::error::ApiError;
use hutch_core::api::CreateVm;
use hutch_core::net::{self, NetMode, PortForward, SetNet, VmNet};
use hutch_core::Vm;
use std::net::SocketAddr;
use std::sync::Arc;

/// Most port forwards and public ports one VM may have.
pub const MAX_PORTS: usize = 32;

fn invalid(e: net::NetParseError) -> ApiError {
    ApiError::Invalid(e.0)
}

fn rate(v: &Option<String>) -> Result<Option<u64>, ApiError> {
    match v.as_deref() {
        None | Some("") | Some("off") => Ok(None),
        Some(r) => net::parse_rate(r).map(Some).map_err(invalid),
    }
}

impl Service {
    /// The network a create asks for, checked (no address yet).
    pub(crate) fn net_of(&self, req: &CreateVm) -> Result<VmNet, ApiError> {
        let has_net = self.node.net.is_some();
        let mode = req.net.unwrap_or(if has_net {
            NetMode::Internet
        } else {
            NetMode::None
        });
        if mode != NetMode::None && !has_net {
            return Err(ApiError::Invalid(format!(
                "this hutchd has no VM network (it runs with --network off): use --net none, not {mode}"
            )));
        }
        let allow_out = net::parse_rules(&req.allow_out, "--allow-out").map_err(invalid)?;
        let deny_out = net::parse_rules(&req.deny_out, "--deny-out").map_err(invalid)?;
        if (!allow_out.is_empty() || !deny_out.is_empty()) && mode != NetMode::Internet {
            return Err(ApiError::Invalid(format!(
                "--allow-out and --deny-out apply to --net internet, not {mode}"
            )));
        }
        let (rate_in, rate_out) = (rate(&req.rate_in)?, rate(&req.rate_out)?);
        if (rate_in.is_some() || rate_out.is_some()) && mode == NetMode::None {
            return Err(ApiError::Invalid(
                "--rate-in and --rate-out need a network (not --net none)".into(),
            ));
        }
        Ok(VmNet {
            mode,
            allow_out,
            deny_out,
            rate_in,
            rate_out,
            ..VmNet::default()
        })
    }

    /// Changes a VM's egress rules and rates; applies at once when it runs.
    pub async fn set_net(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: SetNet,
    ) -> Result<Vm, ApiError> {
        let vm = self.vm_for(caller, name).await?;
        if vm.net.mode == NetMode::None {
            return Err(ApiError::Invalid(format!(
                "{name} has no network (--net none)"
            )));
        }
        let allow = req
            .allow_out
            .as_ref()
            .map(|l| net::parse_rules(l, "--allow-out").map_err(invalid))
            .transpose()?;
        let deny = req
            .deny_out
            .as_ref()
            .map(|l| net::parse_rules(l, "--deny-out").map_err(invalid))
            .transpose()?;
        let internet = vm.net.mode == NetMode::Internet;
        if !internet
            && (allow.as_ref().is_some_and(|a| !a.is_empty())
                || deny.as_ref().is_some_and(|d| !d.is_empty()))
        {
            return Err(ApiError::Invalid(format!(
                "--allow-out and --deny-out apply to --net internet; {name} is {}",
                vm.net.mode
            )));
        }
        let rate_in = req
            .rate_in
            .as_ref()
            .map(|_| rate(&req.rate_in))
            .transpose()?;
        let rate_out = req
            .rate_out
            .as_ref()
            .map(|_| rate(&req.rate_out))
            .transpose()?;
        let vm = self
            .records
            .update_vm::<ApiError, _>(&vm.id, |v| {
                if let Some(a) = &allow {
                    v.net.allow_out = a.clone();
                }
                if let Some(d) = &deny {
                    v.net.deny_out = d.clone();
                }
                if let Some(r) = rate_in {
                    v.net.rate_in = r;
                }
                if let Some(r) = rate_out {
                    v.net.rate_out = r;
                }
                Ok(())
            })
            .await?;
        self.apply_net(&vm).await?;
        Ok(vm)
    }

    async fn apply_net(&self, vm: &Vm) -> Result<(), ApiError> {
        let Some(n) = self.node.net.clone() else {
            return Ok(());
        };
        let v = vm.clone();
        tokio::task::spawn_blocking(move || n.update(&v))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
    }

    /// Forwards host port `f.host` to the VM's port `f.vm`.
    pub async fn port_add(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        f: PortForward,
    ) -> Result<Vm, ApiError> {
        let vm = self.vm_for(caller, name).await?;
        let (Some(n), Some(ip)) = (self.node.net.clone(), vm.net.ipv4) else {
            return Err(ApiError::Invalid(format!(
                "{name} has no network (--net none)"
            )));
        };
        let (lo, hi) = n.settings.port_range;
        if !caller.admin && !(lo..=hi).contains(&f.host) {
            return Err(ApiError::Forbidden(format!(
                "accounts may forward host ports {lo}-{hi} only, not {}",
                f.host
            )));
        }
        if vm.net.ports.len() >= MAX_PORTS {
            return Err(ApiError::Invalid(format!(
                "{name} already has {MAX_PORTS} port forwards"
            )));
        }
        let taken = self
            .records
            .find_local_vm(|v| v.net.ports.iter().any(|p| p.host == f.host))
            .is_some();
        if taken {
            return Err(ApiError::Conflict(format!(
                "host port {} is already forwarded",
                f.host
            )));
        }
        n.forwards
            .start(&vm.id, f.host, SocketAddr::new(ip.into(), f.vm))
            .await
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        let r = self
            .records
            .update_vm::<ApiError, _>(&vm.id, |v| {
                if v.net.ports.iter().any(|p| p.host == f.host) {
                    return Err(ApiError::Conflict(format!(
                        "host port {} is already forwarded",
                        f.host
                    )));
                }
                v.net.ports.push(f);
                Ok(())
            })
            .await;
        if r.is_err() {
            n.forwards.stop(f.host);
        }
        r
    }

    /// Stops forwarding host port `host` to the VM.
    pub async fn port_rm(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        host: u16,
    ) -> Result<Vm, ApiError> {
        let vm = self.vm_for(caller, name).await?;
        if !vm.net.ports.iter().any(|p| p.host == host) {
            return Err(ApiError::NotFound {
                kind: "port forward",
                name: format!("{name}:{host}"),
            });
        }
        let vm = self
            .records
            .update_vm::<ApiError, _>(&vm.id, |v| {
                v.net.ports.retain(|p| p.host != host);
                Ok(())
            })
            .await?;
        if let Some(n) = &self.node.net {
            n.forwards.stop(host);
        }
        Ok(vm)
    }

    /// Opens (or closes) the VM's `port` on the HTTPS proxy to everyone.
    pub async fn port_public(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        port: u16,
        public: bool,
    ) -> Result<Vm, ApiError> {
        let vm = self.vm_for(caller, name).await?;
        if port == 0 {
            return Err(ApiError::Invalid("port must be 1 to 65535".into()));
        }
        if public && vm.net.public_ports.len() >= MAX_PORTS && !vm.net.public_ports.contains(&port)
        {
            return Err(ApiError::Invalid(format!(
                "{name} already has {MAX_PORTS} public ports"
            )));
        }
        self.records
            .update_vm::<ApiError, _>(&vm.id, |v| {
                v.net.public_ports.retain(|p| *p != port);
                if public {
                    v.net.public_ports.push(port);
                    v.net.public_ports.sort_unstable();
                }
                Ok(())
            })
            .await
    }
}
