//! A hostile SFTP client (russh + russh-sftp, which, unlike OpenSSH's sftp, sends whatever
//! offsets, lengths, paths and handle counts it is told) against the real hutchd and a real VM:
//! offsets at and past the largest file offset, `offset + len` that overflows, a read of
//! u32::MAX bytes, a sparse write at 1 TiB, thousands of handles never closed, `..` and paths
//! outside /root. Every request gets a clean SFTP status or a bounded, correct answer within the
//! client's timeout, hutchd never panics, its RSS stays bounded, and afterwards SFTP and exec
//! still work. One VM boot.

mod common;
use common::ssh_client::*;
use common::*;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// What hutchd serves in one SFTP read at most (sftp::MAX_IO); a reply must fit in the 256 KiB
/// packets that SFTP clients accept (OpenSSH's and russh-sftp's limit).
const MAX_IO: usize = 255 * 1024;
/// Handles one SFTP session may hold (sftp::MAX_HANDLES), and directory handles among them.
const MAX_HANDLES: usize = 1024;
const MAX_DIRS: usize = 16;
/// hutchd may grow by at most this much RSS over the whole hostile session.
const RSS_GROWTH_MIB: u64 = 64;

struct Trusting;

impl russh::client::Handler for Trusting {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

type Conn = russh::client::Handle<Trusting>;

async fn connect(port: u16, key: &Path, user: &str) -> Conn {
    let cfg = Arc::new(russh::client::Config::default());
    let mut h = russh::client::connect(cfg, ("127.0.0.1", port), Trusting)
        .await
        .unwrap();
    let k = russh::keys::load_secret_key(key, None).unwrap();
    let k = russh::keys::PrivateKeyWithHashAlg::new(Arc::new(k), None);
    assert!(h.authenticate_publickey(user, k).await.unwrap().success());
    h
}

/// A new SFTP session on `c`; every request must be answered within 10 s (the client's default
/// timeout): a hang fails the test with `Timeout`.
async fn sftp(c: &Conn) -> RawSftpSession {
    let ch = c.channel_open_session().await.unwrap();
    ch.request_subsystem(true, "sftp").await.unwrap();
    let s = RawSftpSession::new(ch.into_stream());
    s.init().await.unwrap();
    s
}

/// The status an SFTP request was refused with (anything else fails the test).
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, SftpError>) -> (StatusCode, String) {
    match r {
        Err(SftpError::Status(s)) => (s.status_code, s.error_message),
        other => panic!("{what}: expected an SFTP status, got {other:?}"),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

fn flags(f: &[OpenFlags]) -> OpenFlags {
    f.iter().fold(OpenFlags::empty(), |a, b| a | *b)
}

#[test]
fn hostile_sftp_client() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let admin = keygen(w, "admin", &["-t", "ed25519"]);
    let alice = keygen(w, "alice", &["-t", "ed25519"]);
    let port = free_port();
    let layout = busybox_layout(w);
    let d = Daemon::start(&[
        "--ssh-listen",
        &format!("127.0.0.1:{port}"),
        "--admin-keys",
        &format!("{}.pub", admin.display()),
    ]);
    d.import_busybox(&layout);
    let s = Ssh { port };
    let pubkey = std::fs::read(format!("{}.pub", alice.display())).unwrap();
    let (_, se, c) = text(&s.run(&admin, "admin", &["adduser", "alice"], Some(&pubkey), false));
    assert_eq!(c, 0, "{se}");
    let new = ["new", "--name", "web", "--image", "busybox", "--mem", "256"];
    let (_, se, c) = text(&s.run(&alice, "alice", &new, None, false));
    assert_eq!(c, 0, "{se}");
    let guest = |cmd: &[&str]| {
        let mut a = vec!["exec", "alice/web", "--"];
        a.extend_from_slice(cmd);
        d.ok(&a)
    };
    let guest_passwd = guest(&["cat", "/etc/passwd"]);
    let pid = d.pid().unwrap();
    let rss0 = rss_kib(pid);
    let started = Instant::now();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = connect(port, &alice, "web").await;
        let h = sftp(&conn).await;
        let rw = flags(&[
            OpenFlags::READ,
            OpenFlags::WRITE,
            OpenFlags::CREATE,
            OpenFlags::TRUNCATE,
        ]);
        let f = h
            .open("f", rw, FileAttributes::default())
            .await
            .unwrap()
            .handle;
        h.write(&f, 0, b"hello sftp\n".to_vec()).await.unwrap();

        // Offsets at or past the largest file offset (i64::MAX), and `offset + len` that
        // overflows u64 or passes i64::MAX: refused as a failure, never wrapped.
        let max = i64::MAX as u64;
        for (off, len) in [
            (u64::MAX, 1u32),
            (u64::MAX - 1, 1),
            (u64::MAX, 0),
            (max + 1, 1),
            (max, 1),
            (u64::MAX - 10, 4096),
            (max - 10, 4096),
        ] {
            let (code, msg) = refused("read", h.read(&f, off, len).await);
            assert_eq!(code, StatusCode::Failure, "read at {off}+{len}: {msg}");
            assert!(msg.contains("beyond the largest file offset"), "{msg}");
            let (code, msg) = refused("write", h.write(&f, off, vec![b'x'; len as usize]).await);
            assert_eq!(code, StatusCode::Failure, "write at {off}+{len}: {msg}");
            assert!(msg.contains("beyond the largest file offset"), "{msg}");
        }
        // Legal offsets past the end of the file: a read within the filesystem's largest file
        // (ext4: 16 TiB) is at end of file; beyond it the guest refuses to seek (EINVAL, as
        // OpenSSH's sftp-server answers: a failure) and to write (EFBIG).
        let (code, _) = refused("read at 8 TiB", h.read(&f, 8 << 40, 4096).await);
        assert_eq!(code, StatusCode::Eof);
        let (code, msg) = refused("read near i64::MAX", h.read(&f, max - 4096, 4096).await);
        assert_eq!(code, StatusCode::Failure, "{msg}");
        assert!(msg.contains("Invalid argument"), "{msg}");
        let (code, msg) = refused("write", h.write(&f, max - 8, b"abc".to_vec()).await);
        assert_eq!(code, StatusCode::Failure, "{msg}");
        assert!(msg.contains("Invalid argument") || msg.contains("too large"), "{msg}");
        let (code, _) = refused("read past the end", h.read(&f, 11, 4096).await);
        assert_eq!(code, StatusCode::Eof);

        // u32::MAX bytes asked for: what the file has (11 bytes), not a 4 GiB buffer.
        let data = h.read(&f, 0, u32::MAX).await.unwrap().data;
        assert_eq!(data, b"hello sftp\n");

        // A sparse write at 1 TiB: the file is 1 TiB long, mostly hole; reads come back
        // bounded, including u32::MAX bytes from the hole (at most MAX_IO, in one packet the
        // client accepts).
        let tib = 1u64 << 40;
        h.write(&f, tib, b"tail".to_vec()).await.unwrap();
        assert_eq!(h.fstat(&f).await.unwrap().attrs.size, Some(tib + 4));
        let data = h.read(&f, tib - 2, 100).await.unwrap().data;
        assert_eq!(data, b"\0\0tail");
        let data = h.read(&f, 4096, u32::MAX).await.unwrap().data;
        assert_eq!(data.len(), MAX_IO);
        assert!(data.iter().all(|&b| b == 0));
        let du = guest(&["busybox", "du", "-k", "/root/f"]);
        let kib: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
        assert!(kib < 1024, "the sparse file takes {kib} KiB in the guest");
        h.remove("f").await.unwrap();

        // Paths: `..` and absolute paths name the guest's own filesystem (its root user may go
        // anywhere in it), never the host's.
        for p in ["../../../../etc/passwd", "/../../etc/passwd", "/root/../etc/./passwd"] {
            let g = h
                .open(p, OpenFlags::READ, FileAttributes::default())
                .await
                .unwrap()
                .handle;
            let data = h.read(&g, 0, 65536).await.unwrap().data;
            assert_eq!(String::from_utf8_lossy(&data), guest_passwd, "{p}");
            h.close(&g).await.unwrap();
        }
        let real = h.realpath("../../..").await.unwrap();
        assert_eq!(real.files[0].filename, "/");
        // The host's data dir and this test's directory do not exist in the guest.
        for p in [d.data(), w] {
            let p = p.to_str().unwrap();
            let (code, msg) = refused(p, h.stat(p).await);
            assert_eq!(code, StatusCode::NoSuchFile, "{p}: {msg}");
        }
        let marker = w.join("written-by-sftp");
        let out = flags(&[OpenFlags::WRITE, OpenFlags::CREATE]);
        let mp = format!("/..{}", marker.display());
        let (code, msg) = refused("open", h.open(&mp, out, FileAttributes::default()).await);
        assert_eq!(code, StatusCode::NoSuchFile, "{msg}");
        assert!(!marker.exists());
        let (code, msg) = refused("NUL", h.stat("/etc/pass\0wd").await);
        assert_eq!(code, StatusCode::Failure, "{msg}");
        // Handles that were never given out.
        let long = "h".repeat(10_000);
        for bogus in ["", "h0", "h999999", &long] {
            let (code, _) = refused("bogus handle", h.read(bogus, 0, 10).await);
            assert_eq!(code, StatusCode::Failure);
            let (code, _) = refused("bogus handle", h.close(bogus).await);
            assert_eq!(code, StatusCode::Failure);
        }

        // A directory of 2000 names of 200 bytes: its listing (~1 MiB as SFTP names, more than one
        // agent frame) comes from the guest a page at a time, in readdir answers that each fit a
        // 256 KiB packet.
        guest(&[
            "sh",
            "-c",
            "mkdir /root/d && cd /root/d && \
             busybox awk 'BEGIN { for (i = 0; i < 2000; i++) printf \"%0200d\\n\", i }' | busybox xargs busybox touch",
        ]);
        let dh = h.opendir("d").await.unwrap().handle;
        let mut names = Vec::new();
        loop {
            match h.readdir(&dh).await {
                Ok(n) => names.extend(n.files.into_iter().map(|f| f.filename)),
                Err(e) => {
                    assert_eq!(refused("readdir", Err::<(), _>(e)).0, StatusCode::Eof);
                    break;
                }
            }
        }
        h.close(&dh).await.unwrap();
        names.retain(|n| n != "." && n != "..");
        names.sort();
        let want: Vec<String> = (0..2000).map(|i| format!("{i:0200}")).collect();
        assert_eq!(names, want);

        // Thousands of handles, never closed: directory handles (each holding one page of its
        // listing) stop at MAX_DIRS, all handles at MAX_HANDLES; past that, a clean failure.
        let h2 = sftp(&conn).await;
        let mut dirs = 0;
        for _ in 0..1000 {
            match h2.opendir("d").await {
                Ok(_) => dirs += 1,
                Err(e) => {
                    let (code, msg) = refused("opendir", Err::<(), _>(e));
                    assert_eq!(code, StatusCode::Failure, "{msg}");
                    assert!(msg.contains("too many open"), "{msg}");
                }
            }
        }
        assert_eq!(dirs, MAX_DIRS);
        let opens = (0..3000).map(|_| h2.open("/etc/passwd", OpenFlags::READ, Default::default()));
        let results = futures_util::future::join_all(opens).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok + dirs, MAX_HANDLES);
        for r in results.into_iter().filter(|r| r.is_err()) {
            let (code, msg) = refused("open", r);
            assert_eq!(code, StatusCode::Failure, "{msg}");
            assert!(msg.contains("too many open"), "{msg}");
        }
        // The session still answers.
        assert_eq!(h2.realpath(".").await.unwrap().files[0].filename, "/root");
        let rss = rss_kib(pid);
        assert!(
            rss < rss0 + RSS_GROWTH_MIB * 1024,
            "hutchd grew from {rss0} KiB to {rss} KiB"
        );

        // A packet over the 256 KiB limit (a 300 KiB write) ends its session at once, as
        // OpenSSH's sftp-server does, instead of leaving it reading the packet's body as packets.
        let h4 = sftp(&conn).await;
        let f4 = h4.open("big", rw, Default::default()).await.unwrap().handle;
        // The server side is what is under test: hutchd ends the session as soon as it reads
        // the length (its log says so), whatever the client library then takes to notice.
        let t = std::time::Instant::now();
        let ended = async {
            while !d.log().contains("sftp packet over the limit") {
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(8),
                    "hutchd did not end the session at once"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        let (r, ()) = tokio::join!(h4.write(&f4, 0, vec![1u8; 300 * 1024]), ended);
        assert!(r.is_err(), "an oversized packet is not served: {r:?}");
        assert!(h4.realpath(".").await.is_err(), "its session is over");
        drop(h4);

        // A normal round trip in a fresh session still works.
        let h3 = sftp(&conn).await;
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let g = h3.open("rt", rw, Default::default()).await.unwrap().handle;
        for (i, chunk) in body.chunks(32 * 1024).enumerate() {
            let at = (i * 32 * 1024) as u64;
            h3.write(&g, at, chunk.to_vec()).await.unwrap();
        }
        let mut back = Vec::new();
        loop {
            match h3.read(&g, back.len() as u64, 64 * 1024).await {
                Ok(d) => back.extend_from_slice(&d.data),
                Err(e) => {
                    assert_eq!(refused("read", Err::<(), _>(e)).0, StatusCode::Eof);
                    break;
                }
            }
        }
        assert!(back == body, "round trip gave {} bytes", back.len());
        h3.close(&g).await.unwrap();
        drop((h, h2, h3));
        let _ = conn
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    });
    drop(rt);

    let ls = guest(&["ls", "-l", "/root"]);
    assert!(ls.contains("200000") && ls.contains("rt"), "{ls}");
    let rss = rss_kib(pid);
    assert!(
        rss < rss0 + RSS_GROWTH_MIB * 1024,
        "hutchd grew from {rss0} KiB to {rss} KiB"
    );
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
    eprintln!(
        "hostile SFTP session: {:.1}s; hutchd RSS {rss0} KiB -> {rss} KiB",
        started.elapsed().as_secs_f64()
    );
}
