//! envd's `process.Process` service over hutch's exec. A process started here belongs to the
//! sandbox, not to the request: hutchd keeps its exec stream in a pump task, so the process
//! runs on when the client disconnects (E2B's background commands), and later requests find
//! it by pid or tag (Connect, SendInput, SendSignal, ...). The table lives in hutchd's memory:
//! a hutchd restart ends the streams (and so the processes).

use super::connect::{self, Code, Envelope, RpcError, StreamTx};
use super::envd::Ctx;
use crate::agent::{ExecEvent, ExecHandle, ExecStream};
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::StreamExt;
use hutch_core::api::ExecVm;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most processes tracked per sandbox, and clients following one process at once.
const MAX_PROCS: usize = 1024;
const MAX_FOLLOWERS: usize = 16;
/// A follower that does not take an event for this long is dropped (its stream ends), so one
/// stalled client cannot hold a process's output for every other.
const FOLLOWER_STALL: Duration = Duration::from_secs(10);
/// Events queued per follower.
const FOLLOWER_QUEUE: usize = 64;

#[derive(Clone)]
enum Ev {
    Data(&'static str, Bytes),
    End(serde_json::Value),
}

/// One process started through envd.
struct Proc {
    pid: u32,
    tag: Option<String>,
    config: serde_json::Value,
    pty: bool,
    handle: ExecHandle,
    followers: Mutex<Vec<tokio::sync::mpsc::Sender<Ev>>>,
}

impl Proc {
    fn follow(&self) -> Result<tokio::sync::mpsc::Receiver<Ev>, RpcError> {
        let (tx, rx) = tokio::sync::mpsc::channel(FOLLOWER_QUEUE);
        let mut f = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        f.retain(|t| !t.is_closed());
        if f.len() >= MAX_FOLLOWERS {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("process {} has {MAX_FOLLOWERS} clients already", self.pid),
            ));
        }
        f.push(tx);
        Ok(rx)
    }

    async fn publish(&self, ev: Ev) {
        let followers: Vec<_> = self
            .followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut gone = Vec::new();
        for (i, tx) in followers.iter().enumerate() {
            match tokio::time::timeout(FOLLOWER_STALL, tx.send(ev.clone())).await {
                Ok(Ok(())) => {}
                _ => gone.push(i),
            }
        }
        if !gone.is_empty() {
            let mut f = self.followers.lock().unwrap_or_else(|e| e.into_inner());
            f.retain(|t| !gone.iter().any(|&i| t.same_channel(&followers[i])));
        }
    }
}

