//! The SSH front door: the SSH key is the identity.
//!
//! `ssh -p 2222 HOST COMMAND` runs a control command (new, ls, describe, stop, start, rm, logs,
//! status, whoami, keys, adduser) for the account the key belongs to; `ssh -p 2222 VM@HOST`
//! lands in the VM (a PTY shell, or the command given, with stdin/stdout/stderr and the exit
//! status passed through the guest agent). A user sees and touches only their own VMs (admins
//! all): another account's VM answers as if it did not exist. Only public-key auth is offered.

mod control;
mod limits;
mod pool;
mod quota;
mod signup;
mod snap_cmds;
mod template_cmds;

pub use limits::{Limits, PendingSlot};
pub use signup::Signup;

use crate::agent::{AgentError, ExecEvent, ExecHandle};
use crate::auth::Caller;
use crate::service::{CreateVm, ExecVm, Service};
use hutch_core::{Account, Vm, VmState};
use hutch_proto::TtySize;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Most session channels one connection may have open.
const MAX_CHANNELS: usize = 16;

#[derive(Debug, Clone)]
pub struct SshOptions {
    pub listen: SocketAddr,
    /// OpenSSH public keys of the admin account (re-read at every start).
    pub admin_keys: Option<PathBuf>,
    /// Host name shown in "Connect:" lines.
    pub host_name: String,
    /// Refused key offers from one address within 5 minutes before it is refused outright.
    pub max_auth_failures: u32,
    /// Seconds a connection has to log in.
    pub auth_timeout_secs: u64,
    /// SSH logins in progress from one address.
    pub max_pending_per_address: usize,
    /// What happens to keys no account has.
    pub signup: Signup,
}

fn err(m: impl std::fmt::Display) -> crate::DaemonError {
    crate::DaemonError::Setup(m.to_string())
}

/// Loads the host key, generating it at first start.
pub fn host_key(path: &Path) -> Result<PrivateKey, crate::DaemonError> {
    if let Some(pem) = crate::secrets::read(path).map_err(err)? {
        return PrivateKey::from_openssh(&pem)
            .map_err(|e| err(format!("host key {}: {e}", path.display())));
    }
    let seed: [u8; 32] = rand::random();
    let key = PrivateKey::new(
        KeypairData::from(Ed25519Keypair::from_seed(&seed)),
        "hutchd",
    )
    .map_err(err)?;
    let pem = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(err)?;
    crate::secrets::write(path, pem.as_bytes()).map_err(err)?;
    Ok(key)
}

fn fingerprint(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

/// Parses OpenSSH public key lines; refuses RSA under 2048 bits and unknown types.
pub fn parse_keys(text: &str) -> Result<Vec<PublicKey>, String> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let k =
            PublicKey::from_openssh(line).map_err(|e| format!("not an OpenSSH public key: {e}"))?;
        if let Some(rsa) = k.key_data().rsa() {
            let bits = rsa
                .n()
                .as_positive_bytes()
                .map(|b| b.len() * 8)
                .unwrap_or(0);
            if bits < 2048 {
                return Err(format!(
                    "RSA keys must have at least 2048 bits, this one has {bits}"
                ));
            }
        }
        out.push(k);
    }
    if out.is_empty() {
        return Err("no public key given".into());
    }
    Ok(out)
}

/// The fingerprint of an OpenSSH public key line.
fn line_fingerprint(line: &str) -> Option<String> {
    PublicKey::from_openssh(line).ok().map(|k| fingerprint(&k))
}

async fn account_of(m: &Service, fp: &str) -> Option<Account> {
    m.account_by_key(fp, line_fingerprint).await.ok()?
}

/// Makes the admin account's keys those of the admin keys file.
pub async fn sync_admin(m: &Service, file: &Path) -> Result<usize, crate::DaemonError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| err(format!("admin keys {}: {e}", file.display())))?;
    let keys = parse_keys(&text).map_err(|e| err(format!("admin keys {}: {e}", file.display())))?;
    let lines: Vec<String> = keys.iter().filter_map(|k| k.to_openssh().ok()).collect();
    m.set_admin_keys(lines)
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(keys.len())
}

