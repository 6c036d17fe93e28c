//! The one waiting loop every ordered primitive shares: "until no older key exists in my
//! blocking ranges, while my key and my session are alive".
//!
//! Cost, in requests: joining the queue is one transaction (put my key if absent and read the
//! nearest older key in the same breath). Each wake-up is one transaction that checks "my key
//! still exists" and reads the nearest older key together. A waiter watches only its nearest
//! older key and its own key, so a handoff wakes one waiter, not all of them.
//!
//! Watches start at the check's revision + 1. Everything that happened up to that revision is
//! in the check; anything later is a watch event. Starting there (rather than at the check's
//! revision, as Go does) makes the watch "synced" in etcd, which delivers its events at once
//! instead of through the catch-up loop that runs every 100 ms.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchFilterType, WatchOptions,
};

use crate::error::{Error, Result};
use crate::keys::{prefix_end, show};
use crate::session::{Backoff, Session};

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The pause schedule for re-reading after a failed watch, for callers of [`wake`].
pub(crate) fn backoff() -> Backoff {
    Backoff::new(RETRY_MIN, RETRY_MAX)
}

/// A range of keys whose older members block a waiter.
#[derive(Debug, Clone)]
pub(crate) struct Blockers(Vec<(Vec<u8>, Vec<u8>)>);

impl Blockers {
    /// Every key under each of these prefixes blocks.
    pub(crate) fn prefixes<I: IntoIterator<Item = String>>(prefixes: I) -> Self {
        Blockers(
            prefixes
                .into_iter()
                .map(|p| {
                    let end = prefix_end(p.as_bytes());
                    (p.into_bytes(), end)
                })
                .collect(),
        )
    }

    /// One read per range: the key with the highest create revision at or below `max_rev`
    /// (or any, for 0), other than `me`. Two keys per range so that `me` can be skipped.
    fn reads(&self, max_rev: i64) -> Vec<TxnOp> {
        self.0
            .iter()
            .map(|(start, end)| {
                let mut opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_sort(SortTarget::Create, SortOrder::Descend)
                    .with_keys_only()
                    .with_limit(2);
                if max_rev > 0 {
                    opts = opts.with_max_create_revision(max_rev);
                }
                TxnOp::get(start.clone(), Some(opts))
            })
            .collect()
    }
}

/// A participant key this process created and still owns.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) create_rev: i64,
}

impl Entry {
    /// True only while this exact key (not a later one of the same name) exists.
    pub(crate) fn is_owner(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_rev)
    }
}

/// The nearest older key that stands in the way.
#[derive(Debug, Clone)]
pub(crate) struct Blocker {
    pub(crate) key: Vec<u8>,
    pub(crate) create_rev: i64,
    pub(crate) lease: i64,
}

/// Result of reading the queue: who blocks (if anyone) as of `revision`.
#[derive(Debug)]
pub(crate) struct Position {
    pub(crate) blocker: Option<Blocker>,
    pub(crate) revision: i64,
}

/// Deletes a key this process created if it is interrupted before handing the key to a guard.
///
/// Armed from before the first request is sent (the put may commit even if the answer never
/// arrives), so a dropped future at any await point leaves nothing behind.
pub(crate) struct PendingKey {
    session: Session,
    key: String,
    create_rev: Option<i64>,
    armed: bool,
}