/// The processes of every sandbox, by VM id and pid.
#[derive(Default)]
pub struct Table {
    by_vm: Mutex<HashMap<String, HashMap<u32, Arc<Proc>>>>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u32, Arc<Proc>>>> {
        self.by_vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(&self, vm: &str, sel: &Selector) -> Result<Arc<Proc>, RpcError> {
        let all = self.lock();
        let procs = all.get(vm);
        let found = match (sel.pid, &sel.tag) {
            (Some(pid), _) => procs.and_then(|p| p.get(&pid)),
            (None, Some(tag)) => {
                procs.and_then(|p| p.values().find(|x| x.tag.as_ref() == Some(tag)))
            }
            (None, None) => return Err(RpcError::invalid("process selector needs a pid or a tag")),
        };
        found.cloned().ok_or_else(|| {
            RpcError::new(
                Code::NotFound,
                match (sel.pid, &sel.tag) {
                    (Some(pid), _) => format!("process with pid {pid} not found"),
                    (_, tag) => format!(
                        "process with tag {} not found",
                        tag.as_deref().unwrap_or("")
                    ),
                },
            )
        })
    }

    fn remove(&self, vm: &str, pid: u32) {
        let mut all = self.lock();
        if let Some(p) = all.get_mut(vm) {
            p.remove(&pid);
            if p.is_empty() {
                all.remove(vm);
            }
        }
    }
}

#[derive(Debug, Deserialize, Default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct Config {
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct Size {
    #[serde(default)]
    cols: u32,
    #[serde(default)]
    rows: u32,
}

#[derive(Debug, Deserialize, Default)]
struct Pty {
    size: Option<Size>,
}

#[derive(Debug, Deserialize, Default)]
struct StartRequest {
    process: Option<Config>,
    pty: Option<Pty>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
struct Input {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct SelectorOnly {
    process: Option<Selector>,
}

#[derive(Debug, Deserialize, Default)]
struct SendInput {
    process: Option<Selector>,
    input: Option<Input>,
}

#[derive(Debug, Deserialize, Default)]
struct SendSignal {
    process: Option<Selector>,
    signal: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, Default)]
struct Update {
    process: Option<Selector>,
    pty: Option<Pty>,
}

#[derive(Debug, Deserialize, Default)]
struct StreamInputEvent {
    start: Option<SelectorOnly>,
    data: Option<DataOnly>,
    keepalive: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, Default)]
struct DataOnly {
    input: Option<Input>,
}

/// Dispatches one call of the service.
pub async fn call(c: Ctx, method: &str, req: Request) -> Result<Response, RpcError> {
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    match method {
        "Start" => start(c, h, connect::parse(&connect::read_single(body).await?)?).await,
        "Connect" => {
            let r: SelectorOnly = connect::parse(&connect::read_single(body).await?)?;
            let p =
                c.e.procs
                    .find(&c.rec.vm_id, &r.process.unwrap_or_default())?;
            let rx = p.follow()?;
            let (tx, resp) = connect::stream_response();
            tokio::spawn(forward(tx, p.pid, rx, keepalive(h), None));
            Ok(resp)
        }
        "StreamInput" => stream_input(c, body).await,
        _ => {
            let body = connect::read_unary(body).await?;
            unary(c, method, &body).await.map(connect::unary_ok)
        }
    }
}

async fn unary(c: Ctx, method: &str, body: &[u8]) -> Result<serde_json::Value, RpcError> {
    let vm = c.rec.vm_id.clone();
    let procs = &c.e.procs;
    match method {
        "List" => {
            let _: serde_json::Map<String, serde_json::Value> = connect::parse(body)?;
            let all = procs.lock();
            let list: Vec<_> = all
                .get(&vm)
                .map(|p| {
                    p.values()
                        .map(
                            |x| serde_json::json!({"config": x.config, "pid": x.pid, "tag": x.tag}),
                        )
                        .collect()
                })
                .unwrap_or_default();
            Ok(serde_json::json!({ "processes": list }))
        }
        "SendInput" => {
            let r: SendInput = connect::parse(body)?;
            let p = procs.find(&vm, &r.process.unwrap_or_default())?;
            send_input(&p, &r.input.unwrap_or_default()).await?;
            Ok(serde_json::json!({}))
        }
        "SendSignal" => {
            let r: SendSignal = connect::parse(body)?;
            let p = procs.find(&vm, &r.process.unwrap_or_default())?;
            let sig = match r.signal.as_ref() {
                Some(serde_json::Value::String(s)) if s == "SIGNAL_SIGKILL" => 9,
                Some(serde_json::Value::String(s)) if s == "SIGNAL_SIGTERM" => 15,
                Some(serde_json::Value::Number(n)) if matches!(n.as_u64(), Some(9 | 15)) => {
                    n.as_u64().unwrap_or(9) as i32
                }
                other => {
                    return Err(RpcError::invalid(format!(
                        "signal {other:?}: SIGNAL_SIGKILL or SIGNAL_SIGTERM"
                    )));
                }
            };
            p.handle.signal(sig).map_err(gone)?;
            Ok(serde_json::json!({}))
        }
        "CloseStdin" => {
            let r: SelectorOnly = connect::parse(body)?;
            let p = procs.find(&vm, &r.process.unwrap_or_default())?;
            if p.pty {
                return Err(RpcError::new(
                    Code::FailedPrecondition,
                    "a PTY process has no stdin to close: send Ctrl+D",
                ));
            }
            p.handle.eof().await.map_err(gone)?;
            Ok(serde_json::json!({}))
        }
        "Update" => {
            let r: Update = connect::parse(body)?;
            let p = procs.find(&vm, &r.process.unwrap_or_default())?;
            if let Some(size) = r.pty.and_then(|p| p.size) {
                p.handle.resize(tty(&size)?).map_err(gone)?;
            }
            Ok(serde_json::json!({}))
        }
        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("process.Process has no method {other}"),
        )),
    }
}

