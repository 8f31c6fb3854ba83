//! hutchd as a library: configuration, start-up (boot bundle, store, re-attach) and serving the
//! REST API on a unix socket and, optionally, TCP with a bearer token.

pub mod agent;
pub mod api;
#[cfg(test)]
mod api_tests;
pub mod auth;
pub mod cluster;
pub mod cluster_api;
pub mod crash;
pub mod e2b;
pub mod error;
pub mod events;
pub mod identity;
pub mod metadata;
pub mod metrics;
pub mod net;
pub mod net_api;
pub mod node;
pub mod ops_api;
pub mod records;
pub mod secrets;
pub mod service;
pub mod sftp;
pub mod snap_api;
pub mod ssh;
pub mod stream_api;
pub mod tcp;
pub mod template_api;
pub mod timers_api;

use hutch_vmm::{AccelChoice, Vmm};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    /// Where the kernel and initramfs are cached (default DATA_DIR/boot).
    pub boot_cache: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub kernel_modules: Option<PathBuf>,
    pub kernel_package: String,
    pub agent: Option<PathBuf>,
    pub accel: AccelChoice,
    /// The REST API on TCP (None: unix socket only).
    pub tcp: Option<tcp::TcpOptions>,
    pub qemu: PathBuf,
    pub default_disk_gib: u64,
    pub boot_timeout: Duration,
    /// Bounds on what one image may unpack to (layer bombs).
    pub layer_limits: hutch_image::Limits,
    /// Non-admin accounts may pull from loopback, link-local and private addresses.
    pub registry_allow_private: bool,
    /// The SSH front door (None: off).
    pub ssh: Option<ssh::SshOptions>,
    /// Per-account quotas and host admission control.
    pub admission: service::Admission,
    /// Confine every QEMU (own uid, chroot, cgroup); None: `--jail off`.
    pub jail: Option<node::JailOptions>,
    /// Largest upload (file PUT, image archive) in bytes; 413 beyond.
    pub max_upload_bytes: u64,
    /// The VM network (None: `--network off`).
    pub net: Option<net::NetSettings>,
    /// `iss` of VM identity tokens.
    pub identity_issuer: String,
    pub front: FrontDoors,
    /// Run as a node of a cluster on etcd (`--etcd`); None: alone, on the embedded store.
    pub cluster: Option<cluster::ClusterOptions>,
}

/// The network front doors: public DNS and the HTTP(S) proxy to VM ports.
#[derive(Debug, Clone, Default)]
pub struct FrontDoors {
    pub dns_listen: Option<std::net::SocketAddr>,
    pub public_address: Option<std::net::Ipv4Addr>,
    pub http_listen: Option<std::net::SocketAddr>,
    pub https_listen: Option<std::net::SocketAddr>,
    /// The E2B-compatible API (`--e2b-listen`).
    pub e2b_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Guest(#[from] hutch_guest::GuestError),
    #[error(transparent)]
    Store(#[from] hutch_store::kv::StoreError),
    #[error(transparent)]
    Image(#[from] hutch_image::ImageError),
    #[error(transparent)]
    Vmm(#[from] hutch_vmm::VmmError),
}

fn setup(m: impl std::fmt::Display) -> DaemonError {
    DaemonError::Setup(m.to_string())
}

/// Finds the static guest agent: the configured path, `hutch-agent` beside this executable, or
/// the workspace's agent build output.
pub fn find_agent(configured: Option<&Path>) -> Result<PathBuf, DaemonError> {
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(setup(format!("agent {} not found", p.display())))
        };
    }
    let exe = std::env::current_exe().map_err(setup)?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join("hutch-agent"),
        dir.join("../agent/x86_64-unknown-linux-gnu/release/hutch-agent"),
        dir.join("../../agent/x86_64-unknown-linux-gnu/release/hutch-agent"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file() && is_static_elf(p))
        .cloned()
        .ok_or_else(|| {
            setup("no static hutch-agent beside hutchd nor in target/agent; run `make agent` or pass --agent")
        })
}

/// Whether `p` is an x86-64 ELF executable without a program interpreter (statically linked),
/// as it must be to run as PID 1 in the initramfs.
pub fn is_static_elf(p: &Path) -> bool {
    let Ok(b) = std::fs::read(p) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // PT_INTERP = 3
        o + 4 <= b.len() && u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) != 3
    })
}