impl PendingKey {
    pub(crate) fn new(session: &Session, key: String) -> Self {
        PendingKey {
            session: session.clone(),
            key,
            create_rev: None,
            armed: true,
        }
    }

    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingKey {
    fn drop(&mut self) {
        if self.armed {
            tracing::debug!(key = %self.key, "attempt abandoned; deleting its key in the background");
            release_in_background(&self.session, self.key.clone(), self.create_rev);
        }
    }
}

/// The fenced delete of one of our keys: by create revision when known, otherwise by lease (the
/// key is unique to one attempt, so a key with our lease under that name is ours).
fn fenced_delete(session: &Session, key: &str, create_rev: Option<i64>) -> Txn {
    let fence = match create_rev {
        Some(rev) => Compare::create_revision(key, CompareOp::Equal, rev),
        None => Compare::lease(key, CompareOp::Equal, session.lease_id()),
    };
    Txn::new()
        .when([fence])
        .and_then([TxnOp::delete(key, None)])
}

/// Deletes our key now. `Ok(true)` if it was still ours, `Ok(false)` if it was already gone
/// (or replaced), which callers usually turn into [`Error::NotHeld`].
pub(crate) async fn release(session: &Session, key: &str, create_rev: Option<i64>) -> Result<bool> {
    let mut client = session.client().clone();
    let resp = session
        .request(
            "releasing a key",
            client.txn(fenced_delete(session, key, create_rev)),
        )
        .await?;
    tracing::debug!(key, ?create_rev, deleted = resp.succeeded(), "released");
    Ok(resp.succeeded())
}

/// Deletes our key in the background, retrying transient failures for a bounded time (the
/// session's TTL, at least 10 s: after that the lease has usually ended and taken the key).
pub(crate) fn release_in_background(session: &Session, key: String, create_rev: Option<i64>) {
    let s = session.clone();
    let bound = session.ttl().max(Duration::from_secs(10));
    session.spawn_background(async move {
        let work = async {
            let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
            loop {
                match release(&s, &key, create_rev).await {
                    Ok(_) => return,
                    Err(e) if e.is_retryable() => {
                        tracing::debug!(key = %key, error = %e, "background release failed; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "background release failed");
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(bound, work).await.is_err() {
            tracing::warn!(key = %key, "background release gave up; the key goes when its lease ends");
        }
    });
}

/// Sends one transaction from a background task tracked by the session, so that its outcome
/// is always learnt: if the caller stops waiting for the answer, `undo` gets it instead.
///
/// Dropping an in-flight request does not stop etcd from applying it, so a cleanup sent when
/// the caller is dropped can overtake the request it means to undo, and then miss the key that
/// request creates. Seeing the answer first closes that gap.
pub(crate) async fn detached_txn<U>(
    session: &Session,
    operation: &'static str,
    txn: Txn,
    undo: U,
) -> Result<TxnResponse>
where
    U: FnOnce(&Session, TxnResponse) + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s = session.clone();
    session.spawn_background(async move {
        let mut client = s.client().clone();
        let result = s.request(operation, client.txn(txn)).await;
        if let Err(Ok(resp)) = tx.send(result) {
            tracing::debug!(operation, "caller gone before the answer; undoing");
            undo(&s, resp);
        }
    });
    rx.await
        .unwrap_or_else(|_| Err(malformed("no answer from the request task")))
}

/// Runs `op` until it succeeds, fails for good, or the session ends.
pub(crate) async fn retrying<T, F, Fut>(session: &Session, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        session.check_alive()?;
        match op().await {
            Err(e) if e.is_retryable() => {
                let delay = backoff.next_delay();
                tracing::debug!(error = %e, ?delay, "transient error; retrying");
                tokio::select! {
                    state = session.lost() => return Err(state.error().unwrap_or(e)),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            other => return other,
        }
    }
}

fn revision(resp: &TxnResponse) -> Result<i64> {
    resp.header()
        .map(|h| h.revision())
        .ok_or_else(|| malformed("a response without a header"))
}

fn malformed(what: &str) -> Error {
    Error::Etcd {
        message: format!("unexpected reply from etcd: {what}"),
        source: None,
        retryable: true,
    }
}

/// The nearest older key among the range reads of a transaction response, skipping `me`.
fn nearest_older(responses: &[TxnOpResponse], me: &str, my_rev: i64) -> Option<Blocker> {
    responses
        .iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs()),
            _ => None,
        })
        .flatten()
        .filter(|kv| kv.key() != me.as_bytes() && kv.create_revision() < my_rev)
        .max_by_key(|kv| kv.create_revision())
        .map(|kv: &KeyValue| Blocker {
            key: kv.key().to_vec(),
            create_rev: kv.create_revision(),
            lease: kv.lease(),
        })
}

/// Joins the queue: puts `key` (bound to the session's lease) unless it exists, and reads the
/// nearest older blocker, in one transaction. `pending` learns the create revision.
pub(crate) async fn enqueue(
    session: &Session,
    pending: &mut PendingKey,
    value: &[u8],
    blockers: &Blockers,
) -> Result<(Entry, Position)> {
    let key = pending.key.clone();
    let mut ops = vec![TxnOp::put(
        key.clone(),
        value.to_vec(),
        Some(PutOptions::new().with_lease(session.lease_id())),
    )];
    ops.extend(blockers.reads(0));
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then(ops)
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = retrying(session, || {
        let mut client = session.client().clone();
        let txn = txn.clone();
        async move { session.request("joining the queue", client.txn(txn)).await }
    })
    .await?;
    let rev = revision(&resp)?;
    if resp.succeeded() {
        // Every put of a transaction is created at the transaction's revision.
        pending.create_rev = Some(rev);
        let entry = Entry {
            key: key.clone(),
            create_rev: rev,
        };
        let blocker = nearest_older(&resp.op_responses(), &key, rev);
        return Ok((
            entry,
            Position {
                blocker,
                revision: rev,
            },
        ));
    }
    // The key exists: an earlier try of this very call committed before its answer was lost.
    let existing = resp
        .op_responses()
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.create_revision()),
            _ => None,
        })
        .ok_or_else(|| malformed("a failed put-if-absent without the existing key"))?;
    pending.create_rev = Some(existing);
    let entry = Entry {
        key,
        create_rev: existing,
    };
    let position = check(session, &entry, blockers).await?;
    Ok((entry, position))
}

