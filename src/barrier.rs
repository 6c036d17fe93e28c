//! A barrier: one process holds it closed, every other process waits until it is released.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tracing::Instrument;

use crate::error::{header_revision, Error, Result};
use crate::keys::{participant_key, validate_name};
use crate::session::Session;
use crate::wait::{self, Entry};

/// A gate that holds every waiter back until it is released: "nobody starts before the
/// coordinator says so".
///
/// The barrier is a single key, `NAME` itself, the layout of Go's `recipes.Barrier`: a hold by
/// either blocks waiters of both. The barrier is held while the key exists.
///
/// # Two kinds of hold
///
/// - [`hold`](Self::hold) binds the key to this handle's session: if the holder crashes, its
///   lease ends one TTL later and takes the key with it, so the others are not blocked forever.
///   Dropping the returned [`BarrierHold`] releases it too.
/// - [`hold_persistent`](Self::hold_persistent) writes the key without a lease: it outlives the
///   session and the process, and stays until somebody releases it (with
///   [`BarrierHold::release`] or [`Barrier::release`]). Use it when "closed" must survive a
///   restart of the coordinator.
///
/// # Releasing safely
///
/// [`BarrierHold::release`] deletes only the hold it stands for (the delete is fenced by the
/// key's create revision), so a late or repeated release never opens a barrier that somebody
/// else closed in the meantime. [`Barrier::release`] is for holds this process has no
/// [`BarrierHold`] for (a persistent hold made before a restart, or by another process): it
/// removes the hold that exists when it is called, and never one made after it started.
///
/// # Waiting
///
/// [`wait`](Self::wait) returns at once if the barrier is not held, and otherwise when it is
/// released (even if it is held again right after). It creates no key, so cancelling it leaves
/// nothing behind. Waiting needs this handle's session alive: a waiter whose session ends gets
/// the session's error rather than waiting on.
///
/// # Cost
///
/// In etcd requests: [`hold`](Self::hold) is one transaction, [`BarrierHold::release`] one
/// more; [`Barrier::release`] is two (a read, then a fenced delete). [`wait`](Self::wait) on an
/// open barrier is one read; on a held one it is one read, one watch on the key, and one read
/// per wake-up. A release wakes every waiter at once (that is what a barrier is for), each of
/// which then spends that one read; nothing else wakes them.
///
/// # Names
///
/// A name is non-empty, at most [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes, without control
/// characters, and does not end with `/`. The key is the name itself, so do not give another
/// primitive a name that the barrier's name starts with, followed by `/` (a barrier `jobs/x`
/// would sit among the keys of a mutex `jobs`).
///
/// # Examples
///
/// ```no_run
/// # async fn f(coordinator: etcd_coord::Session, worker: etcd_coord::Session) -> etcd_coord::Result<()> {
/// use etcd_coord::Barrier;
/// // The coordinator closes the gate while it prepares the input.
/// let hold = Barrier::new(&coordinator, "jobs/nightly/input-ready")?.hold().await?;
/// // Workers (other processes) wait for it.
/// let gate = Barrier::new(&worker, "jobs/nightly/input-ready")?;
/// let waiting = tokio::spawn(async move { gate.wait().await });
/// // ... prepare ...
/// hold.release().await?;
/// waiting.await.expect("task")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Barrier {
    session: Session,
    name: String,
}