pub async fn serve(m: Arc<Service>, opts: SshOptions) -> Result<(), crate::DaemonError> {
    let key = host_key(&m.cfg().data_dir.join("ssh_host_ed25519_key"))?;
    if let Some(f) = &opts.admin_keys {
        let n = sync_admin(&m, f).await?;
        tracing::info!(keys = n, file = %f.display(), "admin keys loaded");
    }
    let config = server::Config {
        keys: vec![key],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: std::time::Duration::from_millis(500),
        auth_rejection_time_initial: Some(std::time::Duration::from_millis(0)),
        inactivity_timeout: Some(std::time::Duration::from_secs(3600)),
        max_auth_attempts: 6,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| err(format!("binding {}: {e}", opts.listen)))?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(2222);
    tracing::info!(addr = %opts.listen, "ssh front door listening");
    let limits = Arc::new(Limits {
        max_failures: opts.max_auth_failures,
        max_pending_per_ip: opts.max_pending_per_address,
        auth_deadline: std::time::Duration::from_secs(opts.auth_timeout_secs),
        ..Limits::default()
    });
    let config = Arc::new(config);
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "ssh accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Refused: too many failed logins from this address, or too many logins in progress.
        let Some(slot) = limits.admit(peer.ip()) else {
            drop(sock);
            continue;
        };
        let authed = Arc::new(AtomicBool::new(false));
        let pool_addr = pool::pool_addr(&m, sock.local_addr().ok());
        let conn = Conn {
            pool_addr,
            m: m.clone(),
            host: opts.host_name.clone(),
            port,
            peer: Some(peer),
            account: None,
            key_fp: String::new(),
            user: String::new(),
            chans: HashMap::new(),
            limits: limits.clone(),
            slot: Some(slot),
            authed: authed.clone(),
            signup: opts.signup,
            unknown_key: None,
            _counted: None,
        };
        let config = config.clone();
        let deadline = limits.auth_deadline;
        // A second handle on the socket: shutting it down ends a login that takes too long
        // (russh runs the session in its own task), and holding it keeps the fd from reuse.
        let keep = match std::os::fd::AsFd::as_fd(&sock).try_clone_to_owned() {
            Ok(fd) => fd,
            Err(_) => continue,
        };
        tokio::spawn(async move {
            let session = match tokio::time::timeout(
                deadline,
                server::run_stream(config, sock, conn),
            )
            .await
            {
                Ok(Ok(s)) => s,
                _ => return,
            };
            tokio::pin!(session);
            tokio::select! {
                r = &mut session => {
                    if let Err(e) = r {
                        tracing::debug!(error = ?e, ?peer, "ssh session ended with an error");
                    }
                    return;
                }
                _ = tokio::time::sleep(deadline) => {}
            }
            if !authed.load(Ordering::SeqCst) {
                tracing::info!(?peer, "ssh login timed out");
                // SAFETY: shutdown on an fd we own; it ends the session's reads and writes.
                unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&keep), libc::SHUT_RDWR) };
            }
            if let Err(e) = session.await {
                tracing::debug!(error = ?e, ?peer, "ssh session ended with an error");
            }
            drop(keep);
        });
    }
}

#[derive(Default)]
struct Chan {
    pty: Option<TtySize>,
    term: String,
    /// The process of a VM session: its input, signals and terminal size.
    vm: Option<ExecHandle>,
    /// A control command that reads stdin, run at EOF.
    pending: Option<Vec<String>>,
    /// The channel itself, kept until we know whether it becomes an SFTP subsystem (then it is
    /// handed over) or anything else (then it is dropped: an unread channel would stall).
    channel: Option<Channel<Msg>>,
    stdin: Vec<u8>,
}

pub struct Conn {
    limits: Arc<Limits>,
    /// Held until the login succeeds.
    slot: Option<PendingSlot>,
    authed: Arc<AtomicBool>,
    m: Arc<Service>,
    host: String,
    port: u16,
    peer: Option<SocketAddr>,
    account: Option<Account>,
    key_fp: String,
    user: String,
    /// The `--ssh-pool` address the client connected to (then it names the VM, not `user`).
    pool_addr: Option<std::net::Ipv4Addr>,
    chans: HashMap<ChannelId, Chan>,
    signup: Signup,
    /// A verified key without an account (`--signup invite`), as OpenSSH text: it may only
    /// redeem an invite.
    unknown_key: Option<String>,
    /// Counts the connection in the SSH session metrics while it is logged in.
    _counted: Option<SessionCount>,
}

