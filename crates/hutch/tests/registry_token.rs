//! Bearer-token auth (the Docker Hub / GHCR flow) against the real registry configured for token
//! auth: a 401 names a token realm; the client gets a token there with its credentials and
//! retries. The token issuer is the test's own (RS256 JWTs with an x5c header, signed with the
//! openssl CLI), the registry and the client are the real ones.

mod common;
use base64::Engine;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

fn b64url(d: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
}

fn sign(key: &Path, input: &[u8]) -> Vec<u8> {
    let mut c = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    o.stdout
}

/// Serves GET /token: Basic alice:s3cret gets a token for the scope asked; records the scopes.
fn issuer(key: PathBuf, cert_der: Vec<u8>, scopes: Arc<Mutex<Vec<String>>>) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let realm = format!("http://{}/token", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            r.read_line(&mut first).unwrap_or(0);
            let mut auth = String::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if h.to_ascii_lowercase().starts_with("authorization:") {
                    auth = h[14..].trim().to_string();
                }
            }
            let q = first
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .split_once('?')
                .map(|x| x.1)
                .unwrap_or("")
                .to_string();
            let scope = q
                .split('&')
                .find_map(|kv| kv.strip_prefix("scope="))
                .map(|s| {
                    s.replace("%3A", ":")
                        .replace("%2F", "/")
                        .replace("%2C", ",")
                })
                .unwrap_or_default();
            scopes.lock().unwrap().push(scope.clone());
            let good = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
            );
            let mut c = conn;
            if auth != good {
                let _ = c.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let parts: Vec<&str> = scope.splitn(3, ':').collect();
            let access = if parts.len() == 3 {
                json!([{"type": parts[0], "name": parts[1], "actions": parts[2].split(',').collect::<Vec<_>>()}])
            } else {
                json!([])
            };
            let now = hutch_core::now();
            let header = json!({"alg": "RS256", "typ": "JWT", "x5c": [base64::engine::general_purpose::STANDARD.encode(&cert_der)]});
            let claims = json!({"iss": "hutch-issuer", "sub": "alice", "aud": "hutch-test", "exp": now + 600,
                "nbf": now - 60, "iat": now, "jti": format!("{now}-{}", rand_id()), "access": access});
            let input = format!(
                "{}.{}",
                b64url(header.to_string().as_bytes()),
                b64url(claims.to_string().as_bytes())
            );
            let jwt = format!("{input}.{}", b64url(&sign(&key, input.as_bytes())));
            let body = json!({"token": jwt}).to_string();
            let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    realm
}

fn rand_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn bearer_token_auth_pull_and_push() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    sh(&format!(
        "cd {} && openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem -subj /CN=hutch-token -days 1 2>/dev/null && openssl x509 -in cert.pem -outform DER -out cert.der",
        w.display()
    ));
    let scopes = Arc::new(Mutex::new(Vec::new()));
    let realm = issuer(
        w.join("key.pem"),
        std::fs::read(w.join("cert.der")).unwrap(),
        scopes.clone(),
    );
    let reg = TestRegistry::start_token(&realm, &w.join("cert.pem"));
    let layout = busybox_layout(w);
    reg.push(&layout, "bb", "team/app:1", Some("alice:s3cret"));
    let r = &reg.addr;
    let d = Daemon::start(&[]);

    let o = d.hutch(&["image", "pull", "--insecure", &format!("{r}/team/app:1")]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("token service"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = d.hutch(&[
        "image",
        "pull",
        "--insecure",
        "--creds",
        "alice:wrong",
        &format!("{r}/team/app:1"),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let img = d.json(&[
        "image",
        "pull",
        "--insecure",
        "--creds",
        "alice:s3cret",
        &format!("{r}/team/app:1"),
    ]);
    assert_eq!(img["name"], format!("{r}/team/app:1"));
    assert!(
        scopes
            .lock()
            .unwrap()
            .iter()
            .any(|s| s == "repository:team/app:pull"),
        "{:?}",
        scopes.lock().unwrap()
    );

    // Push asks for pull,push on the target repository.
    d.ok(&[
        "image",
        "push",
        "--insecure",
        "--creds",
        "alice:s3cret",
        &format!("{r}/team/app:1"),
        &format!("{r}/team/copy:1"),
    ]);
    assert!(
        scopes
            .lock()
            .unwrap()
            .iter()
            // The registry's challenge lists the actions in no fixed order.
            .any(|s| s == "repository:team/copy:pull,push" || s == "repository:team/copy:push,pull"),
        "{:?}",
        scopes.lock().unwrap()
    );
    let o = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            "alice:s3cret",
            &format!("docker://{r}/team/copy:1"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["Digest"], img["digest"]);
}
