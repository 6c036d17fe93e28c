//! `queue push|pop|len|work`: the work queue from the shell.

use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_coord::{JobOptions, Session, WorkQueue};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::child::{Ended, Relay, Running, Signals};
use crate::exit::{self, Failure};
use crate::output::{line, warn};

/// Pushes `job`, or stdin (whole, or `lines` one job per non-empty line); prints the ids.
pub async fn push(
    session: &Session,
    name: &str,
    job: Option<&str>,
    lines: bool,
    options: JobOptions,
) -> Result<u8, Failure> {
    let queue = WorkQueue::new(session, name)?;
    let jobs: Vec<Vec<u8>> = match job {
        Some(job) => vec![job.as_bytes().to_vec()],
        None => {
            let mut input = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut input)
                .await
                .map_err(|e| Failure::new("reading the job from stdin", &e))?;
            if lines {
                input
                    .split(|&b| b == b'\n')
                    .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect()
            } else {
                vec![input]
            }
        }
    };
    for job in jobs {
        let id = queue
            .push_with(job, options.clone())
            .await
            .map_err(|e| Failure::from(e).context(format_args!("pushing to queue {name:?}")))?;
        line(&id).await?;
    }
    Ok(0)
}

/// Claims the next job, writes it to stdout as it is, and acknowledges it.
pub async fn pop(session: &Session, name: &str, signals: &mut Signals) -> Result<u8, Failure> {
    let queue = WorkQueue::new(session, name)?;
    let claim = tokio::select! {
        claim = queue.claim() => claim
            .map_err(|e| Failure::from(e).context(format_args!("taking a job from queue {name:?}")))?,
        signo = signals.recv() => return Ok(exit::signaled(signo)),
    };
    let mut out = tokio::io::stdout();
    // Unwritten, the job is given back (dropping the claim releases it).
    let written = async {
        out.write_all(claim.payload()).await?;
        out.flush().await
    };
    written
        .await
        .map_err(|e| Failure::new("writing the job to stdout", &e))?;
    let id = claim.id().to_owned();
    claim.ack().await.map_err(|e| {
        Failure::from(e).context(format_args!("acknowledging job {id} of queue {name:?}"))
    })?;
    Ok(0)
}

/// Prints the number of ready jobs, or every count as JSON.
pub async fn len(session: &Session, name: &str, as_json: bool) -> Result<u8, Failure> {
    let queue = WorkQueue::new(session, name)?;
    let stats = queue
        .stats()
        .await
        .map_err(|e| Failure::from(e).context(format_args!("counting queue {name:?}")))?;
    let text = if as_json {
        json!({
            "ready": stats.ready,
            "in_flight": stats.in_flight,
            "delayed": stats.delayed,
            "dead": stats.dead,
        })
        .to_string()
    } else {
        stats.ready.to_string()
    };
    line(&text).await?;
    Ok(0)
}

/// What `queue work` is told on its command line.
pub struct Work {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub retry_delay: Duration,
    pub kill_grace: Duration,
    pub command: Vec<String>,
}

/// Runs `work.command` for each job until interrupted (exit 0), the session is lost (75), or
/// the command cannot be started at all (126/127: better than failing every job).
pub async fn work(
    session: &Session,
    name: &str,
    work: Work,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    let queue = WorkQueue::builder(session, name)
        .max_attempts(work.max_attempts)
        .build()?;
    let (relay, relayed) = watch::channel(None);
    let stop = CancellationToken::new();
    let fatal: Arc<StdMutex<Option<Failure>>> = Arc::default();
    let handler = {
        let session = session.clone();
        let (stop, fatal) = (stop.clone(), fatal.clone());
        let argv = Arc::new(work.command);
        let grace = work.kill_grace;
        move |job: etcd_coord::Job| {
            let (session, stop, fatal, argv) =
                (session.clone(), stop.clone(), fatal.clone(), argv.clone());
            let mut relay = Relay::Shared(relayed.clone());
            async move {
                let outcome = run_job(&job, &argv, &session, &mut relay, grace).await;
                match outcome {
                    Ok(()) => Ok(Vec::new()),
                    // Every job would fail the same way: stop, and say why once.
                    Err(failure) if matches!(failure.code, exit::CANNOT_RUN | exit::NOT_FOUND) => {
                        fatal
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(failure);
                        stop.cancel();
                        Err("the command cannot be run")
                    }
                    Err(failure) => {
                        warn(format_args!(
                            "job {} (delivery {}): {}",
                            job.id(),
                            job.attempt(),
                            failure.message
                        ));
                        Err("the command failed")
                    }
                }
            }
        }
    };
    let consumer = queue
        .consumer()
        .concurrency(work.concurrency)
        .retry_delay(work.retry_delay);
    let run = consumer.run_until(stop.clone().cancelled_owned(), handler);
    tokio::pin!(run);
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            signo = signals.recv() => {
                relay.send_replace(Some(signo));
                stop.cancel();
            }
        }
    };
    if let Some(failure) = fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(failure);
    }
    match result {
        Ok(()) => Ok(0),
        Err(e @ (etcd_coord::Error::SessionExpired(_) | etcd_coord::Error::SessionClosed)) => {
            Err(Failure::from(e)
                .context(format_args!("working off queue {name:?}"))
                .code(exit::LOST))
        }
        Err(e) => Err(Failure::from(e).context(format_args!("working off queue {name:?}"))),
    }
}

/// One job: the command with the payload on stdin. Ok if it exited 0.
async fn run_job(
    job: &etcd_coord::Job,
    argv: &[String],
    session: &Session,
    relay: &mut Relay<'_>,
    grace: Duration,
) -> Result<(), Failure> {
    let env = [
        ("ETCD_JOB_ID", job.id().to_owned()),
        ("ETCD_JOB_ATTEMPT", job.attempt().to_string()),
        ("ETCD_JOB_FENCING_TOKEN", job.fencing_token().to_string()),
    ];
    let mut running = Running::spawn(argv, &env, Stdio::piped())?;
    if let Some(mut stdin) = running.take_stdin() {
        let payload = job.payload().to_vec();
        // Fed alongside, so that a command that writes before it reads cannot deadlock; one
        // that never reads its stdin is fine too (the write fails and is ignored).
        tokio::spawn(async move {
            let _ = stdin.write_all(&payload).await;
        });
    }
    let lost = session.lost();
    match running
        .supervise(
            async move {
                lost.await;
            },
            relay,
            grace,
        )
        .await?
    {
        Ended::Exited(status) if status.success() => Ok(()),
        Ended::Exited(status) => Err(Failure::msg(format!(
            "the command failed ({status}); the job will be delivered again unless out of attempts"
        ))),
        Ended::Lost => Err(Failure::msg(
            "the session was lost; stopped the command; the job will be delivered again",
        )
        .code(exit::LOST)),
    }
}
