//! What hutch's HTTP(S) proxy (crate `hutch-proxy`) asks the daemon: which VM a host names,
//! whether a bearer token may use it (the service decides, on the resolved VM), and to count a
//! request as the VM's activity or resume it when it is auto-paused (service/timers.rs). Also
//! the share links and the proxy's CA for `hutch port share` and `hutch ca`.

use super::dns::vm_by_label;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::Service;
use hutch_core::{Vm, VmState};
use hutch_proxy::Resolve;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Longest share link.
pub const MAX_SHARE_SECS: u64 = 30 * 86400;

pub struct Backends {
    /// Weak: the service owns the proxy's front (through `Service::front`).
    pub service: Weak<Service>,
    /// The static admin API token (DATA_DIR/api-token).
    pub admin_token: String,
}

impl hutch_proxy::Backends for Backends {
    fn local(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hutch_proxy::Local, Box<hyper::Request<hyper::body::Incoming>>> {
        match self.service.upgrade().and_then(|s| s.e2b.get().cloned()) {
            Some(e2b) => e2b.local(req),
            None => Err(Box::new(req)),
        }
    }

    fn resolve(&self, label: &str) -> Resolve {
        let Some(s) = self.service.upgrade() else {
            return Resolve::Unknown;
        };
        // An E2B sandbox id names its VM (in its owner's namespace); its ports are public
        // unless it was made private.
        let e2b = s.e2b.get().and_then(|e| e.e2b.route(label));
        let found = match &e2b {
            Some(r) => s.records.find_vm(|v| v.id == r.vm_id),
            None => vm_by_label(&s.records, label),
        };
        let public = |mut ports: Vec<u16>| {
            if e2b.as_ref().is_some_and(|r| r.public) {
                ports.push(0);
            }
            ports
        };
        match found {
            None => Resolve::Unknown,
            Some(vm) => match (vm.state, vm.net.ipv4) {
                (VmState::Running, Some(ip)) => Resolve::Running {
                    vm: vm.id,
                    ip: ip.into(),
                    public_ports: public(vm.net.public_ports),
                },
                (_, Some(_)) if crate::service::timers::wakes_on_use(&vm) => Resolve::Paused {
                    vm: vm.id,
                    public_ports: public(vm.net.public_ports),
                },
                _ => Resolve::Stopped { vm: vm.id },
            },
        }
    }

    fn touched(&self, vm: &str) {
        if let Some(s) = self.service.upgrade() {
            s.touch(vm);
        }
    }

    fn wake(&self, vm: &str) -> hutch_proxy::Waking<'_> {
        let vm = vm.to_string();
        Box::pin(async move {
            let s = self.service.upgrade()?;
            let found = s.records.find_vm(|v| v.id == vm)?;
            if s.runs_elsewhere(&found).is_some() {
                // Dialed through its node, which wakes it; reached directly, it is resumed
                // there now (an intent).
                if s.dials_through(&found) {
                    return found.net.ipv4.map(Into::into);
                }
                return match s.resume(&Caller::local_admin(), &found.key()).await {
                    Ok(v) => v.net.ipv4.map(Into::into),
                    Err(e) => {
                        tracing::warn!(vm = %vm, error = %e, "proxy: resuming a paused VM on another node");
                        None
                    }
                };
            }
            match s.wake_id(&vm).await {
                Ok(v) if v.state == VmState::Running => v.net.ipv4.map(Into::into),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "proxy: resuming a paused VM");
                    None
                }
            }
        })
    }

    fn dial(&self, vm: &str, port: u16) -> Option<hutch_proxy::Dialing<'static>> {
        let s = self.service.upgrade()?;
        let found = s.records.find_vm(|v| v.id == vm)?;
        let node = s.runs_elsewhere(&found)?;
        if !s.dials_through(&found) {
            return None;
        }
        Some(Box::pin(async move {
            match s.dial_through(&node, &found.id, port).await {
                Ok(io) => Ok(Box::new(io) as Box<dyn hutch_proxy::Conn>),
                Err(e) => Err(e.to_string()),
            }
        }))
    }

    fn authorize(&self, vm: &str, bearer: &str) -> bool {
        let Some(s) = self.service.upgrade() else {
            return false;
        };
        let Some(owner) = s.records.find_vm(|v| v.id == vm).map(|v| v.owner) else {
            return false;
        };
        let caller = if crate::constant_eq(bearer.as_bytes(), self.admin_token.as_bytes()) {
            Some(Caller::local_admin())
        } else {
            let h = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| h.block_on(s.verify_token(bearer)))
        };
        caller.is_some_and(|c| c.sees(owner.as_deref()))
    }
}

/// The proxy as the service knows it (set once its listeners run).
pub struct Front {
    pub proxy: Arc<hutch_proxy::Proxy>,
    /// "https" or "http": what share links use.
    pub scheme: &'static str,
    /// The listener's port when it is not the scheme's default (it goes into links).
    pub port: Option<u16>,
    /// Where the generated CA lives (None: the admin's certificate is used).
    pub ca_dir: Option<PathBuf>,
}

/// The label a VM has on the proxy and the public DNS: the admin's VMs by name, an account's as
/// `NAME--ACCOUNT` (names are per account; see `vm_by_label`).
pub fn public_label(vm: &Vm) -> String {
    match &vm.owner {
        None => vm.name.clone(),
        Some(o) => format!("{}--{o}", vm.name),
    }
}

impl Service {
    /// A link to `port` of VM `name` through the proxy, good for `ttl_secs`.
    pub async fn share(
        &self,
        caller: &Caller,
        name: &str,
        port: u16,
        ttl_secs: u64,
    ) -> Result<(String, u64), ApiError> {
        let vm = self.vm_for(caller, name).await?;
        if port == 0 {
            return Err(ApiError::Invalid("port must be 1 to 65535".into()));
        }
        if ttl_secs == 0 || ttl_secs > MAX_SHARE_SECS {
            return Err(ApiError::Invalid(format!(
                "a share link lasts 1 s to 30 days, not {ttl_secs} s"
            )));
        }
        let f = self.front.get().ok_or_else(|| {
            ApiError::Invalid(
                "hutchd runs no proxy to share through (start it with --https-listen or --http-listen)"
                    .into(),
            )
        })?;
        let mut url = f.proxy.share_link(
            &public_label(&vm),
            &vm.id,
            port,
            Duration::from_secs(ttl_secs),
            f.scheme,
        );
        if let Some(p) = f.port {
            // scheme://host/?... → scheme://host:PORT/?...
            if let Some(i) = url[f.scheme.len() + 3..].find('/') {
                url.insert_str(f.scheme.len() + 3 + i, &format!(":{p}"));
            }
        }
        Ok((url, hutch_core::now() + ttl_secs))
    }

    /// The CA certificate (PEM) of the proxy's generated CA.
    pub fn proxy_ca(&self) -> Result<String, ApiError> {
        let f = self.front.get().ok_or_else(|| {
            ApiError::Invalid("hutchd runs no HTTPS proxy (--https-listen)".into())
        })?;
        let dir = f.ca_dir.as_ref().ok_or_else(|| {
            ApiError::Invalid(
                "the proxy uses the admin's certificate (--tls-cert), not a CA hutchd made".into(),
            )
        })?;
        hutch_proxy::ca_pem(dir).map_err(|e| ApiError::Internal(e.to_string()))
    }
}
