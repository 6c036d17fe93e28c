//! Leader election, fenced and observable, that agrees with Go's `concurrency.Election` and
//! `etcdctl elect` on the same name.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions, WatchStream,
};
use futures::Stream;
use tokio_util::sync::CancellationToken;

use crate::error::{header_revision, Error, Result};
use crate::guard::{Acquire, LockGuard};
use crate::keys::{prefix, prefix_end, show, validate_name};
use crate::session::{with_timeout, Backoff, Session, DEFAULT_REQUEST_TIMEOUT};
use crate::wait::{self, Blockers, Entry};

/// The largest value (proposal or proclamation) accepted, in bytes. etcd refuses requests over
/// 1.5 MiB by default; a leader's value is meant to be small (an address, an id).
const MAX_VALUE_LEN: usize = 1024 * 1024;

/// Bounds on the pause between attempts of an observer to re-read or re-watch.
const OBSERVE_RETRY_MIN: Duration = Duration::from_millis(50);
const OBSERVE_RETRY_MAX: Duration = Duration::from_secs(2);

/// Bounds on the pause before standing again after our candidate key was deleted by someone.
const RESTAND_MIN: Duration = Duration::from_millis(50);
const RESTAND_MAX: Duration = Duration::from_secs(2);

fn validate_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Error::invalid(
            "value",
            format!(
                "is {} bytes long; the limit is {MAX_VALUE_LEN}",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Options that read the first-created key under a prefix: the leader.
fn first_created(range_end: Vec<u8>) -> GetOptions {
    GetOptions::new()
        .with_range(range_end)
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1)
}

/// A leader election shared by every process that uses the same name on the same etcd cluster.
///
/// A candidate puts a key `NAME/<lease hex>_<random>` bound to its session's lease, with its
/// proposal as the value; the key with the lowest create revision leads, and the others wait
/// in arrival order, each watching only the key just ahead of it (the same waiting loop as
/// [`Mutex`](crate::Mutex)). The leader's key's value is its *proclamation*, which it may
/// change with [`Leadership::proclaim`]. This is the layout of Go's `concurrency.Election`, so a
/// Rust process, a Go service and `etcdctl elect NAME` compete in one election and agree on the
/// leader.
///
/// Differences from Go, on purpose:
///
/// - a candidate whose session ends while it waits fails and is never told it won (Go's
///   `Campaign` can report a win for a dead lease);
/// - two campaigns never share a key, even on one session (the second one waits);
/// - [`observe`](Self::observe) reports vacancy, proclamations and new leaders as typed events,
///   and survives compaction, stream errors and member restarts (Go's `Observe` dies on
///   compaction and never reports "no leader").
///
/// # Leading safely
///
/// A lease-based leadership cannot by itself guarantee that only one process *acts* as leader:
/// a leader that pauses longer than its TTL is deposed without running any code and may act
/// after it resumes. Pass [`Leadership::fencing_token`] to the systems you write to, or write
/// to etcd only through [`Leadership::txn`], and stop work when [`Leadership::lost`] completes.
/// [`run_as_leader`](Self::run_as_leader) does the last part for you.
///
/// # Names
///
/// A name is non-empty, at most [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes, without control
/// characters, and does not end with `/`. Values are at most 1 MiB.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> etcd_coord::Result<()> {
/// let client = etcd_coord::connect(["127.0.0.1:2379"]).await?;
/// let session = etcd_coord::Session::new(client).await?;
/// let election = etcd_coord::Election::new(&session, "services/scheduler")?;
/// let leadership = election.campaign("10.0.0.7:8080").await?;
/// println!("leading with token {}", leadership.fencing_token());
/// // ... lead until done or until `leadership.lost()` completes ...
/// leadership.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Election {
    session: Session,
    observer: ElectionObserver,
}

