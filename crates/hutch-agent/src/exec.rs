//! Running processes and moving files for the host.
//!
//! As PID 1 the agent reaps every process in the VM, its own children and orphans alike. One
//! reaper thread calls `waitpid(-1)` and hands each exit status to whoever waits for that pid;
//! children are never waited on through `std::process::Child`.

use crate::serve::{Input, InputCredit, Session, Shared, CHUNK};
use crate::sys;
use crate::sys::io_code;
use hutch_proto::{ErrorCode, ExecRequest, Frame, Kind, Response};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct ReapState {
    waiters: HashMap<i32, SyncSender<i32>>,
    /// Statuses of pids reaped before their spawner registered (kept while spawns are in flight).
    unclaimed: HashMap<i32, i32>,
    spawning: usize,
    spawned: u64,
}

pub struct Reaper {
    state: Mutex<ReapState>,
    cv: Condvar,
}

impl Reaper {
    pub fn start() -> Arc<Reaper> {
        let r = Arc::new(Reaper {
            state: Mutex::new(ReapState::default()),
            cv: Condvar::new(),
        });
        let r2 = r.clone();
        std::thread::spawn(move || r2.run());
        r
    }

    /// A reaper whose thread never runs, for tests (it would reap the test runner's children).
    #[cfg(test)]
    pub fn idle() -> Arc<Reaper> {
        Arc::new(Reaper {
            state: Mutex::new(ReapState::default()),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReapState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        loop {
            let seen = self.lock().spawned;
            match sys::wait_any() {
                Ok((pid, status)) => {
                    let mut st = self.lock();
                    if let Some(tx) = st.waiters.remove(&pid) {
                        let _ = tx.send(status);
                    } else if st.spawning > 0 && st.unclaimed.len() < 4096 {
                        st.unclaimed.insert(pid, status);
                    }
                }
                Err(_) => {
                    // No children: sleep until a spawn (or, for orphans, a second).
                    let st = self.lock();
                    let _ = self
                        .cv
                        .wait_timeout_while(st, Duration::from_secs(1), |s| s.spawned == seen);
                }
            }
        }
    }

    /// Spawns `cmd` and returns its pid and a receiver of its raw wait status.
    fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(std::process::Child, std::sync::mpsc::Receiver<i32>)> {
        self.lock().spawning += 1;
        let res = cmd.spawn();
        let mut st = self.lock();
        st.spawning -= 1;
        let child = match res {
            Ok(c) => c,
            Err(e) => {
                if st.spawning == 0 {
                    st.unclaimed.clear();
                }
                return Err(e);
            }
        };
        let pid = child.id() as i32;
        let (tx, rx) = sync_channel(1);
        if let Some(status) = st.unclaimed.remove(&pid) {
            let _ = tx.send(status);
        } else {
            st.waiters.insert(pid, tx);
        }
        if st.spawning == 0 {
            st.unclaimed.clear();
        }
        st.spawned += 1;
        drop(st);
        self.cv.notify_all();
        Ok((child, rx))
    }
}

/// uid, gid and home of a user spec, resolved against /etc/passwd and /etc/group.
pub(crate) fn resolve_user(spec: &str) -> Result<(u32, u32, Option<String>), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == u || (f[2] == u && u.parse::<u32>().is_ok())));
    let (uid, mut gid, home) = match (&entry, u.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| format!("bad uid for {u} in /etc/passwd"))?,
            f[3].parse()
                .map_err(|_| format!("bad gid for {u} in /etc/passwd"))?,
            Some(f[5].to_string()),
        ),
        (None, Ok(n)) => (n, n, None),
        (None, Err(_)) => {
            return Err(format!(
                "unknown user {u:?} (not in the image's /etc/passwd)"
            ))
        }
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("unknown group {g:?} (not in the image's /etc/group)"))?,
        };
    }
    Ok((uid, gid, home))
}

fn decode_status(status: i32) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

/// How the output pumps of one process are doing, so the exit path can tell "still sending to a
/// slow host" (wait) from "pipe held open by a background child" (stop waiting).
#[derive(Default)]
struct PumpProgress {
    frames: AtomicU64,
    waiting_for_credit: AtomicUsize,
}

