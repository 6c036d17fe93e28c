//! Every primitive at once on a 3-member cluster under random faults, for 60 s (or
//! `ETCD_COORD_SOAK_SECS`), ending with invariant checks: the counter kept under the mutex is
//! exact, every fenced write (lock holders, leaders) was made by the owner of the moment, at
//! most N semaphore holders and one writer (or only readers) were ever inside, one leader at a
//! time was observed, the work queue lost no job and acknowledged none twice, discovery agrees
//! with etcd, and no key is left behind.
//!
//! Faults, one at a time, each healed after 0.5–3 s: kill and restart a member, pause and
//! resume one, and — between etcd and a group of "victim" clients that reach it only through
//! proxies — cut (shorter or longer than the victims' TTL), blackhole and add latency. Member
//! faults hit members 1 and 2 only: the counter's unguarded writes go to member 0, because a
//! request stuck in a paused member's socket can still commit after it resumes, long after it
//! timed out here — only fencing survives that, which is what the fenced logs check.
#![cfg(feature = "testing")]

mod common;
mod faultkit;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::occupancy::Room;
use common::*;
use etcd_coord::etcd_client::{GetOptions, Txn, TxnOp};
use etcd_coord::testing::proxy::{Mode, Proxy};
use etcd_coord::{Discovery, Election, Error, LeaderEvent, Registry, RwLock, Semaphore};
use faultkit::{connect_retrying, session_retrying, verify_fenced, Contention, QueueLoad};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PERMITS: usize = 2;

