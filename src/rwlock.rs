//! A distributed readers–writer lock, fair in arrival order.

use etcd_client::{Compare, CompareOp};

use crate::error::Result;
use crate::guard::{Acquire, LockGuard};
use crate::keys::{prefix, validate_name};
use crate::session::Session;
use crate::wait::Blockers;

/// A readers–writer lock shared by every process that uses the same name: many readers or one
/// writer at a time.
///
/// Fair in arrival order: a writer waits for every earlier reader and writer; a reader waits
/// only for earlier writers. So a writer is never starved by a stream of readers (readers that
/// arrive after it queue behind it), and readers that arrive together share the lock.
///
/// Readers put keys under `NAME/read/`, writers under `NAME/write/`, each bound to its session's
/// lease; order is create revision. Like the [`Mutex`](crate::Mutex), a waiter watches only the
/// nearest key that blocks it plus its own key and session, so a waiter whose lease dies fails
/// instead of acquiring (Go's recipes `RWMutex` hands the write lock to two holders in that
/// case, etcd issue 16221).
///
/// Guards are [`LockGuard`]s: fencing token, owner-only transactions, `lost()`, fenced release.
/// A reader's fencing token orders it against writers, not against other readers.
///
/// Do not use the same name for a `RwLock` and a [`Mutex`](crate::Mutex): the mutex would
/// count the lock's keys as contenders.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// let lock = etcd_coord::RwLock::new(&session, "config")?;
/// let reading = lock.read().await?;
/// // ... read ...
/// reading.unlock().await?;
/// let writing = lock.write().await?;
/// // ... write, fenced with writing.txn(...) ...
/// writing.unlock().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RwLock {
    session: Session,
    name: String,
    prefix: String,
    readers: String,
    writers: String,
}

impl RwLock {
    /// A handle on the lock `name` (rules as for [`Mutex`](crate::Mutex) names). Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming `name`.
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let lock = etcd_coord::RwLock::new(&session, "config")?;
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>) -> Result<RwLock> {
        let name = name.into();
        validate_name("name", &name)?;
        let prefix = prefix(&name);
        Ok(RwLock {
            session: session.clone(),
            readers: format!("{prefix}read/"),
            writers: format!("{prefix}write/"),
            prefix,
            name,
        })
    }

    /// The lock's name.
    ///
    /// ```no_run
    /// # fn f(l: etcd_coord::RwLock) {
    /// println!("{}", l.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for shared access: until no earlier writer holds or waits.
    ///
    /// # Errors
    ///
    /// As [`Mutex::lock`](crate::Mutex::lock): the session's error if it ends first (never an
    /// acquisition), [`Error::NotHeld`](crate::Error::NotHeld) if our key is deleted, and
    /// non-retryable etcd errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped future deletes its key in the background.
    ///
    /// ```no_run
    /// # async fn f(lock: etcd_coord::RwLock) -> etcd_coord::Result<()> {
    /// let guard = lock.read().await?;
    /// # Ok(()) }
    /// ```
    pub async fn read(&self) -> Result<LockGuard> {
        let blockers = Blockers::prefixes([self.writers.clone()]);
        let spec = Acquire::new(&self.name, &self.readers, blockers);
        LockGuard::acquire(&self.session, spec, |_| Ok(())).await
    }

    /// Waits for exclusive access: until no earlier reader or writer holds or waits.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped future deletes its key in the background.
    ///
    /// ```no_run
    /// # async fn f(lock: etcd_coord::RwLock) -> etcd_coord::Result<()> {
    /// let guard = lock.write().await?;
    /// # Ok(()) }
    /// ```
    pub async fn write(&self) -> Result<LockGuard> {
        let blockers = Blockers::prefixes([self.prefix.clone()]);
        let spec = Acquire::new(&self.name, &self.writers, blockers);
        LockGuard::acquire(&self.session, spec, |_| Ok(())).await
    }

    /// Takes shared access only if no writer holds or waits, in one request.
    ///
    /// # Errors
    ///
    /// [`Error::WouldBlock`](crate::Error::WouldBlock) if a writer holds or waits (no key is
    /// left); otherwise as [`read`](Self::read), without retries.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a key that may have been written is deleted in the background.
    ///
    /// ```no_run
    /// # async fn f(lock: etcd_coord::RwLock) -> etcd_coord::Result<()> {
    /// if let Ok(guard) = lock.try_read().await { /* read */ }
    /// # Ok(()) }
    /// ```
    pub async fn try_read(&self) -> Result<LockGuard> {
        self.try_acquire(&self.readers, &self.writers).await
    }

    /// Takes exclusive access only if nobody holds or waits, in one request.
    ///
    /// # Errors
    ///
    /// [`Error::WouldBlock`](crate::Error::WouldBlock) if anyone holds or waits (no key is
    /// left); otherwise as [`write`](Self::write), without retries.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a key that may have been written is deleted in the background.
    ///
    /// ```no_run
    /// # async fn f(lock: etcd_coord::RwLock) -> etcd_coord::Result<()> {
    /// if let Ok(guard) = lock.try_write().await { /* write */ }
    /// # Ok(()) }
    /// ```
    pub async fn try_write(&self) -> Result<LockGuard> {
        self.try_acquire(&self.writers, &self.prefix).await
    }

    async fn try_acquire(&self, key_prefix: &str, blocking: &str) -> Result<LockGuard> {
        let free = Compare::version(blocking, CompareOp::Equal, 0).with_prefix();
        LockGuard::try_acquire(&self.session, &self.name, key_prefix, b"", vec![free]).await
    }
}
