//! A session: one etcd lease, kept alive by one background task, with a state that never lies.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};

/// Lease TTL used when the builder is not given one: the default of Go's
/// `concurrency.NewSession` and of `etcdctl lock`/`elect`, so mixed fleets fail over alike.
///
/// A shorter TTL hands locks over faster after a crash but expires sessions on shorter pauses
/// (GC, swapping, a slow disk on the etcd leader).
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// The longest TTL etcd accepts (its `MaxLeaseTTL`).
pub const MAX_TTL: Duration = Duration::from_secs(9_000_000_000);

/// How long a single request to etcd may take before it fails with [`Error::Timeout`], unless
/// the builder says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on the pause between attempts to reopen a failed keepalive stream.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Where a session stands. Published on a [`watch`] channel by [`Session::subscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// The lease is alive as far as anyone can know: the server renewed it no earlier than the
    /// last answered keepalive was sent, and less than one TTL has passed since.
    Alive,
    /// The lease is gone, or may be gone on the server. Final.
    Expired(ExpiredCause),
    /// The owner called [`Session::close`] or [`Session::orphan`]. Final.
    Closed,
}

/// Why a session expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExpiredCause {
    /// The server reported the lease gone while its TTL had not run out by our count: someone
    /// revoked it.
    Revoked,
    /// The server reported the lease gone and its TTL may have run out there (also: an adopted
    /// lease that no longer exists).
    NotFound,
    /// No keepalive was answered within one TTL, so the server may have expired the lease. The
    /// session does not know, so it must assume the worst.
    NoAnswer,
}

impl std::fmt::Display for ExpiredCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExpiredCause::Revoked => "the lease was revoked",
            ExpiredCause::NotFound => "the lease was not found",
            ExpiredCause::NoAnswer => "no keepalive was answered within the TTL",
        })
    }
}

impl SessionState {
    /// The error an operation on a session in this state reports, or `None` while alive.
    pub(crate) fn error(self) -> Option<Error> {
        match self {
            SessionState::Alive => None,
            SessionState::Expired(cause) => Some(Error::SessionExpired(cause)),
            SessionState::Closed => Some(Error::SessionClosed),
        }
    }
}

/// Builder for a [`Session`]. Defaults are the `pub const`s of this module.
///
/// ```no_run
/// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
/// use std::time::Duration;
/// let session = etcd_coord::Session::builder(client)
///     .ttl(Duration::from_secs(10))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SessionBuilder {
    client: Client,
    ttl: Duration,
    lease: Option<i64>,
    request_timeout: Duration,
}

