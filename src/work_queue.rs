//! An at-least-once job queue: jobs stay in etcd until a consumer acknowledges them, claims
//! are bound to the consumer's lease and fenced, failing jobs end in a dead-letter prefix.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Compare, CompareOp, Event, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::guard::{owner_txn, LockGuard};
use crate::keys::{prefix, prefix_end, validate_name};
use crate::mutex::Mutex;
use crate::queue::{check_limit, check_size, detached, DEFAULT_MAX_REQUEST_BYTES};
use crate::session::{Backoff, Session};
use crate::wait::{self, retrying};

/// How many times a job is delivered before it moves to the dead letters, unless the builder
/// says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// How many jobs one read lists, unless the builder says otherwise. Competing consumers spread
/// their claims over the jobs of one read, so this bounds how many can claim without colliding.
pub const DEFAULT_BATCH_SIZE: usize = 16;

/// The largest batch size accepted: a read lists `batch size + jobs in flight` keys.
pub const MAX_BATCH_SIZE: usize = 1000;

/// The most jobs [`WorkQueue::claim_batch`] claims at once (etcd allows 128 operations per
/// transaction by default; a claim takes one, plus the reads that come with it).
pub const MAX_CLAIM_BATCH: usize = 64;

/// Due delayed jobs moved into the queue per request.
const PROMOTE_BATCH: i64 = 8;

/// Jobs of a read that back up the picked ones in one claim request (see `chains`): more than
/// the consumers that may claim from the same read at once, so that a claim rarely fails.
const MAX_FALLBACKS: usize = 16;

/// Reads in a row that may be spent following a change of the highest priority or a growing
/// number of jobs in flight before settling for what was seen.
const MAX_REREADS: usize = 8;

/// The longest sleep before re-reading while waiting for a delayed job, so that a wall-clock
/// jump is noticed.
const MAX_TIMER: Duration = Duration::from_secs(30);

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Where everything of one work queue lives, all under `NAME/`.
#[derive(Debug)]
struct Layout {
    /// `NAME/`
    root: String,
    /// `NAME/jobs/<65535 - priority, 4 hex>/<id>`: jobs that may be claimed (or are in
    /// flight); the value is the job's [`Meta`].
    jobs: String,
    /// `NAME/data/<id>`: the payload, written once and deleted with the job.
    data: String,
    /// `NAME/claims/<id>`: bound to the consumer's lease while the job is in flight.
    claims: String,
    /// `NAME/delayed/<visible-at, ms since the epoch, 16 hex>/<id>`: jobs not yet visible.
    delayed: String,
    /// `NAME/dead/<id>`: dead letters.
    dead: String,
}

impl Layout {
    fn new(name: &str) -> Layout {
        let root = prefix(name);
        Layout {
            jobs: format!("{root}jobs/"),
            data: format!("{root}data/"),
            claims: format!("{root}claims/"),
            delayed: format!("{root}delayed/"),
            dead: format!("{root}dead/"),
            root,
        }
    }
    fn bucket(&self, priority: u16) -> String {
        format!("{}{:04x}/", self.jobs, u16::MAX - priority)
    }
    fn job(&self, priority: u16, id: &str) -> String {
        format!("{}{id}", self.bucket(priority))
    }
    fn data(&self, id: &str) -> String {
        format!("{}{id}", self.data)
    }
    fn claim(&self, id: &str) -> String {
        format!("{}{id}", self.claims)
    }
    fn delayed(&self, at: SystemTime, id: &str) -> String {
        format!("{}{:016x}/{id}", self.delayed, millis(at))
    }
    fn dead(&self, id: &str) -> String {
        format!("{}{id}", self.dead)
    }
    /// `NAME/jobs/ffff/` of a job key.
    fn bucket_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(self.jobs.as_str())?;
        (rest.len() > 5 && rest.as_bytes()[4] == b'/').then(|| &key[..self.jobs.len() + 5])
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
        .unwrap_or(0)
}

/// The last path segment of a key: the job id.
fn id_of(key: &[u8]) -> &str {
    let key = std::str::from_utf8(key).unwrap_or("");
    key.rsplit('/').next().unwrap_or("")
}

/// When a delayed key becomes visible.
fn visible_at(layout: &Layout, key: &[u8]) -> Option<SystemTime> {
    let rest = std::str::from_utf8(key)
        .ok()?
        .strip_prefix(&layout.delayed)?;
    let ms = u64::from_str_radix(rest.get(..16)?, 16).ok()?;
    Some(UNIX_EPOCH + Duration::from_millis(ms))
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 || id.contains('/') || id.chars().any(char::is_control) {
        return Err(Error::invalid(
            "id",
            "a job id is 1 to 128 bytes without '/' or control characters",
        ));
    }
    Ok(())
}

/// What is stored with a job: how often it was delivered, and its priority (kept so that a
/// delayed or dead job goes back to the right place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    attempts: u32,
    priority: u16,
}

impl Meta {
    fn encode(self) -> String {
        format!("a={};p={}", self.attempts, self.priority)
    }

    fn decode(bytes: &[u8]) -> Option<Meta> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (a, p) = text.split_once(';')?;
        Some(Meta {
            attempts: a.strip_prefix("a=")?.parse().ok()?,
            priority: p.strip_prefix("p=")?.parse().ok()?,
        })
    }
}

/// Settings for one job; see [`WorkQueue::push_with`].
///
/// ```no_run
/// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
/// use std::time::Duration;
/// use etcd_coord::JobOptions;
/// q.push_with("reindex", JobOptions::new().priority(10).delay(Duration::from_secs(60))).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    priority: u16,
    delay: Option<Duration>,
    not_before: Option<SystemTime>,
}

impl JobOptions {
    /// Priority 0, visible at once.
    ///
    /// ```
    /// let o = etcd_coord::JobOptions::new();
    /// ```
    pub fn new() -> JobOptions {
        JobOptions::default()
    }

    /// The job's priority: a larger number is claimed first (default 0). Within a priority,
    /// jobs are claimed in the order they became visible.
    ///
    /// ```
    /// let o = etcd_coord::JobOptions::new().priority(7);
    /// ```
    pub fn priority(mut self, priority: u16) -> JobOptions {
        self.priority = priority;
        self
    }

    /// Makes the job visible only `delay` after the push (measured on the pushing machine's
    /// wall clock; consumers compare with theirs, so clock skew shifts it).
    ///
    /// ```
    /// let o = etcd_coord::JobOptions::new().delay(std::time::Duration::from_secs(30));
    /// ```
    pub fn delay(mut self, delay: Duration) -> JobOptions {
        self.delay = Some(delay);
        self.not_before = None;
        self
    }

    /// Makes the job visible only from wall-clock time `at`.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// let o = etcd_coord::JobOptions::new().not_before(SystemTime::now() + Duration::from_secs(5));
    /// ```
    pub fn not_before(mut self, at: SystemTime) -> JobOptions {
        self.not_before = Some(at);
        self.delay = None;
        self
    }

    fn visible_at(&self) -> Option<SystemTime> {
        let at = match (self.not_before, self.delay) {
            (Some(at), _) => at,
            (None, Some(d)) => SystemTime::now().checked_add(d)?,
            (None, None) => return None,
        };
        (at > SystemTime::now()).then_some(at)
    }
}

/// Builder for a [`WorkQueue`]. Defaults are the `pub const`s of this module.
///
/// ```no_run
/// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// let queue = etcd_coord::WorkQueue::builder(&session, "thumbnails")
///     .max_attempts(3)
///     .batch_size(32)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WorkQueueBuilder {
    session: Session,
    name: String,
    max_attempts: u32,
    batch_size: usize,
    max_request_bytes: usize,
}

