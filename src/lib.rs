//! Distributed coordination primitives on etcd v3: lock critical sections, elect leaders among
//! workers, run job queues, and discover services, across processes and machines.
//!
//! Everything starts with a [`Session`]: one etcd lease, kept alive by one background task, whose
//! state ([`SessionState`]) never claims the lease is alive after the server could have expired
//! it. Every primitive puts its keys on a session's lease, so a crashed process's locks,
//! leaderships and claims come back one TTL after it dies.
//!
//! | need | type |
//! |---|---|
//! | one holder at a time | [`Mutex`] (interoperates with Go's `concurrency.Mutex` and `etcdctl lock`) |
//! | many readers or one writer | [`RwLock`] |
//! | at most N holders | [`Semaphore`] |
//! | several locks, no deadlock | [`MultiLock`] |
//! | one leader among workers | [`Election`] (interoperates with `etcdctl elect`) |
//! | a local, always-fresh copy of a prefix | [`PrefixCache`] |
//! | service registration and discovery | [`Registry`], [`Discovery`] |
//!
//! # Guarantees and their limits
//!
//! A lease-based lock **cannot by itself** guarantee mutual exclusion: a holder that pauses or is
//! cut off for longer than its TTL loses the lock without running any code. Fencing closes the
//! gap: every guard has a fencing token that strictly increases from one holder to the next, and
//! an owner-only transaction helper ([`LockGuard::txn`]) that commits only while the holder
//! still holds. Waiters watch their own key and session as well as the key ahead, so a waiter
//! whose lease died fails instead of acquiring. Dropping any future or guard cleans up in the
//! background; nothing blocks in `Drop`.
//!
//! # Example
//!
//! ```no_run
//! # async fn f() -> etcd_coord::Result<()> {
//! let client = etcd_coord::connect(["127.0.0.1:2379"]).await?;
//! let session = etcd_coord::Session::new(client).await?;
//! let guard = etcd_coord::Mutex::new(&session, "jobs/report")?.lock().await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.unlock().await?;
//! session.close().await?;
//! # Ok(()) }
//! ```
//!
//! The `testing` feature adds [`testing`], which starts real etcd servers for tests, examples
//! and benchmarks.
#![warn(missing_docs)]

mod barrier;
mod cache;
mod connect;
mod discovery;
mod double_barrier;
mod election;
mod error;
mod guard;
mod keys;
mod multilock;
mod mutex;
mod queue;
mod rwlock;
mod semaphore;
mod session;
mod wait;
mod work_queue;

#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "testing")]
pub mod testing;

pub use barrier::{Barrier, BarrierHold};
#[cfg(feature = "testing")]
pub use cache::WatchHold;
pub use cache::{CacheStats, Change, Changes, PrefixCache, PrefixCacheBuilder, Snapshot};
pub use connect::{connect, Connect, DEFAULT_DIAL_TIMEOUT};
pub use discovery::{
    Discovery, Instance, Registration, Registry, RoundRobin, MAX_INSTANCE_VALUE_LEN,
};
pub use double_barrier::{BarrierRound, DoubleBarrier};
pub use election::{
    Election, ElectionObserver, LeaderEvent, LeaderEvents, LeaderInfo, LeaderTerm, Leadership,
};
pub use error::{BoxError, Error, Result};
pub use guard::LockGuard;
pub use keys::MAX_NAME_LEN;
pub use multilock::{Lockable, MultiGuard, MultiLock};
pub use mutex::Mutex;
pub use queue::{PriorityQueue, Queue, DEFAULT_MAX_REQUEST_BYTES};
pub use rwlock::RwLock;
pub use semaphore::{Semaphore, MAX_PERMITS};
pub use session::{
    ExpiredCause, Session, SessionBuilder, SessionState, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL,
    MAX_TTL,
};
pub use work_queue::{
    Claim, Consumer, DeadLetter, Job, JobOptions, QueueStats, WorkQueue, WorkQueueBuilder,
    DEFAULT_BATCH_SIZE, DEFAULT_MAX_ATTEMPTS, MAX_BATCH_SIZE, MAX_CLAIM_BATCH,
};

/// The etcd client library this crate is built on, re-exported so that callers use the same
/// version for their own transactions ([`Compare`](etcd_client::Compare),
/// [`TxnOp`](etcd_client::TxnOp)).
pub use etcd_client;
