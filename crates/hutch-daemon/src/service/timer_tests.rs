//! VM timers through the service with fakes below it: the TTL deletes or pauses, keepalive
//! extends it (and refuses what it cannot do, changing nothing), auto-pause after idle time,
//! uses that keep a VM running, and auto-resume on use (once, however many ask). The reaper is
//! driven with an injected clock (`Service::reap(now, at)`), and runs on a short tick where
//! the loop itself is under test. (Real VMs: crates/hutch/tests/timers.rs.)

use super::testing::{add_accounts, add_image, fake_service};
use super::{Admission, CreateVm, ExecVm, Service};
use crate::auth::Caller;
use crate::error::ApiError;
use hutch_core::api::Keepalive;
use hutch_core::timers::OnExpire;
use hutch_core::VmState;
use hutch_store::kv::MemoryStore;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

fn with_ttl(name: &str, ttl: &str, then: Option<OnExpire>) -> CreateVm {
    CreateVm {
        ttl: Some(ttl.into()),
        on_expire: then,
        ..new(name)
    }
}

fn idle_after(name: &str, idle: &str) -> CreateVm {
    CreateVm {
        auto_pause: Some(idle.into()),
        ..new(name)
    }
}

async fn service() -> (Arc<Service>, tempfile::TempDir) {
    let d = tempfile::tempdir().unwrap();
    let (s, _vmm) =
        fake_service(d.path(), Arc::new(MemoryStore::new()), Admission::default()).await;
    add_image(&s, "busybox:latest").await;
    add_accounts(&s, &["alice", "bob"]).await;
    (s, d)
}

/// Runs one look of the reaper `secs` from now and waits for what it started.
async fn reap_after(s: &Arc<Service>, secs: u64) {
    let at = Instant::now() + Duration::from_secs(secs);
    for h in s.reap(hutch_core::now() + secs, at) {
        h.await.unwrap();
    }
}

async fn state(s: &Service, key: &str) -> Option<VmState> {
    s.records.vm(key).await.unwrap().map(|v| v.state)
}

