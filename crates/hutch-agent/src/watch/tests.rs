//! Watches of temporary directories on the host running the tests: real inotify, the same code
//! the guest runs. Through a recording [`Sink`] (events, limits, refusals, credit) and through
//! the agent's request handling (a `watch` request on a connection, then `cancel` or the
//! connection's end closing its inotify fd).

use super::*;
use hutch_proto::{Decoder, FsEvent, FsEventKind, Request};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex};

use FsEventKind::*;

/// The tests count the process's inotify fds: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const T: Duration = Duration::from_secs(5);

/// Records what a watch answers; its credit is unlimited unless set.
#[derive(Default)]
struct Rec {
    answers: Mutex<Vec<Response>>,
    cv: Condvar,
    credit: Mutex<Option<usize>>,
    closed: AtomicBool,
    waker: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl Sink for Rec {
    fn respond(&self, r: &Response) {
        self.answers.lock().unwrap().push(r.clone());
        self.cv.notify_all();
    }

    fn offer(&self, r: &Response) -> Option<bool> {
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        let n = serde_json::to_vec(r).unwrap().len();
        let mut c = self.credit.lock().unwrap();
        match c.as_mut() {
            Some(left) if *left < n => return Some(false),
            Some(left) => *left -= n,
            None => {}
        }
        drop(c);
        self.respond(r);
        Some(true)
    }

    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }

    fn on_wake(&self, wake: Box<dyn Fn() + Send + Sync>) {
        *self.waker.lock().unwrap() = Some(wake);
    }
}

impl Rec {
    fn wake(&self) {
        if let Some(w) = self.waker.lock().unwrap().as_ref() {
            w();
        }
    }

    /// The host gives up on the stream.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn set_credit(&self, c: Option<usize>) {
        *self.credit.lock().unwrap() = c;
        self.wake();
    }

    /// The answers so far, once `done` holds for them (panics after [`T`]).
    fn wait(&self, what: &str, done: impl Fn(&[Response]) -> bool) -> Vec<Response> {
        let a = self.answers.lock().unwrap();
        let (a, t) = self.cv.wait_timeout_while(a, T, |a| !done(a)).unwrap();
        assert!(!t.timed_out(), "waiting for {what}; got {:?}", *a);
        a.clone()
    }

    /// The events so far, once one is `name` of `kind`.
    fn wait_event(&self, name: &str, kind: FsEventKind) -> Vec<(String, FsEventKind)> {
        events(&self.wait(&format!("{kind:?} {name}"), |a| {
            events(a).iter().any(|(n, k)| n == name && *k == kind)
        }))
    }
}

fn events(a: &[Response]) -> Vec<(String, FsEventKind)> {
    a.iter()
        .filter_map(|r| match r {
            Response::FsEvent(e) => Some((e.name.clone(), e.kind)),
            _ => None,
        })
        .collect()
}

fn ev(name: &str, kind: FsEventKind) -> (String, FsEventKind) {
    (name.to_string(), kind)
}

/// A watch of `dir` on its own thread, as the agent runs one.
fn watch(
    dir: &Path,
    recursive: bool,
    slots: &Arc<Slots>,
    limits: Limits,
) -> (Arc<Rec>, std::thread::JoinHandle<()>) {
    let rec = Arc::new(Rec::default());
    let (r, s, path) = (
        rec.clone(),
        slots.clone(),
        dir.to_str().unwrap().to_string(),
    );
    let t = std::thread::spawn(move || run(&path, recursive, &s, limits, &*r));
    (rec, t)
}

