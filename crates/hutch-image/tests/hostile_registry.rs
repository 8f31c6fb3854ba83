//! A malicious registry (a test-side HTTP server on 127.0.0.1 that can say anything): traversal
//! and malformed digests, short and long bodies, 206 answers with wrong Content-Range,
//! oversized manifests, huge and slow token answers, redirect loops and redirects to loopback.
//! Oracles: a clear error, nothing fetched before descriptors are checked, the canary and
//! everything outside the store unchanged, no temp or partial file left (except the partial of
//! an interrupted transfer, which a later pull resumes), and bounded time. Pulls here set
//! `allow_private` (the server is on loopback); `non_admin_policy_refuses_private_addresses`
//! shows the default refuses it.

mod support;

use hutch_image::{ImageError, PullOptions, Timeouts};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{config_json, gzip, manifest_json, sha, Host, Tar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Req {
    path: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// What the server does with a connection.
enum Act {
    Send(Vec<u8>),
    Sleep(Duration),
    /// Sends the bytes one at a time with a pause between them.
    Drip(Vec<u8>, Duration),
}

type Handler = Arc<dyn Fn(&Req) -> Vec<Act> + Send + Sync>;

struct Server {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    conns: Arc<AtomicUsize>,
}

impl Server {
    async fn start(bind: &str, h: Handler) -> Server {
        let l = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = l.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let (log2, conns2) = (log.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                conns2.fetch_add(1, Ordering::SeqCst);
                let (h, log) = (h.clone(), log2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let mut lines = head.split("\r\n");
                    let first = lines.next().unwrap_or("");
                    let path = first.split(' ').nth(1).unwrap_or("").to_string();
                    let headers = lines
                        .take_while(|l| !l.is_empty())
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let req = Req { path, headers };
                    log.lock().unwrap().push(req.path.clone());
                    for a in h(&req) {
                        let r = match a {
                            Act::Send(b) => s.write_all(&b).await,
                            Act::Sleep(d) => {
                                tokio::time::sleep(d).await;
                                Ok(())
                            }
                            Act::Drip(b, d) => {
                                let mut r = Ok(());
                                for byte in b {
                                    r = s.write_all(&[byte]).await;
                                    if r.is_err() {
                                        break;
                                    }
                                    tokio::time::sleep(d).await;
                                }
                                r
                            }
                        };
                        if r.is_err() {
                            return;
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        Server { addr, log, conns }
    }
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn reference(&self) -> String {
        format!("{}/hostile/app:1", self.addr)
    }
    fn blob_requests(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.contains("/blobs/"))
            .count()
    }
}

fn head(status: &str, headers: &[(&str, String)], len: Option<usize>) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(l) = len {
        h.push_str(&format!("Content-Length: {l}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

fn ok(ctype: &str, body: &[u8]) -> Vec<Act> {
    let mut v = head(
        "200 OK",
        &[("Content-Type", ctype.into())],
        Some(body.len()),
    );
    v.extend_from_slice(body);
    vec![Act::Send(v)]
}

fn not_found() -> Vec<Act> {
    vec![Act::Send(head("404 Not Found", &[], Some(0)))]
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An image: (manifest, config, layer).
fn image() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut t = Tar::default();
    t.dir("etc/");
    t.file("etc/hello", &vec![b'h'; 64 << 10]);
    let layer = gzip(&t.finish());
    let cfg = config_json();
    let m = manifest_json((&sha(&cfg), cfg.len()), &[(sha(&layer), layer.len())]);
    (m, cfg, layer)
}

/// A well-behaved registry for `image()`, except where `twist` answers first.
fn honest(twist: impl Fn(&Req) -> Option<Vec<Act>> + Send + Sync + 'static) -> Handler {
    let (m, cfg, layer) = image();
    Arc::new(move |r: &Req| {
        if let Some(a) = twist(r) {
            return a;
        }
        if r.path.ends_with("/manifests/1") || r.path.ends_with(&format!("/manifests/{}", sha(&m)))
        {
            return ok(MANIFEST, &m);
        }
        for b in [&cfg, &layer] {
            if r.path.ends_with(&format!("/blobs/{}", sha(b))) {
                return ok("application/octet-stream", b);
            }
        }
        not_found()
    })
}

fn opts() -> PullOptions {
    PullOptions {
        insecure: true,
        allow_private: true,
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(2),
            document: Duration::from_secs(3),
        },
        ..Default::default()
    }
}

async fn pull(h: &Host, reference: &str, o: &PullOptions) -> Result<Vec<String>, ImageError> {
    let mut events = Vec::new();
    let mut progress = |e: hutch_image::PullEvent| {
        events.push(serde_json::to_string(&e).unwrap());
    };
    h.store.pull(reference, o, &mut progress).await?;
    Ok(events)
}

fn partials(h: &Host) -> Vec<(String, u64)> {
    std::fs::read_dir(h.path().join("store/partial"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_registry_pull_works() {
    let h = Host::new();
    let s = Server::start("127.0.0.1:0", honest(|_| None)).await;
    let ev = pull(&h, &s.reference(), &opts()).await.unwrap();
    assert!(ev.iter().any(|e| e.contains("\"building\"")), "{ev:?}");
    assert_eq!(s.blob_requests(), 2);
    h.check();
}

/// Loopback registries speak plain HTTP without `insecure` (as with Docker), by address or
/// by the name `localhost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_registries_need_no_insecure() {
    let h = Host::new();
    let s = Server::start("127.0.0.1:0", honest(|_| None)).await;
    let v6 = Server::start("[::1]:0", honest(|_| None)).await;
    let secure = PullOptions {
        insecure: false,
        ..opts()
    };
    let port = s.addr.port();
    pull(&h, &s.reference(), &secure).await.unwrap();
    pull(&h, &format!("localhost:{port}/hostile/app:1"), &secure)
        .await
        .unwrap();
    let named = PullOptions {
        name: Some("v6:1".into()),
        ..secure
    };
    let r6 = format!("[::1]:{}/hostile/app:1", v6.addr.port());
    pull(&h, &r6, &named).await.unwrap();
    assert!(v6.conns.load(Ordering::SeqCst) > 0);
    h.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_malformed_digests_are_refused_before_any_fetch() {
    let h = Host::new();
    let canary = h.canary().display().to_string();
    let cfg = config_json();
    for bad in [
        format!("sha256:../../../../../../../..{canary}/pwned"),
        format!("sha256:{}", "AB".repeat(32)),
        format!("sha256:{}", "ab".repeat(16)),
        format!("sha256:{}", "ab".repeat(33)),
        format!("md5:{}", "ab".repeat(32)),
    ] {
        for in_config in [false, true] {
            let m = if in_config {
                manifest_json((&bad, 10), &[])
            } else {
                manifest_json((&sha(&cfg), cfg.len()), &[(bad.clone(), 10)])
            };
            let s = Server::start(
                "127.0.0.1:0",
                Arc::new(move |r: &Req| {
                    if r.path.contains("/manifests/") {
                        ok(MANIFEST, &m)
                    } else {
                        ok("application/octet-stream", b"registry bytes")
                    }
                }),
            )
            .await;
            let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
            assert!(e.to_string().contains("invalid digest"), "{bad}: {e}");
            assert_eq!(s.blob_requests(), 0, "fetched before checking {bad}");
        }
    }
    // Negative and oversized sizes, unknown media types: refused before any fetch too.
    let layer_d = sha(b"x");
    for (size, media) in [
        ("-1", "application/vnd.oci.image.layer.v1.tar+gzip"),
        (
            "99999999999999",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        ("10", "text/html"),
    ] {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"{media}","digest":"{layer_d}","size":{size}}}]}}"#,
            sha(&cfg),
            cfg.len()
        );
        let s = Server::start(
            "127.0.0.1:0",
            Arc::new(move |_: &Req| ok(MANIFEST, m.as_bytes())),
        )
        .await;
        let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
        assert!(
            matches!(e, ImageError::BadArchive(_) | ImageError::Limit(_)),
            "{size} {media}: {e}"
        );
        assert_eq!(s.blob_requests(), 0);
    }
    // A reference naming an uppercase digest is refused before any request.
    let e = pull(
        &h,
        &format!("127.0.0.1:1/x@sha256:{}", "A".repeat(64)),
        &opts(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("lowercase"), "{e}");
    h.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_long_and_wrong_bodies() {
    let (_, _, layer) = image();
    let ld = sha(&layer);
    let n = layer.len();
    let h = Host::new();
    let hex = ld[7..].to_string();
    type Twist = Box<dyn Fn(&Req) -> Option<Vec<Act>> + Send + Sync>;
    let is_layer = move |r: &Req| r.path.ends_with(&format!("/blobs/{ld}"));
    let cases: Vec<(&str, Twist)> = vec![
        // Announces fewer bytes than the descriptor.
        ("announces", {
            let (l, il) = (layer.clone(), is_layer.clone());
            Box::new(move |r| {
                il(r).then(|| {
                    let mut v = head("200 OK", &[], Some(n / 2));
                    v.extend_from_slice(&l[..n / 2]);
                    vec![Act::Send(v)]
                })
            })
        }),
        // Sends more than the descriptor (no length: until the connection closes).
        ("larger than its descriptor", {
            let (l, il) = (layer.clone(), is_layer.clone());
            Box::new(move |r| {
                il(r).then(|| {
                    let mut v = head("200 OK", &[], None);
                    v.extend_from_slice(&l);
                    v.extend_from_slice(b"trailing garbage");
                    vec![Act::Send(v)]
                })
            })
        }),
        // Ends early, cleanly.
        ("ended after", {
            let (l, il) = (layer.clone(), is_layer.clone());
            Box::new(move |r| {
                il(r).then(|| {
                    let mut v = head("200 OK", &[], None);
                    v.extend_from_slice(&l[..n - 100]);
                    vec![Act::Send(v)]
                })
            })
        }),
        // Right size, wrong bytes.
        ("does not match its digest", {
            let il = is_layer.clone();
            Box::new(move |r| il(r).then(|| ok("application/octet-stream", &vec![0u8; n])))
        }),
        // A 206 nobody asked for.
        ("unexpected answer 206", {
            let (l, il) = (layer.clone(), is_layer.clone());
            Box::new(move |r| {
                il(r).then(|| {
                    let mut v = head(
                        "206 Partial Content",
                        &[("Content-Range", format!("bytes 0-{}/{n}", n - 1))],
                        Some(n),
                    );
                    v.extend_from_slice(&l);
                    vec![Act::Send(v)]
                })
            })
        }),
    ];
    for (want, twist) in cases {
        let s = Server::start("127.0.0.1:0", honest(move |r| twist(r))).await;
        let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
        h.check();
    }
    // Cut off midway (the announced length is never reached): an interruption; what arrived
    // stays in partial/ and the next pull resumes from it, verified.
    let (l, il) = (layer.clone(), is_layer.clone());
    let s = Server::start(
        "127.0.0.1:0",
        honest(move |r| {
            il(r).then(|| {
                let mut v = head("200 OK", &[], Some(n));
                v.extend_from_slice(&l[..n / 2]);
                vec![Act::Send(v)]
            })
        }),
    )
    .await;
    let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
    assert!(matches!(e, ImageError::Interrupted(_)), "{e}");
    let p = partials(&h);
    assert!(
        p.len() == 1 && p[0].0 == hex && p[0].1 <= n as u64 / 2,
        "{p:?}"
    );
    let s = Server::start("127.0.0.1:0", honest(range_server(layer.clone(), is_layer))).await;
    let ev = pull(&h, &s.reference(), &opts()).await.unwrap();
    assert!(
        ev.iter()
            .any(|e| e.contains("resumed_from") && !e.contains("\"resumed_from\":0")),
        "{ev:?}"
    );
    h.check();
}

/// Answers Range requests for the layer correctly.
fn range_server(
    l: Vec<u8>,
    is_layer: impl Fn(&Req) -> bool + Send + Sync + 'static,
) -> impl Fn(&Req) -> Option<Vec<Act>> + Send + Sync + 'static {
    move |r| {
        if !is_layer(r) {
            return None;
        }
        let n = l.len();
        let from: usize = r
            .header("range")?
            .strip_prefix("bytes=")?
            .trim_end_matches('-')
            .parse()
            .ok()?;
        let mut v = head(
            "206 Partial Content",
            &[("Content-Range", format!("bytes {from}-{}/{n}", n - 1))],
            Some(n - from),
        );
        v.extend_from_slice(&l[from..]);
        Some(vec![Act::Send(v)])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_answers_must_match_the_request() {
    let (_, _, layer) = image();
    let ld = sha(&layer);
    let n = layer.len();
    let h = Host::new();
    for (cr, body_from) in [
        (format!("bytes 0-{}/{n}", n - 1), 0), // from the start, not where asked
        (format!("bytes {}-{}/{}", n / 2, n - 1, n + 5), n / 2), // wrong total
        ("bytes */*".to_string(), n / 2),
        (String::new(), n / 2),
    ] {
        // Half of the right bytes are already on disk.
        std::fs::write(
            h.path().join("store/partial").join(&ld[7..]),
            &layer[..n / 2],
        )
        .unwrap();
        let (l, d) = (layer.clone(), ld.clone());
        let s = Server::start(
            "127.0.0.1:0",
            honest(move |r| {
                r.path.ends_with(&format!("/blobs/{d}")).then(|| {
                    let mut hs = vec![];
                    if !cr.is_empty() {
                        hs.push(("Content-Range", cr.clone()));
                    }
                    let mut v = head("206 Partial Content", &hs, Some(n - body_from));
                    v.extend_from_slice(&l[body_from..]);
                    vec![Act::Send(v)]
                })
            }),
        )
        .await;
        let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
        assert!(e.to_string().contains("Content-Range"), "{e}");
        h.check();
    }
    // A partial holding wrong bytes, resumed with a correct range: the digest catches it.
    std::fs::write(
        h.path().join("store/partial").join(&ld[7..]),
        vec![0u8; n / 2],
    )
    .unwrap();
    let d = ld.clone();
    let s = Server::start(
        "127.0.0.1:0",
        honest(range_server(layer.clone(), move |r: &Req| {
            r.path.ends_with(&format!("/blobs/{d}"))
        })),
    )
    .await;
    let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    h.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_manifests_and_tokens_are_cut_off() {
    let h = Host::new();
    let start = Instant::now();
    // Streamed without a length.
    let s = Server::start(
        "127.0.0.1:0",
        Arc::new(|_: &Req| {
            let mut v = head("200 OK", &[("Content-Type", MANIFEST.into())], None);
            v.extend(std::iter::repeat_n(b' ', 6 << 20));
            vec![Act::Send(v)]
        }),
    )
    .await;
    let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
    assert!(e.to_string().contains("larger than 4194304"), "{e}");
    // Announced.
    let s = Server::start(
        "127.0.0.1:0",
        Arc::new(|_: &Req| {
            vec![
                Act::Send(head("200 OK", &[], Some(100 << 20))),
                Act::Sleep(Duration::from_secs(10)),
            ]
        }),
    )
    .await;
    let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
    assert!(e.to_string().contains("larger than 4194304"), "{e}");
    // A token service answering megabytes.
    let s = token_server(|| {
        let mut v = head(
            "200 OK",
            &[("Content-Type", "application/json".into())],
            None,
        );
        v.extend_from_slice(b"{\"token\":\"");
        v.extend(std::iter::repeat_n(b'a', 3 << 20));
        vec![Act::Send(v)]
    })
    .await;
    let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("token service answer is larger than 1048576"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
    h.check();
}

/// A registry that demands a Bearer token from its own `/token`, answered by `token`.
async fn token_server(token: impl Fn() -> Vec<Act> + Send + Sync + 'static) -> Server {
    let realm = Arc::new(Mutex::new(String::new()));
    let r2 = realm.clone();
    let s = Server::start(
        "127.0.0.1:0",
        Arc::new(move |r: &Req| {
            if r.path.starts_with("/token") {
                return token();
            }
            let challenge = format!(
                r#"Bearer realm="{}/token",service="hostile""#,
                r2.lock().unwrap()
            );
            vec![Act::Send(head(
                "401 Unauthorized",
                &[("WWW-Authenticate", challenge)],
                Some(0),
            ))]
        }),
    )
    .await;
    *realm.lock().unwrap() = s.url();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_time_out() {
    let h = Host::new();
    let drip = |body: &[u8]| {
        let mut v = head(
            "200 OK",
            &[("Content-Type", "application/json".into())],
            None,
        );
        v.extend_from_slice(body);
        vec![
            Act::Send(v),
            Act::Drip(vec![b' '; 200], Duration::from_millis(100)),
        ]
    };
    // A token that trickles in, a byte at a time: the document deadline stops it.
    let s = token_server(move || drip(b"{\"token\":")).await;
    let start = Instant::now();
    let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
    assert!(e.to_string().contains("token service"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    // A manifest that trickles in.
    let s = Server::start("127.0.0.1:0", Arc::new(move |_: &Req| drip(b"{"))).await;
    let start = Instant::now();
    assert!(pull(&h, &s.reference(), &opts()).await.is_err());
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    // A blob that stalls after its headers: the read timeout stops it.
    let (_, _, layer) = image();
    let ld = sha(&layer);
    let s = Server::start(
        "127.0.0.1:0",
        honest(move |r| {
            r.path.ends_with(&format!("/blobs/{ld}")).then(|| {
                vec![
                    Act::Send(head("200 OK", &[], Some(layer.len()))),
                    Act::Sleep(Duration::from_secs(30)),
                ]
            })
        }),
    )
    .await;
    let start = Instant::now();
    let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
    assert!(matches!(e, ImageError::Interrupted(_)), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    let _ = std::fs::remove_dir_all(h.path().join("store/partial"));
    std::fs::create_dir(h.path().join("store/partial")).unwrap();
    h.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_loops_and_redirects_to_loopback() {
    let h = Host::new();
    // A redirect loop: capped.
    let s = Server::start(
        "127.0.0.1:0",
        Arc::new(|r: &Req| {
            let next = format!("{}x", r.path);
            vec![Act::Send(head(
                "307 Temporary Redirect",
                &[("Location", next)],
                Some(0),
            ))]
        }),
    )
    .await;
    let e = pull(&h, &s.reference(), &opts()).await.unwrap_err();
    assert!(e.to_string().contains("redirects"), "{e}");
    assert!(s.log.lock().unwrap().len() <= 7);
    // A registry the policy allows (only 127.0.0.1 vouched for) redirecting a blob, and
    // naming a token realm, on another loopback address: refused, never contacted.
    let other = Server::start("127.0.0.2:0", honest(|_| None)).await;
    let (_, _, layer) = image();
    let (ld, target) = (sha(&layer), other.url());
    let s = Server::start(
        "127.0.0.1:0",
        honest(move |r| {
            r.path.contains("/blobs/").then(|| {
                let loc = format!("{target}{}", r.path);
                vec![Act::Send(head(
                    "307 Temporary Redirect",
                    &[("Location", loc)],
                    Some(0),
                ))]
            })
        }),
    )
    .await;
    let vouched = PullOptions {
        allow_private: false,
        allow_addrs: vec!["127.0.0.1".parse().unwrap()],
        ..opts()
    };
    let e = pull(&h, &s.reference(), &vouched).await.unwrap_err();
    assert!(e.to_string().contains("refusing to connect"), "{e}");
    let realm_target = other.url();
    let s = Server::start(
        "127.0.0.1:0",
        Arc::new(move |_: &Req| {
            let c = format!(r#"Bearer realm="{realm_target}/token",service="x""#);
            vec![Act::Send(head(
                "401 Unauthorized",
                &[("WWW-Authenticate", c)],
                Some(0),
            ))]
        }),
    )
    .await;
    let e = pull(&h, &s.reference(), &vouched).await.unwrap_err();
    assert!(e.to_string().contains("refusing to connect"), "{e}");
    assert_eq!(
        other.conns.load(Ordering::SeqCst),
        0,
        "the loopback target was contacted"
    );
    let _ = ld;
    h.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_admin_policy_refuses_private_addresses() {
    let h = Host::new();
    let s = Server::start("127.0.0.1:0", honest(|_| None)).await;
    let v6 = Server::start("[::1]:0", honest(|_| None)).await;
    let public = PullOptions {
        allow_private: false,
        // IPv6 literal registries make no valid image name; store under another one.
        name: Some("refused:1".into()),
        ..opts()
    };
    let port = s.addr.port();
    for reference in [
        s.reference(),
        format!("localhost:{port}/hostile/app:1"),
        format!("[::1]:{}/hostile/app:1", v6.addr.port()),
        "10.0.0.1:5000/hostile/app:1".to_string(),
        "169.254.169.254/hostile/app:1".to_string(),
        "100.64.0.1:80/hostile/app:1".to_string(),
        "[::ffff:127.0.0.1]:5000/hostile/app:1".to_string(),
    ] {
        let start = Instant::now();
        let e = pull(&h, &reference, &public).await.unwrap_err();
        assert!(
            e.to_string().contains("refusing to connect"),
            "{reference}: {e}"
        );
        assert!(start.elapsed() < Duration::from_secs(3), "{reference}");
    }
    assert_eq!(s.conns.load(Ordering::SeqCst), 0);
    assert_eq!(v6.conns.load(Ordering::SeqCst), 0);
    // The same registry with the admin's policy works.
    pull(&h, &s.reference(), &opts()).await.unwrap();
    h.check();
}