impl Barrier {
    /// A handle on the barrier `name`, using `session` for requests and for
    /// [`hold`](Self::hold). Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` if it is not a valid name (see the type docs).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let barrier = etcd_coord::Barrier::new(&session, "deploy/v42")?;
    /// assert!(etcd_coord::Barrier::new(&session, "deploy/").is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>) -> Result<Barrier> {
        let name = name.into();
        validate_name("name", &name)?;
        Ok(Barrier {
            session: session.clone(),
            name,
        })
    }

    /// The barrier's name, which is also its key.
    ///
    /// ```no_run
    /// # fn f(b: etcd_coord::Barrier) {
    /// println!("{}", b.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the barrier for as long as this handle's session lives, or until the returned
    /// hold is released or dropped.
    ///
    /// # Errors
    ///
    /// - [`Error::WouldBlock`] if the barrier is already held (by anyone, this process
    ///   included); nothing is changed;
    /// - the session's error if it has ended, or ends while etcd is unreachable;
    /// - non-retryable etcd errors. Transient errors are retried while the session lives: bound
    ///   the call with [`tokio::time::timeout`] if you need to.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped while its request is in flight, the answer is
    /// still awaited in the background (tracked by the session) and a hold it made is removed.
    ///
    /// ```no_run
    /// # async fn f(barrier: etcd_coord::Barrier) -> etcd_coord::Result<()> {
    /// let hold = barrier.hold().await?;
    /// // ... everybody calling barrier.wait() is blocked here ...
    /// hold.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn hold(&self) -> Result<BarrierHold> {
        self.hold_with(false).await
    }

    /// Closes the barrier until somebody releases it, whatever happens to this session or
    /// process. Dropping the returned hold does **not** release it.
    ///
    /// # Errors
    ///
    /// As [`hold`](Self::hold).
    ///
    /// # Cancel safety
    ///
    /// As [`hold`](Self::hold), as long as the session lives long enough for the background
    /// delete; otherwise the hold may remain, and [`Barrier::release`] removes it.
    ///
    /// ```no_run
    /// # async fn f(barrier: etcd_coord::Barrier) -> etcd_coord::Result<()> {
    /// let hold = barrier.hold_persistent().await?;
    /// drop(hold); // still held, even after this process exits
    /// barrier.release().await?; // now open
    /// # Ok(()) }
    /// ```
    pub async fn hold_persistent(&self) -> Result<BarrierHold> {
        self.hold_with(true).await
    }

    async fn hold_with(&self, persistent: bool) -> Result<BarrierHold> {
        let session = &self.session;
        session.check_alive()?;
        let key = self.name.clone();
        // A value unique to this attempt: it tells a retry that an earlier try committed, and
        // lets a cancelled attempt delete its own hold and nobody else's.
        let token = participant_key("", session.lease_id());
        let span = tracing::debug_span!("hold", key = %key, persistent);
        async {
            let lease = if persistent { 0 } else { session.lease_id() };
            let pending = PendingHold {
                session: session.clone(),
                key: key.clone(),
                token: token.clone(),
                armed: true,
            };
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    token.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = wait::retrying(session, || {
                let (key, token) = (key.clone(), token.clone());
                wait::detached_txn(
                    session,
                    "holding a barrier",
                    txn.clone(),
                    false,
                    move |s, resp| {
                        if let Ok(Some(rev)) = our_hold(&resp, &token) {
                            wait::release_in_background(s, key, Some(rev));
                        }
                    },
                )
            })
            .await?;
            let Some(create_rev) = our_hold(&resp, &token)? else {
                pending.disarm();
                tracing::debug!("already held");
                return Err(Error::WouldBlock {
                    name: self.name.clone(),
                });
            };
            pending.disarm();
            tracing::debug!(revision = create_rev, "held");
            Ok(BarrierHold {
                session: session.clone(),
                entry: Entry { key, create_rev },
                persistent,
                release_on_drop: !persistent,
            })
        }
        .instrument(span)
        .await
    }

    /// Whether the barrier is held now. One read.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] or [`Error::Unavailable`] if etcd does not answer; other etcd errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// ```no_run
    /// # async fn f(barrier: etcd_coord::Barrier) -> etcd_coord::Result<()> {
    /// if barrier.is_held().await? { println!("closed"); }
    /// # Ok(()) }
    /// ```
    pub async fn is_held(&self) -> Result<bool> {
        Ok(self.read().await?.1.is_some())
    }

    /// Opens the barrier by removing the hold that exists now, whoever made it. Returns
    /// whether this call removed a hold (`false`: the barrier was open, or the hold went
    /// meanwhile).
    ///
    /// Prefer [`BarrierHold::release`] when you have the hold. This one reads the current
    /// hold's create revision first and deletes only that hold, so neither a retry nor a late
    /// answer can remove a hold made after the call started.
    ///
    /// # Errors
    ///
    /// The session's error if it ends while etcd is unreachable; non-retryable etcd errors.
    /// Transient errors are retried while the session lives.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the hold may or may not have been removed.
    ///
    /// ```no_run
    /// # async fn f(barrier: etcd_coord::Barrier) -> etcd_coord::Result<()> {
    /// if barrier.release().await? { println!("opened a barrier left closed by an earlier run"); }
    /// # Ok(()) }
    /// ```
    pub async fn release(&self) -> Result<bool> {
        let session = &self.session;
        session.check_alive()?;
        let Some(create_rev) = self.read().await?.1 else {
            return Ok(false);
        };
        let released = wait::retrying(session, || {
            wait::release(session, &self.name, Some(create_rev))
        })
        .await?;
        tracing::debug!(key = %self.name, revision = create_rev, released, "barrier released");
        Ok(released)
    }

    /// Waits until the barrier is not held: returns at once if it is open now, otherwise when
    /// the hold seen first is released (even if the barrier is held again right after).
    ///
    /// # Errors
    ///
    /// - the session's error if this handle's session ends while waiting;
    /// - non-retryable etcd errors. Transient errors and broken watches are retried while the
    ///   session lives; compaction is handled by reading again.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: waiting creates no key, and dropping the future closes its watch.
    ///
    /// ```no_run
    /// # async fn f(barrier: etcd_coord::Barrier) -> etcd_coord::Result<()> {
    /// use std::time::Duration;
    /// match tokio::time::timeout(Duration::from_secs(30), barrier.wait()).await {
    ///     Ok(result) => result?,
    ///     Err(_) => eprintln!("still closed after 30 s"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wait(&self) -> Result<()> {
        let session = &self.session;
        session.check_alive()?;
        let span = tracing::debug_span!("wait", key = %self.name);
        async {
            let keys = [self.name.clone().into_bytes()];
            let mut seen = None;
            let mut backoff = wait::backoff();
            loop {
                let (revision, held) = self.read().await?;
                match (held, seen) {
                    (None, _) => return Ok(()),
                    // Released, and held again by someone before we looked: still a release.
                    (Some(rev), Some(first)) if rev != first => return Ok(()),
                    (Some(rev), _) => seen = Some(rev),
                }
                tracing::debug!(holder_rev = seen, revision, "waiting for release");
                wait::wake(session, &keys, revision + 1, true, &mut backoff).await?;
            }
        }
        .instrument(span)
        .await
    }

    /// The revision read at, and the create revision of the hold if there is one.
    async fn read(&self) -> Result<(i64, Option<i64>)> {
        let session = &self.session;
        let resp = wait::retrying(session, || {
            let mut client = session.client().clone();
            let opts = GetOptions::new().with_keys_only();
            async move {
                session
                    .request(
                        "reading a barrier",
                        client.get(self.name.as_str(), Some(opts)),
                    )
                    .await
            }
        })
        .await?;
        let revision = header_revision(resp.header())?;
        Ok((revision, resp.kvs().first().map(|kv| kv.create_revision())))
    }
}

