//! Throughput of single-transaction creates (`when(Absent(k)).put(k, v)`, each key new) with 1, 10
//! and 100 concurrent clients, on the memory and redb backends.
//!
//! `cargo run --release -p hutch-store --example txn_bench [seconds-per-run] [dir]`
//! (the redb file goes in `dir`, default the system temp dir: put it on the disk to measure).

use hutch_store::kv::{Compare, MemoryStore, RedbStore, Store, Txn};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn run(store: Arc<dyn Store>, clients: usize, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let store = store.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let key = format!("bench/{c}/{i}");
                    let value = format!("{{\"client\":{c},\"n\":{i}}}");
                    let txn = Txn::new()
                        .when(Compare::Absent(key.clone()))
                        .put(key, value);
                    match store.txn(txn).await {
                        Ok(o) if o.is_committed() => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("create failed: {other:?}"),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3.0);
    let dir = match args.next() {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("backend  clients  txns/s");
    for clients in [1, 10, 100] {
        let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let rate = rt.block_on(run(memory, clients, secs));
        println!("memory   {clients:>7}  {rate:>8.0}");
    }
    for clients in [1, 10, 100] {
        let path = dir.path().join(format!("bench-{clients}.redb"));
        let redb: Arc<dyn Store> = Arc::new(RedbStore::open(&path).expect("open"));
        let rate = rt.block_on(run(redb.clone(), clients, secs));
        let revision = rt.block_on(redb.revision()).expect("revision");
        println!("redb     {clients:>7}  {rate:>8.0}   ({revision} revisions in the file)");
    }
}
