//! Barrier and DoubleBarrier: gates, rounds that start and finish together, crashes,
//! cancellation and cost, against a real etcd.
#![cfg(feature = "testing")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Client, GetOptions, SortOrder, SortTarget};
use etcd_coord::testing::EtcdCluster;
use etcd_coord::{Barrier, BarrierRound, DoubleBarrier, Error};
use rand::Rng;
use tokio::time::Instant;

/// Keys under `prefix` with their create revisions, oldest first.
async fn by_age(client: &Client, prefix: &str) -> Vec<String> {
    let resp = client
        .clone()
        .get(
            prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_sort(SortTarget::Create, SortOrder::Ascend),
            ),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// (create revision, mod revision) of `key`, if it exists.
async fn revisions(client: &Client, key: &str) -> Option<(i64, i64)> {
    let resp = client.clone().get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (kv.create_revision(), kv.mod_revision()))
}

/// Unary KV requests (watch and keepalive streams are not requests per operation).
fn kv_requests(m: &etcd_coord::testing::Metrics) -> u64 {
    ["Range", "Put", "DeleteRange", "Txn"]
        .iter()
        .map(|method| m.get(method))
        .sum()
}

async fn watchers(etcd: &EtcdCluster) -> f64 {
    etcd.metrics(0)
        .await
        .unwrap()
        .counter("etcd_debugging_mvcc_watcher_total")
}