fn gone(e: crate::agent::AgentError) -> RpcError {
    RpcError::new(Code::NotFound, format!("the process is gone: {e}"))
}

fn tty(s: &Size) -> Result<hutch_proto::TtySize, RpcError> {
    if s.rows == 0 || s.cols == 0 || s.rows > 1000 || s.cols > 1000 {
        return Err(RpcError::invalid(
            "PTY size must be 1 to 1000 rows and columns",
        ));
    }
    Ok(hutch_proto::TtySize {
        rows: s.rows as u16,
        cols: s.cols as u16,
    })
}

async fn send_input(p: &Proc, input: &Input) -> Result<(), RpcError> {
    let data = match (&input.stdin, &input.pty) {
        (Some(s), None) | (None, Some(s)) => connect::decode_bytes(s)?,
        _ => return Err(RpcError::invalid("input needs stdin or pty bytes")),
    };
    p.handle.stdin(&data).await.map_err(|e| {
        RpcError::new(
            Code::FailedPrecondition,
            format!("process {} takes no input: {e}", p.pid),
        )
    })
}

/// The keepalive interval the client asked for (`Keepalive-Ping-Interval`, seconds).
pub(super) fn keepalive(h: &HeaderMap) -> Duration {
    let secs = h
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(50);
    Duration::from_secs(secs.clamp(1, 3600))
}

async fn start(c: Ctx, h: &HeaderMap, r: StartRequest) -> Result<Response, RpcError> {
    let cfg = r
        .process
        .ok_or_else(|| RpcError::invalid("StartRequest needs a process"))?;
    if cfg.cmd.is_empty() || cfg.cmd.contains('\0') || cfg.args.iter().any(|a| a.contains('\0')) {
        return Err(RpcError::invalid("process needs a cmd, without NUL bytes"));
    }
    if cfg.args.len() > 4096 || cfg.args.iter().map(String::len).sum::<usize>() > 1 << 20 {
        return Err(RpcError::invalid(
            "process arguments are over 4096 or 1 MiB",
        ));
    }
    super::model::check_envs(&cfg.envs).map_err(RpcError::invalid)?;
    if r.tag.as_ref().is_some_and(|t| t.len() > 256) {
        return Err(RpcError::invalid("tag is over 256 bytes"));
    }
    let deadline = connect::timeout(h)?;
    let acct = c.account(h).await?;
    let cwd = super::users::absolute(cfg.cwd.as_deref().unwrap_or(&acct.home), &acct.home)?;
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("HOME".into(), acct.home.clone());
    env.insert("USER".into(), acct.name.clone());
    env.insert("LOGNAME".into(), acct.name.clone());
    env.extend(c.rec.env_vars.clone());
    env.extend(cfg.envs.clone());
    let size = r.pty.as_ref().map(|p| match &p.size {
        Some(s) => tty(s),
        None => Ok(hutch_proto::TtySize { rows: 24, cols: 80 }),
    });
    let size = size.transpose()?;
    {
        let all = c.e.procs.lock();
        if all.get(&c.rec.vm_id).is_some_and(|p| p.len() >= MAX_PROCS) {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("the sandbox runs {MAX_PROCS} processes started through envd already"),
            ));
        }
    }
    let mut argv = vec![cfg.cmd.clone()];
    argv.extend(cfg.args.iter().cloned());
    let stream =
        c.e.m
            .exec(
                &c.caller,
                c.vm(),
                ExecVm {
                    argv,
                    env,
                    cwd: Some(cwd),
                    // Numeric: resolves in a guest whose /etc/passwd lacks the account.
                    user: Some(format!("{}:{}", acct.uid, acct.gid)),
                    stdin: None,
                    // envd keeps stdin open unless asked not to (the SDKs say so since envd 0.3.0).
                    stream_stdin: r.stdin.unwrap_or(true) || size.is_some(),
                    // envd kills the process when the client's deadline passes.
                    timeout_secs: deadline.map(|d| d.as_millis().div_ceil(1000).max(1) as u64),
                    tty: size.map(|s| (s.rows, s.cols)),
                },
            )
            .await?;
    let (pid, stream) = started(stream).await?;
    let config = serde_json::json!({
        "cmd": cfg.cmd, "args": cfg.args, "envs": cfg.envs, "cwd": cfg.cwd,
    });
    let p = Arc::new(Proc {
        pid,
        tag: r.tag,
        config,
        pty: size.is_some(),
        handle: stream.handle(),
        followers: Mutex::new(Vec::new()),
    });
    let rx = p.follow()?;
    c.e.procs
        .lock()
        .entry(c.rec.vm_id.clone())
        .or_default()
        .insert(pid, p.clone());
    tokio::spawn(pump(c.e.clone(), c.rec.vm_id.clone(), p, stream));
    let (tx, resp) = connect::stream_response();
    let until = deadline.map(|d| Instant::now() + d);
    tokio::spawn(forward(tx, pid, rx, keepalive(h), until));
    Ok(resp)
}

