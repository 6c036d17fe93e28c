//! Shared test harness: a real etcd per test (or `ETCD_ENDPOINTS`), unique key prefixes,
//! and waiting on conditions with deadlines instead of sleeping.
#![allow(dead_code)]

pub mod occupancy;

use std::future::Future;
use std::time::Duration;

use etcd_coord::etcd_client::{Client, GetOptions};
use etcd_coord::testing::EtcdCluster;
use etcd_coord::{Connect, Session};

/// Installs a tracing subscriber once (respects `RUST_LOG`), so failing tests can be rerun
/// with logs.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A single-member etcd (or the external one from `ETCD_ENDPOINTS`) and a connected client.
pub async fn single() -> (EtcdCluster, Client) {
    cluster(1).await
}

pub async fn cluster(members: usize) -> (EtcdCluster, Client) {
    init_tracing();
    let cluster = EtcdCluster::from_env_or_start(members)
        .await
        .expect("start etcd");
    let client = connect(&cluster).await;
    (cluster, client)
}

pub async fn connect(cluster: &EtcdCluster) -> Client {
    Connect::new(cluster.endpoints())
        .connect()
        .await
        .expect("connect to etcd")
}

/// A key prefix no other test uses, so tests can share one server.
pub fn unique(name: &str) -> String {
    format!("test/{}/{name}", uuid::Uuid::new_v4().simple())
}

pub async fn session(client: &Client, ttl_s: u64) -> Session {
    Session::builder(client.clone())
        .ttl(Duration::from_secs(ttl_s))
        .build()
        .await
        .expect("session")
}

/// Polls `cond` every 20 ms until it is true; panics with `what` after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bounds a future; panics with `what` if it does not finish in time.
pub async fn within<T>(deadline: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {deadline:?}: {what}"))
}

/// The keys under `prefix` right now.
pub async fn keys(client: &Client, prefix: &str) -> Vec<String> {
    let mut c = client.clone();
    c.get(
        prefix,
        Some(GetOptions::new().with_prefix().with_keys_only()),
    )
    .await
    .expect("range")
    .kvs()
    .iter()
    .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
    .collect()
}

/// Waits until exactly `n` keys are under `prefix`; panics with `what` after `deadline`.
pub async fn key_count_becomes(
    client: &Client,
    prefix: &str,
    n: usize,
    deadline: Duration,
    what: &str,
) {
    eventually(deadline, what, || async {
        keys(client, prefix).await.len() == n
    })
    .await;
}

/// Skips (returns true and says why) when the cluster is not started by this process.
pub fn skip_unless_local(cluster: &EtcdCluster, test: &str) -> bool {
    match cluster.require_local() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipped {test}: {why}");
            true
        }
    }
}

/// Requests handled by member 0 while `f` runs, by method.
pub async fn requests<F: Future<Output = T>, T>(
    etcd: &EtcdCluster,
    f: F,
) -> (T, etcd_coord::testing::Metrics) {
    let before = etcd.metrics(0).await.unwrap();
    let out = f.await;
    let after = etcd.metrics(0).await.unwrap();
    (out, after.since(&before))
}
