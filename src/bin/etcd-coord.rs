//! `etcd-coord`: the crate's primitives from the shell.
//!
//! Locks, elections, reader-writer locks, semaphores, barrier holds and double-barrier rounds
//! that hold while a command runs (or until interrupted), a work queue whose worker runs a
//! command per job, an election observer and a service discovery follower. The lock and the
//! election are wire-compatible with `etcdctl lock` and `etcdctl elect`. Global options are
//! spelt as etcdctl spells them. See `etcd-coord --help` for the exit statuses.

#[path = "etcd-coord/args.rs"]
mod args;
#[path = "etcd-coord/child.rs"]
mod child;
#[path = "etcd-coord/exit.rs"]
mod exit;
#[path = "etcd-coord/follow.rs"]
mod follow;
#[path = "etcd-coord/hold.rs"]
mod hold;
#[path = "etcd-coord/output.rs"]
mod output;
#[path = "etcd-coord/queue.rs"]
mod queue;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use etcd_coord::etcd_client::Client;
use etcd_coord::{
    Barrier, Connect, DoubleBarrier, Election, JobOptions, Mutex, RwLock, Semaphore, Session,
};

use crate::args::{BarrierCommand, Cli, Command, Global, QueueCommand};
use crate::child::Signals;
use crate::exit::Failure;
use crate::hold::Held;

fn main() -> ExitCode {
    let matches = args::with_bench_help(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    // One thread is plenty, and it keeps the parent-death signal of commands reliable: the
    // kernel sends it when the thread that forked exits. Benchmarks run no commands and want
    // every core.
    let mut builder = match cli.command {
        Command::Bench { .. } => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(Failure::new("cannot start the runtime", &e)),
    };
    let result = runtime.block_on(run(cli));
    // Everything we own is closed by now; do not wait for stray blocking reads.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => report(failure),
    }
}

fn report(failure: Failure) -> ExitCode {
    eprintln!("etcd-coord: error: {}", failure.message);
    ExitCode::from(failure.code)
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    args::check(&cli)?;
    // Before connecting: an interrupted connect or wait must still clean up.
    let mut signals = Signals::install()?;
    let g = &cli.global;
    if let Command::Bench { start_etcd, args } = &cli.command {
        return tokio::select! {
            code = bench(g, *start_etcd, args) => code,
            signo = signals.recv() => Ok(exit::signaled(signo)),
        };
    }
    let client = tokio::select! {
        client = connect(g) => client?,
        signo = signals.recv() => return Ok(exit::signaled(signo)),
    };
    match &cli.command {
        Command::Elect {
            name,
            listen: true,
            json,
            ..
        } => follow::leaders(client, name, g.command_timeout, *json, &mut signals).await,
        Command::Discover {
            service,
            prefix,
            once,
            json,
        } => follow::instances(client, prefix, service, *once, *json, &mut signals).await,
        command => {
            let session = tokio::select! {
                session = session(g, client) => session?,
                signo = signals.recv() => return Ok(exit::signaled(signo)),
            };
            let result = with_session(&session, command, &mut signals).await;
            // On every path, so that nothing of ours stays in etcd (an abandoned waiting key
            // is deleted by a cleanup that closing waits for).
            hold::close(&session).await;
            result
        }
    }
}

