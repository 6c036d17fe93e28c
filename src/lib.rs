//! Distributed coordination primitives on etcd v3.
//!
//! placeholder: crate docs are written once the primitives exist.
#![warn(missing_docs)]

mod cache;
mod connect;
mod discovery;
mod election;
mod error;
mod guard;
mod keys;
mod multilock;
mod mutex;
mod rwlock;
mod semaphore;
mod session;
mod wait;

#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "testing")]
pub use cache::WatchHold;
pub use cache::{CacheStats, Change, Changes, PrefixCache, PrefixCacheBuilder, Snapshot};
pub use connect::{connect, Connect, DEFAULT_DIAL_TIMEOUT};
pub use discovery::{
    Discovery, Instance, Registration, Registry, RoundRobin, MAX_INSTANCE_VALUE_LEN,
};
pub use election::{
    Election, ElectionObserver, LeaderEvent, LeaderEvents, LeaderInfo, LeaderTerm, Leadership,
};
pub use error::{BoxError, Error, Result};
pub use guard::LockGuard;
pub use keys::MAX_NAME_LEN;
pub use multilock::{Lockable, MultiGuard, MultiLock};
pub use mutex::Mutex;
pub use rwlock::RwLock;
pub use semaphore::{Semaphore, MAX_PERMITS};
pub use session::{
    ExpiredCause, Session, SessionBuilder, SessionState, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL,
    MAX_TTL,
};

/// The etcd client library this crate is built on, re-exported so that callers use the same
/// version for their own transactions ([`Compare`](etcd_client::Compare),
/// [`TxnOp`](etcd_client::TxnOp)).
pub use etcd_client;
