//! Port forwards (`hutch port add VM HOST:VM`): hutchd listens on the host port and splices
//! each connection to the VM's port. In user space rather than DNAT so that they work from the
//! host itself (loopback) too, need no extra host-wide settings, and count as VM activity.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Connections one forward carries at once; more wait in the listen backlog.
const MAX_CONNS: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("host port {0} is already forwarded")]
    Taken(u16),
    #[error("host port {port} cannot be used: {source}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

struct Running {
    vm: String,
    task: JoinHandle<()>,
}

pub struct Forwards {
    bind: IpAddr,
    running: Mutex<HashMap<u16, Running>>,
}

impl Forwards {
    pub fn new(bind: IpAddr) -> Forwards {
        Forwards {
            bind,
            running: Mutex::default(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether host port `port` is forwarded by this hutchd.
    pub fn is_taken(&self, port: u16) -> bool {
        self.map().contains_key(&port)
    }

    /// Listens on host port `port` and forwards to `target`, for VM `vm`.
    pub async fn start(&self, vm: &str, port: u16, target: SocketAddr) -> Result<(), ForwardError> {
        if self.is_taken(port) {
            return Err(ForwardError::Taken(port));
        }
        let l = TcpListener::bind(SocketAddr::new(self.bind, port))
            .await
            .map_err(|source| ForwardError::Bind { port, source })?;
        let mut m = self.map();
        if m.contains_key(&port) {
            return Err(ForwardError::Taken(port));
        }
        let task = tokio::spawn(serve(l, target));
        m.insert(
            port,
            Running {
                vm: vm.to_string(),
                task,
            },
        );
        Ok(())
    }

    /// Stops the forward on host port `port`; whether there was one.
    pub fn stop(&self, port: u16) -> bool {
        match self.map().remove(&port) {
            Some(r) => {
                r.task.abort();
                true
            }
            None => false,
        }
    }

    /// Stops every forward of VM `vm`.
    pub fn stop_vm(&self, vm: &str) {
        self.map().retain(|_, r| {
            let keep = r.vm != vm;
            if !keep {
                r.task.abort();
            }
            keep
        });
    }
}

async fn serve(l: TcpListener, target: SocketAddr) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut inbound, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let out = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
            if let Ok(Ok(mut out)) = out {
                let _ = out.set_nodelay(true);
                let _ = inbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}
