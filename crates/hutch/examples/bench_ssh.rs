//! `make bench` (third part): the SSH front door against a local OpenSSH sshd, side by side.
//! Connection + auth + exec + exit of `true` (median of interleaved runs), and stdin throughput
//! (`cat > /dev/null` of 100 MB: into a VM through hutch, into the host through sshd).

use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 15;
const MB: usize = 100;

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Procs(Vec<std::process::Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ssh(key: &Path, port: u16, user: &str, cmd: &str, stdin: Option<&Path>) -> f64 {
    let t = Instant::now();
    let st = Command::new("ssh")
        .args([
            "-q",
            "-p",
            &port.to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"])
        .arg(key)
        .arg(format!("{user}@127.0.0.1"))
        .arg(cmd)
        .stdin(match stdin {
            Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
            None => Stdio::null(),
        })
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "ssh {user}@:{port} {cmd} failed");
    t.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let w = tempfile::Builder::new()
        .prefix("hutch-bench-ssh")
        .tempdir_in("/tmp")
        .unwrap();
    let wp = w.path();
    let key = wp.join("key");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-t", "ed25519", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    std::fs::create_dir(wp.join("img")).unwrap();
    assert!(Command::new(ws().join("scripts/make-test-image.sh"))
        .arg(wp.join("img"))
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
    let mut procs = Procs(Vec::new());

    // Baseline: OpenSSH's sshd on loopback, this key authorised for root.
    let (sport, hport) = (free_port(), free_port());
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-t", "ed25519", "-f"])
        .arg(wp.join("hostkey"))
        .status()
        .unwrap()
        .success());
    std::fs::copy(wp.join("key.pub"), wp.join("authorized_keys")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    procs.0.push(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-p", &sport.to_string(), "-h"])
            .arg(wp.join("hostkey"))
            .args([
                "-o",
                "ListenAddress=127.0.0.1",
                "-o",
                "UsePAM=no",
                "-o",
                "PidFile=none",
                "-o",
                "StrictModes=no",
            ])
            .arg("-o")
            .arg(format!(
                "AuthorizedKeysFile={}",
                wp.join("authorized_keys").display()
            ))
            .args([
                "-o",
                "PermitRootLogin=prohibit-password",
                "-o",
                "PasswordAuthentication=no",
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/sbin/sshd (package openssh-server)"),
    );
    // hutchd with its SSH front door; this key is the admin's.
    let data = wp.join("d");
    procs.0.push(
        Command::new(ws().join("target/release/hutchd"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--boot-cache")
            .arg(ws().join("target/hutch-bench-boot"))
            // No VM network: these figures compare against bare QEMU / tools without one.
            .args(["--network", "off"])
            .args([
                "--ssh-listen",
                &format!("127.0.0.1:{hport}"),
                "--admin-keys",
            ])
            .arg(wp.join("key.pub"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(wp.join("hutchd.log")).unwrap())
            .spawn()
            .expect("target/release/hutchd"),
    );
    let sock = data.join("hutchd.sock");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(mut s) = UnixStream::connect(&sock) {
            let body = json!({"path": wp.join("img/oci"), "name": "busybox"}).to_string();
            write!(s, "POST /api/v1/images HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
            let mut r = String::new();
            s.read_to_string(&mut r).unwrap();
            assert!(r.starts_with("HTTP/1.1 201"), "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "hutchd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    ssh(&key, hport, "admin", "new --name b --image busybox", None);

    let (mut h, mut o) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        h.push(ssh(&key, hport, "b", "true", None));
        o.push(ssh(&key, sport, "root", "true", None));
    }
    let (hm, om) = (median(&mut h), median(&mut o));
    println!("ssh connect + auth + exec `true` + exit (median of {ROUNDS}, interleaved)");
    println!("  ssh -p PORT VM@hutch true        {:8.1} ms", hm * 1000.0);
    println!("  ssh to local OpenSSH sshd true    {:8.1} ms", om * 1000.0);
    println!("  ratio hutch/sshd                  {:8.2}", hm / om);

    let f = wp.join("payload");
    let data_bytes: Vec<u8> = (0..MB << 20)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect();
    std::fs::write(&f, data_bytes).unwrap();
    let ht = ssh(&key, hport, "b", "cat > /dev/null", Some(&f));
    let ot = ssh(&key, sport, "root", "cat > /dev/null", Some(&f));
    println!("stdin throughput, {MB} MB through `cat > /dev/null`");
    println!(
        "  into the VM via hutch             {:8.1} MB/s",
        MB as f64 / ht
    );
    println!(
        "  into the host via sshd            {:8.1} MB/s",
        MB as f64 / ot
    );
    ssh(&key, hport, "admin", "rm b", None);
}
