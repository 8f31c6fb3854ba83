//! hutch's state store on etcd: [`EtcdStore`] implements `hutch_store::kv::Store` over an etcd
//! cluster (v3 API, etcd >= 3.4), so that every hutchd of a cluster shares one replicated state.
//! It maps the model as the `hutch_store` crate docs describe ("Mapping onto etcd"); this crate
//! adds what only a cluster needs:
//!
//! - **A namespace**: every key lives under [`EtcdOptions::namespace`] (`hutch/` by default), so
//!   one etcd can serve other users, or several hutch clusters.
//! - **History**: etcd keeps every revision until it is compacted. hutch compacts it itself, to
//!   the latest [`EtcdOptions::history_revisions`] (between that many and twice as many are
//!   kept), so that a watch from too far back is `Compacted` as on the local backends. Several
//!   hutchd compacting one etcd is harmless: a compaction that another one passed is ignored.
//! - **Watches that survive**: a watch follows its prefix across a lost connection or a lost etcd
//!   member, resuming from the revision after the last one it delivered (never a gap, never a
//!   repeat); only compaction ends it (`Compacted`).
//! - **Leases** ([`lease`]): a lease with a TTL, kept alive by a task, and keys bound to it that
//!   etcd deletes when it expires: node membership in a hutch cluster.
//! - [`testing`] (feature `testing`): real etcd members on loopback, for tests.

pub mod lease;
#[cfg(feature = "testing")]
pub mod testing;
mod watch;

