//! Serving the host over the virtio-serial port.
//!
//! One reader loop decodes frames and dispatches them; one writer thread owns all writes to the
//! port. Every host connection is a "generation": when the host side goes away the guest read
//! returns EOF, the generation is bumped, every process started for the old connection is killed
//! and queued output of that generation is dropped. Writes block while no host is connected (the
//! virtio-console driver waits for the host), which is why output goes through the writer thread.

use crate::init::Config;
use crate::{exec, sys};
use hutch_proto::{Decoder, Frame, Hello, HelloAck, Kind, Request, Response};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    pub reaper: Arc<exec::Reaper>,
    pub hostname: String,
    /// fd of the writable disk's mount root, for exports.
    pub data_fd: Option<i32>,
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

    pub fn error(&self, gen: u64, stream: u32, code: &str, message: String) {
        let r = Response::Error {
            code: code.into(),
            message,
        };
        self.respond(gen, stream, &r);
    }

    pub fn end_session(&self, stream: u32, gen: u64) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.get(&stream).is_some_and(|x| x.gen == gen) {
            s.remove(&stream);
        }
    }

    /// The host went away: kill what it started and forget queued output.
    fn disconnect(&self) {
        let old = self.gen.fetch_add(1, Ordering::SeqCst);
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for (_, sess) in s.drain() {
            if let Some(pgid) = sess.pgid {
                let _ = sys::kill(-pgid, libc::SIGKILL);
            }
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
        reaper: reaper.clone(),
        hostname: cfg.hostname.clone(),
        data_fd: cfg.data.as_ref().map(|f| f.as_raw_fd()),
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

fn handle(shared: &Arc<Shared>, frame: Frame) {
    let gen = shared.gen();
    let stream = frame.stream;
    match frame.kind {
        Kind::Hello => match frame.parse::<Hello>("hello") {
            Ok(h) => {
                let ack = HelloAck {
                    nonce: h.nonce,
                    version: hutch_proto::VERSION,
                    hostname: shared.hostname.clone(),
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
            Err(e) => shared.error(gen, stream, "bad_request", e.to_string()),
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
        Kind::Response | Kind::Stdout | Kind::Stderr => {}
    }
}

fn request(shared: &Arc<Shared>, gen: u64, stream: u32, req: Request) {
    match req {
        Request::Exec(r) => exec::start(shared.clone(), gen, stream, r),
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
                        shared.error(gen, stream, "signal_failed", e.to_string());
                    }
                }
                None => shared.error(
                    gen,
                    stream,
                    "no_process",
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
        Request::ReadFile { path } => {
            let shared = shared.clone();
            std::thread::spawn(move || exec::read_file(&shared, gen, stream, &path));
        }
        Request::WriteFile { path, mode } => {
            exec::write_file(shared.clone(), gen, stream, path, mode)
        }
        Request::Fs(req) => {
            let shared = shared.clone();
            std::thread::spawn(move || exec::fs(&shared, gen, stream, req));
        }
        Request::ExportChanges => {
            let shared = shared.clone();
            std::thread::spawn(move || crate::export::export(&shared, gen, stream));
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
