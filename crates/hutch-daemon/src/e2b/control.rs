//! E2B's control plane: sandboxes over hutch VMs. Errors are E2B's (`{"code", "message"}` with
//! E2B's status codes); another account's sandbox is not found.

use super::model::{self, NewSandbox, SandboxRecord};
use super::{api_error, error, owner_caller, E2b, Refusal, SANDBOXES};
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use hutch_core::api::CreateVm;
use hutch_core::timers::OnExpire;
use hutch_core::{Vm, VmState};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Most sandboxes one list answers with.
const MAX_PAGE: usize = 1000;

pub fn router(e: Arc<E2b>) -> axum::Router {
    axum::Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes/{id}", get(info).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/logs", get(logs_v1))
        .route("/v2/sandboxes/{id}/logs", get(logs_v2))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(super::snaps::create))
        .route("/snapshots", get(super::snaps::list))
        .route(
            "/templates/{id}",
            axum::routing::delete(super::snaps::delete),
        )
        .route("/health", get(|| async { StatusCode::OK }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "hutch does not serve this E2B route") })
        .with_state(e)
}

/// The request's caller, or E2B's 401.
pub(super) async fn authed(e: &E2b, h: &HeaderMap) -> Result<Caller, Refusal> {
    e.caller(h).await.ok_or_else(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "Invalid API key: X-API-Key must be a hutch token (DATA_DIR/api-token or an account's JWT)",
        )
    })
}

/// A JSON body, or E2B's 400.
/// Largest control-plane request body.
const MAX_BODY: usize = 1 << 20;

/// A JSON body of at most [`MAX_BODY`] bytes (413 beyond), or E2B's 400; an empty one is the
/// default.
pub(super) async fn body<T: serde::de::DeserializeOwned + Default>(
    b: axum::body::Body,
) -> Result<T, Refusal> {
    let b = axum::body::to_bytes(b, MAX_BODY).await.map_err(|_| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request bodies are at most {MAX_BODY} bytes"),
        )
    })?;
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&b)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("malformed body: {e}")))
}

pub(super) type Res = Result<Response, Refusal>;

