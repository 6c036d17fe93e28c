//! A FIFO queue and a priority queue of values stored in etcd, ordered by commit.
//!
//! Both are the simple kind: [`pop`](Queue::pop) takes an item out of etcd before the caller
//! processes it, so an item popped by a process that then crashes is gone. For jobs that must
//! not be lost, use [`WorkQueue`](crate::WorkQueue), which keeps a job until it is acknowledged.

use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::keys::{prefix, validate_name};
use crate::session::{Backoff, Session};
use crate::wait::{self, retrying};

/// The largest request etcd accepts unless its `--max-request-bytes` says otherwise (1.5 MiB).
///
/// Values are checked against this limit (or the one set with `max_request_bytes`) before
/// anything is sent, so an oversize value is a clear [`Error::InvalidArgument`] and not a
/// server error halfway through.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// The smallest request limit accepted by the `max_request_bytes` setters: below this, even
/// the keys and metadata of one request may not fit.
const MIN_MAX_REQUEST_BYTES: usize = 4096;

/// What a request costs beyond its keys and values (headers, field tags, a nested
/// transaction), with room to spare. Measured against etcd: a request of exactly
/// `limit - REQUEST_OVERHEAD` bytes of keys and values is accepted.
pub(crate) const REQUEST_OVERHEAD: usize = 512;

/// Items read per request when looking for the next one.
const READ_BATCH: i64 = 16;

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Fails with `InvalidArgument` naming `arg` unless `bytes` of keys and values fit in a request.
pub(crate) fn check_size(arg: &'static str, bytes: usize, limit: usize) -> Result<()> {
    if bytes + REQUEST_OVERHEAD > limit {
        return Err(Error::invalid(
            arg,
            format!(
                "the request would be about {} bytes; the limit is {limit} (etcd's \
                 --max-request-bytes, default {DEFAULT_MAX_REQUEST_BYTES})",
                bytes + REQUEST_OVERHEAD
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_limit(bytes: usize) -> Result<()> {
    if bytes < MIN_MAX_REQUEST_BYTES {
        return Err(Error::invalid(
            "max_request_bytes",
            format!("must be at least {MIN_MAX_REQUEST_BYTES} (got {bytes})"),
        ));
    }
    Ok(())
}

/// Runs one request in a task tracked by the session and hands its result back.
///
/// The point is what happens when the caller's future is dropped while the request is in
/// flight: the task still sees the answer, and a result nobody receives is dropped there (or in
/// the channel), where its `Drop` undoes it (puts a popped item back, releases a claim). So
/// an operation that committed is either returned to the caller or undone, never lost.
pub(crate) async fn detached<T, F>(session: &Session, fut: F) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    session.spawn_background(async move {
        // If the receiver is gone, the value comes back in the error and is dropped here.
        let _ = tx.send(fut.await);
    });
    rx.await.map_err(|_| Error::Unavailable {
        message: "the runtime shut down while a request was in flight".into(),
        source: None,
    })
}

/// The key of a new item: unique, so a retried put-if-absent can never create it twice.
fn item_key(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// `u16::MAX - priority` in hex: sorted by key, higher priorities come first.
fn bucket(prefix: &str, priority: u16) -> String {
    format!("{prefix}{:04x}/", u16::MAX - priority)
}

/// The bucket prefix (`NAME/ffff/`) of a priority-queue key, if it has the expected shape.
fn bucket_of<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    let rest = key.strip_prefix(prefix)?;
    (rest.len() > 5 && rest.as_bytes()[4] == b'/').then(|| &key[..prefix.len() + 5])
}

/// An item this process deleted from etcd and has not yet handed to its caller. If dropped
/// before [`into_value`](Taken::into_value), the item is put back (under its own key, so at
/// the back of the queue: etcd gives it a new create revision).
struct Taken {
    session: Session,
    key: String,
    value: Option<Vec<u8>>,
}

impl Taken {
    fn into_value(mut self) -> Vec<u8> {
        self.value.take().unwrap_or_default()
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let Some(value) = self.value.take() else {
            return;
        };
        tracing::debug!(key = %self.key, "pop abandoned after its delete committed; putting the item back");
        let session = self.session.clone();
        let key = std::mem::take(&mut self.key);
        let bound = session.ttl().max(Duration::from_secs(10));
        self.session.spawn_background(async move {
            // The key is random and only our delete removed it, so put-if-absent restores
            // exactly this item and can be retried without creating a copy.
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), value, None)]);
            let restore = async {
                let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
                loop {
                    let mut client = session.client().clone();
                    match session
                        .request("putting back an abandoned item", client.txn(txn.clone()))
                        .await
                    {
                        Ok(_) => return true,
                        Err(e) if e.is_retryable() => {
                            tokio::time::sleep(backoff.next_delay()).await
                        }
                        Err(_) => return false,
                    }
                }
            };
            let restored = tokio::time::timeout(bound, restore).await.unwrap_or(false);
            if restored {
                tracing::debug!(key = %key, "abandoned item put back");
            } else {
                tracing::warn!(key = %key, "could not put back an abandoned item; it is lost");
            }
        });
    }
}

