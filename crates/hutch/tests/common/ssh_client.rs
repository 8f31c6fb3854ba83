//! The real OpenSSH client as tests drive it: keys made with ssh-keygen, one option set for every
//! connection, output as text.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// `prog` (ssh, scp or sftp) with the options every connection of this test uses.
pub fn client(prog: &str, port: u16, key: &Path) -> Command {
    let port_flag = if prog == "ssh" { "-p" } else { "-P" };
    let mut c = Command::new(prog);
    c.args([
        "-q",
        port_flag,
        &port.to_string(),
        "-o",
        "StrictHostKeyChecking=no",
    ])
    .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
    .args(["-o", "IdentitiesOnly=yes", "-i"])
    .arg(key);
    c
}

pub struct Ssh {
    pub port: u16,
}

impl Ssh {
    pub fn run(
        &self,
        key: &Path,
        user: &str,
        cmd: &[&str],
        stdin: Option<&[u8]>,
        tty: bool,
    ) -> Output {
        let mut c = client("ssh", self.port, key);
        if tty {
            c.arg("-tt");
        }
        c.arg(format!("{user}@127.0.0.1")).args(cmd);
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut ch = c.spawn().unwrap();
        if let Some(d) = stdin {
            let mut s = ch.stdin.take().unwrap();
            std::io::Write::write_all(&mut s, d).unwrap();
        }
        ch.wait_with_output().unwrap()
    }
}

pub fn text(o: &Output) -> (String, String, i32) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
        o.status.code().unwrap_or(-1),
    )
}

pub fn keygen(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-N", ""])
        .args(args)
        .arg("-f")
        .arg(&p)
        .status()
        .unwrap();
    assert!(st.success());
    p
}

impl Ssh {
    /// Makes account `name` for the key `key` (by the admin's `adduser`) and returns an API
    /// token it created for itself.
    pub fn account_with_token(&self, admin_key: &Path, name: &str, key: &Path) -> String {
        let pubkey = std::fs::read(format!("{}.pub", key.display())).unwrap();
        let (_, se, c) =
            text(&self.run(admin_key, "admin", &["adduser", name], Some(&pubkey), false));
        assert_eq!(c, 0, "{se}");
        let (so, se, c) = text(&self.run(key, name, &["token", "create", "--json"], None, false));
        assert_eq!(c, 0, "{se}");
        serde_json::from_str::<serde_json::Value>(&so).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }
}