impl Election {
    /// A handle on the election `name`. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` if it is not a valid name (see the type docs).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let election = etcd_coord::Election::new(&session, "scheduler")?;
    /// assert!(etcd_coord::Election::new(&session, "scheduler/").is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>) -> Result<Election> {
        let observer = ElectionObserver::new(session.client().clone(), name)?
            .request_timeout(session.request_timeout())?;
        Ok(Election {
            session: session.clone(),
            observer,
        })
    }

    /// An observer of the election `name` that needs no session: for processes that watch who
    /// leads but never stand. Same as [`ElectionObserver::new`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` if it is not a valid name.
    ///
    /// ```no_run
    /// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let observer = etcd_coord::Election::observer(client, "scheduler")?;
    /// if let Some(leader) = observer.leader().await? {
    ///     println!("{} leads", String::from_utf8_lossy(&leader.value));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn observer(client: Client, name: impl Into<String>) -> Result<ElectionObserver> {
        ElectionObserver::new(client, name)
    }

    /// The election's name.
    ///
    /// ```no_run
    /// # fn f(e: etcd_coord::Election) {
    /// println!("{}", e.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.observer.name
    }

    /// The session candidates of this handle are bound to.
    ///
    /// ```no_run
    /// # fn f(e: etcd_coord::Election) {
    /// let lease = e.session().lease_id();
    /// # }
    /// ```
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Stands for election with `value` as the proposal, and waits until this candidate leads.
    ///
    /// The candidate's key carries `value` from the start, so [`leader`](Self::leader) and
    /// observers show it as soon as the candidate leads. To wait with a deadline, wrap the call
    /// in [`tokio::time::timeout`]; an expired timeout leaves nothing behind.
    ///
    /// Cost: one transaction to stand (put the key and read the candidate ahead), one more per
    /// wake-up; a candidate is woken only when the key just ahead of it goes.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`] naming `value` if it is over 1 MiB;
    /// - the session's error ([`Error::SessionExpired`], [`Error::SessionClosed`]) if it ends
    ///   before this candidate leads: a candidate whose session ended is never reported as
    ///   leader;
    /// - [`Error::NotHeld`] if our candidate key is deleted by someone else while we wait;
    /// - non-retryable etcd errors (e.g. [`Error::PermissionDenied`]). Transient errors are
    ///   retried for as long as the session lives.
    ///
    /// On every error the candidate key is deleted (in the background, fenced).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped at any point, the candidate key is deleted in the
    /// background (tracked by the session, so [`Session::close`] waits for it) and this process
    /// does not lead.
    ///
    /// ```no_run
    /// # async fn f(election: etcd_coord::Election) -> etcd_coord::Result<()> {
    /// let leadership = election.campaign("worker-7").await?;
    /// println!("leading as {}", leadership.key());
    /// # Ok(()) }
    /// ```
    pub async fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<Leadership> {
        let value = value.into();
        validate_value(&value)?;
        let blockers = Blockers::prefixes([self.observer.prefix.clone()]);
        let spec = Acquire {
            value: &value,
            ..Acquire::new(self.name(), &self.observer.prefix, blockers)
        };
        let guard = LockGuard::acquire(&self.session, spec, |_| Ok(())).await?;
        tracing::info!(
            name = %self.name(), key = guard.key(), token = guard.fencing_token(), "elected"
        );
        Ok(Leadership {
            guard,
            name: self.name().to_owned(),
        })
    }

    /// Takes back a leadership after a restart, from its key and fencing token.
    ///
    /// The session must hold the key's lease: adopt it with
    /// [`SessionBuilder::lease`](crate::SessionBuilder::lease) (the old process hands it over
    /// with [`Session::orphan`], or simply stops before the TTL runs out). One transaction checks
    /// that the key exists with this create revision and this lease and that no older key
    /// exists under the election's prefix, i.e. that it still leads.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`] naming `key` if it is not a key of this election, or if it is
    ///   bound to another lease than this session's;
    /// - [`Error::NotHeld`] if the key is gone or was re-created (another create revision);
    /// - [`Error::Conflict`] if the key exists but does not lead (it was saved while still
    ///   waiting). Nobody waits on that key any more, so it is withdrawn (a fenced delete in the
    ///   background); [`campaign`](Self::campaign) to stand again;
    /// - the session's error if it is not alive; etcd errors (not retried).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads, except for the withdrawal described above, which runs in the
    /// background.
    ///
    /// ```no_run
    /// # async fn f(client: etcd_client::Client, lease: i64, key: String, token: i64) -> etcd_coord::Result<()> {
    /// let session = etcd_coord::Session::builder(client).lease(lease).build().await?;
    /// let election = etcd_coord::Election::new(&session, "scheduler")?;
    /// let leadership = election.resume(key, token).await?;
    /// assert_eq!(leadership.fencing_token(), token);
    /// # Ok(()) }
    /// ```
    pub async fn resume(&self, key: impl Into<String>, create_revision: i64) -> Result<Leadership> {
        let key = key.into();
        let prefix = &self.observer.prefix;
        if !key.starts_with(prefix.as_str()) || key.len() == prefix.len() {
            return Err(Error::invalid(
                "key",
                format!("{key:?} is not a key of the election {:?}", self.name()),
            ));
        }
        if create_revision <= 0 {
            return Err(Error::invalid(
                "create_revision",
                "a create revision is a positive number",
            ));
        }
        let session = &self.session;
        session.check_alive()?;
        let lease = session.lease_id();
        let range_end = prefix_end(prefix.as_bytes());
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, create_revision),
                Compare::lease(key.clone(), CompareOp::Equal, lease),
                // Every key under the prefix is at least as young as ours: we lead.
                Compare::create_revision(prefix.clone(), CompareOp::Greater, create_revision - 1)
                    .with_range(range_end.clone()),
            ])
            .or_else([
                // Not keys-only: etcd then leaves out the lease too.
                TxnOp::get(key.clone(), None),
                TxnOp::get(
                    prefix.clone(),
                    Some(first_created(range_end).with_keys_only()),
                ),
            ]);
        let mut client = session.client().clone();
        let resp = session
            .request("resuming a leadership", client.txn(txn))
            .await?;
        let revision = header_revision(resp.header())?;
        if resp.succeeded() {
            session.check_alive()?;
            tracing::info!(name = %self.name(), key = %key, token = create_revision, revision, "leadership resumed");
            return Ok(Leadership {
                guard: LockGuard::new(
                    session,
                    Entry {
                        key,
                        create_rev: create_revision,
                    },
                    revision,
                ),
                name: self.name().to_owned(),
            });
        }
        let gets: Vec<Vec<KeyValue>> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().to_vec()),
                _ => None,
            })
            .collect();
        let (mine, first) = match gets.as_slice() {
            [mine, first] => (mine.first(), first.first()),
            _ => return Err(Error::malformed("a failed transaction without its reads")),
        };
        let Some(mine) = mine.filter(|kv| kv.create_revision() == create_revision) else {
            return Err(Error::NotHeld { key });
        };
        if mine.lease() != lease {
            return Err(Error::invalid(
                "key",
                format!(
                    "{key:?} is bound to lease {:x}, not to this session's lease {lease:x}; \
                     adopt that lease with SessionBuilder::lease",
                    mine.lease()
                ),
            ));
        }
        let older = first.map(|kv| show(kv.key())).unwrap_or_default();
        tracing::info!(
            name = %self.name(), key = %key, older = %older,
            "resumed key does not lead; withdrawing it"
        );
        wait::release_in_background(session, key.clone(), Some(create_revision));
        Err(Error::Conflict(format!(
            "{key} does not lead the election {}: {older} is older",
            self.name()
        )))
    }

    /// The current leader, in one range request (`None` if nobody leads).
    ///
    /// # Errors
    ///
    /// etcd errors, not retried; [`Error::Timeout`] after the session's request timeout.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// ```no_run
    /// # async fn f(election: etcd_coord::Election) -> etcd_coord::Result<()> {
    /// match election.leader().await? {
    ///     Some(l) => println!("{} leads since revision {}", l.key, l.create_revision),
    ///     None => println!("nobody leads"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn leader(&self) -> Result<Option<LeaderInfo>> {
        self.observer.leader().await
    }

    /// Every change of leader from now on, beginning with the present; see
    /// [`ElectionObserver::observe`]. It uses the session's client and request timeout, but
    /// not its lease: it keeps working after the session ends.
    ///
    /// # Errors
    ///
    /// Items are errors only when no progress is possible (e.g. [`Error::PermissionDenied`]);
    /// the stream then ends. Transient errors are retried.
    ///
    /// # Cancel safety
    ///
    /// `StreamExt::next` on the stream is cancel safe; dropping the stream cancels its watch.
    ///
    /// ```no_run
    /// # async fn f(election: etcd_coord::Election) -> etcd_coord::Result<()> {
    /// use futures::StreamExt;
    /// let mut events = election.observe();
    /// while let Some(event) = events.next().await {
    ///     println!("{:?}", event?);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn observe(&self) -> LeaderEvents {
        self.observer.observe()
    }

    /// Campaigns, then runs `work` while leading, and resigns when it returns.
    ///
    /// `work` gets a [`LeaderTerm`]: it dereferences to the [`Leadership`] (fencing token,
    /// owner-only [`txn`](Leadership::txn), [`proclaim`](Leadership::proclaim)) and carries a
    /// [`CancellationToken`] that is cancelled the moment leadership is lost (the session ends,
    /// or the key is deleted) and when this call ends. Work should stop when the token fires;
    /// this call waits for `work` to return either way, then resigns (an error there is only
    /// logged: the key is then deleted in the background or goes with the lease) and returns
    /// what `work` returned. Check [`LeaderTerm::is_cancelled`] inside `work` to tell a lost term
    /// from a finished one.
    ///
    /// This is the shape of client-go's `leaderelection`: do work only while leader.
    ///
    /// # Errors
    ///
    /// As [`campaign`](Self::campaign); once elected, none: the work's output is returned.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops `work`, cancels the token and releases the leadership in the
    /// background (as soon as every [`LeaderTerm`] clone `work` may have kept is gone).
    ///
    /// ```no_run
    /// # async fn f(election: etcd_coord::Election) -> etcd_coord::Result<()> {
    /// let rounds = election
    ///     .run_as_leader("worker-7", |term| async move {
    ///         let mut rounds = 0;
    ///         while !term.is_cancelled() {
    ///             tokio::select! {
    ///                 _ = term.cancelled() => break,
    ///                 _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => rounds += 1,
    ///             }
    ///         }
    ///         rounds
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn run_as_leader<F, Fut, T>(&self, value: impl Into<Vec<u8>>, work: F) -> Result<T>
    where
        F: FnOnce(LeaderTerm) -> Fut,
        Fut: Future<Output = T>,
    {
        let leadership = self.campaign(value).await?;
        Ok(serve(leadership, work).await)
    }

    /// Leads whenever it can, for as long as the session lives: campaigns, runs `work` for the
    /// term as [`run_as_leader`](Self::run_as_leader) does, resigns, and campaigns again.
    ///
    /// A term ends when leadership is lost (the work's token is cancelled and the work should
    /// return) or when the work returns by itself; either way this candidate then stands again,
    /// at the back of the queue. A campaign whose key someone deleted is retried after a short
    /// pause.
    ///
    /// # Errors
    ///
    /// It returns only with the error that makes standing again impossible: the session's error
    /// once it ends ([`Error::SessionExpired`], [`Error::SessionClosed`]), an invalid value, or a
    /// non-retryable etcd error.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the current work (its token is cancelled) and releases the
    /// leadership or candidate key in the background.
    ///
    /// ```no_run
    /// # async fn f(election: etcd_coord::Election) {
    /// let err = election
    ///     .lead_forever("worker-7", |term| async move {
    ///         term.cancelled().await; // serve until deposed
    ///     })
    ///     .await
    ///     .unwrap_err();
    /// eprintln!("stopped standing: {err}");
    /// # }
    /// ```
    pub async fn lead_forever<F, Fut>(
        &self,
        value: impl Into<Vec<u8>>,
        mut work: F,
    ) -> Result<Infallible>
    where
        F: FnMut(LeaderTerm) -> Fut,
        Fut: Future<Output = ()>,
    {
        let value = value.into();
        validate_value(&value)?;
        let mut backoff = Backoff::new(RESTAND_MIN, RESTAND_MAX);
        loop {
            let leadership = match self.campaign(value.clone()).await {
                Ok(leadership) => leadership,
                Err(Error::NotHeld { key }) => {
                    tracing::info!(name = %self.name(), key = %key, "candidate key deleted; standing again");
                    tokio::select! {
                        state = self.session.lost() => {
                            return Err(state.error().unwrap_or(Error::SessionClosed));
                        }
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            backoff.reset();
            serve(leadership, &mut work).await;
            self.session.check_alive()?;
        }
    }
}

/// Runs one term: `work` with a token cancelled on loss, then resigns.
async fn serve<F, Fut, T>(leadership: Leadership, work: F) -> T
where
    F: FnOnce(LeaderTerm) -> Fut,
    Fut: Future<Output = T>,
{
    let leadership = Arc::new(leadership);
    // A child of the session's token: a session that ends cancels the work even while this
    // future is not polled.
    let token = leadership.session().lost_token();
    let _cancel_on_exit = token.clone().drop_guard();
    let term = LeaderTerm {
        leadership: leadership.clone(),
        token: token.clone(),
    };
    let lost = leadership.lost();
    let work = work(term);
    tokio::pin!(lost, work);
    let mut lost_seen = false;
    let output = loop {
        tokio::select! {
            output = &mut work => break output,
            _ = &mut lost, if !lost_seen => {
                lost_seen = true;
                tracing::warn!(
                    name = %leadership.name, key = %leadership.key(),
                    token = leadership.fencing_token(), "leadership lost; cancelling the work"
                );
                token.cancel();
            }
        }
    };
    token.cancel();
    match leadership.resign().await {
        Ok(()) => {}
        Err(Error::NotHeld { .. } | Error::SessionExpired(_) | Error::SessionClosed) => {}
        Err(e) => tracing::warn!(
            name = %leadership.name, key = %leadership.key(), error = %e,
            "resigning after the work failed; the key is deleted in the background"
        ),
    }
    output
}

/// Watches an election without standing in it: [`leader`](Self::leader) and
/// [`observe`](Self::observe) need only a [`Client`], no session.
///
/// Made by [`ElectionObserver::new`] or [`Election::observer`]; an [`Election`] offers the same
/// two methods.
///
/// ```no_run
/// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
/// use futures::StreamExt;
/// let observer = etcd_coord::ElectionObserver::new(client, "scheduler")?;
/// let mut events = observer.observe();
/// while let Some(event) = events.next().await {
///     match event? {
///         etcd_coord::LeaderEvent::Elected(l) => println!("new leader {}", l.key),
///         etcd_coord::LeaderEvent::Proclaimed(l) => println!("leader says {:?}", l.value),
///         etcd_coord::LeaderEvent::Vacant { .. } => println!("nobody leads"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ElectionObserver {
    client: Client,
    name: String,
    prefix: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for ElectionObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElectionObserver")
            .field("name", &self.name)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl ElectionObserver {
    /// An observer of the election `name`. Sends nothing. Requests are bounded by
    /// [`DEFAULT_REQUEST_TIMEOUT`](crate::DEFAULT_REQUEST_TIMEOUT) unless changed with
    /// [`request_timeout`](Self::request_timeout).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` if it is not a valid name.
    ///
    /// ```no_run
    /// # fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let observer = etcd_coord::ElectionObserver::new(client, "scheduler")?;
    /// # Ok(()) }
    /// ```
    pub fn new(client: Client, name: impl Into<String>) -> Result<ElectionObserver> {
        let name = name.into();
        validate_name("name", &name)?;
        Ok(ElectionObserver {
            client,
            prefix: prefix(&name),
            name,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// Bounds each request sent by this observer (default
    /// [`DEFAULT_REQUEST_TIMEOUT`](crate::DEFAULT_REQUEST_TIMEOUT)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `request_timeout` for a zero duration.
    ///
    /// ```no_run
    /// # fn f(o: etcd_coord::ElectionObserver) -> etcd_coord::Result<()> {
    /// let o = o.request_timeout(std::time::Duration::from_secs(2))?;
    /// # Ok(()) }
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(Error::invalid(
                "request_timeout",
                "must be greater than zero",
            ));
        }
        self.request_timeout = timeout;
        Ok(self)
    }

    /// The election's name.
    ///
    /// ```no_run
    /// # fn f(o: etcd_coord::ElectionObserver) {
    /// println!("{}", o.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current leader, in one range request (`None` if nobody leads).
    ///
    /// # Errors
    ///
    /// etcd errors, not retried; [`Error::Timeout`] after the request timeout.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// ```no_run
    /// # async fn f(o: etcd_coord::ElectionObserver) -> etcd_coord::Result<()> {
    /// let leads = o.leader().await?.is_some();
    /// # Ok(()) }
    /// ```
    pub async fn leader(&self) -> Result<Option<LeaderInfo>> {
        let mut client = self.client.clone();
        let opts = first_created(prefix_end(self.prefix.as_bytes()));
        let resp = with_timeout(
            self.request_timeout,
            "reading the leader",
            client.get(self.prefix.clone(), Some(opts)),
        )
        .await?;
        let revision = header_revision(resp.header())?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| LeaderInfo::from_kv(kv, revision)))
    }

    /// Every change of leader from now on, as a stream of [`LeaderEvent`]s.
    ///
    /// The first event describes the present: [`LeaderEvent::Elected`] with the current leader,
    /// or [`LeaderEvent::Vacant`]. After that, each new leader is one `Elected`, each new value
    /// of the current leader's key one `Proclaimed`, and the end of the last candidate one
    /// `Vacant`. Revisions only go forward, and no state is reported twice in a row.
    ///
    /// How: one read of the prefix's first-created key, then one watch on the prefix from that
    /// read's revision + 1 (a "synced" watch, whose events come at once). A delete of the leader
    /// is followed by one read *at the delete's revision*, so every leader is reported in order,
    /// however short its term; puts on other candidates' keys are ignored. The stream does not
    /// die:
    ///
    /// - after a stream error or a member restart it watches again from the next unseen
    ///   revision, with backoff (50 ms up to 2 s);
    /// - when the history it needs was compacted away (the server cancels the watch with a
    ///   compact revision), it reads the present again and watches from there, reporting only
    ///   what changed; leaders whose whole term fell in the compacted gap are not reported.
    ///
    /// The stream is lazy and owns its watch: nothing runs while it is not polled, and dropping
    /// it cancels the watch. A consumer that falls behind past a compaction resynchronises as
    /// above.
    ///
    /// # Errors
    ///
    /// Transient errors (timeouts, unavailable members, cancelled watches) are retried for as
    /// long as the stream lives and never reach the consumer. An item is an error only when no
    /// progress is possible (for example [`Error::PermissionDenied`]); the stream then ends.
    ///
    /// # Cancel safety
    ///
    /// `StreamExt::next` on it is cancel safe: an event is consumed only when it is returned.
    ///
    /// ```no_run
    /// # async fn f(o: etcd_coord::ElectionObserver) -> etcd_coord::Result<()> {
    /// use futures::StreamExt;
    /// let mut events = o.observe();
    /// let first = events.next().await.expect("never ends while held")?;
    /// println!("now: {first:?}");
    /// # Ok(()) }
    /// ```
    pub fn observe(&self) -> LeaderEvents {
        let state = Observing {
            client: self.client.clone(),
            name: self.name.clone(),
            range_end: prefix_end(self.prefix.as_bytes()),
            prefix: self.prefix.clone().into_bytes(),
            timeout: self.request_timeout,
            tracker: Tracker::new(),
            next_rev: 0,
            synced: false,
            watch: None,
            backoff: Backoff::new(OBSERVE_RETRY_MIN, OBSERVE_RETRY_MAX),
            failed: false,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        });
        LeaderEvents {
            inner: Box::pin(stream),
        }
    }
}

