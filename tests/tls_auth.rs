//! TLS with required client certificates, and etcd authentication with a user confined to one
//! prefix: every primitive works inside it, and outside it the user gets a clear
//! `Error::PermissionDenied`, never a hang. Certificates are made in the test; no secret
//! lives in the repository.
#![cfg(feature = "testing")]

mod common;

use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Client, GetOptions, Permission};
use etcd_coord::testing::tls::TestCa;
use etcd_coord::testing::{ClusterOptions, EtcdCluster};
use etcd_coord::{
    Barrier, Connect, Discovery, DoubleBarrier, Election, ElectionObserver, Error, LeaderEvent,
    MultiLock, Mutex, PrefixCache, PriorityQueue, Queue, Registry, RwLock, Semaphore, Session,
    WorkQueue,
};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

/// How long a refused connection may take to be reported.
const REFUSED_WITHIN: Duration = Duration::from_secs(2);

async fn refused(what: &str, connect: Connect) -> Error {
    let started = Instant::now();
    let result = within(
        REFUSED_WITHIN + Duration::from_secs(3),
        what,
        connect.dial_timeout(REFUSED_WITHIN).connect(),
    )
    .await;
    let e = match result {
        Ok(_) => panic!("{what}: the connection was accepted"),
        Err(e) => e,
    };
    eprintln!(
        "{what}: refused after {} ms: {e}",
        started.elapsed().as_millis()
    );
    assert!(
        !matches!(e, Error::InvalidArgument { .. }),
        "{what}: {e:?} is not a refusal by the server"
    );
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_works_and_everyone_else_is_refused() {
    common::init_tracing();
    let ca = TestCa::new("etcd-coord test CA").unwrap();
    let etcd = EtcdCluster::start_with(ClusterOptions::new(1).tls(ca.clone()))
        .await
        .unwrap();
    let endpoint = etcd.endpoint(0);
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    // The harness's own probes still work: metrics on the plain metrics URL, status over TLS.
    etcd.metrics(0).await.unwrap();
    assert_eq!(etcd.leader_index().await.unwrap(), 0);

    let app = ca.client_cert("app").unwrap();
    let client = Connect::new(etcd.endpoints())
        .ca_cert_pem(ca.cert_pem())
        .client_cert_pem(app.cert_pem.clone(), app.key_pem.clone())
        .connect()
        .await
        .unwrap();
    let name = unique("tls");
    let s = session(&client, 5).await;
    let guard = Mutex::new(&s, name.clone()).unwrap().lock().await.unwrap();
    assert!(guard.fencing_token() > 0);
    guard.unlock().await.unwrap();
    let leadership = Election::new(&s, format!("{name}-election"))
        .unwrap()
        .campaign("me")
        .await
        .unwrap();
    leadership.resign().await.unwrap();
    // Endpoints without a scheme become https:// once TLS is configured; tls_domain picks the
    // name the certificate is checked against.
    let bare = endpoint.trim_start_matches("https://").to_string();
    let by_name = Connect::new([bare.clone()])
        .ca_cert_pem(ca.cert_pem())
        .client_cert_pem(app.cert_pem.clone(), app.key_pem.clone())
        .tls_domain("localhost")
        .connect()
        .await
        .unwrap();
    by_name
        .clone()
        .put(format!("{name}-k"), "v", None)
        .await
        .unwrap();
    s.close().await.unwrap();

    refused(
        "a plain-text client",
        Connect::new([format!("http://{bare}")]),
    )
    .await;
    refused(
        "a client without a certificate",
        Connect::new([endpoint.clone()]).ca_cert_pem(ca.cert_pem()),
    )
    .await;
    let stranger = TestCa::new("another CA").unwrap();
    let forged = stranger.client_cert("app").unwrap();
    refused(
        "a client whose certificate another CA signed",
        Connect::new([endpoint.clone()])
            .ca_cert_pem(ca.cert_pem())
            .client_cert_pem(forged.cert_pem, forged.key_pem),
    )
    .await;
    refused(
        "a client that does not trust the server's CA",
        Connect::new([endpoint.clone()])
            .ca_cert_pem(stranger.cert_pem())
            .client_cert_pem(app.cert_pem.clone(), app.key_pem.clone()),
    )
    .await;
}

/// A server with auth on: `root`, and `app`, who may read and write only under `prefix`.
async fn with_auth(etcd: &EtcdCluster, prefix: &str) -> (Client, Connect) {
    let mut admin = connect(etcd).await;
    admin.role_add("app-role").await.unwrap();
    admin
        .role_grant_permission("app-role", Permission::read_write(prefix).with_prefix())
        .await
        .unwrap();
    admin.user_add("app", "app-pw", None).await.unwrap();
    admin.user_grant_role("app", "app-role").await.unwrap();
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let root = Connect::new(etcd.endpoints())
        .user("root", "root-pw")
        .connect()
        .await
        .unwrap();
    (root, Connect::new(etcd.endpoints()).user("app", "app-pw"))
}

/// Expects a permission error, reported within a few seconds.
async fn denied<T: std::fmt::Debug>(
    what: &str,
    fut: impl std::future::Future<Output = etcd_coord::Result<T>>,
) {
    let started = Instant::now();
    match within(Duration::from_secs(5), what, fut).await {
        Err(Error::PermissionDenied { message, .. }) => eprintln!(
            "{what}: permission denied after {} ms ({message})",
            started.elapsed().as_millis()
        ),
        other => panic!("{what}: expected PermissionDenied, got {other:?}"),
    }
}

#[test]
fn a_user_confined_to_a_prefix_uses_every_primitive_there_and_is_denied_elsewhere() {
    // One future awaiting every primitive is too large for a test thread's stack in a debug
    // build: run it on a thread with room.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(confined_user())
        })
        .unwrap()
        .join()
        .unwrap();
}

