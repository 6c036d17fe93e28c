//! Queue and PriorityQueue: order, waiting, competing consumers, cancel safety, bad input.
#![cfg(feature = "testing")]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use etcd_coord::{Error, PriorityQueue, Queue, DEFAULT_MAX_REQUEST_BYTES};
use tokio::time::Instant;

fn expect_invalid<T: std::fmt::Debug>(result: etcd_coord::Result<T>, arg: &str) {
    match result {
        Err(Error::InvalidArgument { name, .. }) if name == arg => {}
        other => panic!("expected InvalidArgument naming `{arg}`, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_come_out_in_push_order_and_len_peek_try_pop_agree() {
    let (_etcd, client) = single().await;
    let s = session(&client, 10).await;
    let q = Queue::new(&s, unique("fifo")).unwrap();
    assert_eq!(q.len().await.unwrap(), 0);
    assert_eq!(q.peek().await.unwrap(), None);
    assert_eq!(q.try_pop().await.unwrap(), None);
    for n in 0..40 {
        q.push(format!("item-{n}")).await.unwrap();
    }
    assert_eq!(q.len().await.unwrap(), 40);
    assert_eq!(q.peek().await.unwrap().unwrap(), b"item-0");
    for n in 0..40 {
        let item = if n % 2 == 0 {
            q.pop().await.unwrap()
        } else {
            q.try_pop().await.unwrap().unwrap()
        };
        assert_eq!(item, format!("item-{n}").as_bytes());
    }
    assert_eq!(q.len().await.unwrap(), 0);
    assert_eq!(q.try_pop().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop_waits_for_a_push() {
    let (_etcd, client) = single().await;
    let name = unique("wait");
    let s1 = session(&client, 10).await;
    let s2 = session(&client, 10).await;
    let consumer = Queue::new(&s1, name.clone()).unwrap();
    let producer = Queue::new(&s2, name.clone()).unwrap();
    let waiting = tokio::spawn(async move { consumer.pop().await });
    // The consumer's watch is open once etcd counts a watcher for it.
    eventually(Duration::from_secs(5), "consumer watching", || async {
        let m = _etcd.metrics(0).await.unwrap();
        m.counter("etcd_debugging_mvcc_watcher_total") >= 1.0
    })
    .await;
    producer.push("wake up").await.unwrap();
    let item = within(Duration::from_secs(5), "pop after push", waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(item, b"wake up");
    assert_eq!(producer.len().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priorities_come_out_first_and_fifo_within_a_priority() {
    let (_etcd, client) = single().await;
    let s = session(&client, 10).await;
    let q = PriorityQueue::new(&s, unique("prio")).unwrap();
    // More items at one priority than one read lists, so the order within it must come from
    // etcd's create revisions, not from the random part of the keys.
    for n in 0..20 {
        q.push(format!("low-{n}"), 1).await.unwrap();
    }
    q.push("top", u16::MAX).await.unwrap();
    for n in 0..20 {
        q.push(format!("mid-{n}"), 500).await.unwrap();
    }
    q.push("bottom", 0).await.unwrap();
    assert_eq!(q.len().await.unwrap(), 42);
    assert_eq!(q.peek().await.unwrap().unwrap(), b"top");
    let mut expected = vec!["top".to_string()];
    expected.extend((0..20).map(|n| format!("mid-{n}")));
    // A higher priority pushed midway is served next.
    expected.extend((0..5).map(|n| format!("low-{n}")));
    expected.push("urgent".into());
    expected.extend((5..20).map(|n| format!("low-{n}")));
    expected.push("bottom".into());
    for (i, want) in expected.iter().enumerate() {
        if i == 26 {
            q.push("urgent", 2).await.unwrap();
        }
        let got = q.try_pop().await.unwrap().expect("an item");
        assert_eq!(String::from_utf8(got).unwrap(), *want, "item {i}");
    }
    assert_eq!(q.try_pop().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_competing_consumers_pop_every_item_exactly_once() {
    let (_etcd, client) = single().await;
    let name = unique("compete");
    let producer = Queue::new(&session(&client, 10).await, name.clone()).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let q = Queue::new(&session(&client, 10).await, name.clone()).unwrap();
        let seen = seen.clone();
        consumers.push(tokio::spawn(async move {
            loop {
                let item = q.pop().await.unwrap();
                seen.lock().unwrap().push(String::from_utf8(item).unwrap());
            }
        }));
    }
    for n in 0..200 {
        producer.push(format!("item-{n}")).await.unwrap();
    }
    eventually(Duration::from_secs(20), "all items popped", || async {
        seen.lock().unwrap().len() >= 200
    })
    .await;
    for c in &consumers {
        c.abort();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 200, "no item popped twice");
    let distinct: HashSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), 200);
    assert_eq!(producer.len().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pop_takes_nothing() {
    let (_etcd, client) = single().await;
    let name = unique("dropped");
    let s = session(&client, 10).await;
    let q = Queue::new(&s, name.clone()).unwrap();
    let p = PriorityQueue::new(&s, format!("{name}-prio")).unwrap();

    // Dropped while waiting on an empty queue.
    assert!(tokio::time::timeout(Duration::from_millis(200), q.pop())
        .await
        .is_err());
    q.push("kept").await.unwrap();
    assert_eq!(q.try_pop().await.unwrap().unwrap(), b"kept");

    // Dropped at every point of a pop, including while the delete is in flight: the item is
    // either returned or put back (an abandoned pop whose delete committed restores it).
    let mut restored = 0;
    for step in 0..30u64 {
        let item = format!("item-{step}");
        q.push(item.clone()).await.unwrap();
        p.push(item.clone(), 7).await.unwrap();
        let cut = Duration::from_micros(step * 150);
        let mut returned = 0;
        let popped = [
            tokio::time::timeout(cut, q.pop()).await,
            tokio::time::timeout(cut, p.pop()).await,
        ];
        // An expired timeout (the pop was dropped) is `Err`.
        for value in popped.into_iter().flatten() {
            assert_eq!(value.unwrap(), item.as_bytes());
            returned += 1;
        }
        // Whatever was not returned is (or comes back) in its queue.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut first = true;
        while q.len().await.unwrap() + p.len().await.unwrap() + returned != 2 {
            if first {
                restored += 1;
                first = false;
            }
            assert!(Instant::now() < deadline, "step {step}: an item was lost");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for left in [q.try_pop().await.unwrap(), p.try_pop().await.unwrap()]
            .into_iter()
            .flatten()
        {
            assert_eq!(left, item.as_bytes());
        }
    }
    eprintln!("steps where an abandoned pop's item was being put back: {restored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_the_argument_named() {
    let (_etcd, client) = single().await;
    let name = unique("bad");
    let s = session(&client, 10).await;
    expect_invalid(Queue::new(&s, ""), "name");
    expect_invalid(Queue::new(&s, "ends/"), "name");
    expect_invalid(PriorityQueue::new(&s, "tab\there"), "name");
    expect_invalid(PriorityQueue::new(&s, "x".repeat(2000)), "name");
    expect_invalid(
        Queue::new(&s, name.clone()).unwrap().max_request_bytes(10),
        "max_request_bytes",
    );
    let q = Queue::new(&s, name.clone()).unwrap();
    expect_invalid(q.push(vec![0u8; DEFAULT_MAX_REQUEST_BYTES]).await, "value");
    let p = PriorityQueue::new(&s, format!("{name}-p")).unwrap();
    expect_invalid(
        p.push(vec![0u8; DEFAULT_MAX_REQUEST_BYTES], 1).await,
        "value",
    );
    assert_eq!(q.len().await.unwrap(), 0);

    // The largest value let through is accepted by etcd (white box: an item key is the name,
    // '/' and 32 hex digits).
    let largest = DEFAULT_MAX_REQUEST_BYTES - 512 - (name.len() + 1 + 32);
    expect_invalid(q.push(vec![1u8; largest + 1]).await, "value");
    let value: Vec<u8> = (0..largest).map(|i| (i % 253) as u8).collect();
    q.push(value.clone()).await.unwrap();
    assert!(q.pop().await.unwrap() == value);
}