/// Who leads, as of some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaderInfo {
    /// The leader's key (`NAME/<lease hex>...`).
    pub key: String,
    /// The leader's proclamation: its proposal, or the last value it proclaimed.
    pub value: Vec<u8>,
    /// The create revision of the key: the leader's fencing token.
    pub create_revision: i64,
    /// The revision of the key's last change (its last proclamation).
    pub mod_revision: i64,
    /// The lease the key is bound to (0 for none).
    pub lease: i64,
    /// The etcd revision as of which this is true: the read's header revision, or the revision
    /// of the change that made it so.
    pub revision: i64,
}

impl LeaderInfo {
    fn from_kv(kv: &KeyValue, revision: i64) -> Self {
        Seen::from(kv).info(revision)
    }
}

/// The parts of a leader's key an observer needs (etcd-client's `KeyValue` cannot be built by
/// hand, which this keeps the observer's bookkeeping testable).
#[derive(Debug, Clone)]
struct Seen {
    key: Vec<u8>,
    value: Vec<u8>,
    create_rev: i64,
    mod_rev: i64,
    lease: i64,
}

impl From<&KeyValue> for Seen {
    fn from(kv: &KeyValue) -> Self {
        Seen {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            create_rev: kv.create_revision(),
            mod_rev: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

impl Seen {
    fn info(&self, revision: i64) -> LeaderInfo {
        LeaderInfo {
            key: show(&self.key),
            value: self.value.clone(),
            create_revision: self.create_rev,
            mod_revision: self.mod_rev,
            lease: self.lease,
            revision,
        }
    }
}

/// A change seen by [`ElectionObserver::observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaderEvent {
    /// A new leader (another key than the last one reported).
    Elected(LeaderInfo),
    /// The leader reported last has a new value.
    Proclaimed(LeaderInfo),
    /// Nobody leads: no candidate is left.
    Vacant {
        /// The revision as of which nobody leads.
        revision: i64,
    },
}

impl LeaderEvent {
    /// The revision as of which the event is true. It never decreases along a stream.
    ///
    /// ```
    /// let e = etcd_coord::LeaderEvent::Vacant { revision: 42 };
    /// assert_eq!(e.revision(), 42);
    /// ```
    pub fn revision(&self) -> i64 {
        match self {
            LeaderEvent::Elected(l) | LeaderEvent::Proclaimed(l) => l.revision,
            LeaderEvent::Vacant { revision } => *revision,
        }
    }

    /// The leader, unless the event is a vacancy.
    ///
    /// ```
    /// let e = etcd_coord::LeaderEvent::Vacant { revision: 42 };
    /// assert!(e.leader().is_none());
    /// ```
    pub fn leader(&self) -> Option<&LeaderInfo> {
        match self {
            LeaderEvent::Elected(l) | LeaderEvent::Proclaimed(l) => Some(l),
            LeaderEvent::Vacant { .. } => None,
        }
    }
}

/// The stream returned by [`ElectionObserver::observe`] and [`Election::observe`].
///
/// ```no_run
/// # async fn f(e: etcd_coord::Election) {
/// use futures::StreamExt;
/// let events: etcd_coord::LeaderEvents = e.observe();
/// let next = events.take(1).collect::<Vec<_>>().await;
/// # }
/// ```
#[must_use = "streams do nothing unless polled"]
pub struct LeaderEvents {
    inner: Pin<Box<dyn Stream<Item = Result<LeaderEvent>> + Send>>,
}

impl std::fmt::Debug for LeaderEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderEvents").finish_non_exhaustive()
    }
}

