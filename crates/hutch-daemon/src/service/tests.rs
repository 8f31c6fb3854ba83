//! The service with fakes below it (FakeVmm, FakeAgent, the in-memory store): the lifecycle,
//! authorization by caller, quotas, restart policy, events, and the concurrency cases the state
//! machine defines, without QEMU.

use super::testing::{add_accounts, add_image, fake_service, fake_service_with};
use super::{Admission, CreateVm, ExecVm, Service};
use crate::auth::Caller;
use crate::error::ApiError;
use hutch_core::{Quota, RestartPolicy, VmState};
use hutch_store::kv::MemoryStore;
use std::sync::Arc;
use std::time::Duration;

fn who(account: &str, admin: bool) -> Caller {
    Caller {
        account: account.into(),
        admin,
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

async fn service(
    quota: Option<Quota>,
) -> (
    Arc<Service>,
    Arc<hutch_vmm::fake::FakeVmm>,
    tempfile::TempDir,
) {
    let d = tempfile::tempdir().unwrap();
    let mut adm = Admission::default();
    if let Some(q) = quota {
        adm.default_quota = q;
    }
    let (s, vmm) = fake_service(d.path(), Arc::new(MemoryStore::new()), adm).await;
    add_image(&s, "busybox:latest").await;
    add_accounts(&s, &["alice", "bob"]).await;
    (s, vmm, d)
}

async fn wait_for<T>(mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_the_service() {
    let (s, vmm, _d) = service(None).await;
    let admin = Caller::local_admin();
    let vm = s.create(&admin, new("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert!(vm.pid.is_some());
    assert_eq!(vmm.running(), 1);
    let vm = s.stop(&admin, "web").await.unwrap();
    assert_eq!((vm.state, vm.pid), (VmState::Stopped, None));
    assert_eq!(vmm.running(), 0);
    assert!(matches!(
        s.stop(&admin, "web").await,
        Err(ApiError::Conflict(m)) if m == "web is already stopped"
    ));
    assert_eq!(
        s.start(&admin, "web").await.unwrap().state,
        VmState::Running
    );
    s.delete(&admin, "web").await.unwrap();
    assert!(matches!(
        s.describe(&admin, "web").await,
        Err(ApiError::NotFound { .. })
    ));
    assert_eq!(vmm.running(), 0);
    assert!(s.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_is_authorized_on_the_resolved_vm() {
    let (s, _vmm, _d) = service(None).await;
    let (alice, bob, admin) = (
        who("alice", false),
        who("bob", false),
        Caller::local_admin(),
    );
    s.create(&alice, new("web")).await.unwrap();
    // Bob's `web` is his own; alice's is invisible to him in every operation.
    for r in [
        s.describe(&bob, "web").await.map(|_| ()),
        s.stop(&bob, "web").await.map(|_| ()),
        s.start(&bob, "web").await.map(|_| ()),
        s.delete(&bob, "web").await,
        s.describe(&bob, "alice/web").await.map(|_| ()),
        s.console(&bob, "alice/web", 10).await.map(|_| ()),
        s.exec(&bob, "alice/web", ExecVm::default())
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(
                r,
                Err(ApiError::NotFound { .. }) | Err(ApiError::Invalid(_))
            ),
            "{r:?}"
        );
    }
    s.create(&bob, new("web")).await.unwrap();
    assert_eq!(s.vms_of(&bob).await.unwrap().len(), 1);
    // The admin reaches alice's by its qualified name.
    assert_eq!(
        s.stop(&admin, "alice/web").await.unwrap().state,
        VmState::Stopped
    );
    assert_eq!(s.vms_of(&admin).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_and_leave_nothing_behind() {
    let q = Quota {
        vms: 1,
        vcpus: 1,
        mem_mib: 128,
        disk_gib: 10,
    };
    let (s, vmm, _d) = service(Some(q)).await;
    let alice = who("alice", false);
    s.create(&alice, new("one")).await.unwrap();
    let r = s.create(&alice, new("two")).await;
    assert!(matches!(r, Err(ApiError::Quota(_))), "{r:?}");
    assert_eq!(s.list().await.unwrap().len(), 1);
    assert_eq!(vmm.running(), 1);
    // Bob's quota is his own.
    s.create(&who("bob", false), new("one")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_has_one_outcome_each() {
    let d = tempfile::tempdir().unwrap();
    let vmm = Arc::new(hutch_vmm::fake::FakeVmm::slow(Duration::from_millis(400)));
    let s = fake_service_with(
        d.path(),
        Arc::new(MemoryStore::new()),
        Admission::default(),
        vmm.clone(),
    )
    .await;
    add_image(&s, "busybox:latest").await;
    let admin = Caller::local_admin();
    // Same-name creates: one wins, the other is told the name is taken.
    let (a, b, ()) = tokio::join!(
        s.create(&admin, new("dup")),
        s.create(&admin, new("dup")),
        async {
            // Delete during create: refused at once, the create decides.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let r = s.delete(&admin, "dup").await;
            assert!(
                matches!(&r, Err(ApiError::Conflict(m)) if m.contains("still being created")),
                "{r:?}"
            );
        }
    );
    let oks = [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count();
    assert_eq!(oks, 1, "{a:?} {b:?}");
    assert!([a, b]
        .into_iter()
        .any(|r| matches!(r, Err(ApiError::Conflict(m)) if m.contains("exists"))));
    // Stop during exec: the stop goes ahead; the exec does not hold it up.
    let exec = s
        .exec(
            &admin,
            "dup",
            ExecVm {
                argv: vec!["sleep".into(), "100".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let stop = {
        let s = s.clone();
        tokio::spawn(async move { s.stop(&Caller::local_admin(), "dup").await })
    };
    // Start during stop: refused at once.
    wait_for(async || {
        (s.describe(&admin, "dup").await.ok()?.state != VmState::Running).then_some(())
    })
    .await;
    let r = s.start(&admin, "dup").await;
    assert!(
        matches!(&r, Err(ApiError::Conflict(m)) if m.contains("stopping")),
        "{r:?}"
    );
    assert_eq!(stop.await.unwrap().unwrap().state, VmState::Stopped);
    // (That the exec's stream then ends is the agent connection's doing: the real client's
    // streams end with `Lost` when QEMU goes; tests/operate.rs checks it end to end.)
    drop(exec);
    assert_eq!(vmm.running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vm_restarts_by_policy_and_events_tell_it() {
    let (s, vmm, _d) = service(None).await;
    let admin = Caller::local_admin();
    let mut events = s.events.subscribe();
    let vm = s
        .create(
            &admin,
            CreateVm {
                restart: RestartPolicy::OnFailure,
                ..new("phoenix")
            },
        )
        .await
        .unwrap();
    let plain = s.create(&admin, new("plain")).await.unwrap();
    vmm.crash(vm.pid.unwrap());
    vmm.crash(plain.pid.unwrap());
    let back = wait_for(async || {
        let v = s.describe(&admin, "phoenix").await.ok()?;
        (v.state == VmState::Running && v.pid != vm.pid).then_some(v)
    })
    .await;
    assert_eq!(back.restarts, 1);
    let p = s.describe(&admin, "plain").await.unwrap();
    assert_eq!(p.state, VmState::Failed);
    assert!(p.reason.unwrap().contains("signal 9"));
    let mut kinds = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.vm == "phoenix" {
            kinds.push(e.kind);
        }
    }
    assert_eq!(
        kinds,
        ["created", "failed", "restarting", "starting", "started"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_verify_until_revoked_expired_or_orphaned() {
    let (s, _vmm, _d) = service(None).await;
    let alice = who("alice", false);
    let (rec, jwt) = s.issue_token(&alice, 3600).await.unwrap();
    let c = s.verify_token(&jwt).await.expect("a fresh token verifies");
    assert_eq!((c.account.as_str(), c.admin), ("alice", false));
    // Tampered: the payload changed, the signature did not.
    let mut parts: Vec<String> = jwt.split('.').map(str::to_string).collect();
    parts[1] = parts[1].chars().rev().collect();
    assert!(s.verify_token(&parts.join(".")).await.is_none());
    assert!(s.verify_token("not-a-token").await.is_none());
    // Another account cannot revoke it; its owner can.
    assert!(!s.revoke_token(&who("bob", false), &rec.id).await.unwrap());
    assert!(s.revoke_token(&alice, &rec.id).await.unwrap());
    assert!(s.verify_token(&jwt).await.is_none());
    // Expired: issued with no lifetime.
    let (_, old) = s.issue_token(&alice, 0).await.unwrap();
    assert!(s.verify_token(&old).await.is_none());
    // The account is gone: its tokens are worthless.
    let (_, jwt) = s.issue_token(&alice, 3600).await.unwrap();
    s.records
        .delete(crate::records::ACCOUNTS, "alice")
        .await
        .unwrap();
    assert!(s.verify_token(&jwt).await.is_none());
}

/// Without a VM network (`--network off`, as the fakes run), VMs get no NIC, asking for one is
/// a clear error that makes nothing, and the network calls refuse a VM without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_means_no_nic() {
    use hutch_core::net::{NetMode, PortForward, SetNet};
    let (s, _vmm, _d) = service(None).await;
    let admin = Caller::local_admin();
    let vm = s.create(&admin, new("plain")).await.unwrap();
    assert_eq!((vm.net.mode, vm.net.ipv4), (NetMode::None, None));
    for mode in [NetMode::Internal, NetMode::Internet] {
        let e = s
            .create(
                &admin,
                CreateVm {
                    net: Some(mode),
                    ..new("wants-net")
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid(m) if m.contains("--network off")),
            "{e}"
        );
    }
    let e = s
        .create(
            &admin,
            CreateVm {
                rate_in: Some("10mbit".into()),
                net: Some(NetMode::None),
                ..new("rated")
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Invalid(_)), "{e}");
    assert!(s.describe(&admin, "wants-net").await.is_err());
    assert!(s.describe(&admin, "rated").await.is_err());
    let e = s
        .port_add(
            &admin,
            "plain",
            PortForward {
                host: 20000,
                vm: 80,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Invalid(_)), "{e}");
    let e = s
        .set_net(&admin, "plain", SetNet::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Invalid(_)), "{e}");
    // Another account's VM is not found, not refused.
    let bob = Caller {
        account: "bob".into(),
        admin: false,
    };
    let e = s.port_public(&bob, "plain", 80, true).await.unwrap_err();
    assert!(matches!(e, ApiError::NotFound { .. }), "{e}");
}

/// Share links: a port and a lifetime within bounds, then a proxy to share through; another
/// account's VM is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_links_are_bounded() {
    let (s, _vmm, _d) = service(None).await;
    let admin = Caller::local_admin();
    s.create(&admin, new("web")).await.unwrap();
    for (port, ttl) in [(0, 60), (80, 0), (80, 31 * 86400), (80, u64::MAX)] {
        let e = s.share(&admin, "web", port, ttl).await.unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid(m) if !m.contains("proxy")),
            "{port} {ttl}: {e}"
        );
    }
    let e = s.share(&admin, "web", 80, 3600).await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Invalid(m) if m.contains("proxy")),
        "{e}"
    );
    let bob = Caller {
        account: "bob".into(),
        admin: false,
    };
    let e = s.share(&bob, "web", 80, 3600).await.unwrap_err();
    assert!(matches!(e, ApiError::NotFound { .. }), "{e}");
}
