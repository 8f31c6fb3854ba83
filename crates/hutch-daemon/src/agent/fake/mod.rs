//! [`FakeAgent`]: an in-memory [`Agent`] for unit tests of what sits above the agent client
//! (no VM, no socket). Built for tests and with the `fakes` feature.
//!
//! - Files: an in-memory tree (the `fs` submodule) starting with `/`, `/root` and `/tmp`. A write lands at
//!   its `finish`; a cancelled one leaves nothing. Errors carry the codes and messages the real
//!   agent gives.
//! - Exec: a script run per process ([`FakeAgent::with_exec`]) that writes output and reads input
//!   through a [`FakeProcess`]; the default script knows `echo`, `cat`, `true`, `false` and
//!   `sleep N` (ends early on a signal), and answers anything else like a missing program (127).
//!   `timeout_ms` kills the script like the agent does; `detach` ends after `Started`.
//! - [`FakeAgent::set_lost`] makes every new operation fail with [`AgentError::Lost`], as does a
//!   `shutdown`.
//! - `restored` checks its request like the agent, keeps it ([`FakeAgent::last_restore`]) and
//!   takes on its identity: [`FakeAgent::hostname`], and `/etc/hostname` and `/etc/machine-id`
//!   where the agent would write them (the first when it exists, the second when `/etc` does).
//! - `watch` reports the changes made through the fake's own operations (the `watch`
//!   submodule).
//!
//! Streams are driven by tokio tasks: use the fake inside a tokio runtime.

mod fs;
mod watch;

use super::stream::{Incoming, Transport};
use super::{
    Agent, AgentError, ExecStream, FileRead, FileWrite, FsAnswer, Health, TtySize, WatchStream,
};
use bytes::Bytes;
use fs::{Node, Tree};
use futures_util::future::BoxFuture;
use hutch_proto::{ErrorCode, ExecRequest, FsRequest, Request, Response, RestoreInfo};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What a fake process receives from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeInput {
    Stdin(Bytes),
    Eof,
    Signal(i32),
    Resize(TtySize),
}

/// How a fake process ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeExit {
    Code(i32),
    Signal(i32),
    /// The agent refuses the request instead (an `error` answer).
    Refuse(ErrorCode, String),
}

/// A fake process's side of its stream.
pub struct FakeProcess {
    out: mpsc::UnboundedSender<Incoming>,
    input: mpsc::UnboundedReceiver<FakeInput>,
}

impl FakeProcess {
    /// Writes stdout; false once the host gave up on the stream.
    pub fn stdout(&self, data: impl Into<Bytes>) -> bool {
        self.out.send(Incoming::Stdout(data.into())).is_ok()
    }

    pub fn stderr(&self, data: impl Into<Bytes>) -> bool {
        self.out.send(Incoming::Stderr(data.into())).is_ok()
    }

    /// The next input; None once the host gave up on the stream.
    pub async fn input(&mut self) -> Option<FakeInput> {
        self.input.recv().await
    }

    /// Stdin up to its end (or until the host gives up); signals and resizes are skipped.
    pub async fn read_stdin(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(i) = self.input().await {
            match i {
                FakeInput::Stdin(b) => all.extend_from_slice(&b),
                FakeInput::Eof => break,
                _ => {}
            }
        }
        all
    }
}

type Script = Arc<dyn Fn(ExecRequest, FakeProcess) -> BoxFuture<'static, FakeExit> + Send + Sync>;

#[derive(Default)]
struct State {
    tree: Tree,
    layer: Vec<u8>,
    execs: Vec<ExecRequest>,
    next_pid: i32,
    lost: bool,
    hostname: String,
    restores: Vec<RestoreInfo>,
    watchers: watch::Watchers,
}

impl State {
    /// Applies a finished write and reports it to the watches.
    fn write(
        &mut self,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
        data: &[u8],
    ) -> Result<u64, AgentError> {
        let events = watch::planned_write(&self.tree, path, offset);
        let n = self.tree.write(path, mode, offset, data)?;
        self.watchers.notify(&events);
        Ok(n)
    }
}
/// An in-memory agent; see the module doc.
#[derive(Clone)]
pub struct FakeAgent {
    state: Arc<Mutex<State>>,
    script: Script,
    running: Arc<AtomicU32>,
    born: Instant,
}

impl Default for FakeAgent {
    fn default() -> Self {
        FakeAgent::new()
    }
}

