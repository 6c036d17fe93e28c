//! Election: one leader at a time, fencing, observation through compaction and restarts,
//! resume after a restart, the leader-worker helpers, and etcdctl interop.
#![cfg(feature = "testing")]

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use etcd_coord::etcd_client::{Client, PutOptions, Txn, TxnOp};
use etcd_coord::testing::EtcdCluster;
use etcd_coord::{Election, Error, LeaderEvent, LeaderEvents, Leadership, Session};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use tokio::sync::mpsc;
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(10);

/// The next observer event, bounded.
async fn next_event(events: &mut LeaderEvents) -> LeaderEvent {
    within(BOUND, "the next leader event", events.next())
        .await
        .expect("the observe stream never ends while held")
        .expect("observe yields no error here")
}

/// The next event forwarded by a consumer task, bounded.
async fn recv_event(
    events: &mut mpsc::UnboundedReceiver<etcd_coord::Result<LeaderEvent>>,
) -> LeaderEvent {
    within(BOUND, "the next leader event", events.recv())
        .await
        .expect("the observe stream never ends while held")
        .expect("observe yields no error here")
}

/// Asserts that events come with revisions that never go back.
struct Monotonic(i64);

impl Monotonic {
    fn check(&mut self, event: &LeaderEvent) {
        assert!(
            event.revision() >= self.0,
            "revision went back from {} to {}: {event:?}",
            self.0,
            event.revision()
        );
        self.0 = event.revision();
    }
}

fn elected(event: &LeaderEvent) -> (&str, &[u8]) {
    match event {
        LeaderEvent::Elected(l) => (&l.key, &l.value),
        other => panic!("expected Elected, got {other:?}"),
    }
}

fn proclaimed(event: &LeaderEvent) -> (&str, &[u8]) {
    match event {
        LeaderEvent::Proclaimed(l) => (&l.key, &l.value),
        other => panic!("expected Proclaimed, got {other:?}"),
    }
}

