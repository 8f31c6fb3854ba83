//! The E2B-compatible API on the wire, with curl: what the official SDKs never send. Wrong keys,
//! another account's sandbox, unknown ids, malformed bodies and Connect envelopes all get
//! E2B-shaped errors and change nothing; the proxy serves the API on its domain. One sandbox
//! (TCG) for the whole test. The SDKs' own sessions are in e2b_sdk.rs.

mod common;
use common::ssh_client::*;
use common::*;
use serde_json::{json, Value};
use std::process::Command;

/// One HTTP exchange: (status, body).
fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> (u16, Vec<u8>) {
    exchange(&[], method, url, headers, body).0
}

/// The same over HTTP/2 without TLS (h2c, prior knowledge): also the HTTP version answered.
fn h2c(url: &str, headers: &[(&str, &str)], body: &[u8]) -> ((u16, Vec<u8>), String) {
    exchange(
        &["--http2-prior-knowledge"],
        "POST",
        url,
        headers,
        Some(body),
    )
}

fn exchange(
    flags: &[&str],
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> ((u16, Vec<u8>), String) {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let mut c = Command::new("curl");
    c.args(flags)
        .args(["-s", "-X", method, "-o"])
        .arg(out_file.path())
        .args(["-w", "%{http_code} %{http_version}", "--max-time", "120"]);
    for (k, v) in headers {
        c.arg("-H").arg(format!("{k}: {v}"));
    }
    let body_file = tempfile::NamedTempFile::new().unwrap();
    if let Some(b) = body {
        std::fs::write(body_file.path(), b).unwrap();
        c.arg("--data-binary")
            .arg(format!("@{}", body_file.path().display()));
    }
    let o = c.arg(url).output().unwrap();
    let w = String::from_utf8_lossy(&o.stdout).to_string();
    let (code, version) = w.split_once(' ').unwrap_or((&w, ""));
    (
        (
            code.parse().unwrap_or(0),
            std::fs::read(out_file.path()).unwrap_or_default(),
        ),
        version.to_string(),
    )
}

fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(b)}))
}

/// A Connect envelope.
fn envelope(flags: u8, msg: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// The end-of-stream envelope's error of a streamed answer.
fn stream_error(b: &[u8]) -> Value {
    let mut rest = b;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let msg = &rest[5..5 + len];
        if rest[0] & 2 != 0 {
            return json_of(msg)["error"].clone();
        }
        rest = &rest[5 + len..];
    }
    Value::Null
}

