//! Snapshots, pause/resume and fork through the service with fakes below it: the lifecycle,
//! the records (disk layers, memory base), ownership, quotas, and that refused requests change
//! nothing. (The guest side is tested on real VMs in crates/hutch/tests/snapshots.rs.)

use super::testing::{add_accounts, add_image, fake_service};
use super::{Admission, CreateVm};
use crate::auth::Caller;
use crate::error::ApiError;
use hutch_core::api::ForkVm;
use hutch_core::{Quota, VmState};
use hutch_store::kv::MemoryStore;
use std::sync::Arc;

fn who(account: &str) -> Caller {
    Caller {
        account: account.into(),
        admin: false,
    }
}

fn new(name: &str) -> CreateVm {
    CreateVm {
        name: Some(name.into()),
        image: "busybox".into(),
        mem_mib: 64,
        ..Default::default()
    }
}

fn from_snapshot(name: &str, snap: &str) -> CreateVm {
    CreateVm {
        name: Some(name.into()),
        snapshot: Some(snap.into()),
        ..Default::default()
    }
}

async fn service(quota: Quota) -> (Arc<super::Service>, tempfile::TempDir) {
    let d = tempfile::tempdir().unwrap();
    let adm = Admission {
        default_quota: quota,
        ..Default::default()
    };
    let (s, _vmm) = fake_service(d.path(), Arc::new(MemoryStore::new()), adm).await;
    add_image(&s, "busybox:latest").await;
    add_accounts(&s, &["alice", "bob"]).await;
    (s, d)
}

fn quota(vms: u32) -> Quota {
    Quota {
        vms,
        vcpus: 64,
        mem_mib: 64 * 64,
        disk_gib: 1000,
    }
}