impl PumpProgress {
    /// Waits for `n` pumps to finish after the process exited: as long as they make progress or
    /// wait for the host's credit, but no more than 0.5 s of idle pipes.
    fn drain(&self, done: &Receiver<()>, n: usize) {
        let mut left = n;
        let mut seen = self.frames.load(Ordering::SeqCst);
        while left > 0 {
            match done.recv_timeout(Duration::from_millis(500)) {
                Ok(()) => left -= 1,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let now = self.frames.load(Ordering::SeqCst);
                    if now == seen && self.waiting_for_credit.load(Ordering::SeqCst) == 0 {
                        return;
                    }
                    seen = now;
                }
                Err(_) => return,
            }
        }
    }
}

/// Copies `r` to the host as `kind` frames, reading only as much as the stream has credit for:
/// when the host stops taking output, the pipe fills and the writer blocks.
fn pump(
    shared: Arc<Shared>,
    gen: u64,
    stream: u32,
    kind: Kind,
    mut r: impl Read,
    progress: Arc<PumpProgress>,
    done: SyncSender<()>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        progress.waiting_for_credit.fetch_add(1, Ordering::SeqCst);
        let credit = shared.acquire(gen, stream, CHUNK);
        progress.waiting_for_credit.fetch_sub(1, Ordering::SeqCst);
        let Some(credit) = credit else { break };
        match r.read(&mut buf[..credit]) {
            Ok(0) => {
                shared.release(stream, credit);
                break;
            }
            Ok(n) => {
                shared.release(stream, credit - n);
                shared.send(gen, Frame::new(kind, stream, buf[..n].to_vec()));
                progress.frames.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => shared.release(stream, credit),
            Err(_) => {
                shared.release(stream, credit);
                break;
            }
        }
    }
    let _ = done.send(());
}

/// Feeds a stream's input to `w`, returning credit to the host as it goes. After `w` fails (the
/// process closed its stdin) input is still taken and dropped, so the host's sender finishes.
fn feed(
    shared: Arc<Shared>,
    gen: u64,
    stream: u32,
    mut w: impl Write,
    rx: Receiver<Input>,
    tty: bool,
) {
    let mut credit = InputCredit::new(gen, stream);
    let mut broken = false;
    for msg in rx {
        match msg {
            Input::Data(d) => {
                if !broken && w.write_all(&d).is_err() {
                    broken = true;
                }
                credit.consumed(&shared, d.len());
            }
            // ^D: end of input for a program reading the terminal.
            Input::Eof if tty => {
                let _ = w.write_all(&[4]);
            }
            Input::Eof => break,
        }
    }
}

/// Starts `req` on its own thread; all results go to the host as frames on `stream`.
pub fn start(shared: Arc<Shared>, gen: u64, stream: u32, req: ExecRequest) {
    // Register before returning to the reader loop, so stdin frames that follow the request
    // find the session.
    let (input_tx, input_rx) = channel::<Input>();
    {
        let mut s = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(
            stream,
            Session {
                gen,
                pgid: None,
                pty: None,
                input: req.stdin.then_some(input_tx),
            },
        );
    }
    std::thread::spawn(move || run(shared, gen, stream, req, input_rx));
}

fn fail(shared: &Shared, gen: u64, stream: u32, code: i32, msg: String) {
    let mut m = msg.into_bytes();
    m.push(b'\n');
    shared.send_data(gen, stream, Kind::Stderr, &m);
    let r = Response::Exited {
        code: Some(code),
        signal: None,
        timed_out: false,
    };
    shared.close_credit(stream);
    shared.respond(gen, stream, &r);
}