impl WorkQueueBuilder {
    /// How many deliveries a job gets before it moves to the dead letters (default
    /// [`DEFAULT_MAX_ATTEMPTS`]). Every consumer of a queue should use the same value: the one
    /// that sees the job decides.
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) {
    /// let b = etcd_coord::WorkQueue::builder(&session, "q").max_attempts(10);
    /// # }
    /// ```
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// How many jobs one read lists (default [`DEFAULT_BATCH_SIZE`]).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) {
    /// let b = etcd_coord::WorkQueue::builder(&session, "q").batch_size(64);
    /// # }
    /// ```
    pub fn batch_size(mut self, jobs: usize) -> Self {
        self.batch_size = jobs;
        self
    }

    /// The request size limit that jobs are checked against (default
    /// [`DEFAULT_MAX_REQUEST_BYTES`]); match it to etcd's `--max-request-bytes`.
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) {
    /// let b = etcd_coord::WorkQueue::builder(&session, "q").max_request_bytes(10 << 20);
    /// # }
    /// ```
    pub fn max_request_bytes(mut self, bytes: usize) -> Self {
        self.max_request_bytes = bytes;
        self
    }

    /// Checks the settings. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name`, `max_attempts` (0), `batch_size` (0 or over
    /// [`MAX_BATCH_SIZE`]) or `max_request_bytes` (below 4096).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let queue = etcd_coord::WorkQueue::builder(&session, "q").build()?;
    /// # Ok(()) }
    /// ```
    pub fn build(self) -> Result<WorkQueue> {
        validate_name("name", &self.name)?;
        if self.max_attempts == 0 {
            return Err(Error::invalid(
                "max_attempts",
                "must be at least 1 (a job must be delivered at least once)",
            ));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return Err(Error::invalid(
                "batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}"),
            ));
        }
        check_limit(self.max_request_bytes)?;
        let idle = Mutex::new(&self.session, format!("{}/idle", self.name))?;
        Ok(WorkQueue {
            inner: Arc::new(Shared {
                layout: Layout::new(&self.name),
                session: self.session,
                name: self.name,
                max_attempts: self.max_attempts,
                batch_size: self.batch_size,
                max_request_bytes: self.max_request_bytes,
                idle,
                hints: StdMutex::new(Hints::default()),
            }),
        })
    }
}

/// What the last read taught us, so that the next one can be a single request.
#[derive(Debug, Default, Clone)]
struct Hints {
    /// The bucket of the highest priority with a claimable job.
    bucket: Option<String>,
    /// How many jobs were in flight: a read lists that many more, so that claimed jobs do not
    /// crowd out claimable ones.
    in_flight: usize,
}

#[derive(Debug)]
struct Shared {
    session: Session,
    name: String,
    layout: Layout,
    max_attempts: u32,
    batch_size: usize,
    max_request_bytes: usize,
    /// The line of idle consumers: only its head watches the queue.
    idle: Mutex,
    hints: StdMutex<Hints>,
}

/// A claimable job as seen by a read.
#[derive(Debug, Clone)]
struct Candidate {
    key: String,
    id: String,
    mod_rev: i64,
    meta: Meta,
}

/// What one read saw.
#[derive(Debug, Default)]
struct Snapshot {
    revision: i64,
    in_flight: usize,
    /// Claimable jobs of the highest priority, oldest first.
    candidates: Vec<Candidate>,
    /// Delayed jobs whose time has come.
    due: Vec<Candidate>,
    /// When the next delayed job becomes visible.
    next_due: Option<SystemTime>,
}

/// The reads of one snapshot, as planned from the hints.
struct Plan {
    ops: Vec<TxnOp>,
    bucket: Option<String>,
}

enum Parsed {
    Ready(Snapshot),
    /// The hints changed (a new highest priority, more jobs in flight): read again. Carries
    /// the revision read, if any.
    Again(i64),
}

enum Attempt {
    Claimed(Vec<Claim>),
    /// Someone else was faster; the failure branch carried a fresh read, planned for this
    /// bucket.
    Lost(TxnResponse, Option<String>),
}

fn random_below(n: usize) -> usize {
    (uuid::Uuid::new_v4().as_u128() % n.max(1) as u128) as usize
}

/// An at-least-once job queue shared by every process that uses the same name: a job is
/// delivered until a consumer acknowledges it, and no job is lost when a consumer crashes.
///
/// # How it works
///
/// A job is two keys: its payload under `NAME/data/` and a small record under `NAME/jobs/`
/// (priority in the key, delivery count in the value). A consumer [`claim`](Self::claim)s a job
/// by creating `NAME/claims/<id>` bound to its session's lease, in the same transaction that
/// increments the job's delivery count; the job itself stays. [`Claim::ack`] deletes job and
/// claim, but only while the claim is still this consumer's (compare on the claim's create
/// revision, its fencing token); [`Claim::nack`] deletes only the claim, so the job is visible
/// again. If the consumer dies, its lease ends, the claim vanishes with it and the job is
/// delivered again; a late ack from the dead consumer fails with [`Error::NotHeld`] instead of
/// going through (Curator's CURATOR-605). Because the count lives with the job, it survives
/// consumer crashes; a job delivered [`max_attempts`](WorkQueueBuilder::max_attempts) times is
/// moved to `NAME/dead/` instead of being delivered again, where it can be listed and
/// requeued.
///
/// To make a job's result and its acknowledgement one atomic step, commit them together with
/// [`Claim::ack_with`], or make any write conditional on [`Job::is_owner`].
///
/// # Order
///
/// Higher priorities first; within a priority, the order in which jobs became visible (their
/// create revision). A single consumer sees exactly that order. A delayed job
/// ([`JobOptions::delay`]) waits under `NAME/delayed/` and joins its priority when its time
/// comes; a consumer moves it there and wakes for it with a timer.
///
/// # Competing consumers
///
/// Consumers do not all race for the head job: each reads a batch of claimable jobs and picks
/// one at random among the first `2 × jobs in flight + 1` (all of the batch after losing a
/// race), so with `n` busy consumers claims spread over about `2n` jobs. (So the order is
/// exact for a consumer that claims one job at a time alone, and approximate otherwise.) The
/// claim request carries the rest of the batch as fallbacks and takes the first job still free
/// when etcd runs it, so a claim fails only when every job of its read was taken meanwhile,
/// which a backlog makes rare however many consumers compete. Idle consumers queue up in a
/// line (a [`Mutex`](crate::Mutex) named `NAME/idle`) and only the first watches the queue; a
/// new job wakes one consumer, not all of them.
///
/// What it costs, in requests per job: push 1; claim 1 plus the read it picked from; ack 1.
/// That does not depend on the number of consumers while jobs wait (collisions add a small
/// fraction of a request); when consumers outnumber the jobs, those that find none spend a
/// failed claim or a turn in the idle line.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// use etcd_coord::etcd_client::TxnOp;
/// let queue = etcd_coord::WorkQueue::new(&session, "thumbnails")?;
/// queue.push("img-123.png").await?;
///
/// let claim = queue.claim().await?;
/// let result = format!("resized {}", String::from_utf8_lossy(claim.payload()));
/// // The result and the ack commit together, and only if the claim is still ours.
/// let key = format!("results/{}", claim.id());
/// claim.ack_with([TxnOp::put(key, result, None)]).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WorkQueue {
    inner: Arc<Shared>,
}

