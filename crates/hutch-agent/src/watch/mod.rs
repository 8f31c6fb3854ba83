//! `watch`: changes in a guest directory, streamed to the host as `fs_event` answers.
//!
//! Each watch stream runs on its own thread with its own inotify instance (see [`inotify`]),
//! polling it together with an eventfd that the stream's credit rings when the host grants
//! more or the stream ends. Paths resolve in the guest root, as every file request does (the
//! agent runs chrooted into it).
//!
//! - Answers: `watching` once every watch is set, or `error` (`not_found`, `not_a_directory`,
//!   `permission_denied`, `resource_exhausted` beyond [`MAX_WATCH_STREAMS`] streams or
//!   [`MAX_WATCHES`] directories, or the kernel's own limits); then `fs_event`s. A watch that
//!   cannot go on ends with `error`: `not_found` when the watched directory is removed,
//!   `resource_exhausted` when a recursive watch's tree outgrows [`MAX_WATCHES`] (rather than
//!   miss changes silently).
//! - Events, kinds as Go's fsnotify (which E2B's envd uses) reports them: `IN_CREATE` and
//!   `IN_MOVED_TO` are `create`, `IN_MOVED_FROM` `rename` (a move within the watch is thus
//!   `rename` of the old name, then `create` of the new), `IN_DELETE` `remove`, `IN_ATTRIB`
//!   `chmod`, `IN_MODIFY` and `IN_CLOSE_WRITE` `write`, coalesced (see [`outbox`]). Changes to
//!   the watched directory itself are not reported (only its entries'); a kernel queue overflow
//!   loses events and is logged on the console.
//! - Memory: every event spends the stream's credit (its JSON size). While the host grants
//!   none, events wait in a bounded backlog that coalesces repeats and then drops the newest
//!   ([`outbox`]); drops are logged on the console.
//! - Ends: on `cancel`, when the connection ends, and after a restore (the stream's credit is
//!   closed, which wakes the thread): the inotify fd is closed, which removes every watch.

mod inotify;
mod outbox;
#[cfg(test)]
mod tests;

use crate::serve::Shared;
pub use hutch_proto::watch::{MAX_WATCHES, MAX_WATCH_STREAMS};
use hutch_proto::{ErrorCode, Frame, Kind, Response};
use inotify::Inotify;
use outbox::Outbox;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait without a reason to wake (a safety net: the eventfd wakes the thread).
const IDLE: Duration = Duration::from_secs(1);
/// Dropped events are logged at most this often per watch (the console is the VM's log).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Watch streams open at once on this agent.
#[derive(Default)]
pub struct Slots(AtomicUsize);

/// One open watch stream's slot, given back on drop.
struct Slot(Arc<Slots>);

impl Slots {
    fn take(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// Watch streams open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many of what one watch may have.
#[derive(Clone, Copy)]
pub struct Limits {
    pub streams: usize,
    pub watches: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            streams: MAX_WATCH_STREAMS,
            watches: MAX_WATCHES,
        }
    }
}

/// Where a watch's answers go: its stream on the host connection (or a test's recorder).
pub trait Sink {
    /// Sends an answer that ends or opens the stream (`watching`, `error`); not credited.
    fn respond(&self, r: &Response);
    /// Sends `r` if the stream has credit for all of it now: Some(true) sent, Some(false) no
    /// credit yet, None the stream is gone.
    fn offer(&self, r: &Response) -> Option<bool>;
    /// Whether the stream is still wanted.
    fn is_open(&self) -> bool;
    /// Has `wake` called when the stream gets credit or ends.
    fn on_wake(&self, wake: Box<dyn Fn() + Send + Sync>);
}

/// A watch's stream on the host connection.
struct StreamSink {
    shared: Arc<Shared>,
    gen: u64,
    stream: u32,
}

impl Sink for StreamSink {
    fn respond(&self, r: &Response) {
        self.shared.respond(self.gen, self.stream, r);
    }