impl Stream for LeaderEvents {
    type Item = Result<LeaderEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The state last reported by an observer.
#[derive(Debug)]
enum Shown {
    Nothing,
    Vacant,
    Leader {
        key: Vec<u8>,
        create_rev: i64,
        mod_rev: i64,
    },
}

/// What the observer should do about one watch event.
#[derive(Debug, PartialEq, Eq)]
enum Reaction {
    /// Nothing changes for the leader.
    Ignore,
    /// The leader proclaimed: apply the event as is.
    Apply,
    /// Read who leads at the event's revision.
    Reread,
}

/// The observer's bookkeeping: what it reported, as of which revision, and what is ready to be
/// reported. No I/O, so it is tested on its own.
#[derive(Debug)]
struct Tracker {
    shown: Shown,
    /// The revision `shown` is true as of.
    state_rev: i64,
    ready: VecDeque<LeaderEvent>,
}

impl Tracker {
    fn new() -> Self {
        Tracker {
            shown: Shown::Nothing,
            state_rev: 0,
            ready: VecDeque::new(),
        }
    }

    /// How to handle an event at `rev` on a key with this create revision.
    fn react(&self, event: EventType, key: &[u8], create_rev: i64, rev: i64) -> Reaction {
        if rev <= self.state_rev {
            // Already part of the state read at that revision.
            return Reaction::Ignore;
        }
        match (&self.shown, event) {
            (Shown::Leader { key: leader, .. }, EventType::Delete) if leader.as_slice() == key => {
                Reaction::Reread
            }
            (_, EventType::Delete) => Reaction::Ignore,
            (
                Shown::Leader {
                    key: leader,
                    create_rev: leader_create,
                    ..
                },
                EventType::Put,
            ) => {
                if leader.as_slice() == key {
                    if *leader_create == create_rev {
                        Reaction::Apply
                    } else {
                        // The leader's key re-created under the same name: look.
                        Reaction::Reread
                    }
                } else if create_rev > *leader_create {
                    // A younger candidate cannot lead while the leader lives.
                    Reaction::Ignore
                } else {
                    // An older key than the leader's: unexpected, so look.
                    Reaction::Reread
                }
            }
            // The first candidate after a vacancy: read who leads at that revision (one
            // transaction may have created several keys).
            (_, EventType::Put) => Reaction::Reread,
        }
    }

