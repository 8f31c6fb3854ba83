//! Running processes and moving files for the host.
//!
//! As PID 1 the agent reaps every process in the VM, its own children and orphans alike. One
//! reaper thread calls `waitpid(-1)` and hands each exit status to whoever waits for that pid;
//! children are never waited on through `std::process::Child`.

use crate::serve::{Input, Session, Shared};
use crate::sys;
use hutch_proto::{ExecRequest, Frame, Kind, Response};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const CHUNK: usize = 64 * 1024;

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
fn resolve_user(spec: &str) -> Result<(u32, u32, Option<String>), String> {
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

fn pump(
    shared: Arc<Shared>,
    gen: u64,
    stream: u32,
    kind: Kind,
    mut r: impl Read,
    done: SyncSender<()>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => shared.send(gen, Frame::new(kind, stream, buf[..n].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = done.send(());
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
    shared.send(gen, Frame::new(Kind::Stderr, stream, m));
    let r = Response::Exited {
        code: Some(code),
        signal: None,
        timed_out: false,
    };
    shared.respond(gen, stream, &r);
}

fn run(shared: Arc<Shared>, gen: u64, stream: u32, req: ExecRequest, input_rx: Receiver<Input>) {
    let Some(prog) = req.argv.first() else {
        shared.end_session(stream, gen);
        shared.error(gen, stream, "bad_request", "argv is empty".into());
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

    if let Some(mut stdin) = child.stdin.take() {
        std::thread::spawn(move || {
            for msg in input_rx {
                match msg {
                    Input::Data(d) => {
                        if stdin.write_all(&d).is_err() {
                            break;
                        }
                    }
                    Input::Eof => break,
                }
            }
        });
    }
    let (done_tx, done_rx) = sync_channel(2);
    if let Some(out) = child.stdout.take() {
        let (s, d) = (shared.clone(), done_tx.clone());
        std::thread::spawn(move || pump(s, gen, stream, Kind::Stdout, out, d));
    }
    if let Some(err) = child.stderr.take() {
        let (s, d) = (shared.clone(), done_tx.clone());
        std::thread::spawn(move || pump(s, gen, stream, Kind::Stderr, err, d));
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
    // Output written before exit is in the pipes: drain it, but do not wait forever on
    // background processes that inherited them.
    for _ in 0..2 {
        if done_rx.recv_timeout(Duration::from_millis(500)).is_err() {
            break;
        }
    }
    let (code, signal) = status.map(decode_status).unwrap_or((None, None));
    let r = Response::Exited {
        code,
        signal,
        timed_out: timed_out.load(std::sync::atomic::Ordering::SeqCst),
    };
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
    if let Ok(mut w) = master.try_clone() {
        std::thread::spawn(move || {
            for msg in input_rx {
                match msg {
                    Input::Data(d) => {
                        if w.write_all(&d).is_err() {
                            break;
                        }
                    }
                    // ^D: end of input for a program reading the terminal.
                    Input::Eof => {
                        let _ = w.write_all(&[4]);
                    }
                }
            }
        });
    }
    let (done_tx, done_rx) = sync_channel(1);
    let s2 = shared.clone();
    std::thread::spawn(move || pump(s2, gen, stream, Kind::Stdout, master, done_tx));
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
    let _ = done_rx.recv_timeout(Duration::from_millis(500));
    let (code, signal) = status.map(decode_status).unwrap_or((None, None));
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

fn io_code(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => "not_found",
        std::io::ErrorKind::PermissionDenied => "permission_denied",
        _ => "io_error",
    }
}

pub fn read_file(shared: &Shared, gen: u64, stream: u32, path: &str) {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return shared.error(gen, stream, io_code(&e), format!("{path}: {e}")),
    };
    if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return shared.error(
            gen,
            stream,
            "is_directory",
            format!("{path} is a directory"),
        );
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                shared.send(gen, Frame::new(Kind::Stdout, stream, buf[..n].to_vec()));
            }
            Err(e) => return shared.error(gen, stream, io_code(&e), format!("{path}: {e}")),
        }
    }
    shared.respond(gen, stream, &Response::Done { bytes: total });
}

pub fn write_file(shared: Arc<Shared>, gen: u64, stream: u32, path: String, mode: Option<u32>) {
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
        let result = (|| -> std::io::Result<u64> {
            let p = std::path::Path::new(&path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f = std::fs::File::create(p)?;
            let mut total = 0u64;
            for msg in rx {
                match msg {
                    Input::Data(d) => {
                        f.write_all(&d)?;
                        total += d.len() as u64;
                    }
                    Input::Eof => {
                        f.sync_all()?;
                        f.set_permissions(std::fs::Permissions::from_mode(mode.unwrap_or(0o644)))?;
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

/// Runs a filesystem operation and answers on `stream`.
pub fn fs(shared: &Shared, gen: u64, stream: u32, req: hutch_proto::FsRequest) {
    use hutch_proto::FsRequest as F;
    let done = Response::Done { bytes: 0 };
    let r: std::io::Result<Response> = (|| {
        Ok(match req {
            F::Stat { path, follow } => {
                let md = if follow {
                    std::fs::metadata(&path)?
                } else {
                    std::fs::symlink_metadata(&path)?
                };
                Response::FsAttr { attr: attr(&md) }
            }
            F::ReadDir { path } => {
                let mut entries = Vec::new();
                for e in std::fs::read_dir(&path)? {
                    let e = e?;
                    if let Ok(md) = e.path().symlink_metadata() {
                        entries.push(hutch_proto::DirEntry {
                            name: e.file_name().to_string_lossy().to_string(),
                            attr: attr(&md),
                        });
                    }
                }
                Response::FsDir { entries }
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
