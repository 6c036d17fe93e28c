//! The one waiting loop every ordered primitive shares: "until no older key exists in my
//! blocking ranges, while my key and my session are alive".
//!
//! Cost, in requests: joining the queue is one transaction (put my key if absent and read the
//! nearest older key in the same breath). Each wake-up is one transaction that checks "my key
//! still exists" and reads the nearest older key together. A waiter watches only its nearest
//! older key and its own key, so a handoff wakes one waiter, not all of them.
//!
//! Handoff latency depends on a detail of etcd: a watch that starts at the store's current
//! revision is "synced" and gets its events at once, while a watch that starts at an older
//! revision is served by a catch-up loop that runs every 100 ms. Go's waiters watch from the
//! revision of their read; under contention others write in between, so most handoffs wait for
//! that loop. Our waiters open their watch without a start revision (synced, from "now") and
//! learn from etcd at which revision it starts. If nothing was written since the read, the read
//! still holds and nothing more is sent; otherwise one more check, made after the watch exists,
//! closes the gap. Either way no event can be missed, and a handoff costs the new holder one
//! request after the holder's delete.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchFilterType, WatchOptions,
};

use crate::error::{header_revision, Error, Result};
use crate::keys::{prefix_end, show};
use crate::session::{Backoff, Session};

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The pause schedule for re-reading after a failed watch, for callers of [`wake`].
pub(crate) fn backoff() -> Backoff {
    Backoff::new(RETRY_MIN, RETRY_MAX)
}

/// What stands in a waiter's way: the keys older than its own in some key ranges, of which
/// fewer than `permits` may exist for it to hold (1 for a lock, N for an N-permit semaphore).
#[derive(Debug, Clone)]
pub(crate) struct Blockers {
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    permits: usize,
}

impl Blockers {
    /// Every key under each of these prefixes blocks; one permit.
    pub(crate) fn prefixes<I: IntoIterator<Item = String>>(prefixes: I) -> Self {
        Blockers {
            ranges: prefixes
                .into_iter()
                .map(|p| {
                    let end = prefix_end(p.as_bytes());
                    (p.into_bytes(), end)
                })
                .collect(),
            permits: 1,
        }
    }

    /// Lets up to `permits` keys hold at once.
    pub(crate) fn with_permits(mut self, permits: usize) -> Self {
        self.permits = permits.max(1);
        self
    }

