//! A distributed mutex, fenced and cancel-safe, that excludes Go's `concurrency.Mutex` and
//! `etcdctl lock` on the same name.

use etcd_client::{Compare, CompareOp};

use crate::error::Result;
use crate::guard::{Acquire, LockGuard};
use crate::keys::{prefix, validate_name};
use crate::session::Session;
use crate::wait::Blockers;

/// A mutual-exclusion lock shared by every process that uses the same name on the same etcd
/// cluster.
///
/// Each attempt puts a key `NAME/<lease hex>_<random>` bound to the session's lease; the key
/// with the lowest create revision holds the lock and the others queue behind it in arrival
/// order, each watching only the key just ahead of it. This is the layout of Go's
/// `concurrency.Mutex`, so a Rust process, a Go service and `etcdctl lock NAME` exclude each
/// other.
///
/// What it costs: an uncontended [`lock`](Self::lock) is one transaction and
/// [`LockGuard::unlock`] one more; a [`try_lock`](Self::try_lock) that fails is one transaction
/// and leaves no key; a waiter spends one transaction per wake-up and is woken only by the key
/// ahead of it.
///
/// Two attempts never share a key, even on one session and one name: the second waits for the
/// first like any other process would. (Go's `Mutex` lets both "hold".) So locking the same
/// mutex twice from one task without unlocking deadlocks, as with any non-reentrant lock.
///
/// See [`LockGuard`] for fencing: a lease-based lock alone does not guarantee mutual exclusion
/// when a holder pauses; fencing tokens and owner-only transactions do.
///
/// # Names
///
/// A name is non-empty, at most [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes, without control
/// characters, and does not end with `/`. Slashes inside are fine.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> etcd_coord::Result<()> {
/// let client = etcd_coord::connect(["127.0.0.1:2379"]).await?;
/// let session = etcd_coord::Session::new(client).await?;
/// let mutex = etcd_coord::Mutex::new(&session, "jobs/nightly-report")?;
/// let guard = mutex.lock().await?;
/// // ... critical section; pass guard.fencing_token() to the systems you write to ...
/// guard.unlock().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Mutex {
    session: Session,
    name: String,
    prefix: String,
}

impl Mutex {
    /// A handle on the mutex `name`. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming `name` if it is not a valid name (see the type docs).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let mutex = etcd_coord::Mutex::new(&session, "inventory")?;
    /// assert!(etcd_coord::Mutex::new(&session, "").is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>) -> Result<Mutex> {
        let name = name.into();
        validate_name("name", &name)?;
        Ok(Mutex {
            session: session.clone(),
            prefix: prefix(&name),
            name,
        })
    }

    /// The mutex's name.
    ///
    /// ```no_run
    /// # fn f(m: etcd_coord::Mutex) {
    /// println!("{}", m.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until this process holds the lock.
    ///
    /// To wait with a deadline, wrap it in [`tokio::time::timeout`]; an expired timeout leaves
    /// nothing behind.
    ///
    /// # Errors
    ///
    /// - the session's error ([`Error::SessionExpired`](crate::Error::SessionExpired), [`Error::SessionClosed`](crate::Error::SessionClosed)) if it ends
    ///   before the lock is acquired; the lock is then never reported as acquired;
    /// - [`Error::NotHeld`](crate::Error::NotHeld) if our waiting key is deleted by someone else;
    /// - non-retryable etcd errors (e.g. [`Error::PermissionDenied`](crate::Error::PermissionDenied)). Transient errors are
    ///   retried for as long as the session lives.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped at any point, its key is deleted in the background
    /// (tracked by the session, so [`Session::close`] waits for it) and no lock is held.
    ///
    /// ```no_run
    /// # async fn f(mutex: etcd_coord::Mutex) -> etcd_coord::Result<()> {
    /// use std::time::Duration;
    /// match tokio::time::timeout(Duration::from_secs(5), mutex.lock()).await {
    ///     Ok(guard) => guard?.unlock().await?,
    ///     Err(_) => eprintln!("gave up after 5 s"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lock(&self) -> Result<LockGuard> {
        let blockers = Blockers::prefixes([self.prefix.clone()]);
        let spec = Acquire::new(&self.name, &self.prefix, blockers);
        LockGuard::acquire(&self.session, spec, |_| Ok(())).await
    }

    /// Takes the lock only if nobody holds or waits for it, in one request.
    ///
    /// # Errors
    ///
    /// [`Error::WouldBlock`](crate::Error::WouldBlock) if the lock is taken (or others wait); nothing is left behind.
    /// Otherwise as [`lock`](Self::lock), except that errors are not retried.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a key that may have been written is deleted in the background.
    ///
    /// ```no_run
    /// # async fn f(mutex: etcd_coord::Mutex) -> etcd_coord::Result<()> {
    /// match mutex.try_lock().await {
    ///     Ok(guard) => guard.unlock().await?,
    ///     Err(etcd_coord::Error::WouldBlock { .. }) => println!("busy, skipping this run"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_lock(&self) -> Result<LockGuard> {
        // Any key under the prefix, holder or waiter, means we would have to wait.
        let free = Compare::version(self.prefix.clone(), CompareOp::Equal, 0).with_prefix();
        LockGuard::try_acquire(&self.session, &self.name, &self.prefix, b"", vec![free]).await
    }
}