fn soak_duration() -> Duration {
    let secs = std::env::var("ETCD_COORD_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Candidates that take turns leading: each term writes a few fenced log entries, then resigns.
fn candidate(
    endpoints: Vec<String>,
    name: String,
    log: String,
    tag: usize,
    stop: CancellationToken,
    terms: Arc<AtomicU64>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(client) = connect_retrying(&endpoints, &stop).await else {
            return;
        };
        'sessions: loop {
            let Some(session) = session_retrying(&client, 10, &stop).await else {
                return;
            };
            let election = Election::new(&session, name.clone()).unwrap();
            loop {
                let won = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = election.campaign(format!("candidate-{tag}")) => r,
                };
                let leadership = match won {
                    Ok(l) => l,
                    Err(_) if !session.is_alive() => continue 'sessions,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                for n in 0..4 {
                    let key = format!("{log}{:020}-{tag}-{n}", leadership.fencing_token());
                    match leadership
                        .txn(Txn::new().and_then([TxnOp::put(key, "", None)]))
                        .await
                    {
                        Err(Error::NotHeld { .. }) => break,
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                let _ = leadership.resign().await;
                terms.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Permit,
    Read,
    Write,
}

/// Takes a semaphore permit or a read or write lock, enters a room that records who is inside
/// (through owner-only transactions), and checks who it found there.
fn occupant(
    endpoints: Vec<String>,
    name: String,
    kind: Kind,
    stop: CancellationToken,
    entries: Arc<AtomicU64>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(client) = connect_retrying(&endpoints, &stop).await else {
            return;
        };
        let room = Room::new(&name);
        'sessions: loop {
            let Some(session) = session_retrying(&client, 10, &stop).await else {
                return;
            };
            let sem = Semaphore::new(&session, name.clone(), PERMITS).unwrap();
            let rw = RwLock::new(&session, name.clone()).unwrap();
            loop {
                let acquire = async {
                    match kind {
                        Kind::Permit => sem.acquire().await,
                        Kind::Read => rw.read().await,
                        Kind::Write => rw.write().await,
                    }
                };
                let guard = tokio::select! {
                    _ = stop.cancelled() => return,
                    g = acquire => g,
                };
                let guard = match guard {
                    Ok(g) => g,
                    Err(_) if !session.is_alive() => continue 'sessions,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let label = match kind {
                    Kind::Permit => "p",
                    Kind::Read => "r",
                    Kind::Write => "w",
                };
                let entered = room.enter(&guard, label).await;
                if let Some(inside) = entered {
                    match kind {
                        Kind::Permit => assert!(
                            inside.len() < PERMITS,
                            "{} holders inside a {PERMITS}-permit semaphore: {inside:?}",
                            inside.len() + 1
                        ),
                        Kind::Write => assert!(inside.is_empty(), "writer entered with {inside:?}"),
                        Kind::Read => assert!(
                            !inside.iter().any(|k| k == "w"),
                            "reader entered with a writer inside"
                        ),
                    }
                    entries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // Whatever happened above (an entry whose answer was lost included), our record
                // must be gone before the lock is given up, or the next holder sees a ghost.
                leave_surely(&name, &guard).await;
                let _ = guard.unlock().await;
            }
        }
    })
}

/// Deletes this guard's record from the room (see `common::occupancy`), retrying until done or
/// until the guard no longer holds (its record then went with its lease, or never existed).
async fn leave_surely(name: &str, guard: &etcd_coord::LockGuard) {
    let me = format!(
        "{name}-room/{:x}-{}",
        guard.session().lease_id(),
        guard.fencing_token()
    );
    loop {
        match guard
            .txn(Txn::new().and_then([TxnOp::delete(me.as_str(), None)]))
            .await
        {
            Ok(_) | Err(Error::NotHeld { .. }) => return,
            Err(_) if !guard.session().is_alive() => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// An instance that stays registered and updates its metadata until `stop`; then hands its
/// registration back.
fn instance(
    endpoints: Vec<String>,
    prefix: String,
    id: String,
    stop: CancellationToken,
) -> JoinHandle<Option<etcd_coord::Registration>> {
    tokio::spawn(async move {
        let client = connect_retrying(&endpoints, &stop).await?;
        let mut n = 0u64;
        'sessions: loop {
            let session = session_retrying(&client, 10, &stop).await?;
            let registry = Registry::new(&session, prefix.clone()).unwrap();
            let registration = loop {
                let r = tokio::select! {
                    _ = stop.cancelled() => return None,
                    r = registry.register("svc", &id, "10.0.0.1:80", json!({ "n": n })) => r,
                };
                match r {
                    Ok(r) => break r,
                    Err(_) if !session.is_alive() => continue 'sessions,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Some(registration),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                n += 1;
                match registration.update(json!({ "n": n })).await {
                    Ok(_) => {}
                    Err(_) if !session.is_alive() => continue 'sessions,
                    Err(Error::NotHeld { .. }) => continue 'sessions,
                    Err(_) => {}
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_primitive_keeps_its_invariants_under_random_faults() {
    let (mut etcd, _client) = cluster(3).await;
    if skip_unless_local(&etcd, "soak (kills, pauses and restarts members)") {
        return;
    }
    let run_for = soak_duration();
    let name = unique("soak");
    let all = etcd.endpoints();
    let anchor = vec![etcd.endpoint(0)];
    let proxies = [
        Proxy::start(etcd.endpoint(0)).await.unwrap(),
        Proxy::start(etcd.endpoint(1)).await.unwrap(),
        Proxy::start(etcd.endpoint(2)).await.unwrap(),
    ];
    let victims: Vec<String> = proxies.iter().map(Proxy::url).collect();
    let stop = CancellationToken::new();

    // Mutex: an unguarded counter kept by stable contenders, fenced writes by everyone; the
    // victims (3 s sessions behind the proxies) get deposed by long cuts.
    let mut mutex = Contention::new(&format!("{name}/mutex"));
    for _ in 0..4 {
        mutex.spawn_split(all.clone(), anchor.clone(), 10, true);
    }
    for _ in 0..2 {
        mutex.spawn(victims.clone(), 3, false);
    }
    let election = format!("{name}/election");
    let election_log = format!("{name}/election-log/");
    let terms = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for tag in 0..3 {
        let endpoints = if tag == 2 {
            victims.clone()
        } else {
            all.clone()
        };
        tasks.push(candidate(
            endpoints,
            election.clone(),
            election_log.clone(),
            tag,
            stop.clone(),
            terms.clone(),
        ));
    }
    let observed = tokio::spawn({
        let (endpoints, election, stop) = (all.clone(), election.clone(), stop.clone());
        async move {
            let client = connect_retrying(&endpoints, &stop).await.unwrap();
            let mut events = Election::observer(client, election).unwrap().observe();
            let mut seen = Vec::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return seen,
                    e = events.next() => match e {
                        Some(Ok(event)) => seen.push(event),
                        other => panic!("observer ended: {other:?}"),
                    },
                }
            }
        }
    });
    let entries = Arc::new(AtomicU64::new(0));
    for kind in [Kind::Permit, Kind::Permit, Kind::Permit, Kind::Permit] {
        tasks.push(occupant(
            all.clone(),
            format!("{name}/semaphore"),
            kind,
            stop.clone(),
            entries.clone(),
        ));
    }
    for kind in [Kind::Read, Kind::Read, Kind::Write, Kind::Write] {
        tasks.push(occupant(
            all.clone(),
            format!("{name}/rwlock"),
            kind,
            stop.clone(),
            entries.clone(),
        ));
    }
    let services = format!("{name}/services");
    let registered = CancellationToken::new();
    let instances: Vec<_> = (0..3)
        .map(|i| {
            let endpoints = if i == 2 { victims.clone() } else { all.clone() };
            instance(
                endpoints,
                services.clone(),
                format!("i{i}"),
                registered.clone(),
            )
        })
        .collect();
    let discovery = Discovery::new(connect(&etcd).await, &services, "svc")
        .await
        .unwrap();
    let mut jobs = QueueLoad::new(&format!("{name}/jobs"));
    jobs.producer(all.clone(), 10, Duration::from_millis(30));
    jobs.consumer(all.clone(), 10, Duration::from_millis(5));
    jobs.consumer(victims.clone(), 3, Duration::from_millis(5));
    mutex.progress(10, Duration::from_secs(20), "start").await;

    // Random faults, one at a time.
    let seed = std::env::var("ETCD_COORD_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("soak for {run_for:?} with ETCD_COORD_SOAK_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut faults = 0;
    let mut worst = Duration::ZERO;
    while started.elapsed() < run_for {
        let hold = Duration::from_millis(rng.gen_range(500..3000));
        let member = rng.gen_range(1..3);
        let proxy = &proxies[rng.gen_range(0..3)];
        let fault = match rng.gen_range(0..6) {
            0 => {
                etcd.kill(member).unwrap();
                tokio::time::sleep(hold).await;
                etcd.restart(member).await.unwrap();
                format!("killing member {member} for {hold:?}")
            }
            1 => {
                etcd.pause(member).unwrap();
                tokio::time::sleep(hold).await;
                etcd.resume(member).unwrap();
                format!("pausing member {member} for {hold:?}")
            }
            2 => {
                proxy.set_mode(Mode::Cut);
                tokio::time::sleep(hold).await;
                proxy.set_mode(Mode::Pass);
                format!("cutting victims off one member for {hold:?}")
            }
            3 => {
                // Longer than the victims' 3 s TTL: they lose their sessions.
                let long = hold + Duration::from_secs(3);
                proxies.iter().for_each(|p| p.set_mode(Mode::Cut));
                tokio::time::sleep(long).await;
                proxies.iter().for_each(|p| p.set_mode(Mode::Pass));
                format!("cutting victims off etcd for {long:?}")
            }
            4 => {
                proxy.set_mode(Mode::Blackhole);
                tokio::time::sleep(hold).await;
                proxy.set_mode(Mode::Pass);
                format!("blackholing victims' traffic to one member for {hold:?}")
            }
            _ => {
                let delay = Duration::from_millis(rng.gen_range(20..150));
                proxies
                    .iter()
                    .for_each(|p| p.set_mode(Mode::Latency(delay)));
                tokio::time::sleep(hold).await;
                proxies.iter().for_each(|p| p.set_mode(Mode::Pass));
                format!("adding {delay:?} of latency for {hold:?}")
            }
        };
        faults += 1;
        let healed = Instant::now();
        let took = mutex
            .resumed_after(&fault, healed, Duration::from_secs(30))
            .await;
        worst = worst.max(took);
        jobs.progress(1, Duration::from_secs(30), &format!("after {fault}"))
            .await;
        // Elapsed time is the property: quiet time between faults.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1000))).await;
    }
    eprintln!(
        "{faults} faults in {:?}; slowest recovery {} ms",
        started.elapsed(),
        worst.as_millis()
    );

    // Healed: stop everything, then check.
    let client = connect(&etcd).await;
    registered.cancel();
    let mut registrations = Vec::new();
    for i in instances {
        registrations.extend(
            within(Duration::from_secs(20), "instances stop", i)
                .await
                .unwrap(),
        );
    }
    let truth = {
        let prefix = format!("{services}/svc/");
        let resp = client
            .clone()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .map(|kv| {
                let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
                (
                    kv.key_str().unwrap()[prefix.len()..].to_string(),
                    v["Metadata"].clone(),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    within(
        Duration::from_secs(10),
        "discovery agrees with etcd",
        discovery.wait_until(|snap| {
            snap.values()
                .map(|i| (i.id.clone(), i.metadata.clone()))
                .collect::<BTreeMap<_, _>>()
                == truth
        }),
    )
    .await
    .unwrap();
    mutex.stop(Duration::from_secs(30)).await;
    stop.cancel();
    for t in tasks {
        within(Duration::from_secs(30), "workers stop", t)
            .await
            .expect("no invariant broken");
    }
    let events = within(Duration::from_secs(5), "observer stops", observed)
        .await
        .unwrap();
    let (pushed, acked) = jobs.finish(&client, Duration::from_secs(30)).await;

    let tally = &mutex.tally;
    let increments = tally.increments.load(Ordering::Relaxed);
    let counter = mutex.counter_value(&client).await;
    let fenced = mutex.verify_fenced_log(&client).await;
    let led = verify_fenced(&client, &format!("{election}/"), &election_log).await;
    let mut last = 0;
    let mut elected = 0;
    for event in &events {
        if let LeaderEvent::Elected(leader) = event {
            assert!(
                leader.create_revision > last,
                "leaders observed out of order: {events:?}"
            );
            last = leader.create_revision;
            elected += 1;
        }
    }
    eprintln!(
        "mutex: {increments} increments, {fenced} fenced writes, tally {tally:?}; election: {} \
         terms, {led} fenced writes, {elected} leaders observed in order; semaphore and rwlock: \
         {} entries; work queue: {pushed} jobs, {acked} acknowledged once each; discovery: {} \
         instances agree",
        terms.load(Ordering::Relaxed),
        entries.load(Ordering::Relaxed),
        truth.len(),
    );
    assert_eq!(tally.uncertain.load(Ordering::Relaxed), 0);
    assert_eq!(counter, increments, "the counter under the mutex is exact");
    assert!(fenced > 0 && led > 0 && elected > 0 && acked > 0);

    // No stray keys once every session is gone.
    drop(registrations);
    for prefix in ["mutex/", "election/", "semaphore/", "rwlock/", "services/"] {
        let prefix = format!("{name}/{prefix}");
        eventually(
            Duration::from_secs(20),
            &format!("no keys under {prefix}"),
            || {
                let (c, p) = (client.clone(), prefix.clone());
                async move { keys(&c, &p).await.is_empty() }
            },
        )
        .await;
    }
}
