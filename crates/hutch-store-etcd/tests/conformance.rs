//! The store's conformance suite (hutch_store::conformance) against real etcd: each case on a
//! fresh single-member etcd (the cases count revisions exactly, so they cannot share one), the
//! whole suite once on a 3-member cluster, and what only a replicated store must do: go on when
//! a member dies, resume watches across it, and keep leases.

use hutch_store::conformance::{Backend, Instance};
use hutch_store::kv::{Store, StoreExt, Txn};
use hutch_store_etcd::testing::EtcdCluster;
use hutch_store_etcd::{EtcdOptions, EtcdStore, LeaseState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fresh etcd member per store; `reopen` restarts the member on its data directory.
struct OneMember {
    clusters: Mutex<Vec<EtcdCluster>>,
}

impl OneMember {
    fn new() -> OneMember {
        OneMember {
            clusters: Mutex::new(Vec::new()),
        }
    }
}

async fn connect(endpoints: Vec<String>, history: u64) -> EtcdStore {
    let mut o = EtcdOptions::new(endpoints);
    o.history_revisions = history;
    EtcdStore::connect(&o).await.expect("connect to etcd")
}

#[async_trait::async_trait]
impl Backend for OneMember {
    async fn fresh(&self, history: u64) -> Instance {
        let c = EtcdCluster::start(1).await;
        let store = connect(c.endpoints(), history).await;
        let mut cs = self.clusters.lock().unwrap();
        cs.push(c);
        Instance {
            store: Arc::new(store),
            locator: (cs.len() - 1).to_string(),
        }
    }

    async fn reopen(&self, instance: Instance) -> Option<Instance> {
        let Instance { store, locator } = instance;
        assert_eq!(Arc::strong_count(&store), 1, "reopen needs the last handle");
        drop(store);
        let i: usize = locator.parse().unwrap();
        let mut c = self.clusters.lock().unwrap().remove(i);
        c.restart(0).await;
        let store = connect(c.endpoints(), 1000).await;
        self.clusters.lock().unwrap().insert(i, c);
        Some(Instance {
            store: Arc::new(store),
            locator,
        })
    }
}

mod one_member {
    hutch_store::conformance_tests!(super::OneMember::new());
}

/// The whole suite on one 3-member cluster, each case in its own namespace (run one after the
/// other, so revisions still count exactly).
struct ThreeMembers {
    cluster: EtcdCluster,
    n: Mutex<usize>,
}

#[async_trait::async_trait]
impl Backend for ThreeMembers {
    async fn fresh(&self, history: u64) -> Instance {
        let ns = {
            let mut n = self.n.lock().unwrap();
            *n += 1;
            format!("case{n}/")
        };
        let mut o = EtcdOptions::new(self.cluster.endpoints());
        o.history_revisions = history;
        o.namespace = ns.clone();
        Instance {
            store: Arc::new(EtcdStore::connect(&o).await.expect("connect")),
            locator: ns,
        }
    }

    async fn reopen(&self, instance: Instance) -> Option<Instance> {
        let Instance { store, locator } = instance;
        drop(store);
        let mut o = EtcdOptions::new(self.cluster.endpoints());
        o.namespace = locator.clone();
        Some(Instance {
            store: Arc::new(EtcdStore::connect(&o).await.expect("reconnect")),
            locator,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_on_three_members() {
    let b = ThreeMembers {
        cluster: EtcdCluster::start(3).await,
        n: Mutex::new(0),
    };
    hutch_store::conformance::run_all(&b).await;
}

/// A 3-member cluster that loses a member keeps serving reads, writes and watches; a watch
/// whose connection went to the dead member resumes from where it was, without a gap or a
/// repeat, and gets the writes made while it was cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_member_loses_nothing() {
    let mut c = EtcdCluster::start(3).await;
    // Watch through member 0 only, so that killing it breaks the watch.
    let watch_store = connect(vec![c.endpoint(0)], 0).await;
    let store = connect(vec![c.endpoint(1), c.endpoint(2)], 0).await;
    let r0 = store.revision().await.unwrap();
    let mut w = watch_store.watch("k/", r0).await.unwrap();
    for i in 0..5 {
        store
            .txn(Txn::new().put(format!("k/{i}"), "v"))
            .await
            .unwrap();
    }
    for i in 0..5 {
        let e = tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .expect("event in time")
            .unwrap();
        assert_eq!(e.key, format!("k/{i}"));
    }
    c.kill(0);
    for i in 5..10 {
        store
            .txn(Txn::new().put(format!("k/{i}"), "v"))
            .await
            .expect("writes go on with 2 of 3 members");
    }
    assert_eq!(store.range("k/").await.unwrap().kvs.len(), 10);
    // The watch resumes once its member is back.
    c.restart(0).await;
    let mut last = 0;
    for i in 5..10 {
        let e = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("resumed event in time")
            .unwrap();
        assert_eq!(e.key, format!("k/{i}"), "no gap, no repeat");
        assert!(e.revision > last);
        last = e.revision;
    }
    // A client that knows every member never noticed.
    let all = connect(c.endpoints(), 0).await;
    c.kill(1);
    all.txn(Txn::new().put_json("k/after", &1).unwrap())
        .await
        .expect("write after a loss");
    assert_eq!(
        all.get_json::<i32>("k/after").await.unwrap().unwrap().value,
        1
    );
}

/// A kept lease keeps its keys; a dropped one (its holder died) loses them within the TTL; a
/// revoked one at once. A holder cut off from etcd sees its lease lost by its own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_keep_and_lose_their_keys() {
    let mut c = EtcdCluster::start(1).await;
    let store = connect(c.endpoints(), 0).await;
    let kept = store.grant(Duration::from_secs(2)).await.unwrap();
    let dropped = store.grant(Duration::from_secs(2)).await.unwrap();
    let revoked = store.grant(Duration::from_secs(2)).await.unwrap();
    for (k, l) in [
        ("n/kept", &kept),
        ("n/dropped", &dropped),
        ("n/revoked", &revoked),
    ] {
        let out = store
            .run_txn(Txn::new().put(k, "x"), Some(l.id()))
            .await
            .unwrap();
        assert!(out.is_committed());
    }
    revoked.revoke().await.unwrap();
    assert!(store.get("n/revoked").await.unwrap().is_none());
    drop(dropped);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(store.get("n/kept").await.unwrap().is_some(), "kept alive");
    assert!(store.get("n/dropped").await.unwrap().is_none(), "expired");
    assert!(kept.is_alive());
    // Cut off: etcd is gone; the holder gives the lease up by its deadline.
    let mut states = kept.subscribe();
    c.kill(0);
    let lost = tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == LeaseState::Lost),
    )
    .await;
    assert!(lost.is_ok(), "lease still alive 5 s after etcd died");
}

/// Bad endpoints and unreachable etcd are clear errors, within the timeouts.
#[tokio::test]
async fn unreachable_etcd_is_an_error() {
    assert!(EtcdOptions::parse_endpoints("127.0.0.1:2379").is_err());
    let mut o = EtcdOptions::new(vec!["http://127.0.0.1:1".into()]);
    o.request_timeout = Duration::from_secs(2);
    o.connect_timeout = Duration::from_secs(1);
    let t = std::time::Instant::now();
    let err = match EtcdStore::connect(&o).await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e,
    };
    assert!(t.elapsed() < Duration::from_secs(10), "{err}");
}