// ---------------------------------------------------------------------------------------------
// Barrier
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_at_once_when_open_and_right_after_release() {
    let (_etcd, client) = single().await;
    let name = unique("gate");
    let s = session(&client, 10).await;
    let barrier = Barrier::new(&s, name.clone()).unwrap();
    within(
        Duration::from_secs(1),
        "wait on an open barrier",
        barrier.wait(),
    )
    .await
    .unwrap();
    let hold = barrier.hold().await.unwrap();
    assert!(barrier.is_held().await.unwrap());
    hold.release().await.unwrap();
    within(Duration::from_secs(1), "wait after release", barrier.wait())
        .await
        .unwrap();
    assert!(keys(&client, &name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_waiter_blocks_while_held_and_all_pass_on_release() {
    let (_etcd, client) = single().await;
    let name = unique("gate");
    let holder = session(&client, 10).await;
    let hold = Barrier::new(&holder, name.clone())
        .unwrap()
        .hold()
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let s = session(&client, 10).await;
        let b = Barrier::new(&s, name.clone()).unwrap();
        waiters.push(tokio::spawn(async move {
            let r = b.wait().await;
            (r, Instant::now(), s)
        }));
    }
    // Elapsed time is the property here: nobody may pass while the barrier is held.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(waiters.iter().all(|w| !w.is_finished()));
    let released_at = Instant::now();
    hold.release().await.unwrap();
    for w in waiters {
        let (r, passed_at, _s) = within(Duration::from_secs(3), "waiter passes", w)
            .await
            .unwrap();
        r.unwrap();
        assert!(passed_at >= released_at);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waits_leave_no_watch_and_change_nothing() {
    let (etcd, client) = single().await;
    let local = etcd.require_local().is_ok();
    let name = unique("gate");
    let s = session(&client, 10).await;
    let barrier = Barrier::new(&s, name.clone()).unwrap();
    let hold = barrier.hold().await.unwrap();
    let before = revisions(&client, &name).await;
    let baseline = if local { watchers(&etcd).await } else { 0.0 };
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let b = barrier.clone();
        let ms = rand::thread_rng().gen_range(0..=200);
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(ms), b.wait())
                .await
                .is_err()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "no wait may pass while held");
    }
    assert_eq!(
        revisions(&client, &name).await,
        before,
        "the key is untouched"
    );
    assert_eq!(keys(&client, &name).await, vec![name.clone()]);
    if local {
        eventually(Duration::from_secs(5), "watches closed", || async {
            watchers(&etcd).await <= baseline
        })
        .await;
    }
    hold.release().await.unwrap();
    within(Duration::from_secs(1), "wait after release", barrier.wait())
        .await
        .unwrap();
    barrier.hold().await.unwrap().release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_bound_hold_goes_with_its_session_or_its_guard() {
    let (_etcd, client) = single().await;
    let name = unique("gate");
    let holder = session(&client, 10).await;
    let hold = Barrier::new(&holder, name.clone())
        .unwrap()
        .hold()
        .await
        .unwrap();
    assert!(!hold.is_persistent());
    let s = session(&client, 10).await;
    let waiter = {
        let b = Barrier::new(&s, name.clone()).unwrap();
        tokio::spawn(async move { b.wait().await })
    };
    // The holder "crashes": its lease is revoked from elsewhere.
    client
        .clone()
        .lease_revoke(holder.lease_id())
        .await
        .unwrap();
    within(Duration::from_secs(5), "waiter passes", waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(hold.release().await, Err(Error::NotHeld { .. })));

    // Dropping the guard releases too.
    let b = Barrier::new(&s, name.clone()).unwrap();
    drop(b.hold().await.unwrap());
    eventually(Duration::from_secs(5), "dropped hold released", || {
        let (c, n) = (client.clone(), name.clone());
        async move { keys(&c, &n).await.is_empty() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_hold_outlives_its_session_until_released() {
    let (_etcd, client) = single().await;
    let name = unique("gate");
    let holder = session(&client, 5).await;
    let hold = Barrier::new(&holder, name.clone())
        .unwrap()
        .hold_persistent()
        .await
        .unwrap();
    assert!(hold.is_persistent());
    drop(hold);
    holder.close().await.unwrap();
    let s = session(&client, 10).await;
    let b = Barrier::new(&s, name.clone()).unwrap();
    assert!(b.is_held().await.unwrap(), "still held after close");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait().await })
    };
    assert!(matches!(b.hold().await, Err(Error::WouldBlock { .. })));
    assert!(b.release().await.unwrap(), "released the orphaned hold");
    within(Duration::from_secs(3), "waiter passes", waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(!b.release().await.unwrap(), "nothing left to release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_is_exclusive_and_a_stale_release_spares_a_newer_hold() {
    let (_etcd, client) = single().await;
    let name = unique("gate");
    let s1 = session(&client, 10).await;
    let s2 = session(&client, 10).await;
    let b1 = Barrier::new(&s1, name.clone()).unwrap();
    let b2 = Barrier::new(&s2, name.clone()).unwrap();
    let h1 = b1.hold_persistent().await.unwrap();
    let busy = b2.hold().await;
    assert!(
        matches!(&busy, Err(Error::WouldBlock { name: n }) if *n == name),
        "{busy:?}"
    );
    // Even the same session cannot hold twice.
    assert!(matches!(b1.hold().await, Err(Error::WouldBlock { .. })));
    assert!(b2.release().await.unwrap());
    let h2 = b2.hold().await.unwrap();
    assert!(h2.revision() > h1.revision());
    let stale = h1.release().await;
    assert!(matches!(stale, Err(Error::NotHeld { .. })), "{stale:?}");
    assert!(b1.is_held().await.unwrap(), "the newer hold survives");
    h2.release().await.unwrap();
    assert!(!b1.is_held().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_hold_futures_leave_nothing_behind() {
    let (_etcd, client) = single().await;
    let name = unique("gate");
    let s = session(&client, 10).await;
    let b = Barrier::new(&s, name.clone()).unwrap();
    for persistent in [false, true] {
        for _ in 0..50 {
            let ms = rand::thread_rng().gen_range(0..=10);
            let attempt = async {
                if persistent {
                    b.hold_persistent().await
                } else {
                    b.hold().await
                }
            };
            match tokio::time::timeout(Duration::from_millis(ms), attempt).await {
                Ok(Ok(hold)) => hold.release().await.unwrap(),
                // An earlier cancelled attempt's hold is still being removed.
                Ok(Err(Error::WouldBlock { .. })) | Err(_) => {}
                Ok(Err(e)) => panic!("{e}"),
            }
        }
        let left = tokio::time::timeout(Duration::from_secs(10), async {
            while !keys(&client, &name).await.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if left.is_err() {
            let kv = client.clone().get(name.as_str(), None).await.unwrap();
            panic!("persistent={persistent}: left {:?}", kv.kvs());
        }
    }
    within(Duration::from_secs(1), "wait passes", b.wait())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_rejected_naming_the_argument() {
    let (_etcd, client) = single().await;
    let s = session(&client, 5).await;
    for bad in ["", "trailing/", "nul\0byte", "new\nline"] {
        match Barrier::new(&s, bad) {
            Err(Error::InvalidArgument { name: "name", .. }) => {}
            other => panic!("Barrier {bad:?} gave {other:?}"),
        }
        match DoubleBarrier::new(&s, bad, 2) {
            Err(Error::InvalidArgument { name: "name", .. }) => {}
            other => panic!("DoubleBarrier {bad:?} gave {other:?}"),
        }
    }
    let long = "x".repeat(etcd_coord::MAX_NAME_LEN + 1);
    assert!(matches!(
        Barrier::new(&s, long),
        Err(Error::InvalidArgument { name: "name", .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_requests_match_the_cost_model() {
    let (etcd, client) = single().await;
    if skip_unless_local(&etcd, "barrier_requests_match_the_cost_model") {
        return;
    }
    let name = unique("gate");
    let s = session(&client, 10).await;
    let b = Barrier::new(&s, name.clone()).unwrap();
    let (_, cost) = requests(&etcd, async { b.wait().await.unwrap() }).await;
    assert_eq!(cost.get("Range"), 1, "wait on an open barrier: {cost:?}");
    assert_eq!(kv_requests(&cost), 1, "wait on an open barrier: {cost:?}");
    let (hold, cost) = requests(&etcd, async { b.hold().await.unwrap() }).await;
    assert_eq!(kv_requests(&cost), 1, "hold: {cost:?}");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait().await })
    };
    eventually(Duration::from_secs(5), "waiter watches", || async {
        watchers(&etcd).await >= 1.0
    })
    .await;
    let (_, cost) = requests(&etcd, async {
        hold.release().await.unwrap();
        waiter.await.unwrap().unwrap();
    })
    .await;
    eprintln!("release and wake-up: {} requests", kv_requests(&cost));
    assert_eq!(cost.get("Txn"), 1, "the fenced release: {cost:?}");
    assert_eq!(cost.get("Range"), 1, "one read by the waiter: {cost:?}");
    assert_eq!(kv_requests(&cost), 2, "{cost:?}");
}

// ---------------------------------------------------------------------------------------------
// DoubleBarrier
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Span {
    round: u64,
    enter_called: Instant,
    entered: Instant,
    work_done: Instant,
    left: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_participants_run_five_rounds_that_never_overlap() {
    const N: usize = 10;
    const ROUNDS: usize = 5;
    let (etcd, client) = single().await;
    let name = unique("rounds");
    let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..N {
        let client = connect(&etcd).await;
        let s = session(&client, 10).await;
        let barrier = DoubleBarrier::new(&s, name.clone(), N).unwrap();
        let spans = spans.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let enter_called = Instant::now();
                let round = barrier.enter().await.unwrap();
                let entered = Instant::now();
                // Work of varying length, so that participants finish at different times.
                let ms = rand::thread_rng().gen_range(0..30);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let work_done = Instant::now();
                let n = round.round();
                round.leave().await.unwrap();
                spans.lock().unwrap().push(Span {
                    round: n,
                    enter_called,
                    entered,
                    work_done,
                    left: Instant::now(),
                });
            }
            drop(s);
        }));
    }
    within(Duration::from_secs(40), "five rounds", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    let spans = spans.lock().unwrap().clone();
    assert_eq!(spans.len(), N * ROUNDS);
    for k in 0..ROUNDS as u64 {
        let round: Vec<_> = spans.iter().filter(|s| s.round == k).collect();
        assert_eq!(round.len(), N, "round {k} has every participant once");
        let last_arrival = round.iter().map(|s| s.enter_called).max().unwrap();
        let first_entered = round.iter().map(|s| s.entered).min().unwrap();
        assert!(
            first_entered >= last_arrival,
            "round {k}: someone entered before all had arrived"
        );
        let last_work = round.iter().map(|s| s.work_done).max().unwrap();
        let first_left = round.iter().map(|s| s.left).min().unwrap();
        assert!(
            first_left >= last_work,
            "round {k}: someone left before all had finished"
        );
        if let Some(next) = (k + 1 < ROUNDS as u64).then_some(k + 1) {
            let next_start = spans
                .iter()
                .filter(|s| s.round == next)
                .map(|s| s.entered)
                .min()
                .unwrap();
            assert!(
                next_start >= last_work,
                "round {next} work started before round {k} work finished"
            );
        }
    }
    let prefix = format!("{name}/");
    assert_eq!(keys(&client, &prefix).await, vec![format!("{name}/round")]);
    let open = client
        .clone()
        .get(format!("{name}/round"), None)
        .await
        .unwrap();
    assert_eq!(open.kvs()[0].value(), ROUNDS.to_string().as_bytes());
}

/// Enters `count` participants (one session each) and returns them with their sessions,
/// the round's first member (oldest key) first.
async fn full_round(
    client: &Client,
    name: &str,
    count: usize,
) -> Vec<(BarrierRound, etcd_coord::Session)> {
    let mut tasks = Vec::new();
    for _ in 0..count {
        let s = session(client, 10).await;
        let b = DoubleBarrier::new(&s, name, count).unwrap();
        tasks.push(tokio::spawn(async move { (b.enter().await.unwrap(), s) }));
    }
    let mut rounds = Vec::new();
    for t in tasks {
        rounds.push(
            within(Duration::from_secs(5), "round fills", t)
                .await
                .unwrap(),
        );
    }
    let order = by_age(client, &format!("{name}/{}/", rounds[0].0.round())).await;
    rounds.sort_by_key(|(r, _)| order.iter().position(|k| k == r.key()));
    rounds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_member_revoked_while_the_others_leave_does_not_block_them() {
    let (_etcd, client) = single().await;
    let name = unique("crash-first");
    let mut rounds = full_round(&client, &name, 3).await;
    let (first, first_session) = rounds.remove(0);
    let mut leaving = Vec::new();
    for (round, s) in rounds {
        leaving.push(tokio::spawn(async move { (round.leave().await, s) }));
    }
    // The others have deleted their keys and now watch the first member's.
    key_count_becomes(
        &client,
        &format!("{name}/0/"),
        1,
        Duration::from_secs(5),
        "the others left",
    )
    .await;
    assert!(leaving.iter().all(|l| !l.is_finished()));
    client
        .clone()
        .lease_revoke(first_session.lease_id())
        .await
        .unwrap();
    for l in leaving {
        let (r, _s) = within(Duration::from_secs(5), "leave returns", l)
            .await
            .unwrap();
        r.unwrap();
    }
    let crashed = within(Duration::from_secs(5), "crashed leave", first.leave()).await;
    assert!(
        matches!(
            crashed,
            Err(Error::SessionExpired(_) | Error::NotHeld { .. })
        ),
        "{crashed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_revoked_while_working_does_not_block_the_others() {
    let (_etcd, client) = single().await;
    let name = unique("crash-other");
    let mut rounds = full_round(&client, &name, 4).await;
    // A member in the middle crashes before it leaves; the first one is among those waiting.
    let (_crashed, crashed_session) = rounds.remove(2);
    client
        .clone()
        .lease_revoke(crashed_session.lease_id())
        .await
        .unwrap();
    let mut leaving = Vec::new();
    for (round, s) in rounds {
        leaving.push(tokio::spawn(async move { (round.leave().await, s) }));
    }
    for l in leaving {
        let (r, _s) = within(Duration::from_secs(5), "leave returns", l)
            .await
            .unwrap();
        r.unwrap();
    }
    assert!(keys(&client, &format!("{name}/0/")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_revoked_before_the_round_fills_is_not_counted() {
    let (_etcd, client) = single().await;
    let name = unique("crash-early");
    let prefix = format!("{name}/0/");
    let enter = |s: etcd_coord::Session| {
        let b = DoubleBarrier::new(&s, name.clone(), 3).unwrap();
        tokio::spawn(async move { (b.enter().await, s) })
    };
    let a = enter(session(&client, 10).await);
    let doomed_session = session(&client, 10).await;
    let doomed_lease = doomed_session.lease_id();
    let doomed = enter(doomed_session);
    key_count_becomes(&client, &prefix, 2, Duration::from_secs(5), "two waiting").await;
    client.clone().lease_revoke(doomed_lease).await.unwrap();
    let (r, _s) = within(Duration::from_secs(5), "doomed enter fails", doomed)
        .await
        .unwrap();
    assert!(
        matches!(r, Err(Error::SessionExpired(_) | Error::NotHeld { .. })),
        "{r:?}"
    );
    let c = enter(session(&client, 10).await);
    eventually(Duration::from_secs(5), "two waiting again", || {
        let (cl, p) = (client.clone(), prefix.clone());
        async move { keys(&cl, &p).await.len() == 2 }
    })
    .await;
    assert!(
        !a.is_finished() && !c.is_finished(),
        "two of three is not full"
    );
    let d = enter(session(&client, 10).await);
    let mut rounds = Vec::new();
    for t in [a, c, d] {
        let (r, s) = within(Duration::from_secs(5), "round fills", t)
            .await
            .unwrap();
        let r = r.unwrap();
        assert_eq!(r.round(), 0);
        rounds.push(tokio::spawn(async move { (r.leave().await, s) }));
    }
    for t in rounds {
        within(Duration::from_secs(5), "leave", t)
            .await
            .unwrap()
            .0
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_enters_and_leaves_leave_no_keys_behind() {
    let (_etcd, client) = single().await;
    let name = unique("cancel");
    let prefix = format!("{name}/");
    let s = session(&client, 10).await;
    let b = DoubleBarrier::new(&s, name.clone(), 3).unwrap();
    // Two of three arrive and give up, many times, at random points.
    for _ in 0..15 {
        let ms = rand::thread_rng().gen_range(0..=40);
        let (x, y) = tokio::join!(
            tokio::time::timeout(Duration::from_millis(ms), b.enter()),
            tokio::time::timeout(Duration::from_millis(40 - ms), b.enter()),
        );
        assert!(x.is_err() && y.is_err(), "two of three never enter");
    }
    key_count_becomes(&client, &prefix, 0, Duration::from_secs(10), "no keys left").await;

    // The cancelled ones were not counted: three fresh participants fill round 0.
    let mut rounds = full_round(&client, &name, 3).await;
    assert!(rounds.iter().all(|(r, _)| r.round() == 0));
    // Two leave with a deadline that expires, because the third is still working.
    let (third, third_session) = rounds.pop().unwrap();
    for (r, _s) in rounds {
        let gave_up = tokio::time::timeout(Duration::from_millis(200), r.leave()).await;
        assert!(gave_up.is_err(), "leave waits for the third member");
    }
    // The third is the last one there and leaves at once.
    within(Duration::from_secs(5), "third leaves", third.leave())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "only the round number left",
        || {
            let (c, p) = (client.clone(), prefix.clone());
            async move { keys(&c, &p).await == vec![format!("{p}round")] }
        },
    )
    .await;
    drop(third_session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_participant_waits_for_and_joins_the_next_round() {
    let (_etcd, client) = single().await;
    let name = unique("extra");
    let enter = |s: etcd_coord::Session| {
        let b = DoubleBarrier::new(&s, name.clone(), 2).unwrap();
        tokio::spawn(async move { (b.enter().await.unwrap(), s) })
    };
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(enter(session(&client, 10).await));
    }
    // Two of the three fill round 0; the third moves on to round 1 and waits there.
    eventually(
        Duration::from_secs(5),
        "round 0 full, one waiting in round 1",
        || {
            let (c, n) = (client.clone(), name.clone());
            async move { keys(&c, &format!("{n}/1/")).await.len() == 1 }
        },
    )
    .await;
    eventually(Duration::from_secs(5), "two have entered round 0", || {
        let done = first.iter().filter(|t| t.is_finished()).count();
        async move { done == 2 }
    })
    .await;
    let mut round0 = Vec::new();
    let mut waiting = Vec::new();
    for t in first {
        if t.is_finished() {
            round0.push(t.await.unwrap());
        } else {
            waiting.push(t);
        }
    }
    assert_eq!(round0.len(), 2, "exactly `count` entered round 0");
    assert!(round0.iter().all(|(r, _)| r.round() == 0));
    assert_eq!(waiting.len(), 1);
    assert_eq!(keys(&client, &format!("{name}/0/")).await.len(), 2);
    let fourth = enter(session(&client, 10).await);
    for t in [waiting.pop().unwrap(), fourth] {
        let (r, _s) = within(Duration::from_secs(5), "round 1 fills", t)
            .await
            .unwrap();
        assert_eq!(r.round(), 1);
        drop(r);
    }
    let leaving: Vec<_> = round0
        .into_iter()
        .map(|(r, s)| tokio::spawn(async move { (r.leave().await, s) }))
        .collect();
    for l in leaving {
        within(Duration::from_secs(5), "round 0 leaves", l)
            .await
            .unwrap()
            .0
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_of_zero_or_too_many_is_rejected_naming_count() {
    let (_etcd, client) = single().await;
    let s = session(&client, 5).await;
    for bad in [0, DoubleBarrier::MAX_COUNT + 1] {
        match DoubleBarrier::new(&s, "workers", bad) {
            Err(Error::InvalidArgument { name: "count", .. }) => {}
            other => panic!("count {bad} gave {other:?}"),
        }
    }
    let one = DoubleBarrier::new(&s, unique("solo"), 1).unwrap();
    for k in 0..3 {
        let r = within(Duration::from_secs(2), "a round of one", one.enter())
            .await
            .unwrap();
        assert_eq!(r.round(), k);
        r.leave().await.unwrap();
    }
    DoubleBarrier::new(&s, "workers", DoubleBarrier::MAX_COUNT).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_barrier_requests_match_the_cost_model() {
    let (etcd, client) = single().await;
    if skip_unless_local(&etcd, "double_barrier_requests_match_the_cost_model") {
        return;
    }
    const N: usize = 5;
    let name = unique("cost");
    let mut barriers = Vec::new();
    for _ in 0..N {
        let s = session(&client, 10).await;
        barriers.push(DoubleBarrier::new(&s, name.clone(), N).unwrap());
    }
    // Round 0 teaches every handle the round number; round 1 is the steady state.
    for round in 0..2 {
        let (_, cost) = requests(&etcd, async {
            let tasks: Vec<_> = barriers
                .iter()
                .cloned()
                .map(|b| tokio::spawn(async move { b.enter().await.unwrap().leave().await }))
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        })
        .await;
        eprintln!("round {round} of {N}: {} requests", kv_requests(&cost));
        // Per participant: join + (seal | one read on wake) + leave + one read on wake; the
        // first member reads once per departure it is woken by (at most N - 1) and deletes.
        let bound = (5 * N - 1) as u64;
        let used = kv_requests(&cost);
        assert!(
            used <= bound,
            "round {round}: {used} requests > {bound}: {cost:?}"
        );
    }
}
