//! `make bench-cluster`: what the cluster's store costs and how fast a dead node is seen.
//!
//! 1. Control-plane creates/s (the real service over the fake VMM and agents, 10 clients,
//!    SECONDS each) on a 3-member etcd (real members on loopback, fsync on) against the
//!    single node's redb, run side by side on this machine: the ratio is the figure.
//! 2. Time to detect a dead node: a node's membership lease (TTL 3 s, renewed every second as
//!    hutchd does) whose holder dies without revoking it; the time from its death to another
//!    node's watch seeing its `live/` key go, over several runs.
//!
//! Usage: bench_cluster [SECONDS] (default 5). Needs Debian's etcd-server.

use hutch_daemon::service::testing::{bench_service, create_load};
use hutch_store::kv::{EventKind, Store, Txn};
use hutch_store_etcd::testing::EtcdCluster;
use hutch_store_etcd::{EtcdOptions, EtcdStore};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn rate(kv: Arc<dyn Store>, secs: u64, what: &str) -> f64 {
    let dir = tempfile::Builder::new()
        .prefix("hutch-bench-cluster")
        .tempdir_in("/dev/shm")
        .expect("temp dir");
    let s = bench_service(dir.path(), kv).await;
    let t0 = Instant::now();
    let lat = create_load(
        &s,
        10,
        Duration::from_secs(secs),
        &Arc::new(AtomicU64::new(0)),
    )
    .await;
    let r = lat.len() as f64 / t0.elapsed().as_secs_f64();
    let mut l = lat;
    l.sort();
    println!(
        "{what:<24} {r:>7.0} creates/s (10 clients), p50 {:.1} ms, p99 {:.1} ms",
        l[l.len() / 2].as_secs_f64() * 1000.0,
        l[l.len() * 99 / 100].as_secs_f64() * 1000.0
    );
    r
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let etcd = EtcdCluster::start(3).await;
    let connect = |ns: &str| {
        let mut o = EtcdOptions::new(etcd.endpoints());
        o.namespace = ns.to_string();
        async move { EtcdStore::connect(&o).await.expect("etcd") }
    };
    let store_dir = tempfile::Builder::new()
        .prefix("hutch-bench-store")
        .tempdir_in("/tmp")
        .expect("temp dir");
    println!("control plane on the fake VMM: 3-member etcd vs single-node redb, {secs} s each");
    let redb =
        hutch_store::kv::RedbStore::open(&store_dir.path().join("state.redb")).expect("redb");
    let r_redb = rate(Arc::new(redb), secs, "redb (single node)").await;
    let r_etcd = rate(Arc::new(connect("bench/").await), secs, "etcd (3 members)").await;
    println!("etcd / redb: {:.2}x", r_etcd / r_redb);

    println!("dead node detection: lease TTL 3 s, renewed every 1 s");
    let watcher = connect("detect/").await;
    let mut took = Vec::new();
    for i in 0..5 {
        let holder = connect("detect/").await;
        let lease = holder.grant(Duration::from_secs(3)).await.expect("lease");
        let key = format!("live/n{i}");
        let out = holder
            .run_txn(Txn::new().put(key.clone(), "x"), Some(lease.id()))
            .await
            .expect("put");
        let mut w = watcher
            .watch(&key, out.revision().unwrap_or(0))
            .await
            .expect("watch");
        // Renewed for a while, then its holder dies (no revoke).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        drop(lease);
        let died = Instant::now();
        loop {
            let e = w.next().await.expect("watch");
            if e.kind == EventKind::Delete {
                break;
            }
        }
        let t = died.elapsed();
        println!("  run {}: down after {:.2} s", i + 1, t.as_secs_f64());
        took.push(t);
    }
    took.sort();
    println!(
        "dead node seen after: p50 {:.2} s, max {:.2} s (TTL 3 s)",
        took[2].as_secs_f64(),
        took[4].as_secs_f64()
    );
}