    fn offer(&self, r: &Response) -> Option<bool> {
        let f = Frame::json(Kind::Response, self.stream, r);
        let sent = self
            .shared
            .try_take(self.gen, self.stream, f.payload.len())?;
        if sent {
            self.shared.send(self.gen, f);
        }
        Some(sent)
    }

    fn is_open(&self) -> bool {
        self.shared.stream_open(self.gen, self.stream)
    }

    fn on_wake(&self, wake: Box<dyn Fn() + Send + Sync>) {
        self.shared.on_credit_change(self.stream, wake);
    }
}

/// Starts watching `path` for the host's `stream` (its credit is open already).
pub fn start(shared: Arc<Shared>, gen: u64, stream: u32, path: String, recursive: bool) {
    std::thread::spawn(move || {
        let slots = shared.watches.clone();
        let sink = StreamSink {
            shared,
            gen,
            stream,
        };
        run(&path, recursive, &slots, Limits::default(), &sink);
        sink.shared.close_credit(stream);
    });
}

/// An eventfd: other threads wake the watch's poll.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes an initial value and flags.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer; a full counter (EAGAIN) is awake already.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr() as *const libc::c_void, 8) };
    }

    fn clear(&self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer; EAGAIN when nothing was rung.
        unsafe { libc::read(self.0.as_raw_fd(), b.as_mut_ptr() as *mut libc::c_void, 8) };
    }
}

/// Waits until `a` or `b` is readable, or `timeout` passes.
fn poll2(a: i32, b: i32, timeout: Duration) {
    let mut fds = [a, b].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: fds is a valid array of two pollfds.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
}

/// Serves one watch stream until it ends; see the module doc.
pub fn run(path: &str, recursive: bool, slots: &Arc<Slots>, limits: Limits, sink: &dyn Sink) {
    let refuse =
        |code: ErrorCode, message: String| sink.respond(&Response::Error { code, message });
    let Some(_slot) = slots.take(limits.streams) else {
        let msg = format!("the guest already has {} directory watches", limits.streams);
        return refuse(ErrorCode::ResourceExhausted, msg);
    };
    let wake = match EventFd::new() {
        Ok(w) => Arc::new(w),
        Err(e) => return refuse(crate::sys::io_code(&e), format!("eventfd: {e}")),
    };
    let mut ino = match Inotify::open(path, recursive, limits.watches) {
        Ok(i) => i,
        Err((code, msg)) => return refuse(code, msg),
    };
    let w = wake.clone();
    sink.on_wake(Box::new(move || w.wake()));
    if !sink.is_open() {
        return;
    }
    sink.respond(&Response::Watching);
    let mut out = Outbox::default();
    let mut changes = Vec::new();
    let (mut dropped, mut logged) = (0, None::<Instant>);
    loop {
        while let Some(ev) = out.front() {
            match sink.offer(&Response::FsEvent(ev.clone())) {
                None => return,
                Some(false) => break,
                Some(true) => out.pop(),
            }
        }
        if out.dropped > dropped && logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            logged = Some(Instant::now());
            eprintln!(
                "hutch-agent: watch of {path}: the host is not taking events: {} waiting, {} \
                 more dropped",
                out.len(),
                out.dropped - dropped
            );
            dropped = out.dropped;
        }
        if !sink.is_open() {
            return;
        }
        let timeout = out.next_due(Instant::now()).map_or(IDLE, |d| d.min(IDLE));
        poll2(ino.fd(), wake.0.as_raw_fd(), timeout);
        wake.clear();
        let r = ino.read(&mut changes);
        let now = Instant::now();
        for c in changes.drain(..) {
            out.push(c, now);
        }
        out.flush_due(now);
        if let Err((code, message)) = r {
            // What happened before the end goes first, as far as the credit reaches.
            while let Some(ev) = out.front() {
                if sink.offer(&Response::FsEvent(ev.clone())) != Some(true) {
                    break;
                }
                out.pop();
            }
            return refuse(code, message);
        }
    }
}