    /// Queues the difference between what was shown and `leader`, as of `revision`.
    fn transition(&mut self, leader: Option<Seen>, revision: i64) {
        debug_assert!(revision >= self.state_rev, "revisions only go forward");
        self.state_rev = revision;
        let event = match (leader, &mut self.shown) {
            (None, Shown::Vacant) => None,
            (None, _) => {
                self.shown = Shown::Vacant;
                Some(LeaderEvent::Vacant { revision })
            }
            (
                Some(seen),
                Shown::Leader {
                    key,
                    create_rev,
                    mod_rev,
                },
            ) if *key == seen.key && *create_rev == seen.create_rev => {
                if seen.mod_rev > *mod_rev {
                    *mod_rev = seen.mod_rev;
                    Some(LeaderEvent::Proclaimed(seen.info(revision)))
                } else {
                    None
                }
            }
            (Some(seen), _) => {
                let event = LeaderEvent::Elected(seen.info(revision));
                self.shown = Shown::Leader {
                    key: seen.key,
                    create_rev: seen.create_rev,
                    mod_rev: seen.mod_rev,
                };
                Some(event)
            }
        };
        if let Some(event) = event {
            self.ready.push_back(event);
        }
    }
}

/// What a read of the leader found.
enum Read {
    Found(Option<Seen>, i64),
    /// The revision asked for was compacted away.
    Compacted,
}

/// The observer's I/O, driven by [`Observing::next`].
struct Observing {
    client: Client,
    name: String,
    prefix: Vec<u8>,
    range_end: Vec<u8>,
    timeout: Duration,
    tracker: Tracker,
    /// The first revision whose events have not been processed.
    next_rev: i64,
    /// False when the present must be read again (at the start, after a compaction).
    synced: bool,
    watch: Option<WatchStream>,
    backoff: Backoff,
    failed: bool,
}

impl Observing {
    async fn next(&mut self) -> Option<Result<LeaderEvent>> {
        loop {
            if let Some(event) = self.tracker.ready.pop_front() {
                tracing::debug!(name = %self.name, ?event, "observe: leader changed");
                return Some(Ok(event));
            }
            if self.failed {
                return None;
            }
            if let Err(e) = self.advance().await {
                tracing::warn!(name = %self.name, error = %e, "observe: giving up");
                self.failed = true;
                self.watch = None;
                return Some(Err(e));
            }
        }
    }

