//! The proof of holding: one guard type shared by every lock-like primitive.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use etcd_client::{Compare, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use tracing::Instrument;

use crate::error::{header_revision, Error, Result};
use crate::keys::participant_key;
use crate::session::{Session, SessionState};
use crate::wait::{self, Blockers, Entry, PendingKey};

/// What to acquire: see [`LockGuard::acquire`].
pub(crate) struct Acquire<'a> {
    pub(crate) name: &'a str,
    pub(crate) key_prefix: &'a str,
    pub(crate) value: &'a [u8],
    pub(crate) blockers: Blockers,
    pub(crate) extra: Vec<TxnOp>,
    pub(crate) wait: bool,
}

impl<'a> Acquire<'a> {
    /// Waits for `blockers`, with an empty value and nothing extra.
    pub(crate) fn new(name: &'a str, key_prefix: &'a str, blockers: Blockers) -> Self {
        Acquire {
            name,
            key_prefix,
            value: b"",
            blockers,
            extra: Vec::new(),
            wait: true,
        }
    }
}

/// Proof that this process holds a lock (a [`Mutex`](crate::Mutex) or any other lock-like
/// primitive of this crate).
///
/// # Fencing
///
/// A lease-based lock alone **cannot** guarantee mutual exclusion: a holder that pauses (GC, swap,
/// a stopped VM) or is cut off from etcd for longer than its TTL loses the lock without running
/// any code, and may resume its critical section while a new holder runs its own. Fencing closes
/// that gap. The [`fencing_token`](Self::fencing_token) is the create revision of the holder's
/// key and strictly increases from one holder to the next; write it next to your data and
/// reject older tokens, or make your etcd writes conditional with [`txn`](Self::txn) /
/// [`is_owner`](Self::is_owner), which commit only while this exact key still exists.
///
/// # Release
///
/// [`unlock`](Self::unlock) deletes the key (fenced by its create revision, so a late retry never
/// deletes a newer holder's key) and reports errors. Dropping the guard releases in the
/// background instead: it never blocks, and [`Session::close`] waits for it.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// use etcd_coord::etcd_client::{Txn, TxnOp};
/// let lock = etcd_coord::Mutex::new(&session, "jobs/report")?;
/// let guard = lock.lock().await?;
/// // Commits only while we still hold the lock.
/// guard
///     .txn(Txn::new().and_then([TxnOp::put("jobs/report/last-run", "today", None)]))
///     .await?;
/// guard.unlock().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    session: Session,
    entry: Entry,
    acquired_rev: i64,
    released: AtomicBool,
    /// Set once this process learned that the key is gone (by `lost()` or an owner-only
    /// transaction that found it missing).
    gone: Arc<AtomicBool>,
}

impl LockGuard {
    /// The whole of an acquire, shared by every lock-like primitive: put a fresh key
    /// `<key_prefix><lease hex>_<random>` with `value`, then wait until `blockers` let it hold
    /// (or, with `wait` false, give up at once with [`Error::WouldBlock`], deleting the key).
    ///
    /// `extra` operations ride along in the joining transaction and `verify` inspects their
    /// responses (a semaphore checks its recorded permit count that way); if `verify` fails,
    /// the key is deleted and its error returned. Any error or a dropped future deletes the key.
    pub(crate) async fn acquire(
        session: &Session,
        spec: Acquire<'_>,
        verify: impl FnOnce(&[TxnOpResponse]) -> Result<()>,
    ) -> Result<LockGuard> {
        session.check_alive()?;
        let key = participant_key(spec.key_prefix, session.lease_id());
        let span = tracing::debug_span!("acquire", name = spec.name, key = %key);
        async {
            let mut pending = PendingKey::new(session, key);
            let (entry, position, extra) = wait::enqueue(
                session,
                &mut pending,
                spec.value,
                &spec.blockers,
                spec.extra,
            )
            .await?;
            verify(&extra)?;
            if !spec.wait && !position.waiting_on.is_empty() {
                wait::release(session, &entry.key, Some(entry.create_rev)).await?;
                pending.disarm();
                return Err(Error::WouldBlock {
                    name: spec.name.to_string(),
                });
            }
            let revision = wait::wait_turn(session, &entry, &spec.blockers, position).await?;
            pending.disarm();
            tracing::debug!(token = entry.create_rev, revision, "acquired");
            Ok(LockGuard::new(session, entry, revision))
        }
        .instrument(span)
        .await
    }