async fn confined_user() {
    let (etcd, _) = single().await;
    if skip_unless_local(&etcd, "auth test (enables auth on the server)") {
        return;
    }
    let base = unique("tenant");
    let mine = format!("{base}/app/");
    let (root, app) = with_auth(&etcd, &mine).await;
    let client = app.connect().await.unwrap();
    // Sessions need only LeaseGrant and LeaseKeepAlive, which every user may do.
    let s = session(&client, 5).await;
    Box::pin(inside(&s, &client, &root, &mine)).await;
    Box::pin(outside(&s, &client, &base)).await;
    assert!(s.is_alive(), "permission errors do not end the session");
    s.close().await.unwrap();
    // Nothing was written outside, and inside only data and metadata outlive the session.
    assert!(keys(&root, &format!("{base}/other/")).await.is_empty());
    let left = root
        .clone()
        .get(mine.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    for kv in left.kvs() {
        assert_eq!(kv.lease(), 0, "{:?} outlived its session", kv.key_str());
    }
}

/// Every primitive, under the user's prefix.
async fn inside(s: &Session, client: &Client, root: &Client, mine: &str) {
    let s = s.clone();
    let n = |name: &str| format!("{mine}{name}");

    let g = Mutex::new(&s, n("mutex")).unwrap().lock().await.unwrap();
    g.txn(
        etcd_coord::etcd_client::Txn::new().and_then([etcd_coord::etcd_client::TxnOp::put(
            n("data"),
            "v",
            None,
        )]),
    )
    .await
    .unwrap();
    g.unlock().await.unwrap();
    Mutex::new(&s, n("mutex"))
        .unwrap()
        .try_lock()
        .await
        .unwrap()
        .unlock()
        .await
        .unwrap();
    let rw = RwLock::new(&s, n("rw")).unwrap();
    rw.read().await.unwrap().unlock().await.unwrap();
    rw.write().await.unwrap().unlock().await.unwrap();
    let sem = Semaphore::new(&s, n("sem"), 2).unwrap();
    sem.acquire().await.unwrap().unlock().await.unwrap();
    let multi = MultiLock::new([
        etcd_coord::Lockable::from(Mutex::new(&s, n("m1")).unwrap()),
        etcd_coord::Lockable::from(Semaphore::new(&s, n("sem"), 2).unwrap()),
    ])
    .unwrap();
    multi.lock().await.unwrap().unlock().await.unwrap();
    let election = Election::new(&s, n("election")).unwrap();
    let mut events = election.observe();
    let leadership = election.campaign("me").await.unwrap();
    leadership.proclaim("still me").await.unwrap();
    let seen = within(Duration::from_secs(5), "observe", events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        seen,
        LeaderEvent::Vacant { .. } | LeaderEvent::Elected(_)
    ));
    assert_eq!(election.leader().await.unwrap().unwrap().value, b"still me");
    leadership.resign().await.unwrap();
    let cache = PrefixCache::new(client.clone(), n("config/"))
        .await
        .unwrap();
    let registry = Registry::new(&s, n("services")).unwrap();
    let discovery = Discovery::new(client.clone(), &n("services"), "api")
        .await
        .unwrap();
    let reg = registry
        .register("api", "one", "10.0.0.1:80", json!({"zone": "a"}))
        .await
        .unwrap();
    reg.update(json!({"zone": "b"})).await.unwrap();
    within(
        Duration::from_secs(5),
        "discovered",
        discovery.wait_for(reg.revision()),
    )
    .await
    .unwrap();
    assert_eq!(discovery.instances().len(), 1);
    reg.deregister().await.unwrap();
    let queue = Queue::new(&s, n("queue")).unwrap();
    queue.push("a").await.unwrap();
    assert_eq!(queue.pop().await.unwrap(), b"a");
    let pq = PriorityQueue::new(&s, n("pq")).unwrap();
    pq.push("b", 3).await.unwrap();
    assert_eq!(pq.pop().await.unwrap(), b"b");
    let jobs = WorkQueue::new(&s, n("jobs")).unwrap();
    jobs.push("job").await.unwrap();
    jobs.claim().await.unwrap().ack().await.unwrap();
    let barrier = Barrier::new(&s, n("barrier")).unwrap();
    let hold = barrier.hold().await.unwrap();
    hold.release().await.unwrap();
    within(Duration::from_secs(5), "barrier open", barrier.wait())
        .await
        .unwrap();
    let double = DoubleBarrier::new(&s, n("double"), 1).unwrap();
    double.enter().await.unwrap().leave().await.unwrap();
    root.clone().put(n("config/x"), "1", None).await.unwrap();
    within(
        Duration::from_secs(5),
        "cache sees the write",
        cache.wait_until(|snap| snap.len() == 1),
    )
    .await
    .unwrap();
}