fn established(dir: &Path, recursive: bool) -> (Arc<Rec>, std::thread::JoinHandle<()>) {
    let (rec, t) = watch(dir, recursive, &Arc::default(), Limits::default());
    let a = rec.wait("watching", |a| !a.is_empty());
    assert_eq!(a, vec![Response::Watching]);
    (rec, t)
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Inotify fds this process has open.
fn inotify_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:inotify")
        })
        .count()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_directory_reports_what_happens_to_its_entries() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::create_dir(dir.join("sub")).unwrap();
    let (rec, t) = established(dir, false);
    std::fs::write(dir.join("a"), "one").unwrap();
    chmod(&dir.join("a"), 0o600);
    std::fs::rename(dir.join("a"), dir.join("b")).unwrap();
    // Not recursive: inside a subdirectory is out of sight.
    std::fs::write(dir.join("sub/hidden"), "x").unwrap();
    std::fs::remove_file(dir.join("b")).unwrap();
    std::fs::create_dir(dir.join("d")).unwrap();
    let got = rec.wait_event("d", Create);
    assert_eq!(
        got,
        vec![
            ev("a", Create),
            ev("a", Write),
            ev("a", Chmod),
            ev("a", Rename),
            ev("b", Create),
            ev("b", Remove),
            ev("d", Create),
        ]
    );
    rec.close();
    t.join().unwrap();
}

#[test]
fn writes_to_one_file_are_coalesced_and_the_last_is_reported() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let (rec, t) = established(d.path(), false);
    let mut f = std::fs::File::create(d.path().join("log")).unwrap();
    for _ in 0..500 {
        std::io::Write::write_all(&mut f, b"line\n").unwrap();
    }
    drop(f);
    std::fs::create_dir(d.path().join("end")).unwrap();
    let got = rec.wait_event("end", Create);
    let writes = got.iter().filter(|e| **e == ev("log", Write)).count();
    assert!((1..=3).contains(&writes), "{got:?}");
    assert_eq!(got.first(), Some(&ev("log", Create)));
    // The last write comes before what followed it (the close reports it at once).
    assert_eq!(got[got.len() - 2..], [ev("log", Write), ev("end", Create)]);
    rec.close();
    t.join().unwrap();
}

#[test]
fn a_recursive_watch_follows_its_tree() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::create_dir_all(dir.join("old/deep")).unwrap();
    let (rec, t) = established(dir, true);
    // A directory there before the watch.
    std::fs::write(dir.join("old/deep/f"), "x").unwrap();
    rec.wait_event("old/deep/f", Write);
    // A tree made at once: every level is reported (what was made before the watch reached it,
    // as created), and watched.
    std::fs::create_dir_all(dir.join("new/a/b")).unwrap();
    std::fs::write(dir.join("new/a/b/f"), "x").unwrap();
    rec.wait_event("new/a/b/f", Create);
    std::fs::write(dir.join("new/a/b/g"), "x").unwrap();
    rec.wait_event("new/a/b/g", Write);
    // Moved within the tree: its watches follow it.
    std::fs::rename(dir.join("new"), dir.join("moved")).unwrap();
    std::fs::write(dir.join("moved/a/b/h"), "x").unwrap();
    rec.wait_event("moved/a/b/h", Write);
    // Moved out: no longer watched.
    std::fs::rename(dir.join("moved/a"), outside.path().join("a")).unwrap();
    rec.wait_event("moved/a", Rename);
    std::fs::write(outside.path().join("a/b/gone"), "x").unwrap();
    // A symlink to a directory is an entry, not a subtree.
    std::os::unix::fs::symlink(outside.path(), dir.join("link")).unwrap();
    std::fs::write(outside.path().join("through-link"), "x").unwrap();
    // Moved in: watched.
    std::fs::create_dir_all(outside.path().join("in/x")).unwrap();
    std::fs::rename(outside.path().join("in"), dir.join("in")).unwrap();
    rec.wait_event("in", Create);
    std::fs::write(dir.join("in/x/y"), "x").unwrap();
    let got = rec.wait_event("in/x/y", Write);
    for want in [
        ev("old/deep/f", Create),
        ev("new", Create),
        ev("new/a", Create),
        ev("new/a/b", Create),
        ev("new/a/b/g", Create),
        ev("new", Rename),
        ev("moved", Create),
        ev("link", Create),
        ev("in/x/y", Create),
    ] {
        assert!(got.contains(&want), "{want:?} missing from {got:?}");
    }
    let stray: Vec<_> = got
        .iter()
        .filter(|(n, _)| n.contains("gone") || n.contains("through-link") || n == "in/x")
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    rec.close();
    t.join().unwrap();
}

