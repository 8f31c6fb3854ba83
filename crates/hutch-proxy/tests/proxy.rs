//! Routing, authorization, share links, TLS and input bounds, over real sockets on 127.0.0.1.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use hutch_proxy::{ca_pem, tls_config, Limits, TlsSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo(r: reqwest::Response) -> serde_json::Value {
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn owner_token_reaches_a_private_port_without_leaking_to_the_guest() {
    let env = start(Limits::default()).await;
    let c = client();
    let host = env.host(env.port);
    let r = env
        .req(&c, &host, "/some/path?q=1")
        .bearer_auth(OWNER)
        .header("cookie", "app=1; hutch_share_1=zzz")
        .header("x-forwarded-for", "6.6.6.6")
        .send()
        .await
        .unwrap();
    let v = echo(r).await;
    let h = &v["headers"];
    assert_eq!(v["uri"], "/some/path?q=1");
    assert!(h.get("authorization").is_none(), "token leaked: {h}");
    assert_eq!(h["cookie"], "app=1", "share cookies stripped, others kept");
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "client's own value replaced"
    );
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], host.as_str());
    assert_eq!(h["host"], host.as_str());
    assert_eq!(*env.fake.touched.lock().unwrap(), vec!["vm-1".to_string()]);

    // The name works like the id.
    let r = env
        .req(&c, &format!("{}-web.{DOMAIN}", env.port), "/")
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_paused_vm_is_woken_only_for_a_request_that_may_reach_it() {
    let env = start(Limits::default()).await;
    let c = client();
    let host = format!("{}-dozing.{DOMAIN}", env.port);
    for token in [None, Some(OTHER)] {
        let mut r = env.req(&c, &host, "/");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        assert_eq!(r.send().await.unwrap().status(), 401);
    }
    assert!(env.fake.woken.lock().unwrap().is_empty());
    let r = env
        .req(&c, &host, "/")
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    echo(r).await;
    assert_eq!(*env.fake.woken.lock().unwrap(), vec!["vm-1".to_string()]);
    assert_eq!(*env.fake.touched.lock().unwrap(), vec!["vm-1".to_string()]);
    // One that does not wake: 503, and no request reaches anything.
    let r = env
        .req(&c, &format!("{}-comatose.{DOMAIN}", env.public_port), "/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(code(r).await, "vm_not_running");
    assert_eq!(env.fake.woken.lock().unwrap().len(), 2);
    assert_eq!(env.fake.touched.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn private_port_without_or_with_a_wrong_token_is_401() {
    let env = start(Limits::default()).await;
    let c = client();
    let host = env.host(env.port);
    let r = env.req(&c, &host, "/").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(code(r).await, "unauthorized");
    let r = env
        .req(&c, &host, "/")
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // vm-2's owner token does not open vm-1.
    let r = env
        .req(&c, &host, "/")
        .bearer_auth(OTHER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Basic credentials are no bearer token.
    let r = env
        .req(&c, &host, "/")
        .header("authorization", format!("Basic {OWNER}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        env.state.hits.load(Ordering::SeqCst),
        0,
        "nothing reached the VM"
    );
    assert!(env.fake.touched.lock().unwrap().is_empty());
    // vm-2's token does open vm-2.
    let r = env
        .req(&c, &format!("{}-vm-2.{DOMAIN}", env.port), "/")
        .bearer_auth(OTHER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn public_port_needs_no_token() {
    let env = start(Limits::default()).await;
    let c = client();
    let r = env
        .req(&c, &env.host(env.public_port), "/")
        .send()
        .await
        .unwrap();
    echo(r).await;
    // The same port is private on vm-2.
    let r = env
        .req(&c, &format!("{}-vm-2.{DOMAIN}", env.public_port), "/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// The `hutch_share_<port>=TOKEN` pair of a Set-Cookie value, and its attributes.
fn cookie_of(r: &reqwest::Response) -> (String, String) {
    let sc = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let (pair, attrs) = sc.split_once(';').unwrap();
    (pair.to_string(), attrs.to_string())
}

#[tokio::test]
async fn share_link_redirects_with_a_cookie_that_then_grants_access() {
    let env = start(Limits::default()).await;
    let c = client();
    let link = env
        .proxy
        .share_link("Web", "vm-1", env.port, Duration::from_secs(600), "http");
    let prefix = format!("http://{}-web.{DOMAIN}/?hutch_share=", env.port);
    assert!(link.starts_with(&prefix), "{link}");
    let token = &link[prefix.len()..];
    let host = format!("{}-web.{DOMAIN}", env.port);

    let r = env
        .req(&c, &host, &format!("/app?a=1&hutch_share={token}&b=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        format!("http://{host}/app?a=1&b=2")
    );
    let (pair, attrs) = cookie_of(&r);
    assert_eq!(pair, format!("hutch_share_{}={token}", env.port));
    assert!(attrs.contains("HttpOnly"), "{attrs}");
    assert!(attrs.contains("SameSite=Lax"), "{attrs}");
    assert!(attrs.contains("Path=/"), "{attrs}");
    assert!(!attrs.contains("Secure"), "plain http: {attrs}");
    let max_age: u64 = attrs
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((590..=600).contains(&max_age), "{max_age}");
    assert_eq!(env.state.hits.load(Ordering::SeqCst), 0);

    let r = env
        .req(&c, &host, "/app?a=1&b=2")
        .header("cookie", format!("x=y; {pair}"))
        .send()
        .await
        .unwrap();
    let v = echo(r).await;
    assert_eq!(
        v["headers"]["cookie"], "x=y",
        "the share cookie stays with the proxy"
    );
    // The cookie is bound to vm-1, whichever label reaches it.
    let r = env
        .req(&c, &env.host(env.port), "/")
        .header("cookie", pair.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn expired_tampered_and_misdirected_share_tokens_are_401() {
    let env = start(Limits::default()).await;
    let c = client();
    let token = |vm: &str, port: u16, ttl: u64| {
        let link = env
            .proxy
            .share_link(vm, vm, port, Duration::from_secs(ttl), "http");
        link.split("hutch_share=").nth(1).unwrap().to_string()
    };
    let host = env.host(env.port);
    let good = token("vm-1", env.port, 600);
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let cases = [
        ("expired", token("vm-1", env.port, 0)),
        ("tampered", tampered),
        ("other port", token("vm-1", env.public_port, 600)),
        ("other vm", token("vm-2", env.port, 600)),
        ("garbage", "%%%".to_string()),
    ];
    for (what, t) in &cases {
        let r = env
            .req(&c, &host, &format!("/?hutch_share={t}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{what} as parameter");
        assert_eq!(code(r).await, "unauthorized");
        let r = env
            .req(&c, &host, "/")
            .header("cookie", format!("hutch_share_{}={t}", env.port))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{what} as cookie");
    }
    // A good token under another port's cookie name does not count.
    let r = env
        .req(&c, &host, "/")
        .header("cookie", format!("hutch_share_{}={good}", env.public_port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(env.state.hits.load(Ordering::SeqCst), 0);
    // And the good one does.
    let r = env
        .req(&c, &host, "/")
        .header("cookie", format!("hutch_share_{}={good}", env.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn unknown_stopped_and_refused_map_to_404_503_502() {
    let env = start(Limits::default()).await;
    let c = client();
    for host in [
        format!("{}-nosuch.{DOMAIN}", env.port),
        "example.com".to_string(),
        format!("a.vm-1.{DOMAIN}"),
        DOMAIN.to_string(),
        format!("99999-vm-1.{DOMAIN}"),
    ] {
        let r = env
            .req(&c, &host, "/")
            .bearer_auth(OWNER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{host}");
        assert_eq!(code(r).await, "not_found");
    }
    // Absolute-form targets route by their authority; CONNECT is refused.
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    let req = format!(
        "GET http://{}/x HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n",
        env.host(env.public_port)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let out = read_all_with_timeout(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    let req = format!(
        "CONNECT {0}:443 HTTP/1.1\r\nHost: {0}:443\r\n\r\n",
        env.host(env.public_port)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 405");

    let r = env
        .req(&c, &format!("8080-sleepy.{DOMAIN}"), "/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(code(r).await, "vm_not_running");

    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let r = env
        .req(&c, &env.host(closed), "/")
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(code(r).await, "bad_gateway");

    // A guest that answers with a huge head is cut off, not believed.
    let r = env
        .req(&c, &env.host(env.port), "/bighead")
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn https_with_the_generated_ca() {
    let env = start(Limits::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let src = TlsSource::GeneratedCa {
        dir: dir.path().join("ca"),
    };
    let tls = tls_config(&src, DOMAIN).unwrap();
    let ca1 = ca_pem(&dir.path().join("ca")).unwrap();
    assert!(ca1.starts_with("-----BEGIN CERTIFICATE-----"));
    // A second start reuses the CA; its leaf is trusted by a client of the first.
    let tls2 = tls_config(&src, DOMAIN).unwrap();
    assert_eq!(ca_pem(&dir.path().join("ca")).unwrap(), ca1);

    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    for cfg in [tls, tls2] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap());
        let p = env.proxy.clone();
        tasks.push(Task(tokio::spawn(async move {
            p.serve_https(l, cfg).await.unwrap();
        })));
    }
    let host = env.host(env.port);
    for addr in &addrs {
        let c = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca1.as_bytes()).unwrap())
            .resolve(&host, *addr)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let url = format!("https://{host}:{}/", addr.port());
        let r = c.get(&url).bearer_auth(OWNER).send().await.unwrap();
        let v = echo(r).await;
        assert_eq!(v["headers"]["x-forwarded-proto"], "https");
        // Share cookies are Secure over https.
        let link = env
            .proxy
            .share_link("vm-1", "vm-1", env.port, Duration::from_secs(60), "https");
        let q = link.split_once('?').unwrap().1;
        let r = c.get(format!("{url}?{q}")).send().await.unwrap();
        assert_eq!(r.status(), 303);
        assert!(cookie_of(&r).1.contains("; Secure"));
    }
    // Without the CA the certificate is not trusted.
    let c = reqwest::Client::builder()
        .resolve(&host, addrs[0])
        .build()
        .unwrap();
    let err = c
        .get(format!("https://{host}:{}/", addrs[0].port()))
        .send()
        .await;
    assert!(err.is_err());
}

async fn read_all_with_timeout(s: &mut TcpStream, t: Duration) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    match tokio::time::timeout(t, s.read_to_end(&mut buf)).await {
        Ok(_) => Some(buf),
        Err(_) => None,
    }
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let env = start(Limits {
        header_read_timeout: Duration::from_millis(500),
        ..Limits::default()
    })
    .await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x").await.unwrap();
    let out = read_all_with_timeout(&mut s, Duration::from_secs(5)).await;
    assert!(out.is_some(), "the connection stayed open");
    let out = String::from_utf8_lossy(out.as_deref().unwrap()).to_string();
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
}

#[tokio::test]
async fn huge_headers_and_garbage_are_refused_and_serving_goes_on() {
    let env = start(Limits::default()).await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nx-big: {}\r\n\r\n",
        env.host(env.public_port),
        "a".repeat(200 << 10)
    );
    let _ = s.write_all(req.as_bytes()).await;
    let out = read_all_with_timeout(&mut s, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(
        out.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );

    let mut s = TcpStream::connect(env.addr).await.unwrap();
    let _ = s
        .write_all(b"\x00\xff\r\n\r\nGARBAGE \x01\x02 HTTP/9\r\n\r\n")
        .await;
    let out = read_all_with_timeout(&mut s, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 400"));
    let r = env
        .req(&client(), &env.host(env.public_port), "/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let env = start(Limits {
        max_connections: 2,
        ..Limits::default()
    })
    .await;
    let idle1 = TcpStream::connect(env.addr).await.unwrap();
    let _idle2 = TcpStream::connect(env.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        env.host(env.public_port)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut b = [0u8; 16];
    let early = tokio::time::timeout(Duration::from_millis(700), s.read(&mut b)).await;
    assert!(early.is_err(), "served beyond the limit");
    drop(idle1);
    let out = read_all_with_timeout(&mut s, Duration::from_secs(5))
        .await
        .expect("served once a slot was free");
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test]
async fn dropping_the_serve_task_stops_serving() {
    let env = start(Limits::default()).await;
    let c = client();
    let host = env.host(env.public_port);
    assert_eq!(env.req(&c, &host, "/").send().await.unwrap().status(), 200);
    let Env { tasks, addr, .. } = env;
    drop(tasks);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = c
        .get(format!("http://{addr}/"))
        .header("host", host)
        .send()
        .await;
    assert!(r.is_err(), "still served: {r:?}");
}

#[tokio::test]
async fn a_vm_the_daemon_dials_is_reached_through_its_connection() {
    let env = start(Limits::default()).await;
    let c = client();
    let far = format!("{}-far.{DOMAIN}", env.port);
    // Only an authorized request makes the daemon dial.
    let r = env.req(&c, &far, "/x").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(env.fake.dialed.lock().unwrap().is_empty());
    let r = env
        .req(&c, &far, "/through?n=1")
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    let v = echo(r).await;
    assert_eq!(v["uri"], "/through?n=1");
    assert!(v["headers"].get("authorization").is_none());
    assert_eq!(
        *env.fake.dialed.lock().unwrap(),
        vec![("vm-6".to_string(), env.port)]
    );
    // The daemon could not dial: 502 with its reason.
    let r = env
        .req(&c, &format!("{}-cut.{DOMAIN}", env.port), "/")
        .bearer_auth(OWNER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(body.contains("node n9 is down"), "{body}");
}