    /// One read per range: the keys with the highest create revisions at or below `max_rev`
    /// (or any, for 0). `permits + 2` of them: enough to skip our own key and still tell
    /// "exactly `permits` older" from "more".
    fn reads(&self, max_rev: i64) -> Vec<TxnOp> {
        let limit = self.permits as i64 + 2;
        self.ranges
            .iter()
            .map(|(start, end)| {
                let mut opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_sort(SortTarget::Create, SortOrder::Descend)
                    .with_keys_only()
                    .with_limit(limit);
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
}

/// Result of reading the queue as of `revision`: the keys to wait for (none: we hold).
#[derive(Debug)]
pub(crate) struct Position {
    pub(crate) waiting_on: Vec<Blocker>,
    /// Whether a put on a watched key (a waiter ahead being promoted to holder) matters too.
    pub(crate) watch_puts: bool,
    pub(crate) revision: i64,
}

impl Position {
    /// Decides from the older keys (any order) who to wait for.
    ///
    /// With `permits` P we hold when fewer than P keys are older. With exactly P older, those
    /// are the holders and any of them leaving lets us in, so we watch them all. With more, we
    /// watch only the nearest older key: it is a waiter, and we cannot be let in before it is
    /// let in (its promotion is a put on its key, for P > 1) or leaves (a delete).
    fn new(mut older: Vec<Blocker>, permits: usize, revision: i64) -> Self {
        older.sort_by_key(|b| std::cmp::Reverse(b.create_rev));
        older.dedup_by(|a, b| a.key == b.key);
        let (waiting_on, watch_puts) = match older.len() {
            n if n < permits => (Vec::new(), false),
            n if n == permits => (older, false),
            _ => (vec![older.swap_remove(0)], permits > 1),
        };
        Position {
            waiting_on,
            watch_puts,
            revision,
        }
    }
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
    // An unlock is one-shot: resend what provably was never sent (see the helper).
    let resp = session
        .request_resending_unsent("releasing a key", || {
            let mut client = session.client().clone();
            let txn = fenced_delete(session, key, create_rev);
            async move { client.txn(txn).await }
        })
        .await?;
    tracing::debug!(key, ?create_rev, deleted = resp.succeeded(), "released");
    Ok(resp.succeeded())
}

/// Deletes our key in the background, retrying transient failures for a bounded time (the
/// session's TTL, at least 10 s: after that the lease has usually ended and taken the key).
pub(crate) fn release_in_background(session: &Session, key: String, create_rev: Option<i64>) {
    let s = session.clone();
    session.spawn_background(async move { release_with_retries(&s, &key, create_rev).await });
}

async fn release_with_retries(session: &Session, key: &str, create_rev: Option<i64>) {
    let bound = session.ttl().max(Duration::from_secs(10));
    let work = async {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            match release(session, key, create_rev).await {
                Ok(_) => return,
                Err(e) if e.is_retryable() => {
                    tracing::debug!(key, error = %e, "background release failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "background release failed");
                    return;
                }
            }
        }
    };
    if tokio::time::timeout(bound, work).await.is_err() {
        tracing::warn!(
            key,
            "background release gave up; the key goes when its lease ends"
        );
    }
}

/// Sends one transaction from a background task tracked by the session, so that its outcome
/// is always seen by someone: if the caller stops waiting for the answer, `undo` gets it.
///
/// Dropping a future while its request is in flight does not stop the request: etcd may apply
/// it after any cleanup the dropped future could start (they travel on separate streams), and
/// that cleanup would miss the key the request creates. Seeing the answer first closes the gap.
/// With `retry`, transient errors are retried while the session lives.
pub(crate) async fn detached_txn<U>(
    session: &Session,
    operation: &'static str,
    txn: Txn,
    retry: bool,
    undo: U,
) -> Result<TxnResponse>
where
    U: FnOnce(&Session, TxnResponse) + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s = session.clone();
    session.spawn_background(async move {
        let send = || {
            let mut client = s.client().clone();
            let txn = txn.clone();
            let s = &s;
            async move { s.request(operation, client.txn(txn)).await }
        };
        let result = if retry {
            retrying(&s, send).await
        } else {
            send().await
        };
        if let Err(Ok(resp)) = tx.send(result) {
            tracing::debug!(operation, "caller gone before the answer; undoing");
            undo(&s, resp);
        }
    });
    rx.await.unwrap_or(Err(Error::SessionClosed))
}

/// [`detached_txn`] for a transaction that may create our `key`: if the caller has gone, the
/// key the answer says was created is deleted, fenced by its create revision.
pub(crate) async fn send_creating(
    session: &Session,
    operation: &'static str,
    key: &str,
    txn: Txn,
    retry: bool,
) -> Result<TxnResponse> {
    let key = key.to_string();
    detached_txn(session, operation, txn, retry, move |s, resp| {
        if let Some(rev) = created_revision(&resp, &key) {
            release_in_background(s, key, Some(rev));
        }
    })
    .await
}

/// The create revision of `key` according to a response of [`send_creating`]: the transaction's
/// revision if it took the put branch, or the key as read in the other branch.
fn created_revision(resp: &TxnResponse, key: &str) -> Option<i64> {
    if resp.succeeded() {
        return revision(resp).ok();
    }
    resp.op_responses().iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .iter()
            .find(|kv| kv.key() == key.as_bytes())
            .map(|kv| kv.create_revision()),
        _ => None,
    })
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

/// The revision of a transaction response.
pub(crate) fn revision(resp: &TxnResponse) -> Result<i64> {
    header_revision(resp.header())
}

/// The range reads of a transaction response, in order.
pub(crate) fn gets(resp: &TxnResponse) -> Vec<etcd_client::GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

/// The keys older than `me` among the range reads of a transaction response.
fn older_keys(responses: &[TxnOpResponse], me: &str, my_rev: i64) -> Vec<Blocker> {
    responses
        .iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs()),
            _ => None,
        })
        .flatten()
        .filter(|kv| kv.key() != me.as_bytes() && kv.create_revision() < my_rev)
        .map(|kv: &KeyValue| Blocker {
            key: kv.key().to_vec(),
            create_rev: kv.create_revision(),
        })
        .collect()
}