/// Outside the prefix: a clear error, promptly, and nothing left behind.
async fn outside(s: &Session, client: &Client, base: &str) {
    let s = s.clone();
    let other = |name: &str| format!("{base}/other/{name}");
    denied(
        "Mutex::lock",
        Mutex::new(&s, other("mutex")).unwrap().lock(),
    )
    .await;
    denied(
        "Mutex::try_lock",
        Mutex::new(&s, other("mutex")).unwrap().try_lock(),
    )
    .await;
    denied("RwLock::read", RwLock::new(&s, other("rw")).unwrap().read()).await;
    denied(
        "RwLock::write",
        RwLock::new(&s, other("rw")).unwrap().write(),
    )
    .await;
    denied(
        "Semaphore::acquire",
        Semaphore::new(&s, other("sem"), 2).unwrap().acquire(),
    )
    .await;
    denied(
        "Election::campaign",
        Election::new(&s, other("election")).unwrap().campaign("x"),
    )
    .await;
    denied(
        "ElectionObserver::leader",
        ElectionObserver::new(client.clone(), other("election"))
            .unwrap()
            .leader(),
    )
    .await;
    let mut outside_events = ElectionObserver::new(client.clone(), other("election"))
        .unwrap()
        .observe();
    denied("Election::observe", async {
        outside_events.next().await.expect("an item")
    })
    .await;
    denied(
        "PrefixCache::new",
        PrefixCache::new(client.clone(), other("config/")),
    )
    .await;
    denied(
        "Registry::register",
        Registry::new(&s, other("services")).unwrap().register(
            "api",
            "x",
            "10.0.0.2:80",
            json!(null),
        ),
    )
    .await;
    denied(
        "Discovery::new",
        Discovery::new(client.clone(), &other("services"), "api"),
    )
    .await;
    denied(
        "Queue::push",
        Queue::new(&s, other("queue")).unwrap().push("x"),
    )
    .await;
    denied(
        "PriorityQueue::push",
        PriorityQueue::new(&s, other("pq")).unwrap().push("x", 1),
    )
    .await;
    denied(
        "WorkQueue::push",
        WorkQueue::new(&s, other("jobs")).unwrap().push("x"),
    )
    .await;
    denied(
        "WorkQueue::claim",
        WorkQueue::new(&s, other("jobs")).unwrap().claim(),
    )
    .await;
    denied(
        "Barrier::hold",
        Barrier::new(&s, other("barrier")).unwrap().hold(),
    )
    .await;
    denied(
        "Barrier::wait",
        Barrier::new(&s, other("barrier")).unwrap().wait(),
    )
    .await;
    denied(
        "DoubleBarrier::enter",
        DoubleBarrier::new(&s, other("double"), 2).unwrap().enter(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_client_keeps_working_after_the_server_restarts() {
    let (mut etcd, _) = single().await;
    if skip_unless_local(&etcd, "auth restart test") {
        return;
    }
    let mine = format!("{}/", unique("tenant"));
    let (_root, app) = with_auth(&etcd, &mine).await;
    let client = app.connect().await.unwrap();
    let s = session(&client, 10).await;
    let mutex = Mutex::new(&s, format!("{mine}lock")).unwrap();
    mutex.lock().await.unwrap().unlock().await.unwrap();
    // A restart forgets every auth token the server handed out.
    etcd.restart(0).await.unwrap();
    let started = Instant::now();
    let guard = within(
        Duration::from_secs(10),
        "lock after the restart",
        mutex.lock(),
    )
    .await
    .expect("the client re-authenticates by itself");
    eprintln!(
        "locked {} ms after the restart",
        started.elapsed().as_millis()
    );
    guard.unlock().await.unwrap();
    // The session's keepalive stream re-authenticated too.
    tokio::time::sleep(s.ttl()).await;
    assert!(s.is_alive(), "{:?}", s.state());
    let fresh: Session = session(&client, 5).await;
    fresh.close().await.unwrap();
}