impl E2b {
    /// A sandbox of `caller`'s and its VM (a record whose VM is gone is dropped: not found).
    pub(super) async fn resolve(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(SandboxRecord, Vm), ApiError> {
        let rec = self.sandbox_for(caller, id).await?;
        match self.m.vm_for(&owner_caller(&rec), &rec.id).await {
            Ok(vm) if vm.id == rec.vm_id && vm.state != VmState::Deleting => Ok((rec, vm)),
            Ok(vm) if vm.id == rec.vm_id => Err(ApiError::vm(id)),
            _ => {
                let _ = self.m.records.delete(SANDBOXES, id).await;
                Err(ApiError::vm(id))
            }
        }
    }

    fn answer(&self, rec: &SandboxRecord) -> serde_json::Value {
        model::sandbox_json(
            rec,
            &self.access_token(&rec.id, &rec.vm_id),
            self.domain.as_deref(),
        )
    }
}

async fn create(State(e): State<Arc<E2b>>, h: HeaderMap, b: axum::body::Body) -> Res {
    let caller = authed(&e, &h).await?;
    let n: NewSandbox = body(b).await?;
    model::check_new(&n).map_err(|m| error(StatusCode::BAD_REQUEST, &m))?;
    // templateID: a hutch template of that name, else an image, else a snapshot.
    let mut req = CreateVm::default();
    let tid = &n.template_id;
    let found = |r: Result<(), ApiError>| match r {
        Ok(()) => Ok(true),
        Err(ApiError::NotFound { .. }) | Err(ApiError::Invalid(_)) => Ok(false),
        Err(other) => Err(api_error(other)),
    };
    if found(e.m.template_for(&caller, tid).await.map(|_| ()))? {
        req.template = Some(tid.clone());
    } else if found(e.m.image_for(&caller, tid).await.map(|_| ()))? {
        req.image = tid.clone();
    } else if found(e.m.snapshot_for(&caller, tid).await.map(|_| ()))? {
        req.snapshot = Some(tid.clone());
    } else {
        return Err(error(
            StatusCode::NOT_FOUND,
            &format!(
                "template '{tid}' not found: no hutch template, image or snapshot of that name"
            ),
        ));
    }
    let id = model::new_id();
    let auto_pause = n.auto_pause.unwrap_or(false);
    let auto_resume = n.auto_resume.as_ref().is_some_and(|a| a.enabled);
    req.name = Some(id.clone());
    req.ttl = Some(format!("{}s", n.timeout.unwrap_or(model::DEFAULT_TIMEOUT)));
    req.on_expire = Some(if auto_pause {
        OnExpire::Pause
    } else {
        OnExpire::Delete
    });
    req.auto_resume = auto_resume;
    if n.allow_internet_access == Some(false) {
        req.net = Some(hutch_core::net::NetMode::Internal);
    }
    if let Some(net) = &n.network {
        req.allow_out = net.allow_out.clone();
        req.deny_out = net.deny_out.clone();
    }
    // The record goes first: a VM never exists without it (a crash in between leaves a record
    // whose VM is missing, which every read drops).
    let mut rec = SandboxRecord {
        id: id.clone(),
        vm_id: String::new(),
        owner: caller.owner(),
        template_id: n.template_id.clone(),
        metadata: n.metadata.clone().unwrap_or_default(),
        env_vars: n.env_vars.clone().unwrap_or_default(),
        started_at: hutch_core::now(),
        allow_internet_access: n.allow_internet_access,
        auto_pause,
        auto_resume,
        allow_public_traffic: n.network.as_ref().and_then(|x| x.allow_public_traffic),
    };
    if !e
        .m
        .records
        .create(SANDBOXES, &id, &rec)
        .await
        .map_err(|x| api_error(x.into()))?
    {
        return Err(error(StatusCode::CONFLICT, "sandbox id collision; retry"));
    }
    // In a cluster, envd is served by the node that runs the sandbox's VM: made here (a
    // template's or snapshot's VMs go where their files are).
    if req.snapshot.is_none() && req.template.is_none() {
        req.node = e.m.records.local_node();
    }
    let vm = match e.m.create(&caller, req).await {
        Ok(vm) => vm,
        Err(err) => {
            let _ = e.m.records.delete(SANDBOXES, &id).await;
            return Err(api_error(err));
        }
    };
    rec.vm_id = vm.id.clone();
    if let Err(err) = e.m.records.put(SANDBOXES, &id, &rec).await {
        let _ = e.m.delete(&caller, &id).await;
        let _ = e.m.records.delete(SANDBOXES, &id).await;
        return Err(api_error(err.into()));
    }
    e.routes.set(&id, super::Route::of(&rec));
    tracing::info!(sandbox = %id, template = %rec.template_id, "e2b sandbox created");
    Ok((StatusCode::CREATED, Json(e.answer(&rec))).into_response())
}

/// The caller's sandboxes with their VMs, oldest first.
async fn mine(e: &E2b, caller: &Caller) -> Result<Vec<(SandboxRecord, Vm)>, ApiError> {
    let recs: Vec<SandboxRecord> = e.m.records.list(SANDBOXES).await?;
    let mut out = Vec::new();
    for r in recs.into_iter().filter(|r| caller.sees(r.owner.as_deref())) {
        if r.vm_id.is_empty() {
            continue;
        }
        match e.m.records.vm_by_id(&r.vm_id).await? {
            Some(vm) if vm.state != VmState::Deleting => out.push((r, vm)),
            Some(_) => {}
            None => {
                let _ = e.m.records.delete(SANDBOXES, &r.id).await;
            }
        }
    }
    out.sort_by(|a, b| (a.0.started_at, &a.0.id).cmp(&(b.0.started_at, &b.0.id)));
    Ok(out)
}

fn matches(rec: &SandboxRecord, filter: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(k, v)| rec.metadata.get(k) == Some(v))
}