/// A fake stream: what the "agent" sends, and the input it gets.
struct FakeStream {
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
    /// None once the owner closed the stream (the process then sees the end of its input).
    input: Mutex<Option<mpsc::UnboundedSender<FakeInput>>>,
    finished: Arc<AtomicBool>,
}

impl FakeStream {
    fn input(&self, i: FakeInput) -> Result<(), AgentError> {
        let input = self.input.lock().unwrap_or_else(|e| e.into_inner());
        match input.as_ref() {
            Some(tx) => tx.send(i).map_err(|_| AgentError::Closed),
            None => Err(AgentError::Closed),
        }
    }
}

impl Transport for FakeStream {
    fn recv(&self) -> BoxFuture<'_, Option<Incoming>> {
        Box::pin(async move { self.rx.lock().await.recv().await })
    }

    fn send<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<(), AgentError>> {
        Box::pin(async move {
            if self.finished.load(Ordering::SeqCst) {
                return Err(AgentError::Closed);
            }
            self.input(FakeInput::Stdin(Bytes::copy_from_slice(data)))
        })
    }

    fn eof(&self) -> BoxFuture<'_, Result<(), AgentError>> {
        // As on the real connection, an end of input is sent whatever the stream's state.
        let _ = self.input(FakeInput::Eof);
        Box::pin(async { Ok(()) })
    }

    fn control(&self, req: Request) -> Result<(), AgentError> {
        let i = match req {
            Request::Signal { signal } => FakeInput::Signal(signal),
            Request::Resize(s) => FakeInput::Resize(s),
            _ => return Ok(()),
        };
        let _ = self.input(i);
        Ok(())
    }

    fn close(&self) {
        self.input.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The agent's end of a fake stream.
struct Peer {
    out: mpsc::UnboundedSender<Incoming>,
    input: mpsc::UnboundedReceiver<FakeInput>,
    finished: Arc<AtomicBool>,
}

impl Peer {
    fn answer(&self, r: Response) {
        if r.ends_stream() {
            self.finished.store(true, Ordering::SeqCst);
        }
        let _ = self.out.send(Incoming::Answer(r));
    }

    fn refuse(&self, e: AgentError) {
        let (code, message) = match e {
            AgentError::Guest { code, message } => (code, message),
            other => (ErrorCode::Io, other.to_string()),
        };
        self.answer(Response::Error { code, message });
    }
}

fn stream() -> (Arc<FakeStream>, Peer) {
    let (out, rx) = mpsc::unbounded_channel();
    let (input_tx, input) = mpsc::unbounded_channel();
    let finished = Arc::new(AtomicBool::new(false));
    let s = FakeStream {
        rx: tokio::sync::Mutex::new(rx),
        input: Mutex::new(Some(input_tx)),
        finished: finished.clone(),
    };
    (
        Arc::new(s),
        Peer {
            out,
            input,
            finished,
        },
    )
}

/// `data` as file chunks, then `done`.
fn read_stream(data: &[u8]) -> Arc<FakeStream> {
    let (s, peer) = stream();
    for c in data.chunks(64 * 1024) {
        let _ = peer.out.send(Incoming::Stdout(Bytes::copy_from_slice(c)));
    }
    peer.answer(Response::Done {
        bytes: data.len() as u64,
    });
    s
}

/// The default exec script; see the module doc.
async fn builtin(req: ExecRequest, mut p: FakeProcess) -> FakeExit {
    let args: Vec<&str> = req.argv.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["echo", rest @ ..] => {
            p.stdout(format!("{}\n", rest.join(" ")));
            FakeExit::Code(0)
        }
        ["cat"] => {
            while let Some(i) = p.input().await {
                match i {
                    FakeInput::Stdin(b) => {
                        p.stdout(b);
                    }
                    FakeInput::Eof => break,
                    FakeInput::Signal(s) => return FakeExit::Signal(s),
                    FakeInput::Resize(_) => {}
                }
            }
            FakeExit::Code(0)
        }
        ["true"] => FakeExit::Code(0),
        ["false"] => FakeExit::Code(1),
        ["sleep", secs] => {
            let d = Duration::from_secs_f64(secs.parse::<f64>().unwrap_or(0.0).clamp(0.0, 1e6));
            let sleep = tokio::time::sleep(d);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => return FakeExit::Code(0),
                    i = p.input() => match i {
                        Some(FakeInput::Signal(s)) => return FakeExit::Signal(s),
                        None => return FakeExit::Signal(9),
                        Some(_) => {}
                    },
                }
            }
        }
        [prog, ..] => {
            p.stderr(format!(
                "hutch: cannot run {prog:?} (cwd /): No such file or directory (os error 2)\n"
            ));
            FakeExit::Code(127)
        }
        [] => FakeExit::Refuse(ErrorCode::BadRequest, "argv is empty".into()),
    }
}

