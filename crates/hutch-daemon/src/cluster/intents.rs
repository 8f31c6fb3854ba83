//! Lifecycle work for another node, through the store: no node calls another for it.
//!
//! The node that took the request (any front door: REST, SSH, E2B) writes an intent,
//! `intents/ID` = {target node, caller, operation}, and watches it. The target node watches
//! `intents/` too: it takes each intent addressed to it with a compare-and-swap (so it runs
//! once), runs the operation through its own service as that caller (so it is authorized
//! there, on the object it resolves), and writes the outcome into the intent. The requester
//! answers with it and deletes the intent. When the target's lease goes while the requester
//! waits, the requester gives up with 503 (the intent is swept later).
//!
//! A node that restarts finds the intents it had taken but not finished, and answers them
//! "interrupted"; intents nobody collected are deleted after [`KEEP_SECS`].

use super::nodes::LIVE;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::Service;
use hutch_core::api::CreateVm;
use hutch_core::Vm;
use hutch_store::kv::{Compare, EventKind, Store, StoreError, StoreExt, Txn};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

pub const INTENTS: &str = "intents/";
/// Intents (done or not) older than this are deleted by their target node.
pub const KEEP_SECS: u64 = 900;
/// How long a requester waits for an outcome (a create may pull an image and boot under TCG).
const WAIT: Duration = Duration::from_secs(600);

/// What to do, on which VM (by name as the caller gave it, and the id it resolved to).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Create {
        req: Box<CreateVm>,
    },
    Start {
        name: String,
        id: String,
    },
    Stop {
        name: String,
        id: String,
    },
    Delete {
        name: String,
        id: String,
        graceful: bool,
    },
    Pause {
        name: String,
        id: String,
    },
    Resume {
        name: String,
        id: String,
    },
}

impl Op {
    fn vm_id(&self) -> Option<&str> {
        match self {
            Op::Create { .. } => None,
            Op::Start { id, .. }
            | Op::Stop { id, .. }
            | Op::Delete { id, .. }
            | Op::Pause { id, .. }
            | Op::Resume { id, .. } => Some(id),
        }
    }
}

/// An error as the target answered it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Intent {
    pub id: String,
    /// The node that runs it, and the one that asked.
    pub node: String,
    pub from: String,
    pub account: String,
    pub admin: bool,
    pub op: Op,
    pub created_at: u64,
    #[serde(default)]
    pub taken: bool,
    /// The outcome: the VM (None for a delete), or why not.
    #[serde(default)]
    pub done: Option<Result<Option<Vm>, Failure>>,
}

fn key(id: &str) -> String {
    format!("{INTENTS}{id}")
}

impl Service {
    fn etcd(&self) -> Result<&Arc<super::Cluster>, ApiError> {
        self.cluster
            .get()
            .ok_or_else(|| ApiError::Internal("not a cluster node".into()))
    }

    /// Whether node `name` holds its lease.
    pub(crate) async fn node_live(&self, name: &str) -> Result<bool, ApiError> {
        let c = self.etcd()?;
        Ok(c.store.get(&format!("{LIVE}{name}")).await?.is_some())
    }