/// Reads or creates the API token for TCP clients (a secret: see secrets.rs).
pub fn api_token(data_dir: &Path) -> Result<String, DaemonError> {
    let t = secrets::read_or_create(
        &data_dir.join("api-token"),
        |t| !String::from_utf8_lossy(t).trim().is_empty(),
        || hex::encode(rand::random::<[u8; 32]>()).into_bytes(),
    )
    .map_err(setup)?;
    Ok(String::from_utf8_lossy(&t).trim().to_string())
}

/// Prepares everything and returns the service (used by `run` and by tests).
pub async fn prepare(cfg: &DaemonConfig) -> Result<Arc<service::Service>, DaemonError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| setup(format!("creating {}: {e}", cfg.data_dir.display())))?;
    std::fs::set_permissions(
        &cfg.data_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(setup)?;
    let qv = hutch_vmm::check_qemu(&cfg.qemu)?;
    tracing::info!(version = %format!("{}.{}.{}", qv.0, qv.1, qv.2), "qemu");
    let (mut accel, mut why) = hutch_vmm::detect_accel(cfg.accel, Path::new("/"))?;
    if accel == hutch_vmm::Accel::Kvm && cfg.jail.is_some() {
        if let Err(e) = hutch_vmm::kvm_for_confined(Path::new("/")) {
            if cfg.accel == hutch_vmm::AccelChoice::Kvm {
                return Err(setup(format!("--accel kvm: {e}")));
            }
            (accel, why) = (hutch_vmm::Accel::Tcg, format!("{e}; using TCG"));
        }
    }
    tracing::info!(accel = accel.as_str(), reason = %why, "accelerator");
    let cache = cfg
        .boot_cache
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("boot"));
    let kernel = match &cfg.kernel {
        Some(k) => hutch_guest::Kernel::user(k, cfg.kernel_modules.as_deref())?,
        None => {
            let (c, p) = (cache.clone(), cfg.kernel_package.clone());
            tokio::task::spawn_blocking(move || hutch_guest::fetch_distro_kernel(&c, &p))
                .await
                .map_err(setup)??
        }
    };
    let agent = find_agent(cfg.agent.as_deref())?;
    let bundle = hutch_guest::ensure_bundle(&cache, &kernel, &agent)?;
    tracing::info!(kernel = %bundle.kernel.display(), initrd = %bundle.initrd.display(), "guest boot bundle");
    let (records, cluster) = open_records(cfg).await?;
    let mut images = hutch_image::ImageStore::open(&cfg.data_dir.join("images"))?;
    images.limits = cfg.layer_limits;
    let jail = match &cfg.jail {
        // SAFETY: geteuid has no preconditions.
        Some(_) if unsafe { libc::geteuid() } != 0 => {
            return Err(setup(
                "confining QEMU (own uid, chroot, cgroup) needs root; run hutchd as root or pass --jail off",
            ))
        }
        Some(j) => Some(j.config(&cfg.data_dir)),
        None => {
            tracing::warn!("--jail off: QEMU runs as hutchd's user, without chroot or cgroup");
            None
        }
    };
    let vmm: Arc<dyn Vmm> = Arc::new(hutch_vmm::Qemu::new(cfg.qemu.clone(), jail));
    let node_cfg = node::NodeConfig {
        data_dir: cfg.data_dir.clone(),
        bundle,
        accel,
        boot_timeout: cfg.boot_timeout,
        default_disk_gib: cfg.default_disk_gib,
        console_max_bytes: 2 << 20,
        jail_uids: cfg.jail.as_ref().map(|j| (j.uid_base, j.uid_count)),
        registry_allow_private: cfg.registry_allow_private,
        max_upload_bytes: cfg.max_upload_bytes,
        qemu_version: format!("{}.{}.{}", qv.0, qv.1, qv.2),
    };
    let tokens = auth::Tokens::load_or_create(&cfg.data_dir).map_err(setup)?;
    let mut node = node::Node::new(
        node_cfg,
        records,
        Arc::new(images),
        vmm,
        Arc::new(node::SocketConnector),
        Arc::default(),
    );
    if let Some(s) = cfg.net.clone() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(setup(
                "the VM network (bridge, TAPs, nftables) needs root; run hutchd as root or pass --network off",
            ));
        }
        let n = tokio::task::spawn_blocking(move || net::VmNetwork::setup(s))
            .await
            .map_err(setup)?
            .map_err(|e| setup(format!("setting up the VM network: {e}")))?;
        tracing::info!(bridge = %n.settings.cfg.bridge, subnet = %n.settings.cfg.subnet, gateway = %n.settings.cfg.gateway(), "VM network");
        node.net = Some(Arc::new(n));
    }
    let node = Arc::new(node);
    let m = Arc::new(service::Service::new(node, tokens, cfg.admission));
    if let Some(c) = cluster {
        let _ = m.cluster.set(c.clone());
        c.join(&m)
            .await
            .map_err(|e| setup(format!("registering node {} in the cluster: {e}", c.name())))?;
    }
    // Make the default writable-disk template now, not inside the first create.
    let (n2, gib) = (m.node.clone(), cfg.default_disk_gib);
    tokio::task::spawn_blocking(move || n2.disk_template(gib))
        .await
        .map_err(setup)?
        .map_err(|e| setup(format!("creating the disk template: {e}")))?;
    // The event feed and the restart reconciler start before re-attaching, so the VMs that
    // the re-attach finds dead are restarted by their policy.
    m.start_background();
    m.node
        .reattach()
        .await
        .map_err(|e| setup(format!("re-attaching VMs: {e}")))?;
    Ok(m)
}