/// How the next item is found.
#[derive(Debug, Clone)]
enum Order {
    /// The oldest key under the prefix.
    Fifo,
    /// The oldest key of the highest non-empty bucket. The last bucket seen is remembered, so
    /// that one read can both check it is still the highest (probe: the first key overall) and
    /// list its oldest items.
    Priority(Arc<StdMutex<Option<String>>>),
}

/// The machinery shared by [`Queue`] and [`PriorityQueue`].
#[derive(Debug, Clone)]
struct Store {
    session: Session,
    name: String,
    prefix: String,
    max_request_bytes: usize,
    order: Order,
}

/// The oldest items as of `revision`, best first: (key, create revision).
struct Head {
    items: Vec<(String, i64)>,
    revision: i64,
}

impl Store {
    fn new(session: &Session, name: String, order: Order) -> Result<Store> {
        validate_name("name", &name)?;
        Ok(Store {
            session: session.clone(),
            prefix: prefix(&name),
            name,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            order,
        })
    }

    async fn push(&self, key: String, value: Vec<u8>) -> Result<()> {
        check_size("value", key.len() + value.len(), self.max_request_bytes)?;
        self.session.check_alive()?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        // Retrying is safe: an attempt whose answer was lost committed the same key, and the
        // retry's compare then fails without writing.
        let resp = retrying(&self.session, || {
            let mut client = self.session.client().clone();
            let txn = txn.clone();
            async move {
                self.session
                    .request("pushing an item", client.txn(txn))
                    .await
            }
        })
        .await?;
        tracing::debug!(queue = %self.name, key = %key, revision = wait::revision(&resp).ok(), "pushed");
        Ok(())
    }

    fn oldest(range_start: &str, range_end: Vec<u8>) -> TxnOp {
        TxnOp::get(
            range_start,
            Some(
                GetOptions::new()
                    .with_range(range_end)
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_keys_only()
                    .with_limit(READ_BATCH),
            ),
        )
    }