use etcd_client::{
    Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions,
    PutOptions, Txn as EtcdTxn, TxnOp,
};
use hutch_store::kv::{
    Compare, KeyValue, Op, Revision, Snapshot, Store, StoreError, Txn, TxnOutcome, Watcher,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use lease::{Lease, LeaseState};

/// The default namespace: every key of hutch's lives under it.
pub const NAMESPACE: &str = "hutch/";

/// How a range is paged: at most this many keys per etcd request (each page read at the
/// revision of the first, so the pages form one snapshot).
const PAGE: i64 = 500;

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs (`http://10.0.0.1:2379`, `https://...` for TLS).
    pub endpoints: Vec<String>,
    /// Prefix of every key.
    pub namespace: String,
    /// Compact etcd's history to this many revisions (0: never compact; etcd's own
    /// `--auto-compaction-*` then bounds it).
    pub history_revisions: u64,
    /// etcd's user name and password (etcd's `auth enable`).
    pub user: Option<(String, String)>,
    /// TLS: the CA that signed the members' certificates (PEM).
    pub ca: Option<PathBuf>,
    /// TLS client certificate and key (PEM), for members that check client certificates.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Bound on every unary request (a transaction that timed out may still have committed).
    pub request_timeout: Duration,
    /// Bound on connecting to an endpoint.
    pub connect_timeout: Duration,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            namespace: NAMESPACE.to_string(),
            history_revisions: 50_000,
            user: None,
            ca: None,
            identity: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Splits a `--etcd` value (`URL[,URL...]`) into endpoints.
    pub fn parse_endpoints(s: &str) -> Result<Vec<String>, StoreError> {
        let eps: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        if eps.is_empty() {
            return Err(StoreError::db_msg("etcd endpoints", "no endpoint given"));
        }
        for e in &eps {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(StoreError::db_msg(
                    "etcd endpoints",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        Ok(eps)
    }
}

/// The revisioned store on etcd. Cheap to clone (one connection, shared).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    ns: String,
    history: u64,
    timeout: Duration,
    /// The revision this process last compacted to.
    compacted: std::sync::Arc<AtomicU64>,
}

fn db(context: &'static str, e: etcd_client::Error) -> StoreError {
    StoreError::db(context, e)
}

/// The first key after every key starting with `prefix` (etcd's range end); `\0` (everything)
/// for an empty prefix or one of only 0xff bytes.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn rev(r: i64) -> Revision {
    u64::try_from(r).unwrap_or(0)
}

fn irev(r: Revision) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

impl EtcdStore {
    /// Connects to etcd (the endpoints are tried in turn; requests go to any member that
    /// answers) and checks that it answers.
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdStore, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::db_msg("etcd connect", "no endpoint given"));
        }
        let mut co = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(Duration::from_secs(3), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some((user, password)) = &opts.user {
            co = co
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if opts.ca.is_some() || opts.identity.is_some() {
            co = co.with_tls(tls(opts)?);
        }
        let connect = Client::connect(opts.endpoints.clone(), Some(co));
        let client = match tokio::time::timeout(opts.request_timeout, connect).await {
            Ok(r) => r.map_err(|e| db("etcd connect", e))?,
            Err(_) => {
                return Err(StoreError::db_msg(
                    "etcd connect",
                    format!(
                        "no answer from {} within {:?}",
                        opts.endpoints.join(","),
                        opts.request_timeout
                    ),
                ))
            }
        };
        let store = EtcdStore {
            client,
            ns: opts.namespace.clone(),
            history: opts.history_revisions,
            timeout: opts.request_timeout,
            compacted: Default::default(),
        };
        store.revision().await?;
        Ok(store)
    }

    /// The etcd client (leases and membership use it; keys must go through [`Self::key`]).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The etcd key of a store key.
    pub fn key(&self, key: &str) -> Vec<u8> {
        let mut k = self.ns.as_bytes().to_vec();
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The store key of an etcd key (None for a key outside the namespace or not UTF-8).
    fn strip(&self, key: &[u8]) -> Option<String> {
        let rest = key.strip_prefix(self.ns.as_bytes())?;
        String::from_utf8(rest.to_vec()).ok()
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let key = self.strip(kv.key()).ok_or_else(|| {
            StoreError::db_msg(
                "etcd",
                format!("key {:?} outside the namespace", kv.key_str()),
            )
        })?;
        Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: rev(kv.create_revision()),
            mod_revision: rev(kv.mod_revision()),
        })
    }

    /// Runs one unary request, made anew by `f` for each try, within the request timeout:
    /// errors that say etcd could not serve it now (no leader yet, a member gone, a connection
    /// cut) are retried with backoff. Also says whether a try failed before the answer: a
    /// transaction's first try may then have committed.
    async fn call<T, F, Fut>(
        &self,
        context: &'static str,
        mut f: F,
    ) -> (Result<T, StoreError>, bool)
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(50);
        let mut retried = false;
        loop {
            match tokio::time::timeout_at(deadline, f(self.client.clone())).await {
                Ok(Ok(v)) => return (Ok(v), retried),
                Ok(Err(e)) if retryable(&e) && tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!("{context}: {e}; retrying");
                    retried = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Ok(Err(e)) => return (Err(db(context, e)), retried),
                Err(_) => {
                    let e = StoreError::db_msg(
                        context,
                        format!("etcd did not answer within {:?}", self.timeout),
                    );
                    return (Err(e), true);
                }
            }
        }
    }

    /// [`Self::call`] for requests that change nothing, or may be repeated.
    pub(crate) async fn request<T, F, Fut>(
        &self,
        context: &'static str,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call(context, f).await.0
    }

    /// A range read of `[from, end)` at `revision` (0: the current one); the keys, whether
    /// there are more, and the revision read.
    async fn page(
        &self,
        from: Vec<u8>,
        end: Vec<u8>,
        revision: Revision,
    ) -> Result<(Vec<KeyValue>, bool, Revision), StoreError> {
        let mut opts = GetOptions::new().with_range(end).with_limit(PAGE);
        if revision > 0 {
            opts = opts.with_revision(irev(revision));
        }
        let resp = self
            .request("etcd range", |mut c| {
                let (from, opts) = (from.clone(), opts.clone());
                async move { c.get(from, Some(opts)).await }
            })
            .await?;
        let at = rev(resp.header().map(|h| h.revision()).unwrap_or(0));
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| self.kv(kv))
            .collect::<Result<_, _>>()?;
        Ok((kvs, resp.more(), at))
    }

    /// Compacts etcd's history once it holds twice [`EtcdOptions::history_revisions`] since the
    /// last compaction of this process.
    async fn maybe_compact(&self, current: Revision) {
        if self.history == 0 {
            return;
        }
        let last = self.compacted.load(Ordering::SeqCst);
        if current < last + 2 * self.history {
            return;
        }
        let to = current - self.history;
        if self
            .compacted
            .compare_exchange(last, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return; // another task of this process compacts
        }
        let r = self
            .request("etcd compact", |mut c| async move {
                c.compact(irev(to), Some(CompactionOptions::new())).await
            })
            .await;
        if let Err(e) = r {
            // Usually another hutchd compacted further already.
            tracing::debug!("etcd compaction to {to}: {e}");
        }
    }

    /// Runs a transaction; with a lease, every put binds its key to the lease (etcd deletes
    /// them when it expires).
    pub async fn run_txn(&self, txn: Txn, lease: Option<i64>) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => EtcdCompare::version(self.key(k), CompareOp::Equal, 0),
                Compare::Exists(k) => EtcdCompare::version(self.key(k), CompareOp::Greater, 0),
                Compare::ModRevision(k, r) => {
                    EtcdCompare::mod_revision(self.key(k), CompareOp::Equal, irev(*r))
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|o| match o {
                Op::Put { key, value } => TxnOp::put(
                    self.key(key),
                    value.clone(),
                    lease.map(|l| PutOptions::new().with_lease(l)),
                ),
                Op::Delete { key } => TxnOp::delete(self.key(key), None),
            })
            .collect();
        let etxn = EtcdTxn::new().when(compares).and_then(ops);
        let (resp, retried) = self
            .call("etcd txn", |mut c| {
                let etxn = etxn.clone();
                async move { c.txn(etxn).await }
            })
            .await;
        let resp = resp?;
        let at = rev(resp.header().map(|h| h.revision()).unwrap_or(0));
        if resp.succeeded() {
            self.maybe_compact(at).await;
            return Ok(TxnOutcome::Committed { revision: at });
        }
        if retried {
            // A try that failed may have committed, and made this one's compares fail.
            if let Some(revision) = self.applied(&txn).await? {
                return Ok(TxnOutcome::Committed { revision });
            }
        }
        Ok(TxnOutcome::Failed {
            key: self.failed_compare(&txn, at).await?,
        })
    }

    /// Whether the transaction's writes are all in place (every put's key holds its value,
    /// every deleted key is absent): the revision they were written at, when they are.
    async fn applied(&self, txn: &Txn) -> Result<Option<Revision>, StoreError> {
        let mut at = 0;
        for op in &txn.ops {
            let now = self.get(op.key()).await?;
            match (op, now) {
                (Op::Put { value, .. }, Some(kv)) if kv.value == *value => {
                    at = at.max(kv.mod_revision)
                }
                (Op::Delete { .. }, None) => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(if at > 0 { at } else { self.revision().await? }))
    }

    /// Which compare of a failed transaction did not hold, read at the revision it was
    /// evaluated at.
    async fn failed_compare(&self, txn: &Txn, at: Revision) -> Result<String, StoreError> {
        for c in &txn.compares {
            let key = self.key(c.key());
            let opts = GetOptions::new().with_keys_only().with_revision(irev(at));
            let r = self
                .request("etcd get", |mut client| {
                    let (key, opts) = (key.clone(), opts.clone());
                    async move { client.get(key, Some(opts)).await }
                })
                .await;
            let current = match r {
                Ok(resp) => resp.kvs().first().map(|kv| rev(kv.mod_revision())),
                // Compacted meanwhile: the current value tells as well.
                Err(_) => self.get(c.key()).await?.map(|kv| kv.mod_revision),
            };
            if !c.holds_for(current) {
                return Ok(c.key().to_string());
            }
        }
        Ok(txn
            .compares
            .first()
            .map(|c| c.key().to_string())
            .unwrap_or_default())
    }
}

