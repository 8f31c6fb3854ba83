//! envd's directory watches over the guest agent's inotify watch: WatchDir (a server stream)
//! and the polled watchers (CreateWatcher, GetWatcherEvents, RemoveWatcher), which the sync
//! Python SDK uses. A polled watcher keeps at most [`MAX_QUEUED`] events between polls (the
//! oldest go first) and lives until it is removed or its sandbox goes away.

use super::connect::{self, Code, RpcError};
use super::envd::Ctx;
use super::users::absolute;
use crate::agent::{AgentError, WatchStream};
use axum::http::HeaderMap;
use axum::response::Response;
use hutch_proto::{ErrorCode, FsEvent, FsEventKind};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Events a polled watcher holds between polls.
pub const MAX_QUEUED: usize = 10_000;
/// Polled watchers per sandbox, and on the whole host.
pub const MAX_WATCHERS: usize = 64;
pub const MAX_ALL_WATCHERS: usize = 4096;
/// How long the agent has to set a watch up.
const SETUP: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WatchReq {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
    #[serde(default)]
    include_entry: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WatcherId {
    #[serde(default)]
    watcher_id: String,
}

struct Watcher {
    vm_id: String,
    events: Arc<Mutex<VecDeque<FsEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Dropping the task's watch stream cancels the watch in the guest.
        self.task.abort();
    }
}