impl WorkQueue {
    /// A handle on the work queue `name` with the default settings. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` if it is not a valid name.
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let queue = etcd_coord::WorkQueue::new(&session, "emails")?;
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>) -> Result<WorkQueue> {
        Self::builder(session, name).build()
    }

    /// A builder with the defaults ([`DEFAULT_MAX_ATTEMPTS`], [`DEFAULT_BATCH_SIZE`],
    /// [`DEFAULT_MAX_REQUEST_BYTES`]).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let queue = etcd_coord::WorkQueue::builder(&session, "emails").max_attempts(3).build()?;
    /// # Ok(()) }
    /// ```
    pub fn builder(session: &Session, name: impl Into<String>) -> WorkQueueBuilder {
        WorkQueueBuilder {
            session: session.clone(),
            name: name.into(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            batch_size: DEFAULT_BATCH_SIZE,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    /// The queue's name.
    ///
    /// ```no_run
    /// # fn f(q: etcd_coord::WorkQueue) {
    /// println!("{}", q.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Adds a job, visible at once with priority 0, and returns its id.
    ///
    /// # Errors
    ///
    /// As [`push_with`](Self::push_with).
    ///
    /// # Cancel safety
    ///
    /// If dropped, the job may or may not have been pushed.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// let id = q.push(r#"{"to":"a@example.com"}"#).await?;
    /// # Ok(()) }
    /// ```
    pub async fn push(&self, job: impl Into<Vec<u8>>) -> Result<String> {
        self.push_with(job, JobOptions::new()).await
    }

    /// Adds a job with a priority and an optional delay, in one request, and returns its id.
    /// Transient errors are retried while the session lives; a retry never adds the job twice.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `job` if it does not fit in one etcd request
    /// ([`max_request_bytes`](WorkQueueBuilder::max_request_bytes)); the session's error if
    /// it ends; non-retryable etcd errors.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the job may or may not have been pushed.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// use etcd_coord::JobOptions;
    /// q.push_with("urgent", JobOptions::new().priority(100)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn push_with(&self, job: impl Into<Vec<u8>>, options: JobOptions) -> Result<String> {
        let s = &self.inner;
        let payload = job.into();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let meta = Meta {
            attempts: 0,
            priority: options.priority,
        };
        let at = options.visible_at();
        let key = match at {
            Some(at) => s.layout.delayed(at, &id),
            None => s.layout.job(meta.priority, &id),
        };
        let data = s.layout.data(&id);
        let value = meta.encode();
        check_size(
            "job",
            payload.len() + data.len() + key.len() + value.len(),
            s.max_request_bytes,
        )?;
        s.session.check_alive()?;
        // The id is fresh, so "data absent" makes a retry after a lost answer a no-op.
        let txn = Txn::new()
            .when([Compare::create_revision(data.as_str(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(data.as_str(), payload, None),
                TxnOp::put(key.as_str(), value, None),
            ]);
        let resp = retrying(&s.session, || {
            let mut client = s.session.client().clone();
            let txn = txn.clone();
            async move { s.session.request("pushing a job", client.txn(txn)).await }
        })
        .await?;
        tracing::debug!(
            queue = %s.name, id = %id, key = %key, revision = wait::revision(&resp).ok(),
            "job pushed"
        );
        Ok(id)
    }

    /// Claims the best visible job, waiting for one if there is none.
    ///
    /// While waiting, this consumer queues up behind other idle consumers (one watch for all
    /// of them), wakes when a job is pushed, becomes visible again (a nack, a dead consumer's
    /// claim expiring) or when the earliest delayed job's time comes. Along the way it moves
    /// due delayed jobs into the queue and jobs out of attempts into the dead letters.
    ///
    /// # Errors
    ///
    /// The session's error if it ends; non-retryable etcd errors; [`Error::Timeout`] or
    /// [`Error::Unavailable`] if etcd does not answer the claim itself (the claim, if it was
    /// made, is released in the background). Transient errors while reading and waiting are
    /// retried.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped `claim` takes nothing. Its place in the idle line is released in
    /// the background; the claim request runs in a task tracked by the session, and a claim
    /// that committed after the future was dropped is released there, so the job is visible
    /// again at once (its delivery count stays incremented).
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// loop {
    ///     let claim = q.claim().await?;
    ///     match process(claim.payload()).await {
    ///         Ok(()) => claim.ack().await?,
    ///         Err(_) => claim.nack().await?,
    ///     }
    /// }
    /// # }
    /// # async fn process(_: &[u8]) -> Result<(), ()> { Ok(()) }
    /// ```
    pub async fn claim(&self) -> Result<Claim> {
        let mut claims = self.claim_up_to(1, true).await?;
        claims
            .pop()
            .ok_or_else(|| Error::Conflict("a waiting claim returned no job".into()))
    }

    /// Claims up to `max` visible jobs in one transaction, waiting until there is at least
    /// one; they come in queue order. One read and one transaction for the lot, which is how
    /// the [`Consumer`] fills its free handler slots.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `max` unless it is between 1 and
    /// [`MAX_CLAIM_BATCH`]; otherwise as [`claim`](Self::claim).
    ///
    /// # Cancel safety
    ///
    /// As [`claim`](Self::claim): a dropped `claim_batch` takes nothing.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// for claim in q.claim_batch(8).await? {
    ///     claim.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn claim_batch(&self, max: usize) -> Result<Vec<Claim>> {
        if max == 0 || max > MAX_CLAIM_BATCH {
            return Err(Error::invalid(
                "max",
                format!("must be between 1 and {MAX_CLAIM_BATCH}"),
            ));
        }
        self.claim_up_to(max, true).await
    }

    /// Claims the best visible job, or returns `None` at once if there is none.
    ///
    /// # Errors
    ///
    /// As [`claim`](Self::claim).
    ///
    /// # Cancel safety
    ///
    /// As [`claim`](Self::claim).
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// while let Some(claim) = q.try_claim().await? {
    ///     claim.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_claim(&self) -> Result<Option<Claim>> {
        Ok(self.claim_up_to(1, false).await?.pop())
    }

    async fn claim_up_to(&self, max: usize, wait: bool) -> Result<Vec<Claim>> {
        let s = &self.inner;
        s.session.check_alive()?;
        let mut idle: Option<LockGuard> = None;
        let mut contended = false;
        let mut snap = self.read().await?;
        loop {
            if !snap.due.is_empty() {
                self.promote(&snap.due).await?;
                snap = self.read().await?;
                continue;
            }
            let picked = self.pick(&mut snap, max, contended);
            if !picked.is_empty() {
                let (spent, live): (Vec<_>, Vec<_>) = picked
                    .into_iter()
                    .partition(|c| c.meta.attempts >= s.max_attempts);
                for c in &spent {
                    self.bury(c).await?;
                }
                if live.is_empty() {
                    continue;
                }
                let chains = self.chains(live, &snap);
                match self.attempt(chains).await? {
                    Attempt::Claimed(claims) => return Ok(claims),
                    Attempt::Lost(resp, bucket) => {
                        contended = true;
                        snap = match self.parse(&resp, &bucket) {
                            Parsed::Ready(fresh) => fresh,
                            Parsed::Again(_) => self.read().await?,
                        };
                        continue;
                    }
                }
            }
            if !wait {
                return Ok(Vec::new());
            }
            if idle.is_none() {
                // Wait behind other idle consumers; whoever is first watches for all of us.
                tracing::debug!(queue = %s.name, "nothing to claim; joining the idle line");
                let guard = s.idle.lock().await?;
                let waited = guard.acquired_revision() != guard.fencing_token();
                idle = Some(guard);
                if waited {
                    // Others claimed in the meantime; start from what is there now.
                    snap = self.read().await?;
                    continue;
                }
                // First in line at once: the watch below starts right after our read.
            }
            self.wait_for_work(&snap).await?;
            snap = self.read().await?;
        }
    }

    /// Takes up to `max` candidates out of the snapshot, in queue order: chosen at random
    /// among the first `2 × in flight + max` (the whole batch after a lost race). A lone
    /// consumer thus takes the head, and `n` busy ones spread over about `2n` jobs, so that
    /// two of them rarely pick the same one.
    fn pick(&self, snap: &mut Snapshot, max: usize, contended: bool) -> Vec<Candidate> {
        let n = snap.candidates.len();
        let window = if contended {
            n
        } else {
            n.min(snap.in_flight.saturating_mul(2).saturating_add(max))
        };
        let mut indices: Vec<usize> = (0..window).collect();
        let take = max.min(window);
        for i in 0..take {
            let j = i + random_below(window - i);
            indices.swap(i, j);
        }
        indices.truncate(take);
        indices.sort_unstable();
        let mut picked: Vec<Candidate> = indices
            .iter()
            .rev()
            .map(|&i| snap.candidates.remove(i))
            .collect();
        picked.reverse();
        picked
    }

    /// Gives each picked candidate a chain of fallbacks: the claimable jobs left in the
    /// snapshot, oldest first, dealt out in turn so that no job is in two chains. A claim takes
    /// the first job of its chain that is still free when etcd runs it, so consumers that read
    /// the same jobs and pick the same one do not lose the race (it would cost another
    /// request): they get the next one instead.
    fn chains(&self, picked: Vec<Candidate>, snap: &Snapshot) -> Vec<Vec<Candidate>> {
        let max_attempts = self.inner.max_attempts;
        let mut chains: Vec<Vec<Candidate>> = picked.into_iter().map(|c| vec![c]).collect();
        let spares = snap
            .candidates
            .iter()
            .filter(|c| c.meta.attempts < max_attempts)
            .take(MAX_FALLBACKS);
        let n = chains.len().max(1);
        for (i, c) in spares.enumerate() {
            if let Some(chain) = chains.get_mut(i % n) {
                chain.push(c.clone());
            }
        }
        chains
    }

    fn plan_from_hints(&self) -> Plan {
        let s = &self.inner;
        let hints = s.hints.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let limit = (s.batch_size + hints.in_flight) as i64;
        let range = |start: &str| GetOptions::new().with_range(prefix_end(start.as_bytes()));
        let mut ops = vec![
            TxnOp::get(
                s.layout.claims.as_str(),
                Some(range(&s.layout.claims).with_keys_only()),
            ),
            TxnOp::get(
                s.layout.jobs.as_str(),
                Some(
                    range(&s.layout.jobs)
                        .with_sort(SortTarget::Key, SortOrder::Ascend)
                        .with_keys_only()
                        .with_limit(limit),
                ),
            ),
            TxnOp::get(
                s.layout.delayed.as_str(),
                Some(
                    range(&s.layout.delayed)
                        .with_sort(SortTarget::Key, SortOrder::Ascend)
                        .with_limit(PROMOTE_BATCH),
                ),
            ),
        ];
        if let Some(bucket) = &hints.bucket {
            ops.push(TxnOp::get(
                bucket.as_str(),
                Some(
                    range(bucket)
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(limit),
                ),
            ));
        }
        Plan {
            ops,
            bucket: hints.bucket,
        }
    }

    /// One request in the usual case: claims, the first jobs by key (to find the highest
    /// priority with a claimable job), the oldest jobs of that priority, the next delayed jobs.
    async fn read(&self) -> Result<Snapshot> {
        let s = &self.inner;
        let mut revision = 0;
        for _ in 0..MAX_REREADS {
            let plan = self.plan_from_hints();
            let txn = Txn::new().and_then(plan.ops);
            let resp = retrying(&s.session, || {
                let mut client = s.session.client().clone();
                let txn = txn.clone();
                async move {
                    s.session
                        .request("reading a work queue", client.txn(txn))
                        .await
                }
            })
            .await?;
            match self.parse(&resp, &plan.bucket) {
                Parsed::Ready(snap) => return Ok(snap),
                Parsed::Again(rev) => revision = rev.max(revision),
            }
        }
        if revision == 0 {
            return Err(Error::Etcd {
                message: "unexpected reply from etcd: malformed work queue reads".into(),
                source: None,
                retryable: false,
            });
        }
        // The queue keeps changing under us: wait for the next change and look again.
        Ok(Snapshot {
            revision,
            ..Snapshot::default()
        })
    }

    fn parse(&self, resp: &TxnResponse, bucket: &Option<String>) -> Parsed {
        let s = &self.inner;
        let Ok(revision) = wait::revision(resp) else {
            return Parsed::Again(0);
        };
        let reads = wait::gets(resp);
        let (Some(claims), Some(probe), Some(delayed)) =
            (reads.first(), reads.get(1), reads.get(2))
        else {
            return Parsed::Again(revision);
        };
        let claimed: HashSet<&str> = claims.kvs().iter().map(|kv| id_of(kv.key())).collect();
        let mut hints = s.hints.lock().unwrap_or_else(|p| p.into_inner());
        let grew = claimed.len() > hints.in_flight;
        hints.in_flight = claimed.len();
        let now = SystemTime::now();
        let mut due = Vec::new();
        let mut next_due = None;
        for kv in delayed.kvs() {
            let Some(at) = visible_at(&s.layout, kv.key()) else {
                continue;
            };
            if at > now {
                next_due = Some(next_due.map_or(at, |n: SystemTime| n.min(at)));
                break;
            }
            if let Some(c) = candidate(kv) {
                due.push(c);
            }
        }
        let top = probe
            .kvs()
            .iter()
            .find(|kv| !claimed.contains(id_of(kv.key())))
            .and_then(|kv| {
                std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| s.layout.bucket_of(k))
            });
        let mut snap = Snapshot {
            revision,
            in_flight: claimed.len(),
            candidates: Vec::new(),
            due,
            next_due,
        };
        let Some(top) = top else {
            if probe.more() && grew {
                return Parsed::Again(revision);
            }
            return Parsed::Ready(snap);
        };
        if bucket.as_deref() != Some(top) {
            tracing::debug!(queue = %s.name, bucket = top, "highest priority changed; re-reading");
            hints.bucket = Some(top.to_string());
            return Parsed::Again(revision);
        }
        let Some(oldest) = reads.get(3) else {
            return Parsed::Again(revision);
        };
        snap.candidates = oldest
            .kvs()
            .iter()
            .filter(|kv| !claimed.contains(id_of(kv.key())))
            .filter_map(candidate)
            .collect();
        if snap.candidates.is_empty() && oldest.more() && grew {
            return Parsed::Again(revision);
        }
        Parsed::Ready(snap)
    }

    /// One transaction for all of `chains`: for each chain, create the claim (bound to our
    /// lease) of its first job that nobody claimed or changed since we read it, count the
    /// delivery and read the payload (nested transactions, each job's in the failure branch of
    /// the one before, so that each chain succeeds on its own and takes at most one job); then
    /// read a fresh snapshot, used if every chain was lost.
    async fn attempt(&self, chains: Vec<Vec<Candidate>>) -> Result<Attempt> {
        let s = self.inner.clone();
        let session = s.session.clone();
        let lease = session.lease_id();
        let mut ops = Vec::new();
        let mut tags = Vec::new();
        for chain in &chains {
            let mut fallback: Option<TxnOp> = None;
            let mut chain_tags = Vec::new();
            for c in chain.iter().rev() {
                let claim_key = s.layout.claim(&c.id);
                let tag = format!("{lease:x}_{:016x}", uuid::Uuid::new_v4().as_u128() as u64);
                let meta = Meta {
                    attempts: c.meta.attempts.saturating_add(1),
                    ..c.meta
                };
                let mut txn = Txn::new()
                    .when([
                        Compare::create_revision(claim_key.as_str(), CompareOp::Equal, 0),
                        Compare::mod_revision(c.key.as_str(), CompareOp::Equal, c.mod_rev),
                    ])
                    .and_then([
                        TxnOp::put(
                            claim_key.as_str(),
                            tag.as_str(),
                            Some(PutOptions::new().with_lease(lease)),
                        ),
                        TxnOp::put(c.key.as_str(), meta.encode(), None),
                        TxnOp::get(s.layout.data(&c.id), None),
                    ]);
                if let Some(next) = fallback.take() {
                    txn = txn.or_else([next]);
                }
                fallback = Some(TxnOp::txn(txn));
                chain_tags.push((claim_key, tag));
            }
            chain_tags.reverse();
            ops.extend(fallback);
            tags.push(chain_tags);
        }
        let plan = self.plan_from_hints();
        ops.extend(plan.ops);
        let txn = Txn::new().and_then(ops);
        let bucket = plan.bucket;
        detached(&session.clone(), async move {
            let mut client = session.client().clone();
            let sent = session.request("claiming jobs", client.txn(txn)).await;
            let (resp, token) = match sent.and_then(|r| wait::revision(&r).map(|t| (r, t))) {
                Ok(answer) => answer,
                Err(e) => {
                    // Claims may have committed: find out in the background and undo them.
                    for (key, tag) in tags.into_iter().flatten() {
                        release_unknown_claim(&session, key, tag);
                    }
                    return Err(e);
                }
            };
            let mut claims = Vec::new();
            for ((chain, chain_tags), r) in chains.into_iter().zip(tags).zip(resp.op_responses()) {
                let mut level = r;
                for (c, (claim_key, _)) in chain.into_iter().zip(chain_tags) {
                    let TxnOpResponse::Txn(inner) = level else { break };
                    if !inner.succeeded() {
                        tracing::debug!(queue = %s.name, id = %c.id, "job claimed by someone else");
                        match inner.op_responses().into_iter().next() {
                            Some(next) => {
                                level = next;
                                continue;
                            }
                            None => break,
                        }
                    }
                    let payload = wait::gets(&inner)
                        .first()
                        .and_then(|g| g.kvs().first())
                        .map(|kv| kv.value().to_vec());
                    if payload.is_none() {
                        tracing::warn!(queue = %s.name, id = %c.id, "job has no payload; delivering it empty");
                    }
                    let meta = Meta {
                        attempts: c.meta.attempts.saturating_add(1),
                        ..c.meta
                    };
                    tracing::debug!(
                        queue = %s.name, id = %c.id, key = %claim_key, token, attempt = meta.attempts,
                        "job claimed"
                    );
                    claims.push(Claim {
                        job: Job {
                            session: session.clone(),
                            id: c.id,
                            payload: payload.unwrap_or_default().into(),
                            attempt: meta.attempts,
                            claim_key,
                            token,
                        },
                        queue: s.clone(),
                        job_key: c.key,
                        meta,
                        done: false,
                    });
                    break;
                }
            }
            if claims.is_empty() {
                return Ok(Attempt::Lost(resp, bucket));
            }
            Ok(Attempt::Claimed(claims))
        })
        .await?
    }

    /// Moves a job that used up its attempts to the dead letters (if nobody claimed it).
    async fn bury(&self, c: &Candidate) -> Result<()> {
        let s = &self.inner;
        let claim_key = s.layout.claim(&c.id);
        let txn = Txn::new()
            .when([
                Compare::create_revision(claim_key.as_str(), CompareOp::Equal, 0),
                Compare::mod_revision(c.key.as_str(), CompareOp::Equal, c.mod_rev),
            ])
            .and_then([
                TxnOp::delete(c.key.as_str(), None),
                TxnOp::put(s.layout.dead(&c.id), c.meta.encode(), None),
            ]);
        let mut client = s.session.client().clone();
        let resp = s
            .session
            .request("moving a job to the dead letters", client.txn(txn))
            .await?;
        tracing::debug!(
            queue = %s.name, id = %c.id, attempts = c.meta.attempts, moved = resp.succeeded(),
            "job out of attempts; dead-lettered"
        );
        Ok(())
    }

    /// Moves due delayed jobs into the queue, each only if unchanged since read (one request).
    async fn promote(&self, due: &[Candidate]) -> Result<()> {
        let s = &self.inner;
        let moves = due.iter().map(|d| {
            TxnOp::txn(
                Txn::new()
                    .when([Compare::mod_revision(
                        d.key.as_str(),
                        CompareOp::Equal,
                        d.mod_rev,
                    )])
                    .and_then([
                        TxnOp::delete(d.key.as_str(), None),
                        TxnOp::put(s.layout.job(d.meta.priority, &d.id), d.meta.encode(), None),
                    ]),
            )
        });
        let txn = Txn::new().and_then(moves.collect::<Vec<_>>());
        let mut client = s.session.client().clone();
        s.session
            .request("moving due delayed jobs", client.txn(txn))
            .await?;
        tracing::debug!(queue = %s.name, jobs = due.len(), "due delayed jobs moved into the queue");
        Ok(())
    }

    /// Waits (as head of the idle line) until something may be claimable: a new job, a claim
    /// gone without its job (nack, expired consumer), or the earliest delayed job's time.
    async fn wait_for_work(&self, snap: &Snapshot) -> Result<()> {
        let s = &self.inner;
        let mut timer = snap.next_due;
        let watched = async {
            let mut watch =
                wait::watch_prefix(&s.session, &s.layout.root, snap.revision + 1).await?;
            tracing::debug!(queue = %s.name, revision = snap.revision, next_due = ?timer, "waiting for work");
            loop {
                let sleep = timer
                    .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
                    .unwrap_or(MAX_TIMER)
                    .min(MAX_TIMER);
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => return Ok(()),
                    events = watch.next() => match events? {
                        None => return Ok(()),
                        Some(events) => if wakes(&s.layout, &events, &mut timer) {
                            return Ok(());
                        },
                    },
                }
            }
        };
        let result: Result<()> = tokio::select! {
            state = s.session.lost() => Err(state.error().unwrap_or(Error::SessionClosed)),
            r = watched => r,
        };
        match result {
            Err(e) if e.is_retryable() => {
                tracing::debug!(queue = %s.name, error = %e, "watch failed; re-reading");
                let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
                tokio::select! {
                    state = s.session.lost() => Err(state.error().unwrap_or(e)),
                    _ = tokio::time::sleep(backoff.next_delay()) => Ok(()),
                }
            }
            other => other,
        }
    }

    /// Counts of the queue's jobs now (one request).
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
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// let stats = q.stats().await?;
    /// println!("{} ready, {} in flight", stats.ready, stats.in_flight);
    /// # Ok(()) }
    /// ```
    pub async fn stats(&self) -> Result<QueueStats> {
        let s = &self.inner;
        let count = |p: &str| {
            TxnOp::get(
                p,
                Some(
                    GetOptions::new()
                        .with_range(prefix_end(p.as_bytes()))
                        .with_count_only(),
                ),
            )
        };
        let txn = Txn::new().and_then([
            count(&s.layout.jobs),
            count(&s.layout.claims),
            count(&s.layout.delayed),
            count(&s.layout.dead),
        ]);
        let mut client = s.session.client().clone();
        let resp = s
            .session
            .request("counting a work queue", client.txn(txn))
            .await?;
        let n: Vec<u64> = wait::gets(&resp)
            .iter()
            .map(|g| g.count().max(0) as u64)
            .collect();
        let at = |i: usize| n.get(i).copied().unwrap_or(0);
        Ok(QueueStats {
            ready: at(0).saturating_sub(at(1)),
            in_flight: at(1),
            delayed: at(2),
            dead: at(3),
        })
    }

    /// The oldest dead letters, at most `limit` (two requests).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `limit` if it is 0; etcd errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// for dead in q.dead_letters(100).await? {
    ///     eprintln!("job {} failed {} times", dead.id, dead.attempts);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Err(Error::invalid("limit", "must be at least 1"));
        }
        let s = &self.inner;
        let mut client = s.session.client().clone();
        let list = s
            .session
            .request(
                "listing dead letters",
                client.get(
                    s.layout.dead.as_str(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_sort(SortTarget::Create, SortOrder::Ascend)
                            .with_limit(limit.min(i64::MAX as usize) as i64),
                    ),
                ),
            )
            .await?;
        let mut letters = Vec::new();
        for chunk in list.kvs().chunks(64) {
            let txn = Txn::new().and_then(
                chunk
                    .iter()
                    .map(|kv| TxnOp::get(s.layout.data(id_of(kv.key())), None))
                    .collect::<Vec<_>>(),
            );
            let resp = s
                .session
                .request("reading dead letters", client.txn(txn))
                .await?;
            for (kv, data) in chunk.iter().zip(wait::gets(&resp)) {
                let meta = Meta::decode(kv.value()).unwrap_or(Meta {
                    attempts: 0,
                    priority: 0,
                });
                letters.push(DeadLetter {
                    id: id_of(kv.key()).to_string(),
                    attempts: meta.attempts,
                    priority: meta.priority,
                    payload: data
                        .kvs()
                        .first()
                        .map(|kv| kv.value().to_vec())
                        .unwrap_or_default(),
                });
            }
        }
        Ok(letters)
    }

    /// Moves a dead letter back into the queue with a fresh delivery count, at the back of its
    /// priority. `Ok(false)` if there is no dead letter with this id.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `id` if it cannot be a job id; etcd errors.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the job may or may not have been requeued; it is never duplicated.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// for dead in q.dead_letters(100).await? {
    ///     q.requeue_dead_letter(&dead.id).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn requeue_dead_letter(&self, id: &str) -> Result<bool> {
        validate_id(id)?;
        let s = &self.inner;
        let dead = s.layout.dead(id);
        let mut client = s.session.client().clone();
        loop {
            let resp = s
                .session
                .request("reading a dead letter", client.get(dead.as_str(), None))
                .await?;
            let Some(kv) = resp.kvs().first() else {
                return Ok(false);
            };
            let meta = Meta::decode(kv.value()).unwrap_or(Meta {
                attempts: 0,
                priority: 0,
            });
            let fresh = Meta {
                attempts: 0,
                ..meta
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    dead.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([
                    TxnOp::delete(dead.as_str(), None),
                    TxnOp::put(s.layout.job(meta.priority, id), fresh.encode(), None),
                ]);
            let moved = s
                .session
                .request("requeueing a dead letter", client.txn(txn))
                .await?;
            if moved.succeeded() {
                tracing::debug!(queue = %s.name, id, "dead letter requeued");
                return Ok(true);
            }
        }
    }

    /// Deletes a dead letter and its payload for good. `Ok(false)` if there is none with this
    /// id.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `id` if it cannot be a job id; etcd errors.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the dead letter may or may not have been deleted.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue, id: String) -> etcd_coord::Result<()> {
    /// q.delete_dead_letter(&id).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete_dead_letter(&self, id: &str) -> Result<bool> {
        validate_id(id)?;
        let s = &self.inner;
        let dead = s.layout.dead(id);
        let txn = Txn::new()
            .when([Compare::version(dead.as_str(), CompareOp::Greater, 0)])
            .and_then([
                TxnOp::delete(dead.as_str(), None),
                TxnOp::delete(s.layout.data(id), None),
            ]);
        let mut client = s.session.client().clone();
        let resp = s
            .session
            .request("deleting a dead letter", client.txn(txn))
            .await?;
        Ok(resp.succeeded())
    }

    /// A consumer that runs a handler per job on this queue; see [`Consumer`].
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// q.consumer()
    ///     .concurrency(8)
    ///     .run(|job| async move {
    ///         println!("{:?}", job.payload());
    ///         Ok::<_, std::io::Error>(Vec::new())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn consumer(&self) -> Consumer {
        Consumer {
            queue: self.clone(),
            concurrency: 1,
            retry_delay: Duration::ZERO,
        }
    }
}

