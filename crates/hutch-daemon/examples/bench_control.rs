//! `make bench-control`: the control plane alone — the real service, records, admission,
//! lifecycle and locks on the redb store (group commit, fsync), over the fake VMM and fake
//! agents (no QEMU) — creating VMs from 1, 10 and 100 concurrent clients. Prints creates/s and
//! p50/p99 latency per level, and `control plane creates/s: N` for 10 clients.
//!
//! Usage: bench_control [SECONDS_PER_LEVEL] (default 3). The state store (redb, durable
//! commits) is in a temp dir under HUTCH_BENCH_STORE_DIR (default /tmp, on disk); the node's VM
//! directories (the fake disks and record copies the node runtime writes and flushes for every
//! VM) are under HUTCH_BENCH_DIR (default /dev/shm), so what is measured is the control plane,
//! not the node's file system. Both are removed at the end. HUTCH_BENCH_STORE=memory runs the
//! same on the in-memory store (the baseline: the control plane without durable commits).

use hutch_daemon::service::testing::{bench_service, create_load};
use hutch_store::kv::RedbStore;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let base = std::env::var("HUTCH_BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let dir = tempfile::Builder::new()
        .prefix("hutch-bench-control")
        .tempdir_in(base)
        .expect("temp dir");
    let store_base = std::env::var("HUTCH_BENCH_STORE_DIR").unwrap_or_else(|_| "/tmp".into());
    let store_dir = tempfile::Builder::new()
        .prefix("hutch-bench-store")
        .tempdir_in(store_base)
        .expect("temp dir");
    let memory = std::env::var("HUTCH_BENCH_STORE").is_ok_and(|s| s == "memory");
    let kv: Arc<dyn hutch_store::kv::Store> = if memory {
        Arc::new(hutch_store::kv::MemoryStore::new())
    } else {
        Arc::new(RedbStore::open(&store_dir.path().join("state.redb")).expect("redb"))
    };
    let s = bench_service(dir.path(), kv).await;
    println!(
        "control plane: real service + {} store, fake VMM and agents; {secs} s per level",
        if memory { "in-memory" } else { "redb" }
    );
    let seq = Arc::new(AtomicU64::new(0));
    let mut at_ten = 0.0;
    for clients in [1usize, 10, 100] {
        let t0 = Instant::now();
        let mut lat = create_load(&s, clients, Duration::from_secs(secs), &seq).await;
        let elapsed = t0.elapsed().as_secs_f64();
        lat.sort();
        let rate = lat.len() as f64 / elapsed;
        if clients == 10 {
            at_ten = rate;
        }
        println!(
            "clients {clients:>3}: {:>6} creates in {elapsed:.2} s = {rate:>7.0} creates/s, p50 {:.2} ms, p99 {:.2} ms",
            lat.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
    }
    println!("control plane creates/s: {at_ten:.0}");
}