impl std::fmt::Debug for SessionBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionBuilder")
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl SessionBuilder {
    /// The lease TTL: whole seconds, at least one (default [`DEFAULT_TTL`]).
    ///
    /// ```no_run
    /// # fn f(client: etcd_client::Client) {
    /// let b = etcd_coord::Session::builder(client).ttl(std::time::Duration::from_secs(5));
    /// # }
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Adopts an existing lease (for example one handed over by [`Session::orphan`] before a
    /// restart) instead of granting a new one. Its TTL is read from the server.
    ///
    /// ```no_run
    /// # fn f(client: etcd_client::Client, lease: i64) {
    /// let b = etcd_coord::Session::builder(client).lease(lease);
    /// # }
    /// ```
    pub fn lease(mut self, lease: i64) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Bounds every single request that primitives on this session send (default
    /// [`DEFAULT_REQUEST_TIMEOUT`]).
    ///
    /// ```no_run
    /// # fn f(client: etcd_client::Client) {
    /// let b = etcd_coord::Session::builder(client)
    ///     .request_timeout(std::time::Duration::from_secs(2));
    /// # }
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Grants (or checks the adopted) lease and starts the keepalive task.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ttl`, `lease` or `request_timeout`;
    /// [`Error::LeaseNotFound`] for an adopted lease that does not exist; [`Error::Timeout`] or
    /// [`Error::Unavailable`] when etcd does not answer within the request timeout.
    ///
    /// # Cancel safety
    ///
    /// If dropped after the lease was granted, the lease is not revoked; it expires after its
    /// TTL.
    pub async fn build(self) -> Result<Session> {
        if self.ttl < Duration::from_secs(1) || self.ttl.subsec_nanos() != 0 {
            return Err(Error::invalid(
                "ttl",
                format!(
                    "must be a whole number of seconds, at least 1 (got {:?})",
                    self.ttl
                ),
            ));
        }
        if self.ttl > MAX_TTL {
            return Err(Error::invalid(
                "ttl",
                format!("must be at most {MAX_TTL:?}"),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::invalid(
                "request_timeout",
                "must be greater than zero",
            ));
        }
        let mut client = self.client.clone();
        let sent_at = Instant::now();
        let (lease, remaining, granted) = match self.lease {
            Some(id) if id <= 0 => {
                return Err(Error::invalid("lease", "a lease id is a positive number"))
            }
            Some(id) => {
                let resp = with_timeout(
                    self.request_timeout,
                    "reading the adopted lease",
                    client.lease_time_to_live(id, None),
                )
                .await?;
                if resp.ttl() <= 0 {
                    return Err(Error::LeaseNotFound(id));
                }
                (id, resp.ttl(), resp.granted_ttl())
            }
            None => {
                let resp = with_timeout(
                    self.request_timeout,
                    "granting the session lease",
                    client.lease_grant(self.ttl.as_secs() as i64, None),
                )
                .await?;
                (resp.id(), resp.ttl(), resp.ttl())
            }
        };
        let ttl = Duration::from_secs(granted.max(1) as u64);
        let deadline = sent_at + Duration::from_secs(remaining.max(0) as u64);
        let (state_tx, state_rx) = watch::channel(SessionState::Alive);
        let shared = Arc::new(Shared {
            state: state_tx,
            lost: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Handle::current();
        runtime.spawn(keepalive(
            client.clone(),
            lease,
            ttl,
            deadline,
            shared.clone(),
            stop.clone(),
        ));
        tracing::debug!(lease = %format_args!("{lease:x}"), ttl_s = ttl.as_secs(), "session started");
        Ok(Session {
            inner: Arc::new(Inner {
                client,
                lease,
                ttl,
                request_timeout: self.request_timeout,
                state: state_rx,
                shared,
                stop,
                tasks: TaskTracker::new(),
                runtime,
            }),
        })
    }
}

/// What the keepalive task and the handles share.
struct Shared {
    state: watch::Sender<SessionState>,
    /// Cancelled the moment the state leaves `Alive`.
    lost: CancellationToken,
}

impl Shared {
    /// Moves out of `Alive` once; later calls keep the first verdict.
    fn end(&self, state: SessionState) {
        let changed = self.state.send_if_modified(|current| {
            if *current == SessionState::Alive {
                *current = state;
                true
            } else {
                false
            }
        });
        if changed {
            self.lost.cancel();
        }
    }
}

struct Inner {
    client: Client,
    lease: i64,
    ttl: Duration,
    request_timeout: Duration,
    state: watch::Receiver<SessionState>,
    shared: Arc<Shared>,
    /// Stops the keepalive task.
    stop: CancellationToken,
    /// Background cleanups (deletes of abandoned keys), awaited by `close()`.
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The keepalive task holds no handle, so this is what ends it. The lease then expires
        // on the server after its TTL; nothing here blocks.
        self.stop.cancel();
    }
}

/// An etcd lease and its keepalive: the liveness that every primitive's keys are bound to.
///
/// When the process dies, its keepalive stops and etcd deletes every key attached to the lease
/// one TTL later; that is how the locks, leaderships and claims of a crashed process come back.
///
/// A session **never believes it is alive after the server could have expired its lease**: it
/// counts one TTL from the moment it *sent* the last keepalive that was answered (the server
/// renewed no earlier than that) and reports [`SessionState::Expired`] when that deadline passes
/// without a newer answer, even if the server is merely slow or paused. The keepalive task
/// sends every TTL/3, gives up on a reply after at most TTL/3, and reopens the keepalive stream
/// with backoff after any error (etcd-client's streams never recover by themselves).
///
/// `Session` is a cheap handle: clones share one lease and one keepalive. Every primitive keeps a
/// clone, so the keepalive runs until the last handle is dropped, or until [`close`](Self::close)
/// or [`orphan`](Self::orphan). Dropping the last handle stops the keepalive without blocking and
/// leaves the lease to expire.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> etcd_coord::Result<()> {
/// let client = etcd_coord::connect(["127.0.0.1:2379"]).await?;
/// let session = etcd_coord::Session::new(client).await?;
/// tokio::select! {
///     _ = session.lost() => eprintln!("lease lost: {:?}", session.state()),
///     _ = do_work() => {}
/// }
/// session.close().await?;
/// # Ok(()) }
/// # async fn do_work() {}
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("lease", &format_args!("{:x}", self.inner.lease))
            .field("ttl", &self.inner.ttl)
            .field("state", &self.state())
            .finish()
    }
}

impl Session {
    /// Starts a builder with the defaults ([`DEFAULT_TTL`], [`DEFAULT_REQUEST_TIMEOUT`]).
    ///
    /// ```no_run
    /// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let session = etcd_coord::Session::builder(client).build().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(client: Client) -> SessionBuilder {
        SessionBuilder {
            client,
            ttl: DEFAULT_TTL,
            lease: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// A session with the default settings.
    ///
    /// # Errors
    ///
    /// As [`SessionBuilder::build`].
    ///
    /// ```no_run
    /// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let session = etcd_coord::Session::new(client).await?;
    /// # Ok(()) }
    /// ```
    pub async fn new(client: Client) -> Result<Session> {
        Session::builder(client).build().await
    }

    /// The lease id.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Session) {
    /// println!("lease {:x}", s.lease_id());
    /// # }
    /// ```
    pub fn lease_id(&self) -> i64 {
        self.inner.lease
    }

    /// The TTL the server granted.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Session) {
    /// assert!(s.ttl().as_secs() >= 1);
    /// # }
    /// ```
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The bound on each request sent on behalf of this session.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Session) {
    /// let t = s.request_timeout();
    /// # }
    /// ```
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// The client this session uses.
    ///
    /// ```no_run
    /// # async fn f(s: etcd_coord::Session) -> Result<(), etcd_client::Error> {
    /// let mut kv = s.client().clone();
    /// kv.put("k", "v", None).await?;
    /// # Ok(()) }
    /// ```
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The state now.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Session) {
    /// if s.state() != etcd_coord::SessionState::Alive { /* stop working */ }
    /// # }
    /// ```
    pub fn state(&self) -> SessionState {
        *self.inner.state.borrow()
    }

    /// Whether the session is alive now. Cheap: no request is sent.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Session) {
    /// assert!(s.is_alive());
    /// # }
    /// ```
    pub fn is_alive(&self) -> bool {
        self.state() == SessionState::Alive
    }

    /// A receiver that sees every state change.
    ///
    /// ```no_run
    /// # async fn f(s: etcd_coord::Session) {
    /// let mut rx = s.subscribe();
    /// while rx.changed().await.is_ok() {
    ///     println!("session is now {:?}", *rx.borrow());
    /// }
    /// # }
    /// ```
    pub fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.inner.state.clone()
    }

    /// Completes when the session stops being alive (expired or closed) and yields that state.
    ///
    /// The future holds no borrow of the session, so it can be moved into a task.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping it changes nothing, and a new call sees the same outcome.
    ///
    /// ```no_run
    /// # async fn f(s: etcd_coord::Session) {
    /// let state = s.lost().await;
    /// # }
    /// ```
    pub fn lost(&self) -> impl Future<Output = SessionState> + Send + 'static {
        let token = self.inner.shared.lost.clone();
        let state = self.inner.state.clone();
        async move {
            token.cancelled().await;
            let s = *state.borrow();
            s
        }
    }

    /// A token cancelled when the session stops being alive; a child token, so cancelling it
    /// yourself does not affect the session.
    ///
    /// ```no_run
    /// # async fn f(s: etcd_coord::Session) {
    /// let token = s.lost_token();
    /// tokio::spawn(async move { token.cancelled().await; /* stop */ });
    /// # }
    /// ```
    pub fn lost_token(&self) -> CancellationToken {
        self.inner.shared.lost.child_token()
    }

    /// Fails with the session's error unless it is alive.
    pub(crate) fn check_alive(&self) -> Result<()> {
        match self.state().error() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Waits for background cleanups, then revokes the lease, deleting every key attached to it.
    ///
    /// Every handle then reports [`SessionState::Closed`] (unless it had already expired) and
    /// every guard on the session reports itself lost. Cleanups are bounded; the revoke is
    /// bounded by the request timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] or [`Error::Unavailable`] if the revoke could not be delivered. The
    /// session is closed all the same and its lease expires after its TTL.
    ///
    /// # Cancel safety
    ///
    /// If dropped midway, the session may already be closed and the lease left to expire.
    ///
    /// ```no_run
    /// # async fn f(s: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// s.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) -> Result<()> {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.shared.end(SessionState::Closed);
        self.inner.stop.cancel();
        let lease = self.inner.lease;
        let mut client = self.inner.client.clone();
        let revoked = with_timeout(
            self.inner.request_timeout,
            "revoking the session lease",
            client.lease_revoke(lease),
        )
        .await;
        tracing::debug!(lease = %format_args!("{lease:x}"), ok = revoked.is_ok(), "session closed");
        match revoked {
            Ok(_) => Ok(()),
            // Already gone on the server: that is what closing wanted.
            Err(Error::SessionExpired(ExpiredCause::NotFound)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops the keepalive and hands the lease back without revoking it.
    ///
    /// Use it to keep locks across a restart: start the next process with
    /// [`SessionBuilder::lease`] before the TTL runs out. This handle reports
    /// [`SessionState::Closed`] from now on.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Session) {
    /// let lease = s.orphan();
    /// std::env::set_var("LEASE", lease.to_string());
    /// # }
    /// ```
    pub fn orphan(&self) -> i64 {
        self.inner.stop.cancel();
        self.inner.shared.end(SessionState::Closed);
        self.inner.lease
    }

    /// Runs `fut` in the background, tracked so that [`close`](Self::close) waits for it.
    /// Never blocks and works from `Drop`.
    pub(crate) fn spawn_background<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn_on(fut, &self.inner.runtime);
    }

    /// Sends one request bounded by the session's request timeout.
    pub(crate) async fn request<T, F>(&self, operation: &'static str, fut: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        with_timeout(self.inner.request_timeout, operation, fut).await
    }
}

/// How many times [`Session::request_resending_unsent`] sends a request again.
const UNSENT_RESENDS: usize = 8;
const UNSENT_PAUSE: Duration = Duration::from_millis(10);

impl Session {
    /// Like [`request`](Self::request), but sends `send()` again (a few times, within the same
    /// time bound) while the request provably never left this process: the connection to the
    /// member that tonic's balancer picked could not be opened.
    ///
    /// Why: the balancer keeps a member that is down among its endpoints and hands it a share
    /// of the requests, which fail at once with "tcp connect error"; it even reports a failed
    /// reconnect to the next request routed there after the member is back. Measured with one
    /// of three members down, about a quarter of all requests failed that way, so a one-shot
    /// operation (an ack, an owner-only write, an unlock) failed often, and a job could run
    /// out of delivery attempts. Another member usually answers the resend. Any other error is
    /// returned as is, so a request that may have been applied is never sent twice.
    pub(crate) async fn request_resending_unsent<T, F, Fut>(
        &self,
        operation: &'static str,
        mut send: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let attempts = async {
            let mut resends = 0;
            loop {
                match send().await {
                    Err(e) if resends < UNSENT_RESENDS && never_sent(&e) => {
                        resends += 1;
                        tracing::debug!(operation, resends, "request not sent; sending again");
                        tokio::time::sleep(UNSENT_PAUSE).await;
                    }
                    other => return other,
                }
            }
        };
        with_timeout(self.inner.request_timeout, operation, attempts).await
    }
}

/// Whether the request failed before anything was written to a connection.
fn never_sent(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::Unavailable && s.message() == "tcp connect error")
}

pub(crate) async fn with_timeout<T, F>(
    after: Duration,
    operation: &'static str,
    fut: F,
) -> Result<T>
where
    F: Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::Timeout { operation, after }),
    }
}