    /// One read (two while the highest priority changes): the best items now.
    async fn head(&self) -> Result<Head> {
        let end = crate::keys::prefix_end(self.prefix.as_bytes());
        loop {
            let (ops, cached) = match &self.order {
                Order::Fifo => (vec![Self::oldest(&self.prefix, end.clone())], None),
                Order::Priority(cache) => {
                    let cached = cache.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let mut ops = vec![TxnOp::get(
                        self.prefix.as_str(),
                        Some(
                            GetOptions::new()
                                .with_range(end.clone())
                                .with_sort(SortTarget::Key, SortOrder::Ascend)
                                .with_keys_only()
                                .with_limit(1),
                        ),
                    )];
                    if let Some(b) = &cached {
                        ops.push(Self::oldest(b, crate::keys::prefix_end(b.as_bytes())));
                    }
                    (ops, Some((cache.clone(), cached)))
                }
            };
            let txn = Txn::new().and_then(ops);
            let resp = retrying(&self.session, || {
                let mut client = self.session.client().clone();
                let txn = txn.clone();
                async move {
                    self.session
                        .request("reading a queue", client.txn(txn))
                        .await
                }
            })
            .await?;
            let revision = wait::revision(&resp)?;
            let reads = wait::gets(&resp);
            let items = |g: &etcd_client::GetResponse| {
                g.kvs()
                    .iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(kv.key()).into_owned(),
                            kv.create_revision(),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            let Some((cache, cached)) = cached else {
                let items = reads.first().map(items).unwrap_or_default();
                return Ok(Head { items, revision });
            };
            let top = reads
                .first()
                .and_then(|g| g.kvs().first())
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned());
            let top_bucket = top.as_deref().and_then(|k| bucket_of(&self.prefix, k));
            match (top_bucket, cached.as_deref()) {
                (None, _) => {
                    return Ok(Head {
                        items: Vec::new(),
                        revision,
                    })
                }
                (Some(t), Some(c)) if t == c => {
                    let items = reads.get(1).map(items).unwrap_or_default();
                    return Ok(Head { items, revision });
                }
                (Some(t), _) => {
                    tracing::debug!(queue = %self.name, bucket = t, "highest priority changed; re-reading");
                    *cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.to_string());
                }
            }
        }
    }

    /// Deletes `key` if it is still the item we read, returning its value.
    async fn take(&self, key: String, create_rev: i64) -> Result<Option<Taken>> {
        let session = self.session.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                create_rev,
            )])
            .and_then([
                TxnOp::get(key.as_str(), None),
                TxnOp::delete(key.as_str(), None),
            ]);
        detached(&self.session, async move {
            let mut client = session.client().clone();
            let resp = session.request("popping an item", client.txn(txn)).await?;
            if !resp.succeeded() {
                return Ok(None);
            }
            let value = wait::gets(&resp)
                .first()
                .and_then(|g| g.kvs().first())
                .map(|kv| kv.value().to_vec())
                .unwrap_or_default();
            Ok(Some(Taken {
                session,
                key,
                value: Some(value),
            }))
        })
        .await?
    }

    async fn pop(&self, wait: bool) -> Result<Option<Vec<u8>>> {
        self.session.check_alive()?;
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            let head = self.head().await?;
            for (key, rev) in head.items.iter().cloned() {
                if let Some(taken) = self.take(key.clone(), rev).await? {
                    tracing::debug!(queue = %self.name, key = %key, create_rev = rev, "popped");
                    return Ok(Some(taken.into_value()));
                }
                tracing::debug!(queue = %self.name, key = %key, "taken by another consumer; trying the next");
            }
            if !head.items.is_empty() {
                // Every item we saw went to others; there may be more behind them.
                continue;
            }
            if !wait {
                return Ok(None);
            }
            tracing::debug!(queue = %self.name, revision = head.revision, "empty; waiting for a push");
            let waited = async {
                let mut watch =
                    wait::watch_prefix(&self.session, &self.prefix, head.revision + 1).await?;
                loop {
                    match watch.next().await? {
                        None => return Ok(()),
                        Some(events) if events.iter().any(|e| e.event_type() == EventType::Put) => {
                            return Ok(())
                        }
                        Some(_) => {}
                    }
                }
            };
            let lost = self.session.lost();
            let result: Result<()> = tokio::select! {
                state = lost => Err(state.error().unwrap_or(Error::SessionClosed)),
                r = waited => r,
            };
            match result {
                Ok(()) => backoff.reset(),
                Err(e) if e.is_retryable() => {
                    tracing::debug!(queue = %self.name, error = %e, "watch failed; re-reading");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn peek(&self) -> Result<Option<Vec<u8>>> {
        loop {
            let head = self.head().await?;
            let Some((key, rev)) = head.items.first().cloned() else {
                return Ok(None);
            };
            let mut client = self.session.client().clone();
            let resp = self
                .session
                .request("peeking at a queue", client.get(key.as_str(), None))
                .await?;
            match resp.kvs().first() {
                Some(kv) if kv.create_revision() == rev => return Ok(Some(kv.value().to_vec())),
                // Popped in between: look again.
                _ => continue,
            }
        }
    }

    async fn len(&self) -> Result<u64> {
        let mut client = self.session.client().clone();
        let resp = self
            .session
            .request(
                "counting a queue",
                client.get(
                    self.prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ),
            )
            .await?;
        Ok(resp.count().max(0) as u64)
    }
}

/// A first-in, first-out queue shared by every process that uses the same name.
///
/// Each item is a key `NAME/<random>` with no lease (items outlive their producer); the order
/// is the order in which etcd committed the pushes (their create revisions). A consumer reads
/// the oldest few keys and deletes the first in a transaction conditional on its create
/// revision; if another consumer won it, it tries the next one it read; when the queue is
/// empty it watches the prefix from the revision of its read + 1, so no push is missed.
///
/// This is a simple queue: [`pop`](Self::pop) removes the item from etcd before returning it,
/// so an item whose consumer crashes afterwards is lost. Use a
/// [`WorkQueue`](crate::WorkQueue) for jobs that must be processed at least once. Consumers
/// that wait on an empty queue are all woken by a push and race for it; with many idle
/// consumers, the work queue scales better.
///
/// What it costs: [`push`](Self::push) is one request; [`pop`](Self::pop) is one read and one
/// transaction when uncontended.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// let queue = etcd_coord::Queue::new(&session, "mail/outgoing")?;
/// queue.push("hello").await?;
/// let item = queue.pop().await?;
/// assert_eq!(item, b"hello");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Queue {
    store: Store,
}

impl Queue {
    /// A handle on the queue `name`. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` if it is not a valid name (see
    /// [`Mutex`](crate::Mutex#names)).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let queue = etcd_coord::Queue::new(&session, "mail/outgoing")?;
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>) -> Result<Queue> {
        Ok(Queue {
            store: Store::new(session, name.into(), Order::Fifo)?,
        })
    }

    /// Sets the request size limit that values are checked against (default
    /// [`DEFAULT_MAX_REQUEST_BYTES`]); match it to etcd's `--max-request-bytes`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `max_request_bytes` below 4096.
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let queue = etcd_coord::Queue::new(&session, "q")?.max_request_bytes(10 << 20)?;
    /// # Ok(()) }
    /// ```
    pub fn max_request_bytes(mut self, bytes: usize) -> Result<Queue> {
        check_limit(bytes)?;
        self.store.max_request_bytes = bytes;
        Ok(self)
    }

    /// The queue's name.
    ///
    /// ```no_run
    /// # fn f(q: etcd_coord::Queue) {
    /// println!("{}", q.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.store.name
    }

    /// Appends `value`. Transient errors are retried while the session lives; a retry never
    /// adds the item twice.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `value` if it does not fit in one etcd request;
    /// the session's error if it ends; non-retryable etcd errors.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the item may or may not have been pushed.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::Queue) -> etcd_coord::Result<()> {
    /// q.push(b"\x01\x02".to_vec()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn push(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        let key = item_key(&self.store.prefix);
        self.store.push(key, value.into()).await
    }

    /// Removes and returns the oldest item, waiting for one if the queue is empty.
    ///
    /// # Errors
    ///
    /// The session's error if it ends while waiting; [`Error::Timeout`] or
    /// [`Error::Unavailable`] if etcd does not answer the delete (see below); non-retryable
    /// etcd errors. Transient errors while reading and waiting are retried.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped `pop` never takes an item. The delete is the last step, and it
    /// runs in a task tracked by the session: if this future is dropped while the delete is in
    /// flight and the delete commits, the task puts the item back under its own key (at the
    /// back of the queue, since etcd orders by create revision). An item whose delete committed
    /// is therefore either returned or restored.
    ///
    /// One window remains, inherent in taking an item out of etcd: if etcd does not answer the
    /// delete within the session's request timeout, nobody knows whether it committed; `pop`
    /// then returns the error and the item may be gone. A [`WorkQueue`](crate::WorkQueue) has
    /// no such window.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::Queue) -> etcd_coord::Result<()> {
    /// use std::time::Duration;
    /// if let Ok(item) = tokio::time::timeout(Duration::from_secs(1), q.pop()).await {
    ///     println!("got {:?}", item?);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn pop(&self) -> Result<Vec<u8>> {
        let item = self.store.pop(true).await?;
        item.ok_or_else(|| Error::Conflict("a waiting pop returned no item".into()))
    }

    /// Removes and returns the oldest item, or `None` if the queue is empty, without waiting.
    ///
    /// # Errors
    ///
    /// As [`pop`](Self::pop).
    ///
    /// # Cancel safety
    ///
    /// As [`pop`](Self::pop).
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::Queue) -> etcd_coord::Result<()> {
    /// while let Some(item) = q.try_pop().await? {
    ///     println!("{item:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_pop(&self) -> Result<Option<Vec<u8>>> {
        self.store.pop(false).await
    }

    /// The oldest item without removing it, or `None` if the queue is empty.
    ///
    /// # Errors
    ///
    /// The session's error if it ends; etcd errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::Queue) -> etcd_coord::Result<()> {
    /// if let Some(next) = q.peek().await? {
    ///     println!("next up: {next:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn peek(&self) -> Result<Option<Vec<u8>>> {
        self.store.peek().await
    }

    /// The number of items now (one request).
    ///
    /// # Errors
    ///
    /// etcd errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::Queue) -> etcd_coord::Result<()> {
    /// println!("{} items waiting", q.len().await?);
    /// # Ok(()) }
    /// ```
    #[allow(clippy::len_without_is_empty)]
    pub async fn len(&self) -> Result<u64> {
        self.store.len().await
    }
}

