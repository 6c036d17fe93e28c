//! Distributed coordination primitives on etcd v3.
//!
//! placeholder: crate docs are written once the primitives exist.
#![warn(missing_docs)]

mod barrier;
mod connect;
mod double_barrier;
mod error;
mod guard;
mod keys;
mod mutex;
mod session;
mod wait;

#[cfg(feature = "testing")]
pub mod testing;

pub use barrier::{Barrier, BarrierHold};
pub use connect::{connect, Connect, DEFAULT_DIAL_TIMEOUT};
pub use double_barrier::{BarrierRound, DoubleBarrier};
pub use error::{BoxError, Error, Result};
pub use guard::LockGuard;
pub use keys::MAX_NAME_LEN;
pub use mutex::Mutex;
pub use session::{
    ExpiredCause, Session, SessionBuilder, SessionState, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL,
    MAX_TTL,
};

/// The etcd client library this crate is built on, re-exported so that callers use the same
/// version for their own transactions ([`Compare`](etcd_client::Compare),
/// [`TxnOp`](etcd_client::TxnOp)).
pub use etcd_client;
