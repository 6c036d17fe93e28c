//! A distributed counting semaphore whose permit count is recorded in etcd.

use etcd_client::{Compare, CompareOp, TxnOp, TxnOpResponse};

use crate::error::{Error, Result};
use crate::guard::{Acquire, LockGuard};
use crate::keys::{prefix, validate_name};
use crate::session::Session;
use crate::wait::Blockers;

/// The most permits a semaphore may have. Each check reads up to `permits + 2` keys, so the
/// bound keeps every request small.
pub const MAX_PERMITS: usize = 10_000;

/// A counting semaphore: at most `permits` holders at once among every process that uses the
/// same name.
///
/// Each attempt puts a key under `NAME/` bound to its session's lease; the `permits` oldest keys
/// hold, the rest wait in arrival order. A crashed holder's permit comes back when its lease
/// ends. The permit count is recorded in the key `NAME` by the first participant; a participant
/// that was configured with another count gets [`Error::Conflict`] instead of a silently
/// different limit. (To change the count, stop every participant and delete the key `NAME`.)
///
/// Waiting costs O(1) per wake-up and no herd: the first waiter watches the `permits` holders;
/// every later waiter watches only the waiter just ahead of it, which touches its key when it is
/// let in. A waiter whose lease dies fails instead of acquiring.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// // At most 3 concurrent exports across the fleet.
/// let exports = etcd_coord::Semaphore::new(&session, "exports", 3)?;
/// let permit = exports.acquire().await?;
/// // ... export ...
/// permit.unlock().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Semaphore {
    session: Session,
    name: String,
    prefix: String,
    permits: usize,
}

impl Semaphore {
    /// A handle on the semaphore `name` with `permits` permits. Sends nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` (rules as for [`Mutex`](crate::Mutex) names) or
    /// `permits` (0, or more than [`MAX_PERMITS`]).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let s = etcd_coord::Semaphore::new(&session, "exports", 3)?;
    /// assert!(etcd_coord::Semaphore::new(&session, "exports", 0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>, permits: usize) -> Result<Semaphore> {
        let name = name.into();
        validate_name("name", &name)?;
        if permits == 0 || permits > MAX_PERMITS {
            return Err(Error::invalid(
                "permits",
                format!("must be between 1 and {MAX_PERMITS} (got {permits})"),
            ));
        }
        Ok(Semaphore {
            session: session.clone(),
            prefix: prefix(&name),
            name,
            permits,
        })
    }

    /// The semaphore's name.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Semaphore) {
    /// println!("{}", s.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of permits this handle was configured with.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Semaphore) {
    /// assert!(s.permits() >= 1);
    /// # }
    /// ```
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// Waits for a permit.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] if the semaphore was created with another permit count; otherwise as
    /// [`Mutex::lock`](crate::Mutex::lock).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped future deletes its key in the background.
    ///
    /// ```no_run
    /// # async fn f(s: etcd_coord::Semaphore) -> etcd_coord::Result<()> {
    /// let permit = s.acquire().await?;
    /// # Ok(()) }
    /// ```
    pub async fn acquire(&self) -> Result<LockGuard> {
        self.acquire_inner(true).await
    }

    /// Takes a permit only if one is free now and nobody waits.
    ///
    /// Two requests when it fails (the attempt's key is put, then deleted), one when it
    /// succeeds: etcd cannot compare a count of keys, so the queue has to be read.
    ///
    /// # Errors
    ///
    /// [`Error::WouldBlock`] if no permit is free (no key is left); otherwise as
    /// [`acquire`](Self::acquire), without waiting.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a key that may have been written is deleted in the background.
    ///
    /// ```no_run
    /// # async fn f(s: etcd_coord::Semaphore) -> etcd_coord::Result<()> {
    /// match s.try_acquire().await {
    ///     Ok(permit) => permit.unlock().await?,
    ///     Err(etcd_coord::Error::WouldBlock { .. }) => {}
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_acquire(&self) -> Result<LockGuard> {
        self.acquire_inner(false).await
    }

    async fn acquire_inner(&self, wait: bool) -> Result<LockGuard> {
        let count = self.permits.to_string();
        // Record the count if nobody has yet, and read what is recorded, in the joining request.
        let record = etcd_client::Txn::new()
            .when([Compare::version(self.name.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(self.name.clone(), count.clone(), None)]);
        let spec = Acquire {
            extra: vec![TxnOp::txn(record), TxnOp::get(self.name.clone(), None)],
            wait,
            ..Acquire::new(
                &self.name,
                &self.prefix,
                Blockers::prefixes([self.prefix.clone()]).with_permits(self.permits),
            )
        };
        LockGuard::acquire(&self.session, spec, |extra| self.verify(extra)).await
    }

    fn verify(&self, extra: &[TxnOpResponse]) -> Result<()> {
        let recorded = extra.iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        match recorded {
            Some(v) if v == self.permits.to_string().as_bytes() => Ok(()),
            Some(v) => Err(Error::Conflict(format!(
                "semaphore {:?} has {} permits recorded in etcd, but this handle was created with {}",
                self.name,
                String::from_utf8_lossy(&v),
                self.permits
            ))),
            None => Err(Error::Conflict(format!(
                "the permit count of semaphore {:?} was deleted while joining",
                self.name
            ))),
        }
    }
}