/// A queue whose items come out highest priority first, and first-in, first-out within a
/// priority.
///
/// Priorities are `u16`; **a larger number is served first** (priority 10 before priority 1).
/// An item is a key `NAME/<65535 - priority, 4 hex digits>/<random>`, so sorting by key puts
/// the highest priority first; within a priority, items come out in the order etcd committed
/// their pushes (create revision). A consumer's read checks that the priority it served last is
/// still the highest and lists that priority's oldest items in one request; only when a higher
/// priority appears (or the current one runs dry) does it take a second read.
///
/// Like [`Queue`], this is a simple queue: a popped item is gone from etcd. Its keys are not
/// compatible with a [`Queue`] of the same name.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// let queue = etcd_coord::PriorityQueue::new(&session, "builds")?;
/// queue.push("nightly", 1).await?;
/// queue.push("hotfix", 100).await?;
/// assert_eq!(queue.pop().await?, b"hotfix");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PriorityQueue {
    store: Store,
}

impl PriorityQueue {
    /// A handle on the priority queue `name`. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` if it is not a valid name.
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let queue = etcd_coord::PriorityQueue::new(&session, "builds")?;
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>) -> Result<PriorityQueue> {
        Ok(PriorityQueue {
            store: Store::new(
                session,
                name.into(),
                Order::Priority(Arc::new(StdMutex::new(None))),
            )?,
        })
    }

    /// Sets the request size limit that values are checked against (default
    /// [`DEFAULT_MAX_REQUEST_BYTES`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `max_request_bytes` below 4096.
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let q = etcd_coord::PriorityQueue::new(&session, "q")?.max_request_bytes(10 << 20)?;
    /// # Ok(()) }
    /// ```
    pub fn max_request_bytes(mut self, bytes: usize) -> Result<PriorityQueue> {
        check_limit(bytes)?;
        self.store.max_request_bytes = bytes;
        Ok(self)
    }

    /// The queue's name.
    ///
    /// ```no_run
    /// # fn f(q: etcd_coord::PriorityQueue) {
    /// println!("{}", q.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.store.name
    }

    /// Adds `value` with `priority` (larger is served first).
    ///
    /// # Errors
    ///
    /// As [`Queue::push`].
    ///
    /// # Cancel safety
    ///
    /// If dropped, the item may or may not have been pushed.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::PriorityQueue) -> etcd_coord::Result<()> {
    /// q.push("urgent", u16::MAX).await?;
    /// # Ok(()) }
    /// ```
    pub async fn push(&self, value: impl Into<Vec<u8>>, priority: u16) -> Result<()> {
        let key = item_key(&bucket(&self.store.prefix, priority));
        self.store.push(key, value.into()).await
    }

    /// Removes and returns the best item, waiting for one if the queue is empty.
    ///
    /// # Errors
    ///
    /// As [`Queue::pop`].
    ///
    /// # Cancel safety
    ///
    /// As [`Queue::pop`]: a dropped `pop` never takes an item; an item put back after an
    /// abandoned pop keeps its priority but goes to the back of it.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::PriorityQueue) -> etcd_coord::Result<()> {
    /// let item = q.pop().await?;
    /// # Ok(()) }
    /// ```
    pub async fn pop(&self) -> Result<Vec<u8>> {
        let item = self.store.pop(true).await?;
        item.ok_or_else(|| Error::Conflict("a waiting pop returned no item".into()))
    }

    /// Removes and returns the best item, or `None` if the queue is empty, without waiting.
    ///
    /// # Errors
    ///
    /// As [`Queue::pop`].
    ///
    /// # Cancel safety
    ///
    /// As [`pop`](Self::pop).
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::PriorityQueue) -> etcd_coord::Result<()> {
    /// let maybe = q.try_pop().await?;
    /// # Ok(()) }
    /// ```
    pub async fn try_pop(&self) -> Result<Option<Vec<u8>>> {
        self.store.pop(false).await
    }

    /// The best item without removing it, or `None` if the queue is empty.
    ///
    /// # Errors
    ///
    /// The session's error if it ends; etcd errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::PriorityQueue) -> etcd_coord::Result<()> {
    /// let next = q.peek().await?;
    /// # Ok(()) }
    /// ```
    pub async fn peek(&self) -> Result<Option<Vec<u8>>> {
        self.store.peek().await
    }

    /// The number of items now, over all priorities (one request).
    ///
    /// # Errors
    ///
    /// etcd errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::PriorityQueue) -> etcd_coord::Result<()> {
    /// let n = q.len().await?;
    /// # Ok(()) }
    /// ```
    #[allow(clippy::len_without_is_empty)]
    pub async fn len(&self) -> Result<u64> {
        self.store.len().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priorities_sort_first_and_buckets_parse() {
        let hi = bucket("q/", 10);
        let lo = bucket("q/", 1);
        assert!(hi < lo, "{hi} {lo}");
        assert!(bucket("q/", u16::MAX) < bucket("q/", 0));
        let key = item_key(&hi);
        assert_eq!(bucket_of("q/", &key), Some(hi.as_str()));
        assert_eq!(bucket_of("q/", "q/short"), None);
        assert_eq!(bucket_of("q/", "other/ffff/x"), None);
    }

    #[test]
    fn sizes_are_checked_with_the_argument_named() {
        assert!(check_size("value", 100, DEFAULT_MAX_REQUEST_BYTES).is_ok());
        match check_size(
            "value",
            DEFAULT_MAX_REQUEST_BYTES,
            DEFAULT_MAX_REQUEST_BYTES,
        ) {
            Err(Error::InvalidArgument { name: "value", .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(check_limit(0).is_err());
        assert!(check_limit(DEFAULT_MAX_REQUEST_BYTES).is_ok());
    }
}