async fn current_revision(client: &Client) -> i64 {
    client
        .clone()
        .get("any", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// Spawns a campaign and waits until its key is queued (the prefix holds `queued` keys).
async fn queue_candidate(
    client: &Client,
    election: &Election,
    value: &str,
    queued: usize,
) -> tokio::task::JoinHandle<etcd_coord::Result<Leadership>> {
    let e = election.clone();
    let v = value.to_owned();
    let handle = tokio::spawn(async move { e.campaign(v).await });
    let prefix = format!("{}/", election.name());
    eventually(BOUND, "candidate queued", || async {
        keys(client, &prefix).await.len() == queued
    })
    .await;
    assert!(!handle.is_finished(), "{value} must wait, not lead");
    handle
}

#[derive(Debug)]
enum Report {
    Elected {
        key: String,
        token: i64,
        elected_rev: i64,
        lease: i64,
    },
    Lost {
        key: String,
    },
    Stale {
        key: String,
        txn_not_held: bool,
        proclaim_not_held: bool,
    },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_candidates_one_leader_at_a_time_through_twenty_revocations() {
    let (_etcd, admin) = single().await;
    let name = unique("five");
    let data = format!("{name}-data");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut candidates = tokio::task::JoinSet::new();
    for i in 0..5 {
        let client = connect(&_etcd).await;
        let (name, data, tx) = (name.clone(), data.clone(), tx.clone());
        candidates.spawn(async move {
            loop {
                // A new session per term: the previous one was revoked.
                let session = session(&client, 5).await;
                let election = Election::new(&session, name.clone()).unwrap();
                let Ok(leadership) = election.campaign(format!("candidate-{i}")).await else {
                    continue;
                };
                let key = leadership.key().to_owned();
                let token = leadership.fencing_token();
                tx.send(Report::Elected {
                    key: key.clone(),
                    token,
                    elected_rev: leadership.elected_revision(),
                    lease: session.lease_id(),
                })
                .unwrap();
                // Owner-only work while leading (it may already be too late: that is fine).
                let _ = leadership
                    .txn(Txn::new().and_then([TxnOp::put(data.as_str(), token.to_string(), None)]))
                    .await;
                leadership.lost().await;
                tx.send(Report::Lost { key: key.clone() }).unwrap();
                // A deposed leader tries to write: it must never commit.
                let stale = leadership
                    .txn(Txn::new().and_then([TxnOp::put(
                        data.as_str(),
                        format!("stale-{token}"),
                        None,
                    )]))
                    .await;
                let proclaim = leadership.proclaim(format!("stale-{token}")).await;
                tx.send(Report::Stale {
                    key,
                    txn_not_held: matches!(stale, Err(Error::NotHeld { .. })),
                    proclaim_not_held: matches!(proclaim, Err(Error::NotHeld { .. })),
                })
                .unwrap();
            }
        });
    }
    drop(tx);

    let observer = Election::observer(admin.clone(), name.clone()).unwrap();
    let mut lost = HashMap::new();
    let mut stale = HashMap::new();
    let mut leaders = Vec::new();
    let (mut last_token, mut last_revoke_rev) = (0, 0);
    within(Duration::from_secs(120), "twenty revocations", async {
        while leaders.len() < 20 {
            let report = within(BOUND, "a report", rx.recv()).await.unwrap();
            let (key, token, elected_rev, lease) = match report {
                Report::Elected {
                    key,
                    token,
                    elected_rev,
                    lease,
                } => (key, token, elected_rev, lease),
                Report::Lost { key } => {
                    lost.insert(key, ());
                    continue;
                }
                Report::Stale {
                    key,
                    txn_not_held,
                    proclaim_not_held,
                } => {
                    stale.insert(key, (txn_not_held, proclaim_not_held));
                    continue;
                }
            };
            // One leader at a time: this one learned it leads no earlier than the previous
            // leader's lease was revoked, and etcd agrees on who leads.
            assert!(token > last_token, "fencing tokens strictly increase");
            assert!(
                elected_rev >= last_revoke_rev,
                "{key} was told it leads at {elected_rev}, before the previous leader was revoked at {last_revoke_rev}"
            );
            let leader = observer.leader().await.unwrap().expect("someone leads");
            assert_eq!(leader.key, key, "etcd and the elected candidate agree");
            assert_eq!(leader.create_revision, token);
            let resp = admin.clone().lease_revoke(lease).await.unwrap();
            last_revoke_rev = resp.header().unwrap().revision();
            last_token = token;
            leaders.push(key);
        }
        // Every deposed leader noticed, and its late writes were refused.
        while leaders.iter().any(|k| !stale.contains_key(k)) {
            match within(BOUND, "deposed leaders report", rx.recv()).await.unwrap() {
                Report::Lost { key } => {
                    lost.insert(key, ());
                }
                Report::Stale {
                    key,
                    txn_not_held,
                    proclaim_not_held,
                } => {
                    stale.insert(key, (txn_not_held, proclaim_not_held));
                }
                Report::Elected { .. } => {}
            }
        }
    })
    .await;
    for key in &leaders {
        assert!(lost.contains_key(key), "{key}: lost() fired");
        assert_eq!(stale[key], (true, true), "{key}: stale writes refused");
    }
    let value = admin.clone().get(data.as_str(), None).await.unwrap();
    let value = value
        .kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().to_owned());
    assert!(
        !matches!(value.as_deref(), Some(v) if v.starts_with("stale")),
        "a deposed leader's write committed: {value:?}"
    );
    candidates.abort_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_reports_every_leader_in_order_and_then_vacancy() {
    let (_etcd, client) = single().await;
    let name = unique("observe");
    let observer = Election::observer(client.clone(), name.clone()).unwrap();
    let mut events = observer.observe();
    let mut order = Monotonic(0);
    let first = next_event(&mut events).await;
    assert!(matches!(first, LeaderEvent::Vacant { .. }), "{first:?}");
    order.check(&first);

    let sessions = [
        session(&client, 5).await,
        session(&client, 5).await,
        session(&client, 5).await,
    ];
    let elections: Vec<Election> = sessions
        .iter()
        .map(|s| Election::new(s, name.clone()).unwrap())
        .collect();
    let a = within(BOUND, "a leads", elections[0].campaign("a"))
        .await
        .unwrap();
    let e = next_event(&mut events).await;
    order.check(&e);
    assert_eq!(elected(&e), (a.key(), &b"a"[..]));
    assert_eq!(e.leader().unwrap().create_revision, a.fencing_token());

    a.proclaim("a2").await.unwrap();
    let e = next_event(&mut events).await;
    order.check(&e);
    assert_eq!(proclaimed(&e), (a.key(), &b"a2"[..]));

    let b = queue_candidate(&client, &elections[1], "b", 2).await;
    let c = queue_candidate(&client, &elections[2], "c", 3).await;
    // Waiters joining are not leader changes: the next event is B's election.
    a.resign().await.unwrap();
    let b = within(BOUND, "b leads", b).await.unwrap().unwrap();
    let e = next_event(&mut events).await;
    order.check(&e);
    assert_eq!(elected(&e), (b.key(), &b"b"[..]));

    // Two quick handoffs: each leader is still reported, in order.
    b.resign().await.unwrap();
    let c = within(BOUND, "c leads", c).await.unwrap().unwrap();
    c.resign().await.unwrap();
    let e = next_event(&mut events).await;
    order.check(&e);
    assert_eq!(elected(&e), (c.key(), &b"c"[..]));
    let e = next_event(&mut events).await;
    order.check(&e);
    assert!(matches!(e, LeaderEvent::Vacant { .. }), "{e:?}");
    assert!(observer.leader().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_keeps_reporting_after_compaction_without_repeating_itself() {
    let (_etcd, client) = single().await;
    let name = unique("compact");
    let unrelated = format!("{name}-unrelated");
    let sa = session(&client, 5).await;
    let sb = session(&client, 5).await;
    let ea = Election::new(&sa, name.clone()).unwrap();
    let eb = Election::new(&sb, name.clone()).unwrap();
    let a = ea.campaign("a").await.unwrap();
    let compact = || async {
        // Bump the revision past everything the stream has seen, then compact it all away.
        client
            .clone()
            .put(unrelated.as_str(), "x", None)
            .await
            .unwrap();
        let rev = current_revision(&client).await;
        client.clone().compact(rev, None).await.unwrap();
    };

    // The stream is lazy: after an event it has read at some revision R but watches only when
    // polled again, so compacting past R + 1 makes its next watch start in compacted history,
    // as for a consumer that fell behind.
    let mut events = eb.observe();
    let mut order = Monotonic(0);
    let e = next_event(&mut events).await;
    order.check(&e);
    assert_eq!(elected(&e), (a.key(), &b"a"[..]));

    // A waiter joins (no leader change), everything is compacted, and the resync finds the
    // same leader with the same value: nothing is reported again, the next event is A's
    // proclamation.
    let b = queue_candidate(&client, &eb, "b", 2).await;
    compact().await;
    a.proclaim("a2").await.unwrap();
    let e = next_event(&mut events).await;
    order.check(&e);
    assert_eq!(proclaimed(&e), (a.key(), &b"a2"[..]));

    // A handoff and a proclamation fall into compacted history: the present is reported once.
    a.resign().await.unwrap();
    let b = within(BOUND, "b leads", b).await.unwrap().unwrap();
    b.proclaim("b2").await.unwrap();
    compact().await;
    let e = next_event(&mut events).await;
    order.check(&e);
    assert_eq!(elected(&e), (b.key(), &b"b2"[..]));

    // Then the watch runs normally again.
    b.proclaim("b3").await.unwrap();
    let e = next_event(&mut events).await;
    order.check(&e);
    assert_eq!(proclaimed(&e), (b.key(), &b"b3"[..]));

    // The last candidate leaves, and the revision to re-read at is compacted before the
    // stream gets to it: it resynchronises and reports the vacancy.
    b.resign().await.unwrap();
    compact().await;
    let e = next_event(&mut events).await;
    order.check(&e);
    assert!(matches!(e, LeaderEvent::Vacant { .. }), "{e:?}");

    // Nothing more happens to the election: the stream stays quiet rather than repeating.
    client
        .clone()
        .put(unrelated.as_str(), "y", None)
        .await
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(quiet.is_err(), "unexpected event {quiet:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_keeps_reporting_after_its_member_restarts() {
    let (mut etcd, client) = single().await;
    if skip_unless_local(&etcd, "observe_keeps_reporting_after_its_member_restarts") {
        return;
    }
    let name = unique("restart");
    let sa = session(&client, 20).await;
    let ea = Election::new(&sa, name.clone()).unwrap();
    let a = ea.campaign("a").await.unwrap();
    // A consumer that keeps polling, so the watch is open when the member goes away.
    let observer = Election::observer(client.clone(), name.clone()).unwrap();
    let (tx, mut events) = mpsc::unbounded_channel();
    let consumer = tokio::spawn(async move {
        let mut stream = observer.observe();
        while let Some(event) = stream.next().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    let mut order = Monotonic(0);
    let e = recv_event(&mut events).await;
    order.check(&e);
    assert_eq!(elected(&e), (a.key(), &b"a"[..]));
    // A proclamation arrives through the watch: it is open.
    a.proclaim("a2").await.unwrap();
    let e = recv_event(&mut events).await;
    order.check(&e);
    assert_eq!(proclaimed(&e), (a.key(), &b"a2"[..]));

    within(Duration::from_secs(30), "stop", etcd.stop(0))
        .await
        .unwrap();
    within(Duration::from_secs(30), "restart", etcd.restart(0))
        .await
        .unwrap();

    // After the restart: a new candidate queues, the old leader's lease is revoked, and the
    // observer reports exactly that handoff, nothing repeated.
    let client = connect(&etcd).await;
    let sb = session(&client, 20).await;
    let eb = Election::new(&sb, name.clone()).unwrap();
    let b = queue_candidate(&client, &eb, "b", 2).await;
    client.clone().lease_revoke(sa.lease_id()).await.unwrap();
    let b = within(BOUND, "b leads", b).await.unwrap().unwrap();
    let e = within(
        Duration::from_secs(30),
        "the observer reports b",
        recv_event(&mut events),
    )
    .await;
    order.check(&e);
    assert_eq!(elected(&e), (b.key(), &b"b"[..]));
    b.resign().await.unwrap();
    let e = recv_event(&mut events).await;
    order.check(&e);
    assert!(matches!(e, LeaderEvent::Vacant { .. }), "{e:?}");
    consumer.abort();
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_hands_over_to_the_next_candidate() {
    let (_etcd, client) = single().await;
    let name = unique("resign");
    let sa = session(&client, 5).await;
    let sb = session(&client, 5).await;
    let ea = Election::new(&sa, name.clone()).unwrap();
    let eb = Election::new(&sb, name.clone()).unwrap();
    let a = ea.campaign("a").await.unwrap();
    assert!(a.is_leader());
    let b = queue_candidate(&client, &eb, "b", 2).await;
    a.resign().await.unwrap();
    assert!(!a.is_leader());
    let b = within(BOUND, "b leads after a resigns", b)
        .await
        .unwrap()
        .unwrap();
    assert!(b.fencing_token() > a.fencing_token());
    assert_eq!(eb.leader().await.unwrap().unwrap().key, b.key());
    // Resigning again, or proclaiming after resigning, is refused and writes nothing.
    let before = current_revision(&client).await;
    assert!(matches!(a.resign().await, Err(Error::NotHeld { .. })));
    assert!(matches!(
        a.proclaim("late").await,
        Err(Error::NotHeld { .. })
    ));
    assert_eq!(current_revision(&client).await, before);
    b.resign().await.unwrap();
    assert!(keys(&client, &format!("{name}/")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_is_replaced_within_its_ttl() {
    let (_etcd, client) = single().await;
    let name = unique("crash");
    let ttl = Duration::from_secs(2);
    let sa = session(&client, ttl.as_secs()).await;
    let sb = session(&client, 5).await;
    let ea = Election::new(&sa, name.clone()).unwrap();
    let eb = Election::new(&sb, name.clone()).unwrap();
    let a = ea.campaign("a").await.unwrap();
    let b = queue_candidate(&client, &eb, "b", 2).await;
    // A crash: the keepalive stops and nothing is deleted; the lease just runs out.
    let crashed = Instant::now();
    sa.orphan();
    std::mem::forget(a);
    let b = within(ttl + Duration::from_secs(5), "b takes over", b)
        .await
        .unwrap()
        .unwrap();
    let took = crashed.elapsed();
    assert!(
        took <= ttl + Duration::from_secs(2),
        "takeover took {took:?} with a TTL of {ttl:?}"
    );
    assert_eq!(eb.leader().await.unwrap().unwrap().key, b.key());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidate_whose_session_is_revoked_while_waiting_fails_and_never_leads() {
    let (_etcd, client) = single().await;
    let name = unique("revoked-waiter");
    let sa = session(&client, 5).await;
    let sb = session(&client, 5).await;
    let ea = Election::new(&sa, name.clone()).unwrap();
    let eb = Election::new(&sb, name.clone()).unwrap();
    let a = ea.campaign("a").await.unwrap();
    let b = queue_candidate(&client, &eb, "b", 2).await;
    client.clone().lease_revoke(sb.lease_id()).await.unwrap();
    let result = within(BOUND, "the revoked candidate gives up", b)
        .await
        .unwrap();
    assert!(
        matches!(
            result,
            Err(Error::SessionExpired(_) | Error::NotHeld { .. })
        ),
        "{result:?}"
    );
    assert_eq!(keys(&client, &format!("{name}/")).await, [a.key()]);
    // With the leader gone, nobody leads: the dead candidate never does.
    a.resign().await.unwrap();
    assert!(ea.leader().await.unwrap().is_none());
    // And it cannot stand again on a dead session.
    assert!(eb.campaign("b").await.is_err());
    assert!(keys(&client, &format!("{name}/")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proclaim_after_losing_fails_and_writes_nothing() {
    let (_etcd, client) = single().await;
    let name = unique("proclaim");
    let s = session(&client, 5).await;
    let e = Election::new(&s, name.clone()).unwrap();
    let leadership = e.campaign("v1").await.unwrap();
    leadership.proclaim("v2").await.unwrap();
    let leader = e.leader().await.unwrap().unwrap();
    assert_eq!(leader.value, b"v2");
    assert_eq!(
        leader.lease,
        s.lease_id(),
        "the proclamation keeps the lease"
    );
    client.clone().lease_revoke(s.lease_id()).await.unwrap();
    within(BOUND, "lost() fires", leadership.lost()).await;
    let before = current_revision(&client).await;
    let result = leadership.proclaim("v3").await;
    assert!(matches!(result, Err(Error::NotHeld { .. })), "{result:?}");
    assert_eq!(current_revision(&client).await, before, "nothing written");
    assert!(keys(&client, &format!("{name}/")).await.is_empty());
    // Invalid values are refused up front.
    let s2 = session(&client, 5).await;
    let e2 = Election::new(&s2, name.clone()).unwrap();
    assert!(matches!(
        e2.campaign(vec![0u8; 2 * 1024 * 1024]).await,
        Err(Error::InvalidArgument { name: "value", .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_takes_back_a_leadership_after_a_restart() {
    let (_etcd, client) = single().await;
    let name = unique("resume");
    let old = session(&client, 10).await;
    let e = Election::new(&old, name.clone()).unwrap();
    let leadership = e.campaign("before").await.unwrap();
    let (key, token) = (leadership.key().to_owned(), leadership.fencing_token());
    // The process "restarts": it hands its lease over without releasing anything.
    let lease = old.orphan();
    std::mem::forget(leadership);

    let adopted = Session::builder(client.clone())
        .lease(lease)
        .build()
        .await
        .unwrap();
    let e = Election::new(&adopted, name.clone()).unwrap();
    assert!(matches!(
        e.resume(key.clone(), token + 1).await,
        Err(Error::NotHeld { .. })
    ));
    assert!(matches!(
        e.resume("elsewhere/x", token).await,
        Err(Error::InvalidArgument { name: "key", .. })
    ));
    let resumed = e.resume(key.clone(), token).await.unwrap();
    assert_eq!(resumed.fencing_token(), token);
    assert_eq!(resumed.key(), key);
    resumed.proclaim("after").await.unwrap();
    assert_eq!(e.leader().await.unwrap().unwrap().value, b"after");

    // Another session cannot resume a key bound to this lease.
    let other = session(&client, 5).await;
    let eo = Election::new(&other, name.clone()).unwrap();
    assert!(matches!(
        eo.resume(key.clone(), token).await,
        Err(Error::InvalidArgument { name: "key", .. })
    ));
    // A key that was saved while still waiting does not lead: refused and withdrawn.
    let waiting = format!("{name}/{:x}_saved-while-waiting", other.lease_id());
    let put = client
        .clone()
        .put(
            waiting.as_str(),
            "w",
            Some(PutOptions::new().with_lease(other.lease_id())),
        )
        .await
        .unwrap();
    let waiting_rev = put.header().unwrap().revision();
    let result = eo.resume(waiting.clone(), waiting_rev).await;
    assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
    eventually(BOUND, "the non-leading key is withdrawn", || async {
        keys(&client, &format!("{name}/")).await == [key.clone()]
    })
    .await;
    resumed.resign().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_leader_cancels_the_work_when_the_lease_is_revoked() {
    let (_etcd, client) = single().await;
    let name = unique("worker");
    let s = session(&client, 5).await;
    let e = Election::new(&s, name.clone()).unwrap();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let run = tokio::spawn({
        let e = e.clone();
        async move {
            e.run_as_leader("worker", |term| async move {
                started_tx
                    .send((term.key().to_owned(), term.session().lease_id()))
                    .unwrap();
                term.cancelled().await;
                // Deposed: owner-only writes are refused.
                let late = term
                    .txn(Txn::new().and_then([TxnOp::put("late", "write", None)]))
                    .await;
                matches!(late, Err(Error::NotHeld { .. }))
            })
            .await
        }
    });
    let (key, lease) = within(BOUND, "the work starts", started.recv())
        .await
        .unwrap();
    assert_eq!(e.leader().await.unwrap().unwrap().key, key);
    client.clone().lease_revoke(lease).await.unwrap();
    let refused = within(BOUND, "the work stops once deposed", run)
        .await
        .unwrap()
        .unwrap();
    assert!(refused, "the deposed worker's write was refused");
    assert!(client
        .clone()
        .get("late", None)
        .await
        .unwrap()
        .kvs()
        .is_empty());

    // When the work ends by itself, the helper resigns.
    let s = session(&client, 5).await;
    let e = Election::new(&s, name.clone()).unwrap();
    let token = within(
        BOUND,
        "a short term",
        e.run_as_leader("short", |term| async move { term.fencing_token() }),
    )
    .await
    .unwrap();
    assert!(token > 0);
    assert!(keys(&client, &format!("{name}/")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lead_forever_stands_again_after_losing_until_the_session_ends() {
    let (_etcd, client) = single().await;
    let name = unique("forever");
    let s = session(&client, 5).await;
    let e = Election::new(&s, name.clone()).unwrap();
    let (terms_tx, mut terms) = mpsc::unbounded_channel();
    let run = tokio::spawn({
        let e = e.clone();
        async move {
            e.lead_forever("forever", move |term| {
                let terms_tx = terms_tx.clone();
                async move {
                    terms_tx
                        .send((term.key().to_owned(), term.fencing_token()))
                        .unwrap();
                    term.cancelled().await;
                }
            })
            .await
        }
    });
    let (first, t1) = within(BOUND, "first term", terms.recv()).await.unwrap();
    // An operator deletes the leader key: the term ends and the candidate stands again.
    client.clone().delete(first.as_str(), None).await.unwrap();
    let (second, t2) = within(BOUND, "second term", terms.recv()).await.unwrap();
    assert_ne!(first, second);
    assert!(t2 > t1);
    // The session ends: no more terms, and the helper reports why.
    client.clone().lease_revoke(s.lease_id()).await.unwrap();
    let result = within(BOUND, "lead_forever returns", run).await.unwrap();
    assert!(
        matches!(result, Err(Error::SessionExpired(_))),
        "{result:?}"
    );
    assert!(keys(&client, &format!("{name}/")).await.is_empty());
}

// ---- etcdctl interop -------------------------------------------------------------------

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

/// `etcdctl elect ARGS...` with its stdout read line by line.
struct Etcdctl {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Etcdctl {
    fn spawn(etcd: &EtcdCluster, args: &[&str]) -> Etcdctl {
        let mut child = tokio::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
            .arg("elect")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("etcdctl from Debian's etcd-client package");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Etcdctl { child, lines }
    }

    /// The next printed leader: a key line and a value line.
    async fn leader(&mut self) -> (String, String) {
        within(BOUND, "etcdctl prints a leader", async {
            let key = self.lines.next_line().await.unwrap().expect("a key line");
            let value = self.lines.next_line().await.unwrap().expect("a value line");
            (key, value)
        })
        .await
    }

    /// Asserts that nothing is printed for a short while (a candidate that must keep waiting).
    async fn silent(&mut self) {
        let printed =
            tokio::time::timeout(Duration::from_millis(300), self.lines.next_line()).await;
        assert!(printed.is_err(), "etcdctl printed {printed:?}");
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_and_a_rust_candidate_agree_on_the_leader() {
    if which("etcdctl").is_none() {
        eprintln!("skipped: etcdctl is not installed (Debian package etcd-client)");
        return;
    }
    let (etcd, client) = single().await;
    let name = unique("etcdctl");
    let prefix = format!("{name}/");
    let sa = session(&client, 5).await;
    let ea = Election::new(&sa, name.clone()).unwrap();

    // Rust leads; etcdctl's candidate waits; etcdctl's observer sees Rust's proclamations.
    let a = ea.campaign("rust-1").await.unwrap();
    let mut ctl = Etcdctl::spawn(&etcd, &[&name, "etcdctl-1"]);
    eventually(BOUND, "etcdctl queued", || async {
        keys(&client, &prefix).await.len() == 2
    })
    .await;
    ctl.silent().await;
    assert_eq!(ea.leader().await.unwrap().unwrap().key, a.key());
    let mut watcher = Etcdctl::spawn(&etcd, &["-l", &name]);
    assert_eq!(
        watcher.leader().await,
        (a.key().to_owned(), "rust-1".into())
    );
    a.proclaim("rust-2").await.unwrap();
    assert_eq!(
        watcher.leader().await,
        (a.key().to_owned(), "rust-2".into())
    );

    // Rust resigns: etcdctl's candidate leads, and everyone agrees.
    a.resign().await.unwrap();
    let (ctl_key, ctl_value) = ctl.leader().await;
    assert_eq!(ctl_value, "etcdctl-1");
    assert!(ctl_key.starts_with(&prefix), "{ctl_key}");
    assert_eq!(watcher.leader().await, (ctl_key.clone(), ctl_value.clone()));
    let leader = ea.leader().await.unwrap().unwrap();
    assert_eq!(
        (leader.key.as_str(), &leader.value[..]),
        (ctl_key.as_str(), &b"etcdctl-1"[..])
    );

    // etcdctl leads; a Rust candidate waits until etcdctl's lease is gone.
    let sb = session(&client, 5).await;
    let eb = Election::new(&sb, name.clone()).unwrap();
    let mut rust_observer = eb.observe();
    let e = next_event(&mut rust_observer).await;
    assert_eq!(elected(&e), (ctl_key.as_str(), &b"etcdctl-1"[..]));
    let b = queue_candidate(&client, &eb, "rust-b", 2).await;
    client.clone().lease_revoke(leader.lease).await.unwrap();
    let b = within(BOUND, "Rust leads after etcdctl", b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        watcher.leader().await,
        (b.key().to_owned(), "rust-b".into())
    );
    let e = next_event(&mut rust_observer).await;
    assert_eq!(elected(&e), (b.key(), &b"rust-b"[..]));
    // (etcdctl's candidate notices its session ended at its next keepalive, up to 20 s
    // later, and exits; nothing here depends on it.)
    ctl.stop().await;
    watcher.stop().await;
    b.resign().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_and_keys_are_rejected_naming_the_argument() {
    let (_etcd, client) = single().await;
    let s = session(&client, 5).await;
    for bad in ["", "trailing/", "nul\0"] {
        assert!(matches!(
            Election::new(&s, bad),
            Err(Error::InvalidArgument { name: "name", .. })
        ));
        assert!(matches!(
            Election::observer(client.clone(), bad),
            Err(Error::InvalidArgument { name: "name", .. })
        ));
    }
    let e = Election::new(&s, unique("names")).unwrap();
    assert!(matches!(
        e.resume(format!("{}/", e.name()), 5).await,
        Err(Error::InvalidArgument { name: "key", .. })
    ));
}