fn run(shared: Arc<Shared>, gen: u64, stream: u32, req: ExecRequest, input_rx: Receiver<Input>) {
    let Some(prog) = req.argv.first() else {
        shared.end_session(stream, gen);
        shared.close_credit(stream);
        shared.error(gen, stream, ErrorCode::BadRequest, "argv is empty".into());
        return;
    };
    let mut cmd = Command::new(prog);
    cmd.args(&req.argv[1..]).env_clear().envs(&req.env);
    cmd.current_dir(req.cwd.as_deref().filter(|c| !c.is_empty()).unwrap_or("/"));
    if let Some(user) = req.user.as_deref().filter(|u| !u.is_empty()) {
        match resolve_user(user) {
            Ok((uid, gid, home)) => {
                cmd.uid(uid).gid(gid);
                if let (false, Some(h)) = (req.env.contains_key("HOME"), home) {
                    cmd.env("HOME", h);
                }
            }
            Err(e) => {
                shared.end_session(stream, gen);
                return fail(&shared, gen, stream, 126, format!("hutch: {e}"));
            }
        }
    } else if !req.env.contains_key("HOME") {
        cmd.env("HOME", "/root");
    }
    let mut pty: Option<std::fs::File> = None;
    if req.detach {
        let console = || {
            std::fs::OpenOptions::new()
                .append(true)
                .open("/dev/console")
        };
        match (console(), console()) {
            (Ok(o), Ok(e)) => {
                cmd.stdin(Stdio::null()).stdout(o).stderr(e);
            }
            (Err(e), _) | (_, Err(e)) => {
                shared.end_session(stream, gen);
                let msg = format!("hutch: opening the console: {e}");
                return fail(&shared, gen, stream, 126, msg);
            }
        }
    } else if let Some(size) = req.tty {
        let (m, sl) = match sys::openpty(size) {
            Ok(p) => p,
            Err(e) => {
                shared.end_session(stream, gen);
                return fail(&shared, gen, stream, 126, format!("hutch: openpty: {e}"));
            }
        };
        let dup = |f: &std::fs::File| f.try_clone().map(Stdio::from);
        match (dup(&sl), dup(&sl), dup(&sl)) {
            (Ok(a), Ok(b), Ok(c)) => {
                cmd.stdin(a).stdout(b).stderr(c);
            }
            _ => {
                shared.end_session(stream, gen);
                return fail(
                    &shared,
                    gen,
                    stream,
                    126,
                    "hutch: cannot set up the terminal".into(),
                );
            }
        }
        pty = Some(m);
    } else {
        let stdin = if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let tty = req.tty.is_some();
    // SAFETY: the closure only calls async-signal-safe functions (setsid, ioctl, sigprocmask).
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if tty {
                // The terminal on stdin becomes the controlling terminal of the new session.
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let (mut child, status_rx) = match shared.reaper.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            shared.end_session(stream, gen);
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            };
            let cwd = req.cwd.as_deref().unwrap_or("/");
            return fail(
                &shared,
                gen,
                stream,
                code,
                format!("hutch: cannot run {prog:?} (cwd {cwd}): {e}"),
            );
        }
    };
    let pid = child.id() as i32;
    if req.detach {
        // Not tied to this connection: never killed on disconnect; the reaper collects it.
        shared.end_session(stream, gen);
        shared.close_credit(stream);
        eprintln!("hutch-agent: started main process {pid}: {:?}", req.argv);
        shared.respond(gen, stream, &Response::Started { pid });
        return;
    }
    // The parent keeps only the master side of a terminal.
    drop(cmd);
    if let Some(sess) = shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(&stream)
    {
        sess.pgid = Some(pid);
        sess.pty = pty.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    }
    shared.respond(gen, stream, &Response::Started { pid });
    if let Some(master) = pty.take() {
        return run_tty(
            shared,
            gen,
            stream,
            master,
            input_rx,
            status_rx,
            req.timeout_ms,
            pid,
        );
    }

    if let Some(stdin) = child.stdin.take() {
        let s = shared.clone();
        std::thread::spawn(move || feed(s, gen, stream, stdin, input_rx, false));
    }
    let (done_tx, done_rx) = sync_channel(2);
    let progress = Arc::new(PumpProgress::default());
    let mut pumps = 0;
    if let Some(out) = child.stdout.take() {
        let (s, d, p) = (shared.clone(), done_tx.clone(), progress.clone());
        std::thread::spawn(move || pump(s, gen, stream, Kind::Stdout, out, p, d));
        pumps += 1;
    }
    if let Some(err) = child.stderr.take() {
        let (s, d, p) = (shared.clone(), done_tx.clone(), progress.clone());
        std::thread::spawn(move || pump(s, gen, stream, Kind::Stderr, err, p, d));
        pumps += 1;
    }
    drop(done_tx);

    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let status = match req.timeout_ms {
        Some(ms) => match status_rx.recv_timeout(Duration::from_millis(ms)) {
            Ok(s) => Some(s),
            Err(_) => {
                timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = sys::kill(-pid, libc::SIGKILL);
                let _ = sys::kill(pid, libc::SIGKILL);
                status_rx.recv().ok()
            }
        },
        None => status_rx.recv().ok(),
    };
    // Output written before exit is in the pipes: drain it (however slowly the host takes it),
    // but do not wait on background processes that inherited the pipes and stay quiet.
    progress.drain(&done_rx, pumps);
    let (code, signal) = status.map(decode_status).unwrap_or((None, None));
    let r = Response::Exited {
        code,
        signal,
        timed_out: timed_out.load(std::sync::atomic::Ordering::SeqCst),
    };
    shared.close_credit(stream);
    shared.respond(gen, stream, &r);
    shared.end_session(stream, gen);
}