/// One request: is my key still there, and who is the nearest older blocker now?
///
/// # Errors
///
/// [`Error::NotHeld`] if my key is gone (deleted, or its lease ended).
pub(crate) async fn check(
    session: &Session,
    entry: &Entry,
    blockers: &Blockers,
) -> Result<Position> {
    let txn = Txn::new()
        .when([entry.is_owner()])
        .and_then(blockers.reads(entry.create_rev - 1));
    let resp = retrying(session, || {
        let mut client = session.client().clone();
        let txn = txn.clone();
        async move { session.request("checking the queue", client.txn(txn)).await }
    })
    .await?;
    if !resp.succeeded() {
        return Err(Error::NotHeld {
            key: entry.key.clone(),
        });
    }
    Ok(Position {
        blocker: nearest_older(&resp.op_responses(), &entry.key, entry.create_rev),
        revision: revision(&resp)?,
    })
}

/// Waits until no older key blocks `entry`, returning the revision at which that was seen.
///
/// # Errors
///
/// The session's error if it ends first; [`Error::NotHeld`] if our key disappears;
/// non-retryable etcd errors.
pub(crate) async fn wait_turn(
    session: &Session,
    entry: &Entry,
    blockers: &Blockers,
    mut position: Position,
) -> Result<i64> {
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let mut warned_leaseless = false;
    loop {
        let Some(blocker) = position.blocker.take() else {
            // The check proved our key existed at this revision (so our lease was alive on the
            // server); the local state proves we have not since lost it.
            session.check_alive()?;
            return Ok(position.revision);
        };
        if blocker.lease == 0 && !warned_leaseless {
            warned_leaseless = true;
            tracing::warn!(
                key = %entry.key, blocker = %show(&blocker.key),
                "waiting behind a key without a lease: it goes only when someone deletes it"
            );
        }
        tracing::debug!(
            key = %entry.key, blocker = %show(&blocker.key), blocker_rev = blocker.create_rev,
            revision = position.revision, "waiting"
        );
        let watched = [blocker.key.clone(), entry.key.clone().into_bytes()];
        tokio::select! {
            state = session.lost() => {
                return Err(state.error().unwrap_or(Error::SessionClosed));
            }
            woke = next_delete(session, &watched, position.revision + 1) => {
                if let Err(e) = woke {
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    tracing::debug!(key = %entry.key, error = %e, "watch failed; re-reading");
                    tokio::select! {
                        state = session.lost() => {
                            return Err(state.error().unwrap_or(e));
                        }
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                } else {
                    backoff.reset();
                }
            }
        }
        position = check(session, entry, blockers).await?;
    }
}

/// Returns when any of `keys` is deleted at a revision >= `start`, or when the watch was
/// cancelled by the server (compaction and the like), after which the caller re-reads.
///
/// # Errors
///
/// A retryable error when the stream could not be opened or broke.
pub(crate) async fn next_delete(session: &Session, keys: &[Vec<u8>], start: i64) -> Result<()> {
    next_event(session, keys, start, true).await
}

/// Waits, while the session lives, for the next event on `keys` at a revision >= `start`
/// (deletes only, or any change). A broken watch is followed by a backoff pause and then `Ok`,
/// like an event: either way the caller re-reads, which is what makes waiting robust.
///
/// # Errors
///
/// The session's error if it ends; non-retryable etcd errors.
pub(crate) async fn wake(
    session: &Session,
    keys: &[Vec<u8>],
    start: i64,
    deletes_only: bool,
    backoff: &mut Backoff,
) -> Result<()> {
    let lost = session.lost();
    tokio::pin!(lost);
    tokio::select! {
        state = &mut lost => return Err(state.error().unwrap_or(Error::SessionClosed)),
        woke = next_event(session, keys, start, deletes_only) => match woke {
            Ok(()) => {
                backoff.reset();
                return Ok(());
            }
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => tracing::debug!(error = %e, "watch failed; re-reading"),
        },
    }
    tokio::select! {
        state = lost => Err(state.error().unwrap_or(Error::SessionClosed)),
        _ = tokio::time::sleep(backoff.next_delay()) => Ok(()),
    }
}

async fn next_event(
    session: &Session,
    keys: &[Vec<u8>],
    start: i64,
    deletes_only: bool,
) -> Result<()> {
    let mut opts = WatchOptions::new().with_start_revision(start);
    if deletes_only {
        opts = opts.with_filters([WatchFilterType::NoPut]);
    }
    let mut client = session.client().clone();
    let mut stream = session
        .request(
            "opening a watch",
            client.watch(keys[0].clone(), Some(opts.clone())),
        )
        .await?;
    for key in &keys[1..] {
        stream
            .watch(key.clone(), Some(opts.clone()))
            .await
            .map_err(Error::from)?;
    }
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return Err(Error::Unavailable {
                    message: "the watch stream ended".into(),
                    source: None,
                })
            }
            Err(e) => return Err(e.into()),
        };
        if resp.canceled() {
            tracing::debug!(
                compact_revision = resp.compact_revision(),
                reason = resp.cancel_reason(),
                "watch cancelled by the server; re-reading"
            );
            return Ok(());
        }
        if resp
            .events()
            .iter()
            .any(|e| !deletes_only || e.event_type() == EventType::Delete)
        {
            return Ok(());
        }
    }
}
