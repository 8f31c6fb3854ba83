//! Real etcd members for tests (feature `testing`): Debian's `etcd` binary (package
//! `etcd-server`), each member with its own data directory under one temporary directory and
//! its own ports, killed and waited for on drop, so that nothing is left running.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of real members; dropped, every member is killed.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial: String,
    token: String,
    dir: tempfile::TempDir,
}

/// A port free now on `ip` (the kernel picks it; released before etcd binds it).
fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl EtcdCluster {
    /// `n` members on loopback, started together; returns once the cluster serves requests.
    pub async fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_on(&vec![IpAddr::V4(Ipv4Addr::LOCALHOST); n]).await
    }

    /// One member per address (each must be this host's).
    pub async fn start_on(ips: &[IpAddr]) -> EtcdCluster {
        let dir = tempfile::Builder::new()
            .prefix("hutch-etcd-")
            .tempdir()
            .expect("tempdir");
        let members: Vec<Member> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| Member {
                name: format!("m{i}"),
                client: SocketAddr::new(*ip, free_port(*ip)),
                peer: SocketAddr::new(*ip, free_port(*ip)),
                data: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "hutch-test-{}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let mut c = EtcdCluster {
            members,
            initial,
            token,
            dir,
        };
        for i in 0..c.members.len() {
            c.spawn(i);
        }
        c.wait_ready(Duration::from_secs(60)).await;
        c
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .arg("--listen-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(&self.initial)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .expect("start etcd (Debian package etcd-server)");
        self.members[i].child = Some(child);
    }

    /// Waits until every running member answers a read.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for m in &self.members {
            if m.child.is_none() {
                continue;
            }
            loop {
                let ep = format!("http://{}", m.client);
                let ok = async {
                    let mut c = etcd_client::Client::connect([ep], None).await.ok()?;
                    c.get("ready", None).await.ok()
                };
                if tokio::time::timeout(Duration::from_secs(2), ok)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "etcd member {} not ready within {within:?}; its log:\n{}",
                        m.name,
                        std::fs::read_to_string(&m.log).unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.members[i].client)
    }

    /// Member `i`'s client address.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.members[i].client
    }

    /// Kills member `i` (SIGKILL) and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until it serves.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ready(Duration::from_secs(60)).await;
    }

    /// The directory that holds the members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