/// Proof that this process closed a [`Barrier`].
///
/// [`release`](Self::release) opens the barrier and reports errors. Dropping a session-bound
/// hold (from [`Barrier::hold`]) releases it in the background; dropping a persistent one (from
/// [`Barrier::hold_persistent`]) leaves the barrier closed.
///
/// # Examples
///
/// ```no_run
/// # async fn f(barrier: etcd_coord::Barrier) -> etcd_coord::Result<()> {
/// let hold = barrier.hold().await?;
/// println!("closed {} at revision {}", hold.key(), hold.revision());
/// hold.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping a session-bound hold releases the barrier"]
pub struct BarrierHold {
    session: Session,
    entry: Entry,
    persistent: bool,
    release_on_drop: bool,
}

impl BarrierHold {
    /// The barrier's key.
    ///
    /// ```no_run
    /// # fn f(h: etcd_coord::BarrierHold) {
    /// println!("holding {}", h.key());
    /// # }
    /// ```
    pub fn key(&self) -> &str {
        &self.entry.key
    }

    /// The create revision of the key: it identifies this hold, and is larger than that of
    /// every earlier hold of the same barrier.
    ///
    /// ```no_run
    /// # fn f(h: etcd_coord::BarrierHold) {
    /// let rev: i64 = h.revision();
    /// # }
    /// ```
    pub fn revision(&self) -> i64 {
        self.entry.create_rev
    }