#[test]
fn refusals_and_limits() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::write(dir.join("file"), "x").unwrap();
    let code = |rec: &Rec| match rec.wait("an answer", |a| !a.is_empty()).as_slice() {
        [Response::Error { code, .. }] => *code,
        other => panic!("{other:?}"),
    };
    let slots = Arc::new(Slots::default());
    let lim = Limits::default();
    let (rec, t) = watch(&dir.join("nope"), false, &slots, lim);
    assert_eq!(code(&rec), ErrorCode::NotFound);
    t.join().unwrap();
    let (rec, t) = watch(&dir.join("file"), false, &slots, lim);
    assert_eq!(code(&rec), ErrorCode::NotADirectory);
    t.join().unwrap();
    // Streams: one at a time here; the slot comes back when the stream ends.
    let one = Limits { streams: 1, ..lim };
    let (first, t1) = watch(dir, false, &slots, one);
    first.wait("watching", |a| !a.is_empty());
    let (rec, t) = watch(dir, false, &slots, one);
    assert_eq!(code(&rec), ErrorCode::ResourceExhausted);
    t.join().unwrap();
    first.close();
    t1.join().unwrap();
    assert_eq!(slots.open(), 0);
    // Directories: the watched one and two below fit three, a fourth is refused...
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    let three = Limits { watches: 3, ..lim };
    std::fs::create_dir(dir.join("c")).unwrap();
    let (rec, t) = watch(dir, true, &slots, three);
    let msg = rec.wait("a refusal", |a| !a.is_empty());
    assert!(
        matches!(&msg[..], [Response::Error { code: ErrorCode::ResourceExhausted, message }]
            if message.contains("more than 3 directories")),
        "{msg:?}"
    );
    t.join().unwrap();
    // ...and a tree that grows past the limit ends its watch.
    std::fs::remove_dir(dir.join("c")).unwrap();
    let (rec, t) = watch(dir, true, &slots, three);
    rec.wait("watching", |a| !a.is_empty());
    std::fs::create_dir(dir.join("c")).unwrap();
    let a = rec.wait("the end", |a| {
        matches!(a.last(), Some(Response::Error { .. }))
    });
    assert!(a.contains(&Response::FsEvent(FsEvent {
        name: "c".into(),
        kind: Create
    })));
    assert!(matches!(
        a.last(),
        Some(Response::Error {
            code: ErrorCode::ResourceExhausted,
            ..
        })
    ));
    t.join().unwrap();
    assert_eq!(slots.open(), 0);
}

#[test]
fn removing_the_watched_directory_ends_the_watch() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("w");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("f"), "x").unwrap();
    let (rec, t) = established(&dir, false);
    std::fs::remove_file(dir.join("f")).unwrap();
    std::fs::remove_dir(&dir).unwrap();
    let a = rec.wait("the end", |a| {
        matches!(a.last(), Some(Response::Error { .. }))
    });
    assert_eq!(events(&a), vec![ev("f", Remove)]);
    assert!(
        matches!(a.last(), Some(Response::Error { code: ErrorCode::NotFound, message })
            if message.contains("gone")),
        "{a:?}"
    );
    t.join().unwrap();
}

#[test]
fn without_credit_events_wait_coalesced() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let (rec, t) = established(d.path(), false);
    rec.set_credit(Some(0));
    std::fs::File::create(d.path().join("a")).unwrap();
    for i in 0..50 {
        chmod(&d.path().join("a"), 0o600 | (i % 2) << 6);
    }
    // Nothing is sent without credit; once it comes, the waiting events go, repeats as one.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(events(&rec.answers.lock().unwrap()), vec![]);
    rec.set_credit(None);
    let got = rec.wait_event("a", Chmod);
    assert_eq!(got, vec![ev("a", Create), ev("a", Chmod)]);
    rec.close();
    t.join().unwrap();
}