    /// Has node `node` run `op` for `caller`, and answers with its outcome.
    pub(crate) async fn remote(
        &self,
        node: &str,
        caller: &Caller,
        op: Op,
    ) -> Result<Option<Vm>, ApiError> {
        let c = self.etcd()?;
        if !self.node_live(node).await? {
            return Err(ApiError::Capacity(format!(
                "node {node} is down: its hutchd is not running or cannot reach etcd"
            )));
        }
        let id = hutch_core::names::random_id();
        let intent = Intent {
            id: id.clone(),
            node: node.to_string(),
            from: c.name().to_string(),
            account: caller.account.clone(),
            admin: caller.admin,
            op,
            created_at: hutch_core::now(),
            taken: false,
            done: None,
        };
        let k = key(&id);
        let out = c
            .store
            .txn(
                Txn::new()
                    .when(Compare::Absent(k.clone()))
                    .put_json(k.clone(), &intent)?,
            )
            .await?;
        let Some(rev) = out.revision() else {
            return Err(ApiError::Internal("intent id clash".into()));
        };
        let mut w = c.store.watch(&k, rev).await?;
        let live_key = format!("{LIVE}{node}");
        let mut live = c.store.watch(&live_key, rev).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        let outcome = loop {
            tokio::select! {
                ev = w.next() => {
                    let ev = ev?;
                    if ev.key != k { continue; }
                    let Some(v) = ev.value else {
                        break Err(ApiError::Internal(format!("the intent for node {node} vanished")));
                    };
                    let i: Intent = serde_json::from_slice(&v)
                        .map_err(|e| ApiError::Internal(format!("intent {id}: {e}")))?;
                    if let Some(done) = i.done {
                        break done.map_err(failure_error);
                    }
                }
                ev = live.next() => {
                    let ev = ev?;
                    // (The watch is by prefix: `live/n2` also sees `live/n20`.)
                    if ev.key == live_key && ev.kind == EventKind::Delete {
                        break Err(ApiError::Capacity(format!(
                            "node {node} went down before it finished; what it did is unknown \
                             until it is back"
                        )));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    break Err(ApiError::Internal(format!(
                        "node {node} did not finish within {WAIT:?}"
                    )));
                }
            }
        };
        if let Err(e) = c.store.txn(Txn::new().delete(k)).await {
            tracing::debug!(error = %e, "deleting intent {id}");
        }
        outcome
    }

    /// Runs what other nodes ask of this one, for as long as the service lives.
    pub(crate) fn serve_intents(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let running: Arc<Mutex<HashSet<String>>> = Arc::default();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let Some(s) = weak.upgrade() else { return };
                let Ok(c) = s.etcd().cloned() else { return };
                drop(s);
                let r = follow(&weak, &c.store, c.name(), &running, first).await;
                first = false;
                match r {
                    Err(StoreError::Closed) => return,
                    Err(e) => tracing::warn!(error = %e, "cluster intents: following"),
                    Ok(()) => return,
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

/// Lists the intents, takes those for `me`, then follows the watch; Ok when the service is gone.
async fn follow(
    weak: &Weak<Service>,
    store: &hutch_store_etcd::EtcdStore,
    me: &str,
    running: &Arc<Mutex<HashSet<String>>>,
    at_start: bool,
) -> Result<(), StoreError> {
    let (list, rev) = store.list_json::<Intent>(INTENTS).await?;
    let mut last_sweep = std::time::Instant::now();
    for v in list {
        let Some(s) = weak.upgrade() else {
            return Ok(());
        };
        consider(&s, store, me, v.value, v.revision, running, at_start).await;
    }
    let mut w = store.watch(INTENTS, rev).await?;
    loop {
        let ev = tokio::select! {
            ev = w.next() => ev?,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {
                if last_sweep.elapsed() >= Duration::from_secs(60) {
                    sweep(store, me).await;
                    last_sweep = std::time::Instant::now();
                }
                continue;
            }
        };
        let Some(v) = ev.value else { continue };
        let Ok(i) = serde_json::from_slice::<Intent>(&v) else {
            continue;
        };
        let Some(s) = weak.upgrade() else {
            return Ok(());
        };
        consider(&s, store, me, i, ev.revision, running, false).await;
    }
}

/// Takes intent `i` (at `rev`) if it is this node's and nobody has; answers "interrupted" for
/// one this node took before it restarted.
async fn consider(
    s: &Arc<Service>,
    store: &hutch_store_etcd::EtcdStore,
    me: &str,
    mut i: Intent,
    rev: u64,
    running: &Arc<Mutex<HashSet<String>>>,
    at_start: bool,
) {
    if i.node != me || i.done.is_some() {
        return;
    }
    let k = key(&i.id);
    if i.taken {
        let ours = running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&i.id);
        if !ours && at_start {
            i.done = Some(Err(Failure {
                status: 503,
                code: "insufficient_capacity".into(),
                message: format!("node {me}'s hutchd restarted before it finished; try again"),
            }));
            let _ = put_if(store, &k, rev, &i).await;
        }
        return;
    }
    if hutch_core::now().saturating_sub(i.created_at) > KEEP_SECS {
        return;
    }
    running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(i.id.clone());
    i.taken = true;
    let Ok(Some(rev)) = put_if(store, &k, rev, &i).await else {
        running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&i.id);
        return;
    };
    let (s, store, running) = (s.clone(), store.clone(), running.clone());
    tokio::spawn(async move {
        let caller = Caller {
            account: i.account.clone(),
            admin: i.admin,
        };
        let out = run(&s, &caller, i.op.clone(), me_of(&s)).await;
        i.done = Some(out.map_err(|e| Failure {
            status: e.status().as_u16(),
            code: e.code().to_string(),
            message: e.to_string(),
        }));
        if let Err(e) = put_if(&store, &key(&i.id), rev, &i).await {
            tracing::warn!(error = %e, intent = %i.id, "cluster intents: writing an outcome");
        }
        running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&i.id);
    });
}

fn me_of(s: &Service) -> String {
    s.records.local_node().unwrap_or_default()
}

/// Writes `i` at `k` if it is still at `rev`; the new revision, or None when it changed (or
/// went: the requester gave up).
async fn put_if(
    store: &hutch_store_etcd::EtcdStore,
    k: &str,
    rev: u64,
    i: &Intent,
) -> Result<Option<u64>, StoreError> {
    let out = store
        .txn(
            Txn::new()
                .when(Compare::ModRevision(k.to_string(), rev))
                .put_json(k.to_string(), i)?,
        )
        .await?;
    Ok(out.revision())
}

/// Runs `op` here as `caller`.
async fn run(
    s: &Arc<Service>,
    caller: &Caller,
    op: Op,
    me: String,
) -> Result<Option<Vm>, ApiError> {
    if let Some(id) = op.vm_id() {
        // The requester saw the VM; this node's view may be a moment behind.
        let t = tokio::time::Instant::now() + Duration::from_secs(5);
        while s.records.vm_by_id(id).await?.is_none() && tokio::time::Instant::now() < t {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    match op {
        Op::Create { mut req } => {
            req.node = Some(me);
            s.create(caller, *req).await.map(Some)
        }
        Op::Start { name, .. } => s.start(caller, &name).await.map(Some),
        Op::Stop { name, .. } => s.stop(caller, &name).await.map(Some),
        Op::Pause { name, .. } => s.pause(caller, &name).await.map(Some),
        Op::Resume { name, .. } => s.resume(caller, &name).await.map(Some),
        Op::Delete { name, graceful, .. } => {
            if graceful {
                s.delete(caller, &name).await.map(|_| None)
            } else {
                s.discard(caller, &name).await.map(|_| None)
            }
        }
    }
}

/// Deletes this node's intents older than [`KEEP_SECS`] (their requester is gone).
async fn sweep(store: &hutch_store_etcd::EtcdStore, me: &str) {
    let Ok((list, _)) = store.list_json::<Intent>(INTENTS).await else {
        return;
    };
    let now = hutch_core::now();
    for v in list {
        let i = v.value;
        if i.node == me && now.saturating_sub(i.created_at) > KEEP_SECS {
            let _ = store
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(v.key.clone(), v.revision))
                        .delete(v.key),
                )
                .await;
        }
    }
}

/// The error a target answered, as this node's.
fn failure_error(f: Failure) -> ApiError {
    ApiError::Remote {
        status: f.status,
        code: f.code,
        message: f.message,
    }
}
