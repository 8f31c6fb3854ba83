//! The VM network end to end: real QEMU guests on a real bridge with hutch's nftables rules, an
//! "upstream" network namespace standing in for the internet (an HTTP server on two addresses
//! and a DNS server, all made by the test; no packet leaves the machine), two accounts, the
//! guest DNS, egress rules changed on a running VM, port forwards and the HTTP(S) proxy.
//! Three VM boots.

mod common;
use common::ssh_client::*;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A network namespace with a veth to the host: 198.18.N.1 on the host, .2 and .3 inside, an
/// HTTP server on both (answering "up2" / "up3") and a DNS server on .2 that knows
/// allowed.test (.2) and other.test (.3).
struct Upstream {
    ns: String,
    net: String,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Upstream {
    fn start() -> Upstream {
        let pid = std::process::id();
        let ns = format!("hup{pid}");
        let net = format!("198.18.{}", pid % 250);
        let dir = tempfile::tempdir().unwrap();
        let (host_if, ns_if) = (format!("hvh{pid}"), format!("hvn{pid}"));
        sh(&format!(
            "ip netns add {ns}
             ip link add {host_if} type veth peer name {ns_if}
             ip link set {ns_if} netns {ns}
             ip addr add {net}.1/24 dev {host_if}
             ip link set {host_if} up
             ip netns exec {ns} ip link set lo up
             ip netns exec {ns} ip link set {ns_if} up
             ip netns exec {ns} ip addr add {net}.2/24 dev {ns_if}
             ip netns exec {ns} ip addr add {net}.3/24 dev {ns_if}
             ip netns exec {ns} ip route add default via {net}.1"
        ));
        let mut children = Vec::new();
        for host in ["2", "3"] {
            let www = dir.path().join(host);
            std::fs::create_dir_all(&www).unwrap();
            std::fs::write(www.join("index.html"), format!("up{host}\n")).unwrap();
            children.push(
                Command::new("ip")
                    .args(["netns", "exec", &ns, "busybox", "httpd", "-f", "-p"])
                    .arg(format!("{net}.{host}:80"))
                    .arg("-h")
                    .arg(&www)
                    .spawn()
                    .unwrap(),
            );
        }
        // A git repository served over git:// (for --clone).
        let repo = dir.path().join("git/proj");
        sh(&format!(
            "git init -q {r} && cd {r} && echo cloned-ok > README && git add README && \
             git -c user.name=t -c user.email=t@t commit -qm init",
            r = repo.display()
        ));
        // git-daemon itself (`git daemon` would run it as a child that outlives a kill).
        children.push(
            Command::new("ip")
                .args(["netns", "exec", &ns, "sh", "-c"])
                .arg(format!(
                    "exec \"$(git --exec-path)/git-daemon\" --reuseaddr --export-all \
                     --base-path={} --listen={net}.2",
                    dir.path().join("git").display()
                ))
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        children.push(
            Command::new("ip")
                .args(["netns", "exec", &ns, "python3"])
                .arg(workspace().join("crates/hutch/tests/fixtures/fake_dns.py"))
                .arg(format!("{net}.2"))
                .arg(format!("allowed.test={net}.2"))
                .arg(format!("other.test={net}.3"))
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        Upstream {
            ns,
            net,
            children,
            _dir: dir,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace deletes the veth pair with it, once no process is left in it;
        // the host end goes explicitly in case one is.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let host_if = self.ns.replacen("hup", "hvh", 1);
        let _ = Command::new("ip")
            .args(["link", "del", &host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `script` in VM `vm`; its stdout and exit code.
fn vm_sh(d: &Daemon, vm: &str, script: &str) -> (String, i32) {
    let o = d.hutch(&["exec", vm, "--", "sh", "-c", script]);
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        o.status.code().unwrap_or(-1),
    )
}

/// An HTTP GET from inside `vm` with busybox nc (busybox's static wget does not work in the
/// test image); the response, empty when no connection was made within 3 s.
fn vm_get(d: &Daemon, vm: &str, ip: &str, port: u16) -> String {
    vm_sh(
        d,
        vm,
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {port}"),
    )
    .0
}

/// `vm_get` with a `Host` header.
fn vm_get_host(d: &Daemon, vm: &str, ip: &str, port: u16, host: &str) -> String {
    vm_sh(
        d,
        vm,
        &format!("printf 'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 3 {ip} {port}"),
    )
    .0
}

fn ip_of(d: &Daemon, vm: &str) -> String {
    d.json(&["describe", vm])["net"]["ipv4"]
        .as_str()
        .unwrap_or_else(|| panic!("{vm} has no address"))
        .to_string()
}

/// A request through the proxy at `addr` for `host`; status and body.
fn via_proxy(addr: &str, host: &str, token: Option<&str>) -> (u16, String) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    use std::io::{Read, Write};
    write!(
        c,
        "GET / HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

#[test]
fn modes_isolation_egress_dns_ports_and_proxy() {
    let up = Upstream::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let admin_key = keygen(w, "admin", &["-t", "ed25519"]);
    let alice = keygen(w, "alice", &["-t", "ed25519"]);
    let (ssh_port, api_port, http_port, https_port) =
        (free_port(), free_port(), free_port(), free_port());
    let dns_port = free_port();
    // The SSH pool: hutchd routes it to the host (a `local` route) and each VM gets an address.
    let pool = format!("198.19.{}.0/24", std::process::id() % 250);
    let _route = LocalRoute(pool.clone());
    let d = Daemon::start(&[
        "--listen",
        &format!("127.0.0.1:{api_port}"),
        "--ssh-listen",
        &format!("0.0.0.0:{ssh_port}"),
        "--ssh-pool",
        &pool,
        "--dns-listen",
        &format!("127.0.0.1:{dns_port}"),
        "--admin-keys",
        &format!("{}.pub", admin_key.display()),
        "--upstream-dns",
        &format!("{}.2", up.net),
        "--domain",
        "t.hutch",
        "--http-listen",
        &format!("127.0.0.1:{http_port}"),
        "--https-listen",
        &format!("127.0.0.1:{https_port}"),
    ]);
    d.import_busybox(&busybox_layout(w));
    let s = Ssh { port: ssh_port };
    let alice_token = s.account_with_token(&admin_key, "alice", &alice);
    let url = format!("http://127.0.0.1:{api_port}");
    let as_alice = |args: &[&str]| {
        let mut a = vec!["--url", &url, "--token", &alice_token];
        a.extend_from_slice(args);
        d.hutch(&a)
    };

    // Bad input first: clear errors, nothing made.
    for (args, want) in [
        (vec!["--net", "bogus"], "unknown network mode"),
        (vec!["--allow-out", "10.0.0.1/8"], "host bits"),
        (vec!["--deny-out", "not a name"], "neither a CIDR"),
        (vec!["--rate-in", "10"], "unit"),
        (
            vec!["--net", "internal", "--allow-out", "example.com"],
            "--net internet",
        ),
    ] {
        let mut a = vec!["new", "--image", "busybox", "--name", "bad"];
        a.extend(args.iter());
        let o = d.hutch(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(d.json(&["ls"]).as_array().unwrap().len(), 0);

    // Three VMs: two of the admin's (internet, internal), one of alice's (internet, allowed
    // only to allowed.test).
    d.ok(&["new", "--image", "busybox", "--name", "web"]);
    d.ok(&[
        "new", "--image", "busybox", "--name", "peer", "--net", "internal",
    ]);
    let o = as_alice(&[
        "new",
        "--image",
        "busybox",
        "--name",
        "a1",
        "--allow-out",
        "allowed.test",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (web, peer) = (ip_of(&d, "web"), ip_of(&d, "peer"));
    let a1 = ip_of(&d, "alice/a1");
    assert_ne!(web, peer);
    let ls = d.ok(&["ls"]);
    assert!(ls.contains(&web) && ls.contains(&peer), "{ls}");
    let (_, code) = vm_sh(
        &d,
        "web",
        "mkdir -p /www && echo vm-web > /www/index.html && busybox httpd -p 8080 -h /www",
    );
    assert_eq!(code, 0);
    let (upstream2, upstream3) = (format!("{}.2", up.net), format!("{}.3", up.net));

    // internet: out through the host, names through hutch's DNS to the upstream resolver.
    assert!(vm_get(&d, "web", &upstream2, 80).contains("up2"));
    assert!(vm_get(&d, "web", &upstream3, 80).contains("up3"));
    let (out, _) = vm_sh(&d, "web", "nslookup allowed.test");
    assert!(out.contains(&upstream2), "{out}");
    // internal: no way out, but the same account's VMs by name.
    assert_eq!(vm_get(&d, "peer", &upstream2, 80), "");
    let (out, _) = vm_sh(&d, "peer", "nslookup web; nslookup web.t.hutch");
    assert_eq!(out.matches(&web).count(), 2, "{out}");
    assert!(vm_get(&d, "peer", &web, 8080).contains("vm-web"));
    // Accounts never meet: alice's VM neither resolves nor reaches the admin's.
    let (out, _) = vm_sh(&d, "alice/a1", "nslookup web");
    assert!(!out.contains(&web), "{out}");
    assert_eq!(vm_get(&d, "alice/a1", &web, 8080), "");
    assert_eq!(vm_get(&d, "web", &a1, 22), "");

    // --allow-out by domain: web traffic (80/443) is checked by name (Host / TLS SNI) and must
    // go to an address hutch's resolver gave for an allowed name; other ports only to those
    // addresses. Before the name is resolved nothing passes; then just that name at that
    // address; other names are refused, also at the allowed address.
    let a1_get = |ip: &str, port: u16, host: &str| vm_get_host(&d, "alice/a1", ip, port, host);
    assert!(
        a1_get(&upstream2, 80, "allowed.test").contains("403"),
        "not resolved yet"
    );
    let (out, _) = vm_sh(&d, "alice/a1", "nslookup allowed.test");
    assert!(out.contains(&upstream2), "{out}");
    assert!(a1_get(&upstream2, 80, "allowed.test").contains("up2"));
    let fronted = a1_get(&upstream2, 80, "other.test");
    assert!(
        fronted.contains("403") && !fronted.contains("up2"),
        "{fronted}"
    );
    assert!(!a1_get(&upstream3, 80, "allowed.test").contains("up3"));
    assert_eq!(
        vm_get(&d, "alice/a1", &upstream3, 8080),
        "",
        "other ports by address"
    );
    let (out, _) = vm_sh(&d, "alice/a1", "nslookup other.test");
    assert!(!out.contains(&upstream3), "{out}");

    // Rules change on a running VM: deny one upstream address; the other still works.
    d.ok(&[
        "net",
        "set",
        "web",
        "--deny-out",
        &format!("{upstream2}/32"),
    ]);
    assert_eq!(vm_get(&d, "web", &upstream2, 80), "");
    assert!(vm_get(&d, "web", &upstream3, 80).contains("up3"));
    d.ok(&["net", "set", "web", "--deny-out", ""]);
    assert!(vm_get(&d, "web", &upstream2, 80).contains("up2"));
    // Another account cannot change them.
    let o = as_alice(&["net", "set", "web", "--allow-out", "10.0.0.0/8"]);
    assert!(!o.status.success());

    // Port forwards: host port to VM port, one owner per host port, removable.
    let hp = free_port();
    d.ok(&["port", "add", "web", &format!("{hp}:8080")]);
    let body = http_get(&format!("127.0.0.1:{hp}"));
    assert!(body.contains("vm-web"), "{body}");
    // VMs reach the host only on hutch's DNS and metadata ports, not on this one (it listens
    // on every address).
    let gw = d.opt("--subnet").unwrap().replace(".0/24", ".1");
    assert_eq!(vm_get(&d, "peer", &gw, hp), "");
    let o = d.hutch(&["port", "add", "peer", &format!("{hp}:80")]);
    assert!(!o.status.success(), "a host port forwarded twice");
    assert!(String::from_utf8_lossy(&o.stderr).contains("already forwarded"));
    let o = as_alice(&["port", "add", "a1", "80:80"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("may forward host ports"),
        "an account outside the port range"
    );
    assert!(d.ok(&["port", "ls", "web"]).contains(&format!(":{hp}")));
    d.ok(&["port", "rm", "web", &hp.to_string()]);
    // The listener's task is aborted: it closes a moment after the answer.
    assert!(
        wait_until(std::time::Duration::from_secs(5), || {
            std::net::TcpStream::connect(("127.0.0.1", hp))
                .is_err()
                .then_some(())
        })
        .is_some(),
        "host port {hp} still forwarded after port rm"
    );

    // The proxy: private by default, the owner's token, public ports, unknown and stopped VMs.
    let proxy = format!("127.0.0.1:{http_port}");
    let token = std::fs::read_to_string(d.data().join("api-token")).unwrap();
    let host = "8080-web.t.hutch";
    assert_eq!(via_proxy(&proxy, host, None).0, 401);
    assert_eq!(via_proxy(&proxy, host, Some(&alice_token)).0, 401);
    let (st, body) = via_proxy(&proxy, host, Some(token.trim()));
    assert_eq!((st, body.trim()), (200, "vm-web"));
    d.ok(&["port", "public", "web", "8080"]);
    assert_eq!(via_proxy(&proxy, host, None).0, 200);
    d.ok(&["port", "private", "web", "8080"]);
    assert_eq!(via_proxy(&proxy, host, None).0, 401);
    assert_eq!(via_proxy(&proxy, "8080-nosuch.t.hutch", None).0, 404);
    // alice's VM is NAME--ACCOUNT on the proxy; her token opens it.
    let (st, _) = via_proxy(&proxy, "80-a1--alice.t.hutch", Some(&alice_token));
    assert_eq!(st, 502, "authorized, but nothing listens on port 80");
    // An upgraded connection (websocket) passes through both ways, with the owner's token.
    let ws = workspace().join("crates/hutch/tests/fixtures/ws_echo.sh");
    d.ok(&["cp", ws.to_str().unwrap(), "web:/ws.sh", "--mode", "755"]);
    vm_sh(&d, "web", "nc -ll -p 8081 -e /ws.sh >/dev/null 2>&1 &");
    // (nc may take a moment to listen: until then the proxy answers 502)
    let echo = wait_until(std::time::Duration::from_secs(20), || {
        let r = ws_echo(&proxy, "8081-web.t.hutch", token.trim());
        (!r.contains("502 Bad Gateway")).then_some(r)
    });
    assert_eq!(echo.as_deref(), Some("hello-ws\n"));
    // HTTPS with the CA hutchd made, and a share link.
    let ca = w.join("ca.pem");
    std::fs::write(&ca, d.ok(&["ca"])).unwrap();
    let link = d.ok(&["port", "share", "web", "8080", "--for", "10m"]);
    assert!(link.starts_with(&format!(
        "https://8080-web.t.hutch:{https_port}/?hutch_share="
    )));
    let o = Command::new("curl")
        .args(["-sS", "-L", "--cacert"])
        .arg(&ca)
        .args([
            "--resolve",
            &format!("8080-web.t.hutch:{https_port}:127.0.0.1"),
        ])
        .args(["-c", "/dev/null", link.trim()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "vm-web",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Metadata and identity from inside a VM, verified against the JWKS the API publishes
    // (to anyone: no token).
    let meta = |vm: &str, path: &str, guard: bool| {
        let h = if guard {
            "Hutch-Metadata: true\\r\\n"
        } else {
            ""
        };
        let (out, _) = vm_sh(
            &d,
            vm,
            // stdin stays open a moment: hyper drops a request whose client half-closes at once.
            &format!("(printf 'GET {path} HTTP/1.0\\r\\n{h}\\r\\n'; sleep 1) | nc -w 5 169.254.169.254 80"),
        );
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
    };
    let inst: Value = serde_json::from_str(&meta("web", "/v1/instance", false)).unwrap();
    let web_id = d.json(&["describe", "web"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(inst["id"], web_id.as_str());
    assert_eq!(inst["ipv4"][0], web.as_str());
    let tok: Value =
        serde_json::from_str(&meta("web", "/v1/identity?audience=ci.example", true)).unwrap();
    assert!(meta("web", "/v1/identity?audience=ci.example", false).contains("forbidden"));
    let (st, jwks) = http_json(
        &format!("127.0.0.1:{api_port}"),
        "",
        "GET",
        "/.well-known/jwks.json",
        None,
    );
    assert_eq!(st, 200, "{jwks}");
    let claims = hutch_daemon::identity::verify(
        &jwks,
        tok["token"].as_str().unwrap(),
        "ci.example",
        hutch_core::now(),
    )
    .unwrap();
    assert_eq!(
        (claims.vm_id.as_str(), claims.sub.as_str()),
        (web_id.as_str(), format!("vm:{web_id}").as_str())
    );
    // Only the VM itself: peer cannot pass for web by taking its address.
    let (out, _) = vm_sh(
        &d,
        "peer",
        &format!(
            "ip addr add {web}/32 dev eth0; (printf 'GET /v1/instance HTTP/1.0\\r\\n\\r\\n'; sleep 1) | nc -w 3 -s {web} 169.254.169.254 80"
        ),
    );
    assert!(
        !out.contains(&web_id),
        "a spoofed source got web's metadata: {out}"
    );
    let peer_inst: Value = serde_json::from_str(&meta("alice/a1", "/v1/instance", false)).unwrap();
    assert_eq!(peer_inst["owner"], "alice");

    d.ok(&["stop", "peer"]);
    assert_eq!(via_proxy(&proxy, "peer.t.hutch", Some(token.trim())).0, 503);

    // The SSH pool: `<vm>.<domain>` is the VM's pool address on the public DNS, port URLs the
    // host's; an SSH login there lands in the VM the key's account has at that address (the
    // admin's web and alice's a1 share .1), whatever the user name.
    let pool1 = pool.replace(".0/24", ".1");
    assert_eq!(public_a(dns_port, "web.t.hutch"), Some(pool1.clone()));
    assert_eq!(public_a(dns_port, "a1--alice.t.hutch"), Some(pool1.clone()));
    assert_eq!(
        public_a(dns_port, "8080-web.t.hutch"),
        Some("127.0.0.1".into())
    );
    assert_eq!(public_a(dns_port, "nosuch.t.hutch"), None);
    let via_pool = |key: &Path| {
        let o = client("ssh", ssh_port, key)
            .arg(format!("root@{pool1}"))
            .arg("hostname")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(via_pool(&admin_key), "web");
    assert_eq!(via_pool(&alice), "a1");
    let o = client("ssh", ssh_port, &alice)
        .arg(format!("root@{}", pool.replace(".0/24", ".2")))
        .arg("hostname")
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "alice has no VM at .2 (the admin's peer is there)"
    );

    // --clone: into the VM at its first boot, over SSH here; an image without git is a clear
    // error and leaves no VM.
    let git_url = format!("git://{upstream2}/proj");
    let o = d.hutch(&[
        "new", "--image", "busybox", "--name", "nogit", "--clone", &git_url,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("has no git"), "{err}");
    assert!(!d.ok(&["ls"]).contains("nogit"));
    let git_image = Command::new(workspace().join("scripts/make-git-image.sh"))
        .arg(w)
        .output()
        .unwrap();
    assert!(git_image.status.success(), "{git_image:?}");
    d.ok(&[
        "image",
        "import",
        &format!("{}/oci", w.display()),
        "--name",
        "git",
    ]);
    let (_, se, c) = text(&s.run(
        &admin_key,
        "admin",
        &["new", "--image", "git", "--name", "g1", "--clone", &git_url],
        None,
        false,
    ));
    assert_eq!(c, 0, "{se}");
    let (out, code) = vm_sh(&d, "g1", "cat /tmp/proj/README");
    assert_eq!((out.trim(), code), ("cloned-ok", 0));
}

/// Removes the SSH pool's `local` route hutchd added.
struct LocalRoute(String);

impl Drop for LocalRoute {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "route", "del", "local", &self.0, "dev", "lo", "table", "local",
            ])
            .status();
    }
}

/// The A record the public DNS on 127.0.0.1:`port` answers for `name` (None: no address).
fn public_a(port: u16, name: &str) -> Option<String> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.send_to(&q, ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).unwrap();
    let answers = u16::from_be_bytes([buf[6], buf[7]]);
    (answers > 0 && n >= 4).then(|| {
        let a = &buf[n - 4..n];
        format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
    })
}

/// An Upgrade through the proxy; what the VM echoes of a line sent after the 101 (or the
/// response head when it was no 101).
fn ws_echo(addr: &str, host: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        c,
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 101") {
        return head.to_string();
    }
    c.write_all(b"hello-ws\n").unwrap();
    let mut out = vec![0u8; 9];
    c.read_exact(&mut out).unwrap();
    String::from_utf8_lossy(&out).to_string()
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

/// Leases, rules and TAPs across a hutchd crash, a full subnet, stop/start and rm. One boot.
#[test]
fn leases_survive_restarts_and_rm_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (bridge, subnet) = test_network();
    // A /30: the gateway and one VM address.
    let subnet = subnet.replace(".0/24", ".0/30");
    let mut d = Daemon::start(&["--bridge", &bridge, "--subnet", &subnet, "--mtu", "1400"]);
    d.import_busybox(&busybox_layout(work.path()));
    d.ok(&["new", "--image", "busybox", "--name", "v1"]);
    let ip = ip_of(&d, "v1");
    assert!(ip.ends_with(".2"), "{ip}");
    let id = d.json(&["describe", "v1"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let tap = format!("ht{id}");
    // --mtu: the bridge, the TAP and the guest's NIC.
    let (out, _) = vm_sh(&d, "v1", "cat /sys/class/net/eth0/mtu");
    assert_eq!(out.trim(), "1400");
    for dev in [&bridge, &tap] {
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu")).unwrap();
        assert_eq!(mtu.trim(), "1400", "{dev}");
    }
    let o = d.hutch(&["new", "--image", "busybox", "--name", "v2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no free address"),
        "{err}"
    );
    assert_eq!(
        d.json(&["ls"]).as_array().unwrap().len(),
        1,
        "nothing half-made"
    );
    assert_eq!(bridge_ports(&bridge), vec![tap.clone()]);

    // A crash, and a TAP left on the bridge by it: the restart keeps v1 (same address, rules,
    // working network) and removes the stray TAP.
    d.kill9();
    sh(&format!(
        "ip tuntap add ht0000deadbeef mode tap && ip link set ht0000deadbeef master {bridge}"
    ));
    d.spawn();
    assert_eq!(bridge_ports(&bridge), vec![tap.clone()]);
    assert_eq!(ip_of(&d, "v1"), ip);
    let gw = subnet.replace(".0/30", ".1");
    let (_, code) = vm_sh(&d, "v1", &format!("ping -c1 -W3 {gw}"));
    assert_eq!(code, 0, "the network works after the restart");
    let chain = format!("vm_{id}");
    assert!(nft_has(&bridge, &chain));

    // Rates: a token bucket on the TAP into the VM, a policer out of it; `off` removes one.
    d.ok(&[
        "net",
        "set",
        "v1",
        "--rate-in",
        "10mbit",
        "--rate-out",
        "5mbit",
    ]);
    let tc = sh_out(&format!("tc qdisc show dev {tap}"));
    assert!(tc.contains("tbf") && tc.contains("10Mbit"), "{tc}");
    let port_chain = sh_out(&format!("nft list chain bridge {bridge} port_{id}"));
    assert!(
        port_chain.contains("limit rate over 625000 bytes/second"),
        "{port_chain}"
    );
    assert!(d
        .ok(&["describe", "v1"])
        .contains("Rates:   in 10mbit, out 5mbit"));
    d.ok(&["net", "set", "v1", "--rate-in", "off"]);
    assert!(!sh_out(&format!("tc qdisc show dev {tap}")).contains("tbf"));
    let o = d.hutch(&["net", "set", "v1", "--rate-out", "fast"]);
    assert!(!o.status.success(), "a malformed rate");

    // stop/start keeps the address.
    d.ok(&["stop", "v1"]);
    d.ok(&["start", "v1"]);
    assert_eq!(ip_of(&d, "v1"), ip);
    let (_, code) = vm_sh(&d, "v1", &format!("ping -c1 -W3 {gw}"));
    assert_eq!(code, 0);

    // rm: no TAP, no rules; the address is free again (the next create gets it).
    d.ok(&["rm", "v1"]);
    assert!(bridge_ports(&bridge).is_empty());
    assert!(!Path::new(&format!("/sys/class/net/{tap}")).exists());
    assert!(!nft_has(&bridge, &chain));
    d.ok(&["new", "--image", "busybox", "--name", "v3"]);
    assert_eq!(ip_of(&d, "v3"), ip);
}

fn sh_out(script: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn bridge_ports(bridge: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// Whether hutch's inet table of `bridge` has chain `chain`.
fn nft_has(bridge: &str, chain: &str) -> bool {
    Command::new("nft")
        .args(["list", "chain", "inet", bridge, chain])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}