/// Frames the agent sent, decoded.
fn frames(rx: &std::sync::mpsc::Receiver<(u64, Vec<u8>)>, dec: &mut Decoder) -> Vec<Frame> {
    while let Ok((_, b)) = rx.recv_timeout(Duration::from_millis(20)) {
        dec.push(&b);
    }
    std::iter::from_fn(|| dec.next_frame()).collect()
}

#[test]
fn a_watch_request_streams_events_until_cancel_or_disconnect_closes_it() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let before = inotify_fds();
    let (shared, rx) = crate::serve::test_shared();
    let mut dec = Decoder::new();
    let req = |stream: u32, r: &Request| {
        crate::serve::handle(&shared, Frame::json(Kind::Request, stream, r));
    };
    let path = d.path().to_str().unwrap().to_string();
    let watch = Request::Watch {
        path: path.clone(),
        recursive: true,
    };
    let mut got: Vec<(u32, Response)> = Vec::new();
    let mut wait_for = |got: &mut Vec<(u32, Response)>, want: &(u32, Response)| {
        let end = Instant::now() + T;
        while !got.contains(want) {
            assert!(Instant::now() < end, "waiting for {want:?}; got {got:?}");
            for f in frames(&rx, &mut dec) {
                assert_eq!(f.kind, Kind::Response);
                got.push((f.stream, f.parse("response").unwrap()));
            }
        }
    };
    req(7, &watch);
    wait_for(&mut got, &(7, Response::Watching));
    assert_eq!(inotify_fds(), before + 1);
    std::fs::create_dir(d.path().join("x")).unwrap();
    let create = |name: &str| {
        Response::FsEvent(FsEvent {
            name: name.into(),
            kind: Create,
        })
    };
    wait_for(&mut got, &(7, create("x")));
    // Cancel: the thread ends and its inotify fd is closed.
    req(7, &Request::Cancel);
    wait_until("the cancelled watch's fd closed", || {
        inotify_fds() == before && shared.watches.open() == 0
    });
    // The host goes away: the same.
    req(9, &watch);
    wait_for(&mut got, &(9, Response::Watching));
    assert_eq!(shared.watches.open(), 1);
    shared.disconnect();
    wait_until("the lost connection's watch closed", || {
        inotify_fds() == before && shared.watches.open() == 0
    });
}

#[test]
fn watches_follow_directories_moved_out_and_in() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    std::fs::create_dir(dir.join("c")).unwrap();
    let mut ino = inotify::Inotify::open(dir.to_str().unwrap(), true, 100).unwrap();
    assert_eq!(ino.watches(), 4);
    let read_until = |ino: &mut inotify::Inotify, name: &str| {
        let mut changes = Vec::new();
        let end = Instant::now() + T;
        while !changes.iter().any(|c: &inotify::Change| c.name == name) {
            assert!(Instant::now() < end, "waiting for {name}: {changes:?}");
            poll2(ino.fd(), ino.fd(), Duration::from_millis(100));
            ino.read(&mut changes).unwrap();
        }
    };
    std::fs::rename(dir.join("a"), outside.path().join("a")).unwrap();
    read_until(&mut ino, "a");
    assert_eq!(ino.watches(), 2, "a and a/b are no longer watched");
    std::fs::rename(outside.path().join("a"), dir.join("c/a")).unwrap();
    read_until(&mut ino, "c/a");
    assert_eq!(ino.watches(), 4, "c/a and c/a/b are");
    std::fs::rename(dir.join("c"), dir.join("e")).unwrap();
    read_until(&mut ino, "e");
    assert_eq!(
        ino.watches(),
        4,
        "renamed within the tree: the same watches"
    );
    drop(ino);
}