    /// The whole of a one-request try: put a fresh key only if every compare in `free` holds
    /// (they say "nobody holds or waits"); otherwise [`Error::WouldBlock`] and no key.
    pub(crate) async fn try_acquire(
        session: &Session,
        name: &str,
        key_prefix: &str,
        value: &[u8],
        free: Vec<Compare>,
    ) -> Result<LockGuard> {
        session.check_alive()?;
        let key = participant_key(key_prefix, session.lease_id());
        let pending = PendingKey::new(session, key.clone());
        let txn = Txn::new().when(free).and_then([TxnOp::put(
            key.clone(),
            value.to_vec(),
            Some(PutOptions::new().with_lease(session.lease_id())),
        )]);
        let mut client = session.client().clone();
        let resp = session
            .request("trying to acquire", client.txn(txn))
            .await?;
        if !resp.succeeded() {
            pending.disarm();
            return Err(Error::WouldBlock {
                name: name.to_string(),
            });
        }
        // Without a revision we cannot fence; `pending` deletes the key on the way out.
        let revision = header_revision(resp.header())?;
        pending.disarm();
        tracing::debug!(name, key = %key, token = revision, "acquired without waiting");
        let entry = Entry {
            key,
            create_rev: revision,
        };
        Ok(LockGuard::new(session, entry, revision))
    }