/// Whether etcd could not serve a request now but may soon (an election, a lost member, a cut
/// connection). `Cancelled` is a request whose connection closed under it (its member died):
/// this client never cancels a request it still waits for, and a transaction's unknown outcome
/// is judged before it is retried.
fn retryable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::Cancelled
            ) && !s.message().contains("permission denied")
        }
        E::TransportError(_) | E::IoError(_) => true,
        _ => false,
    }
}

/// The TLS settings of the options.
fn tls(opts: &EtcdOptions) -> Result<etcd_client::TlsOptions, StoreError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| StoreError::db("etcd TLS file", PathError(p.clone(), e)))
    };
    let mut t = etcd_client::TlsOptions::new();
    if let Some(ca) = &opts.ca {
        t = t.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key)) = &opts.identity {
        t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(t)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}: {1}")]
struct PathError(PathBuf, #[source] std::io::Error);

/// `Compare::holds` for a key whose mod revision is `current` (the store crate keeps its own
/// crate-private).
trait Holds {
    fn holds_for(&self, current: Option<Revision>) -> bool;
}

impl Holds for Compare {
    fn holds_for(&self, current: Option<Revision>) -> bool {
        match self {
            Compare::Absent(_) => current.is_none(),
            Compare::Exists(_) => current.is_some(),
            Compare::ModRevision(_, r) => current.unwrap_or(0) == *r,
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let k = self.key(key);
        let resp = self
            .request("etcd get", |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        resp.kvs().first().map(|kv| self.kv(kv)).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let start = self.key(prefix);
        let end = prefix_end(&start);
        let (mut kvs, mut more, at) = self.page(start, end.clone(), 0).await?;
        while more {
            let Some(last) = kvs.last() else { break };
            let mut from = self.key(&last.key);
            from.push(0);
            let (page, m, _) = self.page(from, end.clone(), at).await?;
            kvs.extend(page);
            more = m;
        }
        Ok(Snapshot { kvs, revision: at })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.run_txn(txn, None).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watcher, StoreError> {
        watch::start(self.clone(), prefix, after).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let k = self.key("");
        let opts = GetOptions::new().with_count_only();
        let resp = self
            .request("etcd revision", |mut c| {
                let (k, opts) = (k.clone(), opts.clone());
                async move { c.get(k, Some(opts)).await }
            })
            .await?;
        Ok(rev(resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_retried() {
        let status = |s: tonic::Status| etcd_client::Error::GRpcStatus(s);
        // A lost member: the request's connection closed under it, or no leader yet.
        assert!(retryable(&status(tonic::Status::cancelled(
            "operation was canceled"
        ))));
        assert!(retryable(&status(tonic::Status::unavailable("no leader"))));
        // What another try cannot mend.
        assert!(!retryable(&status(tonic::Status::unavailable(
            "permission denied"
        ))));
        assert!(!retryable(&status(tonic::Status::invalid_argument(
            "bad key"
        ))));
        assert!(!retryable(&status(tonic::Status::failed_precondition(
            "compacted"
        ))));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"hutch/"), b"hutch0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_are_urls() {
        assert_eq!(
            EtcdOptions::parse_endpoints("http://a:1, https://b:2,").unwrap(),
            vec!["http://a:1".to_string(), "https://b:2".to_string()]
        );
        assert!(EtcdOptions::parse_endpoints("").is_err());
        assert!(EtcdOptions::parse_endpoints("a:1").is_err());
    }
}
