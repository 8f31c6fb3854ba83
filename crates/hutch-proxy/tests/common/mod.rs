//! Test fixtures: a fake `Backends`, backend servers on 127.0.0.1, a proxy in front of them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hutch_proxy::{Backends, Limits, Proxy, ProxyConfig, Resolve};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub const DOMAIN: &str = "hutch.test";
pub const OWNER: &str = "owner-token";
pub const OTHER: &str = "other-token";
pub const BIG: usize = 64 << 20;

/// Byte `i` of the big test stream.
pub fn pattern(i: usize) -> u8 {
    (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8
}

pub fn pattern_chunk(start: usize, len: usize) -> Bytes {
    (start..start + len)
        .map(pattern)
        .collect::<Vec<u8>>()
        .into()
}

/// `vm-1` (also named `web`) runs on 127.0.0.1 with `public` ports; `vm-2` runs too, `sleepy`
/// is stopped. OWNER may use vm-1, OTHER may use vm-2. `dozing` is vm-1 paused (it wakes);
/// `comatose` (vm-5) is paused with `public` ports and does not wake. `far` (vm-6) and `cut`
/// (vm-7) run at an address nobody reaches, on "another node": the daemon dials vm-6's ports
/// (at 127.0.0.1) and fails to dial vm-7's; OWNER may use both.
pub struct Fake {
    pub public: Mutex<Vec<u16>>,
    pub touched: Mutex<Vec<String>>,
    pub woken: Mutex<Vec<String>>,
    pub dialed: Mutex<Vec<(String, u16)>>,
}

impl Backends for Fake {
    fn resolve(&self, label: &str) -> Resolve {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let public_ports = self.public.lock().unwrap().clone();
        match label {
            "vm-1" | "web" => Resolve::Running {
                vm: "vm-1".into(),
                ip,
                public_ports,
            },
            "vm-2" => Resolve::Running {
                vm: "vm-2".into(),
                ip,
                public_ports: vec![],
            },
            "far" | "cut" => Resolve::Running {
                vm: if label == "far" { "vm-6" } else { "vm-7" }.into(),
                ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                public_ports: vec![],
            },
            "sleepy" => Resolve::Stopped { vm: "vm-3".into() },
            "dozing" => Resolve::Paused {
                vm: "vm-1".into(),
                public_ports: vec![],
            },
            "comatose" => Resolve::Paused {
                vm: "vm-5".into(),
                public_ports,
            },
            _ => Resolve::Unknown,
        }
    }
    fn authorize(&self, vm: &str, bearer: &str) -> bool {
        matches!(
            (vm, bearer),
            ("vm-1" | "vm-6" | "vm-7", OWNER) | ("vm-2", OTHER)
        )
    }
    fn touched(&self, vm: &str) {
        self.touched.lock().unwrap().push(vm.into());
    }
    fn dial(&self, vm: &str, port: u16) -> Option<hutch_proxy::Dialing<'static>> {
        if !matches!(vm, "vm-6" | "vm-7") {
            return None;
        }
        self.dialed.lock().unwrap().push((vm.into(), port));
        let far = vm == "vm-6";
        Some(Box::pin(async move {
            if !far {
                return Err("node n9 is down".to_string());
            }
            let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?;
            Ok(Box::new(s) as Box<dyn hutch_proxy::Conn>)
        }))
    }
    fn wake(&self, vm: &str) -> hutch_proxy::Waking<'_> {
        self.woken.lock().unwrap().push(vm.into());
        let ip = (vm == "vm-1").then_some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        Box::pin(async move { ip })
    }
}

type TBody = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> TBody {
    Full::new(b.into()).boxed()
}

/// A backend HTTP server's shared state.
#[derive(Default)]
pub struct BackendState {
    pub hits: AtomicUsize,
    /// Released by the test to let `/sse` finish.
    pub sse_go: Notify,
}

async fn backend_handle(req: Request<Incoming>, st: Arc<BackendState>) -> Response<TBody> {
    st.hits.fetch_add(1, Ordering::SeqCst);
    match req.uri().path() {
        "/sse" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: one\n\n")).await;
                st.sse_go.notified().await;
                let _ = tx.send(Bytes::from_static(b"data: two\n\n")).await;
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
        "/download" => {
            const CHUNK: usize = 256 << 10;
            let stream = futures_util::stream::iter(
                (0..BIG / CHUNK)
                    .map(|i| Ok::<_, Infallible>(Frame::data(pattern_chunk(i * CHUNK, CHUNK)))),
            );
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0usize;
            let mut ok = true;
            while let Some(f) = body.frame().await {
                let Ok(f) = f else {
                    ok = false;
                    break;
                };
                if let Some(d) = f.data_ref() {
                    ok &= d.iter().enumerate().all(|(i, b)| *b == pattern(n + i));
                    n += d.len();
                }
            }
            Response::new(full(format!("{n} {ok}")))
        }
        "/bighead" => Response::builder()
            .header("x-big", "a".repeat(100 << 10))
            .body(full("x"))
            .unwrap(),
        _ => {
            let headers: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            let body = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "headers": headers,
            });
            Response::new(full(body.to_string()))
        }
    }
}

/// Aborts the task when dropped.
pub struct Task(pub JoinHandle<()>);
impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts a backend HTTP server; returns its port.
pub async fn backend(st: Arc<BackendState>) -> (u16, Task) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let t = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(backend_handle(req, st).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (port, Task(t))
}

pub struct Env {
    pub proxy: Arc<Proxy>,
    pub fake: Arc<Fake>,
    pub addr: SocketAddr,
    /// A private port of vm-1 (and vm-2).
    pub port: u16,
    /// A public port of vm-1.
    pub public_port: u16,
    pub state: Arc<BackendState>,
    pub tasks: Vec<Task>,
}

pub fn config() -> ProxyConfig {
    ProxyConfig {
        domain: DOMAIN.into(),
        share_key: b"test share key".to_vec(),
    }
}

pub async fn start(limits: Limits) -> Env {
    let state = Arc::new(BackendState::default());
    let (port, t1) = backend(state.clone()).await;
    let (public_port, t2) = backend(state.clone()).await;
    let fake = Arc::new(Fake {
        public: Mutex::new(vec![public_port]),
        touched: Mutex::new(vec![]),
        woken: Mutex::new(vec![]),
        dialed: Mutex::new(vec![]),
    });
    let proxy = Arc::new(Proxy::with_limits(config(), fake.clone(), limits));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let t3 = tokio::spawn({
        let proxy = proxy.clone();
        async move {
            proxy.serve_http(l).await.unwrap();
        }
    });
    Env {
        proxy,
        fake,
        addr,
        port,
        public_port,
        state,
        tasks: vec![t1, t2, Task(t3)],
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

impl Env {
    /// A request to `path` on `host` through the plain-HTTP proxy listener.
    pub fn req(&self, c: &reqwest::Client, host: &str, path: &str) -> reqwest::RequestBuilder {
        c.get(format!("http://{}{path}", self.addr))
            .header("host", host)
    }

    pub fn host(&self, port: u16) -> String {
        format!("{port}-vm-1.{DOMAIN}")
    }
}

/// The error code of a proxy JSON error.
pub async fn code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.unwrap();
    v["error"]["code"].as_str().unwrap_or("").to_string()
}

/// Counts the bytes of a stream of chunks while checking them against `pattern`.
pub async fn check_stream<E: std::fmt::Debug>(
    mut s: impl futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
) -> usize {
    let mut n = 0;
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        for (i, b) in c.iter().enumerate() {
            assert_eq!(*b, pattern(n + i), "byte {}", n + i);
        }
        n += c.len();
    }
    n
}
