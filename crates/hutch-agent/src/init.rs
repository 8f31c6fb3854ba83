//! The init half of the agent: from the initramfs to the image's root filesystem.

use crate::restore::GuestState;
use crate::sys;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the rest of the agent needs to know after init.
pub struct Config {
    /// The hostname and network boot gave the guest (a restore may change them).
    pub guest: Arc<Mutex<GuestState>>,
    /// The writable disk's mount root (outside the switched root, so kept open from before).
    pub data: Option<std::fs::File>,
    /// The virtio-serial port device to serve on.
    pub port: PathBuf,
}

const NEWROOT: &str = "/hutch/root";
const LOWER: &str = "/hutch/lower";
const DATA: &str = "/hutch/data";

fn err(msg: String) -> io::Error {
    io::Error::other(msg)
}

pub fn init() -> io::Result<Config> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount("proc", Path::new("/proc"), "proc", nodev, None)?;
    sys::mount("sysfs", Path::new("/sys"), "sysfs", nodev, None)?;
    sys::mount(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        libc::MS_NOSUID,
        None,
    )?;

    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    let param = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let hostname = param("hutch.hostname").unwrap_or_else(|| "hutch".into());
    let net = crate::net::GuestNet::from_params(param);

    let t0 = Instant::now();
    if let Ok(list) = std::fs::read_to_string("/hutch/modules.load") {
        for m in list.lines().filter(|l| !l.trim().is_empty()) {
            sys::load_module(Path::new(m)).map_err(|e| err(format!("loading module {m}: {e}")))?;
        }
    }
    let image = wait_for_disk("hutch-image")?;
    let data = wait_for_disk("hutch-data")?;
    let fstype = param("hutch.imagefs").unwrap_or_else(|| "erofs".into());
    sys::mount(&image, Path::new(LOWER), &fstype, libc::MS_RDONLY, None)?;
    sys::mount(&data, Path::new(DATA), "ext4", 0, None)?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(Path::new(DATA).join(d))?;
    }
    // Plain copy-up semantics (no redirects or metacopy), so the upper dir is exactly an OCI
    // changeset: see export.rs.
    let opts = format!(
        "lowerdir={LOWER},upperdir={DATA}/upper,workdir={DATA}/work,redirect_dir=off,metacopy=off,index=off"
    );
    sys::mount("overlay", Path::new(NEWROOT), "overlay", 0, Some(&opts))?;

    let root = Path::new(NEWROOT);
    sys::mount("proc", &root.join("proc"), "proc", nodev, None)?;
    sys::mount("sysfs", &root.join("sys"), "sysfs", nodev, None)?;
    sys::mount(
        "devtmpfs",
        &root.join("dev"),
        "devtmpfs",
        libc::MS_NOSUID,
        None,
    )?;
    let pts_flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    sys::mount(
        "devpts",
        &root.join("dev/pts"),
        "devpts",
        pts_flags,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    sys::mount(
        "tmpfs",
        &root.join("dev/shm"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;

    let data_fd = std::fs::File::open(DATA)?;
    // Switch root: make the overlay "/" and forget the initramfs paths.
    std::env::set_current_dir(root)?;
    sys::move_mount(root, Path::new("/"))?;
    sys::chroot(Path::new("."))?;
    std::env::set_current_dir("/")?;
    sys::sethostname(&hostname)?;
    // SAFETY: setsid/umask have no memory-safety preconditions.
    unsafe {
        libc::umask(0o022);
    }
    // /tmp and /run (/dev/shm is mounted above), inside the guest's root.
    crate::scratch::setup()?;
    // A network that cannot be set up leaves the VM reachable over the agent port: say why on
    // the console and go on.
    if let Err(e) = crate::net::configure(net.as_ref(), &hostname) {
        eprintln!("hutch-agent: network: {e}");
    }

    let port = find_port(hutch_proto::PORT_NAME)?;
    eprintln!(
        "hutch-agent: root ready in {} ms (image {image}, data {data}), serving on {}",
        t0.elapsed().as_millis(),
        port.display()
    );
    Ok(Config {
        guest: Arc::new(Mutex::new(GuestState { hostname, net })),
        data: Some(data_fd),
        port,
    })
}

/// Calls `f` every 10 ms until it finds something or 20 s pass.
fn poll<T>(what: String, mut f: impl FnMut() -> Option<T>) -> io::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(err(what));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Entries of a sysfs directory with the contents of one attribute file each.
fn sysfs_attr(dir: &str, attr: &str) -> Vec<(String, String)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let v = std::fs::read_to_string(e.path().join(attr)).unwrap_or_default();
            (
                e.file_name().to_string_lossy().to_string(),
                v.trim().to_string(),
            )
        })
        .collect()
}

/// Finds the /dev/vdX whose virtio serial is `serial`, waiting for the driver to probe it.
fn wait_for_disk(serial: &str) -> io::Result<String> {
    poll(
        format!("no virtio disk with serial {serial} appeared"),
        || {
            sysfs_attr("/sys/block", "serial")
                .into_iter()
                .find(|(name, s)| s == serial && Path::new("/dev").join(name).exists())
                .map(|(name, _)| format!("/dev/{name}"))
        },
    )
}

/// Finds the device node of the virtio-serial port named `name`.
fn find_port(name: &str) -> io::Result<PathBuf> {
    poll(format!("virtio-serial port {name} did not appear"), || {
        sysfs_attr("/sys/class/virtio-ports", "name")
            .into_iter()
            .map(|(dev, n)| (Path::new("/dev").join(dev), n))
            .find(|(dev, n)| n == name && dev.exists())
            .map(|(dev, _)| dev)
    })
}
