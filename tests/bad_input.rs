//! Bad arguments and foreign data. Every public constructor and method that takes an argument
//! rejects bad values with `Error::InvalidArgument` naming that argument, before sending
//! anything; keys under a primitive's prefix that it did not write are handled like Go's
//! `concurrency` package would, or skipped, and never make anything panic.
#![cfg(feature = "testing")]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Client, PutOptions};
use etcd_coord::{
    Barrier, Connect, Discovery, DoubleBarrier, Election, ElectionObserver, Error, LeaderEvent,
    Lockable, MultiLock, Mutex, PrefixCache, PriorityQueue, Queue, Registry, RwLock, Semaphore,
    Session, WorkQueue, DEFAULT_MAX_REQUEST_BYTES, MAX_BATCH_SIZE, MAX_CLAIM_BATCH, MAX_NAME_LEN,
    MAX_PERMITS, MAX_TTL,
};
use futures::StreamExt;
use serde_json::json;

type Call<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// One row: what is called, the argument that must be named, and the call.
fn row<'a, T, F>(what: &'a str, arg: &'static str, fut: F) -> (&'a str, &'static str, Call<'a>)
where
    F: Future<Output = Result<T, Error>> + Send + 'a,
{
    (what, arg, Box::pin(async move { fut.await.map(|_| ()) }))
}