    pub(crate) fn new(session: &Session, entry: Entry, acquired_rev: i64) -> Self {
        LockGuard {
            session: session.clone(),
            entry,
            acquired_rev,
            released: AtomicBool::new(false),
            gone: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The key that proves ownership (`NAME/<lease hex>_<random>`).
    ///
    /// ```no_run
    /// # fn f(g: etcd_coord::LockGuard) {
    /// println!("holding {}", g.key());
    /// # }
    /// ```
    pub fn key(&self) -> &str {
        &self.entry.key
    }

    /// The fencing token: the create revision of [`key`](Self::key). It is larger than every
    /// token of every earlier holder of the same lock.
    ///
    /// ```no_run
    /// # fn f(g: etcd_coord::LockGuard) {
    /// let token: i64 = g.fencing_token();
    /// # }
    /// ```
    pub fn fencing_token(&self) -> i64 {
        self.entry.create_rev
    }

    /// The etcd revision at which this process learned it holds the lock.
    ///
    /// ```no_run
    /// # fn f(g: etcd_coord::LockGuard) {
    /// assert!(g.acquired_revision() >= g.fencing_token());
    /// # }
    /// ```
    pub fn acquired_revision(&self) -> i64 {
        self.acquired_rev
    }

    /// The session the lock is bound to.
    ///
    /// ```no_run
    /// # fn f(g: etcd_coord::LockGuard) {
    /// let lease = g.session().lease_id();
    /// # }
    /// ```
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// A comparison that holds only while this guard still owns the lock, for your own
    /// transactions.
    ///
    /// ```no_run
    /// # async fn f(g: etcd_coord::LockGuard, mut client: etcd_client::Client) -> Result<(), etcd_client::Error> {
    /// use etcd_client::{Txn, TxnOp};
    /// let txn = Txn::new().when([g.is_owner()]).and_then([TxnOp::put("k", "v", None)]);
    /// let committed = client.txn(txn).await?.succeeded();
    /// # Ok(()) }
    /// ```
    pub fn is_owner(&self) -> Compare {
        self.entry.is_owner()
    }

    /// Whether the guard still holds, as far as this process knows without asking etcd: not
    /// released, its session alive, and its key not seen gone. Use [`txn`](Self::txn) where
    /// being sure matters.
    ///
    /// ```no_run
    /// # fn f(g: etcd_coord::LockGuard) {
    /// if !g.is_held() { return; }
    /// # }
    /// ```
    pub fn is_held(&self) -> bool {
        !self.released.load(Ordering::Acquire)
            && !self.gone.load(Ordering::Acquire)
            && self.session.is_alive()
    }

    /// Completes when the lock is lost: the session ends, or the key is deleted by anyone
    /// (an operator, a lease revoke the keepalive has not seen yet). Watching the key costs one
    /// watch stream while this future is polled; none otherwise.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// ```no_run
    /// # async fn f(g: etcd_coord::LockGuard) {
    /// tokio::select! {
    ///     _ = g.lost() => eprintln!("lock lost; stopping"),
    ///     _ = critical_section() => {}
    /// }
    /// # }
    /// # async fn critical_section() {}
    /// ```
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let session = self.session.clone();
        let entry = self.entry.clone();
        let mut from = self.acquired_rev + 1;
        let gone = self.gone.clone();
        async move {
            let watch_key = async {
                let keys = [entry.key.clone().into_bytes()];
                let none = Blockers::prefixes(Vec::new());
                let mut backoff = wait::backoff();
                // Whatever wakes us, ask etcd whether the key is still ours.
                while wait::wake(&session, &keys, from, true, &mut backoff)
                    .await
                    .is_ok()
                {
                    match wait::check(&session, &entry, &none).await {
                        Ok(position) => from = position.revision + 1,
                        Err(Error::NotHeld { .. }) => {
                            gone.store(true, Ordering::Release);
                            return;
                        }
                        // The session ended, or the key can no longer be read: either way the
                        // caller can no longer count on holding.
                        Err(_) => return,
                    }
                }
            };
            tokio::select! {
                _ = session.lost() => {}
                _ = watch_key => {}
            }
        }
    }

    /// Runs `txn` only while this guard still owns the lock, atomically.
    ///
    /// Your transaction (with its own compares, success and failure branches) is nested inside
    /// one whose only compare is [`is_owner`](Self::is_owner); its response is returned as if
    /// you had sent it yourself.
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] if the lock was lost (nothing of `txn` ran); etcd errors otherwise.
    ///
    /// # Cancel safety
    ///
    /// If dropped after sending, the transaction may or may not have committed.
    ///
    /// ```no_run
    /// # async fn f(g: etcd_coord::LockGuard) -> etcd_coord::Result<()> {
    /// use etcd_coord::etcd_client::{Txn, TxnOp};
    /// g.txn(Txn::new().and_then([TxnOp::put("counter", "42", None)])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        match owner_txn(&self.session, vec![self.is_owner()], txn).await? {
            Some(resp) => Ok(resp),
            None => {
                self.gone.store(true, Ordering::Release);
                Err(Error::NotHeld {
                    key: self.entry.key.clone(),
                })
            }
        }
    }

    /// Releases the lock now: a delete fenced by the key's create revision.
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] if the key was already gone (the lock had been lost; nothing was
    /// deleted); the session's error if the session ended while holding (the key was deleted
    /// if it was still ours, but the lock may have lapsed before); [`Error::Timeout`] or
    /// [`Error::Unavailable`] if etcd did not answer, in which case the release continues in the
    /// background.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the release continues in the background.
    ///
    /// ```no_run
    /// # async fn f(g: etcd_coord::LockGuard) -> etcd_coord::Result<()> {
    /// g.unlock().await?;
    /// # Ok(()) }
    /// ```
    pub async fn unlock(self) -> Result<()> {
        self.release_in_place().await
    }

    /// Releases like [`unlock`](Self::unlock), through a shared reference. When the delete gets
    /// no answer nothing changes: the guard still holds (and its `Drop` still releases), so the
    /// caller may retry. After a success, or once the key is found gone, later calls report
    /// [`Error::NotHeld`].
    pub(crate) async fn release_in_place(&self) -> Result<()> {
        if self.released.load(Ordering::Acquire) {
            return Err(Error::NotHeld {
                key: self.entry.key.clone(),
            });
        }
        let state = self.session.state();
        let deleted =
            wait::release(&self.session, &self.entry.key, Some(self.entry.create_rev)).await?;
        self.released.store(true, Ordering::Release);
        match (deleted, state) {
            (true, SessionState::Alive) => Ok(()),
            (true, other) => Err(other.error().unwrap_or(Error::SessionClosed)),
            (false, _) => Err(Error::NotHeld {
                key: self.entry.key.clone(),
            }),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            wait::release_in_background(
                &self.session,
                self.entry.key.clone(),
                Some(self.entry.create_rev),
            );
        }
    }
}

/// Runs `txn` nested inside a transaction whose compares are `owner`, in one request; returns
/// the nested response, or `None` if an owner compare failed (then nothing of `txn` ran).
pub(crate) async fn owner_txn(
    session: &Session,
    owner: Vec<Compare>,
    txn: Txn,
) -> Result<Option<TxnResponse>> {
    let outer = Txn::new().when(owner).and_then([TxnOp::txn(txn)]);
    // One-shot and not idempotent to the caller (an ack, a fenced write): resend only what
    // provably was never sent, or a member being down fails these often.
    let resp = session
        .request_resending_unsent("running an owner-only transaction", || {
            let mut client = session.client().clone();
            let outer = outer.clone();
            async move { client.txn(outer).await }
        })
        .await?;
    if !resp.succeeded() {
        return Ok(None);
    }
    resp.op_responses()
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Txn(inner) => Some(Some(inner)),
            _ => None,
        })
        .ok_or_else(|| Error::Etcd {
            message: "unexpected reply from etcd: no nested transaction response".into(),
            source: None,
            retryable: false,
        })
}