/// One logged-in SSH connection in `hutch_ssh_sessions`; uncounted when dropped.
struct SessionCount(Arc<Service>);

impl SessionCount {
    fn new(m: &Arc<Service>) -> SessionCount {
        m.metrics.ssh_sessions.fetch_add(1, Ordering::Relaxed);
        m.metrics.ssh_sessions_total.fetch_add(1, Ordering::Relaxed);
        SessionCount(m.clone())
    }
}

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.metrics.ssh_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a control command prints and returns.
struct Out {
    stdout: String,
    stderr: String,
    code: u32,
}

impl Out {
    fn ok(s: impl Into<String>) -> Out {
        Out {
            stdout: s.into(),
            stderr: String::new(),
            code: 0,
        }
    }
    fn fail(s: impl Into<String>) -> Out {
        let mut e: String = s.into();
        if !e.ends_with('\n') {
            e.push('\n');
        }
        Out {
            stdout: String::new(),
            stderr: e,
            code: 1,
        }
    }
}

impl Conn {
    fn account(&self) -> &Account {
        // Only authenticated connections reach channel handlers.
        self.account.as_ref().expect("authenticated")
    }

    fn caller(&self) -> Caller {
        let a = self.account();
        Caller {
            account: a.name.clone(),
            admin: a.admin,
        }
    }

    /// The VM `name` means for this account (its own namespace; see tenancy.rs).
    async fn find(&self, name: &str) -> Option<Vm> {
        self.m.vm_for(&self.caller(), name).await.ok()
    }

    fn connect_line(&self, name: &str) -> String {
        format!("ssh -p {} {name}@{}", self.port, self.host)
    }

    fn describe(&self, v: &Vm) -> String {
        hutch_core::render::describe(v, Some(&self.host), &self.connect_line(&v.name))
    }

    fn finish(
        &mut self,
        ch: ChannelId,
        out: Out,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if !out.stdout.is_empty() {
            session.data(ch, out.stdout.into_bytes())?;
        }
        if !out.stderr.is_empty() {
            session.extended_data(ch, 1, out.stderr.into_bytes())?;
        }
        session.exit_status_request(ch, out.code)?;
        session.eof(ch)?;
        session.close(ch)?;
        self.chans.remove(&ch);
        Ok(())
    }