    /// Pauses after a transient error, or fails with a permanent one.
    async fn pause_after(&mut self, e: Error) -> Result<()> {
        if !e.is_retryable() {
            return Err(e);
        }
        let delay = self.backoff.next_delay();
        tracing::debug!(name = %self.name, error = %e, ?delay, next_rev = self.next_rev, "observe: retrying");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn desync(&mut self, revision: i64) {
        tracing::info!(
            name = %self.name, revision, next_rev = self.next_rev,
            "observe: history compacted; resynchronising"
        );
        self.watch = None;
        self.synced = false;
    }

    /// One step: a resync, a (re)opened watch, or one watch response processed.
    async fn advance(&mut self) -> Result<()> {
        if !self.synced {
            return self.resync().await;
        }
        let watch = match &mut self.watch {
            Some(watch) => watch,
            None => {
                let opts = WatchOptions::new()
                    .with_range(self.range_end.clone())
                    .with_start_revision(self.next_rev);
                let mut client = self.client.clone();
                match with_timeout(
                    self.timeout,
                    "opening a watch",
                    client.watch(self.prefix.clone(), Some(opts)),
                )
                .await
                {
                    Ok(watch) => self.watch.insert(watch),
                    Err(e) => return self.pause_after(e).await,
                }
            }
        };
        let resp = match watch.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                self.watch = None;
                let e = Error::Unavailable {
                    message: "the watch stream ended".into(),
                    source: None,
                };
                return self.pause_after(e).await;
            }
            Err(e) => {
                self.watch = None;
                return self.pause_after(e.into()).await;
            }
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                self.desync(resp.compact_revision());
                return Ok(());
            }
            self.watch = None;
            let e = Error::Unavailable {
                message: format!("the watch was cancelled: {}", resp.cancel_reason()),
                source: None,
            };
            return self.pause_after(e).await;
        }
        self.backoff.reset();
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let rev = kv.mod_revision();
            match self
                .tracker
                .react(event.event_type(), kv.key(), kv.create_revision(), rev)
            {
                Reaction::Ignore => {}
                Reaction::Apply => self.tracker.transition(Some(Seen::from(kv)), rev),
                Reaction::Reread => match self.read(Some(rev)).await? {
                    Read::Found(leader, _) => self.tracker.transition(leader, rev),
                    Read::Compacted => {
                        self.desync(rev);
                        return Ok(());
                    }
                },
            }
            self.next_rev = self.next_rev.max(rev + 1);
        }
        Ok(())
    }

    /// Reads the present and watches again from there.
    async fn resync(&mut self) -> Result<()> {
        let (leader, revision) = match self.read(None).await? {
            Read::Found(leader, revision) => (leader, revision),
            Read::Compacted => return Ok(()),
        };
        if revision < self.tracker.state_rev {
            // A member behind what we already reported; never report the past.
            let e = Error::Unavailable {
                message: format!(
                    "read revision {revision} is behind the reported revision {}",
                    self.tracker.state_rev
                ),
                source: None,
            };
            return self.pause_after(e).await;
        }
        if self.tracker.state_rev > 0 {
            tracing::info!(name = %self.name, revision, "observe: resynchronised");
        }
        self.tracker.transition(leader, revision);
        self.next_rev = revision + 1;
        self.synced = true;
        self.watch = None;
        Ok(())
    }

    /// The first-created key under the prefix, at `at` (or now), retrying transient errors.
    async fn read(&mut self, at: Option<i64>) -> Result<Read> {
        loop {
            let mut opts = first_created(self.range_end.clone());
            if let Some(rev) = at {
                opts = opts.with_revision(rev);
            }
            let mut client = self.client.clone();
            let result = with_timeout(
                self.timeout,
                "reading the leader",
                client.get(self.prefix.clone(), Some(opts)),
            )
            .await;
            let e = match result {
                Ok(resp) => match resp.header() {
                    Some(h) => {
                        self.backoff.reset();
                        return Ok(Read::Found(
                            resp.kvs().first().map(Seen::from),
                            h.revision(),
                        ));
                    }
                    None => Error::malformed("a response without a header"),
                },
                Err(Error::Etcd { ref message, .. }) if message.contains("compacted") => {
                    return Ok(Read::Compacted)
                }
                // A member that has not applied that revision yet.
                Err(Error::Etcd { message, .. }) if message.contains("future revision") => {
                    Error::Unavailable {
                        message,
                        source: None,
                    }
                }
                Err(e) => e,
            };
            self.pause_after(e).await?;
        }
    }
}

/// Proof that this process leads an election; made by [`Election::campaign`] or
/// [`Election::resume`].
///
/// It is a [`LockGuard`] on the election's key plus the election's operations, and every method
/// of the guard that makes sense on a shared reference is offered here under the same name.
///
/// # Fencing
///
/// The [`fencing_token`](Self::fencing_token) (the key's create revision) strictly increases
/// from one leader to the next. [`is_owner`](Self::is_owner), [`txn`](Self::txn) and
/// [`proclaim`](Self::proclaim) commit only while this exact key exists, so a deposed leader's
/// writes never land. A lease alone cannot keep a paused leader from *acting*: see the
/// [`LockGuard`] docs.
///
/// # Resigning
///
/// [`resign`](Self::resign) takes `&self` and changes nothing when it fails, so a failed resign
/// (etcd unreachable) can simply be retried; the guard's consuming [`LockGuard::unlock`] is not
/// used, because on failure it would take the guard away. Dropping a `Leadership` resigns in
/// the background, without blocking ([`Session::close`] waits for it).
///
/// # Examples
///
/// ```no_run
/// # async fn f(election: etcd_coord::Election) -> etcd_coord::Result<()> {
/// use etcd_coord::etcd_client::{Txn, TxnOp};
/// let leadership = election.campaign("10.0.0.7:8080").await?;
/// leadership
///     .txn(Txn::new().and_then([TxnOp::put("scheduler/epoch", leadership.fencing_token().to_string(), None)]))
///     .await?;
/// leadership.proclaim("10.0.0.7:9090").await?;
/// leadership.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping the leadership resigns it"]
pub struct Leadership {
    guard: LockGuard,
    name: String,
}

