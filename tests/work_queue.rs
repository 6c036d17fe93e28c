//! WorkQueue: at-least-once delivery across crashing processes, fencing, dead letters, order,
//! delays, cancel safety, cost per job and bad input.
#![cfg(feature = "testing")]

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Client, GetOptions, TxnOp};
use etcd_coord::testing::{EtcdCluster, Metrics};
use etcd_coord::{Error, JobOptions, QueueStats, WorkQueue, DEFAULT_MAX_REQUEST_BYTES};
use rand::Rng;
use tokio::process::{Child, Command};
use tokio::time::Instant;

fn queue(session: &etcd_coord::Session, name: &str) -> WorkQueue {
    WorkQueue::new(session, name).unwrap()
}

fn stats(ready: u64, in_flight: u64, delayed: u64, dead: u64) -> QueueStats {
    let mut s = QueueStats::default();
    s.ready = ready;
    s.in_flight = in_flight;
    s.delayed = delayed;
    s.dead = dead;
    s
}

async fn count(client: &Client, prefix: &str) -> i64 {
    client
        .clone()
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count()
}

/// Requests of the KV and Watch services (what a queue sends; keepalives and lease grants are
/// the sessions' business).
fn kv_requests(m: &Metrics) -> u64 {
    ["Range", "Txn", "Put", "DeleteRange", "Watch"]
        .iter()
        .map(|method| m.get(method))
        .sum()
}

fn expect_invalid<T: std::fmt::Debug>(result: etcd_coord::Result<T>, arg: &str) {
    match result {
        Err(Error::InvalidArgument { name, .. }) if name == arg => {}
        other => panic!("expected InvalidArgument naming `{arg}`, got {other:?}"),
    }
}

/// Child processes that are killed however the test ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.start_kill();
        }
    }
}