/// The commands that need a session.
async fn with_session(
    session: &Session,
    command: &Command,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    match command {
        Command::Lock { name, hold } => {
            let lock = Mutex::new(session, name.as_str())?;
            let acquire = async { lock.lock().await.map(Held::Lock) };
            hold::run(session, &format!("lock {name:?}"), acquire, hold, signals).await
        }
        Command::Rwlock {
            name, write, hold, ..
        } => {
            let lock = RwLock::new(session, name.as_str())?;
            let acquire = async {
                if *write {
                    lock.write().await.map(Held::Lock)
                } else {
                    lock.read().await.map(Held::Lock)
                }
            };
            let mode = if *write { "write" } else { "read" };
            hold::run(
                session,
                &format!("{mode} lock {name:?}"),
                acquire,
                hold,
                signals,
            )
            .await
        }
        Command::Semaphore {
            name,
            permits,
            hold,
        } => {
            let semaphore = Semaphore::new(session, name.as_str(), *permits)?;
            let acquire = async { semaphore.acquire().await.map(Held::Lock) };
            let what = format!("a permit of semaphore {name:?}");
            hold::run(session, &what, acquire, hold, signals).await
        }
        Command::Elect {
            name,
            proposal,
            hold,
            ..
        } => {
            let election = Election::new(session, name.as_str())?;
            let proposal = proposal.clone().unwrap_or_default();
            let acquire = async { election.campaign(proposal).await.map(Held::Leader) };
            let what = format!("leadership of {name:?}");
            hold::run(session, &what, acquire, hold, signals).await
        }
        Command::Barrier(BarrierCommand::Hold {
            name,
            persistent,
            hold,
        }) => {
            let barrier = Barrier::new(session, name.as_str())?;
            let what = format!("barrier {name:?}");
            if *persistent {
                let hold = barrier
                    .hold_persistent()
                    .await
                    .map_err(|e| Failure::from(e).context(format_args!("cannot hold {what}")))?;
                output::line(hold.key()).await?;
                return Ok(0);
            }
            let acquire = async { barrier.hold().await.map(Held::Barrier) };
            hold::run(session, &what, acquire, hold, signals).await
        }
        Command::Barrier(BarrierCommand::Release { name }) => {
            let barrier = Barrier::new(session, name.as_str())?;
            let released = barrier.release().await.map_err(|e| {
                Failure::from(e).context(format_args!("releasing barrier {name:?}"))
            })?;
            output::line(if released { "released" } else { "not held" }).await?;
            Ok(0)
        }
        Command::Barrier(BarrierCommand::Wait { name }) => {
            let barrier = Barrier::new(session, name.as_str())?;
            tokio::select! {
                waited = barrier.wait() => waited.map(|()| 0).map_err(|e| {
                    Failure::from(e).context(format_args!("waiting for barrier {name:?}"))
                }),
                signo = signals.recv() => Ok(exit::signaled(signo)),
            }
        }
        Command::Barrier(BarrierCommand::Enter { name, count, hold }) => {
            let barrier = DoubleBarrier::new(session, name.as_str(), *count)?;
            let acquire = async { barrier.enter().await.map(Held::Round) };
            let what = format!("double barrier {name:?}");
            hold::run(session, &what, acquire, hold, signals).await
        }
        Command::Queue(QueueCommand::Push {
            name,
            job,
            lines,
            priority,
            delay,
        }) => {
            let mut options = JobOptions::new().priority(*priority);
            if let Some(delay) = delay {
                options = options.delay(*delay);
            }
            queue::push(session, name, job.as_deref(), *lines, options).await
        }
        Command::Queue(QueueCommand::Pop { name }) => queue::pop(session, name, signals).await,
        Command::Queue(QueueCommand::Len { name, json }) => queue::len(session, name, *json).await,
        Command::Queue(QueueCommand::Work {
            name,
            concurrency,
            max_attempts,
            retry_delay,
            kill_grace,
            command,
        }) => {
            let work = queue::Work {
                concurrency: *concurrency,
                max_attempts: *max_attempts,
                retry_delay: *retry_delay,
                kill_grace: *kill_grace,
                command: command.clone(),
            };
            queue::work(session, name, work, signals).await
        }
        Command::Discover { .. } | Command::Bench { .. } => {
            unreachable!("discover and bench need no session")
        }
    }
}

async fn connect(g: &Global) -> Result<Client, Failure> {
    let endpoints: Vec<String> = g
        .endpoints
        .iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(Failure::usage(
            "no endpoints: --endpoints (or ETCD_ENDPOINTS) is empty",
        ));
    }
    let mut connect = Connect::new(endpoints.clone()).dial_timeout(g.dial_timeout);
    if let Some(path) = &g.cacert {
        connect = connect.ca_cert_pem(read_file(path, "--cacert")?);
    }
    if let (Some(cert), Some(key)) = (&g.cert, &g.key) {
        connect = connect.client_cert_pem(read_file(cert, "--cert")?, read_file(key, "--key")?);
    }
    if let Some(user) = &g.user {
        let (name, password) = match (user.split_once(':'), &g.password) {
            (Some((name, password)), _) => (name, password),
            (None, Some(password)) => (user.as_str(), password.as_str()),
            (None, None) => {
                return Err(Failure::usage(
                    "--user needs a password: pass name:password, or --password",
                ))
            }
        };
        connect = connect.user(name, password);
    }
    connect.connect().await.map_err(|e| {
        Failure::from(e).context(format_args!(
            "cannot connect to etcd at {}",
            endpoints.join(",")
        ))
    })
}

fn read_file(path: &std::path::Path, option: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| {
        Failure::new(format_args!("{option}: cannot read {}", path.display()), &e).code(exit::USAGE)
    })
}

async fn session(g: &Global, client: Client) -> Result<Session, Failure> {
    Session::builder(client)
        .ttl(g.ttl)
        .request_timeout(g.command_timeout)
        .build()
        .await
        .map_err(|e| Failure::from(e).context("cannot start a session"))
}

/// `bench ARGS`: the library's benchmark on --endpoints, or on a server started for the run.
#[cfg(feature = "bench")]
async fn bench(g: &Global, start_etcd: bool, args: &[String]) -> Result<u8, Failure> {
    use etcd_coord::bench::{run_on, BenchOptions, USAGE};
    use etcd_coord::testing::EtcdCluster;

    if g.cacert.is_some() || g.cert.is_some() || g.user.is_some() {
        return Err(Failure::usage(
            "bench does not support --cacert, --cert, --key or --user",
        ));
    }
    let options = BenchOptions::parse(args)?;
    if options.help {
        output::line(USAGE.trim_end()).await?;
        return Ok(0);
    }
    let cluster = if start_etcd {
        EtcdCluster::single()
            .await
            .map_err(|e| Failure::new("starting etcd", &e))?
    } else {
        EtcdCluster::external(&g.endpoints)
    };
    // The report goes to stdout as the run goes; a benchmark is not disturbed by it.
    let report = run_on(&cluster, &options, &mut std::io::stdout())
        .await
        .map_err(|e| Failure::from(e).context("benchmark"))?;
    Ok(if report.success() { 0 } else { exit::ERROR })
}

#[cfg(not(feature = "bench"))]
async fn bench(_: &Global, _: bool, _: &[String]) -> Result<u8, Failure> {
    Err(Failure::usage(
        "this etcd-coord was built without the `bench` feature (build it with --features cli,bench)",
    ))
}