/// Joins the queue: puts `key` (bound to the session's lease) unless it exists, and reads the
/// keys ahead of it, in one transaction. `pending` learns the create revision.
///
/// `extra` operations run in the same transaction whichever branch it takes; their responses
/// are returned in order (a primitive uses them to check its own metadata in the same request).
pub(crate) async fn enqueue(
    session: &Session,
    pending: &mut PendingKey,
    value: &[u8],
    blockers: &Blockers,
    extra: Vec<TxnOp>,
) -> Result<(Entry, Position, Vec<TxnOpResponse>)> {
    let key = pending.key.clone();
    let mut ops = vec![TxnOp::put(
        key.clone(),
        value.to_vec(),
        Some(PutOptions::new().with_lease(session.lease_id())),
    )];
    ops.extend(blockers.reads(0));
    ops.extend(extra.iter().cloned());
    let mut otherwise = vec![TxnOp::get(key.clone(), None)];
    otherwise.extend(extra.iter().cloned());
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then(ops)
        .or_else(otherwise);
    let resp = send_creating(session, "joining the queue", &key, txn, true).await?;
    let rev = revision(&resp)?;
    let mut responses = resp.op_responses();
    let extra_responses = responses.split_off(responses.len().saturating_sub(extra.len()));
    if resp.succeeded() {
        // Every put of a transaction is created at the transaction's revision.
        pending.create_rev = Some(rev);
        let entry = Entry {
            key: key.clone(),
            create_rev: rev,
        };
        let older = older_keys(&responses, &key, rev);
        let position = Position::new(older, blockers.permits, rev);
        return Ok((entry, position, extra_responses));
    }
    // The key exists: an earlier try of this very call committed before its answer was lost.
    let existing = responses
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.create_revision()),
            _ => None,
        })
        .ok_or_else(|| Error::malformed("a failed put-if-absent without the existing key"))?;
    pending.create_rev = Some(existing);
    let entry = Entry {
        key,
        create_rev: existing,
    };
    let position = check(session, &entry, blockers).await?;
    Ok((entry, position, extra_responses))
}

/// One request: is my key still there, and who is ahead of it now?
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
    let older = older_keys(&resp.op_responses(), &entry.key, entry.create_rev);
    Ok(Position::new(older, blockers.permits, revision(&resp)?))
}