/// Doubling pause with an upper bound, for retry loops.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    min: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            max,
            min,
        }
    }

    /// The next pause, with up to 25 % random reduction so that many clients do not retry in
    /// lock-step.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
        d - d / 4 * jitter / 1000
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The keepalive loop; see [`Session`] for the rules it keeps.
async fn keepalive(
    client: Client,
    lease: i64,
    ttl: Duration,
    mut deadline: Instant,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let lease_hex = format!("{lease:x}");
    let interval = ttl / 3;
    let mut lease_client = client.lease_client();
    let mut stream = None;
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let mut next = Instant::now() + interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep_until(next) => {}
        }
        let sent_at = Instant::now();
        let answer_by = deadline.min(sent_at + interval.max(Duration::from_millis(500)));
        let attempt = async {
            match &mut stream {
                None => {
                    // Opening the stream sends the first keepalive and waits for its answer.
                    let (keeper, replies) = lease_client.keep_alive(lease).await?;
                    stream = Some((keeper, replies));
                    Ok::<_, etcd_client::Error>(Some(ttl.as_secs() as i64))
                }
                Some((keeper, replies)) => {
                    keeper.keep_alive().await?;
                    match replies.message().await? {
                        Some(reply) => Ok(Some(reply.ttl())),
                        None => Err(etcd_client::Error::LeaseKeepAliveError(
                            "keepalive stream ended".into(),
                        )),
                    }
                }
            }
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout_at(answer_by, attempt) => r,
        };
        match outcome {
            Ok(Ok(Some(ttl_s))) if ttl_s > 0 => {
                deadline = sent_at + Duration::from_secs(ttl_s as u64);
                next = sent_at + interval;
                backoff.reset();
                tracing::trace!(lease = %lease_hex, ttl_s, "keepalive answered");
            }
            Ok(Ok(_)) => return gone(&shared, lease_hex, deadline),
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                return gone(&shared, lease_hex, deadline)
            }
            Ok(Err(e)) => {
                stream = None;
                next = Instant::now() + backoff.next_delay();
                tracing::warn!(lease = %lease_hex, error = %e, "keepalive failed; reopening the stream");
            }
            Err(_) => {
                stream = None;
                next = Instant::now() + backoff.next_delay();
                tracing::warn!(lease = %lease_hex, "keepalive unanswered; reopening the stream");
            }
        }
    }
    tracing::warn!(lease = %lease_hex, "session expired: no keepalive answered within the TTL");
    shared.end(SessionState::Expired(ExpiredCause::NoAnswer));
    // The lease may still be alive on a slow or paused server, holding keys that block others.
    // Try once to revoke it so that they move on as soon as the server is back.
    let mut client = client;
    let _ = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::time::timeout(ttl.max(Duration::from_secs(1)), client.lease_revoke(lease)) => r,
    };
}

fn gone(shared: &Shared, lease_hex: String, deadline: Instant) {
    let cause = if Instant::now() < deadline {
        ExpiredCause::Revoked
    } else {
        ExpiredCause::NotFound
    };
    tracing::warn!(lease = %lease_hex, %cause, "session expired");
    shared.end(SessionState::Expired(cause));
}