#[test]
fn e2b_api_refuses_what_it_should_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (port, ssh_port, proxy_port) = (free_port(), free_port(), free_port());
    let admin = keygen(w, "admin", &["-t", "ed25519"]);
    let (alice, bob) = (
        keygen(w, "alice", &["-t", "ed25519"]),
        keygen(w, "bob", &["-t", "ed25519"]),
    );
    let d = Daemon::start(&[
        "--e2b-listen",
        &format!("127.0.0.1:{port}"),
        "--http-listen",
        &format!("127.0.0.1:{proxy_port}"),
        "--ssh-listen",
        &format!("127.0.0.1:{ssh_port}"),
        "--admin-keys",
        &format!("{}.pub", admin.display()),
    ]);
    d.import_busybox(&busybox_layout(w));
    let s = Ssh { port: ssh_port };
    let mut tokens = Vec::new();
    for (name, key) in [("alice", &alice), ("bob", &bob)] {
        let pubkey = std::fs::read(format!("{}.pub", key.display())).unwrap();
        let (_, se, c) = text(&s.run(&admin, "admin", &["adduser", name], Some(&pubkey), false));
        assert_eq!(c, 0, "{se}");
        let (so, se, c) = text(&s.run(key, name, &["token", "create", "--json"], None, false));
        assert_eq!(c, 0, "{se}");
        let v: Value = serde_json::from_str(&so).unwrap();
        tokens.push(v["token"].as_str().unwrap().to_string());
    }
    let (ak, bk) = (tokens[0].clone(), tokens[1].clone());
    let api = format!("http://127.0.0.1:{port}");
    let jh = ("content-type", "application/json");
    let ls = || d.ok(&["ls", "--json"]);
    let before = ls();

    // Control plane: keys, bodies, templates.
    let (st, b) = http(
        "GET",
        &format!("{api}/v2/sandboxes"),
        &[("x-api-key", "nope")],
        None,
    );
    assert_eq!(st, 401);
    assert_eq!(json_of(&b)["code"], 401, "E2B's error shape");
    let (st, _) = http("GET", &format!("{api}/v2/sandboxes"), &[], None);
    assert_eq!(st, 401);
    for (body, want) in [
        (&b"{not json"[..], 400),
        (br#"{"templateID":"no-such-template"}"#, 404),
        (br#"{"templateID":"busybox","timeout":0}"#, 400),
        (br#"{"templateID":"busybox","envVars":{"A=B":"x"}}"#, 400),
        (
            br#"{"templateID":"busybox","volumeMounts":[{"name":"v","path":"/v"}]}"#,
            400,
        ),
        (br#"{"templateID":""}"#, 400),
    ] {
        let (st, b) = http(
            "POST",
            &format!("{api}/sandboxes"),
            &[("x-api-key", &ak), jh],
            Some(body),
        );
        assert_eq!(
            st,
            want,
            "{}: {}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&b)
        );
        assert!(json_of(&b)["message"].is_string());
    }
    // A body over the control plane's 1 MiB bound is refused before it is held in full.
    let mut huge = br#"{"templateID":"busybox","metadata":{"k":""#.to_vec();
    huge.resize(huge.len() + (3 << 20), b'a');
    huge.extend_from_slice(br#""}}"#);
    let (st, b) = http(
        "POST",
        &format!("{api}/sandboxes"),
        &[("x-api-key", &ak), jh],
        Some(&huge),
    );
    assert_eq!((st, json_of(&b)["code"].clone()), (413, json!(413)));
    assert_eq!(ls(), before, "refused creates made nothing");

    // Alice's sandbox.
    let (st, b) = http(
        "POST",
        &format!("{api}/sandboxes"),
        &[("x-api-key", &ak), jh],
        Some(br#"{"templateID":"busybox","timeout":600,"metadata":{"team":"a"}}"#),
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&b));
    let sb = json_of(&b);
    let id = sb["sandboxID"].as_str().unwrap().to_string();
    let token = sb["envdAccessToken"].as_str().unwrap().to_string();
    assert_eq!(sb["envdVersion"], "0.5.7");
    assert_eq!(sb["domain"], "hutch.internal");

    // Bob sees none of it and cannot touch it.
    for (m, path) in [
        ("GET", format!("/sandboxes/{id}")),
        ("DELETE", format!("/sandboxes/{id}")),
        ("POST", format!("/sandboxes/{id}/pause")),
        ("POST", format!("/sandboxes/{id}/timeout")),
        ("POST", format!("/v2/sandboxes/{id}/connect")),
    ] {
        let (st, b) = http(
            m,
            &format!("{api}{path}"),
            &[("x-api-key", &bk), jh],
            Some(br#"{"timeout":10}"#),
        );
        assert_eq!(st, 404, "bob {m} {path}: {}", String::from_utf8_lossy(&b));
    }
    let (_, b) = http(
        "GET",
        &format!("{api}/v2/sandboxes"),
        &[("x-api-key", &bk)],
        None,
    );
    assert_eq!(json_of(&b), json!([]));
    let (_, b) = http(
        "GET",
        &format!("{api}/v2/sandboxes?metadata=team%3Da"),
        &[("x-api-key", &ak)],
        None,
    );
    assert_eq!(json_of(&b)[0]["sandboxID"], id.as_str());
    // Unknown and malformed ids are simply not found.
    for bad in ["nosuchsandbox", "..%2F..%2Fetc", "A"] {
        let (st, _) = http(
            "GET",
            &format!("{api}/sandboxes/{bad}"),
            &[("x-api-key", &ak)],
            None,
        );
        assert_eq!(st, 404, "{bad}");
    }
    let (st, _) = http(
        "POST",
        &format!("{api}/sandboxes/{id}/timeout"),
        &[("x-api-key", &ak), jh],
        Some(b"{\"timeout\":0}"),
    );
    assert_eq!(st, 400);

    // envd: the access token is the sandbox's, not the API key.
    let envd = |extra: &[(&str, &str)], path: &str, ct: &str, body: &[u8]| {
        let mut h = vec![
            ("e2b-sandbox-id", id.as_str()),
            ("e2b-sandbox-port", "49983"),
            ("content-type", ct),
        ];
        h.extend_from_slice(extra);
        http("POST", &format!("{api}{path}"), &h, Some(body))
    };
    let auth = [("x-access-token", token.as_str())];
    let (st, _) = envd(
        &[("x-access-token", &ak)],
        "/process.Process/List",
        "application/json",
        b"{}",
    );
    assert_eq!(st, 401, "an API key is no access token");
    let (st, b) = envd(&auth, "/process.Process/List", "application/json", b"{}");
    assert_eq!((st, json_of(&b)), (200, json!({"processes": []})));
    let (st, b) = http(
        "GET",
        &format!("{api}/health"),
        &[("e2b-sandbox-id", "nosuchsandbox")],
        None,
    );
    assert_eq!(st, 502);
    assert!(json_of(&b)["message"]
        .as_str()
        .unwrap()
        .contains("was not found"));

    // Malformed Connect calls: unary and streamed.
    let (st, b) = envd(&auth, "/process.Process/List", "application/json", b"{oops");
    assert_eq!(
        (st, json_of(&b)["code"].clone()),
        (400, json!("invalid_argument"))
    );
    let (st, _) = envd(&auth, "/process.Process/List", "application/proto", b"");
    assert_eq!(st, 415, "only the JSON codec");
    let (st, b) = envd(&auth, "/process.Process/Nope", "application/json", b"{}");
    assert_eq!(
        (st, json_of(&b)["code"].clone()),
        (501, json!("unimplemented"))
    );
    let (st, b) = envd(&auth, "/nope.Service/List", "application/json", b"{}");
    assert_eq!(
        (st, json_of(&b)["code"].clone()),
        (501, json!("unimplemented"))
    );
    let (st, b) = envd(
        &auth,
        "/process.Process/List",
        "application/connect+json",
        &envelope(0, b"{}"),
    );
    assert_eq!(
        stream_error(&b)["code"],
        "invalid_argument",
        "unary method, stream framing: {st}"
    );
    let start = br#"{"process":{"cmd":"/bin/echo","args":["hi"]},"stdin":false}"#;
    for (wire, code) in [
        (envelope(1, start), "unimplemented"),
        (envelope(0x80, start), "invalid_argument"),
        (vec![0, 0xff, 0xff, 0xff, 0xff], "resource_exhausted"),
        (envelope(0, b"{\"process\":"), "invalid_argument"),
        (envelope(0, start)[..7].to_vec(), "invalid_argument"),
        (
            envelope(0, br#"{"process":{"cmd":""}}"#),
            "invalid_argument",
        ),
    ] {
        let (st, b) = envd(
            &auth,
            "/process.Process/Start",
            "application/connect+json",
            &wire,
        );
        assert_eq!(
            stream_error(&b)["code"],
            code,
            "{wire:?}: {st} {}",
            String::from_utf8_lossy(&b)
        );
    }
    let (_, b) = envd(
        &auth,
        "/process.Process/SendSignal",
        "application/json",
        br#"{"process":{"pid":999999},"signal":"SIGNAL_SIGKILL"}"#,
    );
    assert_eq!(json_of(&b)["code"], "not_found");
    let (_, b) = envd(
        &auth,
        "/process.Process/SendSignal",
        "application/json",
        br#"{"process":{"pid":1},"signal":"SIGNAL_SIGSTOP"}"#,
    );
    assert_ne!(
        json_of(&b)["code"],
        Value::Null,
        "only processes started through envd, and only TERM or KILL"
    );
    let (_, b) = envd(
        &[
            ("x-access-token", &token),
            ("authorization", "Basic YWRtaW46"),
        ],
        "/filesystem.Filesystem/Stat",
        "application/json",
        br#"{"path":"/"}"#,
    );
    assert_eq!(
        json_of(&b)["code"],
        "unauthenticated",
        "E2B users are user and root"
    );
    // A real call works after all that: the sandbox is fine.
    let (st, b) = envd(
        &auth,
        "/process.Process/Start",
        "application/connect+json",
        &envelope(0, start),
    );
    assert_eq!(st, 200);
    let text = String::from_utf8_lossy(&b);
    assert!(
        text.contains("\"start\"") && text.contains("aGkK") && text.contains("\"end\""),
        "{text}"
    );
    assert_eq!(stream_error(&b), Value::Null);
    // The same over h2c (the Python SDK's default): unary and streamed.
    let h = [
        ("e2b-sandbox-id", id.as_str()),
        ("x-access-token", token.as_str()),
    ];
    let ((st, b), v) = h2c(
        &format!("{api}/process.Process/List"),
        &[h[0], h[1], ("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(
        (st, v.as_str(), json_of(&b)),
        (200, "2", json!({"processes": []}))
    );
    let ((st, b), v) = h2c(
        &format!("{api}/process.Process/Start"),
        &[h[0], h[1], ("content-type", "application/connect+json")],
        &envelope(0, start),
    );
    assert_eq!((st, v.as_str()), (200, "2"));
    assert!(
        String::from_utf8_lossy(&b).contains("aGkK"),
        "streamed over h2c"
    );
    let (st, b) = http(
        "GET",
        &format!("{api}/files?path=/nope"),
        &[("e2b-sandbox-id", &id), ("x-access-token", &token)],
        None,
    );
    assert_eq!((st, json_of(&b)["code"].clone()), (404, json!(404)));

    // The proxy serves the same API on its domain.
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let (st, b) = http(
        "GET",
        &format!("{proxy}/v2/sandboxes"),
        &[("host", "api.hutch.internal"), ("x-api-key", &ak)],
        None,
    );
    assert_eq!((st, json_of(&b)[0]["sandboxID"].clone()), (200, json!(id)));
    let envd_host = format!("49983-{id}.hutch.internal");
    let (st, _) = http(
        "GET",
        &format!("{proxy}/health"),
        &[("host", &envd_host), ("x-access-token", &token)],
        None,
    );
    assert_eq!(st, 204);
    let (st, _) = http(
        "GET",
        &format!("{proxy}/health"),
        &[("host", &envd_host)],
        None,
    );
    assert_eq!(st, 401);
    // A sandbox header on the API host is not a way into another sandbox's envd.
    let (st, _) = http(
        "GET",
        &format!("{proxy}/health"),
        &[
            ("host", "api.hutch.internal"),
            ("e2b-sandbox-id", &id),
            ("x-access-token", &token),
        ],
        None,
    );
    assert_eq!(st, 200, "answered by the control plane's /health");

    // The sandbox's own ports through the proxy, public as at E2B (get_host(port)).
    let web = br#"{"process":{"cmd":"/bin/sh","args":["-c","mkdir -p /www && echo sbx-web > /www/index.html && busybox httpd -p 8080 -h /www"]},"stdin":false}"#;
    let (st, _) = envd(
        &auth,
        "/process.Process/Start",
        "application/connect+json",
        &envelope(0, web),
    );
    assert_eq!(st, 200);
    let web_host = format!("8080-{id}.hutch.internal");
    let mut got = (0, Vec::new());
    for _ in 0..50 {
        got = http(
            "GET",
            &format!("{proxy}/index.html"),
            &[("host", &web_host)],
            None,
        );
        if got.0 == 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(got.0, 200, "{}", String::from_utf8_lossy(&got.1));
    assert_eq!(got.1, b"sbx-web\n");

    // Kill: gone everywhere, and nothing else changed.
    let (st, _) = http(
        "DELETE",
        &format!("{api}/sandboxes/{id}"),
        &[("x-api-key", &ak)],
        None,
    );
    assert_eq!(st, 204);
    let (st, _) = http(
        "GET",
        &format!("{api}/sandboxes/{id}"),
        &[("x-api-key", &ak)],
        None,
    );
    assert_eq!(st, 404);
    let (st, _) = envd(&auth, "/process.Process/List", "application/json", b"{}");
    assert_eq!(st, 502);
    assert_eq!(ls(), before);
}