/// The rest of a `tty` exec: the master carries output and input; it ends when the process
/// exits and the terminal is drained (reads fail with EIO once no process holds the slave).
#[allow(clippy::too_many_arguments)]
fn run_tty(
    shared: Arc<Shared>,
    gen: u64,
    stream: u32,
    master: std::fs::File,
    input_rx: Receiver<Input>,
    status_rx: std::sync::mpsc::Receiver<i32>,
    timeout_ms: Option<u64>,
    pid: i32,
) {
    if let Ok(w) = master.try_clone() {
        let s = shared.clone();
        std::thread::spawn(move || feed(s, gen, stream, w, input_rx, true));
    }
    let (done_tx, done_rx) = sync_channel(1);
    let s2 = shared.clone();
    let progress = Arc::new(PumpProgress::default());
    let p2 = progress.clone();
    std::thread::spawn(move || pump(s2, gen, stream, Kind::Stdout, master, p2, done_tx));
    let mut timed_out = false;
    let status = match timeout_ms {
        Some(ms) => match status_rx.recv_timeout(Duration::from_millis(ms)) {
            Ok(s) => Some(s),
            Err(_) => {
                timed_out = true;
                let _ = sys::kill(-pid, libc::SIGKILL);
                status_rx.recv().ok()
            }
        },
        None => status_rx.recv().ok(),
    };
    progress.drain(&done_rx, 1);
    let (code, signal) = status.map(decode_status).unwrap_or((None, None));
    shared.close_credit(stream);
    shared.respond(
        gen,
        stream,
        &Response::Exited {
            code,
            signal,
            timed_out,
        },
    );
    shared.end_session(stream, gen);
}

/// Sends `len` bytes (or all) of `path` from `offset`, within the stream's credit.
pub fn read_file(
    shared: &Shared,
    gen: u64,
    stream: u32,
    path: &str,
    offset: u64,
    len: Option<u64>,
    user: Option<&str>,
) {
    use std::io::{Seek, SeekFrom};
    if let Some(u) = user {
        if let Err(e) = crate::creds::become_user(u) {
            return shared.error(gen, stream, io_code(&e), format!("{path}: {e}"));
        }
    }
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return shared.error(gen, stream, io_code(&e), format!("{path}: {e}")),
    };
    if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return shared.error(
            gen,
            stream,
            ErrorCode::IsDirectory,
            format!("{path} is a directory"),
        );
    }
    if offset > 0 {
        if let Err(e) = f.seek(SeekFrom::Start(offset)) {
            return shared.error(gen, stream, io_code(&e), format!("{path}: {e}"));
        }
    }
    let mut left = len.unwrap_or(u64::MAX);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    while left > 0 {
        let want = CHUNK.min(usize::try_from(left).unwrap_or(CHUNK));
        let Some(credit) = shared.acquire(gen, stream, want) else {
            // The host went away or gave up on this read.
            return;
        };
        match f.read(&mut buf[..credit]) {
            Ok(0) => {
                shared.release(stream, credit);
                break;
            }
            Ok(n) => {
                shared.release(stream, credit - n);
                total += n as u64;
                left -= n as u64;
                shared.send(gen, Frame::new(Kind::Stdout, stream, buf[..n].to_vec()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => shared.release(stream, credit),
            Err(e) => return shared.error(gen, stream, io_code(&e), format!("{path}: {e}")),
        }
    }
    shared.respond(gen, stream, &Response::Done { bytes: total });
}

/// Writes the stream's input to `path`: created or truncated without `offset`, written in place
/// at `offset` otherwise; credit goes back to the host as bytes reach the file.
pub fn write_file(
    shared: Arc<Shared>,
    gen: u64,
    stream: u32,
    path: String,
    mode: Option<u32>,
    offset: Option<u64>,
    user: Option<String>,
) {
    let (tx, rx) = channel();
    shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            stream,
            Session {
                gen,
                pgid: None,
                pty: None,
                input: Some(tx),
            },
        );
    std::thread::spawn(move || {
        let mut credit = InputCredit::new(gen, stream);
        let result = (|| -> std::io::Result<u64> {
            if let Some(u) = &user {
                crate::creds::become_user(u)?;
            }
            use std::io::{Seek, SeekFrom};
            use std::os::unix::fs::OpenOptionsExt;
            let p = std::path::Path::new(&path);
            let mut f = match offset {
                None => {
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::File::create(p)?
                }
                Some(off) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .mode(mode.unwrap_or(0o644))
                        .open(p)?;
                    f.seek(SeekFrom::Start(off))?;
                    f
                }
            };
            let mut total = 0u64;
            for msg in rx {
                match msg {
                    Input::Data(d) => {
                        f.write_all(&d)?;
                        total += d.len() as u64;
                        credit.consumed(&shared, d.len());
                    }
                    Input::Eof => {
                        if offset.is_none() {
                            f.sync_all()?;
                            let perm = std::fs::Permissions::from_mode(mode.unwrap_or(0o644));
                            f.set_permissions(perm)?;
                        }
                        return Ok(total);
                    }
                }
            }
            Err(std::io::Error::other(
                "connection closed before the end of the file",
            ))
        })();
        shared.end_session(stream, gen);
        match result {
            Ok(bytes) => shared.respond(gen, stream, &Response::Done { bytes }),
            Err(e) => shared.error(gen, stream, io_code(&e), format!("{path}: {e}")),
        }
    });
}