/// The records on etcd for a cluster node (after taking the cluster's secrets), else on the
/// embedded store in the data dir.
async fn open_records(
    cfg: &DaemonConfig,
) -> Result<(records::Records, Option<Arc<cluster::Cluster>>), DaemonError> {
    if let Some(opts) = cfg.cluster.clone() {
        let endpoints = opts.etcd.endpoints.join(",");
        let c = cluster::Cluster::connect(opts)
            .await
            .map_err(|e| setup(format!("joining the cluster on etcd {endpoints}: {e}")))?;
        cluster::secrets::adopt(&c.store, &cfg.data_dir)
            .await
            .map_err(|e| setup(format!("the cluster's secrets: {e}")))?;
        let kv: Arc<dyn hutch_store::kv::Store> = Arc::new(c.store.clone());
        let records = records::Records::open(kv)
            .await
            .map_err(|e| setup(format!("the cluster's records on etcd {endpoints}: {e}")))?;
        records.set_local_node(c.name());
        tracing::info!(node = %c.name(), etcd = %endpoints, "cluster node");
        return Ok((records, Some(c)));
    }
    let state = cfg.data_dir.join("state.redb");
    let kv = hutch_store::kv::RedbStore::open(&state).map_err(|e| {
        setup(format!(
            "the state store {} cannot be opened: {e}. If another hutchd uses this data dir, stop \
             it. If the file is corrupt, move it aside (mv {0} {0}.broken), start hutchd again and \
             run `hutch admin recover`: VMs are rebuilt from their directories (nothing is stopped)",
            state.display()
        ))
    })?;
    let kv: Arc<dyn hutch_store::kv::Store> = Arc::new(kv);
    let records = records::Records::open(kv)
        .await
        .map_err(|e| setup(format!("the state store {}: {e}", state.display())))?;
    Ok((records, None))
}

/// The certificate (PEM) a TCP listener with `opts` serves (None: plain HTTP), for the other
/// nodes of a cluster to pin.
fn served_cert(
    data_dir: &Path,
    opts: &tcp::TcpOptions,
    tls: bool,
) -> Result<Option<String>, DaemonError> {
    if !tls {
        return Ok(None);
    }
    let path = opts
        .tls_cert
        .clone()
        .unwrap_or_else(|| tcp::self_made_cert(data_dir).0);
    std::fs::read_to_string(&path)
        .map(Some)
        .map_err(|e| setup(format!("reading {}: {e}", path.display())))
}

