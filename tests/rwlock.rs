//! RwLock: readers share, writers exclude, arrival order is fair, dead waiters never acquire.
#![cfg(feature = "testing")]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::occupancy::Room;
use common::*;
use etcd_coord::{Error, RwLock};
use rand::Rng;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_with_cancellations_and_revocations_never_mixes_a_writer_with_anyone() {
    let (etcd, client) = single().await;
    let name = unique("rw-stress");
    let room = Arc::new(Room::new(&name));
    let (entries, violations) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let client = connect(&etcd).await;
        let (name, room) = (name.clone(), room.clone());
        let (entries, violations) = (entries.clone(), violations.clone());
        tasks.push(tokio::spawn(async move {
            let mut session = session(&client, 10).await;
            for op in 0..40 {
                let lock = RwLock::new(&session, name.clone()).unwrap();
                let (write, cancel_after, revoke) = {
                    let mut rng = rand::thread_rng();
                    (
                        rng.gen_bool(0.3),
                        rng.gen_bool(0.2).then(|| rng.gen_range(0..30)),
                        rng.gen_bool(0.05),
                    )
                };
                let attempt = async {
                    if write {
                        lock.write().await
                    } else {
                        lock.read().await
                    }
                };
                let guard = match cancel_after {
                    Some(ms) => {
                        match tokio::time::timeout(Duration::from_millis(ms), attempt).await {
                            Ok(g) => g,
                            Err(_) => continue,
                        }
                    }
                    None => attempt.await,
                };
                let guard = match guard {
                    Ok(g) => g,
                    Err(Error::SessionExpired(_) | Error::NotHeld { .. }) => continue,
                    Err(e) => panic!("worker {worker} op {op}: {e}"),
                };
                let kind = if write { "w" } else { "r" };
                if let Some(inside) = room.enter(&guard, kind).await {
                    entries.fetch_add(1, Ordering::Relaxed);
                    let bad = if write {
                        !inside.is_empty()
                    } else {
                        inside.iter().any(|k| k == "w")
                    };
                    if bad {
                        violations.fetch_add(1, Ordering::Relaxed);
                        eprintln!("violation: {kind} entered with {inside:?} inside");
                    }
                }
                if revoke {
                    // Die mid-section, as a paused or partitioned holder would.
                    client
                        .clone()
                        .lease_revoke(session.lease_id())
                        .await
                        .unwrap();
                    drop(guard);
                    session = common::session(&client, 10).await;
                    continue;
                }
                tokio::task::yield_now().await;
                room.leave(&guard).await;
                match guard.unlock().await {
                    Ok(()) | Err(Error::NotHeld { .. }) => {}
                    Err(e) => panic!("unlock: {e}"),
                }
            }
            session
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(within(Duration::from_secs(120), "stress", t).await.unwrap());
    }
    let entered = entries.load(Ordering::Relaxed);
    eprintln!("{entered} critical sections entered");
    assert!(entered > 100, "the stress made progress: {entered}");
    assert_eq!(violations.load(Ordering::Relaxed), 0);
    key_count_becomes(
        &client,
        &format!("{name}/"),
        0,
        Duration::from_secs(15),
        "no stray keys",
    )
    .await;
    for s in sessions {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writer_is_not_starved_by_a_continuous_stream_of_readers() {
    let (etcd, client) = single().await;
    let name = unique("starve");
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    // Four readers whose sections overlap, so that without fairness the lock is never free.
    for _ in 0..4 {
        let client = connect(&etcd).await;
        let (name, stop, reads) = (name.clone(), stop.clone(), reads.clone());
        readers.push(tokio::spawn(async move {
            let s = session(&client, 10).await;
            let lock = RwLock::new(&s, name).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let g = lock.read().await.unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(30)).await;
                g.unlock().await.unwrap();
            }
        }));
    }
    eventually(Duration::from_secs(5), "readers are reading", || {
        let r = reads.clone();
        async move { r.load(Ordering::Relaxed) > 10 }
    })
    .await;
    let s = session(&client, 10).await;
    let lock = RwLock::new(&s, name.clone()).unwrap();
    let w = within(Duration::from_secs(5), "the writer gets in", lock.write())
        .await
        .unwrap();
    // While the writer holds, no reader can: nobody else is in the queue ahead or beside it.
    assert!(matches!(
        lock.try_read().await,
        Err(Error::WouldBlock { .. })
    ));
    w.unlock().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        within(Duration::from_secs(5), "readers stop", r)
            .await
            .unwrap();
    }
}

/// etcd issue 16221: in Go's recipes RWMutex, a waiting writer whose lease dies is later handed
/// the lock alongside another writer. Here it fails, and only the live writer ever holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_writer_whose_lease_dies_never_acquires() {
    let (_etcd, client) = single().await;
    let name = unique("16221");
    let prefix = format!("{name}/");
    let rs = session(&client, 10).await;
    let reader = RwLock::new(&rs, name.clone())
        .unwrap()
        .read()
        .await
        .unwrap();
    let s1 = session(&client, 10).await;
    let s2 = session(&client, 10).await;
    let w1 = {
        let l = RwLock::new(&s1, name.clone()).unwrap();
        tokio::spawn(async move { l.write().await })
    };
    key_count_becomes(
        &client,
        &prefix,
        2,
        Duration::from_secs(5),
        "first writer queued",
    )
    .await;
    let w2 = {
        let l = RwLock::new(&s2, name.clone()).unwrap();
        tokio::spawn(async move { l.write().await })
    };
    key_count_becomes(
        &client,
        &prefix,
        3,
        Duration::from_secs(5),
        "second writer queued",
    )
    .await;
    client.clone().lease_revoke(s1.lease_id()).await.unwrap();
    let first = within(Duration::from_secs(10), "dead writer returns", w1)
        .await
        .unwrap();
    assert!(
        first.is_err(),
        "a writer whose lease died acquired: {first:?}"
    );
    reader.unlock().await.unwrap();
    let second = within(Duration::from_secs(10), "live writer acquires", w2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(keys(&client, &prefix).await, vec![second.key().to_string()]);
    second.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_read_and_try_write_cost_one_request_and_leave_nothing_when_blocked() {
    let (_etcd, client) = single().await;
    let name = unique("rw-try");
    let prefix = format!("{name}/");
    let s = session(&client, 10).await;
    let lock = RwLock::new(&s, name.clone()).unwrap();
    let r1 = lock.try_read().await.unwrap();
    let r2 = lock.try_read().await.unwrap();
    assert!(matches!(
        lock.try_write().await,
        Err(Error::WouldBlock { .. })
    ));
    assert_eq!(keys(&client, &prefix).await.len(), 2);
    r1.unlock().await.unwrap();
    r2.unlock().await.unwrap();
    let w = lock.try_write().await.unwrap();
    assert!(matches!(
        lock.try_read().await,
        Err(Error::WouldBlock { .. })
    ));
    assert_eq!(keys(&client, &prefix).await, vec![w.key().to_string()]);
    w.unlock().await.unwrap();
    assert!(matches!(
        RwLock::new(&s, ""),
        Err(Error::InvalidArgument { name: "name", .. })
    ));
}