fn candidate(kv: &KeyValue) -> Option<Candidate> {
    let key = std::str::from_utf8(kv.key()).ok()?.to_string();
    let Some(meta) = Meta::decode(kv.value()) else {
        tracing::warn!(key = %key, "skipping a job record that is not ours");
        return None;
    };
    Some(Candidate {
        id: id_of(kv.key()).to_string(),
        key,
        mod_rev: kv.mod_revision(),
        meta,
    })
}

/// Whether a batch of events (all of one revision) may have made a job claimable; also
/// brings the timer forward for delayed jobs pushed meanwhile.
fn wakes(layout: &Layout, events: &[Event], timer: &mut Option<SystemTime>) -> bool {
    // An ack or a dead-lettering deletes claim and job together; only a claim that goes alone
    // (nack, expired consumer) makes its job visible again.
    let jobs_gone: HashSet<&str> = events
        .iter()
        .filter(|e| e.event_type() == EventType::Delete)
        .filter_map(|e| e.kv())
        .filter(|kv| kv.key().starts_with(layout.jobs.as_bytes()))
        .map(|kv| id_of(kv.key()))
        .collect();
    for e in events {
        let Some(kv) = e.kv() else { continue };
        let key = kv.key();
        match e.event_type() {
            // A new job (a claim also writes the job record, but keeps its create revision).
            EventType::Put
                if key.starts_with(layout.jobs.as_bytes())
                    && kv.create_revision() == kv.mod_revision() =>
            {
                return true
            }
            EventType::Put if key.starts_with(layout.delayed.as_bytes()) => {
                if let Some(at) = visible_at(layout, key) {
                    if at <= SystemTime::now() {
                        return true;
                    }
                    *timer = Some(timer.map_or(at, |t| t.min(at)));
                }
            }
            EventType::Delete
                if key.starts_with(layout.claims.as_bytes()) && !jobs_gone.contains(id_of(key)) =>
            {
                return true
            }
            _ => {}
        }
    }
    false
}