async fn list_v1(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Res {
    let caller = authed(&e, &h).await?;
    let filter = model::parse_metadata_filter(q.get("metadata").map_or("", |s| s))
        .map_err(|m| error(StatusCode::BAD_REQUEST, &m))?;
    let all = mine(&e, &caller).await.map_err(api_error)?;
    let out: Vec<_> = all
        .iter()
        .filter(|(r, vm)| matches(r, &filter) && model::state(vm) == "running")
        .map(|(r, vm)| model::listed_json(r, vm))
        .collect();
    Ok(Json(out).into_response())
}

async fn list_v2(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Res {
    let caller = authed(&e, &h).await?;
    let bad = |m: String| error(StatusCode::BAD_REQUEST, &m);
    let filter = model::parse_metadata_filter(q.get("metadata").map_or("", |s| s)).map_err(bad)?;
    let states: Vec<&str> = match q.get("state") {
        Some(s) => s.split(',').filter(|x| !x.is_empty()).collect(),
        None => vec!["running", "paused"],
    };
    if let Some(s) = states.iter().find(|s| !matches!(**s, "running" | "paused")) {
        return Err(bad(format!("state {s:?}: running or paused")));
    }
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| bad(format!("limit must be 1 to {MAX_PAGE}")))?,
        None => 100,
    };
    let desc = q.get("order").is_some_and(|o| o == "desc");
    let template = q.get("template");
    let mut all: Vec<_> = mine(&e, &caller)
        .await
        .map_err(api_error)?
        .into_iter()
        .filter(|(r, vm)| {
            matches(r, &filter)
                && states.contains(&model::state(vm))
                && template.is_none_or(|t| &r.template_id == t)
        })
        .collect();
    if desc {
        all.reverse();
    }
    // The next token is the id of the first sandbox of the next page.
    let start = match q.get("nextToken") {
        Some(t) => all
            .iter()
            .position(|(r, _)| &r.id == t)
            .ok_or_else(|| bad("nextToken is not from this listing".into()))?,
        None => 0,
    };
    let page: Vec<_> = all.iter().skip(start).take(limit).collect();
    let next = all.get(start + limit).map(|(r, _)| r.id.clone());
    let out: Vec<_> = page
        .iter()
        .map(|(r, vm)| model::listed_json(r, vm))
        .collect();
    let mut resp = Json(out).into_response();
    if let Some(n) = next.and_then(|n| n.parse().ok()) {
        resp.headers_mut().insert("x-next-token", n);
    }
    Ok(resp)
}

async fn info(State(e): State<Arc<E2b>>, h: HeaderMap, Path(id): Path<String>) -> Res {
    let caller = authed(&e, &h).await?;
    let (rec, vm) = e.resolve(&caller, &id).await.map_err(api_error)?;
    let token = e.access_token(&rec.id, &rec.vm_id);
    Ok(Json(model::detail_json(&rec, &vm, &token, e.domain.as_deref())).into_response())
}

