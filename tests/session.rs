//! Session: a lease and a keepalive whose reported state never outlives the lease.
#![cfg(feature = "testing")]

mod common;

use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::PutOptions;
use etcd_coord::{Connect, Error, ExpiredCause, Session, SessionState};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_on_a_session_outlives_its_ttl_while_alive_and_goes_on_close() {
    let (_etcd, client) = single().await;
    let key = unique("alive");
    let session = session(&client, 2).await;
    let mut c = client.clone();
    c.put(
        key.as_str(),
        "v",
        Some(PutOptions::new().with_lease(session.lease_id())),
    )
    .await
    .unwrap();
    // The property under test is time itself: three TTLs of a living session.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(session.state(), SessionState::Alive);
    assert_eq!(keys(&client, &key).await, vec![key.clone()]);

    session.close().await.unwrap();
    assert_eq!(session.state(), SessionState::Closed);
    assert!(
        keys(&client, &key).await.is_empty(),
        "close revokes the lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_by_another_client_is_reported_within_one_ttl() {
    let (_etcd, client) = single().await;
    let session = session(&client, 3).await;
    let revoked_at = Instant::now();
    client
        .clone()
        .lease_revoke(session.lease_id())
        .await
        .unwrap();
    let state = within(session.ttl(), "session notices the revoke", session.lost()).await;
    assert_eq!(state, SessionState::Expired(ExpiredCause::Revoked));
    assert!(revoked_at.elapsed() <= session.ttl());
    assert!(matches!(
        etcd_coord::Mutex::new(&session, "x").unwrap().lock().await,
        Err(Error::SessionExpired(ExpiredCause::Revoked))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_server_expires_the_session_by_its_local_deadline() {
    let (etcd, client) = single().await;
    if skip_unless_local(
        &etcd,
        "paused_server_expires_the_session_by_its_local_deadline",
    ) {
        return;
    }
    let session = session(&client, 2).await;
    // Let a keepalive or two be answered, then stop the server. The last answered keepalive
    // was sent before this instant, so the session must give up by paused_at + TTL (+1 s).
    let mut state = session.subscribe();
    let paused_at = Instant::now();
    etcd.pause(0).unwrap();
    let expired = within(
        session.ttl() + Duration::from_secs(1),
        "session expires while the server is paused",
        state.wait_for(|s| *s != SessionState::Alive),
    )
    .await
    .map(|s| *s)
    .unwrap();
    eprintln!("expired {:?} after the pause", paused_at.elapsed());
    assert_eq!(expired, SessionState::Expired(ExpiredCause::NoAnswer));
    etcd.resume(0).unwrap();
    // The server answers again; the verdict stands.
    eventually(Duration::from_secs(10), "server answers again", || {
        let mut c = client.clone();
        async move { c.get("probe", None).await.is_ok() }
    })
    .await;
    assert_eq!(
        session.state(),
        SessionState::Expired(ExpiredCause::NoAnswer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_within_half_a_ttl_keeps_the_session() {
    let (mut etcd, client) = single().await;
    if skip_unless_local(
        &etcd,
        "server_killed_and_restarted_within_half_a_ttl_keeps_the_session",
    ) {
        return;
    }
    let session = session(&client, 8).await;
    let key = unique("restart");
    client
        .clone()
        .put(
            key.as_str(),
            "v",
            Some(PutOptions::new().with_lease(session.lease_id())),
        )
        .await
        .unwrap();
    let killed_at = Instant::now();
    etcd.kill(0).unwrap();
    etcd.restart(0).await.unwrap();
    let down_for = killed_at.elapsed();
    eprintln!("etcd was down for {down_for:?}");
    assert!(down_for < session.ttl() / 2, "restart took {down_for:?}");
    // Two more TTLs: only a reopened keepalive stream can keep the lease this long.
    let until = Instant::now() + session.ttl() * 2;
    while Instant::now() < until {
        assert_eq!(session.state(), SessionState::Alive);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ttl = client
        .clone()
        .lease_time_to_live(session.lease_id(), None)
        .await
        .unwrap();
    assert!(ttl.ttl() > 0, "the same lease is still alive on the server");
    assert_eq!(keys(&client, &key).await, vec![key]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_any_member_of_three_keeps_the_session_alive() {
    let (mut etcd, client) = cluster(3).await;
    if skip_unless_local(&etcd, "killing_any_member_of_three_keeps_the_session_alive") {
        return;
    }
    let session = session(&client, 5).await;
    // The client spreads its streams over all endpoints; killing each member in turn kills the
    // one the keepalive stream uses at some point.
    for member in 0..3 {
        etcd.kill(member).unwrap();
        let until = Instant::now() + session.ttl() * 3 / 2;
        while Instant::now() < until {
            assert_eq!(
                session.state(),
                SessionState::Alive,
                "with member {member} dead"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        etcd.restart(member).await.unwrap();
    }
    // This test's own client may still route one request to the member just restarted, so
    // ask until a member answers; the answer must be that the lease lives.
    let lease = session.lease_id();
    eventually(
        Duration::from_secs(5),
        "the lease is alive on the server",
        || {
            let mut c = client.clone();
            async move {
                match c.lease_time_to_live(lease, None).await {
                    Ok(r) => {
                        assert!(r.ttl() > 0, "the lease expired on the server");
                        true
                    }
                    Err(_) => false,
                }
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_lease_can_be_adopted_by_a_new_session() {
    let (_etcd, client) = single().await;
    let first = session(&client, 5).await;
    let lease = first.orphan();
    assert_eq!(first.state(), SessionState::Closed);
    let second = Session::builder(client.clone())
        .lease(lease)
        .build()
        .await
        .unwrap();
    assert_eq!(second.lease_id(), lease);
    assert_eq!(second.ttl(), Duration::from_secs(5));
    second.close().await.unwrap();
    assert!(matches!(
        Session::builder(client.clone()).lease(lease).build().await,
        Err(Error::LeaseNotFound(l)) if l == lease
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_naming_the_argument() {
    let (_etcd, client) = single().await;
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(500),
        Duration::from_millis(1500),
    ] {
        match Session::builder(client.clone()).ttl(ttl).build().await {
            Err(Error::InvalidArgument { name: "ttl", .. }) => {}
            other => panic!("ttl {ttl:?} gave {other:?}"),
        }
    }
    match Session::builder(client.clone()).lease(-1).build().await {
        Err(Error::InvalidArgument { name: "lease", .. }) => {}
        other => panic!("lease -1 gave {other:?}"),
    }
    match Connect::new(Vec::<String>::new())
        .connect()
        .await
        .map(|_| ())
    {
        Err(Error::InvalidArgument {
            name: "endpoints", ..
        }) => {}
        other => panic!("empty endpoints gave {other:?}"),
    }
    for bad in ["not an endpoint", "http://127.0.0.1:notaport", "127.0.0.1"] {
        match Connect::new([bad]).connect().await.map(|_| ()) {
            Err(
                e @ Error::InvalidArgument {
                    name: "endpoints", ..
                },
            ) => assert!(e.to_string().contains(bad), "{e}"),
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_fails_within_the_dial_timeout() {
    // A port that was free a moment ago and has nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let result = Connect::new([format!("127.0.0.1:{port}")])
        .dial_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map(|_| ());
    let took = started.elapsed();
    let err = result.expect_err("nothing listens there");
    assert!(err.is_retryable(), "{err:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn docker_compose_file_is_valid_yaml_with_three_pinned_members() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .expect("docker-compose.yml exists");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    doc.apply_merge().expect("YAML merge keys resolve");
    let services = doc["services"].as_mapping().expect("services");
    assert_eq!(services.len(), 3, "three etcd members");
    for (name, svc) in services {
        let image = svc["image"].as_str().expect("image");
        assert!(
            image.contains("etcd") && image.contains(":v3."),
            "{name:?} pins an etcd v3 image: {image}"
        );
        assert!(
            svc["ports"].as_sequence().is_some(),
            "{name:?} publishes its client port"
        );
    }
}