/// The claim request's answer was lost: if the claim exists with our tag, release it (fenced
/// by the create revision we find), so the job does not wait for our lease to end.
fn release_unknown_claim(session: &Session, key: String, tag: String) {
    let s = session.clone();
    let bound = session.ttl().max(Duration::from_secs(10));
    session.spawn_background(async move {
        let find = async {
            let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
            loop {
                let mut client = s.client().clone();
                match s
                    .request("looking for an unanswered claim", client.get(key.as_str(), None))
                    .await
                {
                    Ok(resp) => {
                        return resp
                            .kvs()
                            .first()
                            .filter(|kv| kv.value() == tag.as_bytes())
                            .map(|kv| kv.create_revision())
                    }
                    Err(e) if e.is_retryable() => tokio::time::sleep(backoff.next_delay()).await,
                    Err(_) => return None,
                }
            }
        };
        if let Ok(Some(rev)) = tokio::time::timeout(bound, find).await {
            tracing::debug!(key = %key, create_rev = rev, "unanswered claim had committed; releasing it");
            wait::release_in_background(&s, key, Some(rev));
        }
    });
}

/// Counts of a [`WorkQueue`]'s jobs; see [`WorkQueue::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct QueueStats {
    /// Visible and not claimed.
    pub ready: u64,
    /// Claimed by a consumer and not yet acknowledged.
    pub in_flight: u64,
    /// Waiting for their visibility time.
    pub delayed: u64,
    /// In the dead letters.
    pub dead: u64,
}

