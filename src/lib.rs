//! Distributed coordination primitives on etcd v3.
//!
//! placeholder: crate docs are written once the primitives exist.
#![warn(missing_docs)]

mod connect;
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

#[cfg(feature = "testing")]
pub mod testing;

pub use connect::{connect, Connect, DEFAULT_DIAL_TIMEOUT};
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
