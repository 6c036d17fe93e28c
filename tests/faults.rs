//! Member crashes, pauses, rolling restarts and clients cut off from etcd: mutual exclusion
//! holds, progress resumes within a bounded time, and a session knows when it is gone.
//!
//! Faults between a client and etcd go through `testing::proxy::Proxy`; faults of members use
//! the harness's kill, pause and restart. Every test prints what it measured.
#![cfg(feature = "testing")]

mod common;
mod faultkit;

use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Client, EventType, Txn, TxnOp, WatchOptions};
use etcd_coord::testing::proxy::{Mode, Proxy};
use etcd_coord::testing::EtcdCluster;
use etcd_coord::{Connect, Election, Error, LeaderEvent, Mutex, SessionState};
use faultkit::{Contention, QueueLoad};
use futures::StreamExt;
use tokio::time::Instant;

/// Runs a one-shot operation until it succeeds or fails for good (at most 5 s).
async fn retried<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = etcd_coord::Result<T>>,
{
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if e.is_retryable() && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

/// A client that reaches etcd only through `proxies`.
async fn client_via(proxies: &[&Proxy]) -> Client {
    Connect::new(proxies.iter().map(|p| p.url()))
        .connect()
        .await
        .expect("connect through the proxy")
}

/// Completes when `key` is deleted (as seen by `client`'s watch), returning when.
async fn deleted(client: &Client, key: &str) -> Instant {
    let mut c = client.clone();
    let mut stream = c
        .watch(key, Some(WatchOptions::new()))
        .await
        .expect("watch");
    loop {
        let resp = stream
            .message()
            .await
            .expect("watch answers")
            .expect("watch open");
        if resp
            .events()
            .iter()
            .any(|e| e.event_type() == EventType::Delete)
        {
            return Instant::now();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_shorter_than_the_ttl_keeps_the_session_and_its_lock() {
    let (etcd, direct) = single().await;
    let proxy = Proxy::start(etcd.endpoint(0)).await.unwrap();
    let client = client_via(&[&proxy]).await;
    let name = unique("short-cut");
    let s = session(&client, 4).await;
    let guard = Mutex::new(&s, name.clone()).unwrap().lock().await.unwrap();
    let rival = session(&direct, 10).await;
    let rival_mutex = Mutex::new(&rival, name.clone()).unwrap();
    let waiting = tokio::spawn(async move { rival_mutex.lock().await });
    eventually(Duration::from_secs(5), "rival queued", || {
        let (c, p) = (direct.clone(), format!("{name}/"));
        async move { keys(&c, &p).await.len() == 2 }
    })
    .await;

    proxy.set_mode(Mode::Cut);
    eventually(Duration::from_secs(2), "connections dropped", || {
        let open = proxy.connections();
        async move { open == 0 }
    })
    .await;
    // Elapsed time is the property: 1.5 s without any contact, well under the 4 s TTL.
    let cut_for = Duration::from_millis(1500);
    tokio::time::sleep(cut_for).await;
    proxy.set_mode(Mode::Pass);

    let healed = Instant::now();
    let answered = within(
        Duration::from_secs(5),
        "owner-only write after the cut",
        guard.txn(Txn::new().and_then([TxnOp::put(format!("{name}-data"), "mine", None)])),
    )
    .await;
    eprintln!(
        "cut for {cut_for:?}: first owner-only write answered {} ms after healing",
        healed.elapsed().as_millis()
    );
    answered.expect("still the owner after a short cut");
    assert_eq!(s.state(), SessionState::Alive);
    assert!(guard.is_held());
    assert!(!waiting.is_finished(), "the rival never got the lock");
    guard.unlock().await.unwrap();
    within(Duration::from_secs(5), "rival gets the lock", waiting)
        .await
        .unwrap()
        .unwrap()
        .unlock()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_longer_than_the_ttl_expires_the_session_before_the_server_does_and_the_lock_passes()
{
    let (etcd, direct) = single().await;
    let proxy = Proxy::start(etcd.endpoint(0)).await.unwrap();
    let client = client_via(&[&proxy]).await;
    let name = unique("long-cut");
    let data = format!("{name}-data");
    let ttl = Duration::from_secs(3);
    let s = session(&client, ttl.as_secs()).await;
    let guard = Mutex::new(&s, name.clone()).unwrap().lock().await.unwrap();
    let rival = session(&direct, 10).await;
    let rival_mutex = Mutex::new(&rival, name.clone()).unwrap();
    let waiting = tokio::spawn(async move { rival_mutex.lock().await });
    eventually(Duration::from_secs(5), "rival queued", || {
        let (c, p) = (direct.clone(), format!("{name}/"));
        async move { keys(&c, &p).await.len() == 2 }
    })
    .await;
    let server_deleted = tokio::spawn({
        let (direct, key) = (direct.clone(), guard.key().to_string());
        async move { deleted(&direct, &key).await }
    });

    let cut_at = Instant::now();
    proxy.set_mode(Mode::Cut);
    let state = within(ttl * 2, "the session notices", s.lost()).await;
    let noticed = Instant::now();
    assert!(
        matches!(state, SessionState::Expired(_)),
        "{state:?} after the cut"
    );
    assert!(!guard.is_held());
    let gone = within(ttl * 3, "the server expires the lease", server_deleted)
        .await
        .unwrap();
    eprintln!(
        "cut off with a {ttl:?} TTL: the session reported expiry {} ms after the cut, {} ms \
         before the server deleted the lock key ({} ms after the cut)",
        (noticed - cut_at).as_millis(),
        gone.saturating_duration_since(noticed).as_millis(),
        (gone - cut_at).as_millis()
    );
    assert!(
        noticed <= gone,
        "the session believed itself alive after the server had expired its lease"
    );
    let next = within(Duration::from_secs(5), "the lock passes on", waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(next.fencing_token() > guard.fencing_token());

    // Back in contact, the deposed holder's owner-only write is refused and writes nothing.
    proxy.set_mode(Mode::Pass);
    let late = within(Duration::from_secs(10), "deposed write answered", async {
        loop {
            match guard
                .txn(Txn::new().and_then([TxnOp::put(data.as_str(), "stale", None)]))
                .await
            {
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
    })
    .await;
    assert!(matches!(late, Err(Error::NotHeld { .. })), "{late:?}");
    let resp = direct.clone().get(data.as_str(), None).await.unwrap();
    assert!(resp.kvs().is_empty(), "a deposed holder's write committed");
    next.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_holds_while_the_raft_leader_is_killed_under_eight_way_contention() {
    let (mut etcd, _client) = cluster(3).await;
    if skip_unless_local(&etcd, "leader kill test") {
        return;
    }
    let mut work = Contention::new(&unique("leader-kill"));
    for _ in 0..8 {
        work.spawn(etcd.endpoints(), 10, true);
    }
    work.progress(30, Duration::from_secs(20), "start").await;
    let leader = etcd.leader_index().await.unwrap();
    let fault = Instant::now();
    etcd.kill(leader).unwrap();
    let took = work
        .resumed_after("killing the raft leader", fault, Duration::from_secs(15))
        .await;
    assert!(took < Duration::from_secs(10), "{took:?}");
    work.progress(30, Duration::from_secs(20), "after the kill")
        .await;
    etcd.restart(leader).await.unwrap();
    work.progress(10, Duration::from_secs(20), "after the restart")
        .await;
    work.stop(Duration::from_secs(20)).await;
    check(&work, &etcd, false).await;
}

/// The invariants of a workload: the unguarded counter is exact, every fenced write was the
/// holder's, no lock key is left behind, and (unless `may_expire`) no session expired.
async fn check(work: &Contention, etcd: &EtcdCluster, may_expire: bool) {
    let tally = &work.tally;
    let increments = tally.increments.load(std::sync::atomic::Ordering::Relaxed);
    // A new client: the test's own may still hold a connection to a member killed meanwhile.
    let client = &connect(etcd).await;
    let counter = work.counter_value(client).await;
    let fenced = work.verify_fenced_log(client).await;
    eprintln!("{increments} increments, {fenced} fenced writes, tally {tally:?}");
    assert_eq!(
        tally.uncertain.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(counter, increments, "the unguarded counter is exact");
    if !may_expire {
        assert_eq!(tally.expired.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
    key_count_becomes(
        client,
        &format!("{}/", work.mutex),
        0,
        Duration::from_secs(15),
        "no stray lock keys",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_delays_progress_only_briefly_and_exclusion_holds() {
    let (etcd, _client) = cluster(3).await;
    if skip_unless_local(&etcd, "pause test") {
        return;
    }
    let leader = etcd.leader_index().await.unwrap();
    let others: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| etcd.endpoint(i))
        .collect();
    let mut work = Contention::new(&unique("pause"));
    for _ in 0..6 {
        // Sessions and locks talk to every member, the paused one included.
        work.spawn_split(etcd.endpoints(), others.clone(), 15, true);
    }
    work.progress(20, Duration::from_secs(20), "start").await;
    let fault = Instant::now();
    etcd.pause(leader).unwrap();
    let took = work
        .resumed_after(
            "pausing the raft leader (SIGSTOP)",
            fault,
            Duration::from_secs(30),
        )
        .await;
    etcd.resume(leader).unwrap();
    let resumed = Instant::now();
    work.resumed_after("resuming the old leader", resumed, Duration::from_secs(15))
        .await;
    assert!(took < Duration::from_secs(30), "{took:?}");
    work.stop(Duration::from_secs(20)).await;
    check(&work, &etcd, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_keeps_sessions_locks_leaders_and_every_job() {
    let (mut etcd, _client) = cluster(3).await;
    if skip_unless_local(&etcd, "rolling restart test") {
        return;
    }
    let name = unique("rolling");
    // A lock held, and a leader leading, through the whole restart.
    let holder = session(&connect(&etcd).await, 10).await;
    let held = Mutex::new(&holder, format!("{name}-held"))
        .unwrap()
        .lock()
        .await
        .unwrap();
    let candidate = session(&connect(&etcd).await, 10).await;
    let election = Election::new(&candidate, format!("{name}-election")).unwrap();
    let leadership = election.campaign("leader-1").await.unwrap();
    let rival = session(&connect(&etcd).await, 10).await;
    let rival_election = Election::new(&rival, format!("{name}-election")).unwrap();
    let rival_campaign = tokio::spawn(async move { rival_election.campaign("leader-2").await });
    let mut events = Election::observer(connect(&etcd).await, format!("{name}-election"))
        .unwrap()
        .observe();
    let first = within(Duration::from_secs(5), "observer starts", events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.leader().unwrap().value, b"leader-1");

    let mut work = Contention::new(&name);
    for _ in 0..4 {
        work.spawn(etcd.endpoints(), 10, true);
    }
    let mut jobs = QueueLoad::new(&format!("{name}-jobs"));
    jobs.producer(etcd.endpoints(), 10, Duration::from_millis(20));
    for _ in 0..2 {
        jobs.consumer(etcd.endpoints(), 10, Duration::from_millis(10));
    }
    work.progress(10, Duration::from_secs(20), "start").await;
    jobs.progress(10, Duration::from_secs(20), "at the start")
        .await;
    for member in 0..3 {
        let stopping = Instant::now();
        etcd.stop(member).await.unwrap();
        let fault = Instant::now();
        work.resumed_after(
            &format!(
                "member {member} went down (its graceful stop took {} ms)",
                (fault - stopping).as_millis()
            ),
            fault,
            Duration::from_secs(15),
        )
        .await;
        etcd.restart(member).await.unwrap();
        let back = Instant::now();
        work.resumed_after(
            &format!("restarting member {member}"),
            back,
            Duration::from_secs(15),
        )
        .await;
        jobs.progress(
            5,
            Duration::from_secs(15),
            &format!("after restarting member {member}"),
        )
        .await;
        assert!(held.is_held() && leadership.is_leader());
    }
    work.stop(Duration::from_secs(20)).await;
    check(&work, &etcd, false).await;
    let client = connect(&etcd).await;
    let (pushed, acked) = jobs.finish(&client, Duration::from_secs(20)).await;
    eprintln!("work queue through the rolling restart: {pushed} jobs pushed, {acked} acknowledged once each, none lost");

    // Nothing was lost: the lock and the leadership still commit owner-only writes, and the
    // observer never saw another leader or a vacancy. (One-shot requests may meet a stale
    // "tcp connect error" for a member that was down when they last tried it: that is a
    // retryable error, and callers retry those.)
    retried("owner-only write of the held lock", || held.txn(Txn::new())).await;
    retried("proclaim", || leadership.proclaim("leader-1, still")).await;
    let next = within(
        Duration::from_secs(5),
        "proclamation observed",
        events.next(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        matches!(&next, LeaderEvent::Proclaimed(l) if l.value == b"leader-1, still"),
        "{next:?}"
    );
    assert!(!rival_campaign.is_finished());
    assert!(holder.is_alive() && candidate.is_alive() && rival.is_alive());
    retried("resign", || leadership.resign()).await;
    let won = within(Duration::from_secs(5), "rival elected", rival_campaign)
        .await
        .unwrap()
        .unwrap();
    retried("resign", || won.resign()).await;
    if let Err(e) = held.unlock().await {
        // The release goes on in the background.
        assert!(e.is_retryable(), "{e:?}");
    }
    key_count_becomes(
        &client,
        &format!("{name}-held/"),
        0,
        Duration::from_secs(10),
        "held lock released",
    )
    .await;
}

/// Sends puts one after another for `window` and returns the slowest, how many failed and
/// how many were sent.
async fn puts_for(client: &Client, key: &str, window: Duration) -> (Duration, usize, usize) {
    let mut worst = Duration::ZERO;
    let (mut failed, mut sent) = (0, 0);
    let until = Instant::now() + window;
    while Instant::now() < until {
        let started = Instant::now();
        let mut c = client.clone();
        let put = tokio::time::timeout(Duration::from_secs(15), c.put(key, "x", None)).await;
        sent += 1;
        if !matches!(put, Ok(Ok(_))) {
            failed += 1;
        }
        worst = worst.max(started.elapsed());
    }
    (worst, failed, sent)
}

/// What a raw request (no retry, no timeout of this crate) sees when one of three members dies
/// or hangs, for a client that knows all three, each behind its own proxy.
///
/// A dead member (connections refused) costs nothing but fast failures: tonic's balancer keeps
/// the endpoint and hands it some requests, which fail at once with "tcp connect error" (the
/// crate's own operations retry them). A hung member is worse: a request sent on its open
/// connection waits until HTTP/2 keepalive declares the connection dead (interval 5.5 s +
/// timeout 2 s after its last frame), and a reconnect succeeds at the TCP level at once (the
/// kernel accepts for a stopped process), so the balancer may send it more. The crate's
/// requests are bounded by the session's request timeout and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_costs_fast_failures_and_a_hung_one_is_dropped_by_keepalive() {
    let (etcd, _client) = cluster(3).await;
    if skip_unless_local(&etcd, "member failure latency test") {
        return;
    }
    let proxies = [
        Proxy::start(etcd.endpoint(0)).await.unwrap(),
        Proxy::start(etcd.endpoint(1)).await.unwrap(),
        Proxy::start(etcd.endpoint(2)).await.unwrap(),
    ];
    let client = client_via(&proxies.iter().collect::<Vec<_>>()).await;
    let key = unique("probe");
    puts_for(&client, &key, Duration::from_millis(300)).await;

    proxies[0].set_mode(Mode::Cut);
    let (worst, failed, sent) = puts_for(&client, &key, Duration::from_secs(2)).await;
    eprintln!(
        "one of three members cut off (dead): slowest put {} ms, {failed} of {sent} failed fast",
        worst.as_millis()
    );
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    proxies[0].set_mode(Mode::Pass);
    puts_for(&client, &key, Duration::from_millis(300)).await;

    proxies[0].set_mode(Mode::Blackhole);
    let (worst, failed, sent) = puts_for(&client, &key, Duration::from_secs(9)).await;
    eprintln!(
        "one of three members blackholed (hung): slowest put {} ms, {failed} of {sent} failed",
        worst.as_millis()
    );
    // Keepalive bounds the wait: 5.5 s without a frame, then 2 s for the ping's answer.
    assert!(worst < Duration::from_secs(10), "{worst:?}");
}

/// Connections stay up when nothing happens: pings slower than etcd's
/// `--grpc-keepalive-min-time` are not punished with GOAWAY `too_many_pings`. (With pings every
/// 2 s, etcd closed every connection after about 8 s, breaking watches and keepalives.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_connections_are_not_closed_by_the_server() {
    let (etcd, direct) = single().await;
    let proxy = Proxy::start(etcd.endpoint(0)).await.unwrap();
    let client = client_via(&[&proxy]).await;
    let name = unique("quiet");
    // A session (keepalive stream) and a waiter (watch stream) on the proxied connection.
    let s = session(&client, 30).await;
    let holder = session(&direct, 30).await;
    let _held = Mutex::new(&holder, name.clone())
        .unwrap()
        .lock()
        .await
        .unwrap();
    let mutex = Mutex::new(&s, name.clone()).unwrap();
    let waiting = tokio::spawn(async move { mutex.lock().await });
    let started = Instant::now();
    // Elapsed time is the property: 12 s of quiet, sampled.
    while started.elapsed() < Duration::from_secs(12) {
        assert_eq!(
            proxy.connections(),
            1,
            "connection closed after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!waiting.is_finished());
    assert!(s.is_alive());
}

/// The proxy itself: it passes, delays, stalls and cuts as told, and stops when dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_passes_delays_stalls_and_cuts_as_told() {
    let (etcd, _direct) = single().await;
    let proxy = Proxy::start(etcd.endpoint(0)).await.unwrap();
    assert!(proxy.addr().ip().is_loopback());
    assert!(
        Proxy::start("10.1.2.3:2379").await.is_err(),
        "loopback only"
    );
    let client = client_via(&[&proxy]).await;
    let key = unique("proxy");
    let put = |client: &Client| {
        let mut c = client.clone();
        let key = key.clone();
        async move {
            let started = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(1), c.put(key, "v", None)).await;
            (matches!(r, Ok(Ok(_))), started.elapsed())
        }
    };
    assert!(put(&client).await.0);

    proxy.set_mode(Mode::Latency(Duration::from_millis(100)));
    let (ok, took) = put(&client).await;
    assert!(ok && took >= Duration::from_millis(200), "{took:?}");

    proxy.set_mode(Mode::Blackhole);
    let (ok, _) = put(&client).await;
    assert!(!ok, "a blackholed request is not answered");
    assert_eq!(proxy.connections(), 1, "the connection stays open");

    proxy.set_mode(Mode::Cut);
    eventually(Duration::from_secs(2), "connections closed", || {
        let open = proxy.connections();
        async move { open == 0 }
    })
    .await;
    let refused = tokio::net::TcpStream::connect(proxy.addr()).await;
    assert!(refused.is_err(), "new connections are refused");

    proxy.set_mode(Mode::Pass);
    eventually(Duration::from_secs(5), "traffic flows again", || {
        let p = put(&client);
        async move { p.await.0 }
    })
    .await;
    let addr = proxy.addr();
    drop(proxy);
    eventually(
        Duration::from_secs(2),
        "listener closed on drop",
        || async move { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;
}
