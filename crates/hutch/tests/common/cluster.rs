//! What the cluster tests share: the CLI's views of nodes and VMs, curl, and a test LAN of
//! network namespaces around a bridge.

use super::{sh, Daemon};
use serde_json::Value;
use std::time::Duration;

/// One HTTP request with curl: status and body.
pub fn curl(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, Vec<u8>) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let input = tempfile::NamedTempFile::new().unwrap();
    let mut c = std::process::Command::new("curl");
    c.args([
        "-s",
        "-X",
        method,
        "--max-time",
        "120",
        "-w",
        "%{http_code}",
        "-o",
    ])
    .arg(out.path());
    for (k, v) in headers {
        c.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(b) = body {
        std::fs::write(input.path(), b).unwrap();
        c.arg("--data-binary")
            .arg(format!("@{}", input.path().display()));
    }
    let o = c.arg(url).output().unwrap();
    (
        String::from_utf8_lossy(&o.stdout).parse().unwrap_or(0),
        std::fs::read(out.path()).unwrap_or_default(),
    )
}

pub fn nodes(d: &Daemon) -> Vec<Value> {
    d.json(&["nodes"]).as_array().cloned().unwrap()
}

pub fn state_of(d: &Daemon, node: &str) -> String {
    nodes(d)
        .iter()
        .find(|n| n["name"] == node)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

pub fn vm(d: &Daemon, name: &str) -> Value {
    d.json(&["describe", name])
}

pub fn fails_with(d: &Daemon, args: &[&str], needle: &str) {
    let o = d.hutch(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "hutch {args:?} succeeded");
    assert!(err.contains(needle), "hutch {args:?}: {err}");
}

/// A test LAN: a bridge here (the etcd members listen on its address) and one network
/// namespace per node, joined to it by a veth pair; all removed on drop. The namespaces filter
/// by reverse path strictly (the strictest a host may run hutch on).
pub struct Lan {
    pub bridge: String,
    pub net: String,
    pub nss: Vec<String>,
}

impl Lan {
    pub fn new(nodes: usize) -> Lan {
        // Tests of this binary run side by side: each LAN its own names and subnet.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < 5, "at most 5 LANs per test binary");
        let tag = format!("{:x}{n}", std::process::id() % 0xfff);
        let bridge = format!("hcl{tag}");
        let net = format!("10.{}.{}", 250 + n, std::process::id() % 250);
        let lan = Lan {
            nss: (0..nodes).map(|i| format!("hcl{tag}n{i}")).collect(),
            bridge,
            net,
        };
        let (br, net) = (&lan.bridge, &lan.net);
        sh(&format!(
            "ip link add {br} type bridge && ip addr add {net}.1/24 dev {br} && ip link set {br} up"
        ));
        for (i, ns) in lan.nss.iter().enumerate() {
            sh(&format!(
                "ip netns add {ns}
                 ip link add {br}v{i} type veth peer name eth0 netns {ns}
                 ip link set {br}v{i} master {br} up
                 ip -n {ns} link set lo up
                 ip -n {ns} link set eth0 up
                 ip -n {ns} addr add {net}.{}/24 dev eth0
                 ip -n {ns} route add default via {net}.1
                 ip netns exec {ns} sysctl -qw net.ipv4.conf.all.rp_filter=1",
                10 + i
            ));
        }
        lan
    }

    pub fn host(&self) -> std::net::IpAddr {
        format!("{}.1", self.net).parse().unwrap()
    }

    pub fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.net, 10 + i)
    }

    /// Cuts node `i` off: nothing in or out of its namespace.
    pub fn cut(&self, i: usize) {
        sh(&format!("ip -n {} link set eth0 down", self.nss[i]));
    }

    pub fn heal(&self, i: usize) {
        let (ns, net) = (&self.nss[i], &self.net);
        sh(&format!(
            "ip -n {ns} link set eth0 up && ip -n {ns} route replace default via {net}.1"
        ));
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // The host ends of the veth pairs first: a namespace can outlive its name for a while
        // (the kernel frees it once its last socket is gone), and its veth with it.
        for i in 0..self.nss.len() {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &format!("{}v{i}", self.bridge)])
                .stderr(std::process::Stdio::null())
                .status();
        }
        for ns in &self.nss {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// QEMU's run state of VM `id` under `data` ("running", "paused", ...), asked over its QMP
/// socket.
pub fn qemu_status(data: &std::path::Path, id: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let sock = data.join("vms").join(id).join("run/qmp.sock");
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n")
        .unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if let Some(st) = v["return"]["status"].as_str() {
            return st.to_string();
        }
    }
}