impl FakeAgent {
    /// An agent with `/`, `/root` and `/tmp` and the builtin exec script.
    pub fn new() -> FakeAgent {
        let st = State {
            next_pid: 100,
            hostname: "fake".into(),
            ..State::default()
        };
        FakeAgent {
            state: Arc::new(Mutex::new(st)),
            script: Arc::new(|req, p| Box::pin(builtin(req, p))),
            running: Arc::default(),
            born: Instant::now(),
        }
    }

    /// Runs `script` for every exec instead of the builtin one.
    pub fn with_exec<F, Fut>(mut self, script: F) -> FakeAgent
    where
        F: Fn(ExecRequest, FakeProcess) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = FakeExit> + Send + 'static,
    {
        self.script = Arc::new(move |req, p| Box::pin(script(req, p)));
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self) -> Result<(), AgentError> {
        if self.lock().lost {
            return Err(AgentError::Lost);
        }
        Ok(())
    }

    /// Whether new operations fail as if the connection were lost.
    pub fn set_lost(&self, lost: bool) {
        self.lock().lost = lost;
    }

    /// What `export_changes` streams.
    pub fn set_layer(&self, layer: Vec<u8>) {
        self.lock().layer = layer;
    }

    /// Puts a file in place (parents made).
    pub fn put_file(&self, path: &str, data: &[u8]) -> Result<(), AgentError> {
        self.lock().write(path, None, None, data).map(|_| ())
    }

    /// A file's contents, if there is one at `path`.
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        let st = self.lock();
        match st.tree.node(path, true) {
            Ok((_, Node::File { data, .. })) => Some(data.clone()),
            _ => None,
        }
    }

    /// The exec requests so far, in order.
    pub fn execs(&self) -> Vec<ExecRequest> {
        self.lock().execs.clone()
    }

    /// Processes running now.
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::SeqCst)
    }

    /// The guest's hostname: "fake", or the identity of the last restore that carried one.
    pub fn hostname(&self) -> String {
        self.lock().hostname.clone()
    }

    /// The last `restored` request the fake accepted.
    pub fn last_restore(&self) -> Option<RestoreInfo> {
        self.lock().restores.last().cloned()
    }

    /// How many `restored` requests the fake accepted.
    pub fn restores(&self) -> usize {
        self.lock().restores.len()
    }
}

impl FakeAgent {
    /// A process's stream (the fake's `exec`, and its `relay` of an exec request).
    fn exec_stream(&self, req: ExecRequest) -> Result<Arc<FakeStream>, AgentError> {
        self.check()?;
        let (s, peer) = stream();
        let pid = {
            let mut st = self.lock();
            st.execs.push(req.clone());
            st.next_pid += 1;
            st.next_pid
        };
        if !matches!(req.argv.first(), Some(a) if !a.is_empty()) {
            peer.refuse(AgentError::guest(ErrorCode::BadRequest, "argv is empty"));
            return Ok(s);
        }
        peer.answer(Response::Started { pid });
        if req.detach {
            // The process outlives the stream, which has nothing after `started` (and is not
            // lost while the host holds it).
            tokio::spawn(async move {
                let mut peer = peer;
                while peer.input.recv().await.is_some() {}
            });
            return Ok(s);
        }
        let Peer {
            out,
            input,
            finished,
        } = peer;
        let done = Peer {
            out: out.clone(),
            input: mpsc::unbounded_channel().1,
            finished,
        };
        let proc_ = FakeProcess { out, input };
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let run = (self.script)(req, proc_);
        let running = self.running.clone();
        running.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let (exit, timed_out) = match timeout {
                Some(t) => match tokio::time::timeout(t, run).await {
                    Ok(e) => (e, false),
                    Err(_) => (FakeExit::Signal(9), true),
                },
                None => (run.await, false),
            };
            running.fetch_sub(1, Ordering::SeqCst);
            match exit {
                FakeExit::Code(c) => done.answer(Response::Exited {
                    code: Some(c),
                    signal: None,
                    timed_out,
                }),
                FakeExit::Signal(s) => done.answer(Response::Exited {
                    code: None,
                    signal: Some(s),
                    timed_out,
                }),
                FakeExit::Refuse(code, message) => done.answer(Response::Error { code, message }),
            }
        });
        Ok(s)
    }
}