/// The polled watchers of every sandbox, by id.
#[derive(Default)]
pub struct Watchers {
    all: Mutex<HashMap<String, Watcher>>,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watcher>> {
        self.all.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn kind_name(k: FsEventKind) -> &'static str {
    match k {
        FsEventKind::Create => "EVENT_TYPE_CREATE",
        FsEventKind::Write => "EVENT_TYPE_WRITE",
        FsEventKind::Remove => "EVENT_TYPE_REMOVE",
        FsEventKind::Rename => "EVENT_TYPE_RENAME",
        FsEventKind::Chmod => "EVENT_TYPE_CHMOD",
        FsEventKind::Unknown => "EVENT_TYPE_UNSPECIFIED",
    }
}

fn event_json(e: &FsEvent) -> serde_json::Value {
    serde_json::json!({"name": e.name, "type": kind_name(e.kind)})
}

fn watch_err(path: &str, e: AgentError) -> RpcError {
    match e.code() {
        Some(ErrorCode::NotFound) => RpcError::new(Code::NotFound, format!("{path}: {e}")),
        Some(ErrorCode::NotADirectory) => RpcError::invalid(format!("{path} is not a directory")),
        Some(ErrorCode::TooLarge) | Some(ErrorCode::Busy) => {
            RpcError::new(Code::ResourceExhausted, format!("{path}: {e}"))
        }
        _ => super::fs::agent_err(path, e),
    }
}

/// Sets a watch up for a request's `{path, recursive}`.
async fn start(c: &Ctx, h: &HeaderMap, r: &WatchReq) -> Result<WatchStream, RpcError> {
    if r.include_entry {
        return Err(RpcError::invalid(
            "includeEntry needs envd 0.6.3; hutch reports 0.5.7",
        ));
    }
    let acct = c.account(h).await?;
    let path = absolute(&r.path, &acct.home)?;
    let agent = super::fs::agent_of(c, &acct).await?;
    let w = tokio::time::timeout(SETUP, agent.watch(&path, r.recursive))
        .await
        .map_err(|_| RpcError::new(Code::Unavailable, "the guest did not set the watch up"))?;
    w.map_err(|e| watch_err(&path, e))
}

/// `WatchDir`: a start event, then the directory's events, keepalives while it is quiet,
/// until the client goes or its deadline passes.
pub async fn watch_dir(c: Ctx, h: &HeaderMap, msg: &[u8]) -> Result<Response, RpcError> {
    let r: WatchReq = connect::parse(msg)?;
    let deadline = connect::timeout(h)?.map(|d| Instant::now() + d);
    let every = super::process::keepalive(h);
    let mut ws = start(&c, h, &r).await?;
    let (tx, resp) = connect::stream_response();
    tokio::spawn(async move {
        if !tx.send(serde_json::json!({"start": {}})).await {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let late = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(late);
        let end = loop {
            tokio::select! {
                ev = ws.next() => match ev {
                    Ok(Some(e)) => {
                        if !tx.send(serde_json::json!({"filesystem": event_json(&e)})).await {
                            return;
                        }
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(RpcError::new(Code::Unavailable, format!("the watch ended: {e}"))),
                },
                _ = tick.tick() => {
                    if !tx.send(serde_json::json!({"keepalive": {}})).await {
                        return;
                    }
                }
                _ = &mut late => break Some(RpcError::new(Code::DeadlineExceeded, "the watch's timeout passed")),
                _ = tx.closed() => return,
            }
        };
        tx.finish(end).await;
    });
    Ok(resp)
}

/// CreateWatcher, GetWatcherEvents, RemoveWatcher.
pub async fn watcher_call(
    c: Ctx,
    h: &HeaderMap,
    method: &str,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let watchers = &c.e.watchers;
    match method {
        "CreateWatcher" => {
            let r: WatchReq = connect::parse(body)?;
            {
                let mut all = watchers.lock();
                // Watchers that ended with nothing left to read (their sandbox or directory is
                // gone) are forgotten first.
                all.retain(|_, w| {
                    !(w.task.is_finished()
                        && w.events
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .is_empty())
                });
                let mine = all.values().filter(|w| w.vm_id == c.rec.vm_id).count();
                if mine >= MAX_WATCHERS || all.len() >= MAX_ALL_WATCHERS {
                    return Err(RpcError::new(
                        Code::ResourceExhausted,
                        format!("a sandbox has at most {MAX_WATCHERS} watchers"),
                    ));
                }
            }
            let mut ws = start(&c, h, &r).await?;
            let events = Arc::new(Mutex::new(VecDeque::new()));
            let q = events.clone();
            let task = tokio::spawn(async move {
                while let Ok(Some(e)) = ws.next().await {
                    let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
                    if q.len() >= MAX_QUEUED {
                        q.pop_front();
                    }
                    q.push_back(e);
                }
            });
            let id = hex::encode(rand::random::<[u8; 12]>());
            watchers.lock().insert(
                id.clone(),
                Watcher {
                    vm_id: c.rec.vm_id.clone(),
                    events,
                    task,
                },
            );
            Ok(serde_json::json!({ "watcherId": id }))
        }
        "GetWatcherEvents" => {
            let r: WatcherId = connect::parse(body)?;
            let all = watchers.lock();
            let w = all
                .get(&r.watcher_id)
                .filter(|w| w.vm_id == c.rec.vm_id)
                .ok_or_else(|| not_found(&r.watcher_id))?;
            let taken: Vec<_> = w
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect();
            let ended = w.task.is_finished();
            drop(all);
            if taken.is_empty() && ended {
                watchers.lock().remove(&r.watcher_id);
                return Err(RpcError::new(
                    Code::NotFound,
                    format!(
                        "watcher {} ended (its directory or sandbox is gone)",
                        r.watcher_id
                    ),
                ));
            }
            let events: Vec<_> = taken.iter().map(event_json).collect();
            Ok(serde_json::json!({ "events": events }))
        }
        "RemoveWatcher" => {
            let r: WatcherId = connect::parse(body)?;
            let mut all = watchers.lock();
            match all.get(&r.watcher_id) {
                Some(w) if w.vm_id == c.rec.vm_id => {
                    all.remove(&r.watcher_id);
                    Ok(serde_json::json!({}))
                }
                _ => Err(not_found(&r.watcher_id)),
            }
        }
        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("no method {other}"),
        )),
    }
}

fn not_found(id: &str) -> RpcError {
    RpcError::new(Code::NotFound, format!("watcher {id} not found"))
}