/// A job that used up its attempts; see [`WorkQueue::dead_letters`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The job's id.
    pub id: String,
    /// How often it was delivered.
    pub attempts: u32,
    /// Its priority.
    pub priority: u16,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// A claimed job as a handler sees it: payload, delivery count, and what it needs to make its
/// own writes conditional on still holding the claim.
///
/// Cheap to clone. Holding a `Job` does not keep the claim: the [`Claim`] does.
#[derive(Clone)]
pub struct Job {
    session: Session,
    id: String,
    payload: Arc<[u8]>,
    attempt: u32,
    claim_key: String,
    token: i64,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("payload_len", &self.payload.len())
            .field("attempt", &self.attempt)
            .field("claim_key", &self.claim_key)
            .field("token", &self.token)
            .finish()
    }
}

impl Job {
    /// The job's id, as returned by [`WorkQueue::push`].
    ///
    /// ```no_run
    /// # fn f(job: etcd_coord::Job) {
    /// println!("working on {}", job.id());
    /// # }
    /// ```
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The payload.
    ///
    /// ```no_run
    /// # fn f(job: etcd_coord::Job) {
    /// let text = String::from_utf8_lossy(job.payload());
    /// # }
    /// ```
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Which delivery this is: 1 the first time, counted across consumers and their crashes.
    ///
    /// ```no_run
    /// # fn f(job: etcd_coord::Job) {
    /// if job.attempt() > 1 { eprintln!("retrying {}", job.id()); }
    /// # }
    /// ```
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The fencing token: the create revision of the claim key. A later claim of the same job
    /// (after this one was lost) has a larger token; pass it to the systems you write to so
    /// they can reject a late writer.
    ///
    /// ```no_run
    /// # fn f(job: etcd_coord::Job) {
    /// let token: i64 = job.fencing_token();
    /// # }
    /// ```
    pub fn fencing_token(&self) -> i64 {
        self.token
    }