async fn kill(State(e): State<Arc<E2b>>, h: HeaderMap, Path(id): Path<String>) -> Res {
    let caller = authed(&e, &h).await?;
    let (rec, _) = e.resolve(&caller, &id).await.map_err(api_error)?;
    // E2B's kill discards the sandbox: no graceful shutdown of a guest whose disk goes too.
    e.m.discard(&owner_caller(&rec), &rec.id)
        .await
        .map_err(api_error)?;
    let _ = e.m.records.delete(SANDBOXES, &rec.id).await;
    e.routes.remove(&rec.id);
    tracing::info!(sandbox = %id, "e2b sandbox killed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Sets the sandbox to time out `secs` from now.
async fn extend(e: &E2b, rec: &SandboxRecord, secs: u64) -> Result<(), Refusal> {
    model::check_timeout(secs).map_err(|m| error(StatusCode::BAD_REQUEST, &m))?;
    e.m.keepalive(
        &owner_caller(rec),
        &rec.id,
        hutch_core::api::Keepalive {
            duration: Some(format!("{secs}s")),
        },
    )
    .await
    .map_err(api_error)?;
    Ok(())
}

async fn set_timeout(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Path(id): Path<String>,
    b: axum::body::Body,
) -> Res {
    let caller = authed(&e, &h).await?;
    let t: model::TimeoutBody = body(b).await?;
    let (rec, _) = e.resolve(&caller, &id).await.map_err(api_error)?;
    let secs = t
        .timeout
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "timeout is required"))?;
    extend(&e, &rec, secs).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn refresh(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Path(id): Path<String>,
    b: axum::body::Body,
) -> Res {
    let caller = authed(&e, &h).await?;
    let r: model::RefreshBody = body(b).await?;
    let (rec, _) = e.resolve(&caller, &id).await.map_err(api_error)?;
    extend(&e, &rec, r.duration.unwrap_or(model::DEFAULT_TIMEOUT)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pause(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Path(id): Path<String>,
    b: axum::body::Body,
) -> Res {
    let caller = authed(&e, &h).await?;
    let p: model::MemoryBody = body(b).await?;
    no_filesystem_only(p.memory)?;
    let (rec, vm) = e.resolve(&caller, &id).await.map_err(api_error)?;
    if model::state(&vm) == "paused" {
        return Err(error(
            StatusCode::CONFLICT,
            &format!("sandbox {id} is already paused"),
        ));
    }
    e.m.pause(&owner_caller(&rec), &rec.id)
        .await
        .map_err(api_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `memory: false` (a filesystem-only pause or resume) is refused: hutch always keeps memory.
fn no_filesystem_only(memory: Option<bool>) -> Result<(), Refusal> {
    if memory == Some(false) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "memory: false (a filesystem-only pause or reboot on resume) is not supported: hutch keeps memory",
        ));
    }
    Ok(())
}

/// Resumes a paused sandbox (with a new timeout); 409 for a running one unless `connect`.
async fn wake(e: &E2b, caller: &Caller, id: &str, b: axum::body::Body, connect: bool) -> Res {
    let t: model::TimeoutBody = body(b).await?;
    no_filesystem_only(t.memory)?;
    let (rec, vm) = e.resolve(caller, id).await.map_err(api_error)?;
    let secs = t.timeout.unwrap_or(model::DEFAULT_TIMEOUT);
    model::check_timeout(secs).map_err(|m| error(StatusCode::BAD_REQUEST, &m))?;
    let paused = matches!(vm.state, VmState::Paused | VmState::Pausing);
    if !paused && !connect {
        return Err(error(
            StatusCode::CONFLICT,
            &format!("sandbox {id} is already running"),
        ));
    }
    if paused {
        e.m.resume(&owner_caller(&rec), &rec.id)
            .await
            .map_err(api_error)?;
    }
    extend(e, &rec, secs).await?;
    let status = if paused {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(e.answer(&rec))).into_response())
}

async fn resume(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Path(id): Path<String>,
    b: axum::body::Body,
) -> Res {
    let caller = authed(&e, &h).await?;
    wake(&e, &caller, &id, b, false).await
}

async fn connect(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Path(id): Path<String>,
    b: axum::body::Body,
) -> Res {
    let caller = authed(&e, &h).await?;
    wake(&e, &caller, &id, b, true).await
}

async fn metrics(State(e): State<Arc<E2b>>, h: HeaderMap, Path(id): Path<String>) -> Res {
    let caller = authed(&e, &h).await?;
    let (rec, vm) = e.resolve(&caller, &id).await.map_err(api_error)?;
    if vm.state != VmState::Running {
        return Ok(Json(Vec::<serde_json::Value>::new()).into_response());
    }
    let m = super::metrics::sample(&e.m, &owner_caller(&rec), &rec.id).await;
    let now = hutch_core::now();
    Ok(Json(vec![serde_json::json!({
        "timestamp": model::rfc3339(now),
        "timestampUnix": now,
        "cpuCount": vm.vcpus,
        "cpuUsedPct": m.cpu_pct,
        "memUsed": m.mem_used,
        "memTotal": m.mem_total,
        "memCache": m.mem_cache,
        "diskUsed": m.disk_used,
        "diskTotal": m.disk_total,
    })])
    .into_response())
}

/// The sandbox's console output, as E2B's logs.
async fn console_lines(e: &E2b, caller: &Caller, id: &str) -> Result<(u64, Vec<String>), Refusal> {
    let (rec, _) = e.resolve(caller, id).await.map_err(api_error)?;
    let text =
        e.m.console(&owner_caller(&rec), &rec.id, 1 << 20)
            .await
            .map_err(api_error)?;
    Ok((rec.started_at, text.lines().map(str::to_string).collect()))
}

async fn logs_v1(State(e): State<Arc<E2b>>, h: HeaderMap, Path(id): Path<String>) -> Res {
    let caller = authed(&e, &h).await?;
    let (at, lines) = console_lines(&e, &caller, &id).await?;
    let ts = model::rfc3339(at);
    let logs: Vec<_> = lines
        .iter()
        .map(|l| serde_json::json!({"timestamp": ts, "line": l}))
        .collect();
    let entries: Vec<_> = lines
        .iter()
        .map(|l| serde_json::json!({"timestamp": ts, "message": l, "level": "info", "fields": {}}))
        .collect();
    Ok(Json(serde_json::json!({"logs": logs, "logEntries": entries})).into_response())
}

async fn logs_v2(State(e): State<Arc<E2b>>, h: HeaderMap, Path(id): Path<String>) -> Res {
    let caller = authed(&e, &h).await?;
    let (at, lines) = console_lines(&e, &caller, &id).await?;
    let ts = model::rfc3339(at);
    let entries: Vec<_> = lines
        .iter()
        .map(|l| serde_json::json!({"timestamp": ts, "message": l, "level": "info", "fields": {}}))
        .collect();
    Ok(Json(serde_json::json!({"logs": entries})).into_response())
}

async fn fork(
    State(e): State<Arc<E2b>>,
    h: HeaderMap,
    Path(id): Path<String>,
    b: axum::body::Body,
) -> Res {
    let caller = authed(&e, &h).await?;
    let f: model::ForkBody = body(b).await?;
    let (rec, _) = e.resolve(&caller, &id).await.map_err(api_error)?;
    let secs = f.timeout.unwrap_or(15);
    model::check_timeout(secs).map_err(|m| error(StatusCode::BAD_REQUEST, &m))?;
    let owner = owner_caller(&rec);
    let prefix = model::new_id();
    let copies =
        e.m.fork(
            &owner,
            &rec.id,
            hutch_core::api::ForkVm {
                count: Some(f.count.unwrap_or(1)),
                name: Some(prefix),
            },
        )
        .await
        .map_err(api_error)?;
    let mut out = Vec::new();
    for vm in copies {
        // Each copy is a sandbox of its own, named by its VM's name.
        let copy = SandboxRecord {
            id: vm.name.clone(),
            vm_id: vm.id.clone(),
            started_at: hutch_core::now(),
            ..rec.clone()
        };
        match e.m.records.put(SANDBOXES, &copy.id, &copy).await {
            Ok(()) => {
                e.routes.set(&copy.id, super::Route::of(&copy));
                let _ = extend(&e, &copy, secs).await;
                out.push(serde_json::json!({"sandbox": e.answer(&copy)}));
            }
            Err(err) => {
                let _ = e.m.delete(&owner, &vm.name).await;
                let err = ApiError::from(err);
                out.push(serde_json::json!({"error": {"code": err.status().as_u16(), "message": err.to_string()}}));
            }
        }
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}
