//! Serving the host over the virtio-serial port.
//!
//! One reader loop decodes frames and dispatches them; one writer thread owns all writes to the
//! port. Every host connection is a "generation": when the host side goes away the guest read
//! returns EOF, the generation is bumped, every process started for the old connection is killed
//! and queued output of that generation is dropped. Writes block while no host is connected (the
//! virtio-console driver waits for the host), which is why output goes through the writer thread.
//!
//! Output is flow-controlled per stream (`hutch_proto::credit`): a producer (process pipe, file,
//! export) takes credit before it reads, so when the host's consumer stops reading, the producer
//! stops reading too and the guest process blocks on its full pipe, while other streams go on.
//! A directory watch spends credit on its events and keeps a bounded backlog meanwhile (see
//! `watch`).

use crate::init::Config;
use crate::restore::GuestState;
use crate::{exec, sys, watch};
use hutch_proto::credit::{RecvCredit, SendCredit};
use hutch_proto::{Decoder, ErrorCode, Frame, Hello, HelloAck, Kind, Request, Response};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Called when a stream's credit grows or the stream ends (see [`Shared::on_credit_change`]).
type Waker = Box<dyn Fn() + Send + Sync>;

/// Output credit of one stream (agent -> host data frames, and watch events).
#[derive(Default)]
pub struct Credit {
    state: Mutex<(SendCredit, bool)>,
    cv: Condvar,
    /// For a producer that waits on something else besides the credit (a watch polls its
    /// inotify fd).
    waker: Mutex<Option<Waker>>,
}

impl Credit {
    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_all();
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            w();
        }
    }
}

/// Returns stdin/file credit to the host as the consumer of a stream's input takes it.
pub struct InputCredit {
    stream: u32,
    gen: u64,
    credit: RecvCredit,
}

impl InputCredit {
    pub fn new(gen: u64, stream: u32) -> InputCredit {
        InputCredit {
            stream,
            gen,
            credit: RecvCredit::new(),
        }
    }

    /// `n` bytes of input were taken (written to the process or the file, or discarded).
    pub fn consumed(&mut self, shared: &Shared, n: usize) {
        // The host is trusted to keep to its window; received() only keeps the books.
        let _ = self.credit.received(n);
        if let Some(g) = self.credit.consumed(n) {
            shared.send(self.gen, Frame::credit(self.stream, g));
        }
    }
}

/// Largest data frame the agent sends.
pub const CHUNK: usize = 64 * 1024;

/// Input for a stream: stdin bytes or file contents, then end.
pub enum Input {
    Data(Vec<u8>),
    Eof,
}

/// A running operation.
pub struct Session {
    pub gen: u64,
    /// Process group to kill when the connection goes away (exec only).
    pub pgid: Option<i32>,
    pub input: Option<Sender<Input>>,
    /// The pseudo-terminal master of a `tty` exec, for resizes.
    pub pty: Option<i32>,
}

/// State shared by the reader loop and the worker threads.
pub struct Shared {
    out: SyncSender<(u64, Vec<u8>)>,
    gen: AtomicU64,
    pub sessions: Mutex<HashMap<u32, Session>>,
    /// Output credit of the streams that send data.
    credits: Mutex<HashMap<u32, Arc<Credit>>>,
    pub reaper: Arc<exec::Reaper>,
    /// The guest's hostname and network (boot's, or the last restore's).
    pub guest: Arc<Mutex<GuestState>>,
    /// fd of the writable disk's mount root, for exports.
    pub data_fd: Option<i32>,
    /// The watch streams open now, at most [`hutch_proto::watch::MAX_WATCH_STREAMS`].
    pub watches: Arc<watch::Slots>,
}

