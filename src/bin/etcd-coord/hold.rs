//! The commands that hold something (lock, rwlock, semaphore, elect, barrier hold, barrier
//! enter): wait for it, then hold it until interrupted or for as long as a command runs, and
//! stop the command if it is lost.

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use etcd_coord::{BarrierHold, BarrierRound, Leadership, LockGuard, Session, SessionState};

use crate::args::Holding;
use crate::child::{Ended, Relay, Running, Signals};
use crate::exit::{self, Failure};
use crate::output::{line, warn};

/// What is held.
pub enum Held {
    /// A lock-like guard: mutex, reader-writer lock, semaphore permit.
    Lock(LockGuard),
    Leader(Leadership),
    /// A session-bound barrier hold: waiters are held back while it lasts.
    Barrier(BarrierHold),
    /// A sealed round of a double barrier: leaving waits for the other members.
    Round(BarrierRound),
}

impl Held {
    fn key(&self) -> &str {
        match self {
            Held::Lock(g) => g.key(),
            Held::Leader(l) => l.key(),
            Held::Barrier(h) => h.key(),
            Held::Round(r) => r.key(),
        }
    }

    /// Completes when what is held is lost. Barriers have no fenced owner to watch; for them
    /// it is the session that matters (their keys go with its lease).
    fn lost(&self, session: &Session) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        match self {
            Held::Lock(g) => Box::pin(g.lost()),
            Held::Leader(l) => Box::pin(l.lost()),
            Held::Barrier(_) | Held::Round(_) => {
                let lost = session.lost();
                Box::pin(async move {
                    lost.await;
                })
            }
        }
    }

    async fn release(self) -> etcd_coord::Result<()> {
        match self {
            Held::Lock(g) => g.unlock().await,
            Held::Leader(l) => l.resign().await,
            Held::Barrier(h) => h.release().await,
            Held::Round(r) => r.leave().await,
        }
    }

    /// The environment of a command run while holding: for locks and leaderships as
    /// `etcdctl lock` sets it, plus the fencing token.
    fn env(&self) -> Vec<(&'static str, String)> {
        let lock = |g: &LockGuard| {
            vec![
                ("ETCD_LOCK_KEY", g.key().to_owned()),
                ("ETCD_LOCK_REV", g.acquired_revision().to_string()),
                ("ETCD_LOCK_FENCING_TOKEN", g.fencing_token().to_string()),
            ]
        };
        match self {
            Held::Lock(g) => lock(g),
            Held::Leader(l) => lock(l.as_lock_guard()),
            Held::Barrier(h) => vec![
                ("ETCD_BARRIER_KEY", h.key().to_owned()),
                ("ETCD_BARRIER_REV", h.revision().to_string()),
            ],
            Held::Round(r) => vec![
                ("ETCD_BARRIER_KEY", r.key().to_owned()),
                ("ETCD_BARRIER_ROUND", r.round().to_string()),
            ],
        }
    }
}

/// Waits for `acquire` (what: e.g. `lock "backups"`), then holds as `hold` says: until
/// interrupted, or for as long as the command runs.
pub async fn run(
    session: &Session,
    what: &str,
    acquire: impl Future<Output = etcd_coord::Result<Held>>,
    hold: &Holding,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    let held = tokio::select! {
        held = acquire => held.map_err(|e| Failure::from(e).context(format_args!("cannot acquire {what}")))?,
        // Dropping the acquire deletes our waiting key in the background; closing the session
        // waits for that.
        signo = signals.recv() => return Ok(exit::signaled(signo)),
    };
    let key = held.key().to_owned();
    tracing::debug!(%key, "holding");
    let lost = held.lost(session);
    let Some(argv) = hold.command() else {
        if let Held::Round(_) = held {
            // Without a command, a double barrier is a meeting point: everyone is here, go.
            drop(lost);
            return held
                .release()
                .await
                .map(|()| 0)
                .map_err(|e| Failure::from(e).context(format_args!("leaving {what}")));
        }
        line(&key).await?;
        tokio::select! {
            _ = lost => return Err(lost_failure(session, what, &key)),
            _ = signals.recv() => {}
        }
        release(held, &key).await;
        return Ok(0);
    };
    let job = Running::spawn(argv, &held.env(), Stdio::inherit())?;
    match job
        .supervise(lost, &mut Relay::Os(signals), hold.kill_grace)
        .await?
    {
        Ended::Exited(status) => {
            release(held, &key).await;
            Ok(exit::of_command(status))
        }
        Ended::Lost => {
            let failure = lost_failure(session, what, &key);
            Err(
                Failure::msg(format!("{}; stopped the command", failure.message))
                    .code(failure.code),
            )
        }
    }
}

fn lost_failure(session: &Session, what: &str, key: &str) -> Failure {
    let why = match session.state() {
        SessionState::Expired(cause) => format!("the session expired ({cause})"),
        SessionState::Closed => "the session was closed".to_owned(),
        // The watch on the key usually sees a revoked lease before the keepalive does.
        SessionState::Alive => "its key was deleted (by hand, or with its lease)".to_owned(),
    };
    Failure::msg(format!("lost {what} ({key}): {why}")).code(exit::LOST)
}

async fn release(held: Held, key: &str) {
    if let Err(e) = held.release().await {
        // Closing the session revokes its lease, which deletes the key all the same.
        warn(format_args!("releasing {key}: {}", exit::chain(&e)));
    }
}

/// Revokes the session's lease after its cleanups, bounded even if etcd is gone.
pub async fn close(session: &Session) {
    let bound = session.request_timeout() + Duration::from_secs(5);
    match tokio::time::timeout(bound, session.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn(format_args!(
            "closing the session: {}; its keys expire with its lease",
            exit::chain(&e)
        )),
        Err(_) => warn("closing the session took too long; its keys expire with its lease"),
    }
}