/// Waits until fewer than the allowed number of older keys block `entry`, returning the
/// revision at which that was seen.
///
/// With more than one permit, a waiter that had to wait announces its promotion with a put on
/// its key (value and lease unchanged), which is what the waiter behind it watches for.
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
    let mut backoff = backoff();
    let mut waited = false;
    while !position.waiting_on.is_empty() {
        waited = true;
        tracing::debug!(
            key = %entry.key,
            blockers = ?position.waiting_on.iter().map(|b| show(&b.key)).collect::<Vec<_>>(),
            revision = position.revision, "waiting"
        );
        let mut watched: Vec<Vec<u8>> = position.waiting_on.iter().map(|b| b.key.clone()).collect();
        watched.push(entry.key.clone().into_bytes());
        let armed = tokio::select! {
            state = session.lost() => return Err(state.error().unwrap_or(Error::SessionClosed)),
            armed = watch_from_now(session, &watched, !position.watch_puts) => armed,
        };
        let mut watch = match armed {
            Ok(watch) => watch,
            Err(e) if e.is_retryable() => {
                tracing::debug!(key = %entry.key, error = %e, "watch failed; re-reading");
                tokio::select! {
                    state = session.lost() => return Err(state.error().unwrap_or(e)),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                position = check(session, entry, blockers).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !watch.fired && watch.since > position.revision {
            // Written to since our read: read again, now that the watch covers what follows.
            let fresh = check(session, entry, blockers).await?;
            let same = fresh.watch_puts == position.watch_puts
                && !fresh.waiting_on.is_empty()
                && fresh.waiting_on.iter().all(|b| watched.contains(&b.key));
            position = fresh;
            if !same {
                continue;
            }
        }
        if !watch.fired {
            tokio::select! {
                state = session.lost() => return Err(state.error().unwrap_or(Error::SessionClosed)),
                woke = watch.next() => match woke {
                    Ok(()) => backoff.reset(),
                    Err(e) if !e.is_retryable() => return Err(e),
                    Err(e) => {
                        tracing::debug!(key = %entry.key, error = %e, "watch failed; re-reading");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                },
            }
        }
        position = check(session, entry, blockers).await?;
    }
    // The check proved our key existed at this revision (so our lease was alive on the
    // server); the local state proves we have not lost it since.
    session.check_alive()?;
    if waited && blockers.permits > 1 {
        return announce(session, entry).await;
    }
    Ok(position.revision)
}

/// A watch on some keys, opened from the store's current revision.
struct Armed {
    stream: etcd_client::WatchStream,
    /// Every event after this revision reaches the stream.
    since: i64,
    /// Whether an event (or a cancellation) already arrived while the watch was being set up.
    fired: bool,
}

impl Armed {
    /// Returns at the next event or server cancellation; the caller re-reads either way.
    async fn next(&mut self) -> Result<()> {
        loop {
            match next_events(&mut self.stream).await? {
                None => return Ok(()),
                Some(events) if !events.is_empty() => return Ok(()),
                Some(_) => {}
            }
        }
    }
}

/// Opens a synced watch (no start revision) on `keys` and waits until etcd has created every
/// watcher, learning the revision after which all of them see every event.
async fn watch_from_now(session: &Session, keys: &[Vec<u8>], deletes_only: bool) -> Result<Armed> {
    let mut opts = WatchOptions::new();
    if deletes_only {
        opts = opts.with_filters([WatchFilterType::NoPut]);
    }
    let mut client = session.client().clone();
    let setup = async {
        let mut stream = client.watch(keys[0].clone(), Some(opts.clone())).await?;
        for key in &keys[1..] {
            stream.watch(key.clone(), Some(opts.clone())).await?;
        }
        let (mut created, mut since, mut fired) = (0, 0, false);
        while created < keys.len() {
            let Some(resp) = stream.message().await? else {
                return Err(etcd_client::Error::WatchError(
                    "the watch stream ended".into(),
                ));
            };
            if resp.created() {
                created += 1;
                // Each watcher starts at the revision it was created at; all of them cover
                // what comes after the latest of those.
                since = since.max(resp.header().map(|h| h.revision()).unwrap_or(i64::MAX));
            }
            fired |= resp.canceled() || !resp.events().is_empty();
        }
        Ok(Armed {
            stream,
            since,
            fired,
        })
    };
    session.request("opening a watch", setup).await
}

/// Touches our key (a put that keeps value and lease) so that the waiter behind us, which
/// watches it, re-reads the queue. Fenced: fails with [`Error::NotHeld`] if the key is gone.
async fn announce(session: &Session, entry: &Entry) -> Result<i64> {
    let touch = TxnOp::put(
        entry.key.clone(),
        Vec::new(),
        Some(PutOptions::new().with_ignore_value().with_ignore_lease()),
    );
    let txn = Txn::new().when([entry.is_owner()]).and_then([touch]);
    let resp = retrying(session, || {
        let mut client = session.client().clone();
        let txn = txn.clone();
        async move {
            session
                .request("announcing a promotion", client.txn(txn))
                .await
        }
    })
    .await?;
    if !resp.succeeded() {
        return Err(Error::NotHeld {
            key: entry.key.clone(),
        });
    }
    revision(&resp)
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
        woke = next_change(session, keys, start, !deletes_only) => match woke {
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

/// Returns when any of `keys` is deleted (or, with `puts`, written) at a revision >= `start`,
/// or when the server cancelled the watch (compaction and the like), after which the caller
/// re-reads.
///
/// # Errors
///
/// A retryable error when the stream could not be opened or broke.
pub(crate) async fn next_change(
    session: &Session,
    keys: &[Vec<u8>],
    start: i64,
    puts: bool,
) -> Result<()> {
    let mut opts = WatchOptions::new().with_start_revision(start);
    if !puts {
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
        match next_events(&mut stream).await? {
            // Cancelled by the server (compaction and the like): the caller re-reads.
            None => return Ok(()),
            Some(events) if !events.is_empty() => return Ok(()),
            Some(_) => {}
        }
    }
}

/// The next batch of events on `stream` (all events of one revision arrive together), skipping
/// responses without any, or `None` when the server cancelled a watch (compaction and the
/// like), after which the caller re-reads.
///
/// # Errors
///
/// A retryable error when the stream broke.
async fn next_events(
    stream: &mut etcd_client::WatchStream,
) -> Result<Option<Vec<etcd_client::Event>>> {
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
            return Ok(None);
        }
        if !resp.events().is_empty() {
            return Ok(Some(resp.events().to_vec()));
        }
    }
}

/// A watch on every key under a prefix, for primitives that react to puts as well as deletes
/// (queues). The caller decides which events matter.
pub(crate) struct PrefixWatch {
    stream: etcd_client::WatchStream,
}

/// Opens a watch on every key under `prefix`, from revision `start`.
///
/// # Errors
///
/// A retryable error when the stream could not be opened.
pub(crate) async fn watch_prefix(
    session: &Session,
    prefix: &str,
    start: i64,
) -> Result<PrefixWatch> {
    let opts = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut client = session.client().clone();
    let stream = session
        .request("opening a watch", client.watch(prefix, Some(opts)))
        .await?;
    Ok(PrefixWatch { stream })
}

impl PrefixWatch {
    /// The next batch of events (all events of one revision arrive together), or `None` when the
    /// server cancelled the watch (compaction and the like), after which the caller re-reads.
    ///
    /// # Errors
    ///
    /// A retryable error when the stream broke.
    pub(crate) async fn next(&mut self) -> Result<Option<Vec<etcd_client::Event>>> {
        next_events(&mut self.stream).await
    }
}