    /// A comparison true only while this claim still exists, for your own transactions.
    ///
    /// ```no_run
    /// # async fn f(job: etcd_coord::Job, mut client: etcd_client::Client) -> Result<(), etcd_client::Error> {
    /// use etcd_client::{Txn, TxnOp};
    /// let txn = Txn::new().when([job.is_owner()]).and_then([TxnOp::put("progress", "50%", None)]);
    /// client.txn(txn).await?;
    /// # Ok(()) }
    /// ```
    pub fn is_owner(&self) -> Compare {
        Compare::create_revision(self.claim_key.as_str(), CompareOp::Equal, self.token)
    }

    /// Runs `txn` only while this claim still exists, atomically: it is nested inside a
    /// transaction whose only compare is [`is_owner`](Self::is_owner), and its response is
    /// returned as if you had sent it yourself.
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] if the claim is gone (nothing of `txn` ran); etcd errors.
    ///
    /// # Cancel safety
    ///
    /// If dropped after sending, the transaction may or may not have committed.
    ///
    /// ```no_run
    /// # async fn f(job: etcd_coord::Job) -> etcd_coord::Result<()> {
    /// use etcd_coord::etcd_client::{Txn, TxnOp};
    /// job.txn(Txn::new().and_then([TxnOp::put("progress", "50%", None)])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        owner_txn(&self.session, vec![self.is_owner()], txn)
            .await?
            .ok_or_else(|| Error::NotHeld {
                key: self.claim_key.clone(),
            })
    }
}

/// A job this consumer has claimed: proof that it is the one delivery of the job in flight.
///
/// Finish it with [`ack`](Self::ack) (done: the job is deleted), [`ack_with`](Self::ack_with)
/// (done, and your writes commit in the same transaction) or [`nack`](Self::nack) (not done:
/// deliver it again). All three are fenced: they commit only while the claim is still ours,
/// and fail with [`Error::NotHeld`] once it is gone (our session ended; the job may already be
/// with another consumer). Dropping a claim without finishing it nacks it in the background.
///
/// A claim dereferences to its [`Job`] (payload, attempt, fencing token, owner-only
/// transactions).
///
/// ```no_run
/// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
/// let claim = q.claim().await?;
/// println!("job {} attempt {}", claim.id(), claim.attempt());
/// claim.ack().await?;
/// # Ok(()) }
/// ```
#[must_use = "dropping a claim makes the job visible again"]
pub struct Claim {
    job: Job,
    queue: Arc<Shared>,
    job_key: String,
    meta: Meta,
    done: bool,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("job", &self.job)
            .field("job_key", &self.job_key)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Claim {
    type Target = Job;
    fn deref(&self) -> &Job {
        &self.job
    }
}

impl Claim {
    /// The claimed job.
    ///
    /// ```no_run
    /// # fn f(claim: etcd_coord::Claim) {
    /// let job: etcd_coord::Job = claim.job().clone();
    /// # }
    /// ```
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Marks the job done: deletes it and the claim in one transaction, only while the claim is
    /// ours.
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] if the claim is gone (nothing was deleted; the job is or will be
    /// delivered again); etcd errors, after which the claim is released in the background.
    ///
    /// # Cancel safety
    ///
    /// If dropped in flight, the ack may or may not have committed; if it did not, the claim
    /// is released in the background and the job is delivered again.
    ///
    /// ```no_run
    /// # async fn f(claim: etcd_coord::Claim) -> etcd_coord::Result<()> {
    /// claim.ack().await?;
    /// # Ok(()) }
    /// ```
    pub async fn ack(self) -> Result<()> {
        self.ack_with([]).await
    }

    /// Marks the job done and commits `ops` in the same transaction, only while the claim is
    /// ours: a result recorded this way is recorded exactly once per job.
    ///
    /// `ops` must not touch the queue's own keys (etcd rejects a transaction that writes one
    /// key twice).
    ///
    /// # Errors
    ///
    /// As [`ack`](Self::ack); nothing of `ops` ran if the claim was gone.
    ///
    /// # Cancel safety
    ///
    /// As [`ack`](Self::ack).
    ///
    /// ```no_run
    /// # async fn f(claim: etcd_coord::Claim) -> etcd_coord::Result<()> {
    /// use etcd_coord::etcd_client::TxnOp;
    /// let key = format!("results/{}", claim.id());
    /// claim.ack_with([TxnOp::put(key, "ok", None)]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ack_with(self, ops: impl IntoIterator<Item = TxnOp>) -> Result<()> {
        let q = &self.queue;
        let mut all = vec![
            TxnOp::delete(self.job.claim_key.as_str(), None),
            TxnOp::delete(self.job_key.as_str(), None),
            TxnOp::delete(q.layout.data(&self.job.id), None),
        ];
        all.extend(ops);
        self.finish("acked", all).await
    }

    /// Gives the job back to be delivered again at once (keeping its place in the queue), or
    /// moves it to the dead letters if this was its last attempt.
    ///
    /// # Errors
    ///
    /// As [`ack`](Self::ack).
    ///
    /// # Cancel safety
    ///
    /// If dropped, the claim is released in the background, which has the same effect.
    ///
    /// ```no_run
    /// # async fn f(claim: etcd_coord::Claim) -> etcd_coord::Result<()> {
    /// claim.nack().await?;
    /// # Ok(()) }
    /// ```
    pub async fn nack(self) -> Result<()> {
        self.nack_after(Duration::ZERO).await
    }

    /// Gives the job back to be delivered again after `delay` (it then joins the back of its
    /// priority), or moves it to the dead letters if this was its last attempt.
    ///
    /// # Errors
    ///
    /// As [`ack`](Self::ack).
    ///
    /// # Cancel safety
    ///
    /// If dropped, the claim is released in the background and the job is visible at once.
    ///
    /// ```no_run
    /// # async fn f(claim: etcd_coord::Claim) -> etcd_coord::Result<()> {
    /// claim.nack_after(std::time::Duration::from_secs(30)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn nack_after(self, delay: Duration) -> Result<()> {
        let q = &self.queue;
        let id = &self.job.id;
        let mut ops = vec![TxnOp::delete(self.job.claim_key.as_str(), None)];
        let (what, moved) = if self.meta.attempts >= q.max_attempts {
            ("dead-lettered", Some(q.layout.dead(id)))
        } else if delay.is_zero() {
            ("nacked", None)
        } else {
            let at = SystemTime::now()
                .checked_add(delay)
                .unwrap_or(UNIX_EPOCH + Duration::from_millis(u64::MAX));
            ("nacked with a delay", Some(q.layout.delayed(at, id)))
        };
        if let Some(to) = moved {
            ops.push(TxnOp::delete(self.job_key.as_str(), None));
            ops.push(TxnOp::put(to, self.meta.encode(), None));
        }
        self.finish(what, ops).await
    }

    async fn finish(mut self, what: &'static str, ops: Vec<TxnOp>) -> Result<()> {
        let result = self.job.txn(Txn::new().and_then(ops)).await;
        match &result {
            Ok(_) | Err(Error::NotHeld { .. }) => self.done = true,
            // The outcome is unknown: Drop releases the claim, a no-op if it committed.
            Err(_) => {}
        }
        tracing::debug!(
            queue = %self.queue.name, id = %self.job.id, token = self.job.token,
            ok = result.is_ok(), "{what}"
        );
        result.map(|_| ())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            tracing::debug!(key = %self.job.claim_key, "claim dropped unfinished; releasing it");
            wait::release_in_background(
                &self.job.session,
                self.job.claim_key.clone(),
                Some(self.job.token),
            );
        }
    }
}

type ClaimFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<Claim>>> + Send + 'a>>;

/// Runs a handler for each job of a [`WorkQueue`], at most `concurrency` at a time, and acks or
/// nacks each job from the handler's result.
///
/// The handler gets the [`Job`] and returns `Ok(ops)` to acknowledge it, committing `ops`
/// (your result records, possibly none) in the same fenced transaction as the ack, or `Err(e)`
/// to nack it (it is delivered again after [`retry_delay`](Self::retry_delay), or moves to the
/// dead letters once out of attempts). A handler that panics has its job released and
/// delivered again. If the claim is lost while the handler runs (the session expired), the ack
/// fails and the job is delivered to someone else; the handler's `ops` never commit twice.
///
/// ```no_run
/// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
/// use etcd_coord::etcd_client::TxnOp;
/// let shutdown = tokio::signal::ctrl_c();
/// q.consumer()
///     .concurrency(4)
///     .run_until(async { let _ = shutdown.await; }, |job| async move {
///         let out = format!("{} bytes", job.payload().len());
///         Ok::<_, std::io::Error>(vec![TxnOp::put(format!("results/{}", job.id()), out, None)])
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Consumer {
    queue: WorkQueue,
    concurrency: usize,
    retry_delay: Duration,
}

impl Consumer {
    /// How many handlers may run at once (default 1). Checked by `run`: 0 is an
    /// [`Error::InvalidArgument`] naming `concurrency`.
    ///
    /// ```no_run
    /// # fn f(q: etcd_coord::WorkQueue) {
    /// let c = q.consumer().concurrency(16);
    /// # }
    /// ```
    pub fn concurrency(mut self, handlers: usize) -> Self {
        self.concurrency = handlers;
        self
    }

    /// How long a failed job waits before it is delivered again (default 0: at once).
    ///
    /// ```no_run
    /// # fn f(q: etcd_coord::WorkQueue) {
    /// let c = q.consumer().retry_delay(std::time::Duration::from_secs(10));
    /// # }
    /// ```
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Runs until the session ends (or a non-retryable error); see
    /// [`run_until`](Self::run_until).
    ///
    /// # Errors
    ///
    /// As [`run_until`](Self::run_until).
    ///
    /// # Cancel safety
    ///
    /// As [`run_until`](Self::run_until).
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// q.consumer().run(|job| async move { Ok::<_, String>(Vec::new()) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn run<F, Fut, E>(self, handler: F) -> Result<()>
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Vec<TxnOp>, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        self.run_until(std::future::pending::<()>(), handler).await
    }

    /// Claims and handles jobs until `shutdown` completes, then stops claiming, waits for the
    /// handlers that are running and finishes their jobs, and returns `Ok(())`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `concurrency` if it is 0; the session's error if it
    /// ends; non-retryable etcd errors from claiming. In every case the running handlers are
    /// waited for first. Errors of single acks and nacks are logged (`tracing` warnings), not
    /// returned: their jobs are delivered again.
    ///
    /// # Cancel safety
    ///
    /// If dropped, running handlers are aborted and their claims released in the background,
    /// so their jobs are delivered again; nothing is lost.
    ///
    /// ```no_run
    /// # async fn f(q: etcd_coord::WorkQueue) -> etcd_coord::Result<()> {
    /// let stop = tokio::time::sleep(std::time::Duration::from_secs(60));
    /// q.consumer().run_until(stop, |job| async move { Ok::<_, String>(Vec::new()) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn run_until<S, F, Fut, E>(self, shutdown: S, handler: F) -> Result<()>
    where
        S: Future,
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Vec<TxnOp>, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        if self.concurrency == 0 {
            return Err(Error::invalid("concurrency", "must be at least 1"));
        }
        let handler = Arc::new(handler);
        let queue = self.queue.clone();
        let name = queue.name().to_string();
        let mut tasks = JoinSet::new();
        let mut claiming: Option<ClaimFuture<'_>> = None;
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        tokio::pin!(shutdown);
        let result = loop {
            // One claim at a time, kept across loop turns so that a finishing handler does
            // not cost it its place in the idle line.
            if claiming.is_none() && tasks.len() < self.concurrency {
                let free = (self.concurrency - tasks.len()).min(MAX_CLAIM_BATCH);
                claiming = Some(Box::pin(queue.claim_up_to(free, true)));
            }
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = done {
                        tracing::warn!(queue = %name, error = %e, "job handler panicked; its job will be delivered again");
                    }
                }
                claimed = async { claiming.as_mut().expect("guarded by the branch condition").await }, if claiming.is_some() => {
                    claiming = None;
                    match claimed {
                        Ok(claims) => {
                            backoff.reset();
                            for claim in claims {
                                tasks.spawn(handle(claim, handler.clone(), self.retry_delay));
                            }
                        }
                        Err(e) if e.is_retryable() => {
                            tracing::warn!(queue = %name, error = %e, "claim failed; retrying");
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        drop(claiming);
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::warn!(queue = %name, error = %e, "job handler panicked; its job will be delivered again");
            }
        }
        result
    }
}

async fn handle<F, Fut, E>(claim: Claim, handler: Arc<F>, retry_delay: Duration)
where
    F: Fn(Job) -> Fut,
    Fut: Future<Output = std::result::Result<Vec<TxnOp>, E>>,
    E: std::fmt::Display,
{
    let id = claim.id().to_string();
    let attempt = claim.attempt();
    let finished = match handler(claim.job().clone()).await {
        Ok(ops) => claim.ack_with(ops).await,
        Err(e) => {
            tracing::warn!(id = %id, attempt, error = %e, "job handler failed; nacking");
            claim.nack_after(retry_delay).await
        }
    };
    match finished {
        Ok(()) => {}
        Err(Error::NotHeld { key }) => {
            tracing::warn!(id = %id, key = %key, "claim lost before the job was finished; it will be delivered again")
        }
        Err(e) => {
            tracing::warn!(id = %id, error = %e, "finishing a job failed; it will be delivered again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rejects_foreign_values() {
        let m = Meta {
            attempts: 3,
            priority: 65535,
        };
        assert_eq!(Meta::decode(m.encode().as_bytes()), Some(m));
        assert_eq!(Meta::decode(b"hello"), None);
        assert_eq!(Meta::decode(b"a=x;p=1"), None);
    }

    #[test]
    fn layout_orders_priorities_and_times() {
        let l = Layout::new("q");
        assert!(l.job(9, "a") < l.job(1, "a"));
        let key = l.job(9, "abc");
        assert_eq!(l.bucket_of(&key), Some(l.bucket(9).as_str()));
        assert_eq!(id_of(key.as_bytes()), "abc");
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let d = l.delayed(at, "x");
        assert_eq!(visible_at(&l, d.as_bytes()), Some(at));
        assert!(l.delayed(at, "x") < l.delayed(at + Duration::from_millis(1), "a"));
    }

    #[test]
    fn ids_are_validated_with_the_argument_named() {
        for bad in ["", "a/b", "x\n", &"x".repeat(129)] {
            match validate_id(bad) {
                Err(Error::InvalidArgument { name: "id", .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        validate_id("0123abcd").unwrap();
    }
}
