//! hutchd: the hutch daemon. See `hutchd --help`.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hutchd",
    version,
    about = "hutch daemon: OCI images as KVM/QEMU virtual machines"
)]
struct Args {
    /// State, images, VM disks and sockets live here.
    #[arg(long, env = "HUTCH_DATA_DIR", default_value = "/var/lib/hutch")]
    data_dir: PathBuf,
    /// Also serve the REST API on this TCP address (bearer token in DATA_DIR/api-token). TLS
    /// unless the address is loopback and no certificate is given.
    #[arg(long, env = "HUTCH_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain for the TCP API (default: hutchd makes one, DATA_DIR/tls/cert.pem,
    /// when --listen is not a loopback address).
    #[arg(long, env = "HUTCH_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (mode 0600).
    #[arg(long, env = "HUTCH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Open TCP API connections at most; more are refused.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a TCP client has for the TLS handshake and for each request's headers.
    #[arg(long, default_value_t = 10)]
    http_header_timeout: u64,
    /// Guest kernel to boot instead of the distribution's cloud kernel.
    #[arg(long, env = "HUTCH_KERNEL")]
    kernel: Option<PathBuf>,
    /// The /lib/modules/RELEASE directory of --kernel (needed when virtio drivers are modules).
    #[arg(long, env = "HUTCH_KERNEL_MODULES", requires = "kernel")]
    kernel_modules: Option<PathBuf>,
    /// Distribution package the guest kernel is fetched from.
    #[arg(long, default_value = "linux-image-cloud-amd64")]
    kernel_package: String,
    /// Where the kernel and initramfs are cached (default DATA_DIR/boot).
    #[arg(long, env = "HUTCH_BOOT_CACHE")]
    boot_cache: Option<PathBuf>,
    /// The static guest agent binary (default: beside hutchd, or the workspace build).
    #[arg(long, env = "HUTCH_AGENT")]
    agent: Option<PathBuf>,
    /// Accelerator: auto (KVM when it can run a stock kernel, else TCG), kvm or tcg.
    #[arg(long, env = "HUTCH_ACCEL", default_value = "auto")]
    accel: hutch_vmm::AccelChoice,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Default size of a VM's writable disk, GiB (sparse).
    #[arg(long, default_value_t = 10)]
    disk_gib: u64,
    /// Seconds to wait for a booting guest's agent.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// The SSH front door's address, or `off`.
    #[arg(long, env = "HUTCH_SSH_LISTEN", default_value = "0.0.0.0:2222")]
    ssh_listen: String,
    /// OpenSSH public keys (one per line) of the admin account.
    #[arg(long, env = "HUTCH_ADMIN_KEYS")]
    admin_keys: Option<PathBuf>,
    /// Host name shown in "Connect: ssh ..." lines (default: this machine's hostname).
    #[arg(long)]
    ssh_host_name: Option<String>,
    /// Refused SSH key offers from one address (per 5 minutes) before it is locked out.
    #[arg(long, default_value_t = 30)]
    ssh_max_auth_failures: u32,
    /// Seconds an SSH connection has to authenticate.
    #[arg(long, default_value_t = 10)]
    ssh_auth_timeout: u64,
    /// SSH logins in progress from one address (idle sockets from one address cannot lock
    /// others out).
    #[arg(long, default_value_t = 8)]
    ssh_max_pending_per_address: usize,
    /// SSH keys no account has: closed (refused), open (an account at first login) or invite
    /// (an admin's one-time code: `ssh HOST invite`, then `ssh HOST signup CODE`).
    #[arg(long, env = "HUTCH_SIGNUP", default_value = "closed")]
    signup: hutch_daemon::ssh::Signup,
    /// Most entries all layers of one image may hold (against layer bombs).
    #[arg(long, default_value_t = 1_000_000)]
    max_image_entries: u64,
    /// Most bytes all layers of one image may decompress to, in MiB.
    #[arg(long, default_value_t = 32 * 1024)]
    max_image_mib: u64,
    /// Abort at the named crash point (crash-safety tests; see crates/hutch-daemon/src/crash.rs).
    #[arg(long, hide = true)]
    crash_at: Option<String>,
    /// Guest memory of running VMs may add up to this many times the host's RAM.
    #[arg(long, default_value_t = 1.0)]
    mem_overcommit: f64,
    /// Writable disks are sparse: a create needs its disk size divided by this free...
    #[arg(long, default_value_t = 4.0)]
    disk_overcommit: f64,
    /// ...plus this many MiB always left free for the host.
    #[arg(long, default_value_t = 1024)]
    disk_reserve_mib: u64,
    /// Default quota of an account: VMs (running or stopped).
    #[arg(long, default_value_t = 20)]
    quota_vms: u32,
    /// Default quota of an account: vCPUs over all its VMs.
    #[arg(long, default_value_t = 16)]
    quota_vcpus: u32,
    /// Default quota of an account: MiB of guest memory over all its VMs.
    #[arg(long, default_value_t = 32 * 1024)]
    quota_mem_mib: u64,
    /// Default quota of an account: GiB of writable disk over all its VMs.
    #[arg(long, default_value_t = 500)]
    quota_disk_gib: u64,
    /// Confine every QEMU: own uid, seccomp, chroot, cgroup (`off` only for a non-root hutchd).
    #[arg(long, env = "HUTCH_JAIL", default_value = "on", value_parser = ["on", "off"])]
    jail: String,
    /// First uid (and gid) of the range each VM's QEMU gets its own uid from.
    #[arg(long, default_value_t = 900_000)]
    jail_uid_base: u32,
    /// Size of that uid range (the most VMs one host can run confined).
    #[arg(long, default_value_t = 65_536)]
    jail_uid_count: u32,
    /// Where the cgroup hierarchies are mounted (v2 unified, or v1 per controller).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// VM cgroups are made under PARENT/NODE/VM-ID (NODE: a hash of the data dir).
    #[arg(long, default_value = "hutch")]
    cgroup_parent: String,
    /// Memory a VM's cgroup allows beyond its guest RAM, MiB (QEMU's own use).
    #[arg(long, default_value_t = hutch_vmm::jail::DEFAULT_MEM_OVERHEAD_MIB)]
    vm_mem_overhead_mib: u64,
    /// Let accounts other than the admin pull from loopback, link-local and private addresses
    /// (the admin always may).
    #[arg(long)]
    registry_allow_private: bool,
    /// Largest upload (a file written into a VM, an image archive), in MiB; 413 beyond.
    #[arg(long, env = "HUTCH_MAX_UPLOAD_MIB", default_value_t = 8 * 1024)]
    max_upload_mib: u64,
    /// `iss` of the identity tokens VMs get from 169.254.169.254 (e.g. your API's URL).
    #[arg(long, env = "HUTCH_IDENTITY_ISSUER", default_value = "hutch")]
    identity_issuer: String,
    /// The VM network: on (a bridge, a TAP per VM, NAT, DNS, metadata) or off (VMs get no NIC).
    #[arg(long, env = "HUTCH_NETWORK", default_value = "on", value_parser = ["on", "off"])]
    network: String,
    /// The VMs' subnet (the host takes its first address).
    #[arg(long, env = "HUTCH_SUBNET", default_value = hutch_daemon::net::DEFAULT_SUBNET)]
    subnet: String,
    /// MTU of the VM network (bridge, TAPs, guest NICs), 576-9000.
    #[arg(long, env = "HUTCH_MTU", default_value_t = 1500)]
    mtu: u32,
    /// The bridge hutch owns (also the name of its nftables tables).
    #[arg(long, env = "HUTCH_BRIDGE", default_value = hutch_daemon::net::DEFAULT_BRIDGE)]
    bridge: String,
    /// VMs are NAME.DOMAIN (to guests, on the public DNS and in the HTTPS proxy).
    #[arg(long, env = "HUTCH_DOMAIN", default_value = "hutch.internal")]
    domain: String,
    /// Resolver for names outside the domain (repeatable; default: the host's resolv.conf).
    #[arg(long = "upstream-dns")]
    upstream_dns: Vec<String>,
    /// Host ports accounts may forward to their VMs (the admin may use any).
    #[arg(long, default_value = "20000-29999")]
    port_range: String,
    /// Address port forwards listen on.
    #[arg(long, default_value = "0.0.0.0")]
    port_bind: std::net::IpAddr,
    /// Addresses routed to this host, one per VM within an account: `ssh <vm>.<domain>` (with
    /// --dns-listen) lands in the VM (hutchd adds a `local` route for them).
    #[arg(long, env = "HUTCH_SSH_POOL")]
    ssh_pool: Option<String>,
    /// Public DNS for the domain (e.g. 0.0.0.0:53), answering NAME.DOMAIN with --public-address.
    #[arg(long, env = "HUTCH_DNS_LISTEN")]
    dns_listen: Option<std::net::SocketAddr>,
    /// The host's public address, for the public DNS (default: --dns-listen's address).
    #[arg(long)]
    public_address: Option<std::net::Ipv4Addr>,
    /// HTTP proxy to VM ports: http://PORT-VM.DOMAIN/.
    #[arg(long, env = "HUTCH_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// HTTPS proxy to VM ports: https://PORT-VM.DOMAIN/ (certificate: --tls-cert/--tls-key, or
    /// a CA hutchd makes; `hutch ca` prints it).
    #[arg(long, env = "HUTCH_HTTPS_LISTEN")]
    https_listen: Option<std::net::SocketAddr>,
    /// E2B-compatible API (control plane and envd) on this address: point E2B's SDKs at it
    /// with E2B_API_URL and E2B_SANDBOX_URL (docs/e2b.md). TLS as for --listen.
    #[arg(long, env = "HUTCH_E2B_LISTEN")]
    e2b_listen: Option<std::net::SocketAddr>,
    /// Run as a node of a cluster whose state is in etcd (URL[,URL...]; docs/cluster.md). The
    /// first node initializes the cluster, later ones join it. Without it: a single node on the
    /// embedded store.
    #[arg(long, env = "HUTCH_ETCD")]
    etcd: Option<String>,
    /// This node's name in the cluster (default: the host name).
    #[arg(long, env = "HUTCH_NODE_NAME")]
    node_name: Option<String>,
    /// HOST:PORT where the other nodes reach this node's API (its --listen).
    #[arg(long, env = "HUTCH_ADVERTISE")]
    advertise: Option<String>,
    /// This node's roles: any of control,node,proxy,dns (default: all).
    #[arg(long, default_value = "control,node,proxy,dns")]
    roles: String,
    /// How the scheduler places new VMs: spread (the node with the most free memory) or
    /// binpack (the fullest node that fits).
    #[arg(long, default_value = "spread")]
    placement: String,
    /// Seconds without a heartbeat after which a node is down.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// Key prefix of hutch's records in etcd.
    #[arg(long, default_value = "hutch/")]
    etcd_namespace: String,
    /// CA certificate (PEM) that signed the etcd members' certificates (https:// endpoints).
    #[arg(long)]
    etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) for etcd members that check them.
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<std::path::PathBuf>,
    /// etcd user (etcd's auth); the password comes from --etcd-password-file or
    /// HUTCH_ETCD_PASSWORD.
    #[arg(long)]
    etcd_user: Option<String>,
    #[arg(long)]
    etcd_password_file: Option<std::path::PathBuf>,
    /// Auto-scaling: run this (sh -c) when the cluster's guest memory in use passes
    /// --scale-up-at percent of what the ready nodes admit (e.g. to start another node).
    #[arg(long)]
    scale_up_cmd: Option<String>,
    /// Run this (sh -c, HUTCH_NODE set) to remove an idle node once use falls below
    /// --scale-down-at percent; the node is cordoned first and forgotten once its lease is gone.
    #[arg(long)]
    scale_down_cmd: Option<String>,
    #[arg(long, default_value_t = 80.0)]
    scale_up_at: f64,
    #[arg(long, default_value_t = 20.0)]
    scale_down_at: f64,
    /// Seconds between scaling decisions.
    #[arg(long, default_value_t = 300)]
    scale_cooldown: u64,
}