/// Waits for the process to run: its pid, or why it did not start.
async fn started(mut s: ExecStream) -> Result<(u32, ExecStream), RpcError> {
    match s.next().await {
        Ok(Some(ExecEvent::Started { pid })) => Ok((pid.max(0) as u32, s)),
        Ok(other) => Err(RpcError::new(
            Code::Internal,
            format!("the process did not start: {other:?}"),
        )),
        Err(e) => Err(RpcError::new(
            Code::InvalidArgument,
            format!("the process did not start: {e}"),
        )),
    }
}

/// Carries a process's exec stream to its followers, then drops it from the table.
async fn pump(e: Arc<super::E2b>, vm: String, p: Arc<Proc>, mut s: ExecStream) {
    let key = if p.pty { "pty" } else { "stdout" };
    let end = loop {
        match s.next().await {
            Ok(Some(ExecEvent::Stdout(b))) => p.publish(Ev::Data(key, b)).await,
            Ok(Some(ExecEvent::Stderr(b))) => p.publish(Ev::Data("stderr", b)).await,
            Ok(Some(ExecEvent::Started { .. })) => {}
            Ok(Some(ExecEvent::Exited { code, signal, .. })) => {
                break end_event(code, signal, None)
            }
            Ok(None) => break end_event(None, None, Some("the process stream ended".into())),
            Err(err) => break end_event(None, None, Some(err.to_string())),
        }
    };
    e.procs.remove(&vm, p.pid);
    p.publish(Ev::End(end)).await;
}

/// envd's end event: Go's exec status (`exit status 1`, `signal: killed`).
fn end_event(code: Option<i32>, signal: Option<i32>, error: Option<String>) -> serde_json::Value {
    match (code, signal) {
        (Some(c), _) => {
            let status = format!("exit status {c}");
            serde_json::json!({"exitCode": c, "exited": true, "status": status,
                "error": (c != 0).then_some(status.clone())})
        }
        (None, Some(s)) => {
            let status = format!("signal: {}", signal_name(s));
            serde_json::json!({"exitCode": -1, "exited": false, "status": status, "error": status})
        }
        (None, None) => {
            let msg = error.unwrap_or_else(|| "the process ended".into());
            serde_json::json!({"exitCode": -1, "exited": false, "status": "unknown", "error": msg})
        }
    }
}

fn signal_name(s: i32) -> String {
    match s {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        9 => "killed".into(),
        13 => "broken pipe".into(),
        15 => "terminated".into(),
        n => format!("signal {n}"),
    }
}