/// Polls `key`'s state until it is `want` (within 10 s; it takes 1 to 3 on an idle machine).
async fn wait_state(s: &Service, key: &str, want: Option<VmState>) {
    let t = Instant::now();
    while state(s, key).await != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{key}: {:?}, not {want:?}",
            state(s, key).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_deletes_or_pauses() {
    let (s, _d) = service().await;
    let alice = who("alice");
    s.create(&alice, with_ttl("gone", "10m", None))
        .await
        .unwrap();
    let p = s
        .create(&alice, with_ttl("sleepy", "10m", Some(OnExpire::Pause)))
        .await
        .unwrap();
    assert!(p.timers.deadline.unwrap() >= hutch_core::now() + 590);
    s.create(&alice, new("forever")).await.unwrap();
    // Paused with the TTL still to run: it stays paused when it runs out.
    s.create(&alice, with_ttl("idle", "10m", Some(OnExpire::Pause)))
        .await
        .unwrap();
    s.pause(&alice, "idle").await.unwrap();

    reap_after(&s, 300).await;
    assert_eq!(state(&s, "alice/gone").await, Some(VmState::Running));
    let mut events = s.events.subscribe();
    reap_after(&s, 601).await;
    let mut expired = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.kind == "expired" {
            expired.push((e.vm, e.reason.unwrap_or_default()));
        }
    }
    expired.sort();
    assert_eq!(
        expired,
        [
            ("gone".into(), "its TTL ran out: deleting it".into()),
            ("sleepy".into(), "its TTL ran out: pausing it".into())
        ],
        "(a paused VM is left as it is)"
    );
    assert_eq!(state(&s, "alice/gone").await, None);
    let v = s.get("alice/sleepy").await.unwrap();
    assert_eq!((v.state, v.timers.deadline), (VmState::Paused, None));
    let v = s.get("alice/idle").await.unwrap();
    assert_eq!((v.state, v.timers.deadline), (VmState::Paused, None));
    assert_eq!(state(&s, "alice/forever").await, Some(VmState::Running));
    assert_eq!(count(&s.metrics.expired_total), 3);
    // Nothing more is due.
    assert!(s
        .reap(hutch_core::now() + 10_000, Instant::now())
        .is_empty());
    // A resume gives a VM whose TTL ran out its whole TTL again.
    let v = s.resume(&alice, "sleepy").await.unwrap();
    assert!(v
        .timers
        .deadline
        .is_some_and(|d| d >= hutch_core::now() + 590));
    assert!(s.records.vm("alice/gone").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_runs_by_itself() {
    let (s, _d) = service().await;
    s.activity.set_tick(Duration::from_millis(50));
    let alice = who("alice");
    s.create(&alice, with_ttl("brief", "1s", None))
        .await
        .unwrap();
    s.create(&alice, with_ttl("nap", "1s", Some(OnExpire::Pause)))
        .await
        .unwrap();
    s.create(&alice, idle_after("idle", "1s")).await.unwrap();
    wait_state(&s, "alice/brief", None).await;
    wait_state(&s, "alice/nap", Some(VmState::Paused)).await;
    wait_state(&s, "alice/idle", Some(VmState::Paused)).await;
    assert_eq!(s.vms_of(&alice).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_extends_and_refuses_bad_input() {
    let (s, _d) = service().await;
    let (alice, bob) = (who("alice"), who("bob"));
    s.create(&alice, with_ttl("web", "10m", None))
        .await
        .unwrap();
    s.create(&alice, new("plain")).await.unwrap();
    let ka = |d: Option<&str>| Keepalive {
        duration: d.map(String::from),
    };

    let v = s.keepalive(&alice, "web", ka(Some("1h"))).await.unwrap();
    let d = v.timers.deadline.unwrap();
    assert!(d >= hutch_core::now() + 3590 && d <= hutch_core::now() + 3600);
    assert_eq!(s.get("alice/web").await.unwrap().timers.deadline, Some(d));
    // Past the TTL it was made with, it lives on.
    reap_after(&s, 700).await;
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Running));
    // Without a duration: its own TTL from now.
    let v = s.keepalive(&alice, "web", ka(None)).await.unwrap();
    assert!(v.timers.deadline.unwrap() <= hutch_core::now() + 600);
    assert_eq!(v.timers.ttl_secs, Some(600));

    // Bad input: a clear error and nothing changes.
    let before = s.get("alice/web").await.unwrap();
    let r = s.keepalive(&alice, "web", ka(Some("5x"))).await;
    assert!(
        matches!(&r, Err(ApiError::Invalid(m)) if m.contains("the unit must be")),
        "{r:?}"
    );
    let r = s.keepalive(&alice, "web", ka(Some("0"))).await;
    assert!(matches!(r, Err(ApiError::Invalid(_))), "{r:?}");
    let r = s.keepalive(&alice, "plain", ka(None)).await;
    assert!(
        matches!(&r, Err(ApiError::Invalid(m)) if m.contains("plain has no TTL")),
        "{r:?}"
    );
    assert_eq!(s.get("alice/plain").await.unwrap().timers.deadline, None);
    // Another account's VM is not found, whatever the duration.
    for d in [None, Some("1h"), Some("bad")] {
        let r = s.keepalive(&bob, "web", ka(d)).await;
        let not_found = matches!(r, Err(ApiError::NotFound { .. }));
        assert!(not_found || d == Some("bad"), "{d:?}: {r:?}");
    }
    let r = s.keepalive(&bob, "alice/web", ka(Some("1h"))).await;
    assert!(matches!(r, Err(ApiError::NotFound { .. })), "{r:?}");
    assert_eq!(s.get("alice/web").await.unwrap(), before);
    // Bad timers at create make nothing.
    for bad in [
        with_ttl("x", "forever", None),
        idle_after("x", "0s"),
        CreateVm {
            on_expire: Some(OnExpire::Pause),
            ..new("x")
        },
    ] {
        let r = s.create(&alice, bad).await;
        assert!(matches!(r, Err(ApiError::Invalid(_))), "{r:?}");
    }
    assert_eq!(s.vms_of(&alice).await.unwrap().len(), 2);
    // With a duration, a VM without a TTL gets a deadline.
    let v = s.keepalive(&alice, "plain", ka(Some("2h"))).await.unwrap();
    assert!(v.timers.deadline.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_pause_and_resume_on_use() {
    let (s, _d) = service().await;
    let alice = who("alice");
    s.create(&alice, idle_after("web", "5m")).await.unwrap();
    s.create(&alice, new("plain")).await.unwrap();

    reap_after(&s, 200).await;
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Running));
    reap_after(&s, 301).await;
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Paused));
    assert_eq!(state(&s, "alice/plain").await, Some(VmState::Running));
    assert_eq!(count(&s.metrics.auto_paused_total), 1);

    // A file access resumes it; several at once resume it once.
    let mut asks = Vec::new();
    for _ in 0..4 {
        let (s, alice) = (s.clone(), alice.clone());
        asks.push(tokio::spawn(async move {
            s.agent(&alice, "web").await.map(|_| ())
        }));
    }
    for a in asks {
        a.await.unwrap().unwrap();
    }
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Running));
    assert_eq!(count(&s.metrics.auto_resumed_total), 1);

    // A process in progress keeps it running, however long; its end counts as a use.
    let mut run = s
        .exec(
            &alice,
            "web",
            ExecVm {
                argv: vec!["sleep".into(), "1000".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(matches!(
        run.next().await,
        Ok(Some(crate::agent::ExecEvent::Started { .. }))
    ));
    reap_after(&s, 10_000).await;
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Running));
    drop(run);
    reap_after(&s, 290).await;
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Running));
    reap_after(&s, 301).await;
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Paused));

    // An exec resumes it too, and runs.
    let mut run = s
        .exec(
            &alice,
            "web",
            ExecVm {
                argv: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(run.next().await.unwrap().is_some());
    drop(run);
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Running));
    assert_eq!(count(&s.metrics.auto_resumed_total), 2);

    // A VM paused by hand without auto-pause stays paused: 409, as before.
    s.pause(&alice, "plain").await.unwrap();
    for r in [
        s.agent(&alice, "plain").await.map(|_| ()),
        s.exec(
            &alice,
            "plain",
            ExecVm {
                argv: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .map(|_| ()),
    ] {
        assert!(
            matches!(&r, Err(ApiError::Conflict(m)) if m.contains("paused")),
            "{r:?}"
        );
    }
    assert_eq!(state(&s, "alice/plain").await, Some(VmState::Paused));
    // Another account's use neither finds nor wakes it.
    s.pause(&alice, "web").await.unwrap();
    let r = s.agent(&who("bob"), "alice/web").await.map(|_| ());
    assert!(matches!(r, Err(ApiError::NotFound { .. })), "{r:?}");
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Paused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_restarts_the_idle_time() {
    let (s, _d) = service().await;
    let alice = who("alice");
    let vm = s.create(&alice, idle_after("web", "1m")).await.unwrap();
    // Long after its start, but used just now: idle from the touch on.
    s.touch(&vm.id);
    let (later, now) = (hutch_core::now() + 3600, Instant::now());
    for h in s.reap(later, now + Duration::from_secs(59)) {
        h.await.unwrap();
    }
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Running));
    for h in s.reap(later, now + Duration::from_secs(61)) {
        h.await.unwrap();
    }
    assert_eq!(state(&s, "alice/web").await, Some(VmState::Paused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_outlive_a_restart_and_idle_time_starts_again() {
    let d = tempfile::tempdir().unwrap();
    let kv: Arc<dyn hutch_store::kv::Store> = Arc::new(MemoryStore::new());
    let (a, _vmm) = fake_service(d.path(), kv.clone(), Admission::default()).await;
    add_image(&a, "busybox:latest").await;
    let admin = Caller::local_admin();
    a.create(&admin, with_ttl("web", "1h", None)).await.unwrap();
    a.create(&admin, idle_after("dev", "1m")).await.unwrap();
    // hutchd again, on the same store: it knows the deadline, and nothing has been idle yet.
    let (b, _vmm) = fake_service(d.path(), kv, Admission::default()).await;
    let dev = b.get("dev").await.unwrap();
    let later = Instant::now() + Duration::from_secs(3601);
    assert!(
        b.activity
            .idle(&dev, hutch_core::now() + 3601, Instant::now())
            < Duration::from_secs(1)
    );
    assert!(b.activity.idle(&dev, hutch_core::now() + 3601, later) >= Duration::from_secs(3600));
    for h in b.reap(hutch_core::now() + 3601, Instant::now()) {
        h.await.unwrap();
    }
    assert_eq!(state(&b, "web").await, None);
    assert_eq!(state(&b, "dev").await, Some(VmState::Running));
}