fn attr(md: &std::fs::Metadata) -> hutch_proto::FileAttr {
    use std::os::unix::fs::MetadataExt;
    hutch_proto::FileAttr {
        size: md.len(),
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        atime: md.atime(),
        mtime: md.mtime(),
    }
}

/// Runs a filesystem operation (as guest user `user`, on this thread) and answers on
/// `stream`.
pub fn fs(shared: &Shared, gen: u64, stream: u32, req: hutch_proto::FsRequest, user: Option<&str>) {
    use hutch_proto::FsRequest as F;
    let done = Response::Done { bytes: 0 };
    let r: std::io::Result<Response> = (|| {
        if let Some(u) = user {
            crate::creds::become_user(u)?;
        }
        Ok(match req {
            F::Stat { path, follow } => {
                let md = if follow {
                    std::fs::metadata(&path)?
                } else {
                    std::fs::symlink_metadata(&path)?
                };
                Response::FsAttr { attr: attr(&md) }
            }
            F::ReadDir { path, skip } => {
                let mut entries = Vec::new();
                let mut more = false;
                let mut next = skip;
                let skip = usize::try_from(skip).unwrap_or(usize::MAX);
                for e in std::fs::read_dir(&path)?.skip(skip) {
                    if entries.len() == hutch_proto::DIR_PAGE {
                        more = true;
                        break;
                    }
                    next += 1;
                    let e = e?;
                    // An entry removed meanwhile is left out (it still counts as a position).
                    if let Ok(md) = e.path().symlink_metadata() {
                        entries.push(hutch_proto::DirEntry {
                            name: e.file_name().to_string_lossy().to_string(),
                            attr: attr(&md),
                        });
                    }
                }
                Response::FsDir {
                    entries,
                    more,
                    next,
                }
            }
            F::Mkdir { path, mode } => {
                std::fs::create_dir(&path)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
                done
            }
            F::Remove { path } => {
                std::fs::remove_file(&path)?;
                done
            }
            F::Rmdir { path } => {
                std::fs::remove_dir(&path)?;
                done
            }
            F::Rename { from, to } => {
                std::fs::rename(&from, &to)?;
                done
            }
            F::Realpath { path } => Response::FsPath {
                path: std::fs::canonicalize(&path)?.to_string_lossy().to_string(),
            },
            F::Readlink { path } => Response::FsPath {
                path: std::fs::read_link(&path)?.to_string_lossy().to_string(),
            },
            F::Symlink { target, link } => {
                std::os::unix::fs::symlink(&target, &link)?;
                done
            }
            F::Chmod { path, mode } => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
                done
            }
        })
    })();
    match r {
        Ok(resp) => shared.respond(gen, stream, &resp),
        Err(e) => shared.error(gen, stream, io_code(&e), e.to_string()),
    }
}
