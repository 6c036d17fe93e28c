//! MultiLock: all-or-nothing, canonical order, no deadlock, everything released on failure.
#![cfg(feature = "testing")]

mod common;

use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Txn, TxnOp};
use etcd_coord::{Error, Lockable, MultiLock, Mutex, RwLock, Semaphore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_locking_overlapping_sets_in_opposite_order_both_finish() {
    let (etcd, _client) = single().await;
    let base = unique("multi");
    let names = [
        format!("{base}/a"),
        format!("{base}/b"),
        format!("{base}/c"),
    ];
    let mut tasks = Vec::new();
    for order in [[0usize, 1, 2], [2, 1, 0]] {
        let client = connect(&etcd).await;
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            let s = session(&client, 10).await;
            for _ in 0..25 {
                let parts: Vec<Lockable> = order
                    .iter()
                    .map(|&i| Mutex::new(&s, names[i].clone()).unwrap().into())
                    .collect();
                let all = MultiLock::new(parts).unwrap().lock().await.unwrap();
                all.txn(Txn::new().and_then([TxnOp::put(
                    format!("{}-ledger", names[0]),
                    "x",
                    None,
                )]))
                .await
                .unwrap();
                all.unlock().await.unwrap();
            }
        }));
    }
    for t in tasks {
        within(Duration::from_secs(60), "both finish without deadlock", t)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_part_releases_the_parts_already_taken() {
    let (_etcd, client) = single().await;
    let base = unique("multi-fail");
    let s = session(&client, 10).await;
    // The semaphore was created with 1 permit; this handle says 2, so it fails with Conflict.
    let sem_name = format!("{base}/z-sem");
    Semaphore::new(&s, sem_name.clone(), 1)
        .unwrap()
        .acquire()
        .await
        .unwrap()
        .unlock()
        .await
        .unwrap();
    let all = MultiLock::new([
        Lockable::from(Mutex::new(&s, format!("{base}/a")).unwrap()),
        Lockable::Write(RwLock::new(&s, format!("{base}/b")).unwrap()),
        Lockable::from(Semaphore::new(&s, sem_name, 2).unwrap()),
    ])
    .unwrap();
    assert!(matches!(all.lock().await, Err(Error::Conflict(_))));
    // Only the semaphore's recorded permit count (the key `{base}/z-sem`) may remain.
    eventually(Duration::from_secs(5), "parts released", || {
        let (c, p) = (client.clone(), format!("{base}/"));
        let meta = format!("{base}/z-sem");
        async move { keys(&c, &p).await == vec![meta] }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_future_midway_releases_everything() {
    let (_etcd, client) = single().await;
    let base = unique("multi-drop");
    let other = session(&client, 10).await;
    let blocker = Mutex::new(&other, format!("{base}/b"))
        .unwrap()
        .lock()
        .await
        .unwrap();
    let s = session(&client, 10).await;
    let all = MultiLock::new([
        Mutex::new(&s, format!("{base}/a")).unwrap(),
        Mutex::new(&s, format!("{base}/b")).unwrap(),
    ])
    .unwrap();
    assert_eq!(all.names(), vec![format!("{base}/a"), format!("{base}/b")]);
    let attempt = tokio::time::timeout(Duration::from_millis(300), all.lock()).await;
    assert!(attempt.is_err(), "b is held elsewhere");
    eventually(
        Duration::from_secs(5),
        "a released, only the blocker left",
        || {
            let (c, p) = (client.clone(), format!("{base}/"));
            async move { keys(&c, &p).await.len() == 1 }
        },
    )
    .await;
    blocker.unlock().await.unwrap();
    within(Duration::from_secs(5), "now it locks", all.lock())
        .await
        .unwrap()
        .unlock()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_duplicate_sets_are_rejected() {
    let (_etcd, client) = single().await;
    let s = session(&client, 10).await;
    assert!(matches!(
        MultiLock::new(Vec::<Lockable>::new()),
        Err(Error::InvalidArgument { name: "locks", .. })
    ));
    let name = unique("dup");
    assert!(matches!(
        MultiLock::new([
            Lockable::from(Mutex::new(&s, name.clone()).unwrap()),
            Lockable::Read(RwLock::new(&s, name).unwrap()),
        ]),
        Err(Error::InvalidArgument { name: "locks", .. })
    ));
}
