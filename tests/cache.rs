//! PrefixCache: initial read + synced watch, typed changes in order, slow readers, compaction
//! races, restarts, terminal errors and the lifetime of the background watch.
#![cfg(feature = "testing")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Client, CompactionOptions, Permission, RoleRevokePermissionOptions};
use etcd_coord::{Change, Connect, Error, PrefixCache, Snapshot};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn model(s: &Snapshot<etcd_coord::etcd_client::KeyValue>) -> Model {
    s.iter()
        .map(|(k, kv)| (k.to_vec(), kv.value().to_vec()))
        .collect()
}

fn apply(m: &mut Model, change: &Change<etcd_coord::etcd_client::KeyValue>) {
    match change.value() {
        Some(kv) => m.insert(change.key().to_vec(), kv.value().to_vec()),
        None => m.remove(change.key()),
    };
}

/// The keys and values under `prefix` in etcd, and the revision of the read.
async fn truth(client: &Client, prefix: &str) -> (Model, i64) {
    let resp = client
        .clone()
        .get(
            prefix,
            Some(etcd_coord::etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let m = resp
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect();
    (m, resp.header().unwrap().revision())
}

async fn put(client: &Client, key: &str, value: &str) -> i64 {
    client
        .clone()
        .put(key, value, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

async fn delete(client: &Client, key: &str) -> i64 {
    client
        .clone()
        .delete(key, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_contents_then_added_updated_removed_in_revision_order() {
    let (etcd, client) = single().await;
    let prefix = format!("{}/", unique("config"));
    put(&client, &format!("{prefix}a"), "1").await;
    put(&client, &format!("{prefix}b"), "2").await;
    // Just outside the prefix: must never show up.
    put(&client, &format!("{}x", prefix.trim_end_matches('/')), "no").await;
    let cache = PrefixCache::new(connect(&etcd).await, prefix.clone())
        .await
        .unwrap();
    let (initial, mut changes) = cache.subscribe();
    assert_eq!(model(&initial), truth(&client, &prefix).await.0);
    assert_eq!(initial.len(), 2);

    put(&client, &format!("{prefix}c"), "3").await;
    put(&client, &format!("{prefix}a"), "1b").await;
    let last = delete(&client, &format!("{prefix}b")).await;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let c = within(Duration::from_secs(5), "a change", changes.recv())
            .await
            .unwrap();
        seen.push(c);
    }
    match &seen[..] {
        [Change::Added { key: k1, value }, Change::Updated { key: k2, old, new }, Change::Removed { key: k3, old: gone }] =>
        {
            assert_eq!(&**k1, format!("{prefix}c").as_bytes());
            assert_eq!(value.value(), b"3");
            assert_eq!(&**k2, format!("{prefix}a").as_bytes());
            assert_eq!((old.value(), new.value()), (&b"1"[..], &b"1b"[..]));
            assert_eq!(&**k3, format!("{prefix}b").as_bytes());
            assert_eq!(gone.value(), b"2");
        }
        other => panic!("unexpected changes: {other:?}"),
    }
    let snapshot = within(Duration::from_secs(5), "revision", cache.wait_for(last))
        .await
        .unwrap();
    assert_eq!(snapshot.revision(), last);
    assert_eq!(model(&snapshot), truth(&client, &prefix).await.0);
    assert_eq!(cache.stats().watches_opened, 1);
    assert_eq!(cache.stats().resyncs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_the_net_difference_and_converges() {
    let (etcd, client) = single().await;
    let prefix = format!("{}/", unique("slow"));
    for i in 0..10 {
        put(&client, &format!("{prefix}{i}"), "0").await;
    }
    let cache = PrefixCache::new(connect(&etcd).await, prefix.clone())
        .await
        .unwrap();
    let (initial, mut changes) = cache.subscribe();
    let mut writes = 0;
    let mut last = 0;
    // More steps than the cache keeps for slow streams (256), so this one gets the net
    // difference rather than the history.
    for round in 1..=40 {
        for i in 0..10 {
            last = if (i + round) % 3 == 0 {
                delete(&client, &format!("{prefix}{i}")).await
            } else {
                put(&client, &format!("{prefix}{i}"), &round.to_string()).await
            };
            writes += 1;
        }
    }
    // Nobody read the stream while 400 writes went by.
    within(
        Duration::from_secs(5),
        "cache caught up",
        cache.wait_for(last),
    )
    .await
    .unwrap();
    let (expected, _) = truth(&client, &prefix).await;
    let mut mine = model(&initial);
    let mut received = 0;
    within(Duration::from_secs(5), "stream converges", async {
        while mine != expected {
            apply(&mut mine, &changes.recv().await.unwrap());
            received += 1;
        }
    })
    .await;
    eprintln!("{writes} writes reached a slow reader as {received} changes");
    assert!(received <= 10, "one change per key at most: {received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_racing_with_writes_never_leaves_the_cache_wrong() {
    let (etcd, client) = single().await;
    let prefix = format!("{}/", unique("race"));
    let cache = PrefixCache::new(connect(&etcd).await, prefix.clone())
        .await
        .unwrap();
    let writer = {
        let (client, prefix) = (client.clone(), prefix.clone());
        tokio::spawn(async move {
            for n in 0..300 {
                let key = format!("{prefix}{}", n % 17);
                if n % 5 == 0 {
                    delete(&client, &key).await;
                } else {
                    put(&client, &key, &n.to_string()).await;
                }
            }
        })
    };
    // Compact to the newest revision again and again while the writer runs.
    let mut compactions = 0;
    while !writer.is_finished() {
        let rev = truth(&client, "none").await.1;
        let _ = client
            .clone()
            .compact(rev, Some(CompactionOptions::new().with_physical()))
            .await;
        compactions += 1;
    }
    writer.await.unwrap();
    let (expected, rev) = truth(&client, &prefix).await;
    let snapshot = within(
        Duration::from_secs(10),
        "cache converges",
        cache.wait_until(|s| model(s) == expected),
    )
    .await
    .unwrap();
    eprintln!(
        "{compactions} compactions during 300 writes; cache at revision {} (store {rev}), stats {:?}",
        snapshot.revision(),
        cache.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_follows_the_server_through_a_restart() {
    let (mut etcd, client) = single().await;
    if skip_unless_local(&etcd, "the_cache_follows_the_server_through_a_restart") {
        return;
    }
    let prefix = format!("{}/", unique("restart"));
    put(&client, &format!("{prefix}before"), "1").await;
    let cache = PrefixCache::new(connect(&etcd).await, prefix.clone())
        .await
        .unwrap();
    // The restart must break an open watch, not race with the first one being opened.
    eventually(Duration::from_secs(5), "watch open", || async {
        let m = etcd.metrics(0).await.unwrap();
        m.counter("etcd_debugging_mvcc_watcher_total") >= 1.0
    })
    .await;
    etcd.stop(0).await.unwrap();
    etcd.restart(0).await.unwrap();
    let rev = within(Duration::from_secs(10), "write after restart", async {
        loop {
            match client
                .clone()
                .put(format!("{prefix}after"), "2", None)
                .await
            {
                Ok(r) => break r.header().unwrap().revision(),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    let s = within(
        Duration::from_secs(10),
        "cache sees it",
        cache.wait_for(rev),
    )
    .await
    .unwrap();
    assert_eq!(s.len(), 2);
    assert!(cache.stats().watches_opened >= 2, "{:?}", cache.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_lives_exactly_as_long_as_a_cache_handle_or_change_stream() {
    let (etcd, _client) = single().await;
    if skip_unless_local(&etcd, "watch lifetime (reads the server's watch gauge)") {
        return;
    }
    let streams = || async {
        etcd.metrics(0)
            .await
            .unwrap()
            .counter("etcd_debugging_mvcc_watch_stream_total")
    };
    let baseline = streams().await;
    let cache = PrefixCache::new(connect(&etcd).await, unique("life"))
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "one watch stream", || async {
        streams().await == baseline + 1.0
    })
    .await;
    let changes = cache.changes();
    let clone = cache.clone();
    drop(cache);
    drop(clone);
    // The change stream still needs the watch.
    assert_eq!(streams().await, baseline + 1.0);
    drop(changes);
    eventually(Duration::from_secs(5), "watch closed", || async {
        streams().await == baseline
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_read_permission_ends_the_change_stream_with_that_error() {
    let (etcd, root) = single().await;
    if skip_unless_local(&etcd, "permission test (enables auth on the server)") {
        return;
    }
    let prefix = format!("{}/", unique("secret"));
    let mut root = root;
    root.role_add("reader").await.unwrap();
    root.role_grant_permission("reader", Permission::read(prefix.as_str()).with_prefix())
        .await
        .unwrap();
    root.user_add("app", "app-pw", None).await.unwrap();
    root.user_grant_role("app", "reader").await.unwrap();
    root.user_add("root", "root-pw", None).await.unwrap();
    root.user_grant_role("root", "root").await.unwrap();
    root.auth_enable().await.unwrap();
    let mut root = Connect::new(etcd.endpoints())
        .user("root", "root-pw")
        .connect()
        .await
        .unwrap();
    let app = Connect::new(etcd.endpoints())
        .user("app", "app-pw")
        .connect()
        .await
        .unwrap();
    root.put(format!("{prefix}k"), "v", None).await.unwrap();
    let cache = PrefixCache::new(app.clone(), prefix.clone()).await.unwrap();
    assert_eq!(cache.snapshot().len(), 1);
    let mut changes = cache.changes();
    // Existing watches keep their rights; a new one is checked. Close the watch, take the
    // right away, and let the cache try to watch again.
    let hold = cache.hold_watch().await;
    root.role_revoke_permission(
        "reader",
        prefix.as_str(),
        Some(RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    drop(hold);
    let end = within(Duration::from_secs(10), "the stream ends", changes.recv()).await;
    assert!(
        matches!(end, Err(Error::PermissionDenied { .. })),
        "{end:?}"
    );
    // It keeps saying so, and waiting on the cache reports it too.
    assert!(matches!(
        changes.recv().await,
        Err(Error::PermissionDenied { .. })
    ));
    assert!(matches!(
        cache.wait_for(i64::MAX).await,
        Err(Error::PermissionDenied { .. })
    ));
    // The last contents stay readable.
    assert_eq!(cache.snapshot().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_rejected_naming_them() {
    let (_etcd, client) = single().await;
    match PrefixCache::new(client.clone(), "").await {
        Err(Error::InvalidArgument { name: "prefix", .. }) => {}
        other => panic!("{other:?}"),
    }
    match PrefixCache::builder(client, "p/")
        .request_timeout(Duration::ZERO)
        .build()
        .await
    {
        Err(Error::InvalidArgument {
            name: "request_timeout",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}