    /// Runs `argv` in the VM the user logged into, wiring the channel to the agent stream.
    async fn vm_exec(
        &mut self,
        ch: ChannelId,
        argv: Vec<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let name = self.user.clone();
        let Some(vm) = self.find(&name).await else {
            return self.finish(ch, Out::fail(format!("{name}: no such VM")), session);
        };
        if vm.state != VmState::Running && !crate::service::timers::wakes_on_use(&vm) {
            let msg = format!(
                "{name} is {}; run: ssh -p {} {} start {name}",
                vm.state.as_str(),
                self.port,
                self.host
            );
            return self.finish(ch, Out::fail(msg), session);
        }
        let caller = self.caller();
        let c = self.chans.entry(ch).or_default();
        let mut env = HashMap::new();
        if c.pty.is_some() {
            env.insert(
                "TERM".to_string(),
                if c.term.is_empty() {
                    "xterm".into()
                } else {
                    c.term.clone()
                },
            );
        }
        let req = ExecVm {
            argv,
            env,
            tty: c.pty.map(|t| (t.rows, t.cols)),
            stream_stdin: true,
            ..Default::default()
        };
        let mut stream = match self.m.exec(&caller, &name, req).await {
            Ok(x) => x,
            Err(e) => return self.finish(ch, Out::fail(e.to_string()), session),
        };
        c.vm = Some(stream.handle());
        let handle = session.handle();
        tokio::spawn(async move {
            // 255 unless the process exits: the agent refused it or its connection was lost.
            let mut code = 255u32;
            loop {
                match stream.next().await {
                    Ok(Some(ExecEvent::Stdout(b))) => {
                        let _ = handle.data(ch, b).await;
                    }
                    Ok(Some(ExecEvent::Stderr(b))) => {
                        let _ = handle.extended_data(ch, 1, b).await;
                    }
                    Ok(Some(ExecEvent::Started { .. })) => {}
                    Ok(Some(ExecEvent::Exited {
                        code: c, signal, ..
                    })) => {
                        code = c
                            .map(|c| c as u32)
                            .unwrap_or(128 + signal.unwrap_or(0) as u32);
                        break;
                    }
                    Err(AgentError::Guest { message, .. }) => {
                        let _ = handle
                            .extended_data(ch, 1, format!("{message}\n").into_bytes())
                            .await;
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = handle.exit_status_request(ch, code).await;
            let _ = handle.eof(ch).await;
            let _ = handle.close(ch).await;
        });
        Ok(())
    }

    async fn is_vm_user(&self) -> bool {
        self.account.is_some() && self.find(&self.user).await.is_some()
    }
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Unknown keys are refused before the client proves it holds them, and counted
        // (unless unknown keys may sign up).
        if account_of(&self.m, &fingerprint(offer.public_key))
            .await
            .is_some()
            || self.signup != Signup::Closed
        {
            return Ok(Auth::Accept);
        }
        if let Some(p) = self.peer {
            self.limits.failed(p.ip());
        }
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fp = fingerprint(key.public_key);
        let known = account_of(&self.m, &fp).await;
        let line = key.public_key.to_openssh().unwrap_or_default();
        let known = match (known, self.signup) {
            (Some(acc), _) => Some(acc),
            (None, Signup::Open) => match self.peer.map(|p| self.limits.signup(p.ip())) {
                Some(false) => {
                    tracing::warn!(peer = ?self.peer, "ssh sign-up refused: too many from this address");
                    None
                }
                _ => {
                    let acc = self.m.sign_up(&signup::name_for(&fp), &line).await.ok();
                    if let Some(a) = &acc {
                        tracing::info!(account = %a.name, peer = ?self.peer, "ssh sign-up");
                    }
                    acc
                }
            },
            (None, Signup::Invite) => {
                tracing::info!(%fp, peer = ?self.peer, "ssh login of a key without an account (may redeem an invite)");
                self.unknown_key = Some(line);
                self.key_fp = fp;
                self.authed.store(true, Ordering::SeqCst);
                self.slot = None;
                self.user = user.to_string();
                return Ok(Auth::Accept);
            }
            (None, Signup::Closed) => None,
        };
        // On a pool address the address names the VM: the account must have one there.
        let pool_vm = match (&known, self.pool_addr) {
            (Some(acc), Some(ip)) => match pool::vm_at(&self.m, acc, ip) {
                Some(vm) => Some(vm),
                None => return Ok(Auth::reject()),
            },
            _ => None,
        };
        match known {
            Some(acc) => {
                self._counted = Some(SessionCount::new(&self.m));
                tracing::info!(account = %acc.name, user, peer = ?self.peer, "ssh login");
                self.account = Some(acc);
                self.key_fp = fp;
                self.authed.store(true, Ordering::SeqCst);
                self.slot = None;
                self.user = pool_vm.unwrap_or_else(|| user.to_string());
                Ok(Auth::Accept)
            }
            None => {
                tracing::info!(%fp, peer = ?self.peer, "ssh key refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(Some(format!(
            "hutch: access is by SSH key. If you are refused, ask an admin to run: ssh -p {} {} adduser NAME < your_key.pub\n",
            self.port, self.host
        )))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.chans.len() >= MAX_CHANNELS {
            tracing::warn!(peer = ?self.peer, "ssh channel refused: {MAX_CHANNELS} open on one connection");
            return Ok(()); // dropping the reply rejects the channel
        }
        let id = channel.id();
        self.chans.insert(
            id,
            Chan {
                channel: Some(channel),
                ..Default::default()
            },
        );
        reply.accept().await;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        ch: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let c = self.chans.entry(ch).or_default();
        c.pty = Some(TtySize {
            rows: rows.min(u16::MAX as u32) as u16,
            cols: cols.min(u16::MAX as u32) as u16,
        });
        c.term = term.chars().take(64).collect();
        session.channel_success(ch)?;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        ch: ChannelId,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(h) = self.chans.get(&ch).and_then(|c| c.vm.as_ref()) {
            let size = TtySize {
                rows: rows.min(u16::MAX as u32) as u16,
                cols: cols.min(u16::MAX as u32) as u16,
            };
            let _ = h.resize(size);
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        ch: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(ch)?;
        if self.account.is_none() {
            let out = self.unknown_key_command(&[]).await;
            return self.finish(ch, out, session);
        }
        if self.is_vm_user().await {
            let sh = "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l";
            return self
                .vm_exec(ch, vec!["/bin/sh".into(), "-c".into(), sh.into()], session)
                .await;
        }
        let out = self.control(vec!["help".into()], &[]).await;
        self.finish(ch, out, session)
    }

    async fn exec_request(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(ch)?;
        self.chans.entry(ch).or_default().channel = None;
        let line = String::from_utf8_lossy(data).to_string();
        if self.is_vm_user().await {
            return self
                .vm_exec(ch, vec!["/bin/sh".into(), "-c".into(), line], session)
                .await;
        }
        let args = match shell_words::split(&line) {
            Ok(a) => a,
            Err(e) => {
                return self.finish(ch, Out::fail(format!("cannot parse command: {e}")), session)
            }
        };
        if self.account.is_none() {
            let out = self.unknown_key_command(&args).await;
            return self.finish(ch, out, session);
        }
        let reads_stdin = matches!(args.first().map(String::as_str), Some("adduser"))
            || (args.first().map(String::as_str) == Some("keys")
                && args.get(1).map(String::as_str) == Some("add"));
        if reads_stdin {
            self.chans.entry(ch).or_default().pending = Some(args);
            return Ok(());
        }
        let out = self.control(args, &[]).await;
        self.finish(ch, out, session)
    }

    async fn subsystem_request(
        &mut self,
        ch: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let channel = self.chans.get_mut(&ch).and_then(|c| c.channel.take());
        match (name, channel) {
            ("sftp", Some(channel)) if self.is_vm_user().await => {
                // A use of the VM for as long as the session lasts (woken if auto-paused).
                // On another node, each request's link wakes and holds it there.
                let usable = |v: &Vm| {
                    v.state == VmState::Running
                        || self.m.runs_elsewhere(v).is_some()
                            && crate::service::timers::wakes_on_use(v)
                };
                let in_use = match self.m.use_vm(&self.caller(), &self.user).await {
                    Ok((v, u)) if usable(&v) => u,
                    _ => {
                        session.channel_failure(ch)?;
                        return Ok(());
                    }
                };
                session.channel_success(ch)?;
                let (m, vm) = (self.m.clone(), self.user.clone());
                let sftp = crate::sftp::VmSftp::new(m, self.caller(), vm, in_use);
                // The SFTP server runs on one end of a pipe; this task carries the other end to
                // the channel and, when both sides are done, reports success (scp checks it).
                let (ours, theirs) = tokio::io::duplex(256 * 1024);
                russh_sftp::server::run(theirs, sftp).await;
                let handle = session.handle();
                tokio::spawn(async move {
                    let mut chan = channel.into_stream();
                    crate::sftp::pump(ours, &mut chan).await;
                    // The exit status must go out before the channel closes (dropping the
                    // stream closes it); a client that sees the close first reports failure.
                    let _ = handle.exit_status_request(ch, 0).await;
                    let _ = handle.eof(ch).await;
                    let _ = handle.close(ch).await;
                    drop(chan);
                });
            }
            _ => {
                tracing::info!(subsystem = name, "refused ssh subsystem");
                session.channel_failure(ch)?;
            }
        }
        Ok(())
    }

    async fn data(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.get_mut(&ch) {
            if let Some(h) = &c.vm {
                // Within the stream's credit: a process that does not read its stdin holds the
                // SSH channel's window closed instead of filling hutchd's memory.
                let h = h.clone();
                let _ = h.stdin(data).await;
            } else if c.pending.is_some() && c.stdin.len() < 1 << 20 {
                c.stdin.extend_from_slice(data);
            }
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        ch: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(c) = self.chans.get_mut(&ch) else {
            return Ok(());
        };
        if let Some(h) = &c.vm {
            let h = h.clone();
            let _ = h.eof().await;
            return Ok(());
        }
        if let Some(args) = c.pending.take() {
            let stdin = std::mem::take(&mut c.stdin);
            let out = self.control(args, &stdin).await;
            return self.finish(ch, out, session);
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        ch: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.remove(&ch) {
            // The client went away: stop what it was running.
            if let Some(h) = c.vm {
                let _ = h.signal(9);
            }
        }
        Ok(())
    }
}