/// Sync results as rows too.
fn now<T: Send + 'static>(r: Result<T, Error>) -> impl Future<Output = Result<T, Error>> + Send {
    std::future::ready(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_argument_is_rejected_naming_it_before_anything_is_sent() {
    let (etcd, client) = single().await;
    let s = session(&client, 30).await;
    let name = unique("bad");
    let leadership = Election::new(&s, format!("{name}-e"))
        .unwrap()
        .campaign("ok")
        .await
        .unwrap();
    let registration = Registry::new(&s, format!("{name}-r"))
        .unwrap()
        .register("svc", "one", "10.0.0.1:80", json!(null))
        .await
        .unwrap();
    let election = Election::new(&s, format!("{name}-e")).unwrap();
    let registry = Registry::new(&s, format!("{name}-r")).unwrap();
    let queue = Queue::new(&s, format!("{name}-q")).unwrap();
    let pq = PriorityQueue::new(&s, format!("{name}-pq")).unwrap();
    let jobs = WorkQueue::new(&s, format!("{name}-jobs")).unwrap();
    let long = "x".repeat(MAX_NAME_LEN + 1);
    let huge = vec![b'v'; 1024 * 1024 + 1];
    let huge_json = json!("m".repeat(1 << 20));
    let session_with = |f: fn(etcd_coord::SessionBuilder) -> etcd_coord::SessionBuilder| {
        f(Session::builder(client.clone())).build()
    };
    let bad_names = ["", "trailing/", "nul\0byte", "line\nbreak", long.as_str()];
    let before = if etcd.require_local().is_ok() {
        Some(etcd.metrics(0).await.unwrap())
    } else {
        None
    };

    let mut table: Vec<(&str, &'static str, Call)> = vec![
        row(
            "Connect with no endpoints",
            "endpoints",
            Connect::new(Vec::<String>::new()).connect(),
        ),
        row(
            "Connect with an endpoint without a port",
            "endpoints",
            Connect::new(["localhost"]).connect(),
        ),
        row(
            "Connect with a path",
            "endpoints",
            Connect::new(["http://h:1/p"]).connect(),
        ),
        row(
            "Connect with an unknown scheme",
            "endpoints",
            Connect::new(["ftp://h:1"]).connect(),
        ),
        row(
            "Connect with port 0",
            "endpoints",
            Connect::new(["h:0"]).connect(),
        ),
        row(
            "Connect with http:// and TLS",
            "endpoints",
            Connect::new(["http://127.0.0.1:2379"])
                .ca_cert_pem("pem")
                .connect(),
        ),
        row(
            "Connect with a zero dial timeout",
            "dial_timeout",
            Connect::new(["127.0.0.1:2379"])
                .dial_timeout(Duration::ZERO)
                .connect(),
        ),
        row(
            "Session TTL 0",
            "ttl",
            session_with(|b| b.ttl(Duration::ZERO)),
        ),
        row(
            "Session TTL 1.5 s",
            "ttl",
            session_with(|b| b.ttl(Duration::from_millis(1500))),
        ),
        row(
            "Session TTL over the maximum",
            "ttl",
            session_with(|b| b.ttl(MAX_TTL + Duration::from_secs(1))),
        ),
        row("Session lease 0", "lease", session_with(|b| b.lease(0))),
        row("Session lease -1", "lease", session_with(|b| b.lease(-1))),
        row(
            "Session request timeout 0",
            "request_timeout",
            session_with(|b| b.request_timeout(Duration::ZERO)),
        ),
        row(
            "Semaphore with 0 permits",
            "permits",
            now(Semaphore::new(&s, name.clone(), 0)),
        ),
        row(
            "Semaphore with too many permits",
            "permits",
            now(Semaphore::new(&s, name.clone(), MAX_PERMITS + 1)),
        ),
        row(
            "MultiLock of nothing",
            "locks",
            now(MultiLock::new(Vec::<Lockable>::new())),
        ),
        row(
            "MultiLock with a lock twice",
            "locks",
            now(MultiLock::new([
                Mutex::new(&s, format!("{name}-m")).unwrap(),
                Mutex::new(&s, format!("{name}-m")).unwrap(),
            ])),
        ),
        row(
            "Election::campaign with a value over 1 MiB",
            "value",
            election.campaign(huge.clone()),
        ),
        row(
            "Election::run_as_leader with a value over 1 MiB",
            "value",
            election.run_as_leader(huge.clone(), |_| async {}),
        ),
        row(
            "Leadership::proclaim with a value over 1 MiB",
            "value",
            leadership.proclaim(huge.clone()),
        ),
        row(
            "Election::resume with a key of another election",
            "key",
            election.resume("elsewhere/1", 5),
        ),
        row(
            "Election::resume with the bare prefix",
            "key",
            election.resume(format!("{name}-e/"), 5),
        ),
        row(
            "Election::resume with revision 0",
            "create_revision",
            election.resume(format!("{name}-e/k"), 0),
        ),
        row(
            "ElectionObserver with a zero request timeout",
            "request_timeout",
            now(ElectionObserver::new(client.clone(), "o")
                .and_then(|o| o.request_timeout(Duration::ZERO))),
        ),
        row(
            "PrefixCache with an empty prefix",
            "prefix",
            PrefixCache::new(client.clone(), ""),
        ),
        row(
            "PrefixCache with a zero request timeout",
            "request_timeout",
            PrefixCache::builder(client.clone(), "p/")
                .request_timeout(Duration::ZERO)
                .build(),
        ),
        row(
            "Registry::register with an empty service",
            "service",
            registry.register("", "a", "h:1", json!(null)),
        ),
        row(
            "Registry::register with a '/' in the service",
            "service",
            registry.register("a/b", "a", "h:1", json!(null)),
        ),
        row(
            "Registry::register with an empty id",
            "id",
            registry.register("svc", "", "h:1", json!(null)),
        ),
        row(
            "Registry::register with a '/' in the id",
            "id",
            registry.register("svc", "a/b", "h:1", json!(null)),
        ),
        row(
            "Registry::register with an empty address",
            "address",
            registry.register("svc", "a", "", json!(null)),
        ),
        row(
            "Registry::register with a newline in the address",
            "address",
            registry.register("svc", "a", "h:1\n", json!(null)),
        ),
        row(
            "Registry::register with 1 MiB of metadata",
            "metadata",
            registry.register("svc", "a", "h:1", huge_json.clone()),
        ),
        row(
            "Registration::update with 1 MiB of metadata",
            "metadata",
            registration.update(huge_json.clone()),
        ),
        row(
            "Discovery with an empty prefix",
            "prefix",
            Discovery::new(client.clone(), "", "svc"),
        ),
        row(
            "Discovery with a '/' in the service",
            "service",
            Discovery::new(client.clone(), "p", "a/b"),
        ),
        row(
            "Queue::max_request_bytes too small",
            "max_request_bytes",
            now(queue.clone().max_request_bytes(10)),
        ),
        row(
            "Queue::push over the request limit",
            "value",
            queue.push(vec![0u8; DEFAULT_MAX_REQUEST_BYTES]),
        ),
        row(
            "PriorityQueue::max_request_bytes too small",
            "max_request_bytes",
            now(pq.clone().max_request_bytes(10)),
        ),
        row(
            "PriorityQueue::push over the request limit",
            "value",
            pq.push(vec![0u8; DEFAULT_MAX_REQUEST_BYTES], 1),
        ),
        row(
            "WorkQueue max_attempts 0",
            "max_attempts",
            now(WorkQueue::builder(&s, name.clone()).max_attempts(0).build()),
        ),
        row(
            "WorkQueue batch_size 0",
            "batch_size",
            now(WorkQueue::builder(&s, name.clone()).batch_size(0).build()),
        ),
        row(
            "WorkQueue batch_size too large",
            "batch_size",
            now(WorkQueue::builder(&s, name.clone())
                .batch_size(MAX_BATCH_SIZE + 1)
                .build()),
        ),
        row(
            "WorkQueue max_request_bytes too small",
            "max_request_bytes",
            now(WorkQueue::builder(&s, name.clone())
                .max_request_bytes(10)
                .build()),
        ),
        row(
            "WorkQueue::push over the request limit",
            "job",
            jobs.push(vec![0u8; DEFAULT_MAX_REQUEST_BYTES]),
        ),
        row("WorkQueue::claim_batch(0)", "max", jobs.claim_batch(0)),
        row(
            "WorkQueue::claim_batch over the limit",
            "max",
            jobs.claim_batch(MAX_CLAIM_BATCH + 1),
        ),
        row("WorkQueue::dead_letters(0)", "limit", jobs.dead_letters(0)),
        row(
            "WorkQueue::requeue_dead_letter with a bad id",
            "id",
            jobs.requeue_dead_letter("a/b"),
        ),
        row(
            "WorkQueue::delete_dead_letter with an empty id",
            "id",
            jobs.delete_dead_letter(""),
        ),
        row(
            "Consumer with no handlers",
            "concurrency",
            jobs.consumer()
                .concurrency(0)
                .run(|_job| async { Ok::<_, String>(Vec::new()) }),
        ),
        row(
            "DoubleBarrier with count 0",
            "count",
            now(DoubleBarrier::new(&s, name.clone(), 0)),
        ),
    ];
    for bad in bad_names {
        table.push(row("Queue::new", "name", now(Queue::new(&s, bad))));
        table.push(row(
            "PriorityQueue::new",
            "name",
            now(PriorityQueue::new(&s, bad)),
        ));
        table.push(row("WorkQueue::new", "name", now(WorkQueue::new(&s, bad))));
        table.push(row("Barrier::new", "name", now(Barrier::new(&s, bad))));
        table.push(row(
            "DoubleBarrier::new",
            "name",
            now(DoubleBarrier::new(&s, bad, 2)),
        ));
        table.push(row("Mutex::new", "name", now(Mutex::new(&s, bad))));
        table.push(row("RwLock::new", "name", now(RwLock::new(&s, bad))));
        table.push(row(
            "Semaphore::new",
            "name",
            now(Semaphore::new(&s, bad, 1)),
        ));
        table.push(row("Election::new", "name", now(Election::new(&s, bad))));
        table.push(row(
            "Election::observer",
            "name",
            now(Election::observer(client.clone(), bad)),
        ));
        table.push(row(
            "ElectionObserver::new",
            "name",
            now(ElectionObserver::new(client.clone(), bad)),
        ));
        table.push(row("Registry::new", "prefix", now(Registry::new(&s, bad))));
        table.push(row(
            "Discovery::new",
            "prefix",
            Discovery::new(client.clone(), bad, "svc"),
        ));
        table.push(row(
            "Discovery::new",
            "service",
            Discovery::new(client.clone(), "p", bad),
        ));
        table.push(row(
            "Registry::register",
            "service",
            registry.register(bad, "a", "h:1", json!(null)),
        ));
        table.push(row(
            "Registry::register",
            "id",
            registry.register("svc", bad, "h:1", json!(null)),
        ));
    }
    let rows = table.len();
    for (what, arg, call) in table {
        let result = within(Duration::from_secs(5), what, call).await;
        match result {
            Err(Error::InvalidArgument { name, ref reason }) if name == arg => {
                let shown = result.as_ref().unwrap_err().to_string();
                assert!(
                    shown.contains(arg),
                    "{what}: {shown:?} does not name `{arg}`"
                );
                assert!(!reason.is_empty(), "{what}: no reason given");
            }
            other => panic!("{what}: expected InvalidArgument naming `{arg}`, got {other:?}"),
        }
    }
    if let Some(before) = before {
        let sent = etcd.metrics(0).await.unwrap().since(&before);
        let requests = sent.total() - sent.get("LeaseKeepAlive");
        assert_eq!(
            requests, 0,
            "{rows} rejected calls sent requests: {:?}",
            sent.handled
        );
    }
    eprintln!("{rows} bad calls rejected, nothing sent");
    assert!(leadership.is_leader());
    assert!(registration.metadata().is_null());
}

async fn put_foreign(client: &Client, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> i64 {
    client
        .clone()
        .put(key, value, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaseless_foreign_key_under_a_mutex_blocks_like_a_holder_until_it_is_deleted() {
    let (_etcd, client) = single().await;
    let name = unique("foreign-mutex");
    let prefix = format!("{name}/");
    // Not ours: no lease, garbage value, a name that is not lease hex, and a non-UTF-8 one.
    let foreign = format!("{prefix}somebody-else");
    put_foreign(&client, foreign.as_str(), b"\xff\xfe garbage".to_vec()).await;
    let mut odd = prefix.clone().into_bytes();
    odd.extend_from_slice(b"\xff\x80");
    let s = session(&client, 10).await;
    let mutex = Mutex::new(&s, name.clone()).unwrap();
    assert!(matches!(
        mutex.try_lock().await,
        Err(Error::WouldBlock { .. })
    ));
    let waiting = tokio::spawn({
        let mutex = mutex.clone();
        async move { mutex.lock().await }
    });
    key_count_becomes(&client, &prefix, 2, Duration::from_secs(5), "waiter queued").await;
    // A second foreign key, younger than our waiter, does not stand in its way.
    put_foreign(&client, odd.clone(), "late").await;
    assert!(!waiting.is_finished());
    client.clone().delete(foreign.as_str(), None).await.unwrap();
    let guard = within(Duration::from_secs(5), "acquired", waiting)
        .await
        .unwrap()
        .unwrap();
    // The younger foreign key now waits "behind" us; unlocking leaves it alone.
    guard.unlock().await.unwrap();
    let left = client.clone().get(odd.clone(), None).await.unwrap();
    assert_eq!(left.kvs().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_primitives_keys_under_the_same_name_exclude_like_any_holder() {
    let (_etcd, client) = single().await;
    let name = unique("shared-name");
    let s = session(&client, 10).await;
    // An RwLock reader and a Mutex on one name share the prefix: the reader's key holds.
    let read = RwLock::new(&s, name.clone()).unwrap().read().await.unwrap();
    let mutex = Mutex::new(&s, name.clone()).unwrap();
    assert!(matches!(
        mutex.try_lock().await,
        Err(Error::WouldBlock { .. })
    ));
    read.unlock().await.unwrap();
    mutex.try_lock().await.unwrap().unlock().await.unwrap();

    // A semaphore whose recorded permit count is garbage: a clear conflict, and no key left.
    let sem_name = unique("garbage-count");
    put_foreign(&client, sem_name.as_str(), "three-ish").await;
    let sem = Semaphore::new(&s, sem_name.clone(), 3).unwrap();
    for result in [sem.acquire().await, sem.try_acquire().await] {
        match result {
            Err(Error::Conflict(message)) => assert!(message.contains("three-ish"), "{message}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    key_count_becomes(
        &client,
        &format!("{sem_name}/"),
        0,
        Duration::from_secs(5),
        "no waiter key left",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_an_election_prefix_is_reported_as_the_leaders_value() {
    let (_etcd, client) = single().await;
    let name = unique("foreign-election");
    let foreign = format!("{name}/not-a-candidate");
    let garbage = b"\x00\xff not utf-8".to_vec();
    put_foreign(&client, foreign.as_str(), garbage.clone()).await;
    let observer = ElectionObserver::new(client.clone(), name.clone()).unwrap();
    let leader = observer.leader().await.unwrap().expect("a leader");
    assert_eq!(leader.key, foreign);
    assert_eq!(leader.value, garbage);
    assert_eq!(leader.lease, 0);
    let mut events = observer.observe();
    match within(Duration::from_secs(5), "first event", events.next()).await {
        Some(Ok(LeaderEvent::Elected(l))) => assert_eq!(l.value, garbage),
        other => panic!("{other:?}"),
    }
    // A real candidate waits behind it, and wins when it goes.
    let s = session(&client, 10).await;
    let election = Election::new(&s, name.clone()).unwrap();
    let campaign = tokio::spawn(async move { election.campaign("real").await });
    key_count_becomes(
        &client,
        &format!("{name}/"),
        2,
        Duration::from_secs(5),
        "candidate queued",
    )
    .await;
    assert!(!campaign.is_finished());
    client.clone().delete(foreign.as_str(), None).await.unwrap();
    let leadership = within(Duration::from_secs(5), "elected", campaign)
        .await
        .unwrap()
        .unwrap();
    match within(Duration::from_secs(5), "next event", events.next()).await {
        Some(Ok(LeaderEvent::Elected(l))) => assert_eq!(l.value, b"real"),
        other => panic!("{other:?}"),
    }
    leadership.resign().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_a_discovery_prefix_is_skipped() {
    let (_etcd, client) = single().await;
    let prefix = unique("foreign-services");
    let svc = format!("{prefix}/api/");
    // Before the cache starts, and after: both paths (read and watch) must skip.
    put_foreign(&client, format!("{svc}not-json"), "{oops").await;
    put_foreign(&client, format!("{svc}no-address"), r#"{"Metadata":1}"#).await;
    put_foreign(
        &client,
        format!("{svc}nested/id"),
        r#"{"Addr":"10.0.0.9:80"}"#,
    )
    .await;
    let mut bytes = svc.clone().into_bytes();
    bytes.extend_from_slice(b"\xff");
    put_foreign(&client, bytes, r#"{"Addr":"10.0.0.9:80"}"#).await;
    let discovery = Discovery::new(client.clone(), &prefix, "api")
        .await
        .unwrap();
    assert!(discovery.instances().is_empty());
    put_foreign(&client, format!("{svc}binary"), b"\x00\x01\x02".to_vec()).await;
    let s = session(&client, 10).await;
    let reg = Registry::new(&s, prefix.clone())
        .unwrap()
        .register("api", "real", "10.0.0.1:80", json!({"ok": true}))
        .await
        .unwrap();
    let snap = within(
        Duration::from_secs(5),
        "discovered",
        discovery.wait_for(reg.revision()),
    )
    .await
    .unwrap();
    let ids: Vec<String> = snap.values().map(|i| i.id.clone()).collect();
    assert_eq!(ids, ["real"]);
    // A foreign key fixed up to valid JSON appears like any instance (Go's endpoints do so).
    let fixed = put_foreign(
        &client,
        format!("{svc}not-json"),
        r#"{"Addr":"10.0.0.2:80"}"#,
    )
    .await;
    let snap = within(
        Duration::from_secs(5),
        "fixed up",
        discovery.wait_for(fixed),
    )
    .await
    .unwrap();
    assert_eq!(snap.len(), 2);
    // A plain prefix cache keeps everything, whatever the bytes.
    let cache = PrefixCache::new(client.clone(), svc.clone()).await.unwrap();
    assert_eq!(cache.snapshot().len(), 6);
    reg.deregister().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_key_bound_to_a_lease_that_expires_lets_the_waiter_in() {
    let (_etcd, client) = single().await;
    let name = unique("foreign-lease");
    let lease = client.clone().lease_grant(2, None).await.unwrap().id();
    client
        .clone()
        .put(
            format!("{name}/stranger"),
            "x",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let s = session(&client, 10).await;
    let guard = within(
        Duration::from_secs(10),
        "acquired after the stranger's lease expired",
        Mutex::new(&s, name.clone()).unwrap().lock(),
    )
    .await
    .unwrap();
    guard.unlock().await.unwrap();
}