impl Shared {
    /// Current connection generation.
    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }

    /// Queues a frame for the host connection `gen`; dropped if that connection is gone.
    pub fn send(&self, gen: u64, frame: Frame) {
        if gen != self.gen() {
            return;
        }
        match frame.encode() {
            Ok(bytes) => {
                let _ = self.out.send((gen, bytes));
            }
            Err(e) => eprintln!("hutch-agent: dropping frame: {e}"),
        }
    }

    pub fn respond(&self, gen: u64, stream: u32, r: &Response) {
        self.send(gen, Frame::json(Kind::Response, stream, r));
    }

    pub fn error(&self, gen: u64, stream: u32, code: ErrorCode, message: String) {
        let r = Response::Error { code, message };
        self.respond(gen, stream, &r);
    }

    /// Makes the output credit of a new stream.
    pub fn open_credit(&self, stream: u32) {
        let mut c = self.credits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = c.insert(stream, Arc::default()) {
            old.close();
        }
    }

    /// Ends a stream's output: producers still waiting for credit give up.
    pub fn close_credit(&self, stream: u32) {
        let c = self
            .credits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stream);
        if let Some(c) = c {
            c.close();
        }
    }

    fn credit_of(&self, stream: u32) -> Option<Arc<Credit>> {
        self.credits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&stream)
            .cloned()
    }

    /// Waits until the host lets this stream send, then takes up to `want` bytes of credit.
    /// None once the stream or its connection is gone.
    pub fn acquire(&self, gen: u64, stream: u32, want: usize) -> Option<usize> {
        let c = self.credit_of(stream)?;
        let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.1 || gen != self.gen() {
                return None;
            }
            let n = st.0.take(want);
            if n > 0 {
                return Some(n);
            }
            st =
                c.cv.wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
    }

    /// Takes exactly `n` bytes of the stream's credit if it has them now, without waiting (a
    /// watch sends a whole event or none). None once the stream or its connection is gone.
    pub fn try_take(&self, gen: u64, stream: u32, n: usize) -> Option<bool> {
        let c = self.credit_of(stream)?;
        let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.1 || gen != self.gen() {
            return None;
        }
        if st.0.available() < n as u64 {
            return Some(false);
        }
        st.0.take(n);
        Some(true)
    }

    /// Whether the stream is still wanted: its credit is open on the current connection.
    pub fn stream_open(&self, gen: u64, stream: u32) -> bool {
        gen == self.gen()
            && self
                .credit_of(stream)
                .is_some_and(|c| !c.state.lock().unwrap_or_else(|e| e.into_inner()).1)
    }

    /// Calls `wake` whenever the stream's credit grows and when the stream ends (cancelled,
    /// its connection gone); at once if it has ended already.
    pub fn on_credit_change(&self, stream: u32, wake: Waker) {
        match self.credit_of(stream) {
            Some(c) => *c.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake),
            None => wake(),
        }
    }

    /// Gives back credit taken by [`Shared::acquire`] and not used.
    pub fn release(&self, stream: u32, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(c) = self.credit_of(stream) {
            c.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .untake(n);
            c.cv.notify_all();
        }
    }

    /// Sends `data` as data frames of `kind`, each within the stream's credit. False once the
    /// stream or connection is gone.
    pub fn send_data(&self, gen: u64, stream: u32, kind: Kind, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(n) = self.acquire(gen, stream, data.len().min(CHUNK)) else {
                return false;
            };
            self.send(gen, Frame::new(kind, stream, data[..n].to_vec()));
            data = &data[n..];
        }
        true
    }

    fn grant(&self, stream: u32, n: u32) {
        if let Some(c) = self.credit_of(stream) {
            if let Err(e) = c.state.lock().unwrap_or_else(|e| e.into_inner()).0.grant(n) {
                eprintln!("hutch-agent: stream {stream}: {e}");
            }
            c.cv.notify_all();
            c.wake();
        }
    }

    pub fn end_session(&self, stream: u32, gen: u64) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.get(&stream).is_some_and(|x| x.gen == gen) {
            s.remove(&stream);
        }
    }

    /// The VM was restored from a snapshot: what the host had started before the snapshot (its
    /// execs in flight, now orphans of a connection that is gone, possibly in a copy of the VM)
    /// is killed, as a disconnect would; `keep` is the stream asking.
    pub fn end_others(&self, keep: u32) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let old: Vec<u32> = s.keys().copied().filter(|k| *k != keep).collect();
        for k in old {
            if let Some(pgid) = s.remove(&k).and_then(|sess| sess.pgid) {
                let _ = sys::kill(-pgid, libc::SIGKILL);
            }
        }
        drop(s);
        let mut c = self.credits.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<u32> = c.keys().copied().filter(|k| *k != keep).collect();
        for k in gone {
            if let Some(cr) = c.remove(&k) {
                cr.close();
            }
        }
    }

    /// The host went away: kill what it started and forget queued output.
    pub(crate) fn disconnect(&self) {
        let old = self.gen.fetch_add(1, Ordering::SeqCst);
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for (_, sess) in s.drain() {
            if let Some(pgid) = sess.pgid {
                let _ = sys::kill(-pgid, libc::SIGKILL);
            }
        }
        drop(s);
        let credits: Vec<_> = self
            .credits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (_, c) in credits {
            c.close();
        }
        eprintln!("hutch-agent: host disconnected (connection {old})");
    }
}

