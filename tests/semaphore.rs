//! Semaphore: never more than N holders, permits come back from crashed holders, the count is
//! recorded and checked.
#![cfg(feature = "testing")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::occupancy::Room;
use common::*;
use etcd_coord::{Error, Semaphore};
use rand::Rng;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_never_admits_more_than_n_holders() {
    let (etcd, client) = single().await;
    let name = unique("sem-stress");
    let permits = 3;
    let room = Arc::new(Room::new(&name));
    let (entries, most, violations) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = connect(&etcd).await;
        let (name, room) = (name.clone(), room.clone());
        let (entries, most, violations) = (entries.clone(), most.clone(), violations.clone());
        tasks.push(tokio::spawn(async move {
            let mut session = session(&client, 10).await;
            for _ in 0..40 {
                let sem = Semaphore::new(&session, name.clone(), permits).unwrap();
                let (cancel_after, revoke) = {
                    let mut rng = rand::thread_rng();
                    (
                        rng.gen_bool(0.2).then(|| rng.gen_range(0..30)),
                        rng.gen_bool(0.05),
                    )
                };
                let guard = match cancel_after {
                    Some(ms) => {
                        match tokio::time::timeout(Duration::from_millis(ms), sem.acquire()).await {
                            Ok(g) => g,
                            Err(_) => continue,
                        }
                    }
                    None => sem.acquire().await,
                };
                let guard = match guard {
                    Ok(g) => g,
                    Err(Error::SessionExpired(_) | Error::NotHeld { .. }) => continue,
                    Err(e) => panic!("{e}"),
                };
                if let Some(inside) = room.enter(&guard, "p").await {
                    entries.fetch_add(1, Ordering::Relaxed);
                    most.fetch_max(inside.len() + 1, Ordering::Relaxed);
                    if inside.len() >= permits {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if revoke {
                    client
                        .clone()
                        .lease_revoke(session.lease_id())
                        .await
                        .unwrap();
                    drop(guard);
                    session = common::session(&client, 10).await;
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                room.leave(&guard).await;
                let _ = guard.unlock().await;
            }
            session
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(within(Duration::from_secs(120), "stress", t).await.unwrap());
    }
    let (entered, most) = (
        entries.load(Ordering::Relaxed),
        most.load(Ordering::Relaxed),
    );
    eprintln!("{entered} sections entered, at most {most} at once");
    assert!(entered > 100);
    assert_eq!(
        violations.load(Ordering::Relaxed),
        0,
        "more than {permits} holders"
    );
    assert!(most <= permits);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_of_a_crashed_holder_comes_back_when_its_lease_ends() {
    let (_etcd, client) = single().await;
    let name = unique("sem-crash");
    let crashed = session(&client, 2).await;
    let first = Semaphore::new(&crashed, name.clone(), 1)
        .unwrap()
        .acquire()
        .await
        .unwrap();
    // A crash: the keepalive stops, nobody unlocks, the lease runs out on the server.
    std::mem::forget(first);
    crashed.orphan();
    let s = session(&client, 10).await;
    let sem = Semaphore::new(&s, name.clone(), 1).unwrap();
    let started = tokio::time::Instant::now();
    let g = within(
        Duration::from_secs(6),
        "permit returns after the TTL",
        sem.acquire(),
    )
    .await
    .unwrap();
    eprintln!("permit came back after {:?}", started.elapsed());
    g.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_permit_count_is_enforced_and_bad_counts_are_rejected() {
    let (_etcd, client) = single().await;
    let name = unique("sem-count");
    let s = session(&client, 10).await;
    let two = Semaphore::new(&s, name.clone(), 2).unwrap();
    let a = two.acquire().await.unwrap();
    let b = two.try_acquire().await.unwrap();
    assert!(matches!(
        two.try_acquire().await,
        Err(Error::WouldBlock { .. })
    ));
    assert_eq!(
        keys(&client, &format!("{name}/")).await.len(),
        2,
        "a failed try leaves nothing"
    );
    let three = Semaphore::new(&s, name.clone(), 3).unwrap();
    match three.acquire().await {
        Err(Error::Conflict(m)) => assert!(m.contains('2') && m.contains('3'), "{m}"),
        other => panic!("mismatched count gave {other:?}"),
    }
    eventually(
        Duration::from_secs(5),
        "the rejected attempt leaves no key",
        || {
            let (c, p) = (client.clone(), format!("{name}/"));
            async move { keys(&c, &p).await.len() == 2 }
        },
    )
    .await;
    a.unlock().await.unwrap();
    b.unlock().await.unwrap();
    for bad in [0, etcd_coord::MAX_PERMITS + 1] {
        assert!(matches!(
            Semaphore::new(&s, name.clone(), bad),
            Err(Error::InvalidArgument {
                name: "permits",
                ..
            })
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_let_in_as_permits_free_up_in_any_order() {
    let (_etcd, client) = single().await;
    let name = unique("sem-order");
    let s = session(&client, 10).await;
    let sem = Semaphore::new(&s, name.clone(), 2).unwrap();
    let h1 = sem.acquire().await.unwrap();
    let h2 = sem.acquire().await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let sem = sem.clone();
        waiters.push(tokio::spawn(async move { sem.acquire().await.unwrap() }));
        let n = waiters.len() + 2;
        key_count_becomes(
            &client,
            &format!("{name}/"),
            n,
            Duration::from_secs(5),
            "queued",
        )
        .await;
    }
    // The newer holder leaves first: the oldest waiter must notice though it was not the key
    // just ahead of anyone.
    h2.unlock().await.unwrap();
    let w1 = within(Duration::from_secs(5), "first waiter", waiters.remove(0))
        .await
        .unwrap();
    h1.unlock().await.unwrap();
    let w2 = within(Duration::from_secs(5), "second waiter", waiters.remove(0))
        .await
        .unwrap();
    w1.unlock().await.unwrap();
    let w3 = within(Duration::from_secs(5), "third waiter", waiters.remove(0))
        .await
        .unwrap();
    assert!(w2.fencing_token() < w3.fencing_token());
    w2.unlock().await.unwrap();
    w3.unlock().await.unwrap();
}