    /// Whether this hold outlives its session (made by [`Barrier::hold_persistent`]).
    ///
    /// ```no_run
    /// # fn f(h: etcd_coord::BarrierHold) {
    /// if h.is_persistent() { println!("release me explicitly"); }
    /// # }
    /// ```
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// A comparison that holds only while this hold exists, for your own transactions.
    ///
    /// ```no_run
    /// # async fn f(h: etcd_coord::BarrierHold, mut client: etcd_client::Client) -> Result<(), etcd_client::Error> {
    /// use etcd_client::{Txn, TxnOp};
    /// let txn = Txn::new().when([h.is_owner()]).and_then([TxnOp::put("input", "v2", None)]);
    /// client.txn(txn).await?;
    /// # Ok(()) }
    /// ```
    pub fn is_owner(&self) -> Compare {
        self.entry.is_owner()
    }

    /// Opens the barrier: deletes the key if it is still this hold (fenced by its create
    /// revision).
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] if this hold was already gone (released by someone else, or its lease
    /// ended); nothing was deleted, and a newer hold is left alone. [`Error::Timeout`] or
    /// [`Error::Unavailable`] if etcd did not answer; the release then continues in the
    /// background.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the release continues in the background (also for a persistent hold).
    ///
    /// ```no_run
    /// # async fn f(h: etcd_coord::BarrierHold) -> etcd_coord::Result<()> {
    /// h.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn release(mut self) -> Result<()> {
        self.release_on_drop = true;
        let deleted =
            wait::release(&self.session, &self.entry.key, Some(self.entry.create_rev)).await?;
        self.release_on_drop = false;
        tracing::debug!(key = %self.entry.key, revision = self.entry.create_rev, deleted, "hold released");
        if deleted {
            Ok(())
        } else {
            Err(Error::NotHeld {
                key: self.entry.key.clone(),
            })
        }
    }
}

impl Drop for BarrierHold {
    fn drop(&mut self) {
        if self.release_on_drop {
            wait::release_in_background(
                &self.session,
                self.entry.key.clone(),
                Some(self.entry.create_rev),
            );
        }
    }
}

/// Removes a hold that an interrupted [`Barrier::hold`] may have made without our learning its
/// create revision (a try that timed out, then the caller gone before the retry), matching it
/// by this attempt's unique value. A try still in flight is undone by `detached_txn` instead.
struct PendingHold {
    session: Session,
    key: String,
    token: String,
    armed: bool,
}

impl PendingHold {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingHold {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::debug!(key = %self.key, "hold abandoned; removing it in the background");
        let session = self.session.clone();
        let txn = Txn::new()
            .when([Compare::value(
                self.key.clone(),
                CompareOp::Equal,
                self.token.clone(),
            )])
            .and_then([TxnOp::delete(self.key.clone(), None)]);
        let bound = session.ttl().max(Duration::from_secs(10));
        self.session.spawn_background(async move {
            let work = wait::retrying(&session, || {
                let mut client = session.client().clone();
                let txn = txn.clone();
                let session = &session;
                async move {
                    session
                        .request("removing an abandoned hold", client.txn(txn))
                        .await
                }
            });
            match tokio::time::timeout(bound, work).await {
                Ok(Ok(resp)) => tracing::debug!(removed = resp.succeeded(), "abandoned hold"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not remove an abandoned hold"),
                Err(_) => tracing::warn!("gave up removing an abandoned hold"),
            }
        });
    }
}

/// The create revision of the hold made by the attempt with value `token`, from the answer to
/// the put-if-absent: `None` if someone else holds the barrier.
fn our_hold(resp: &TxnResponse, token: &str) -> Result<Option<i64>> {
    if resp.succeeded() {
        return resp
            .header()
            .map(|h| Some(h.revision()))
            .ok_or_else(|| Error::malformed("a response without a header"));
    }
    let existing = resp
        .op_responses()
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| (kv.create_revision(), kv.value() == token.as_bytes())),
            _ => None,
        })
        .ok_or_else(|| Error::malformed("a failed put-if-absent without the existing key"))?;
    // Ours if an earlier try of this very call committed before its answer was lost.
    Ok(existing.1.then_some(existing.0))
}