impl Leadership {
    /// The election's name.
    ///
    /// ```no_run
    /// # fn f(l: etcd_coord::Leadership) {
    /// println!("leading {}", l.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key that proves leadership (`NAME/<lease hex>_<random>`).
    ///
    /// ```no_run
    /// # fn f(l: etcd_coord::Leadership) {
    /// println!("leading as {}", l.key());
    /// # }
    /// ```
    pub fn key(&self) -> &str {
        self.guard.key()
    }

    /// The fencing token: the create revision of [`key`](Self::key), larger than the token of
    /// every earlier leader of this election.
    ///
    /// ```no_run
    /// # fn f(l: etcd_coord::Leadership) {
    /// let token: i64 = l.fencing_token();
    /// # }
    /// ```
    pub fn fencing_token(&self) -> i64 {
        self.guard.fencing_token()
    }

    /// The etcd revision at which this process learned it leads.
    ///
    /// ```no_run
    /// # fn f(l: etcd_coord::Leadership) {
    /// assert!(l.elected_revision() >= l.fencing_token());
    /// # }
    /// ```
    pub fn elected_revision(&self) -> i64 {
        self.guard.acquired_revision()
    }

    /// The session the leadership is bound to.
    ///
    /// ```no_run
    /// # fn f(l: etcd_coord::Leadership) {
    /// let lease = l.session().lease_id();
    /// # }
    /// ```
    pub fn session(&self) -> &Session {
        self.guard.session()
    }

    /// The underlying lock guard.
    ///
    /// ```no_run
    /// # fn f(l: etcd_coord::Leadership) {
    /// let guard: &etcd_coord::LockGuard = l.as_lock_guard();
    /// # }
    /// ```
    pub fn as_lock_guard(&self) -> &LockGuard {
        &self.guard
    }

    /// A comparison that holds only while this process still leads, for your own transactions.
    ///
    /// ```no_run
    /// # async fn f(l: etcd_coord::Leadership, mut client: etcd_client::Client) -> Result<(), etcd_client::Error> {
    /// use etcd_client::{Txn, TxnOp};
    /// let txn = Txn::new().when([l.is_owner()]).and_then([TxnOp::put("k", "v", None)]);
    /// let committed = client.txn(txn).await?.succeeded();
    /// # Ok(()) }
    /// ```
    pub fn is_owner(&self) -> Compare {
        self.guard.is_owner()
    }

    /// Whether this process still leads, as far as it knows without asking etcd: not resigned
    /// and its session alive. Use [`txn`](Self::txn) where being sure matters.
    ///
    /// ```no_run
    /// # fn f(l: etcd_coord::Leadership) {
    /// if !l.is_leader() { return; }
    /// # }
    /// ```
    pub fn is_leader(&self) -> bool {
        self.guard.is_held()
    }

    /// Completes when leadership is lost: the session ends, or the key is deleted (by a resign,
    /// an operator, or a lease revoke the keepalive has not noticed yet). Watching the key costs
    /// one watch stream while this future is polled.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// ```no_run
    /// # async fn f(l: etcd_coord::Leadership) {
    /// tokio::select! {
    ///     _ = l.lost() => eprintln!("deposed; stopping"),
    ///     _ = lead() => {}
    /// }
    /// # }
    /// # async fn lead() {}
    /// ```
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let lost = self.guard.lost();
        let key = self.key().to_owned();
        let token = self.fencing_token();
        async move {
            lost.await;
            tracing::debug!(key = %key, token, "leadership lost");
        }
    }

    /// Runs `txn` only while this process still leads, atomically; see [`LockGuard::txn`].
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] if leadership was lost (nothing of `txn` ran); etcd errors otherwise.
    ///
    /// # Cancel safety
    ///
    /// If dropped after sending, the transaction may or may not have committed.
    ///
    /// ```no_run
    /// # async fn f(l: etcd_coord::Leadership) -> etcd_coord::Result<()> {
    /// use etcd_coord::etcd_client::{Txn, TxnOp};
    /// l.txn(Txn::new().and_then([TxnOp::put("config/owner", "me", None)])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.guard.txn(txn).await
    }

    /// Replaces the leader's value, which [`Election::leader`] and observers report, only while
    /// this process still leads. The key stays bound to the session's lease.
    ///
    /// # Errors
    ///
    /// - [`Error::NotHeld`] if this process no longer leads (resigned, session ended, key
    ///   deleted); nothing is written;
    /// - [`Error::InvalidArgument`] naming `value` if it is over 1 MiB;
    /// - etcd errors (not retried).
    ///
    /// # Cancel safety
    ///
    /// If dropped after sending, the value may or may not have been written (and only if still
    /// leading).
    ///
    /// ```no_run
    /// # async fn f(l: etcd_coord::Leadership) -> etcd_coord::Result<()> {
    /// l.proclaim("10.0.0.7:9090").await?;
    /// # Ok(()) }
    /// ```
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        let value = value.into();
        validate_value(&value)?;
        if !self.is_leader() {
            return Err(Error::NotHeld {
                key: self.key().to_owned(),
            });
        }
        let put = TxnOp::put(
            self.key(),
            value,
            Some(PutOptions::new().with_lease(self.session().lease_id())),
        );
        let resp = self.guard.txn(Txn::new().and_then([put])).await?;
        tracing::debug!(
            name = %self.name, key = %self.key(), token = self.fencing_token(),
            revision = resp.header().map(|h| h.revision()), "proclaimed"
        );
        Ok(())
    }

    /// Resigns now: deletes the key, fenced by its create revision, so the next candidate leads.
    ///
    /// It takes `&self` and, when it fails for want of an answer, changes nothing: retry it, or
    /// drop the leadership to resign in the background. After a success, or once leadership is
    /// lost, it reports [`Error::NotHeld`].
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] if the key was already gone (nothing was deleted); the session's error
    /// if the session had ended (the key was deleted if still ours, but leadership may have
    /// lapsed before); [`Error::Timeout`] or [`Error::Unavailable`] if etcd did not answer, in
    /// which case this process still counts as leader and may retry.
    ///
    /// # Cancel safety
    ///
    /// If dropped after sending, the key may or may not have been deleted; a later call, or
    /// dropping the leadership, finishes the job.
    ///
    /// ```no_run
    /// # async fn f(l: etcd_coord::Leadership) -> etcd_coord::Result<()> {
    /// while let Err(e) = l.resign().await {
    ///     if !e.is_retryable() { break; }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn resign(&self) -> Result<()> {
        let result = self.guard.release_in_place().await;
        tracing::info!(
            name = %self.name, key = %self.key(), token = self.fencing_token(),
            ok = result.is_ok(), "resigned"
        );
        result
    }
}

