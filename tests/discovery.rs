//! Registry and discovery: visibility across clients, crashes, takeover and fencing,
//! compaction, member failures, one watch for 1,000 instances, Go-compatible values, bad input.
#![cfg(feature = "testing")]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Client, CompactionOptions, GetOptions};
use etcd_coord::{Change, Discovery, Error, Registration, Registry, Snapshot};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

/// Counts live heap bytes, to measure what a cache of 1,000 instances really takes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn ids(s: &Snapshot<etcd_coord::Instance>) -> Vec<String> {
    s.values().map(|i| i.id.clone()).collect()
}

/// Registered instances of `service` under `prefix` according to etcd itself.
async fn stored(client: &Client, prefix: &str, service: &str) -> BTreeMap<String, Vec<u8>> {
    let p = format!("{prefix}/{service}/");
    let resp = client
        .clone()
        .get(p.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap()[p.len()..].to_string(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_appear_in_another_clients_list_and_disappear_after_deregistering() {
    let (etcd, client) = single().await;
    let prefix = unique("services");
    let s = session(&client, 10).await;
    let registry = Registry::new(&s, prefix.clone()).unwrap();
    // The observer has its own connection, as another process would.
    let observer = Discovery::new(connect(&etcd).await, &prefix, "billing")
        .await
        .unwrap();
    let mut changes = observer.changes();

    let started = Instant::now();
    let mut regs = Vec::new();
    for (id, zone) in [("a", "eu"), ("b", "us"), ("c", "ap")] {
        let r = registry
            .register(
                "billing",
                id,
                &format!("10.0.0.{}:80", regs.len() + 1),
                json!({ "zone": zone }),
            )
            .await
            .unwrap();
        regs.push(r);
    }
    let last = regs[2].revision();
    let seen = within(
        Duration::from_secs(5),
        "registrations seen",
        observer.wait_for(last),
    )
    .await
    .unwrap();
    eprintln!(
        "3 registrations visible to another client after {:?}",
        started.elapsed()
    );
    assert_eq!(ids(&seen), ["a", "b", "c"]);
    let b = observer.get("b").unwrap();
    assert_eq!(b.address, "10.0.0.2:80");
    assert_eq!(b.metadata, json!({"zone": "us"}));
    assert_eq!(b.lease, s.lease_id());
    for _ in 0..3 {
        let c = changes.recv().await.unwrap();
        assert!(matches!(c, Change::Added { .. }), "{c:?}");
    }

    // Round robin: every instance once per round.
    let picker = observer.picker();
    let mut picked: Vec<String> = (0..6).map(|_| picker.pick().unwrap().id.clone()).collect();
    picked.sort();
    assert_eq!(picked, ["a", "a", "b", "b", "c", "c"]);

    // Fenced metadata update, seen as an update with old and new values.
    let rev = regs[0]
        .update(json!({"zone": "eu", "draining": true}))
        .await
        .unwrap();
    match within(Duration::from_secs(5), "update seen", changes.recv())
        .await
        .unwrap()
    {
        Change::Updated { old, new, .. } => {
            assert_eq!(old.metadata, json!({"zone": "eu"}));
            assert_eq!(new.metadata["draining"], json!(true));
            assert_eq!(new.mod_revision, rev);
        }
        other => panic!("{other:?}"),
    }

    let started = Instant::now();
    let c = regs.remove(2);
    c.deregister().await.unwrap();
    match within(Duration::from_secs(5), "removal seen", changes.recv())
        .await
        .unwrap()
    {
        Change::Removed { old, .. } => assert_eq!(old.id, "c"),
        other => panic!("{other:?}"),
    }
    eprintln!("deregistration visible after {:?}", started.elapsed());
    assert_eq!(ids(&observer.snapshot()), ["a", "b"]);
    let picked: Vec<String> = (0..4).map(|_| picker.pick().unwrap().id.clone()).collect();
    assert!(picked.iter().all(|id| id != "c"), "{picked:?}");

    // Dropping a registration deregisters it in the background; close waits for that.
    drop(regs);
    s.close().await.unwrap();
    within(
        Duration::from_secs(5),
        "all gone",
        observer.wait_until(|s| s.is_empty()),
    )
    .await
    .unwrap();
    assert!(observer.picker().pick().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_disappears_within_its_ttl() {
    let (etcd, client) = single().await;
    let prefix = unique("services");
    let ttl = Duration::from_secs(3);
    let s = session(&client, ttl.as_secs()).await;
    let observer = Discovery::new(connect(&etcd).await, &prefix, "api")
        .await
        .unwrap();
    let r = Registry::new(&s, prefix.clone())
        .unwrap()
        .register("api", "doomed", "10.0.0.1:80", json!(null))
        .await
        .unwrap();
    within(
        Duration::from_secs(5),
        "seen",
        observer.wait_for(r.revision()),
    )
    .await
    .unwrap();
    // A crash: no deregistration, no revoke; the keepalive simply stops.
    r.detach();
    s.orphan();
    let crashed = Instant::now();
    within(
        ttl + Duration::from_secs(3),
        "crashed instance removed",
        observer.wait_until(|s| s.is_empty()),
    )
    .await
    .unwrap();
    let gone_after = crashed.elapsed();
    eprintln!("crashed instance disappeared {gone_after:?} after the crash (TTL {ttl:?})");
    assert!(
        gone_after <= ttl + Duration::from_millis(1500),
        "{gone_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_takes_the_instance_over_and_the_old_registration_is_fenced() {
    let (etcd, client) = single().await;
    let prefix = unique("services");
    let observer = Discovery::new(connect(&etcd).await, &prefix, "worker")
        .await
        .unwrap();

    // The first process crashes; its restarted successor registers the same id at once,
    // before the old lease has expired.
    let crashed = session(&client, 2).await;
    Registry::new(&crashed, prefix.clone())
        .unwrap()
        .register("worker", "w1", "10.0.0.1:80", json!({"gen": 1}))
        .await
        .unwrap()
        .detach();
    crashed.orphan();
    let second = session(&client, 10).await;
    let r2 = Registry::new(&second, prefix.clone())
        .unwrap()
        .register("worker", "w1", "10.0.0.1:80", json!({"gen": 2}))
        .await
        .unwrap();
    // The old lease expires; the instance stays, bound to the new session.
    eventually(Duration::from_secs(10), "old lease expired", || {
        let mut c = client.clone();
        let lease = crashed.lease_id();
        async move { c.lease_time_to_live(lease, None).await.unwrap().ttl() <= 0 }
    })
    .await;
    let w1 = observer.wait_for(r2.revision()).await.unwrap();
    let w1 = w1.get(format!("{prefix}/worker/w1")).unwrap().clone();
    assert_eq!(
        (w1.lease, &w1.metadata),
        (second.lease_id(), &json!({"gen": 2}))
    );

    // A third session takes it over while the second still lives: the second's handle can
    // neither update nor delete the newer registration.
    let third = session(&client, 10).await;
    let r3 = Registry::new(&third, prefix.clone())
        .unwrap()
        .register("worker", "w1", "10.0.0.3:80", json!({"gen": 3}))
        .await
        .unwrap();
    assert!(matches!(
        r2.update(json!({"gen": "stale"})).await,
        Err(Error::NotHeld { .. })
    ));
    assert!(matches!(r2.deregister().await, Err(Error::NotHeld { .. })));
    second.close().await.unwrap();
    let now = stored(&client, &prefix, "worker").await;
    assert_eq!(now.len(), 1);
    let value: serde_json::Value = serde_json::from_slice(&now["w1"]).unwrap();
    assert_eq!(
        value,
        json!({"Addr": "10.0.0.3:80", "Metadata": {"gen": 3}})
    );
    r3.deregister().await.unwrap();
    within(
        Duration::from_secs(5),
        "deregistered",
        observer.wait_until(|s| s.is_empty()),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cancelled_by_compaction_resynchronises_to_the_true_list() {
    let (etcd, client) = single().await;
    let prefix = unique("services");
    let s = session(&client, 10).await;
    let registry = Registry::new(&s, prefix.clone()).unwrap();
    let observer = Discovery::new(connect(&etcd).await, &prefix, "db")
        .await
        .unwrap();
    let mut regs: BTreeMap<String, Registration> = BTreeMap::new();
    for id in ["a", "b", "c", "d"] {
        let r = registry
            .register("db", id, "10.0.0.1:5432", json!(1))
            .await
            .unwrap();
        regs.insert(id.into(), r);
    }
    let rev = regs["d"].revision();
    observer.wait_for(rev).await.unwrap();
    let mut changes = observer.changes();

    // The observer is cut off; meanwhile the list changes and the history is compacted, so
    // its watch cannot resume where it left off.
    let hold = observer.cache().hold_watch().await;
    regs.remove("a").unwrap().deregister().await.unwrap();
    regs["b"].update(json!(2)).await.unwrap();
    let e = registry
        .register("db", "e", "10.0.0.5:5432", json!(1))
        .await
        .unwrap();
    regs.insert("e".into(), e);
    let head = regs["e"].revision();
    client
        .clone()
        .compact(head, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    assert_eq!(
        ids(&observer.snapshot()),
        ["a", "b", "c", "d"],
        "still cut off"
    );
    drop(hold);

    let s2 = within(
        Duration::from_secs(10),
        "resynchronised",
        observer.wait_for(head),
    )
    .await
    .unwrap();
    assert_eq!(ids(&s2), ["b", "c", "d", "e"]);
    assert_eq!(observer.get("b").unwrap().metadata, json!(2));
    assert_eq!(
        observer.cache().stats().resyncs,
        1,
        "{:?}",
        observer.cache().stats()
    );
    // The difference arrives as changes: a removed, b updated, e added.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(match changes.recv().await.unwrap() {
            Change::Added { value, .. } => format!("+{}", value.id),
            Change::Updated { new, .. } => format!("~{}", new.id),
            Change::Removed { old, .. } => format!("-{}", old.id),
        });
    }
    assert_eq!(got, ["-a", "~b", "+e"]);
    // And the watch carries on from the re-read.
    let f = registry
        .register("db", "f", "10.0.0.6:5432", json!(1))
        .await
        .unwrap();
    within(
        Duration::from_secs(5),
        "later change",
        observer.wait_for(f.revision()),
    )
    .await
    .unwrap();
    assert!(observer.get("f").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_keeps_converging_while_each_of_three_members_is_killed_in_turn() {
    let (mut etcd, client) = cluster(3).await;
    if skip_unless_local(&etcd, "member kill test") {
        return;
    }
    let prefix = unique("services");
    let s = session(&client, 10).await;
    let registry = Registry::new(&s, prefix.clone()).unwrap();
    let observer = Discovery::new(connect(&etcd).await, &prefix, "edge")
        .await
        .unwrap();
    let mut current = registry
        .register("edge", "start", "10.0.0.1:80", json!(null))
        .await
        .unwrap();
    observer.wait_for(current.revision()).await.unwrap();
    for member in 0..3 {
        etcd.kill(member).unwrap();
        let started = Instant::now();
        // Replace the instance while the member is down.
        let id = format!("after-kill-{member}");
        let next = within(
            Duration::from_secs(15),
            "register with a member down",
            registry.register("edge", &id, "10.0.0.2:80", json!(member)),
        )
        .await
        .unwrap();
        let registered = started.elapsed();
        // Dropping the old registration deregisters it in the background, retrying past the
        // dead member.
        drop(std::mem::replace(&mut current, next));
        within(
            Duration::from_secs(15),
            "observer converges",
            observer.wait_until(|snap| ids(snap) == [id.clone()]),
        )
        .await
        .unwrap();
        eprintln!(
            "member {member} killed: registered after {registered:?}, list converged after {:?} \
             (stats {:?})",
            started.elapsed(),
            observer.cache().stats()
        );
        etcd.restart(member).await.unwrap();
    }
    // The watch stream lived on one of the members, so at least one kill broke it.
    assert!(
        observer.cache().stats().watches_opened >= 2,
        "{:?}",
        observer.cache().stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_instances_use_one_watch_stream() {
    let (etcd, client) = single().await;
    if skip_unless_local(&etcd, "watch gauge test (reads the server's metrics)") {
        return;
    }
    let gauges = || async {
        let m = etcd.metrics(0).await.unwrap();
        (
            m.counter("etcd_debugging_mvcc_watch_stream_total"),
            m.counter("etcd_debugging_mvcc_watcher_total"),
        )
    };
    let prefix = unique("services");
    let s = session(&client, 10).await;
    let registry = Registry::new(&s, prefix.clone()).unwrap();
    let before = gauges().await;
    let observer = Discovery::new(connect(&etcd).await, &prefix, "fleet")
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the cache's watch", || async {
        gauges().await == (before.0 + 1.0, before.1 + 1.0)
    })
    .await;

    let started = Instant::now();
    let regs: Vec<Registration> = futures::stream::iter(0..1000)
        .map(|i| {
            let registry = registry.clone();
            async move {
                registry
                    .register(
                        "fleet",
                        &format!("node-{i:04}"),
                        &format!("10.1.{}.{}:8080", i / 256, i % 256),
                        json!({ "zone": format!("z{}", i % 3), "weight": i % 10 }),
                    )
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let head = regs.iter().map(|r| r.revision()).max().unwrap();
    let snap = within(Duration::from_secs(10), "all seen", observer.wait_for(head))
        .await
        .unwrap();
    eprintln!(
        "1000 registrations seen by the cache {:?} after the first",
        started.elapsed()
    );
    assert_eq!(
        gauges().await,
        (before.0 + 1.0, before.1 + 1.0),
        "one stream, one watcher"
    );
    assert_eq!(observer.cache().stats().watches_opened, 1);

    let truth = stored(&client, &prefix, "fleet").await;
    assert_eq!(truth.len(), 1000);
    assert_eq!(snap.len(), 1000);
    for (id, raw) in &truth {
        let i = snap.get(format!("{prefix}/fleet/{id}")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(raw).unwrap();
        assert_eq!(i.address, v["Addr"].as_str().unwrap());
        assert_eq!(i.metadata, v["Metadata"]);
    }

    // Memory: the estimate, and the live heap a second cache of the same list really adds.
    let second_client = connect(&etcd).await;
    let live_before = LIVE.load(Ordering::Relaxed);
    let second = Discovery::new(second_client, &prefix, "fleet")
        .await
        .unwrap();
    assert_eq!(second.snapshot().len(), 1000);
    let measured = LIVE.load(Ordering::Relaxed) - live_before;
    eprintln!(
        "cache of 1000 instances: approx_bytes() = {} B ({} B/instance); measured heap of a \
         second cache (its task and watch stream included) = {} B ({} B/instance)",
        snap.approx_bytes(),
        snap.approx_bytes() / 1000,
        measured,
        measured / 1000
    );
    let estimate = snap.approx_bytes() as f64;
    assert!(
        (0.5..=1.5).contains(&(estimate / measured as f64)),
        "the estimate should be within 50 % of the measurement"
    );
    drop(second);
    for r in regs {
        r.detach();
    }
    s.close().await.unwrap();
    within(
        Duration::from_secs(10),
        "all gone with the session",
        observer.wait_until(|s| s.is_empty()),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_go_endpoints_json_both_ways() {
    let (etcd, client) = single().await;
    let prefix = unique("services");
    let s = session(&client, 10).await;
    let observer = Discovery::new(connect(&etcd).await, &prefix, "grpc")
        .await
        .unwrap();
    let _ours = Registry::new(&s, prefix.clone())
        .unwrap()
        .register("grpc", "ours", "10.0.0.1:50051", json!({"weight": 3}))
        .await
        .unwrap();
    // What Go's endpoints.Manager.AddEndpoint writes (no lease, null metadata), plus keys that
    // are not instances of this service.
    let mut c = client.clone();
    c.put(
        format!("{prefix}/grpc/go"),
        r#"{"Addr":"10.0.0.2:50051","Metadata":null}"#,
        None,
    )
    .await
    .unwrap();
    c.put(format!("{prefix}/grpc/garbage"), "not json", None)
        .await
        .unwrap();
    c.put(format!("{prefix}/grpc/nested/x"), r#"{"Addr":"x"}"#, None)
        .await
        .unwrap();
    let rev = c
        .put(format!("{prefix}/grpcx/other"), r#"{"Addr":"y"}"#, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    within(
        Duration::from_secs(5),
        "seen",
        observer.wait_until(|s| s.len() == 2),
    )
    .await
    .unwrap();
    assert_eq!(ids(&observer.snapshot()), ["go", "ours"]);
    let go = observer.get("go").unwrap();
    assert_eq!(
        (go.address.as_str(), &go.metadata, go.lease),
        ("10.0.0.2:50051", &json!(null), 0)
    );
    let ours: BTreeMap<String, u32> = observer.get("ours").unwrap().metadata_as().unwrap();
    assert_eq!(ours["weight"], 3);
    let raw = stored(&client, &prefix, "grpc").await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&raw["ours"]).unwrap(),
        json!({"Addr": "10.0.0.1:50051", "Metadata": {"weight": 3}})
    );
    // A value that stops being an instance is reported as removed.
    let mut changes = observer.changes();
    c.put(format!("{prefix}/grpc/go"), "{}", None)
        .await
        .unwrap();
    match within(Duration::from_secs(5), "removal", changes.recv())
        .await
        .unwrap()
    {
        Change::Removed { old, .. } => assert_eq!(old.id, "go"),
        other => panic!("{other:?}"),
    }
    assert!(rev > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_naming_the_argument_and_writes_nothing() {
    let (_etcd, client) = single().await;
    let prefix = unique("services");
    let s = session(&client, 5).await;
    for bad in ["", "trailing/", "nul\0"] {
        match Registry::new(&s, bad) {
            Err(Error::InvalidArgument { name: "prefix", .. }) => {}
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let registry = Registry::new(&s, prefix.clone()).unwrap();
    let huge = json!("x".repeat(etcd_coord::MAX_INSTANCE_VALUE_LEN));
    let cases: [(&str, &str, &str, serde_json::Value, &str); 9] = [
        ("", "id", "h:1", json!(null), "service"),
        ("a/b", "id", "h:1", json!(null), "service"),
        ("tab\t", "id", "h:1", json!(null), "service"),
        ("svc", "", "h:1", json!(null), "id"),
        ("svc", "x/y", "h:1", json!(null), "id"),
        ("svc", "line\n", "h:1", json!(null), "id"),
        ("svc", "id", "", json!(null), "address"),
        ("svc", "id", "h:1\n", json!(null), "address"),
        ("svc", "id", "h:1", huge, "metadata"),
    ];
    for (service, id, address, metadata, arg) in cases {
        match registry.register(service, id, address, metadata).await {
            Err(Error::InvalidArgument { name, .. }) if name == arg => {}
            other => panic!("{service:?}/{id:?}/{address:?}: expected {arg}: {other:?}"),
        }
    }
    for (p, svc, arg) in [
        ("", "svc", "prefix"),
        (prefix.as_str(), "", "service"),
        (prefix.as_str(), "a/b", "service"),
    ] {
        match Discovery::new(client.clone(), p, svc).await {
            Err(Error::InvalidArgument { name, .. }) if name == arg => {}
            other => panic!("{p:?}/{svc:?}: expected {arg}: {other:?}"),
        }
    }
    let ok = registry
        .register("svc", "id", "h:1", json!(null))
        .await
        .unwrap();
    assert!(matches!(
        ok.update(json!("y".repeat(etcd_coord::MAX_INSTANCE_VALUE_LEN)))
            .await,
        Err(Error::InvalidArgument {
            name: "metadata",
            ..
        })
    ));
    assert_eq!(keys(&client, &format!("{prefix}/")).await.len(), 1);
    ok.deregister().await.unwrap();
    assert!(keys(&client, &format!("{prefix}/")).await.is_empty());
}
