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
    /// Also serve the REST API on this TCP address (bearer token in DATA_DIR/api-token).
    #[arg(long, env = "HUTCH_LISTEN")]
    listen: Option<std::net::SocketAddr>,
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
    #[arg(long, default_value_t = 30)]
    ssh_auth_timeout: u64,
    /// Most entries all layers of one image may hold (against layer bombs).
    #[arg(long, default_value_t = 1_000_000)]
    max_image_entries: u64,
    /// Most bytes of file data all layers of one image may unpack to, in MiB.
    #[arg(long, default_value_t = 32 * 1024)]
    max_image_mib: u64,
    /// Largest upload (a file written into a VM, an image archive), in MiB; 413 beyond.
    #[arg(long, env = "HUTCH_MAX_UPLOAD_MIB", default_value_t = 8 * 1024)]
    max_upload_mib: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUTCH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let ssh = match args.ssh_listen.as_str() {
        "off" => None,
        addr => Some(hutch_daemon::ssh::SshOptions {
            listen: addr
                .parse()
                .with_context(|| format!("--ssh-listen {addr:?}"))?,
            admin_keys: args.admin_keys,
            max_auth_failures: args.ssh_max_auth_failures,
            auth_timeout_secs: args.ssh_auth_timeout,
            host_name: args.ssh_host_name.unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into())
            }),
        }),
    };
    let cfg = hutch_daemon::DaemonConfig {
        ssh,
        data_dir: args.data_dir,
        boot_cache: args.boot_cache,
        kernel: args.kernel,
        kernel_modules: args.kernel_modules,
        kernel_package: args.kernel_package,
        agent: args.agent,
        accel: args.accel,
        tcp_listen: args.listen,
        qemu: args.qemu,
        default_disk_gib: args.disk_gib,
        boot_timeout: std::time::Duration::from_secs(args.boot_timeout),
        layer_limits: hutch_image::Limits {
            max_entries: args.max_image_entries,
            max_bytes: args.max_image_mib << 20,
        },
        max_upload_bytes: args.max_upload_mib.saturating_mul(1 << 20),
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(hutch_daemon::run(cfg))
        .context("hutchd failed")?;
    Ok(())
}