fn process(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_work_queue_process"))
        .args(args)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start work_queue_process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_producer_and_four_consumer_processes_with_five_sigkills_ack_every_job_exactly_once() {
    let (etcd, client) = single().await;
    let started = Instant::now();
    let name = unique("processes");
    let results = format!("{name}-results/");
    let endpoints = etcd.endpoints().join(",");
    let consume = || process(&["consume", &endpoints, &name, &results, "4"]);
    let mut consumers = Processes((0..4).map(|_| consume()).collect());
    let mut producers = Processes(
        (0..4)
            .map(|p| process(&["produce", &endpoints, &name, &format!("p{p}"), "500"]))
            .collect(),
    );

    let progress = {
        let (client, results) = (client.clone(), results.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let n = count(&client, &results).await;
                eprintln!("after {:?}: {n} results", t0.elapsed());
            }
        })
    };
    eventually(Duration::from_secs(30), "the first results", || async {
        count(&client, &results).await >= 50
    })
    .await;
    let mut kills = Vec::new();
    for _ in 0..5 {
        // Chaos at random moments: the timing is the fault injected, not a synchronisation.
        let pause = rand::thread_rng().gen_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let victim = rand::thread_rng().gen_range(0..consumers.0.len());
        consumers.0[victim]
            .kill()
            .await
            .expect("SIGKILL a consumer");
        kills.push(count(&client, &results).await);
        consumers.0[victim] = consume();
    }
    for producer in &mut producers.0 {
        let status = within(Duration::from_secs(30), "producer exits", producer.wait())
            .await
            .unwrap();
        assert!(status.success(), "producer failed: {status}");
    }
    eprintln!("producers done after {:?}", started.elapsed());
    eventually(Duration::from_secs(40), "2000 results", || async {
        count(&client, &results).await == 2000
    })
    .await;
    progress.abort();
    drop(consumers);

    let resp = client
        .clone()
        .get(results.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut payloads: HashMap<String, usize> = HashMap::new();
    for kv in resp.kvs() {
        // One put per result key: the fenced ack committed exactly once for this job.
        assert_eq!(
            kv.version(),
            1,
            "{} was written twice",
            kv.key_str().unwrap()
        );
        *payloads
            .entry(kv.value_str().unwrap().to_string())
            .or_default() += 1;
    }
    for p in 0..4 {
        for n in 0..500 {
            assert_eq!(
                payloads.get(&format!("p{p}-{n}")),
                Some(&1),
                "job p{p}-{n} acked once"
            );
        }
    }
    assert_eq!(payloads.len(), 2000);
    let observer = session(&client, 10).await;
    assert_eq!(
        queue(&observer, &name).stats().await.unwrap(),
        stats(0, 0, 0, 0)
    );
    for part in ["jobs/", "data/", "claims/", "delayed/", "dead/"] {
        assert!(
            keys(&client, &format!("{name}/{part}")).await.is_empty(),
            "{part}"
        );
    }
    eprintln!(
        "2000 jobs, 4 producers, 4 consumers, SIGKILLs at {kills:?} results: done in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_failing_ends_in_the_dead_letters_and_can_be_requeued() {
    let (_etcd, client) = single().await;
    let name = unique("poison");
    let s = session(&client, 10).await;
    let q = WorkQueue::builder(&s, &name)
        .max_attempts(3)
        .build()
        .unwrap();
    let id = q.push("poison").await.unwrap();

    // The consumer helper nacks every failure; the third failure moves the job.
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let consumer = q.consumer().concurrency(2);
    let stop = async {
        eventually(Duration::from_secs(10), "job dead-lettered", || async {
            q.stats().await.unwrap().dead == 1
        })
        .await
    };
    consumer
        .run_until(stop, move |job| {
            seen.lock().unwrap().push(job.attempt());
            async move { Err::<Vec<TxnOp>, _>("always fails") }
        })
        .await
        .unwrap();
    assert_eq!(*attempts.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(q.stats().await.unwrap(), stats(0, 0, 0, 1));
    assert!(q.try_claim().await.unwrap().is_none());

    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].payload, b"poison");

    assert!(q.requeue_dead_letter(&id).await.unwrap());
    assert!(!q.requeue_dead_letter(&id).await.unwrap(), "only once");
    let claim = q.try_claim().await.unwrap().expect("requeued job");
    assert_eq!(
        (claim.id(), claim.attempt(), claim.payload()),
        (id.as_str(), 1, &b"poison"[..])
    );
    claim.ack().await.unwrap();
    assert_eq!(q.stats().await.unwrap(), stats(0, 0, 0, 0));

    // A job that dies on its last attempt with its consumer is dead-lettered by the next
    // consumer that sees it; it can also be deleted for good.
    let q1 = WorkQueue::builder(&s, &name)
        .max_attempts(1)
        .build()
        .unwrap();
    let id = q1.push("crashes").await.unwrap();
    drop(q1.try_claim().await.unwrap().expect("claimed"));
    eventually(Duration::from_secs(5), "dead-lettered", || async {
        q1.try_claim().await.unwrap().is_none() && q1.stats().await.unwrap().dead == 1
    })
    .await;
    assert!(q1.delete_dead_letter(&id).await.unwrap());
    assert!(keys(&client, &format!("{name}/"))
        .await
        .iter()
        .all(|k| k.contains("/idle/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_consumer_sees_strict_fifo_within_a_priority_and_higher_priorities_first() {
    let (_etcd, client) = single().await;
    let name = unique("order");
    let s = session(&client, 10).await;
    let q = queue(&s, &name);
    for n in 0..40 {
        q.push(format!("job-{n}")).await.unwrap();
    }
    for n in 0..40 {
        let claim = q.try_claim().await.unwrap().expect("a job");
        assert_eq!(claim.payload(), format!("job-{n}").as_bytes());
        claim.ack().await.unwrap();
    }
    assert!(q.try_claim().await.unwrap().is_none());

    let pushes = [
        ("low-1", 1),
        ("high-1", 9),
        ("mid-1", 5),
        ("high-2", 9),
        ("low-2", 1),
        ("mid-2", 5),
        ("high-3", 9),
    ];
    for (payload, priority) in pushes {
        q.push_with(payload, JobOptions::new().priority(priority))
            .await
            .unwrap();
    }
    let mut order = Vec::new();
    // The consumer helper with one handler claims in the same order.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    q.consumer()
        .run_until(
            eventually(Duration::from_secs(10), "all handled", || async {
                seen.lock().unwrap().len() == pushes.len()
            }),
            move |job| {
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8(job.payload().to_vec()).unwrap());
                async { Ok::<_, String>(Vec::new()) }
            },
        )
        .await
        .unwrap();
    order.extend(seen.lock().unwrap().iter().cloned());
    assert_eq!(
        order,
        ["high-1", "high-2", "high-3", "mid-1", "mid-2", "low-1", "low-2"]
    );
    assert_eq!(q.stats().await.unwrap(), stats(0, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_is_not_delivered_before_its_time_and_a_nack_can_delay() {
    let (_etcd, client) = single().await;
    let name = unique("delayed");
    let s = session(&client, 10).await;
    let q = queue(&s, &name);
    let delay = Duration::from_millis(1500);
    let pushed = Instant::now();
    q.push_with("later", JobOptions::new().delay(delay))
        .await
        .unwrap();
    q.push("now").await.unwrap();
    assert_eq!(q.stats().await.unwrap(), stats(1, 0, 1, 0));

    let first = q.claim().await.unwrap();
    assert_eq!(first.payload(), b"now");
    first.ack().await.unwrap();
    assert!(q.try_claim().await.unwrap().is_none(), "not visible yet");

    // Elapsed time is the property here: the claim waits on a timer, not on a poll.
    let later = within(Duration::from_secs(10), "delayed job", q.claim())
        .await
        .unwrap();
    let waited = pushed.elapsed();
    assert_eq!(later.payload(), b"later");
    assert!(waited >= delay, "delivered after {waited:?}");
    assert!(
        waited < delay + Duration::from_secs(3),
        "woke late: {waited:?}"
    );

    // A nack with a delay hides the job again for that long; its attempt count is kept.
    let nacked = Instant::now();
    later.nack_after(Duration::from_millis(800)).await.unwrap();
    assert!(q.try_claim().await.unwrap().is_none());
    let again = within(Duration::from_secs(10), "nacked job", q.claim())
        .await
        .unwrap();
    assert!(nacked.elapsed() >= Duration::from_millis(800));
    assert_eq!((again.payload(), again.attempt()), (&b"later"[..], 2));
    again.ack().await.unwrap();
    assert_eq!(q.stats().await.unwrap(), stats(0, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_lease_expired_cannot_ack_and_the_job_is_delivered_once_more() {
    let (_etcd, client) = single().await;
    let name = unique("fenced");
    let result_key = format!("{name}-result");
    let s1 = session(&client, 10).await;
    let s2 = session(&client, 10).await;
    let q1 = queue(&s1, &name);
    let q2 = queue(&s2, &name);
    let id = q1.push("work").await.unwrap();

    let c1 = q1.claim().await.unwrap();
    assert_eq!((c1.id(), c1.attempt()), (id.as_str(), 1));
    // The second consumer waits (as head of the idle line) until the job is visible again.
    let waiting = {
        let q2 = q2.clone();
        tokio::spawn(async move { q2.claim().await })
    };
    eventually(Duration::from_secs(5), "second consumer idle", || async {
        !keys(&client, &format!("{name}/idle/")).await.is_empty()
    })
    .await;
    // The first consumer "pauses" past its TTL: its lease is gone.
    client.clone().lease_revoke(s1.lease_id()).await.unwrap();
    let c2 = within(Duration::from_secs(5), "redelivery", waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((c2.id(), c2.attempt()), (id.as_str(), 2), "count kept");
    assert!(c2.fencing_token() > c1.fencing_token());

    let late = c1
        .job()
        .txn(etcd_coord::etcd_client::Txn::new().and_then([TxnOp::put(
            result_key.as_str(),
            "stale",
            None,
        )]))
        .await;
    assert!(matches!(late, Err(Error::NotHeld { .. })), "{late:?}");
    let late_ack = c1
        .ack_with([TxnOp::put(result_key.as_str(), "stale", None)])
        .await;
    assert!(
        matches!(late_ack, Err(Error::NotHeld { .. })),
        "{late_ack:?}"
    );

    c2.ack_with([TxnOp::put(result_key.as_str(), "fresh", None)])
        .await
        .unwrap();
    let value = client.clone().get(result_key.as_str(), None).await.unwrap();
    assert_eq!(value.kvs()[0].value(), b"fresh");
    assert_eq!(value.kvs()[0].version(), 1);
    let s3 = session(&client, 10).await;
    assert!(
        queue(&s3, &name).try_claim().await.unwrap().is_none(),
        "no third delivery"
    );
    assert_eq!(q2.stats().await.unwrap(), stats(0, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_claim_takes_nothing() {
    let (_etcd, client) = single().await;
    let name = unique("dropped");
    let s = session(&client, 10).await;
    let q = queue(&s, &name);

    // Dropped while waiting on an empty queue: its place in the idle line goes.
    let waited = tokio::time::timeout(Duration::from_millis(300), q.claim()).await;
    assert!(waited.is_err());
    eventually(Duration::from_secs(5), "idle line empty", || async {
        keys(&client, &format!("{name}/")).await.is_empty()
    })
    .await;

    // Dropped at every point of a claim, including while the claim request is in flight: the
    // job is always claimable again (a claim that committed is released in the background).
    let other = queue(&session(&client, 10).await, &name);
    let mut committed_then_dropped = 0;
    for step in 0..30u64 {
        q.push(format!("job-{step}")).await.unwrap();
        let cut = Duration::from_micros(step * 150);
        let dropped = tokio::time::timeout(cut, q.claim()).await;
        if let Ok(claim) = dropped {
            claim.unwrap().nack().await.unwrap();
        }
        // A claim that committed after the drop is released as soon as its answer arrives.
        let deadline = Instant::now() + Duration::from_secs(5);
        let claim = loop {
            if let Some(claim) = other.try_claim().await.unwrap() {
                break claim;
            }
            assert!(Instant::now() < deadline, "job {step} was taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(claim.payload(), format!("job-{step}").as_bytes());
        if claim.attempt() > 1 {
            committed_then_dropped += 1;
        }
        claim.ack().await.unwrap();
    }
    eprintln!("claims that committed after their future was dropped: {committed_then_dropped}");
    assert_eq!(q.stats().await.unwrap(), stats(0, 0, 0, 0));
}

/// KV requests per job, end to end, with `consumers` consumers that claim and ack one job at a
/// time. With `backlog`, all jobs are pushed first and the consumers start after (their start
/// is counted). Without, the consumers first go idle (not counted), then the jobs arrive one at
/// a time, each after the previous one was acked.
async fn cost_per_job(
    etcd: &EtcdCluster,
    client: &Client,
    consumers: usize,
    jobs: usize,
    backlog: bool,
) -> f64 {
    let name = unique("cost");
    let producer = queue(&session(client, 10).await, &name);
    let mut handles = Vec::new();
    for _ in 0..consumers {
        handles.push(queue(&session(client, 10).await, &name));
    }
    let acked = Arc::new(AtomicUsize::new(0));
    let start = || -> Vec<tokio::task::JoinHandle<()>> {
        handles
            .iter()
            .cloned()
            .map(|q| {
                let acked = acked.clone();
                tokio::spawn(async move {
                    loop {
                        let claim = q.claim().await.unwrap();
                        claim.ack().await.unwrap();
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect()
    };
    let mut tasks = Vec::new();
    if !backlog {
        tasks = start();
        eventually(Duration::from_secs(10), "consumers idle", || async {
            keys(client, &format!("{name}/idle/")).await.len() == consumers
        })
        .await;
    }
    let (_, cost) = requests(etcd, async {
        if backlog {
            for n in 0..jobs {
                producer.push(format!("job-{n}")).await.unwrap();
            }
            tasks = start();
        } else {
            for n in 0..jobs {
                producer.push(format!("job-{n}")).await.unwrap();
                eventually(Duration::from_secs(10), "job acked", || async {
                    acked.load(Ordering::SeqCst) > n
                })
                .await;
            }
        }
        eventually(Duration::from_secs(30), "all jobs acked", || async {
            acked.load(Ordering::SeqCst) >= jobs
        })
        .await;
    })
    .await;
    for t in &tasks {
        t.abort();
    }
    let per_job = kv_requests(&cost) as f64 / jobs as f64;
    eprintln!(
        "{consumers} consumer(s), {jobs} jobs, {}: {per_job:.2} requests/job \
         (Txn {}, Range {}, Watch {}, DeleteRange {}, Put {})",
        if backlog {
            "backlog"
        } else {
            "one at a time to idle consumers"
        },
        cost.get("Txn"),
        cost.get("Range"),
        cost.get("Watch"),
        cost.get("DeleteRange"),
        cost.get("Put"),
    );
    per_job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_job_do_not_grow_with_the_number_of_consumers() {
    let (etcd, client) = single().await;
    if skip_unless_local(
        &etcd,
        "requests_per_job_do_not_grow_with_the_number_of_consumers (counters are shared)",
    ) {
        return;
    }
    let one = cost_per_job(&etcd, &client, 1, 200, true).await;
    let eight = cost_per_job(&etcd, &client, 8, 200, true).await;
    assert!(one <= 4.2, "push 1 + read 1 + claim 1 + ack 1: {one:.2}");
    // A claim falls back on the other jobs of its read, so competing consumers with a backlog
    // almost never spend a failed claim.
    assert!(
        eight <= one * 1.08,
        "within 8% (the last few jobs are raced for as the queue empties): 1 consumer: \
         {one:.2}, 8: {eight:.2}"
    );

    // Jobs trickling in to idle consumers: only the head of the idle line reacts, so a job
    // does not wake everyone. From two consumers on, handing the line over costs a constant
    // (the next consumer's check and read); it must not grow further.
    let one = cost_per_job(&etcd, &client, 1, 40, false).await;
    let two = cost_per_job(&etcd, &client, 2, 40, false).await;
    let eight = cost_per_job(&etcd, &client, 8, 40, false).await;
    assert!(
        eight <= two + 1.0,
        "idle: 1 consumer: {one:.2}, 2: {two:.2}, 8: {eight:.2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_the_argument_named_before_anything_is_sent() {
    let (_etcd, client) = single().await;
    let name = unique("bad");
    let s = session(&client, 10).await;
    expect_invalid(WorkQueue::new(&s, ""), "name");
    expect_invalid(WorkQueue::new(&s, "trailing/"), "name");
    expect_invalid(WorkQueue::new(&s, "nul\0"), "name");
    expect_invalid(
        WorkQueue::builder(&s, &name).max_attempts(0).build(),
        "max_attempts",
    );
    expect_invalid(
        WorkQueue::builder(&s, &name).batch_size(0).build(),
        "batch_size",
    );
    expect_invalid(
        WorkQueue::builder(&s, &name).max_request_bytes(100).build(),
        "max_request_bytes",
    );
    let q = queue(&s, &name);
    expect_invalid(q.push(vec![7u8; DEFAULT_MAX_REQUEST_BYTES]).await, "job");
    expect_invalid(q.dead_letters(0).await, "limit");
    expect_invalid(q.requeue_dead_letter("a/b").await, "id");
    expect_invalid(q.delete_dead_letter("").await, "id");
    expect_invalid(
        q.consumer()
            .concurrency(0)
            .run(|_| async { Ok::<_, String>(Vec::new()) })
            .await,
        "concurrency",
    );
    assert!(keys(&client, &format!("{name}/")).await.is_empty());

    // The largest job the check lets through is one etcd accepts (white box: the keys and
    // metadata of a push are known), and it comes back intact.
    let id_len = 32;
    let keys_len = format!("{name}/data/").len()
        + id_len
        + format!("{name}/jobs/ffff/").len()
        + id_len
        + "a=0;p=0".len();
    let largest = DEFAULT_MAX_REQUEST_BYTES - 512 - keys_len;
    expect_invalid(q.push(vec![1u8; largest + 1]).await, "job");
    let payload: Vec<u8> = (0..largest).map(|i| (i % 251) as u8).collect();
    q.push(payload.clone()).await.unwrap();
    let claim = q.claim().await.unwrap();
    assert!(claim.payload() == payload.as_slice());
    claim.ack().await.unwrap();
    // A smaller limit is honoured too.
    let small = WorkQueue::builder(&s, &name)
        .max_request_bytes(8192)
        .build()
        .unwrap();
    expect_invalid(small.push(vec![0u8; 8192]).await, "job");
    small.push(vec![0u8; 4096]).await.unwrap();
}
