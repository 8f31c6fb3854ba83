//! `make bench`: hutch's figures, each beside a baseline run in the same process on the same
//! machine, because these machines are noisy.
//!
//! 1. create-to-exec-ready through hutchd vs. a bare `qemu-system-x86_64` boot of the same
//!    kernel, initramfs and disks to the agent's handshake (ratio; goal < 1.15).
//! 2. exec round trip of `true` through the REST API: p50/p99 over 200 runs.
//! 3. per-VM writable-layer creation for a small and a large image (goal: equal within noise).

mod benchlib;

use benchlib::{api, median, ws};
use hutch_proto::{Decoder, Frame, Hello, Kind};
use hutch_vmm::{Accel, VmSpec, Vmm};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const EXECS: usize = 200;
const LARGE_MB: u64 = 300;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Boots the bundle with QEMU directly (no hutchd) and waits for the agent's handshake.
fn bare_boot(
    kernel: &Path,
    initrd: &Path,
    rootfs: &Path,
    template: &Path,
    dir: &Path,
    accel: Accel,
) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(template)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    let spec = VmSpec {
        id: format!("bare{}", std::process::id()),
        hostname: "bare".into(),
        vcpus: 1,
        mem_mib: 256,
        kernel: kernel.into(),
        initrd: initrd.into(),
        image_disk: rootfs.into(),
        data_disk: disk,
        runtime_dir: dir.join("run"),
        console_log: dir.join("console.log"),
        accel,
        jail_uid: None,
        nic: None,
        cmdline_extra: String::new(),
        memory: None,
        backing: vec![hutch_vmm::Layer {
            path: template.into(),
            format: hutch_vmm::DiskFormat::Raw,
        }],
        incoming: None,
        migration_in: false,
        hold: false,
    };
    let q = hutch_vmm::Qemu::default();
    let t = Instant::now();
    let p = q.launch(&spec).unwrap();
    let mut s = loop {
        match UnixStream::connect(spec.agent_socket()) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let hello = Frame::json(
        Kind::Hello,
        0,
        &Hello {
            nonce: 7,
            version: hutch_proto::VERSION,
        },
    );
    s.write_all(&hello.encode().unwrap()).unwrap();
    let mut dec = Decoder::new();
    let mut buf = [0u8; 4096];
    'outer: loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "bare VM closed the agent socket");
        dec.push(&buf[..n]);
        while let Some(f) = dec.next_frame() {
            if f.kind == Kind::Hello {
                break 'outer;
            }
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    q.kill(&p.handle).unwrap();
    while q.is_alive(&p.handle) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_dir_all(dir).unwrap();
    ms
}

fn newest(dir: &Path, prefix: &str) -> PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| (e.metadata().unwrap().modified().unwrap(), e.path()))
        .collect();
    v.sort();
    v.pop().expect("file not found").1
}