/// `--etcd` and its companions, checked.
fn cluster_options(args: &Args) -> anyhow::Result<Option<hutch_daemon::cluster::ClusterOptions>> {
    let Some(etcd) = &args.etcd else {
        anyhow::ensure!(
            args.node_name.is_none() && args.advertise.is_none(),
            "--node-name and --advertise are for cluster nodes: add --etcd URL"
        );
        return Ok(None);
    };
    let endpoints = hutch_store_etcd::EtcdOptions::parse_endpoints(etcd)
        .map_err(|e| anyhow::anyhow!("--etcd: {e}"))?;
    let mut etcd = hutch_store_etcd::EtcdOptions::new(endpoints);
    anyhow::ensure!(
        !args.etcd_namespace.is_empty() && args.etcd_namespace.ends_with('/'),
        "--etcd-namespace must end with /"
    );
    etcd.namespace = args.etcd_namespace.clone();
    etcd.ca = args.etcd_ca.clone();
    etcd.identity = args.etcd_cert.clone().zip(args.etcd_key.clone());
    if let Some(user) = &args.etcd_user {
        let password = match &args.etcd_password_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("--etcd-password-file {}", f.display()))?
                .trim_end_matches('\n')
                .to_string(),
            None => std::env::var("HUTCH_ETCD_PASSWORD")
                .context("--etcd-user needs --etcd-password-file or HUTCH_ETCD_PASSWORD")?,
        };
        etcd.user = Some((user.clone(), password));
    }
    anyhow::ensure!(
        (2..=300).contains(&args.lease_ttl),
        "--lease-ttl must be between 2 and 300 seconds"
    );
    if let Some(a) = &args.advertise {
        anyhow::ensure!(
            a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
            "--advertise {a:?}: HOST:PORT"
        );
    }
    let roles = hutch_daemon::cluster::Roles::parse(&args.roles)
        .map_err(|e| anyhow::anyhow!("--roles: {e}"))?;
    anyhow::ensure!(
        roles.dns || args.dns_listen.is_none(),
        "--dns-listen serves DNS: add the dns role to --roles"
    );
    anyhow::ensure!(
        roles.proxy || (args.http_listen.is_none() && args.https_listen.is_none()),
        "--http-listen/--https-listen serve the proxy: add the proxy role to --roles"
    );
    Ok(Some(hutch_daemon::cluster::ClusterOptions {
        etcd,
        node_name: args
            .node_name
            .clone()
            .unwrap_or_else(hutch_daemon::cluster::nodes::local_host_name),
        advertise: args.advertise.clone(),
        roles,
        lease_ttl: std::time::Duration::from_secs(args.lease_ttl),
        placement: args
            .placement
            .parse()
            .map_err(|e| anyhow::anyhow!("--placement {e}"))?,
        scale: scale_options(args)?,
    }))
}