impl Agent for FakeAgent {
    fn exec(&self, req: ExecRequest) -> Result<ExecStream, AgentError> {
        Ok(ExecStream::new(self.exec_stream(req)?))
    }

    /// Processes only: enough to carry them over a node link in tests.
    fn relay(&self, req: &Request) -> Result<super::Relay, AgentError> {
        match req {
            Request::Exec(e) => Ok(super::Relay(self.exec_stream(e.clone())?)),
            _ => Err(AgentError::guest(
                ErrorCode::Unsupported,
                "the fake relays processes only",
            )),
        }
    }

    fn read_file(&self, path: &str, offset: u64, len: Option<u64>) -> Result<FileRead, AgentError> {
        self.check()?;
        let st = self.lock();
        let s = match st.tree.node(path, true) {
            Ok((_, Node::File { data, .. })) => {
                let from = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let n = len
                    .and_then(|l| usize::try_from(l).ok())
                    .unwrap_or(usize::MAX)
                    .min(data.len() - from);
                read_stream(&data[from..from + n])
            }
            Ok(_) => {
                let (s, peer) = stream();
                let msg = format!("{path} is a directory");
                peer.refuse(AgentError::guest(ErrorCode::IsDirectory, &msg));
                s
            }
            Err(e) => {
                let (s, peer) = stream();
                peer.refuse(e);
                s
            }
        };
        Ok(FileRead::new(s))
    }

    fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
    ) -> Result<FileWrite, AgentError> {
        self.check()?;
        let (s, mut peer) = stream();
        let state = self.state.clone();
        let path = path.to_string();
        tokio::spawn(async move {
            let mut data = Vec::new();
            while let Some(i) = peer.input.recv().await {
                match i {
                    FakeInput::Stdin(b) => data.extend_from_slice(&b),
                    FakeInput::Eof => {
                        let r = state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .write(&path, mode, offset, &data);
                        match r {
                            Ok(bytes) => peer.answer(Response::Done { bytes }),
                            Err(e) => peer.refuse(e),
                        }
                        return;
                    }
                    _ => {}
                }
            }
        });
        Ok(FileWrite::new(s))
    }

    fn export_changes(&self) -> Result<FileRead, AgentError> {
        self.check()?;
        Ok(FileRead::new(read_stream(&self.lock().layer)))
    }

    fn fs(&self, req: FsRequest) -> BoxFuture<'_, Result<FsAnswer, AgentError>> {
        let r = self.check().and_then(|_| {
            let mut st = self.lock();
            let events = watch::planned(&st.tree, &req);
            let answer = st.tree.fs(req)?;
            st.watchers.notify(&events);
            Ok(answer)
        });
        Box::pin(async move { r })
    }

    fn health(&self) -> BoxFuture<'_, Result<Health, AgentError>> {
        let r = self.check().map(|_| Health {
            ready: true,
            uptime_ms: self.born.elapsed().as_millis() as u64,
            processes: self.running(),
        });
        Box::pin(async move { r })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), AgentError>> {
        let r = self.check();
        if r.is_ok() {
            // The VM powers off: its connection goes away.
            self.set_lost(true);
        }
        Box::pin(async move { r })
    }

    fn restored(&self, info: RestoreInfo) -> BoxFuture<'_, Result<(), AgentError>> {
        let r = self.check().and_then(|_| {
            info.validate()
                .map_err(|e| AgentError::guest(ErrorCode::InvalidArgument, &e.to_string()))?;
            let mut st = self.lock();
            if let Some(id) = &info.identity {
                st.hostname = id.hostname.clone();
                if st.tree.node("/etc/hostname", false).is_ok() {
                    st.tree.write(
                        "/etc/hostname",
                        None,
                        None,
                        format!("{}\n", id.hostname).as_bytes(),
                    )?;
                }
                if st.tree.node("/etc", true).is_ok() {
                    let machine_id = format!("{}\n", id.machine_id);
                    st.tree
                        .write("/etc/machine-id", Some(0o444), None, machine_id.as_bytes())?;
                }
            }
            st.restores.push(info);
            Ok(())
        });
        Box::pin(async move { r })
    }

    fn watch(&self, path: &str, recursive: bool) -> BoxFuture<'_, Result<WatchStream, AgentError>> {
        let r = self.check().and_then(|_| {
            let (s, peer) = stream();
            let mut st = self.lock();
            let State { tree, watchers, .. } = &mut *st;
            watchers.add(tree, path, recursive, peer)?;
            Ok(s)
        });
        Box::pin(async move { WatchStream::established(r?).await })
    }
}
