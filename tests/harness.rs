//! Tests of the `testing` harness itself, against real etcd processes.
#![cfg(feature = "testing")]

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::Client;
use etcd_coord::testing::{ClusterOptions, EtcdCluster, Metrics};

const DEBIAN_ETCD: &str = "/usr/bin/etcd";

/// Runs a whole test body with an upper bound.
async fn bounded<F: Future<Output = ()>>(secs: u64, body: F) {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("test exceeded its time bound");
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn assert_gone_after_drop(pid: u32) {
    eventually(
        Duration::from_secs(5),
        "etcd process to disappear",
        || async move { !process_exists(pid) },
    )
    .await;
}

/// Retries a get of `key` on `client` (each try bounded) until it yields `value`.
async fn eventually_get(client: &mut Client, key: &str, value: &[u8], within: Duration) {
    let until = Instant::now() + within;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), client.get(key, None)).await;
        if let Ok(Ok(resp)) = attempt {
            if resp.kvs().first().map(|kv| kv.value()) == Some(value) {
                return;
            }
        }
        assert!(
            Instant::now() < until,
            "get {key} did not return {value:?} in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn round_trip(cluster: &EtcdCluster) {
    let mut client = cluster.client().await.expect("connect");
    client.put("harness/k", "v1", None).await.expect("put");
    let resp = client.get("harness/k", None).await.expect("get");
    assert_eq!(resp.kvs().len(), 1);
    assert_eq!(resp.kvs()[0].value(), b"v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_round_trip_version_metrics_and_cleanup() {
    bounded(90, async {
        let cluster = EtcdCluster::single().await.expect("start single member");
        assert!(!cluster.is_external());
        assert!(cluster.require_local().is_ok());
        assert_eq!(cluster.member_count(), 1);
        assert!(cluster.endpoint(0).starts_with("http://127.0.0.1:"));
        let pid = cluster.pid(0).expect("pid of running member");
        assert!(process_exists(pid));
        let data_dir = cluster.data_dir(0).expect("data dir");
        assert!(
            data_dir.join("member").is_dir(),
            "etcd created its data dir"
        );

        round_trip(&cluster).await;

        let version = cluster.version().await.expect("version");
        assert!(version.starts_with("3."), "version {version}");
        if std::env::var_os("ETCD_BIN").is_none() {
            // The default binary is the vendored etcd 3.7.
            assert!(version.starts_with("3.7."), "version {version}");
        }

        let mut client = cluster.client().await.expect("connect");
        let before = cluster.metrics(0).await.expect("metrics before");
        assert!(before.get("Put") >= 1, "the round trip's put is counted");
        let resp = client.get("harness/k", None).await.expect("get");
        assert_eq!(resp.kvs()[0].value(), b"v1");
        let after = cluster.metrics(0).await.expect("metrics after");
        let delta = after.since(&before);
        assert_eq!(
            delta.get("Range"),
            1,
            "exactly one Range: {:?}",
            delta.handled
        );
        assert_eq!(delta.get("Put"), 0);
        assert_eq!(
            delta.total(),
            1,
            "nothing else was handled: {:?}",
            delta.handled
        );
        assert!(after.counter("etcd_server_has_leader") >= 1.0);
        assert_eq!(
            delta.counter(r#"grpc_server_handled_total{grpc_method="Range",grpc_code="OK"}"#),
            1.0
        );

        drop(client);
        drop(cluster);
        assert_gone_after_drop(pid).await;
        assert!(!data_dir.exists(), "temporary directory removed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_leader_kill_and_restart() {
    bounded(150, async {
        let mut cluster = EtcdCluster::start(3).await.expect("start 3 members");
        assert_eq!(cluster.endpoints().len(), 3);
        let pids: Vec<u32> = (0..3).map(|i| cluster.pid(i).expect("pid")).collect();

        // Every member serves on its own endpoint.
        let mut client = cluster.client().await.expect("connect");
        client.put("harness/three", "1", None).await.expect("put");
        for i in 0..3 {
            let mut single = Client::connect([cluster.endpoint(i)], None)
                .await
                .expect("connect one member");
            eventually_get(&mut single, "harness/three", b"1", Duration::from_secs(10)).await;
        }

        let leader = cluster.leader_index().await.expect("leader");
        assert!(leader < 3);
        cluster.kill(leader).expect("kill leader");
        assert_eq!(cluster.pid(leader), None);
        assert!(!process_exists(pids[leader]));

        // A put through the all-endpoints client succeeds once a new leader is elected.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let put = tokio::time::timeout(
                Duration::from_secs(2),
                client.put("harness/three", "2", None),
            )
            .await;
            if let Ok(Ok(_)) = put {
                break;
            }
            assert!(Instant::now() < until, "put after leader kill: {put:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let new_leader = cluster.leader_index().await.expect("new leader");
        assert_ne!(new_leader, leader);

        cluster.restart(leader).await.expect("restart old leader");
        let restarted_pid = cluster.pid(leader).expect("restarted pid");
        assert_ne!(restarted_pid, pids[leader]);
        cluster
            .wait_ready(leader, Duration::from_secs(10))
            .await
            .expect("restarted member ready");
        let mut single = Client::connect([cluster.endpoint(leader)], None)
            .await
            .expect("connect restarted member");
        eventually_get(&mut single, "harness/three", b"2", Duration::from_secs(15)).await;

        drop(client);
        drop(single);
        let pids: Vec<u32> = (0..3).filter_map(|i| cluster.pid(i)).collect();
        assert_eq!(pids.len(), 3);
        drop(cluster);
        for pid in pids {
            assert_gone_after_drop(pid).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_blocks_requests_and_resume_unblocks() {
    bounded(90, async {
        let cluster = EtcdCluster::single().await.expect("start");
        let mut client = cluster.client().await.expect("connect");
        client.put("harness/p", "x", None).await.expect("put");

        cluster.pause(0).expect("pause");
        let stalled =
            tokio::time::timeout(Duration::from_millis(500), client.get("harness/p", None)).await;
        assert!(
            stalled.is_err(),
            "get on a paused member must hang: {stalled:?}"
        );

        cluster.resume(0).expect("resume");
        eventually_get(&mut client, "harness/p", b"x", Duration::from_secs(20)).await;

        // A paused member is still killed on drop.
        let pid = cluster.pid(0).expect("pid");
        cluster.pause(0).expect("pause again");
        drop(client);
        drop(cluster);
        assert_gone_after_drop(pid).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_restart_keep_data() {
    bounded(90, async {
        let mut cluster = EtcdCluster::single().await.expect("start");
        let data_dir = cluster.data_dir(0).expect("data dir");
        let endpoint = cluster.endpoint(0);
        {
            let mut client = cluster.client().await.expect("connect");
            client
                .put("harness/durable", "kept", None)
                .await
                .expect("put");
        }
        let old_pid = cluster.pid(0).expect("pid");
        cluster.stop(0).await.expect("stop");
        assert_eq!(cluster.pid(0), None);
        assert!(!process_exists(old_pid));
        cluster
            .stop(0)
            .await
            .expect("stopping a stopped member is a no-op");
        assert!(cluster.pause(0).is_err(), "cannot pause a stopped member");

        cluster.restart(0).await.expect("restart");
        assert_eq!(cluster.data_dir(0), Some(data_dir));
        assert_eq!(cluster.endpoint(0), endpoint, "same ports after restart");
        let mut client = cluster.client().await.expect("connect again");
        eventually_get(
            &mut client,
            "harness/durable",
            b"kept",
            Duration::from_secs(10),
        )
        .await;

        // restart() of a running member stops it first.
        let pid = cluster.pid(0).expect("pid");
        cluster.restart(0).await.expect("restart running member");
        assert_ne!(cluster.pid(0), Some(pid));
        eventually_get(
            &mut client,
            "harness/durable",
            b"kept",
            Duration::from_secs(10),
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_etcd_single_member() {
    if !Path::new(DEBIAN_ETCD).exists() {
        eprintln!("skipped: {DEBIAN_ETCD} does not exist");
        return;
    }
    bounded(90, async {
        let mut cluster = EtcdCluster::start_with(ClusterOptions::new(1).binary(DEBIAN_ETCD))
            .await
            .expect("start Debian etcd");
        round_trip(&cluster).await;
        let version = cluster.version().await.expect("version");
        assert!(version.starts_with("3."), "version {version}");
        let before = cluster.metrics(0).await.expect("metrics");
        let mut client = cluster.client().await.expect("connect");
        client.get("harness/k", None).await.expect("get");
        let delta = cluster.metrics(0).await.expect("metrics").since(&before);
        assert_eq!(delta.get("Range"), 1, "{:?}", delta.handled);
        cluster.stop(0).await.expect("stop");
        cluster.restart(0).await.expect("restart");
        eventually_get(&mut client, "harness/k", b"v1", Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_etcd_three_members() {
    if !Path::new(DEBIAN_ETCD).exists() {
        eprintln!("skipped: {DEBIAN_ETCD} does not exist");
        return;
    }
    bounded(150, async {
        let mut cluster = EtcdCluster::start_with(ClusterOptions::new(3).binary(DEBIAN_ETCD))
            .await
            .expect("start 3 Debian etcd members");
        round_trip(&cluster).await;
        let leader = cluster.leader_index().await.expect("leader");
        cluster.kill(leader).expect("kill leader");
        cluster.restart(leader).await.expect("restart");
        cluster.leader_index().await.expect("leader after restart");
    })
    .await;
}

#[tokio::test]
async fn external_cluster_refuses_process_control() {
    let mut cluster = EtcdCluster::external(["127.0.0.1:1", "https://example.invalid:2379"]);
    assert!(cluster.is_external());
    assert_eq!(cluster.member_count(), 2);
    assert_eq!(cluster.endpoint(0), "http://127.0.0.1:1");
    let reason = cluster.require_local().expect_err("external");
    assert!(reason.contains("external"), "{reason}");
    assert_eq!(cluster.pid(0), None);
    assert_eq!(cluster.data_dir(0), None);
    for err in [
        cluster.kill(0).expect_err("kill"),
        cluster.pause(0).expect_err("pause"),
        cluster.resume(0).expect_err("resume"),
        cluster.stop(0).await.expect_err("stop"),
        cluster.restart(0).await.expect_err("restart"),
    ] {
        assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("external"), "{err}");
    }
    let err = cluster.metrics(1).await.expect_err("https metrics");
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
    let err = cluster
        .wait_ready(0, Duration::from_millis(200))
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
}

#[test]
fn metrics_parse_and_since() {
    let before = Metrics::parse(
        r#"# HELP grpc_server_handled_total Total number of RPCs completed on the server.
# TYPE grpc_server_handled_total counter
grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 4
grpc_server_handled_total{grpc_code="NotFound",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1
grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 2
etcd_debugging_mvcc_watcher_total 3
weird{path="a\"b\\c",x="1"} 2.5e0
etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"} 9
"#,
    );
    assert_eq!(before.get("Range"), 5);
    assert_eq!(before.get("Put"), 2);
    assert_eq!(before.get("Txn"), 0);
    assert_eq!(before.total(), 7);
    assert_eq!(before.counter("etcd_debugging_mvcc_watcher_total"), 3.0);
    assert_eq!(before.counter(r#"weird{path="a\"b\\c"}"#), 2.5);
    assert_eq!(before.counter(r#"weird{x="2"}"#), 0.0);
    assert_eq!(
        before.counter(r#"etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"}"#),
        9.0
    );
    assert_eq!(before.counter("grpc_server_handled_total"), 7.0);

    let after = Metrics::parse(
        r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 6
grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1
grpc_server_handled_total{grpc_code="OK",grpc_method="Txn",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1
etcd_debugging_mvcc_watcher_total 1
"#,
    );
    let delta = after.since(&before);
    assert_eq!(delta.get("Range"), 1);
    assert_eq!(delta.get("Put"), 0, "saturating");
    assert_eq!(delta.get("Txn"), 1);
    assert_eq!(delta.total(), 2);
    assert_eq!(delta.counter("etcd_debugging_mvcc_watcher_total"), -2.0);
}
