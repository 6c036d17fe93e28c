//! Workloads for fault tests and the soak: contenders on one mutex that keep an unguarded
//! counter and write a fenced log, and the checks that prove mutual exclusion from etcd's own
//! history afterwards.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_coord::etcd_client::{Client, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use etcd_coord::{Connect, Error, LockGuard, Mutex, Session};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A client for `endpoints` with a short dial timeout, retried until it connects or `stop`.
pub async fn connect_retrying(endpoints: &[String], stop: &CancellationToken) -> Option<Client> {
    loop {
        let dial = Connect::new(endpoints.to_vec())
            .dial_timeout(Duration::from_secs(2))
            .connect();
        tokio::select! {
            _ = stop.cancelled() => return None,
            c = dial => match c {
                Ok(c) => return Some(c),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
        }
    }
}

/// A session on `client`, retried until granted or `stop`.
pub async fn session_retrying(
    client: &Client,
    ttl_s: u64,
    stop: &CancellationToken,
) -> Option<Session> {
    loop {
        let build = Session::builder(client.clone())
            .ttl(Duration::from_secs(ttl_s))
            .build();
        tokio::select! {
            _ = stop.cancelled() => return None,
            s = build => match s {
                Ok(s) => return Some(s),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
        }
    }
}

/// Counts kept by contenders.
#[derive(Default, Debug)]
pub struct Tally {
    /// Critical sections that incremented the counter (their put succeeded).
    pub increments: AtomicU64,
    /// Sections whose counter put failed for good: it may or may not have committed.
    pub uncertain: AtomicU64,
    /// Fenced writes refused because the lock was gone (deposed holders).
    pub refused: AtomicU64,
    /// Sessions that expired under a contender.
    pub expired: AtomicU64,
}

/// Contenders on one mutex. Each critical section (optionally) increments an unguarded
/// read-modify-write counter, then writes `LOG/<token>-<n>` through the guard's owner-only
/// transaction.
pub struct Contention {
    pub mutex: String,
    pub counter: String,
    pub log: String,
    pub tally: Arc<Tally>,
    sections: watch::Receiver<u64>,
    sections_tx: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Contention {
    pub fn new(name: &str) -> Contention {
        let (tx, rx) = watch::channel(0);
        Contention {
            mutex: name.to_string(),
            counter: format!("{name}-counter"),
            log: format!("{name}-log/"),
            tally: Arc::default(),
            sections: rx,
            sections_tx: Arc::new(tx),
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// Adds a contender with its own client on `endpoints` and sessions of `ttl_s`; with
    /// `counts`, it increments the unguarded counter in each section.
    pub fn spawn(&mut self, endpoints: Vec<String>, ttl_s: u64, counts: bool) {
        self.spawn_split(endpoints.clone(), endpoints, ttl_s, counts);
    }

    /// Like [`spawn`](Self::spawn), with the unguarded counter read and written through a
    /// second client on `data_endpoints`. A request stuck in a paused member's socket may still
    /// commit when that member resumes, long after it timed out here: an unguarded write must
    /// not go there (that is what fencing is for), while the lock's own traffic may.
    pub fn spawn_split(
        &mut self,
        endpoints: Vec<String>,
        data_endpoints: Vec<String>,
        ttl_s: u64,
        counts: bool,
    ) {
        let c = Contender {
            data_endpoints,
            endpoints,
            ttl_s,
            counts,
            mutex: self.mutex.clone(),
            counter: self.counter.clone(),
            log: self.log.clone(),
            tally: self.tally.clone(),
            sections: self.sections_tx.clone(),
            stop: self.stop.clone(),
        };
        self.tasks.push(tokio::spawn(c.run()));
    }

    /// Completed critical sections so far.
    pub fn sections(&self) -> u64 {
        *self.sections.borrow()
    }

    /// Waits until `n` more sections complete; returns how long that took.
    pub async fn progress(&self, n: u64, bound: Duration, what: &str) -> Duration {
        let start = Instant::now();
        let target = self.sections() + n;
        let mut rx = self.sections.clone();
        tokio::time::timeout(bound, rx.wait_for(|s| *s >= target))
            .await
            .unwrap_or_else(|_| panic!("no progress within {bound:?} after {what}"))
            .unwrap();
        start.elapsed()
    }

    /// Measures and prints the time from now until `n` sections complete after `fault`.
    pub async fn resumed_after(&self, fault: &str, since: Instant, bound: Duration) -> Duration {
        self.progress(2, bound, fault).await;
        let took = since.elapsed();
        eprintln!("progress resumed {} ms after {fault}", took.as_millis());
        took
    }

    /// Stops every contender (their guards are released or left to their leases).
    pub async fn stop(&mut self, bound: Duration) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        tokio::time::timeout(bound, futures::future::join_all(tasks))
            .await
            .expect("contenders stop in time");
    }

    /// The counter's value in etcd.
    pub async fn counter_value(&self, client: &Client) -> u64 {
        read_counter(client, &self.counter).await.unwrap()
    }

    /// Checks, from etcd's history, that every committed fenced write was made by the holder of
    /// the mutex at that revision, and returns how many there were. Needs the history up to now
    /// (no compaction).
    pub async fn verify_fenced_log(&self, client: &Client) -> usize {
        verify_fenced(client, &format!("{}/", self.mutex), &self.log).await
    }
}

/// Checks that every key `LOG<token>-<n>` was committed while the key with create revision
/// `token` was the oldest under `owners` (the holder of a lock, the leader of an election), and
/// that tokens never go back in commit order. Returns how many writes there were. Needs the
/// history (no compaction).
pub async fn verify_fenced(client: &Client, owners: &str, log_prefix: &str) -> usize {
    {
        let mut c = client.clone();
        let log = c
            .get(log_prefix, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let prefix = owners.to_string();
        for kv in log.kvs() {
            let key = kv.key_str().unwrap();
            let token: i64 = key[log_prefix.len()..]
                .split('-')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let at = kv.create_revision();
            let holder = c
                .get(
                    prefix.as_str(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_revision(at)
                            .with_sort(SortTarget::Create, SortOrder::Ascend)
                            .with_limit(1),
                    ),
                )
                .await
                .unwrap();
            let first = holder.kvs().first().map(|kv| kv.create_revision());
            assert_eq!(
                first,
                Some(token),
                "{key} committed at revision {at} while {first:?} held the mutex"
            );
        }
        // Tokens in commit order never go back: no write of an older holder after a newer one.
        let mut tokens: Vec<(i64, i64)> = log
            .kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().unwrap();
                let t: i64 = key[log_prefix.len()..]
                    .split('-')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                (kv.create_revision(), t)
            })
            .collect();
        tokens.sort();
        for w in tokens.windows(2) {
            assert!(w[0].1 <= w[1].1, "fenced writes out of token order: {w:?}");
        }
        log.kvs().len()
    }
}

impl Drop for Contention {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Bound on each of the workload's own requests, as an application would set one.
pub const APP_TIMEOUT: Duration = Duration::from_secs(2);

async fn read_counter(client: &Client, key: &str) -> Result<u64, Error> {
    let mut c = client.clone();
    let resp = tokio::time::timeout(APP_TIMEOUT, c.get(key, None))
        .await
        .map_err(|_| Error::Timeout {
            operation: "reading the counter",
            after: APP_TIMEOUT,
        })??;
    Ok(resp
        .kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().parse().unwrap())
        .unwrap_or(0))
}

struct Contender {
    endpoints: Vec<String>,
    data_endpoints: Vec<String>,
    ttl_s: u64,
    counts: bool,
    mutex: String,
    counter: String,
    log: String,
    tally: Arc<Tally>,
    sections: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
}

impl Contender {
    async fn run(self) {
        let Some(client) = connect_retrying(&self.endpoints, &self.stop).await else {
            return;
        };
        let Some(data) = connect_retrying(&self.data_endpoints, &self.stop).await else {
            return;
        };
        let mut seq = 0u64;
        'sessions: loop {
            let Some(session) = session_retrying(&client, self.ttl_s, &self.stop).await else {
                return;
            };
            let mutex = Mutex::new(&session, self.mutex.clone()).unwrap();
            loop {
                let guard = tokio::select! {
                    _ = self.stop.cancelled() => break 'sessions,
                    g = mutex.lock() => g,
                };
                let guard = match guard {
                    Ok(g) => g,
                    Err(Error::SessionExpired(_)) => {
                        self.tally.expired.fetch_add(1, Ordering::Relaxed);
                        continue 'sessions;
                    }
                    Err(e) if !session.is_alive() => {
                        tracing::debug!(error = %e, "lock failed with the session gone");
                        self.tally.expired.fetch_add(1, Ordering::Relaxed);
                        continue 'sessions;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "lock failed; trying again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if self.counts {
                    self.increment(&data, &guard).await;
                }
                seq += 1;
                self.fenced_write(&guard, seq).await;
                // A failed unlock leaves the release to the guard's background task.
                let _ = guard.unlock().await;
                if !session.is_alive() {
                    self.tally.expired.fetch_add(1, Ordering::Relaxed);
                    continue 'sessions;
                }
            }
        }
    }

    /// The unguarded read-modify-write: only mutual exclusion keeps the counter exact. Reads
    /// and writes are retried while the lock is held (a retried put writes the same value).
    async fn increment(&self, client: &Client, guard: &LockGuard) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let n = loop {
            match read_counter(client, &self.counter).await {
                Ok(n) => break n,
                Err(_) if guard.is_held() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(_) => return,
            }
        };
        loop {
            let mut c = client.clone();
            let put = tokio::time::timeout(
                APP_TIMEOUT,
                c.put(self.counter.as_str(), (n + 1).to_string(), None),
            )
            .await;
            match put {
                Ok(Ok(_)) => {
                    self.tally.increments.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ if guard.is_held() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => {
                    self.tally.uncertain.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Writes `LOG/<token>-<seq>` only while still the holder. Transient failures are retried
    /// while the guard believes it holds; a refusal is counted.
    async fn fenced_write(&self, guard: &LockGuard, seq: u64) {
        let key = format!("{}{:020}-{seq}", self.log, guard.fencing_token());
        let txn = Txn::new().and_then([TxnOp::put(key, "", None)]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match guard.txn(txn.clone()).await {
                Ok(_) => {
                    self.sections.send_modify(|n| *n += 1);
                    return;
                }
                Err(Error::NotHeld { .. }) => {
                    self.tally.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(_) => return,
            }
        }
    }
}

/// A work queue under load: producers push uniquely numbered jobs, consumers claim them and
/// acknowledge each with a result key `RESULTS/<payload>/<job id>` written in the ack's own
/// transaction, so etcd itself records every acknowledgement that committed.
pub struct QueueLoad {
    pub queue: String,
    pub results: String,
    /// Payloads whose push was confirmed.
    pub pushed: Arc<std::sync::Mutex<Vec<String>>>,
    /// Pushes whose outcome is unknown (the producer's session ended mid-push).
    pub uncertain: Arc<AtomicU64>,
    acked: Arc<watch::Sender<u64>>,
    producers: CancellationToken,
    consumers: CancellationToken,
    producer_tasks: Vec<JoinHandle<()>>,
    consumer_tasks: Vec<JoinHandle<()>>,
}

impl QueueLoad {
    pub fn new(name: &str) -> QueueLoad {
        QueueLoad {
            queue: name.to_string(),
            results: format!("{name}-results/"),
            pushed: Arc::default(),
            uncertain: Arc::default(),
            acked: Arc::new(watch::channel(0).0),
            producers: CancellationToken::new(),
            consumers: CancellationToken::new(),
            producer_tasks: Vec::new(),
            consumer_tasks: Vec::new(),
        }
    }

    /// A producer pushing one job every `every`.
    pub fn producer(&mut self, endpoints: Vec<String>, ttl_s: u64, every: Duration) {
        let (queue, pushed, uncertain, stop) = (
            self.queue.clone(),
            self.pushed.clone(),
            self.uncertain.clone(),
            self.producers.clone(),
        );
        let tag = self.producer_tasks.len();
        self.producer_tasks.push(tokio::spawn(async move {
            let Some(client) = connect_retrying(&endpoints, &stop).await else {
                return;
            };
            let mut n = 0u64;
            'sessions: loop {
                let Some(session) = session_retrying(&client, ttl_s, &stop).await else {
                    return;
                };
                let q = etcd_coord::WorkQueue::new(&session, queue.clone()).unwrap();
                loop {
                    n += 1;
                    let payload = format!("p{tag}-{n:06}");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = q.push(payload.clone()) => match r {
                            Ok(_) => pushed.lock().unwrap().push(payload),
                            Err(e) if e.is_retryable() => {}
                            Err(_) => {
                                uncertain.fetch_add(1, Ordering::Relaxed);
                                continue 'sessions;
                            }
                        },
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                }
            }
        }));
    }

    /// A consumer that spends `work` on each job, then acknowledges it.
    pub fn consumer(&mut self, endpoints: Vec<String>, ttl_s: u64, work: Duration) {
        let (queue, results, acked, stop) = (
            self.queue.clone(),
            self.results.clone(),
            self.acked.clone(),
            self.consumers.clone(),
        );
        self.consumer_tasks.push(tokio::spawn(async move {
            let Some(client) = connect_retrying(&endpoints, &stop).await else {
                return;
            };
            'sessions: loop {
                let Some(session) = session_retrying(&client, ttl_s, &stop).await else {
                    return;
                };
                let q = etcd_coord::WorkQueue::new(&session, queue.clone()).unwrap();
                loop {
                    let claim = tokio::select! {
                        _ = stop.cancelled() => return,
                        c = q.claim() => c,
                    };
                    let claim = match claim {
                        Ok(c) => c,
                        Err(_) if !session.is_alive() => continue 'sessions,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    tokio::time::sleep(work).await;
                    let payload = String::from_utf8_lossy(claim.payload()).into_owned();
                    let record = format!("{results}{payload}/{}", claim.id());
                    // An ack that fails leaves the job to be delivered again.
                    if claim.ack_with([TxnOp::put(record, "", None)]).await.is_ok() {
                        acked.send_modify(|n| *n += 1);
                    }
                }
            }
        }));
    }

    /// Acknowledgements seen by consumers so far.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Waits for `n` more acknowledgements.
    pub async fn progress(&self, n: u64, bound: Duration, what: &str) {
        let target = self.acked() + n;
        let mut rx = self.acked.subscribe();
        tokio::time::timeout(bound, rx.wait_for(|a| *a >= target))
            .await
            .unwrap_or_else(|_| panic!("no job acknowledged within {bound:?} {what}"))
            .unwrap();
    }

    /// Stops producing, lets the consumers drain the queue, stops them, and checks from etcd
    /// that every confirmed job was acknowledged exactly once and no job is left. Returns
    /// (jobs pushed, acknowledgements).
    pub async fn finish(&mut self, client: &Client, bound: Duration) -> (usize, usize) {
        self.producers.cancel();
        let producers = std::mem::take(&mut self.producer_tasks);
        tokio::time::timeout(bound, futures::future::join_all(producers))
            .await
            .expect("producers stop");
        let session = Session::builder(client.clone())
            .ttl(Duration::from_secs(10))
            .build()
            .await
            .unwrap();
        let q = etcd_coord::WorkQueue::new(&session, self.queue.clone()).unwrap();
        let deadline = Instant::now() + bound;
        loop {
            let stats = q.stats().await;
            if matches!(stats, Ok(s) if s.ready == 0 && s.in_flight == 0 && s.delayed == 0) {
                break;
            }
            assert!(Instant::now() < deadline, "queue not drained: {stats:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.consumers.cancel();
        let consumers = std::mem::take(&mut self.consumer_tasks);
        tokio::time::timeout(bound, futures::future::join_all(consumers))
            .await
            .expect("consumers stop");
        let stats = q.stats().await.unwrap();
        assert_eq!(stats.dead, 0, "{stats:?}");
        let results = client
            .clone()
            .get(
                self.results.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .unwrap();
        let mut per_payload = std::collections::BTreeMap::<String, Vec<String>>::new();
        for kv in results.kvs() {
            let rest = &kv.key_str().unwrap()[self.results.len()..];
            let (payload, job) = rest.split_once('/').unwrap();
            per_payload
                .entry(payload.to_string())
                .or_default()
                .push(job.to_string());
        }
        for (payload, jobs) in &per_payload {
            assert_eq!(
                jobs.len(),
                1,
                "{payload} acknowledged more than once: {jobs:?}"
            );
        }
        let pushed = self.pushed.lock().unwrap().clone();
        for payload in &pushed {
            assert!(per_payload.contains_key(payload), "job {payload} was lost");
        }
        let _ = session.close().await;
        (pushed.len(), per_payload.len())
    }
}

impl Drop for QueueLoad {
    fn drop(&mut self) {
        self.producers.cancel();
        self.consumers.cancel();
    }
}
