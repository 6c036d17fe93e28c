//! The crate's one error type.

use std::time::Duration;

use crate::session::ExpiredCause;

/// A specialised `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
///
/// The enum is `#[non_exhaustive]`: match the variants you act on and treat the rest generically,
/// usually by their [`is_retryable`](Error::is_retryable) answer. Errors that come from etcd or the
/// transport keep the original error as their [`source`](std::error::Error::source), so a
/// formatter that walks the chain (e.g. `anyhow`'s `{:#}`) shows the whole story.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected before anything was sent to etcd.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument's name as it appears in the API.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// etcd did not answer within the time this crate allows an operation.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// How long it was given.
        after: Duration,
    },

    /// etcd could not be reached, or the member reached has no raft leader. Usually transient.
    #[error("etcd is unavailable: {message}")]
    Unavailable {
        /// What the transport or server said.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// The session's lease is gone, so nothing that depends on it holds any more.
    #[error("session expired: {0}")]
    SessionExpired(ExpiredCause),

    /// The session was closed (or orphaned) by its owner.
    #[error("session is closed")]
    SessionClosed,

    /// A lease that was to be adopted does not exist on the server.
    #[error("lease {0:x} not found")]
    LeaseNotFound(i64),

    /// A lock, leadership or claim is no longer held: its key was deleted or its session ended.
    ///
    /// Returned by operations that only make sense while holding (unlock, owner-only
    /// transactions, proclaim) when the ownership has already gone. The key is named so that
    /// logs say which one.
    #[error("no longer held: {key}")]
    NotHeld {
        /// The key that used to prove ownership.
        key: String,
    },

    /// A `try_*` operation found the resource taken. Nothing was left behind.
    #[error("{name} is held by someone else")]
    WouldBlock {
        /// The primitive's name.
        name: String,
    },

    /// The user lacks the permission for this key range or operation.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// What etcd said.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// Data found in etcd does not match what this primitive expects (for example a semaphore
    /// created with another number of permits).
    #[error("conflict: {0}")]
    Conflict(String),

    /// Any other error reported by etcd or the client library.
    #[error("etcd error: {message}")]
    Etcd {
        /// What etcd or the client said.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
        /// Whether trying again may succeed.
        retryable: bool,
    },
}

/// A boxed error usable as a `source`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Error {
    /// Whether the same operation may succeed if tried again later.
    ///
    /// True for timeouts, unavailable servers and transient server errors; false for bad input,
    /// lost ownership, ended sessions and permission errors, which no retry can cure.
    ///
    /// ```
    /// use etcd_coord::Error;
    /// let e = Error::InvalidArgument { name: "ttl", reason: "must be at least 1 s".into() };
    /// assert!(!e.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Unavailable { .. } => true,
            Error::Etcd { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// A reply from etcd that lacks what the protocol promises; retryable, since a healthy
    /// member answers properly.
    pub(crate) fn malformed(what: &str) -> Self {
        Error::Etcd {
            message: format!("unexpected reply from etcd: {what}"),
            source: None,
            retryable: true,
        }
    }

    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }
}

impl From<etcd_client::Error> for Error {
    fn from(e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        use tonic::Code;
        match e {
            E::GRpcStatus(ref status) => {
                let message = status.message().to_string();
                match status.code() {
                    Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
                        Error::Unavailable {
                            message,
                            source: Some(Box::new(e)),
                        }
                    }
                    // Putting a key on a lease the server no longer has: the session is over,
                    // whatever the keepalive has seen so far.
                    Code::NotFound if message.contains("lease not found") => {
                        Error::SessionExpired(ExpiredCause::NotFound)
                    }
                    Code::PermissionDenied | Code::Unauthenticated => Error::PermissionDenied {
                        message,
                        source: Some(Box::new(e)),
                    },
                    code => Error::Etcd {
                        message,
                        retryable: matches!(
                            code,
                            Code::Unknown
                                | Code::Aborted
                                | Code::ResourceExhausted
                                | Code::Internal
                        ),
                        source: Some(Box::new(e)),
                    },
                }
            }
            E::TransportError(_) | E::IoError(_) => Error::Unavailable {
                message: e.to_string(),
                source: Some(Box::new(e)),
            },
            E::InvalidArgs(ref m) | E::EndpointError(ref m) => Error::InvalidArgument {
                name: "endpoints",
                reason: m.clone(),
            },
            E::InvalidUri(ref u) => Error::InvalidArgument {
                name: "endpoints",
                reason: u.to_string(),
            },
            E::WatchError(_) | E::LeaseKeepAliveError(_) => Error::Etcd {
                message: e.to_string(),
                retryable: true,
                source: Some(Box::new(e)),
            },
            _ => Error::Etcd {
                message: e.to_string(),
                retryable: false,
                source: Some(Box::new(e)),
            },
        }
    }
}

/// The revision in a response header, which every etcd reply carries.
pub(crate) fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| Error::malformed("a response without a header"))
}
