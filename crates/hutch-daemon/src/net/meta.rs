//! The metadata service as hutchd runs it: on the VM network's gateway (nftables sends
//! 169.254.169.254:80 there and drops spoofed source addresses, so a connection's source
//! address names the VM), answering from the VM records.

use super::{vm_at, VmNetwork};
use crate::metadata::{Instance, Instances};
use crate::records::Records;
use hutch_core::net::NetMode;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// Open connections to the metadata service, from all VMs together.
const MAX_CONNECTIONS: usize = 256;

pub struct Directory {
    pub records: Records,
    pub domain: String,
}

impl Instances for Directory {
    fn by_ip(&self, ip: Ipv4Addr) -> Option<Instance> {
        let vm = vm_at(&self.records, ip).filter(|v| v.net.mode != NetMode::None)?;
        Some(Instance {
            id: vm.id,
            hostname: vm.name.clone(),
            name: vm.name,
            owner: vm.owner,
            ipv4: ip,
            domain: self.domain.clone(),
        })
    }
}

/// Serves the metadata router on the gateway until the task is dropped.
pub async fn serve(
    net: &VmNetwork,
    records: Records,
    key: Arc<crate::identity::IdentityKey>,
    issuer: String,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let cfg = &net.settings.cfg;
    let listen = SocketAddr::new(cfg.gateway().into(), cfg.metadata_port);
    let dir = Arc::new(Directory {
        records,
        domain: net.settings.domain.clone(),
    });
    let app = crate::metadata::router(dir, key, issuer);
    let l = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "metadata service (169.254.169.254 for guests)");
    // The API's server loop: a connection cap, a header deadline, the peer for the handlers.
    let opts = crate::tcp::TcpOptions {
        listen,
        tls_cert: None,
        tls_key: None,
        max_connections: MAX_CONNECTIONS,
        header_timeout: std::time::Duration::from_secs(10),
    };
    Ok(crate::tcp::serve(l, app, None, opts))
}
