//! Several locks acquired all-or-nothing, in one canonical order.

use std::future::Future;

use etcd_client::{Compare, Txn, TxnResponse};

use crate::error::{Error, Result};
use crate::guard::{owner_txn, LockGuard};
use crate::mutex::Mutex;
use crate::rwlock::RwLock;
use crate::semaphore::Semaphore;

/// One part of a [`MultiLock`]: a lock and how to take it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Lockable {
    /// Exclusive access to a [`Mutex`].
    Mutex(Mutex),
    /// Shared access to a [`RwLock`].
    Read(RwLock),
    /// Exclusive access to a [`RwLock`].
    Write(RwLock),
    /// One permit of a [`Semaphore`].
    Semaphore(Semaphore),
}

impl Lockable {
    fn name(&self) -> &str {
        match self {
            Lockable::Mutex(m) => m.name(),
            Lockable::Read(l) | Lockable::Write(l) => l.name(),
            Lockable::Semaphore(s) => s.name(),
        }
    }

    async fn acquire(&self) -> Result<LockGuard> {
        match self {
            Lockable::Mutex(m) => m.lock().await,
            Lockable::Read(l) => l.read().await,
            Lockable::Write(l) => l.write().await,
            Lockable::Semaphore(s) => s.acquire().await,
        }
    }
}

impl From<Mutex> for Lockable {
    fn from(m: Mutex) -> Self {
        Lockable::Mutex(m)
    }
}

impl From<Semaphore> for Lockable {
    fn from(s: Semaphore) -> Self {
        Lockable::Semaphore(s)
    }
}

/// Several locks of any kind, acquired all-or-nothing.
///
/// The parts are always taken in one canonical order (by name), whatever order they were given
/// in, so two processes that lock overlapping sets cannot deadlock each other. If one part
/// fails, or the future is dropped, every part already taken is released.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// use etcd_coord::{Lockable, MultiLock, Mutex, RwLock};
/// let accounts = MultiLock::new([
///     Lockable::from(Mutex::new(&session, "accounts/alice")?),
///     Lockable::from(Mutex::new(&session, "accounts/bob")?),
///     Lockable::Read(RwLock::new(&session, "rates")?),
/// ])?;
/// let all = accounts.lock().await?;
/// // ... transfer, committing with all.txn(...) ...
/// all.unlock().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MultiLock {
    parts: Vec<Lockable>,
}

impl MultiLock {
    /// Orders the parts canonically. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `locks` if there are none, or if one name appears
    /// twice (taking it twice would wait for ourselves).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// use etcd_coord::{Lockable, MultiLock, Mutex};
    /// assert!(MultiLock::new(Vec::<Lockable>::new()).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new<I>(locks: I) -> Result<MultiLock>
    where
        I: IntoIterator,
        I::Item: Into<Lockable>,
    {
        let mut parts: Vec<Lockable> = locks.into_iter().map(Into::into).collect();
        if parts.is_empty() {
            return Err(Error::invalid("locks", "the set of locks is empty"));
        }
        parts.sort_by(|a, b| a.name().cmp(b.name()));
        if let Some(w) = parts.windows(2).find(|w| w[0].name() == w[1].name()) {
            return Err(Error::invalid(
                "locks",
                format!("{:?} appears twice", w[0].name()),
            ));
        }
        Ok(MultiLock { parts })
    }

    /// The names of the parts, in the order they are taken.
    ///
    /// ```no_run
    /// # fn f(m: etcd_coord::MultiLock) {
    /// println!("{:?}", m.names());
    /// # }
    /// ```
    pub fn names(&self) -> Vec<&str> {
        self.parts.iter().map(Lockable::name).collect()
    }

    /// Takes every part, in canonical order.
    ///
    /// # Errors
    ///
    /// The first part's error; every part taken before it is released in the background.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: parts already taken are released in the background, and the part being
    /// waited for leaves no key.
    ///
    /// ```no_run
    /// # async fn f(m: etcd_coord::MultiLock) -> etcd_coord::Result<()> {
    /// let all = m.lock().await?;
    /// all.unlock().await?;
    /// # Ok(()) }
    /// ```
    pub async fn lock(&self) -> Result<MultiGuard> {
        let mut guards = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            // On error `guards` drops here, releasing what was taken.
            guards.push(part.acquire().await?);
        }
        Ok(MultiGuard { guards })
    }
}

/// Proof of holding every part of a [`MultiLock`]. Dropping it releases them all in the
/// background.
#[derive(Debug)]
#[must_use = "dropping the guard releases the locks"]
pub struct MultiGuard {
    guards: Vec<LockGuard>,
}

impl MultiGuard {
    /// The guards of the parts, in canonical order.
    ///
    /// ```no_run
    /// # fn f(g: etcd_coord::MultiGuard) {
    /// let tokens: Vec<i64> = g.guards().iter().map(|g| g.fencing_token()).collect();
    /// # }
    /// ```
    pub fn guards(&self) -> &[LockGuard] {
        &self.guards
    }

    /// Compares that all hold only while every part is still held.
    ///
    /// ```no_run
    /// # fn f(g: etcd_coord::MultiGuard) {
    /// let owner = g.is_owner();
    /// # }
    /// ```
    pub fn is_owner(&self) -> Vec<Compare> {
        self.guards.iter().map(LockGuard::is_owner).collect()
    }

    /// Whether every part still holds, as far as this process knows without asking etcd.
    ///
    /// ```no_run
    /// # fn f(g: etcd_coord::MultiGuard) {
    /// assert!(g.is_held());
    /// # }
    /// ```
    pub fn is_held(&self) -> bool {
        self.guards.iter().all(LockGuard::is_held)
    }

    /// Completes when any part is lost.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// ```no_run
    /// # async fn f(g: etcd_coord::MultiGuard) {
    /// g.lost().await;
    /// # }
    /// ```
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let all: Vec<_> = self.guards.iter().map(|g| Box::pin(g.lost())).collect();
        async move {
            futures::future::select_all(all).await;
        }
    }

    /// Runs `txn` only while every part is still held, atomically; see [`LockGuard::txn`].
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] naming the parts' keys if any part was lost (nothing of `txn` ran).
    ///
    /// # Cancel safety
    ///
    /// If dropped after sending, the transaction may or may not have committed.
    ///
    /// ```no_run
    /// # async fn f(g: etcd_coord::MultiGuard) -> etcd_coord::Result<()> {
    /// use etcd_coord::etcd_client::{Txn, TxnOp};
    /// g.txn(Txn::new().and_then([TxnOp::put("ledger", "moved", None)])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let session = self.guards[0].session();
        owner_txn(session, self.is_owner(), txn)
            .await?
            .ok_or_else(|| Error::NotHeld {
                key: self
                    .guards
                    .iter()
                    .map(LockGuard::key)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Releases every part now.
    ///
    /// # Errors
    ///
    /// The first error among the parts' [`LockGuard::unlock`]s; the others are still released.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the remaining releases continue in the background.
    ///
    /// ```no_run
    /// # async fn f(g: etcd_coord::MultiGuard) -> etcd_coord::Result<()> {
    /// g.unlock().await?;
    /// # Ok(()) }
    /// ```
    pub async fn unlock(self) -> Result<()> {
        let results =
            futures::future::join_all(self.guards.into_iter().map(LockGuard::unlock)).await;
        results.into_iter().collect()
    }
}