/// Runs the daemon until SIGINT/SIGTERM. VMs keep running when it exits.
pub async fn run(mut cfg: DaemonConfig) -> Result<(), DaemonError> {
    let m = prepare(&cfg).await?;
    let token = api_token(&cfg.data_dir)?;
    let sock = cfg.data_dir.join("hutchd.sock");
    let _ = std::fs::remove_file(&sock);
    let unix = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| setup(format!("binding {}: {e}", sock.display())))?;
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(setup)?;

    let bg = m.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            bg.node.trim_consoles().await;
        }
    });

    let mut proxies = Vec::new();
    let _dns = start_dns(&m, &cfg.front).await?;
    start_proxy(&m, &cfg, &token, &mut proxies).await?;
    // VM identity: the signing key, the metadata service for guests, the JWKS on the API.
    let identity = match &m.node.net {
        Some(net) => {
            let key = Arc::new(
                identity::IdentityKey::load_or_create(&cfg.data_dir.join("identity-key.p8"))
                    .map_err(|e| setup(format!("the identity key: {e}")))?,
            );
            let srv = net::meta::serve(
                net,
                m.records.clone(),
                key.clone(),
                cfg.identity_issuer.clone(),
            )
            .await
            .map_err(|e| setup(format!("the metadata service: {e}")))?;
            proxies.push(Box::pin(srv));
            proxies.push(Box::pin(net::egress::serve(net.clone(), m.records.clone())));
            Some(key)
        }
        None => None,
    };
    let jwks = || {
        identity
            .clone()
            .map(metadata::jwks_router)
            .unwrap_or_default()
    };
    let app = api::router(m.clone(), true).merge(jwks());
    let mut tasks = tokio::task::JoinSet::new();
    for p in proxies {
        tasks.spawn(p);
    }
    if let Some(topts) = cfg.tcp.clone() {
        let addr = topts.listen;
        let tls = tcp::tls_config(&cfg.data_dir, &topts)?;
        if let Some(c) = m.cluster.get() {
            let pem = served_cert(&cfg.data_dir, &topts, tls.is_some())?;
            c.set_tls_cert(pem)
                .await
                .map_err(|e| setup(format!("recording this node's certificate: {e}")))?;
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| setup(format!("binding {addr}: {e}")))?;
        let token = Arc::new(token.clone());
        let mt = m.clone();
        let authed = api::router(m.clone(), false).layer(axum::middleware::from_fn(
            move |mut req: axum::extract::Request, next: axum::middleware::Next| {
                let (token, mt) = (token.clone(), mt.clone());
                async move {
                    let bearer = req
                        .headers()
                        .get(axum::http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .map(str::to_string);
                    let caller = match bearer {
                        Some(t) if constant_eq(t.as_bytes(), token.as_bytes()) => {
                            req.extensions_mut().insert(auth::NodeToken);
                            match req.headers().get(auth::ACT_AS) {
                                None => Some(auth::Caller::local_admin()),
                                Some(a) => match a.to_str() {
                                    Ok(a) => mt.act_as(a).await,
                                    Err(_) => None,
                                },
                            }
                        }
                        Some(t) => mt.verify_token(&t).await,
                        None => None,
                    };
                    match caller {
                        Some(c) => {
                            req.extensions_mut().insert(c);
                            next.run(req).await
                        }
                        None => axum::response::IntoResponse::into_response(
                            error::ApiError::Unauthorized(
                                "missing, wrong, expired or revoked bearer token \
                             (DATA_DIR/api-token, or: ssh -p 2222 HOST token create)"
                                    .into(),
                            ),
                        ),
                    }
                }
            },
        ));
        // The JWKS is public: verifiers of VM identity tokens hold no hutch token.
        let authed = authed.merge(jwks());
        tracing::info!(%addr, tls = tls.is_some(), "listening on tcp (bearer token required)");
        tasks.spawn(tcp::serve(listener, authed, tls, topts));
    }
    if let Some(addr) = cfg.front.e2b_listen {
        tasks.spawn(serve_e2b(m.clone(), &cfg, &token, addr).await?);
    }
    if let Some(c) = m.cluster.get() {
        // Share what this node made of the cluster's secrets (the SSH host key is made here,
        // before the SSH task would).
        if cfg.ssh.is_some() {
            ssh::host_key(&cfg.data_dir.join("ssh_host_ed25519_key"))?;
        }
        cluster::secrets::publish(&c.store, &cfg.data_dir)
            .await
            .map_err(|e| setup(format!("the cluster's secrets: {e}")))?;
    }
    if let Some(opts) = cfg.ssh.take() {
        let m2 = m.clone();
        tasks.spawn(async move {
            ssh::serve(m2, opts)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
    }
    tracing::info!(socket = %sock.display(), "hutchd ready");
    println!("hutchd ready on {}", sock.display());
    tasks.spawn(async move {
        axum::serve(unix, app)
            .with_graceful_shutdown(shutdown())
            .await
    });
    // The HTTP servers end on SIGINT/SIGTERM; the first task to end (or fail) ends the daemon,
    // and the rest (the SSH accept loop never ends by itself) are stopped with it.
    let first = tasks.join_next().await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(Ok(Err(e))) = first {
        return Err(setup(format!("server: {e}")));
    }
    let _ = std::fs::remove_file(&sock);
    tracing::info!("hutchd stopped; VMs keep running");
    Ok(())
}

/// The E2B-compatible API on `addr`: TLS as for the REST API (plain only on loopback without
/// a certificate), HTTP/1.1 and HTTP/2.
async fn serve_e2b(
    m: Arc<service::Service>,
    cfg: &DaemonConfig,
    token: &str,
    addr: std::net::SocketAddr,
) -> Result<Serving, DaemonError> {
    let opts = tcp::TcpOptions {
        listen: addr,
        tls_cert: cfg.tcp.as_ref().and_then(|t| t.tls_cert.clone()),
        tls_key: cfg.tcp.as_ref().and_then(|t| t.tls_key.clone()),
        max_connections: cfg.tcp.as_ref().map_or(1024, |t| t.max_connections),
        header_timeout: cfg
            .tcp
            .as_ref()
            .map_or(Duration::from_secs(10), |t| t.header_timeout),
    };
    let tls = tcp::tls_config(&cfg.data_dir, &opts)?;
    if let Some(c) = m.cluster.get() {
        let pem = served_cert(&cfg.data_dir, &opts, tls.is_some())?;
        c.set_e2b(addr.port(), pem)
            .await
            .map_err(|e| setup(format!("recording this node's E2B address: {e}")))?;
    }
    let key = secrets::read_or_create(
        &cfg.data_dir.join("e2b-key"),
        |k| k.len() == 32,
        || rand::random::<[u8; 32]>().to_vec(),
    )
    .map_err(setup)?;
    let domain = m.front.get().map(|f| f.proxy.domain().to_string());
    let e = Arc::new(e2b::E2b::new(m.clone(), token.to_string(), key, domain));
    e.load_routes()
        .await
        .map_err(|x| setup(format!("loading E2B sandboxes: {x}")))?;
    let app = e2b::router(e.clone());
    let _ = m.e2b.set(e2b::Served {
        e2b: e,
        router: app.clone(),
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| setup(format!("binding the E2B API on {addr}: {e}")))?;
    tracing::info!(%addr, tls = tls.is_some(), "E2B-compatible API");
    Ok(Box::pin(tcp::serve(listener, app, tls, opts)))
}

type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;

/// The HTTP(S) proxy to VM ports, when asked for: its servers go into `out`.
async fn start_proxy(
    m: &Arc<service::Service>,
    cfg: &DaemonConfig,
    admin_token: &str,
    out: &mut Vec<Serving>,
) -> Result<(), DaemonError> {
    let f = &cfg.front;
    if f.http_listen.is_none() && f.https_listen.is_none() {
        return Ok(());
    }
    let Some(net) = m.node.net.clone() else {
        return Err(setup(
            "the proxy (--http-listen, --https-listen) needs the VM network (not --network off)",
        ));
    };
    let key = secrets::read_or_create(
        &cfg.data_dir.join("proxy-share-key"),
        |k| k.len() == 32,
        || rand::random::<[u8; 32]>().to_vec(),
    )
    .map_err(setup)?;
    let backends = Arc::new(net::proxy::Backends {
        service: Arc::downgrade(m),
        admin_token: admin_token.to_string(),
    });
    let proxy = Arc::new(hutch_proxy::Proxy::new(
        hutch_proxy::ProxyConfig {
            domain: net.settings.domain.clone(),
            share_key: key,
        },
        backends,
    ));
    let bind = |a: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(a)
            .await
            .map_err(|e| setup(format!("binding the proxy on {a}: {e}")))
    };
    let mut ca_dir = None;
    if let Some(a) = f.http_listen {
        let l = bind(a).await?;
        tracing::info!(addr = %a, "HTTP proxy to VM ports");
        out.push(Box::pin(proxy.clone().serve_http(l)));
    }
    if let Some(a) = f.https_listen {
        let src = match cfg
            .tcp
            .as_ref()
            .and_then(|t| Some((t.tls_cert.clone()?, t.tls_key.clone()?)))
        {
            Some((cert, key)) => hutch_proxy::TlsSource::Files { cert, key },
            None => {
                let d = cfg.data_dir.join("proxy-ca");
                ca_dir = Some(d.clone());
                hutch_proxy::TlsSource::GeneratedCa { dir: d }
            }
        };
        let tls = hutch_proxy::tls_config(&src, &net.settings.domain)
            .map_err(|e| setup(format!("the proxy's TLS: {e}")))?;
        let l = bind(a).await?;
        tracing::info!(addr = %a, "HTTPS proxy to VM ports");
        out.push(Box::pin(proxy.clone().serve_https(l, tls)));
    }
    let (scheme, port) = match (f.https_listen, f.http_listen) {
        (Some(a), _) => ("https", Some(a.port()).filter(|p| *p != 443)),
        (None, Some(a)) => ("http", Some(a.port()).filter(|p| *p != 80)),
        (None, None) => unreachable!("checked above"),
    };
    let _ = m.front.set(net::proxy::Front {
        proxy,
        scheme,
        port,
        ca_dir,
    });
    Ok(())
}

/// hutch's DNS: for guests on the VM network's gateway, and the public listener when asked.
/// Dropping the servers stops them.
async fn start_dns(
    m: &Arc<service::Service>,
    front: &FrontDoors,
) -> Result<Vec<hutch_dns::DnsServer>, DaemonError> {
    let mut servers = Vec::new();
    let Some(net) = m.node.net.clone() else {
        if front.dns_listen.is_some() {
            return Err(setup(
                "--dns-listen needs the VM network (not --network off)",
            ));
        }
        return Ok(servers);
    };
    let s = &net.settings;
    let dir = Arc::new(net::dns::Directory {
        records: m.records.clone(),
        net: net.clone(),
        service: Arc::downgrade(m),
    });
    let listen = std::net::SocketAddr::new(s.cfg.gateway().into(), s.cfg.dns_port);
    let guest = hutch_dns::GuestDns {
        domain: s.domain.clone(),
        listen,
        upstream: s.upstream.clone(),
    };
    servers.push(
        hutch_dns::serve_guest(guest, dir.clone())
            .await
            .map_err(|e| setup(format!("guest DNS on {listen}: {e}")))?,
    );
    tracing::info!(%listen, domain = %s.domain, upstream = ?s.upstream, "DNS for guests");
    if let Some(listen) = front.dns_listen {
        let address = match (front.public_address, listen.ip()) {
            (Some(a), _) => a,
            (None, std::net::IpAddr::V4(a)) if !a.is_unspecified() => a,
            _ => {
                return Err(setup(
                    "--dns-listen on a wildcard address needs --public-address (the address names resolve to)",
                ))
            }
        };
        let public = hutch_dns::PublicDns {
            domain: s.domain.clone(),
            listen,
            address,
        };
        servers.push(
            hutch_dns::serve_public(public, dir)
                .await
                .map_err(|e| setup(format!("public DNS on {listen}: {e}")))?,
        );
        tracing::info!(%listen, %address, "public DNS");
    }
    Ok(servers)
}

pub(crate) fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