fn main() {
    let ws = ws();
    let work = tempfile::Builder::new()
        .prefix("hutch-bench")
        .tempdir_in("/tmp")
        .unwrap();
    let cache = ws.join("target/hutch-bench-boot");
    for (name, mb) in [("small", 0u64), ("large", LARGE_MB)] {
        let d = work.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let st = Command::new(ws.join("scripts/make-test-image.sh"))
            .arg(&d)
            .arg(mb.to_string())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "building the {name} image");
    }
    let data = work.path().join("d");
    let log = std::fs::File::create(work.path().join("hutchd.log")).unwrap();
    let hutchd = Command::new(ws.join("target/release/hutchd"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--boot-cache")
        .arg(&cache)
        // No VM network: these figures compare against bare QEMU / tools without one.
        .args(["--network", "off"])
        .env("HUTCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("target/release/hutchd (run `make build`)");
    let _guard = Cleanup {
        hutchd,
        data: data.clone(),
    };
    let sock = data.join("hutchd.sock");
    let deadline = Instant::now() + Duration::from_secs(300);
    let health = loop {
        if let Ok(mut s) = UnixStream::connect(&sock) {
            drop(s.write_all(b""));
            let (st, v) = api(&sock, "GET", "/api/v1/health", None);
            if st == 200 {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "hutchd did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    let accel = if health["accel"] == "kvm" {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let mut digests = Vec::new();
    for name in ["small", "large"] {
        let p = work.path().join(name).join("oci");
        let (st, v) = api(
            &sock,
            "POST",
            "/api/v1/images",
            Some(json!({"path": p, "name": name})),
        );
        assert_eq!(st, 201, "{v}");
        digests.push(
            v["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string(),
        );
    }
    let kernel = newest(&newest(&cache.join("kernel"), "").join("boot"), "vmlinuz");
    let initrd = newest(&cache, "initramfs-");
    let template = newest(&data.join("templates"), "data-");
    let rootfs = data
        .join("images/rootfs")
        .join(format!("{}.erofs", digests[0]));

    println!(
        "hutch benchmark ({} accelerator, {} host CPUs)",
        accel.as_str(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!();
    // 1 + 3: creates (small and large image) interleaved with bare boots.
    let (mut hutch_ms, mut bare_ms) = (Vec::new(), Vec::new());
    let mut disk_us: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..ROUNDS {
        for (k, img) in ["small", "large"].iter().enumerate() {
            let name = format!("b{i}{k}");
            let t = Instant::now();
            let (st, v) = api(
                &sock,
                "POST",
                "/api/v1/sandboxes",
                Some(json!({"image": img, "name": name})),
            );
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(st, 201, "{v}");
            if k == 0 {
                hutch_ms.push(ms);
            }
            disk_us[k].push(v["disk_us"].as_f64().unwrap_or(0.0));
            if i == 0 && k == 0 {
                continue; // keep this VM for the exec benchmark; deleted below
            }
            api(&sock, "DELETE", &format!("/api/v1/sandboxes/{name}"), None);
        }
        bare_ms.push(bare_boot(
            &kernel,
            &initrd,
            &rootfs,
            &template,
            &work.path().join(format!("bare{i}")),
            accel,
        ));
    }
    let (h, b) = (median(&mut hutch_ms), median(&mut bare_ms));
    println!("create-to-exec-ready (median of {ROUNDS}, interleaved)");
    println!("  hutch create (API -> agent ready)   {h:8.1} ms");
    println!("  bare qemu boot -> agent handshake   {b:8.1} ms");
    println!(
        "  ratio hutch/bare                    {:8.3}   (goal < 1.15)",
        h / b
    );
    println!();

    let mut lat = Vec::new();
    for _ in 0..EXECS {
        let t = Instant::now();
        let (st, v) = api(
            &sock,
            "POST",
            "/api/v1/sandboxes/b00/exec",
            Some(json!({"argv": ["true"]})),
        );
        assert!(st == 200 && v["type"] == "exit", "{v}");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!("exec round trip of `true` over the REST API ({EXECS} runs)");
    println!(
        "  p50 {:7.2} ms   p99 {:7.2} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    println!();
    api(&sock, "DELETE", "/api/v1/sandboxes/b00", None);

    let (s, l) = (median(&mut disk_us[0]), median(&mut disk_us[1]));
    let small_mb = std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    let large_mb = std::fs::metadata(
        data.join("images/rootfs")
            .join(format!("{}.erofs", digests[1])),
    )
    .map(|m| m.len())
    .unwrap_or(0) as f64
        / 1048576.0;
    println!("per-VM writable layer creation (median of {ROUNDS})");
    println!(
        "  small image ({small_mb:6.1} MB rootfs)   {:8.2} ms",
        s / 1000.0
    );
    println!(
        "  large image ({large_mb:6.1} MB rootfs)   {:8.2} ms",
        l / 1000.0
    );
    println!(
        "  ratio large/small                   {:8.3}   (goal: 1 within noise)",
        l / s
    );
}

/// Stops hutchd and any VM left under the bench's data dir, also when the bench panics.
struct Cleanup {
    hutchd: std::process::Child,
    data: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.hutchd.kill();
        let _ = self.hutchd.wait();
        benchlib::kill_qemus_under(&self.data);
    }
}
