//! etcd leases: a lease with a TTL that a task keeps alive, and keys bound to it
//! ([`EtcdStore::run_txn`] with the lease's id) that etcd deletes when it expires. A hutch node
//! holds one for its membership: while its hutchd runs and reaches etcd, its keys stay; when
//! hutchd dies or is cut off, they go within the TTL, and every other node's watch sees it.
//!
//! The holder also knows, without asking etcd, when its lease may have expired: the
//! [`LeaseState::Alive`] deadline is the last renewal's send time plus the TTL etcd granted,
//! so it errs early. Past it, the state turns [`LeaseState::Lost`] for good (a lost lease is
//! never revived; the holder grants a new one and registers again).

use crate::{EtcdStore, StoreError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where a lease stands, as its holder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed; it cannot have expired before `until`.
    Alive { until: Instant },
    /// Expired (etcd said so, or no renewal reached etcd before the deadline) or revoked.
    Lost,
}

/// A granted lease, kept alive until dropped (then it expires within its TTL) or revoked.
pub struct Lease {
    id: i64,
    ttl: Duration,
    state: watch::Receiver<LeaseState>,
    task: tokio::task::JoinHandle<()>,
    store: EtcdStore,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Lease {
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL etcd granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    pub fn is_alive(&self) -> bool {
        matches!(self.state(), LeaseState::Alive { .. })
    }

    /// Waits until the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(|s| *s == LeaseState::Lost).await;
    }

    /// A receiver of the lease's state changes.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Revokes it now: its keys go at once.
    pub async fn revoke(self) -> Result<(), StoreError> {
        self.task.abort();
        let id = self.id;
        self.store
            .request("etcd lease revoke", |mut c| async move {
                c.lease_revoke(id).await
            })
            .await
            .map(|_| ())
    }
}

impl EtcdStore {
    /// Grants a lease of `ttl` (whole seconds, at least 2) and keeps it alive, renewing every
    /// third of the TTL, at least every second.
    pub async fn grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = ttl.as_secs().max(2) as i64;
        let sent = Instant::now();
        let resp = self
            .request("etcd lease grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        let granted = Duration::from_secs(resp.ttl().max(1) as u64);
        let (tx, rx) = watch::channel(LeaseState::Alive {
            until: sent + granted,
        });
        let task = tokio::spawn(keep_alive(self.clone(), resp.id(), granted, sent, tx));
        Ok(Lease {
            id: resp.id(),
            ttl: granted,
            state: rx,
            task,
            store: self.clone(),
        })
    }
}

/// Renews the lease every third of its TTL until it is lost; reconnects the renewal stream when
/// it breaks.
async fn keep_alive(
    store: EtcdStore,
    id: i64,
    ttl: Duration,
    mut last_sent: Instant,
    tx: watch::Sender<LeaseState>,
) {
    // Often, so that an etcd election or a member lost on the way costs no more than about a
    // second of the TTL's slack.
    let every = (ttl / 3).min(Duration::from_secs(1));
    let mut deadline = last_sent + ttl;
    let mut first = true;
    'connect: loop {
        if !first {
            let pause = Instant::now() + Duration::from_millis(200);
            tokio::time::sleep_until(pause.min(deadline).into()).await;
        }
        first = false;
        if Instant::now() >= deadline {
            break;
        }
        let mut c = store.client.clone();
        let opened = tokio::time::timeout_at(deadline.into(), c.lease_keep_alive(id)).await;
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!("lease {id:x}: keep-alive stream: {e}");
                continue;
            }
            Err(_) => break,
        };
        loop {
            let sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                continue 'connect;
            }
            match tokio::time::timeout_at(deadline.into(), stream.message()).await {
                Ok(Ok(Some(resp))) => {
                    if resp.ttl() <= 0 {
                        break 'connect; // etcd: expired
                    }
                    last_sent = sent;
                    deadline = last_sent + Duration::from_secs(resp.ttl() as u64);
                    let _ = tx.send(LeaseState::Alive { until: deadline });
                }
                Ok(Ok(None)) | Ok(Err(_)) => continue 'connect,
                Err(_) => break 'connect,
            }
            let next = (last_sent + every).min(deadline);
            tokio::time::sleep_until(next.into()).await;
            if tx.is_closed() {
                return;
            }
        }
    }
    tracing::warn!("etcd lease {id:x} lost");
    let _ = tx.send(LeaseState::Lost);
}