/// One term of leadership, handed to the work of [`Election::run_as_leader`] and
/// [`Election::lead_forever`].
///
/// It dereferences to the [`Leadership`], and carries a [`CancellationToken`] that is cancelled
/// as soon as leadership is lost and when the term ends. Cheap to clone; the leadership is
/// resigned once the term is over, whether or not clones remain.
///
/// ```no_run
/// # async fn f(election: etcd_coord::Election) -> etcd_coord::Result<()> {
/// election
///     .run_as_leader("worker-7", |term: etcd_coord::LeaderTerm| async move {
///         let token = term.fencing_token();
///         term.cancelled().await;
///         println!("term {token} over");
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LeaderTerm {
    leadership: Arc<Leadership>,
    token: CancellationToken,
}

impl LeaderTerm {
    /// The token cancelled when the term ends (leadership lost, or the work's future is over).
    /// Cancelling it yourself only affects this term's work.
    ///
    /// ```no_run
    /// # fn f(term: etcd_coord::LeaderTerm) {
    /// let token = term.token();
    /// tokio::spawn(async move { token.cancelled().await; });
    /// # }
    /// ```
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Completes when the term ends.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// ```no_run
    /// # async fn f(term: etcd_coord::LeaderTerm) {
    /// term.cancelled().await;
    /// # }
    /// ```
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// Whether the term has ended.
    ///
    /// ```no_run
    /// # fn f(term: etcd_coord::LeaderTerm) {
    /// if term.is_cancelled() { return; }
    /// # }
    /// ```
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The leadership of this term (also reachable through `Deref`).
    ///
    /// ```no_run
    /// # fn f(term: etcd_coord::LeaderTerm) {
    /// let token = term.leadership().fencing_token();
    /// # }
    /// ```
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }
}

impl std::ops::Deref for LeaderTerm {
    type Target = Leadership;

    fn deref(&self) -> &Leadership {
        &self.leadership
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(key: &str, value: &str, create_rev: i64, mod_rev: i64) -> Seen {
        Seen {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_rev,
            mod_rev,
            lease: 0x1f,
        }
    }

    fn drain(t: &mut Tracker) -> Vec<LeaderEvent> {
        t.ready.drain(..).collect()
    }

    #[test]
    fn values_over_the_limit_are_rejected_naming_the_argument() {
        assert!(validate_value(&vec![0; MAX_VALUE_LEN]).is_ok());
        match validate_value(&vec![0; MAX_VALUE_LEN + 1]) {
            Err(Error::InvalidArgument { name: "value", .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn event_revision_and_leader() {
        let e = LeaderEvent::Vacant { revision: 7 };
        assert_eq!(e.revision(), 7);
        assert!(e.leader().is_none());
        let e = LeaderEvent::Elected(seen("e/a", "x", 3, 3).info(4));
        assert_eq!(e.revision(), 4);
        assert_eq!(e.leader().unwrap().key, "e/a");
    }

    #[test]
    fn first_state_is_always_reported() {
        let mut t = Tracker::new();
        t.transition(None, 5);
        assert_eq!(drain(&mut t), [LeaderEvent::Vacant { revision: 5 }]);
        let mut t = Tracker::new();
        t.transition(Some(seen("e/a", "x", 3, 4)), 5);
        assert_eq!(
            drain(&mut t),
            [LeaderEvent::Elected(seen("e/a", "x", 3, 4).info(5))]
        );
    }

    #[test]
    fn unchanged_state_after_a_resync_is_not_reported_again() {
        let mut t = Tracker::new();
        t.transition(Some(seen("e/a", "x", 3, 4)), 5);
        drain(&mut t);
        t.transition(Some(seen("e/a", "x", 3, 4)), 9);
        assert!(drain(&mut t).is_empty());
        t.transition(Some(seen("e/a", "y", 3, 8)), 10);
        assert_eq!(
            drain(&mut t),
            [LeaderEvent::Proclaimed(seen("e/a", "y", 3, 8).info(10))]
        );
        t.transition(None, 11);
        t.transition(None, 12);
        assert_eq!(drain(&mut t), [LeaderEvent::Vacant { revision: 11 }]);
    }

    #[test]
    fn a_recreated_key_of_the_same_name_is_a_new_leader() {
        let mut t = Tracker::new();
        t.transition(Some(seen("e/a", "x", 3, 3)), 3);
        drain(&mut t);
        t.transition(Some(seen("e/a", "x", 7, 7)), 7);
        assert!(matches!(drain(&mut t)[..], [LeaderEvent::Elected(_)]));
    }

    #[test]
    fn reactions_to_watch_events() {
        let mut t = Tracker::new();
        t.transition(Some(seen("e/a", "x", 3, 3)), 5);
        drain(&mut t);
        // Older than the read: already accounted for.
        assert_eq!(t.react(EventType::Delete, b"e/a", 0, 5), Reaction::Ignore);
        // The leader proclaims.
        assert_eq!(t.react(EventType::Put, b"e/a", 3, 6), Reaction::Apply);
        // A younger candidate arrives or leaves.
        assert_eq!(t.react(EventType::Put, b"e/b", 6, 6), Reaction::Ignore);
        assert_eq!(t.react(EventType::Delete, b"e/b", 0, 7), Reaction::Ignore);
        // The leader goes.
        assert_eq!(t.react(EventType::Delete, b"e/a", 0, 8), Reaction::Reread);
        // The leader key re-created under the same name.
        assert_eq!(t.react(EventType::Put, b"e/a", 9, 9), Reaction::Reread);
        // After a vacancy, any new key may lead.
        t.transition(None, 10);
        assert_eq!(t.react(EventType::Put, b"e/c", 11, 11), Reaction::Reread);
        assert_eq!(t.react(EventType::Delete, b"e/c", 0, 12), Reaction::Ignore);
    }
}