/// `--scale-*`, checked; None when neither command is given.
fn scale_options(
    args: &Args,
) -> anyhow::Result<Option<hutch_daemon::cluster::scale::ScaleOptions>> {
    if args.scale_up_cmd.is_none() && args.scale_down_cmd.is_none() {
        return Ok(None);
    }
    for (flag, v) in [
        ("--scale-up-at", args.scale_up_at),
        ("--scale-down-at", args.scale_down_at),
    ] {
        anyhow::ensure!(
            v.is_finite() && (0.0..=100.0).contains(&v),
            "{flag} is a percentage, not {v}"
        );
    }
    anyhow::ensure!(
        args.scale_down_at < args.scale_up_at,
        "--scale-down-at must be below --scale-up-at"
    );
    Ok(Some(hutch_daemon::cluster::scale::ScaleOptions {
        up_cmd: args.scale_up_cmd.clone(),
        down_cmd: args.scale_down_cmd.clone(),
        up_at: args.scale_up_at,
        down_at: args.scale_down_at,
        cooldown: std::time::Duration::from_secs(args.scale_cooldown.max(1)),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUTCH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file or journal gets plain `key=value` fields.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(p) = &args.crash_at {
        hutch_daemon::crash::arm(p);
    }
    let cluster = cluster_options(&args)?;
    let net = match args.network.as_str() {
        "off" => None,
        _ => Some(net_settings(&args)?),
    };
    let ssh = match args.ssh_listen.as_str() {
        "off" => None,
        addr => Some(hutch_daemon::ssh::SshOptions {
            listen: addr
                .parse()
                .with_context(|| format!("--ssh-listen {addr:?}"))?,
            admin_keys: args.admin_keys,
            max_auth_failures: args.ssh_max_auth_failures,
            auth_timeout_secs: args.ssh_auth_timeout,
            max_pending_per_address: args.ssh_max_pending_per_address,
            signup: args.signup,
            host_name: args.ssh_host_name.unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into())
            }),
        }),
    };
    for (flag, v) in [
        ("--mem-overcommit", args.mem_overcommit),
        ("--disk-overcommit", args.disk_overcommit),
    ] {
        anyhow::ensure!(
            v.is_finite() && v > 0.0,
            "{flag} must be a positive number, not {v}"
        );
    }
    let mut cfg = hutch_daemon::DaemonConfig {
        cluster,
        ssh,
        data_dir: args.data_dir,
        boot_cache: args.boot_cache,
        kernel: args.kernel,
        kernel_modules: args.kernel_modules,
        kernel_package: args.kernel_package,
        agent: args.agent,
        accel: args.accel,
        tcp: args.listen.map(|listen| hutch_daemon::tcp::TcpOptions {
            listen,
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            max_connections: args.max_connections.max(1),
            header_timeout: std::time::Duration::from_secs(args.http_header_timeout.max(1)),
        }),
        qemu: args.qemu,
        default_disk_gib: args.disk_gib,
        boot_timeout: std::time::Duration::from_secs(args.boot_timeout),
        admission: hutch_daemon::service::Admission {
            mem_overcommit: args.mem_overcommit,
            disk_overcommit: args.disk_overcommit,
            disk_reserve_mib: args.disk_reserve_mib,
            default_quota: hutch_core::Quota {
                vms: args.quota_vms,
                vcpus: args.quota_vcpus,
                mem_mib: args.quota_mem_mib,
                disk_gib: args.quota_disk_gib,
            },
        },
        layer_limits: hutch_image::Limits {
            max_entries: args.max_image_entries,
            max_bytes: args.max_image_mib << 20,
            ..Default::default()
        },
        jail: (args.jail == "on").then_some(hutch_daemon::node::JailOptions {
            uid_base: args.jail_uid_base,
            uid_count: args.jail_uid_count,
            cgroup_root: args.cgroup_root,
            cgroup_parent: args.cgroup_parent,
            mem_overhead_mib: args.vm_mem_overhead_mib,
        }),
        registry_allow_private: args.registry_allow_private,
        max_upload_bytes: args.max_upload_mib.saturating_mul(1 << 20),
        net: None,
        front: Default::default(),
        identity_issuer: args.identity_issuer.clone(),
    };
    cfg.net = net;
    cfg.front = hutch_daemon::FrontDoors {
        dns_listen: args.dns_listen,
        public_address: args.public_address,
        http_listen: args.http_listen,
        https_listen: args.https_listen,
        e2b_listen: args.e2b_listen,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(hutch_daemon::run(cfg))
        .context("hutchd failed")?;
    Ok(())
}

/// hutchd's network options, checked.
fn net_settings(args: &Args) -> anyhow::Result<hutch_daemon::net::NetSettings> {
    let (bridge, subnet, domain) = (&args.bridge, &args.subnet, &args.domain);
    let (upstream, port_range, port_bind) = (&args.upstream_dns, &args.port_range, args.port_bind);
    let (ssh_pool, mtu) = (args.ssh_pool.as_deref(), args.mtu);
    anyhow::ensure!(
        (576..=9000).contains(&mtu),
        "--mtu {mtu}: between 576 and 9000"
    );
    let ssh_pool = ssh_pool
        .map(|p| p.parse().map_err(|e| anyhow::anyhow!("--ssh-pool: {e}")))
        .transpose()?;
    let subnet = subnet
        .parse()
        .map_err(|e| anyhow::anyhow!("--subnet: {e}"))?;
    let mut cfg = hutch_daemon::net::NetConfig::new(bridge, subnet)?;
    cfg.mtu = mtu;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    anyhow::ensure!(
        !domain.is_empty()
            && domain.len() <= 200
            && domain.split('.').all(|l| !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
        "--domain {domain:?} is not a domain name"
    );
    let upstream = if upstream.is_empty() {
        hutch_daemon::net::host_upstreams()
    } else {
        upstream
            .iter()
            .map(|u| {
                u.parse::<std::net::SocketAddr>()
                    .or_else(|_| u.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                    .with_context(|| format!("--upstream-dns {u:?}: an address or address:port"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let (lo, hi) = port_range
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
        .filter(|(a, b)| *a > 0 && a <= b)
        .with_context(|| format!("--port-range {port_range:?}: LOW-HIGH, like 20000-29999"))?;
    Ok(hutch_daemon::net::NetSettings {
        cfg,
        domain,
        upstream,
        port_range: (lo, hi),
        port_bind,
        ssh_pool,
    })
}