fn writer(mut port: std::fs::File, rx: Receiver<(u64, Vec<u8>)>, shared: Arc<Shared>) {
    for (gen, bytes) in rx {
        if gen != shared.gen() {
            continue;
        }
        if let Err(e) = port.write_all(&bytes) {
            eprintln!("hutch-agent: write to host failed: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn serve(cfg: Config) -> ! {
    let reaper = exec::Reaper::start();
    loop {
        if let Err(e) = serve_port(&cfg, &reaper) {
            eprintln!(
                "hutch-agent: serving {} failed: {e}; retrying",
                cfg.port.display()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn serve_port(cfg: &Config, reaper: &Arc<exec::Reaper>) -> std::io::Result<()> {
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cfg.port)?;
    let (tx, rx) = sync_channel(256);
    let shared = Arc::new(Shared {
        out: tx,
        gen: AtomicU64::new(1),
        sessions: Mutex::new(HashMap::new()),
        credits: Mutex::new(HashMap::new()),
        reaper: reaper.clone(),
        guest: cfg.guest.clone(),
        data_fd: cfg.data.as_ref().map(|f| f.as_raw_fd()),
        watches: Arc::default(),
    });
    let wport = port.try_clone()?;
    let wshared = shared.clone();
    std::thread::spawn(move || writer(wport, rx, wshared));

    let fd = port.as_raw_fd();
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut connected = false;
    loop {
        if !sys::poll_in(fd, 1000) {
            // Either nothing to read or the host end is closed (POLLHUP): do not spin.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let n = match port.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if connected {
                shared.disconnect();
                connected = false;
            }
            dec.reset();
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        connected = true;
        dec.push(&buf[..n]);
        while let Some(frame) = dec.next_frame() {
            handle(&shared, frame);
        }
    }
}

pub(crate) fn handle(shared: &Arc<Shared>, frame: Frame) {
    let gen = shared.gen();
    let stream = frame.stream;
    match frame.kind {
        Kind::Hello => match frame.parse::<Hello>("hello") {
            Ok(h) => {
                if h.version != hutch_proto::VERSION {
                    // Answer anyway, with our version: the host refuses the connection with a
                    // message that names both.
                    eprintln!(
                        "hutch-agent: host speaks protocol v{}, this agent v{}",
                        h.version,
                        hutch_proto::VERSION
                    );
                }
                let ack = HelloAck {
                    nonce: h.nonce,
                    version: hutch_proto::VERSION,
                    hostname: shared
                        .guest
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .hostname
                        .clone(),
                    kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                    uptime_ms: uptime_ms(),
                };
                shared.send(gen, Frame::json(Kind::Hello, 0, &ack));
            }
            Err(e) => eprintln!("hutch-agent: bad hello: {e}"),
        },
        Kind::Request => match frame.parse::<Request>("request") {
            Ok(req) => request(shared, gen, stream, req),
            Err(e) => shared.error(gen, stream, ErrorCode::BadRequest, e.to_string()),
        },
        Kind::Stdin | Kind::StdinEof => {
            let sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(input) = sessions.get(&stream).and_then(|s| s.input.as_ref()) {
                let msg = if frame.kind == Kind::Stdin {
                    Input::Data(frame.payload)
                } else {
                    Input::Eof
                };
                let _ = input.send(msg);
            }
        }
        Kind::Credit => match frame.credit_amount() {
            Ok(n) => shared.grant(stream, n),
            Err(e) => eprintln!("hutch-agent: {e}"),
        },
        Kind::Response | Kind::Stdout | Kind::Stderr => {}
    }
}

fn request(shared: &Arc<Shared>, gen: u64, stream: u32, req: Request) {
    if matches!(
        req,
        Request::Exec(_)
            | Request::ReadFile { .. }
            | Request::ExportChanges
            | Request::Watch { .. }
    ) {
        shared.open_credit(stream);
    }
    match req {
        Request::Exec(r) => exec::start(shared.clone(), gen, stream, r),
        Request::Cancel => {
            // The host gave up on the stream: stop its producer (a watch too) and its process,
            // and drop its input (a file write then ends with an error).
            shared.close_credit(stream);
            let pgid = shared
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&stream)
                .and_then(|s| s.pgid);
            if let Some(p) = pgid {
                let _ = sys::kill(-p, libc::SIGKILL);
            }
        }
        Request::Signal { signal } => {
            let pgid = shared
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&stream)
                .and_then(|s| s.pgid);
            match pgid {
                Some(p) => {
                    if let Err(e) = sys::kill(-p, signal) {
                        shared.error(gen, stream, ErrorCode::SignalFailed, e.to_string());
                    }
                }
                None => shared.error(
                    gen,
                    stream,
                    ErrorCode::NoProcess,
                    format!("stream {stream} runs no process"),
                ),
            }
        }
        Request::Resize(size) => {
            let pty = shared
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&stream)
                .and_then(|s| s.pty);
            if let Some(fd) = pty {
                sys::set_winsize(fd, size);
            }
        }
        Request::ReadFile {
            path,
            offset,
            len,
            user,
        } => {
            let shared = shared.clone();
            std::thread::spawn(move || {
                exec::read_file(&shared, gen, stream, &path, offset, len, user.as_deref());
                shared.close_credit(stream);
            });
        }
        Request::WriteFile {
            path,
            mode,
            offset,
            user,
        } => exec::write_file(shared.clone(), gen, stream, path, mode, offset, user),
        Request::Fs(req) => {
            let shared = shared.clone();
            // A thread of its own: `FsAs` changes the credentials of the thread it runs on.
            std::thread::spawn(move || exec::fs(&shared, gen, stream, req, None));
        }
        Request::FsAs { user, req } => {
            let shared = shared.clone();
            std::thread::spawn(move || exec::fs(&shared, gen, stream, req, Some(&user)));
        }
        Request::ExportChanges => {
            let shared = shared.clone();
            std::thread::spawn(move || {
                crate::export::export(&shared, gen, stream);
                shared.close_credit(stream);
            });
        }
        Request::Health => {
            let processes = shared.sessions.lock().map(|s| s.len() as u32).unwrap_or(0);
            let r = Response::Health {
                ready: true,
                uptime_ms: uptime_ms(),
                processes,
            };
            shared.respond(gen, stream, &r);
        }
        Request::Watch { path, recursive } => {
            watch::start(shared.clone(), gen, stream, path, recursive)
        }
        Request::Restored(info) => {
            // Sent first on a connection after a restore: every other session is of before.
            shared.end_others(stream);
            let shared = shared.clone();
            std::thread::spawn(move || crate::restore::restored(&shared, gen, stream, info));
        }
        Request::Shutdown => {
            eprintln!("hutch-agent: shutdown requested");
            shared.respond(gen, stream, &Response::Done { bytes: 0 });
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                let _ = sys::kill(-1, libc::SIGTERM);
                std::thread::sleep(Duration::from_millis(500));
                let _ = sys::kill(-1, libc::SIGKILL);
                sys::power_off();
            });
        }
    }
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// A `Shared` with no port behind it, for tests: the frames it sends come out of the receiver.
#[cfg(test)]
pub(crate) fn test_shared() -> (Arc<Shared>, Receiver<(u64, Vec<u8>)>) {
    let (tx, rx) = sync_channel(4096);
    let shared = Shared {
        out: tx,
        gen: AtomicU64::new(1),
        sessions: Mutex::new(HashMap::new()),
        credits: Mutex::new(HashMap::new()),
        reaper: exec::Reaper::idle(),
        guest: Arc::new(Mutex::new(GuestState {
            hostname: "test".into(),
            net: None,
        })),
        data_fd: None,
        watches: Arc::default(),
    };
    (Arc::new(shared), rx)
}