/// Sends a follower's events as a stream: start, data, end; keepalives while quiet; the
/// client's deadline (`until`) ends it with deadline_exceeded.
async fn forward(
    tx: StreamTx,
    pid: u32,
    mut rx: tokio::sync::mpsc::Receiver<Ev>,
    every: Duration,
    until: Option<Instant>,
) {
    let event = |e: serde_json::Value| serde_json::json!({ "event": e });
    if !tx
        .send(event(serde_json::json!({"start": {"pid": pid}})))
        .await
    {
        return;
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let late = async {
        match until {
            Some(t) => tokio::time::sleep_until(t.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(late);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Ev::Data(k, b)) => {
                    let data = serde_json::json!({"data": {k: connect::encode_bytes(&b)}});
                    if !tx.send(event(data)).await {
                        return;
                    }
                    tick.reset();
                }
                Some(Ev::End(end)) => {
                    if until.is_some_and(|t| Instant::now() >= t) {
                        break;
                    }
                    if tx.send(event(serde_json::json!({"end": end}))).await {
                        tx.finish(None).await;
                    }
                    return;
                }
                None => {
                    tx.finish(Some(RpcError::new(
                        Code::Unavailable,
                        "this client fell behind the process's output and was dropped",
                    )))
                    .await;
                    return;
                }
            },
            _ = tick.tick() => {
                if !tx.send(event(serde_json::json!({"keepalive": {}}))).await {
                    return;
                }
            }
            _ = &mut late => break,
            _ = tx.closed() => return,
        }
    }
    tx.finish(Some(RpcError::new(
        Code::DeadlineExceeded,
        "the request's timeout passed; the process was killed",
    )))
    .await;
}

/// `StreamInput`: a client stream of input for one process (a start naming it, then data and
/// keepalives), answered once the client ends it.
async fn stream_input(c: Ctx, body: axum::body::Body) -> Result<Response, RpcError> {
    let mut env = connect::Envelopes::default();
    let mut data = body.into_data_stream();
    let mut target: Option<Arc<Proc>> = None;
    let mut result: Result<(), RpcError> = Ok(());
    'read: while let Some(chunk) = data.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                result = Err(RpcError::new(Code::Canceled, e.to_string()));
                break;
            }
        };
        env.push(&chunk);
        loop {
            let msg = match env.next() {
                Ok(Some(Envelope::Message(m))) => m,
                Ok(Some(Envelope::End(_))) => break 'read,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break 'read;
                }
            };
            let ev: StreamInputEvent = match connect::parse(&msg) {
                Ok(ev) => ev,
                Err(e) => {
                    result = Err(e);
                    break 'read;
                }
            };
            let step = match (&target, ev) {
                (None, StreamInputEvent { start: Some(s), .. }) => {
                    c.e.procs
                        .find(&c.rec.vm_id, &s.process.unwrap_or_default())
                        .map(|p| target = Some(p))
                }
                (Some(p), StreamInputEvent { data: Some(d), .. }) => {
                    send_input(p, &d.input.unwrap_or_default()).await
                }
                (
                    _,
                    StreamInputEvent {
                        keepalive: Some(_), ..
                    },
                ) => Ok(()),
                _ => Err(RpcError::invalid(
                    "StreamInput starts with a start event naming the process, then data",
                )),
            };
            if let Err(e) = step {
                result = Err(e);
                break 'read;
            }
        }
    }
    let (tx, resp) = connect::stream_response();
    tokio::spawn(async move {
        match result {
            Ok(()) => {
                if tx.send(serde_json::json!({})).await {
                    tx.finish(None).await;
                }
            }
            Err(e) => tx.finish(Some(e)).await,
        }
    });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_read_like_envds() {
        let e = end_event(Some(0), None, None);
        assert_eq!(e["exitCode"], 0);
        assert_eq!(e["exited"], true);
        assert!(e["error"].is_null());
        let e = end_event(Some(3), None, None);
        assert_eq!(e["status"], "exit status 3");
        assert_eq!(e["error"], "exit status 3");
        let e = end_event(None, Some(9), None);
        assert_eq!(e["status"], "signal: killed");
        assert_eq!(e["exitCode"], -1);
    }

    #[test]
    fn requests_parse_in_protojson() {
        let r: StartRequest = connect::parse(
            br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"1"},"cwd":"/tmp"},"stdin":false,"tag":"t"}"#,
        )
        .unwrap();
        let cfg = r.process.unwrap();
        assert_eq!(cfg.args.len(), 3);
        assert_eq!(r.stdin, Some(false));
        let s: SendSignal =
            connect::parse(br#"{"process":{"pid":42},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(s.process.unwrap().pid, Some(42));
        let i: StreamInputEvent =
            connect::parse(br#"{"data":{"input":{"stdin":"aGk="}}}"#).unwrap();
        assert_eq!(
            i.data.unwrap().input.unwrap().stdin.as_deref(),
            Some("aGk=")
        );
    }
}
