//! A whole control plane over fakes (`FakeVmm`, `FakeAgent`) and a real data directory, for the
//! service's unit tests and the control-plane benchmark (`make bench-control`): everything above
//! the VMM and agent seams runs for real (records, admission, the lifecycle, locks, events).

use super::{Admission, Service};
use crate::auth::Tokens;
use crate::node::fakes::FakeConnector;
use crate::node::{Node, NodeConfig};
use crate::records::Records;
use hutch_core::{Image, ImageConfig};
use hutch_store::kv::Store;
use hutch_vmm::fake::FakeVmm;
use hutch_vmm::{Accel, Vmm};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A service on `kv` with its data under `dir`, a fake VMM and fake agents.
pub async fn fake_service(
    dir: &Path,
    kv: Arc<dyn Store>,
    admission: Admission,
) -> (Arc<Service>, Arc<FakeVmm>) {
    let vmm = Arc::new(FakeVmm::default());
    (
        fake_service_with(dir, kv, admission, vmm.clone()).await,
        vmm,
    )
}

/// The same on a given fake VMM (a slow one, say).
pub async fn fake_service_with(
    dir: &Path,
    kv: Arc<dyn Store>,
    admission: Admission,
    vmm: Arc<FakeVmm>,
) -> Arc<Service> {
    let cfg = NodeConfig {
        data_dir: dir.to_path_buf(),
        bundle: hutch_guest::BootBundle {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd"),
            release: "6.1.0-fake".into(),
        },
        accel: Accel::Tcg,
        boot_timeout: Duration::from_secs(5),
        default_disk_gib: 1,
        console_max_bytes: 1 << 20,
        jail_uids: None,
        registry_allow_private: false,
        max_upload_bytes: 1 << 30,
        qemu_version: "fake".into(),
    };
    let records = Records::open(kv).await.expect("records");
    let images = hutch_image::ImageStore::open(&dir.join("images")).expect("image store");
    let as_vmm: Arc<dyn Vmm> = vmm;
    let node = Node::new(
        cfg,
        records,
        Arc::new(images),
        as_vmm.clone(),
        Arc::new(FakeConnector { vmm: as_vmm }),
        Arc::default(),
    );
    let tokens = Tokens::load_or_create(dir).expect("tokens");
    let s = Arc::new(Service::new(Arc::new(node), tokens, admission));
    s.start_background();
    s
}

/// Records an image `name` in the shared library (no layers: an empty root filesystem).
pub async fn add_image(s: &Service, name: &str) -> Image {
    let img = Image {
        name: name.into(),
        digest: format!("sha256:{}", "e".repeat(64)),
        config_digest: format!("sha256:{}", "c".repeat(64)),
        layers: vec![],
        config: ImageConfig {
            cmd: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        },
        architecture: "amd64".into(),
        rootfs_size: 0,
        created_at: 0,
        owner: None,
    };
    s.records.put_image(&img).await.expect("image record");
    img
}

/// Records plain (non-admin) accounts `names`.
pub async fn add_accounts(s: &Service, names: &[&str]) {
    for a in names {
        let acc = hutch_core::Account {
            name: a.to_string(),
            admin: false,
            keys: vec![],
            created_at: 0,
            quota: None,
        };
        s.records
            .put(crate::records::ACCOUNTS, a, &acc)
            .await
            .expect("account record");
    }
}

/// Creates VMs (`vm-N`, busybox, 64 MiB) from `clients` concurrent clients for `dur`; the
/// latency of each create (the control-plane benchmarks' load).
pub async fn create_load(
    s: &Arc<Service>,
    clients: usize,
    dur: Duration,
    seq: &Arc<std::sync::atomic::AtomicU64>,
) -> Vec<Duration> {
    let deadline = std::time::Instant::now() + dur;
    let admin = crate::auth::Caller::local_admin();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (s, seq, admin) = (s.clone(), seq.clone(), admin.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while std::time::Instant::now() < deadline {
                let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let req = super::CreateVm {
                    name: Some(format!("vm-{n}")),
                    image: "busybox".into(),
                    mem_mib: 64,
                    ..Default::default()
                };
                let t = std::time::Instant::now();
                s.create(&admin, req).await.expect("create");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("client"));
    }
    lat
}

/// The control-plane benchmarks' service: on `kv`, with admission that never refuses (fake VMs
/// use no memory or disk; admission still runs its checks on every create), the busybox image,
/// and one create done (it builds the empty root filesystem and the disk template).
pub async fn bench_service(dir: &Path, kv: Arc<dyn Store>) -> Arc<Service> {
    let admission = Admission {
        mem_overcommit: 1e6,
        disk_overcommit: 1e6,
        disk_reserve_mib: 0,
        ..Default::default()
    };
    let (s, _vmm) = fake_service(dir, kv, admission).await;
    add_image(&s, "busybox:latest").await;
    let warm = super::CreateVm {
        name: Some("warm".into()),
        image: "busybox".into(),
        mem_mib: 64,
        ..Default::default()
    };
    s.create(&crate::auth::Caller::local_admin(), warm)
        .await
        .expect("warm-up create");
    s
}