fn entries(d: &std::path::Path) -> usize {
    std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_snapshot_restore_fork() {
    let (s, d) = service(quota(10)).await;
    let alice = who("alice");
    s.create(&alice, new("web")).await.unwrap();

    let vm = s.pause(&alice, "web").await.unwrap();
    assert_eq!((vm.state, vm.pid), (VmState::Paused, None));
    assert!(vm.mem.saved.as_ref().is_some_and(|st| st.ram_in_file));
    assert!(matches!(
        s.pause(&alice, "web").await,
        Err(ApiError::Conflict(_))
    ));
    assert!(matches!(
        s.start(&alice, "web").await,
        Err(ApiError::Conflict(_))
    ));
    let vm = s.resume(&alice, "web").await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert!(vm.pid.is_some() && vm.mem.saved.is_none());

    let snap = s.snapshot(&alice, "web", "base").await.unwrap();
    assert!(snap.ram_in_file);
    assert_eq!(snap.layers.len(), 1);
    assert_eq!(snap.owner.as_deref(), Some("alice"));
    // The source runs on over the frozen layer and the snapshot's memory.
    let web = s.get("alice/web").await.unwrap();
    assert_eq!(web.state, VmState::Running);
    assert_eq!(web.mem.layers, snap.layers);
    assert_eq!(web.mem.base.as_deref(), Some(snap.id.as_str()));
    assert!(s.node.layer_path(&snap.layers[0]).exists());

    let copy = s
        .create(&alice, from_snapshot("copy", "base"))
        .await
        .unwrap();
    assert_eq!(copy.state, VmState::Running);
    assert_eq!(copy.mem.from.as_deref(), Some("base"));
    assert_eq!(copy.mem.layers, snap.layers);
    assert_eq!((copy.mem_mib, copy.image.as_str()), (64, "busybox:latest"));

    let forks = s
        .fork(
            &alice,
            "web",
            ForkVm {
                count: Some(2),
                name: Some("t".into()),
            },
        )
        .await
        .unwrap();
    let names: Vec<&str> = forks.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["t-1", "t-2"]);
    // web mapped base's memory, so the fork first moved its RAM into a file of its own (one
    // more frozen layer), then took the fork's snapshot (another): the copies share its memory.
    assert!(forks.iter().all(|v| v.mem.layers.len() == 3));
    assert!(forks.iter().all(|v| v.mem.base.is_some()));
    let web = s.get("alice/web").await.unwrap();
    assert_eq!(web.mem.layers.len(), 3);
    assert_eq!(web.mem.base, forks[0].mem.base);
    // The fork's snapshot is gone from the listing (its files stay while the copies use them).
    let listed = s.snapshots_of(&alice).await.unwrap();
    assert_eq!(listed.len(), 1);

    // A copy pauses with its RAM in its state (it maps the snapshot's memory).
    let v = s.pause(&alice, "copy").await.unwrap();
    assert!(v.mem.saved.as_ref().is_some_and(|st| !st.ram_in_file));
    assert!(v.mem.base.is_none());
    // Stop of a paused VM discards the state.
    let v = s.stop(&alice, "copy").await.unwrap();
    assert_eq!(v.state, VmState::Stopped);
    assert!(v.mem.saved.is_none());
    assert!(!s.node.state_path(&v.id).exists());

    // Removing the snapshot keeps its files while VMs use them; the last removal takes them.
    s.delete_snapshot(&alice, "base").await.unwrap();
    assert!(entries(&d.path().join("layers")) > 0);
    for n in ["copy", "t-1", "t-2", "web"] {
        s.delete(&alice, n).await.unwrap();
    }
    assert_eq!(entries(&d.path().join("snapshots")), 0);
    assert_eq!(entries(&d.path().join("layers")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_accounts_quotas_and_bad_input_change_nothing() {
    let (s, d) = service(quota(3)).await;
    let (alice, bob) = (who("alice"), who("bob"));
    s.create(&alice, new("web")).await.unwrap();
    s.snapshot(&alice, "web", "base").await.unwrap();
    let layers = entries(&d.path().join("layers"));

    // Another account's snapshot and VM are not found, whatever the operation.
    let nf = |r: Result<_, ApiError>| matches!(r, Err(ApiError::NotFound { .. }));
    assert!(nf(s.snapshot_for(&bob, "base").await.map(|_| ())));
    assert!(nf(s.snapshot_for(&bob, "alice/base").await.map(|_| ())));
    assert!(nf(s.delete_snapshot(&bob, "base").await));
    assert!(nf(s
        .create(&bob, from_snapshot("mine", "base"))
        .await
        .map(|_| ())));
    assert!(nf(s.snapshot(&bob, "web", "x").await.map(|_| ())));
    assert!(nf(s.pause(&bob, "web").await.map(|_| ())));
    assert!(nf(s.fork(&bob, "web", ForkVm::default()).await.map(|_| ())));
    assert!(s.snapshots_of(&bob).await.unwrap().is_empty());
    assert!(s.vms_of(&bob).await.unwrap().is_empty());
    // Unknown snapshot, bad names, an image with a snapshot.
    assert!(nf(s
        .create(&alice, from_snapshot("x", "nope"))
        .await
        .map(|_| ())));
    assert!(matches!(
        s.snapshot(&alice, "web", "Bad/Name").await,
        Err(ApiError::Invalid(_))
    ));
    let mut both = from_snapshot("x", "base");
    both.image = "busybox".into();
    assert!(matches!(
        s.create(&alice, both).await,
        Err(ApiError::Invalid(_))
    ));
    assert!(matches!(
        s.snapshot(&alice, "web", "base").await,
        Err(ApiError::Conflict(_))
    ));
    // A fork past the quota (1 VM + 3 > 3) makes nothing: no VM, no snapshot, no layer.
    let r = s
        .fork(
            &alice,
            "web",
            ForkVm {
                count: Some(3),
                name: None,
            },
        )
        .await;
    assert!(matches!(r, Err(ApiError::Quota(_))), "{r:?}");
    assert!(matches!(
        s.fork(
            &alice,
            "web",
            ForkVm {
                count: Some(0),
                name: None
            }
        )
        .await,
        Err(ApiError::Invalid(_))
    ));
    let names: Vec<String> = s
        .vms_of(&alice)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["web"]);
    assert_eq!(entries(&d.path().join("layers")), layers);
    assert_eq!(s.get("alice/web").await.unwrap().state, VmState::Running);
    // A stopped VM can be neither snapshotted nor paused.
    s.stop(&alice, "web").await.unwrap();
    assert!(matches!(
        s.snapshot(&alice, "web", "again").await,
        Err(ApiError::Conflict(_))
    ));
    assert!(matches!(
        s.pause(&alice, "web").await,
        Err(ApiError::Conflict(_))
    ));
    assert!(matches!(
        s.resume(&alice, "web").await,
        Err(ApiError::Conflict(_))
    ));
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..400 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_pools_claims_and_tenancy() {
    use hutch_core::template::{CreateTemplate, SetPool, TemplateStatus};
    let (s, _d) = service(quota(10)).await;
    let (alice, bob) = (who("alice"), who("bob"));
    let t = s
        .create_template(
            &alice,
            CreateTemplate {
                name: "t".into(),
                image: "busybox".into(),
                vcpus: 1,
                mem_mib: 64,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.status, TemplateStatus::Building);
    // Start and ready commands are bounded and NUL-free; a refused one records nothing.
    for cmd in ["x".repeat(5000), "a\0b".to_string(), " ".to_string()] {
        let r = s
            .create_template(
                &alice,
                CreateTemplate {
                    name: "bad".into(),
                    image: "busybox".into(),
                    start_cmd: Some(cmd),
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(r, Err(ApiError::Invalid(_))));
    }
    assert!(nf_template(&s, &alice, "bad").await);
    until("the build", async || {
        let t = s.template_for(&alice, "t").await.ok()?;
        (t.status == TemplateStatus::Ready).then_some(())
    })
    .await;
    // Its build VM is gone; bad pool sizes change nothing.
    assert!(s.vms_of(&alice).await.unwrap().is_empty());
    for (min, max) in [(3, Some(2)), (65, None), (1, Some(65))] {
        let r = s
            .set_pool(
                &alice,
                "t",
                SetPool {
                    min,
                    max,
                    nodes: None,
                },
            )
            .await;
        assert!(matches!(r, Err(ApiError::Invalid(_))), "{min} {max:?}");
    }
    // Nodes are for clusters.
    for nodes in [vec!["*".to_string()], vec!["n1".into()]] {
        let r = s
            .set_pool(
                &alice,
                "t",
                SetPool {
                    min: 1,
                    max: None,
                    nodes: Some(nodes),
                },
            )
            .await;
        assert!(matches!(r, Err(ApiError::Invalid(_))));
    }
    assert!(s.pools_of(&alice).await.unwrap().is_empty());
    let pool = |min, max| SetPool {
        min,
        max,
        nodes: None,
    };
    s.set_pool(&alice, "t", pool(3, None)).await.unwrap();
    until("a full pool", async || {
        (s.pools_of(&alice).await.ok()?.first()?.ready == 3).then_some(())
    })
    .await;
    // A smaller pool gives back what it no longer keeps, the newest first.
    let oldest = s
        .records
        .fold_local_vms(|it| it.filter(|v| v.pool.is_some()).map(|v| v.created_at).min())
        .unwrap();
    s.set_pool(&alice, "t", pool(2, None)).await.unwrap();
    s.pools_changed();
    until("a pool of 2", async || {
        let n = s
            .records
            .fold_local_vms(|it| it.filter(|v| v.pool.is_some()).count());
        (n == 2).then_some(())
    })
    .await;
    let kept = s
        .records
        .fold_local_vms(|it| it.filter(|v| v.pool.is_some()).map(|v| v.created_at).min());
    assert_eq!(kept, Some(oldest));
    // Pool VMs are not listed; a claim takes one, renamed, and the pool refills.
    assert!(s.vms_of(&alice).await.unwrap().is_empty());
    let req = CreateVm {
        name: Some("a".into()),
        template: Some("t".into()),
        auto_pause: Some("60s".into()),
        ..Default::default()
    };
    let a = s.create(&alice, req).await.unwrap();
    assert_eq!((a.name.as_str(), a.pool.as_deref()), ("a", None));
    assert_eq!(a.timers.auto_pause_secs, Some(60));
    assert_eq!(
        s.metrics
            .pool_claims
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    until("the refill", async || {
        (s.pools_of(&alice).await.ok()?.first()?.ready == 2).then_some(())
    })
    .await;
    let names: Vec<String> = s
        .vms_of(&alice)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["a"]);
    // Another account sees and uses none of it.
    let nf = |r: Result<(), ApiError>| matches!(r, Err(ApiError::NotFound { .. }));
    assert!(nf(s.template_for(&bob, "t").await.map(|_| ())));
    assert!(nf(s.rebuild_template(&bob, "t").await.map(|_| ())));
    assert!(nf(s.delete_template(&bob, "t").await));
    assert!(nf(s.set_pool(&bob, "t", pool(1, None)).await.map(|_| ())));
    let req = CreateVm {
        template: Some("t".into()),
        ..Default::default()
    };
    assert!(nf(s.create(&bob, req).await.map(|_| ())));
    assert!(s.pools_of(&bob).await.unwrap().is_empty());
    assert!(s.templates_of(&bob).await.unwrap().is_empty());
    // Removing the template removes its pool and idle VMs; the claimed VM runs on.
    s.delete_template(&alice, "t").await.unwrap();
    assert!(s.pools_of(&alice).await.unwrap().is_empty());
    until("the pool VMs gone", async || {
        let left = s.records.find_vm(|v| v.pool.is_some());
        left.is_none().then_some(())
    })
    .await;
    assert_eq!(s.get("alice/a").await.unwrap().state, VmState::Running);
}

async fn nf_template(s: &super::Service, c: &Caller, name: &str) -> bool {
    matches!(
        s.template_for(c, name).await,
        Err(ApiError::NotFound { .. })
    )
}
