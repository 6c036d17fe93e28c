//! Mutex: mutual exclusion, fencing, cancel safety, cost, compaction and etcdctl interop.
#![cfg(feature = "testing")]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use etcd_coord::etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use etcd_coord::testing::EtcdCluster;
use etcd_coord::{Error, Mutex};
use rand::Rng;
use tokio::time::Instant;

async fn counter(client: &Client, key: &str) -> u64 {
    let resp = client.clone().get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_sessions_hundred_acquisitions_each_never_overlap_and_count_exactly() {
    let (_etcd, client) = single().await;
    let name = unique("counter");
    let counter_key = format!("{name}-counter");
    let intervals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        // Each contender has its own client (connection) and session.
        let client = connect(&_etcd).await;
        let session = session(&client, 10).await;
        let mutex = Mutex::new(&session, name.clone()).unwrap();
        let counter_key = counter_key.clone();
        let intervals = intervals.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                let guard = mutex.lock().await.unwrap();
                let start = Instant::now();
                // An unguarded read-modify-write: only mutual exclusion keeps it exact.
                let n = counter(&client, &counter_key).await;
                client
                    .clone()
                    .put(counter_key.as_str(), (n + 1).to_string(), None)
                    .await
                    .unwrap();
                let end = Instant::now();
                intervals
                    .lock()
                    .unwrap()
                    .push((start, end, guard.fencing_token()));
                guard.unlock().await.unwrap();
            }
        }));
    }
    within(Duration::from_secs(120), "800 acquisitions", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    assert_eq!(counter(&client, &counter_key).await, 800);
    let mut iv = intervals.lock().unwrap().clone();
    iv.sort_by_key(|i| i.0);
    for w in iv.windows(2) {
        assert!(w[0].1 <= w[1].0, "hold intervals overlap: {w:?}");
        assert!(w[0].2 < w[1].2, "fencing tokens increase with each holder");
    }
    assert!(keys(&client, &format!("{name}/")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_whose_lease_is_revoked_cannot_commit_and_the_next_token_is_larger() {
    let (_etcd, client) = single().await;
    let name = unique("fenced");
    let data = format!("{name}-data");
    let s1 = session(&client, 10).await;
    let s2 = session(&client, 10).await;
    let g1 = Mutex::new(&s1, name.clone()).unwrap().lock().await.unwrap();
    let waiter = {
        let m = Mutex::new(&s2, name.clone()).unwrap();
        tokio::spawn(async move { m.lock().await })
    };
    key_count_becomes(
        &client,
        &format!("{name}/"),
        2,
        Duration::from_secs(5),
        "waiter queued",
    )
    .await;
    // Mid-section, the holder's lease goes (as if it had paused past its TTL).
    client.clone().lease_revoke(s1.lease_id()).await.unwrap();
    let g2 = within(Duration::from_secs(5), "next holder", waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(g2.fencing_token() > g1.fencing_token());
    let late = g1
        .txn(Txn::new().and_then([TxnOp::put(data.as_str(), "stale", None)]))
        .await;
    assert!(matches!(late, Err(Error::NotHeld { .. })), "{late:?}");
    // A caller's own compare that fails inside the owner-only transaction is reported as such.
    let own = g2
        .txn(
            Txn::new()
                .when([Compare::version(data.as_str(), CompareOp::Greater, 0)])
                .and_then([TxnOp::put(data.as_str(), "never", None)])
                .or_else([TxnOp::put(data.as_str(), "fresh", None)]),
        )
        .await
        .unwrap();
    assert!(!own.succeeded());
    let value = client.clone().get(data.as_str(), None).await.unwrap();
    assert_eq!(value.kvs()[0].value(), b"fresh");
    within(Duration::from_secs(15), "old holder notices", g1.lost()).await;
    assert!(!g1.is_held());
    assert!(g2.is_held());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_whose_session_is_revoked_fails_and_leaves_no_key() {
    let (_etcd, client) = single().await;
    let name = unique("doomed-waiter");
    let holder = session(&client, 10).await;
    let _g = Mutex::new(&holder, name.clone())
        .unwrap()
        .lock()
        .await
        .unwrap();
    let doomed = session(&client, 10).await;
    let m = Mutex::new(&doomed, name.clone()).unwrap();
    let waiting = tokio::spawn(async move { m.lock().await });
    key_count_becomes(
        &client,
        &format!("{name}/"),
        2,
        Duration::from_secs(5),
        "waiter queued",
    )
    .await;
    client
        .clone()
        .lease_revoke(doomed.lease_id())
        .await
        .unwrap();
    let result = within(Duration::from_secs(10), "waiter fails", waiting)
        .await
        .unwrap();
    assert!(
        matches!(
            result,
            Err(Error::NotHeld { .. } | Error::SessionExpired(_))
        ),
        "{result:?}"
    );
    assert_eq!(keys(&client, &format!("{name}/")).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_lock_futures_leave_no_stray_keys() {
    let (_etcd, client) = single().await;
    let name = unique("cancelled");
    let prefix = format!("{name}/");
    let holder = session(&client, 10).await;
    let guard = Mutex::new(&holder, name.clone())
        .unwrap()
        .lock()
        .await
        .unwrap();
    let waiters = session(&client, 30).await;
    let mutex = Mutex::new(&waiters, name.clone()).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let mutex = mutex.clone();
        // Half of them within the first few milliseconds, while the joining request is still
        // in flight: the key it creates must be found and deleted all the same.
        let ms = {
            let mut rng = rand::thread_rng();
            if rng.gen_bool(0.5) {
                rng.gen_range(0..=3)
            } else {
                rng.gen_range(0..=50)
            }
        };
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(ms), mutex.lock())
                .await
                .is_err()
        }));
    }
    for t in tasks {
        assert!(
            t.await.unwrap(),
            "no attempt may acquire while the holder holds"
        );
    }
    guard.unlock().await.unwrap();
    key_count_becomes(
        &client,
        &prefix,
        0,
        Duration::from_secs(15),
        "no stray keys",
    )
    .await;
    let again = within(
        Duration::from_secs(2),
        "a new lock acquires at once",
        mutex.lock(),
    )
    .await
    .unwrap();
    again.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlock_after_loss_reports_it_and_spares_the_new_holder() {
    let (_etcd, client) = single().await;
    let name = unique("lost-unlock");
    let s1 = session(&client, 10).await;
    let g1 = Mutex::new(&s1, name.clone()).unwrap().lock().await.unwrap();
    client.clone().lease_revoke(s1.lease_id()).await.unwrap();
    let s2 = session(&client, 10).await;
    let g2 = within(
        Duration::from_secs(5),
        "new holder",
        Mutex::new(&s2, name.clone()).unwrap().lock(),
    )
    .await
    .unwrap();
    let result = g1.unlock().await;
    assert!(matches!(result, Err(Error::NotHeld { .. })), "{result:?}");
    assert_eq!(
        keys(&client, &format!("{name}/")).await,
        vec![g2.key().to_string()]
    );
    g2.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_operation_match_the_cost_model() {
    let (etcd, client) = single().await;
    if skip_unless_local(
        &etcd,
        "requests_per_operation_match_the_cost_model (other tests share the server's counters)",
    ) {
        return;
    }
    let name = unique("cost");
    let s1 = session(&client, 10).await;
    let s2 = session(&client, 10).await;
    let m1 = Mutex::new(&s1, name.clone()).unwrap();
    let m2 = Mutex::new(&s2, name.clone()).unwrap();

    let (_, cost) = requests(&etcd, async {
        m1.lock().await.unwrap().unlock().await.unwrap();
    })
    .await;
    assert_eq!(cost.total(), 2, "uncontended lock + unlock: {cost:?}");

    let held = m1.lock().await.unwrap();
    let (result, cost) = requests(&etcd, m2.try_lock()).await;
    assert!(matches!(result, Err(Error::WouldBlock { .. })));
    assert_eq!(cost.total(), 1, "failed try_lock: {cost:?}");
    assert_eq!(
        keys(&client, &format!("{name}/")).await.len(),
        1,
        "no key left"
    );

    // Handoff: the waiter is queued and watching; count from the holder's unlock to the
    // waiter's acquisition. Expected: the holder's delete and the waiter's one check.
    let waiter = tokio::spawn(async move { m2.lock().await });
    eventually(Duration::from_secs(5), "waiter watches", || async {
        let m = etcd.metrics(0).await.unwrap();
        keys(&client, &format!("{name}/")).await.len() == 2
            && m.counter("etcd_debugging_mvcc_watcher_total") >= 2.0
    })
    .await;
    let (guard, cost) = requests(&etcd, async {
        held.unlock().await.unwrap();
        waiter.await.unwrap().unwrap()
    })
    .await;
    eprintln!("handoff cost: {cost:?}");
    assert_eq!(
        cost.get("Txn"),
        2,
        "unlock + one check by the new holder: {cost:?}"
    );
    for method in ["Range", "Put", "DeleteRange", "LeaseGrant"] {
        assert_eq!(cost.get(method), 0, "{method}: {cost:?}");
    }
    guard.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_to_the_current_revision_does_not_break_waiters() {
    let (_etcd, client) = single().await;
    let name = unique("compacted");
    let holder = session(&client, 10).await;
    let first = Mutex::new(&holder, name.clone())
        .unwrap()
        .lock()
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..5 {
        let s = session(&client, 10).await;
        let m = Mutex::new(&s, name.clone()).unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let g = m.lock().await.unwrap();
            tx.send((i, g.fencing_token())).unwrap();
            g.unlock().await.unwrap();
            drop(s);
        });
    }
    key_count_becomes(
        &client,
        &format!("{name}/"),
        6,
        Duration::from_secs(5),
        "five waiters queued",
    )
    .await;
    let rev = client
        .clone()
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client
        .clone()
        .compact(
            rev,
            Some(etcd_coord::etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();
    first.unlock().await.unwrap();
    let mut tokens = Vec::new();
    for _ in 0..5 {
        let (_, token) = within(Duration::from_secs(10), "each waiter acquires", rx.recv())
            .await
            .unwrap();
        tokens.push(token);
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_survives_a_server_restart() {
    let (mut etcd, client) = single().await;
    if skip_unless_local(&etcd, "waiting_survives_a_server_restart") {
        return;
    }
    let name = unique("restart");
    let holder = session(&client, 15).await;
    let guard = Mutex::new(&holder, name.clone())
        .unwrap()
        .lock()
        .await
        .unwrap();
    let waiter_session = session(&client, 15).await;
    let m = Mutex::new(&waiter_session, name.clone()).unwrap();
    let waiting = tokio::spawn(async move { m.lock().await });
    key_count_becomes(
        &client,
        &format!("{name}/"),
        2,
        Duration::from_secs(5),
        "waiter queued",
    )
    .await;
    etcd.stop(0).await.unwrap();
    etcd.restart(0).await.unwrap();
    within(
        Duration::from_secs(10),
        "holder releases after restart",
        async {
            loop {
                match guard.txn(Txn::new()).await {
                    Ok(_) => break,
                    Err(e) if e.is_retryable() => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        },
    )
    .await;
    guard.unlock().await.unwrap();
    let g = within(Duration::from_secs(10), "waiter acquires", waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(g.is_held());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_rejected_naming_the_argument() {
    let (_etcd, client) = single().await;
    let s = session(&client, 5).await;
    for bad in ["", "trailing/", "nul\0byte"] {
        match Mutex::new(&s, bad) {
            Err(Error::InvalidArgument { name: "name", .. }) => {}
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn etcdctl_lock(etcd: &EtcdCluster, name: &str, log: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .args(["lock", name, "--", "sh", "-c"])
        .arg(format!(
            "date +%s%N >> {0}; sleep 0.5; date +%s%N >> {0}",
            log.display()
        ))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("etcdctl from Debian's etcd-client package")
}

fn interval(log: &std::path::Path) -> Option<(u128, u128)> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut lines = text.lines().map(|l| l.trim().parse::<u128>().unwrap());
    Some((lines.next()?, lines.next()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_the_rust_mutex_exclude_each_other() {
    if which("etcdctl").is_none() {
        eprintln!("skipped: etcdctl is not installed (Debian package etcd-client)");
        return;
    }
    let (etcd, client) = single().await;
    let name = unique("interop");
    let prefix = format!("{name}/");
    let dir = tempfile::tempdir().unwrap();
    let s = session(&client, 10).await;
    let mutex = Mutex::new(&s, name.clone()).unwrap();

    // Rust first: etcdctl must wait until Rust unlocks.
    let guard = mutex.lock().await.unwrap();
    let log1 = dir.path().join("first");
    let mut ctl = etcdctl_lock(&etcd, &name, &log1);
    key_count_becomes(
        &client,
        &prefix,
        2,
        Duration::from_secs(10),
        "etcdctl queued",
    )
    .await;
    // Hold a little longer so an etcdctl that ignored us would have started its command.
    let rust_until = {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = now_ns();
        guard.unlock().await.unwrap();
        t
    };
    assert!(within(Duration::from_secs(10), "etcdctl runs", ctl.wait())
        .await
        .unwrap()
        .success());
    let (start, _) = interval(&log1).expect("etcdctl ran its command");
    assert!(
        start >= rust_until,
        "etcdctl started its command while Rust held the lock"
    );

    // etcdctl first: Rust must wait until etcdctl's command is done.
    let log2 = dir.path().join("second");
    let mut ctl = etcdctl_lock(&etcd, &name, &log2);
    eventually(Duration::from_secs(10), "etcdctl holds", || {
        let log2 = log2.clone();
        async move { std::fs::read_to_string(&log2).is_ok_and(|t| !t.is_empty()) }
    })
    .await;
    let guard = within(
        Duration::from_secs(10),
        "Rust acquires after etcdctl",
        mutex.lock(),
    )
    .await
    .unwrap();
    let acquired = now_ns();
    let (_, end) = interval(&log2).expect("etcdctl finished its command");
    assert!(acquired >= end, "Rust acquired while etcdctl's command ran");
    guard.unlock().await.unwrap();
    ctl.wait().await.unwrap();
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(cmd))
        .find(|p| p.is_file())
}
