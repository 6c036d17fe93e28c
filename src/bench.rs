//! Benchmarks: the cost model and the speed of this crate's primitives against a real etcd,
//! side by side with etcd's own server-side Lock and Election services on the same server.
//!
//! This module (behind the `bench` cargo feature) holds the workloads; `cargo bench --features
//! bench` runs them through `benches/coord.rs`, and any other front end (a CLI subcommand) can
//! call [`run`] with options from [`BenchOptions::parse`]. It is not used by the library.
//!
//! # What is measured
//!
//! Each workload reports operations per second, latency percentiles and **requests per
//! operation**: the increase of etcd's `grpc_server_handled_total` across the run, divided by
//! the operations, in total and per gRPC method. That count is free of noise, which is why the
//! cost model is stated in it. Two rules keep it exact:
//!
//! - sessions (and their clients) are created before the "before" snapshot, so granting leases
//!   is not counted unless a workload includes it;
//! - etcd counts a stream (`Watch`, `LeaseKeepAlive`) when it **ends**, so every workload ends
//!   its streams (waits done, sessions closed) before the "after" snapshot, and the snapshot
//!   waits until etcd's open-RPC count (`grpc_server_started_total` minus
//!   `grpc_server_handled_total`) is back where it was. Closing a session costs one
//!   `LeaseRevoke` (and one `LeaseKeepAlive` if its stream was open); these session-lifecycle
//!   requests are shown but left out of the cost-model checks.
//!
//! Watch events are counted with `etcd_debugging_mvcc_events_total` (events sent to watchers
//! by etcd's gRPC watch service, including the in-process watchers of the server-side Lock and
//! Election services) and store operations with `etcd_mvcc_{range,put,delete,txn}_total`. The
//! server-side services talk to the store in-process, so their gRPC count (2 per lock+unlock)
//! hides their real work; the store counts show it.
//!
//! # Adding a workload
//!
//! Add a [`Workload`] variant, its parameters in `Workload::build` and its help line in
//! [`USAGE`], and a method on `Bench` that creates its sessions, takes a `Probe`, runs, closes
//! the sessions and returns a [`BenchResult`]. Lock-like primitives only need a `Contender`
//! variant to reuse the contention loop.
//!
//! # Examples
//!
//! ```no_run
//! # async fn f() -> etcd_coord::Result<()> {
//! use etcd_coord::bench::{run, BenchOptions};
//! let options = BenchOptions::parse(["mutex-contended", "--contenders", "8", "--ops", "400"])?;
//! let report = run(&options, &mut std::io::stdout()).await?;
//! std::process::exit(if report.success() { 0 } else { 1 });
//! # }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{ElectionClient, GetOptions, LeaderKey, LockClient, LockOptions, ResignOptions};
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::keys::prefix;
use crate::testing::{EtcdCluster, Metrics};
use crate::{Connect, Election, Leadership, LockGuard, Mutex, RwLock, Semaphore, Session};

/// Command-line help for the benchmark program.
///
/// ```
/// assert!(etcd_coord::bench::USAGE.contains("mutex-contended"));
/// ```
pub const USAGE: &str = "\
usage: cargo bench --features bench -- [OPTIONS] [WORKLOAD [--PARAM VALUE]...]...

Runs the named workloads (all of them, with their defaults, when none is named) against
ETCD_ENDPOINTS if set, otherwise against a single-member etcd started for the run.

workloads and parameters [defaults]:
  mutex-uncontended  --ops [2000]                          lock+unlock by one session
  try-lock-fail      --ops [200]                           try_lock on a held mutex
  mutex-contended    --contenders [8] --ops [400]          sessions looping lock -> unlock
  election-handoff   --candidates [4] --rounds [50]        leader resigns; next one leads
  rwlock-mixed       --readers [6] --writers [2] --ops [400]
  semaphore          --contenders [8] --permits [3] --ops [400]
  waiters-scale      --waiters [10,100,1000] --sessions [10]  handoffs through W queued waiters
  queue              --producers [2] --consumers [4] --items [400]       push -> pop
  work-queue         --producers [2] --consumers [1,8] --items [400]     push -> claim -> ack

mutex-uncontended, mutex-contended and election-handoff also run on etcd's server-side
Lock / Election services (impl etcd-server-lock / etcd-server-election) on the same server.

options:
  --impl coord|server|both   which implementations run [both]
  --markdown FILE            also write the report as Markdown to FILE (see BENCHMARKS.md)
  --help                     print this text
";

/// The implementation name of this crate's primitives in results.
pub const IMPL_COORD: &str = "etcd-coord";
/// The implementation name of etcd's server-side Lock service (`v3lockpb.Lock`).
pub const IMPL_SERVER_LOCK: &str = "etcd-server-lock";
/// The implementation name of etcd's server-side Election service (`v3electionpb.Election`).
pub const IMPL_SERVER_ELECTION: &str = "etcd-server-election";

/// Bound on any single request or wait of a workload, so that a stuck server fails the run.
const REQUEST_BOUND: Duration = Duration::from_secs(60);
/// Bound on a whole workload.
const WORKLOAD_BOUND: Duration = Duration::from_secs(180);
/// How long the "after" snapshot waits for etcd to count the streams of a workload as ended.
const DRAIN_BOUND: Duration = Duration::from_secs(10);
/// Slack on exact per-operation request counts (a retried request shows as 1/ops).
const EPS: f64 = 0.01;
/// How much more a job may cost with many consumers than with one: competing consumers that
/// pick the same job spend a failed claim and a re-read, which the work queue keeps rare.
const WORK_QUEUE_SLACK: f64 = 0.05;
/// gRPC methods of a session's lifecycle rather than of the primitive's work.
const SESSION_METHODS: &[&str] = &[
    "LeaseGrant",
    "LeaseRevoke",
    "LeaseKeepAlive",
    "LeaseTimeToLive",
];
/// etcd's counter of events sent to watchers.
const EVENTS_COUNTER: &str = "etcd_debugging_mvcc_events_total";
/// etcd's counters of store operations, by the name shown in results.
const STORE_COUNTERS: &[(&str, &str)] = &[
    ("range", "etcd_mvcc_range_total"),
    ("put", "etcd_mvcc_put_total"),
    ("delete", "etcd_mvcc_delete_total"),
    ("txn", "etcd_mvcc_txn_total"),
];

/// One workload and its parameters.
///
/// ```
/// use etcd_coord::bench::Workload;
/// let all = Workload::defaults();
/// assert_eq!(all[0].name(), "mutex-uncontended");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Workload {
    /// One session: `ops` times lock + unlock on one name.
    MutexUncontended {
        /// Lock+unlock pairs.
        ops: u64,
    },
    /// `ops` failing `try_lock` calls on a mutex another session holds.
    TryLockFail {
        /// Attempts.
        ops: u64,
    },
    /// `contenders` sessions, each with its own client, looping lock → unlock on one name until
    /// `ops` acquisitions in total (those already waiting then finish theirs).
    MutexContended {
        /// Sessions competing.
        contenders: usize,
        /// Acquisitions to reach.
        ops: u64,
    },
    /// `candidates` sessions campaigning on one election; each leader resigns at once and
    /// stands again. Measures the time from `resign` to the next `campaign` returning.
    ElectionHandoff {
        /// Sessions campaigning.
        candidates: usize,
        /// Handoffs to reach.
        rounds: u64,
    },
    /// `readers` + `writers` sessions looping on one read-write lock until `ops` acquisitions.
    RwLockMixed {
        /// Sessions taking read locks.
        readers: usize,
        /// Sessions taking write locks.
        writers: usize,
        /// Acquisitions to reach.
        ops: u64,
    },
    /// `contenders` sessions looping acquire → release on a semaphore of `permits` permits.
    Semaphore {
        /// Sessions competing.
        contenders: usize,
        /// Permits of the semaphore.
        permits: usize,
        /// Acquisitions to reach.
        ops: u64,
    },
    /// For each W in `waiters`: W lock attempts queue behind a holder (spread over `sessions`
    /// sessions); the holder unlocks and each waiter, once it holds, unlocks at once. Measures
    /// requests and watch events per handoff as the queue grows.
    WaitersScale {
        /// Queue lengths to measure.
        waiters: Vec<usize>,
        /// Sessions the waiters are spread over.
        sessions: usize,
    },
    /// A FIFO [`Queue`](crate::Queue): `producers` sessions push `items` in all while, for each
    /// C in `consumers`, C sessions pop them. One operation is one item, pushed and popped.
    Queue {
        /// Sessions pushing.
        producers: usize,
        /// Numbers of consumers to measure, one run each.
        consumers: Vec<usize>,
        /// Items per run.
        items: u64,
    },
    /// A [`WorkQueue`](crate::WorkQueue), as [`Workload::Queue`]; consumers claim and ack.
    WorkQueue {
        /// Sessions pushing.
        producers: usize,
        /// Numbers of consumers to measure, one run each.
        consumers: Vec<usize>,
        /// Jobs per run.
        items: u64,
    },
}

impl Workload {
    /// Every workload with its default parameters, in the order they run.
    ///
    /// ```
    /// assert_eq!(etcd_coord::bench::Workload::defaults().len(), 9);
    /// ```
    pub fn defaults() -> Vec<Workload> {
        WORKLOAD_NAMES
            .iter()
            .map(|name| Workload::build(name, &[]).expect("defaults are valid"))
            .collect()
    }

    /// The workload's command-line name.
    ///
    /// ```
    /// let w = etcd_coord::bench::Workload::MutexUncontended { ops: 10 };
    /// assert_eq!(w.name(), "mutex-uncontended");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            Workload::MutexUncontended { .. } => "mutex-uncontended",
            Workload::TryLockFail { .. } => "try-lock-fail",
            Workload::MutexContended { .. } => "mutex-contended",
            Workload::ElectionHandoff { .. } => "election-handoff",
            Workload::RwLockMixed { .. } => "rwlock-mixed",
            Workload::Semaphore { .. } => "semaphore",
            Workload::WaitersScale { .. } => "waiters-scale",
            Workload::Queue { .. } => "queue",
            Workload::WorkQueue { .. } => "work-queue",
        }
    }

    /// The parameters, by their command-line names.
    ///
    /// ```
    /// let w = etcd_coord::bench::Workload::MutexContended { contenders: 8, ops: 400 };
    /// assert_eq!(w.params()[0].0, "contenders");
    /// ```
    pub fn params(&self) -> Vec<(&'static str, Value)> {
        match self {
            Workload::MutexUncontended { ops } | Workload::TryLockFail { ops } => {
                vec![("ops", json!(ops))]
            }
            Workload::MutexContended { contenders, ops } => {
                vec![("contenders", json!(contenders)), ("ops", json!(ops))]
            }
            Workload::ElectionHandoff { candidates, rounds } => {
                vec![("candidates", json!(candidates)), ("rounds", json!(rounds))]
            }
            Workload::RwLockMixed {
                readers,
                writers,
                ops,
            } => vec![
                ("readers", json!(readers)),
                ("writers", json!(writers)),
                ("ops", json!(ops)),
            ],
            Workload::Semaphore {
                contenders,
                permits,
                ops,
            } => vec![
                ("contenders", json!(contenders)),
                ("permits", json!(permits)),
                ("ops", json!(ops)),
            ],
            Workload::WaitersScale { waiters, sessions } => {
                vec![("waiters", json!(waiters)), ("sessions", json!(sessions))]
            }
            Workload::Queue {
                producers,
                consumers,
                items,
            }
            | Workload::WorkQueue {
                producers,
                consumers,
                items,
            } => vec![
                ("producers", json!(producers)),
                ("consumers", json!(consumers)),
                ("items", json!(items)),
            ],
        }
    }

    /// The implementations this workload runs on: this crate, and etcd's server-side service
    /// where one exists.
    fn implementations(&self, which: Implementations) -> Vec<Impl> {
        let server = match self {
            Workload::MutexUncontended { .. } | Workload::MutexContended { .. } => {
                Some(Impl::ServerLock)
            }
            Workload::ElectionHandoff { .. } => Some(Impl::ServerElection),
            _ => None,
        };
        let mut out = Vec::new();
        if which != Implementations::Server {
            out.push(Impl::Coord);
        }
        if which != Implementations::Coord {
            out.extend(server);
        }
        out
    }

    fn build(name: &str, given: &[(String, String)]) -> Result<Workload> {
        let mut p = Params::new(name, given);
        let w = match name {
            "mutex-uncontended" => Workload::MutexUncontended {
                ops: p.count("ops", 2000, 1_000_000)?,
            },
            "try-lock-fail" => Workload::TryLockFail {
                ops: p.count("ops", 200, 1_000_000)?,
            },
            "mutex-contended" => Workload::MutexContended {
                contenders: p.count("contenders", 8, 1_000)? as usize,
                ops: p.count("ops", 400, 1_000_000)?,
            },
            "election-handoff" => Workload::ElectionHandoff {
                candidates: match p.count("candidates", 4, 1_000)? {
                    1 => return Err(Error::invalid("candidates", "a handoff needs at least 2")),
                    n => n as usize,
                },
                rounds: p.count("rounds", 50, 1_000_000)?,
            },
            "rwlock-mixed" => Workload::RwLockMixed {
                readers: p.count("readers", 6, 1_000)? as usize,
                writers: p.count("writers", 2, 1_000)? as usize,
                ops: p.count("ops", 400, 1_000_000)?,
            },
            "semaphore" => Workload::Semaphore {
                contenders: p.count("contenders", 8, 1_000)? as usize,
                permits: p.count("permits", 3, crate::MAX_PERMITS as u64)? as usize,
                ops: p.count("ops", 400, 1_000_000)?,
            },
            "waiters-scale" => Workload::WaitersScale {
                waiters: p.list("waiters", &[10, 100, 1_000], 10_000)?,
                sessions: p.count("sessions", 10, 1_000)? as usize,
            },
            "queue" => Workload::Queue {
                producers: p.count("producers", 2, 1_000)? as usize,
                consumers: p.list("consumers", &[4], 1_000)?,
                items: p.count("items", 400, 1_000_000)?,
            },
            "work-queue" => Workload::WorkQueue {
                producers: p.count("producers", 2, 1_000)? as usize,
                consumers: p.list("consumers", &[1, 8], 1_000)?,
                items: p.count("items", 400, 1_000_000)?,
            },
            other => {
                return Err(Error::invalid(
                    "workload",
                    format!(
                        "unknown workload `{other}`; known: {}",
                        WORKLOAD_NAMES.join(", ")
                    ),
                ))
            }
        };
        p.finish()?;
        Ok(w)
    }
}

const WORKLOAD_NAMES: &[&str] = &[
    "mutex-uncontended",
    "try-lock-fail",
    "mutex-contended",
    "election-handoff",
    "rwlock-mixed",
    "semaphore",
    "waiters-scale",
    "queue",
    "work-queue",
];

/// The `--PARAM VALUE` pairs given to one workload, consumed as the workload reads them.
struct Params<'a> {
    workload: &'a str,
    given: Vec<(&'a str, &'a str)>,
}

impl<'a> Params<'a> {
    fn new(workload: &'a str, given: &'a [(String, String)]) -> Self {
        Params {
            workload,
            given: given
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        }
    }

    fn take(&mut self, name: &str) -> Option<&'a str> {
        let i = self.given.iter().rposition(|(k, _)| *k == name)?;
        let value = self.given[i].1;
        self.given.retain(|(k, _)| *k != name);
        Some(value)
    }

    fn count(&mut self, name: &'static str, default: u64, max: u64) -> Result<u64> {
        let Some(raw) = self.take(name) else {
            return Ok(default);
        };
        parse_count(name, raw, max)
    }

    fn list(&mut self, name: &'static str, default: &[usize], max: u64) -> Result<Vec<usize>> {
        let Some(raw) = self.take(name) else {
            return Ok(default.to_vec());
        };
        raw.split(',')
            .map(|item| parse_count(name, item.trim(), max).map(|n| n as usize))
            .collect()
    }

    fn finish(self) -> Result<()> {
        match self.given.first() {
            None => Ok(()),
            Some((k, _)) => Err(Error::invalid(
                "arguments",
                format!(
                    "`--{k}` is not a parameter of {} (see --help)",
                    self.workload
                ),
            )),
        }
    }
}

fn parse_count(name: &'static str, raw: &str, max: u64) -> Result<u64> {
    let n: u64 = raw
        .replace('_', "")
        .parse()
        .map_err(|_| Error::invalid(name, format!("`{raw}` is not a whole number")))?;
    if n == 0 || n > max {
        return Err(Error::invalid(
            name,
            format!("must be between 1 and {max} (got {n})"),
        ));
    }
    Ok(n)
}

/// Which implementations to run.
///
/// ```
/// use etcd_coord::bench::{BenchOptions, Implementations};
/// let o = BenchOptions::parse(["--impl", "coord"])?;
/// assert_eq!(o.implementations, Implementations::Coord);
/// # Ok::<(), etcd_coord::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Implementations {
    /// This crate and, where the workload has one, etcd's server-side peer.
    #[default]
    Both,
    /// Only this crate's primitives.
    Coord,
    /// Only etcd's server-side Lock and Election services.
    Server,
}

/// Parsed command line of the benchmark.
///
/// ```
/// use etcd_coord::bench::{BenchOptions, Workload};
/// let o = BenchOptions::parse(["--bench", "mutex-contended", "--contenders", "4"])?;
/// assert_eq!(o.workloads, vec![Workload::MutexContended { contenders: 4, ops: 400 }]);
/// assert_eq!(BenchOptions::parse(Vec::<String>::new())?.workloads, Workload::defaults());
/// # Ok::<(), etcd_coord::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// The workloads, in order. All of them with defaults when none was named.
    pub workloads: Vec<Workload>,
    /// Which implementations run.
    pub implementations: Implementations,
    /// Where to write a Markdown report, if anywhere.
    pub markdown: Option<PathBuf>,
    /// `--help` was given: print [`USAGE`] and run nothing.
    pub help: bool,
    /// The arguments as given (without cargo's `--bench`), to show in reports.
    pub args: Vec<String>,
}

impl BenchOptions {
    /// Parses `[OPTIONS] [WORKLOAD [--PARAM VALUE]...]...` (see [`USAGE`]). Parameters belong to
    /// the workload named before them; `--PARAM=VALUE` works too. `--bench`, which `cargo
    /// bench` appends, is ignored.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the workload, parameter or option that is unknown,
    /// missing its value, or out of range.
    ///
    /// ```
    /// use etcd_coord::bench::BenchOptions;
    /// assert!(BenchOptions::parse(["mutex-contended", "--contenders", "0"]).is_err());
    /// assert!(BenchOptions::parse(["no-such-workload"]).is_err());
    /// ```
    pub fn parse<I, S>(args: I) -> Result<BenchOptions>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.as_ref().to_string())
            .filter(|a| a != "--bench")
            .collect();
        let mut options = BenchOptions {
            workloads: Vec::new(),
            implementations: Implementations::Both,
            markdown: None,
            help: false,
            args: args.clone(),
        };
        let mut current: Option<(String, Vec<(String, String)>)> = None;
        let mut rest = args.into_iter();
        while let Some(arg) = rest.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                if arg == "-h" {
                    options.help = true;
                    continue;
                }
                if let Some((name, params)) = current.take() {
                    options.workloads.push(Workload::build(&name, &params)?);
                }
                current = Some((arg, Vec::new()));
                continue;
            };
            let (flag, inline) = match flag.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (flag.to_string(), None),
            };
            if flag == "help" {
                options.help = true;
                continue;
            }
            let value = match inline.or_else(|| rest.next()) {
                Some(v) => v,
                None => {
                    return Err(Error::invalid(
                        "arguments",
                        format!("`--{flag}` needs a value"),
                    ))
                }
            };
            match flag.as_str() {
                "impl" => {
                    options.implementations = match value.as_str() {
                        "both" => Implementations::Both,
                        "coord" | IMPL_COORD => Implementations::Coord,
                        "server" => Implementations::Server,
                        other => {
                            return Err(Error::invalid(
                                "impl",
                                format!("`{other}`: expected coord, server or both"),
                            ))
                        }
                    }
                }
                "markdown" => options.markdown = Some(PathBuf::from(value)),
                _ => match current.as_mut() {
                    Some((_, params)) => params.push((flag, value)),
                    None => {
                        return Err(Error::invalid(
                            "arguments",
                            format!("`--{flag}` comes before any workload name (see --help)"),
                        ))
                    }
                },
            }
        }
        if let Some((name, params)) = current.take() {
            options.workloads.push(Workload::build(&name, &params)?);
        }
        if options.workloads.is_empty() {
            options.workloads = Workload::defaults();
        }
        Ok(options)
    }
}

/// Latency percentiles of one set of samples (nearest rank).
///
/// ```
/// use std::time::Duration;
/// let p = etcd_coord::bench::Percentiles::of((1..=100).map(Duration::from_micros).collect());
/// assert_eq!(p.p50, Duration::from_micros(50));
/// assert_eq!(p.p99, Duration::from_micros(99));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Percentiles {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Percentiles {
    /// Computes the percentiles of `samples` by sorting them.
    ///
    /// ```
    /// let p = etcd_coord::bench::Percentiles::of(Vec::new());
    /// assert_eq!(p.count, 0);
    /// ```
    pub fn of(mut samples: Vec<Duration>) -> Percentiles {
        samples.sort_unstable();
        let rank = |q: f64| {
            let n = samples.len();
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[i]
        };
        if samples.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: samples.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

/// What a run cost on the server: the increase of etcd's counters between the snapshots.
///
/// ```no_run
/// # fn f(r: etcd_coord::bench::BenchResult) {
/// println!("{} Txn in {} ops", r.cost.get("Txn"), r.ops);
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cost {
    /// Handled gRPC requests by method (`grpc_server_handled_total`).
    pub requests: BTreeMap<String, u64>,
    /// Events sent to watchers (`etcd_debugging_mvcc_events_total`).
    pub watch_events: u64,
    /// Store operations by kind (`range`, `put`, `delete`, `txn`), from `etcd_mvcc_*_total`.
    pub store: BTreeMap<&'static str, u64>,
    /// RPCs still open at the "after" snapshot (0 unless etcd did not see a stream end in time,
    /// in which case that stream is missing from [`requests`](Self::requests)).
    pub streams_left_open: u64,
}

impl Cost {
    /// Requests of one gRPC method.
    ///
    /// ```
    /// assert_eq!(etcd_coord::bench::Cost::default().get("Txn"), 0);
    /// ```
    pub fn get(&self, method: &str) -> u64 {
        self.requests.get(method).copied().unwrap_or(0)
    }

    /// All requests.
    ///
    /// ```
    /// assert_eq!(etcd_coord::bench::Cost::default().total(), 0);
    /// ```
    pub fn total(&self) -> u64 {
        self.requests.values().sum()
    }

    /// All requests except a session's lifecycle (`LeaseGrant`, `LeaseRevoke`,
    /// `LeaseKeepAlive`, `LeaseTimeToLive`): the primitive's own work.
    ///
    /// ```
    /// assert_eq!(etcd_coord::bench::Cost::default().work(), 0);
    /// ```
    pub fn work(&self) -> u64 {
        self.requests
            .iter()
            .filter(|(m, _)| !SESSION_METHODS.contains(&m.as_str()))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The outcome of one workload on one implementation.
///
/// ```no_run
/// # fn f(r: etcd_coord::bench::BenchResult) {
/// println!("{} {}: {:.0} ops/s, {:.2} requests/op", r.workload, r.implementation,
///     r.ops_per_s(), r.requests_per_op());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct BenchResult {
    /// The workload's name.
    pub workload: &'static str,
    /// [`IMPL_COORD`], [`IMPL_SERVER_LOCK`] or [`IMPL_SERVER_ELECTION`].
    pub implementation: &'static str,
    /// The workload's parameters.
    pub params: Vec<(&'static str, Value)>,
    /// Operations done (see [`latency_of`](Self::latency_of) for what one is).
    pub ops: u64,
    /// Wall time of the operations.
    pub elapsed: Duration,
    /// What [`latency`](Self::latency) measures.
    pub latency_of: &'static str,
    /// Per-operation latency.
    pub latency: Percentiles,
    /// From the call that waits to the moment the lock was held, where it applies.
    pub wait: Option<Percentiles>,
    /// From a release call to the next holder holding, where it applies.
    pub handoff: Option<Percentiles>,
    /// What the run cost on the server.
    pub cost: Cost,
    /// The share of etcd's watchers that were unsynced (served by its 100 ms catch-up loop
    /// rather than at once), averaged over samples of `etcd_debugging_mvcc_slow_watcher_total`
    /// and `etcd_debugging_mvcc_watcher_total` taken every 100 ms while waiters waited.
    pub unsynced_watchers: Option<f64>,
    /// Workload-specific numbers (e.g. reads and writes of a read-write lock).
    pub extra: Vec<(&'static str, Value)>,
}

impl BenchResult {
    /// Operations per second.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::bench::BenchResult) {
    /// assert!(r.ops_per_s() >= 0.0);
    /// # }
    /// ```
    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// All requests per operation, session lifecycle included.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::bench::BenchResult) {
    /// println!("{:.2}", r.requests_per_op());
    /// # }
    /// ```
    pub fn requests_per_op(&self) -> f64 {
        self.per_op(self.cost.total())
    }

    /// Requests per operation without the session lifecycle (see [`Cost::work`]).
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::bench::BenchResult) {
    /// println!("{:.2}", r.work_per_op());
    /// # }
    /// ```
    pub fn work_per_op(&self) -> f64 {
        self.per_op(self.cost.work())
    }

    fn per_op(&self, n: u64) -> f64 {
        n as f64 / self.ops.max(1) as f64
    }

    fn param(&self, name: &str) -> Option<u64> {
        self.params
            .iter()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.as_u64())
    }

    fn params_text(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| match v {
                Value::Array(items) => format!(
                    "{k}={}",
                    items
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// One JSON object (one line) with every number of the result.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::bench::BenchResult) {
    /// println!("{}", r.to_json());
    /// # }
    /// ```
    pub fn to_json(&self) -> String {
        let us = |d: Duration| d.as_micros() as u64;
        let round = |x: f64, places: i32| {
            let f = 10f64.powi(places);
            (x * f).round() / f
        };
        let mut o = Map::new();
        o.insert("workload".into(), json!(self.workload));
        o.insert("impl".into(), json!(self.implementation));
        let params: Map<String, Value> = self
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        o.insert("params".into(), Value::Object(params));
        o.insert("ops".into(), json!(self.ops));
        o.insert(
            "elapsed_s".into(),
            json!(round(self.elapsed.as_secs_f64(), 3)),
        );
        o.insert("ops_per_s".into(), json!(round(self.ops_per_s(), 1)));
        o.insert("latency_of".into(), json!(self.latency_of));
        o.insert("p50_us".into(), json!(us(self.latency.p50)));
        o.insert("p99_us".into(), json!(us(self.latency.p99)));
        o.insert("max_us".into(), json!(us(self.latency.max)));
        for (label, p) in [("wait", self.wait), ("handoff", self.handoff)] {
            if let Some(p) = p {
                o.insert(format!("{label}_p50_us"), json!(us(p.p50)));
                o.insert(format!("{label}_p99_us"), json!(us(p.p99)));
                o.insert(format!("{label}_count"), json!(p.count));
            }
        }
        o.insert(
            "requests_per_op".into(),
            json!(round(self.requests_per_op(), 3)),
        );
        o.insert("work_per_op".into(), json!(round(self.work_per_op(), 3)));
        let by_method: Map<String, Value> = self
            .cost
            .requests
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| (m.clone(), json!(round(self.per_op(*n), 3))))
            .collect();
        o.insert("requests_per_op_by_method".into(), Value::Object(by_method));
        let counts: Map<String, Value> = self
            .cost
            .requests
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| (m.clone(), json!(n)))
            .collect();
        o.insert("requests".into(), Value::Object(counts));
        o.insert(
            "watch_events_per_op".into(),
            json!(round(self.per_op(self.cost.watch_events), 3)),
        );
        let store: Map<String, Value> = self
            .cost
            .store
            .iter()
            .map(|(k, n)| (k.to_string(), json!(round(self.per_op(*n), 3))))
            .collect();
        o.insert("store_ops_per_op".into(), Value::Object(store));
        if let Some(u) = self.unsynced_watchers {
            o.insert("unsynced_watchers".into(), json!(round(u, 3)));
        }
        o.insert(
            "streams_left_open".into(),
            json!(self.cost.streams_left_open),
        );
        for (k, v) in &self.extra {
            o.insert(k.to_string(), v.clone());
        }
        Value::Object(o).to_string()
    }
}

/// Whether a check is part of the cost model (a failure fails the run) or a speed target
/// (reported; a shared machine makes speed noisy).
///
/// ```
/// use etcd_coord::bench::CheckKind;
/// assert_ne!(CheckKind::CostModel, CheckKind::Target);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// Requests per operation as DESIGN.md's cost model states them.
    CostModel,
    /// Speed compared with etcd's server-side services.
    Target,
}

/// One PASS/FAIL line of the report.
///
/// ```no_run
/// # fn f(c: etcd_coord::bench::Check) {
/// println!("{} {}: {}", if c.passed { "PASS" } else { "FAIL" }, c.name, c.detail);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// Cost model or speed target.
    pub kind: CheckKind,
    /// Whether it holds.
    pub passed: bool,
    /// The numbers behind the verdict.
    pub detail: String,
}

impl Check {
    fn line(&self) -> String {
        let kind = match self.kind {
            CheckKind::CostModel => "cost",
            CheckKind::Target => "target",
        };
        format!(
            "{} [{kind}] {}: {}",
            if self.passed { "PASS" } else { "FAIL" },
            self.name,
            self.detail
        )
    }
}

/// Where the benchmark ran.
///
/// ```no_run
/// # fn f(r: etcd_coord::bench::Report) {
/// println!("{} CPUs, etcd {}", r.environment.cpus, r.environment.etcd_version);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Environment {
    /// CPUs available to this process (`nproc`).
    pub cpus: usize,
    /// The CPU model from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `/proc/loadavg` when the run started.
    pub load_before: String,
    /// `/proc/loadavg` when the run ended.
    pub load_after: String,
    /// etcd's version (`/version`).
    pub etcd_version: String,
    /// The endpoint all clients and metrics use.
    pub endpoint: String,
    /// The member's data dir, when this process started it.
    pub data_dir: Option<PathBuf>,
    /// The file system type of the data dir (`tmpfs`, `ext4`, ...), when known.
    pub data_dir_fs: Option<String>,
    /// Whether the server came from `ETCD_ENDPOINTS` (then other clients may add to the counts).
    pub external: bool,
}

/// Everything a run produced.
///
/// ```no_run
/// # fn f(r: etcd_coord::bench::Report) {
/// for c in &r.checks { println!("{} {}", c.name, c.passed); }
/// std::process::exit(if r.success() { 0 } else { 1 });
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Report {
    /// Machine and server.
    pub environment: Environment,
    /// One entry per workload and implementation (several for `waiters-scale`).
    pub results: Vec<BenchResult>,
    /// The checks, cost model first.
    pub checks: Vec<Check>,
    /// Workloads that failed, with their error.
    pub errors: Vec<String>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Report {
    /// True when every workload ran and every cost-model check passed. Speed targets do not
    /// count: they are reported, and judged by a human who knows how busy the machine was.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::bench::Report) {
    /// if !r.success() { eprintln!("cost model violated or a workload failed"); }
    /// # }
    /// ```
    pub fn success(&self) -> bool {
        self.errors.is_empty()
            && self
                .checks
                .iter()
                .all(|c| c.passed || c.kind != CheckKind::CostModel)
    }

    /// The report as Markdown: machine, server, command, results table, checks and notes.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::bench::Report, o: etcd_coord::bench::BenchOptions) {
    /// std::fs::write("BENCHMARKS.md", r.to_markdown(&o)).unwrap();
    /// # }
    /// ```
    pub fn to_markdown(&self, options: &BenchOptions) -> String {
        markdown(self, options)
    }
}

/// Runs the workloads of `options` against `ETCD_ENDPOINTS`, or against a single-member etcd
/// started for the run (and stopped when it ends), writing progress, a table, one JSON line per
/// result and the checks to `out`. With [`BenchOptions::markdown`], also writes that file.
///
/// # Errors
///
/// [`Error::Unavailable`] if no etcd can be started or reached, or if its metrics cannot be
/// read; an error writing `out` or the Markdown file. A workload that fails does not end the
/// run: it is listed in [`Report::errors`].
///
/// # Cancel safety
///
/// Dropping the future stops the run; sessions it created are dropped without being closed
/// (their leases expire) and a server it started is killed.
///
/// ```no_run
/// # async fn f() -> etcd_coord::Result<()> {
/// let options = etcd_coord::bench::BenchOptions::parse(["try-lock-fail"])?;
/// let report = etcd_coord::bench::run(&options, &mut std::io::stdout()).await?;
/// assert!(report.success());
/// # Ok(()) }
/// ```
pub async fn run<W: Write>(options: &BenchOptions, out: &mut W) -> Result<Report> {
    let cluster = EtcdCluster::from_env_or_start(1)
        .await
        .map_err(|e| unavailable("starting etcd", e))?;
    run_on(&cluster, options, out).await
}

/// Like [`run`], on a cluster the caller provides. Clients and metrics use its first member.
///
/// # Errors
///
/// As [`run`].
///
/// # Cancel safety
///
/// As [`run`], except that the cluster is the caller's.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
/// let options = etcd_coord::bench::BenchOptions::parse(["mutex-uncontended", "--ops", "50"])?;
/// let report = etcd_coord::bench::run_on(&cluster, &options, &mut std::io::sink()).await?;
/// # Ok(()) }
/// ```
pub async fn run_on<W: Write>(
    cluster: &EtcdCluster,
    options: &BenchOptions,
    out: &mut W,
) -> Result<Report> {
    let started = Instant::now();
    let mut environment = Environment::probe(cluster).await?;
    write_header(out, &environment).map_err(output)?;
    let bench = Bench::new(cluster);
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for workload in &options.workloads {
        for implementation in workload.implementations(options.implementations) {
            let label = format!("{} ({})", workload.name(), implementation.name());
            writeln!(out, "running {label} ...").map_err(output)?;
            out.flush().map_err(output)?;
            match tokio::time::timeout(WORKLOAD_BOUND, bench.run(workload, implementation)).await {
                Ok(Ok(rs)) => {
                    for r in rs {
                        write_result(out, &r).map_err(output)?;
                        results.push(r);
                    }
                }
                Ok(Err(e)) => {
                    writeln!(out, "ERROR {label}: {e}").map_err(output)?;
                    errors.push(format!("{label}: {e}"));
                }
                Err(_) => {
                    writeln!(
                        out,
                        "ERROR {label}: did not finish within {WORKLOAD_BOUND:?}"
                    )
                    .map_err(output)?;
                    errors.push(format!("{label}: timed out"));
                }
            }
        }
    }
    environment.load_after = load_average();
    let elapsed = started.elapsed();
    let checks = checks(&results, elapsed, &options.workloads);
    let report = Report {
        environment,
        results,
        checks,
        errors,
        elapsed,
    };
    write_summary(out, &report).map_err(output)?;
    if let Some(path) = &options.markdown {
        std::fs::write(path, report.to_markdown(options)).map_err(output)?;
        writeln!(out, "wrote {}", path.display()).map_err(output)?;
    }
    Ok(report)
}

fn unavailable(what: &str, e: std::io::Error) -> Error {
    Error::Unavailable {
        message: format!("{what}: {e}"),
        source: Some(Box::new(e)),
    }
}

fn output(e: std::io::Error) -> Error {
    Error::Etcd {
        message: format!("writing the benchmark report: {e}"),
        source: Some(Box::new(e)),
        retryable: false,
    }
}

/// Bounds one request or wait of a workload.
async fn bounded<T>(what: &'static str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(REQUEST_BOUND, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            operation: what,
            after: REQUEST_BOUND,
        }),
    }
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Etcd {
        message: format!("a benchmark task failed: {e}"),
        source: Some(Box::new(e)),
        retryable: false,
    }
}

/// Which implementation one run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Impl {
    Coord,
    ServerLock,
    ServerElection,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Coord => IMPL_COORD,
            Impl::ServerLock => IMPL_SERVER_LOCK,
            Impl::ServerElection => IMPL_SERVER_ELECTION,
        }
    }
}

impl Environment {
    async fn probe(cluster: &EtcdCluster) -> Result<Environment> {
        let etcd_version = cluster
            .version()
            .await
            .map_err(|e| unavailable("reading etcd's version", e))?;
        let data_dir = cluster.data_dir(0);
        let data_dir_fs = data_dir.as_deref().and_then(fs_type);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Ok(Environment {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            load_before: load_average(),
            load_after: String::new(),
            etcd_version,
            endpoint: cluster.endpoint(0),
            data_dir,
            data_dir_fs,
            external: cluster.is_external(),
        })
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The type of the file system holding `path`: the longest mount point in `/proc/mounts` that
/// contains it.
fn fs_type(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let mount_point = fields.next()?;
            let fs = fields.next()?;
            path.starts_with(mount_point)
                .then(|| (mount_point.len(), fs.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
}

/// The counters of one snapshot that a run needs.
fn open_rpcs(m: &Metrics) -> f64 {
    m.counter("grpc_server_started_total") - m.counter("grpc_server_handled_total")
}

/// A "before" snapshot, taken once a workload's sessions exist.
struct Probe {
    before: Metrics,
}

impl Probe {
    /// Takes the "after" snapshot once etcd has seen every stream opened since "before" end,
    /// and returns the difference.
    async fn finish(self, bench: &Bench<'_>) -> Result<Cost> {
        let baseline = open_rpcs(&self.before);
        let deadline = Instant::now() + DRAIN_BOUND;
        let after = loop {
            let now = bench.metrics().await?;
            if open_rpcs(&now) <= baseline || Instant::now() >= deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let delta = after.since(&self.before);
        let count = |name: &str| delta.counter(name).max(0.0).round() as u64;
        Ok(Cost {
            requests: delta.handled.clone(),
            watch_events: count(EVENTS_COUNTER),
            store: STORE_COUNTERS
                .iter()
                .map(|(label, name)| (*label, count(name)))
                .collect(),
            streams_left_open: (open_rpcs(&after) - baseline).max(0.0).round() as u64,
        })
    }
}

/// Samples shared by the tasks of one run.
#[derive(Default)]
struct Samples {
    latency: Vec<Duration>,
    wait: Vec<Duration>,
    handoff: Vec<Duration>,
}

/// State shared by the tasks of one contended run.
#[derive(Default)]
struct Shared {
    done: AtomicU64,
    stopping: AtomicBool,
    samples: std::sync::Mutex<Samples>,
    /// When the last release (unlock, resign) was called: the start of the next handoff.
    last_release: std::sync::Mutex<Option<Instant>>,
}

impl Shared {
    fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn last_release(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.last_release
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self) -> Samples {
        std::mem::take(&mut *self.samples())
    }
}

/// One participant of a lock-like workload.
enum Contender {
    Mutex(Mutex),
    Read(RwLock),
    Write(RwLock),
    Semaphore(Semaphore),
    ServerLock(Box<ServerLock>),
}

/// A participant of etcd's server-side Lock service, on our session's lease.
struct ServerLock {
    client: LockClient,
    name: String,
    lease: i64,
}

/// Proof of holding, for either implementation.
enum Held {
    Guard(LockGuard),
    ServerKey(Box<LockClient>, Vec<u8>),
}

impl Contender {
    fn mutex(session: &Session, name: &str, implementation: Impl) -> Result<Contender> {
        Ok(match implementation {
            Impl::Coord => Contender::Mutex(Mutex::new(session, name)?),
            _ => Contender::ServerLock(Box::new(ServerLock {
                client: session.client().lock_client(),
                name: name.to_string(),
                lease: session.lease_id(),
            })),
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Contender::Read(_) => "reads",
            Contender::Write(_) => "writes",
            _ => "acquisitions",
        }
    }

    async fn acquire(&mut self) -> Result<Held> {
        let guard = match self {
            Contender::Mutex(m) => bounded("lock", m.lock()).await?,
            Contender::Read(rw) => bounded("read lock", rw.read()).await?,
            Contender::Write(rw) => bounded("write lock", rw.write()).await?,
            Contender::Semaphore(s) => bounded("semaphore acquire", s.acquire()).await?,
            Contender::ServerLock(server) => {
                let ServerLock {
                    client,
                    name,
                    lease,
                } = &mut **server;
                let options = LockOptions::new().with_lease(*lease);
                let resp = bounded("server-side lock", async {
                    Ok(client.lock(name.as_str(), Some(options)).await?)
                })
                .await?;
                return Ok(Held::ServerKey(
                    Box::new(client.clone()),
                    resp.key().to_vec(),
                ));
            }
        };
        Ok(Held::Guard(guard))
    }
}

impl Held {
    async fn release(self) -> Result<()> {
        match self {
            Held::Guard(g) => bounded("unlock", g.unlock()).await,
            Held::ServerKey(mut client, key) => {
                bounded("server-side unlock", async {
                    client.unlock(key).await?;
                    Ok(())
                })
                .await
            }
        }
    }
}

/// One candidate of the election workload.
enum Candidate {
    Coord(Box<Election>),
    Server(Box<ServerCandidate>),
}

/// A candidate in etcd's server-side Election service, on our session's lease.
struct ServerCandidate {
    client: ElectionClient,
    name: String,
    lease: i64,
}

enum Won {
    Coord(Leadership),
    Server(Box<ElectionClient>, LeaderKey),
}

impl Candidate {
    async fn campaign(&mut self, value: &str) -> Result<Won> {
        match self {
            Candidate::Coord(e) => Ok(Won::Coord(bounded("campaign", e.campaign(value)).await?)),
            Candidate::Server(server) => {
                let ServerCandidate {
                    client,
                    name,
                    lease,
                } = &mut **server;
                let mut resp = bounded("server-side campaign", async {
                    Ok(client.campaign(name.as_str(), value, *lease).await?)
                })
                .await?;
                let leader = resp.take_leader().ok_or_else(|| Error::Etcd {
                    message: "a Campaign response without a leader key".into(),
                    source: None,
                    retryable: false,
                })?;
                Ok(Won::Server(Box::new(client.clone()), leader))
            }
        }
    }
}

impl Won {
    async fn resign(self) -> Result<()> {
        match self {
            Won::Coord(l) => bounded("resign", l.resign()).await,
            Won::Server(mut client, leader) => {
                bounded("server-side resign", async {
                    client
                        .resign(Some(ResignOptions::new().with_leader(leader)))
                        .await?;
                    Ok(())
                })
                .await
            }
        }
    }
}

/// A producer's or consumer's handle on the queue of a queue workload.
enum QueueHandle {
    Fifo(crate::Queue),
    Work(crate::WorkQueue),
}

impl QueueHandle {
    async fn push(&self, value: Vec<u8>) -> Result<()> {
        match self {
            QueueHandle::Fifo(q) => bounded("push", q.push(value)).await,
            QueueHandle::Work(q) => bounded("push", q.push(value)).await.map(|_| ()),
        }
    }

    /// The next item: popped, or claimed and acknowledged.
    async fn take(&self) -> Result<Vec<u8>> {
        match self {
            QueueHandle::Fifo(q) => bounded("pop", q.pop()).await,
            QueueHandle::Work(q) => {
                let claim = bounded("claim", q.claim()).await?;
                let payload = claim.payload().to_vec();
                bounded("ack", claim.ack()).await?;
                Ok(payload)
            }
        }
    }
}

/// The context of one benchmark run: the server, and a key prefix no one else uses.
struct Bench<'a> {
    cluster: &'a EtcdCluster,
    endpoint: String,
    run_id: String,
}

impl<'a> Bench<'a> {
    fn new(cluster: &'a EtcdCluster) -> Self {
        Bench {
            cluster,
            endpoint: cluster.endpoint(0),
            run_id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    fn name(&self, what: &str) -> String {
        format!("bench/{}/{what}", self.run_id)
    }

    async fn metrics(&self) -> Result<Metrics> {
        self.cluster
            .metrics(0)
            .await
            .map_err(|e| unavailable("reading etcd's metrics", e))
    }

    async fn probe(&self) -> Result<Probe> {
        Ok(Probe {
            before: self.metrics().await?,
        })
    }

    /// Producers push `items` in all (each value is its push time) and `consumers` take them
    /// (pop, or claim and ack) until all are taken: at the same time for a queue, after the
    /// pushes for a work queue (a backlog to compete for). The latency of an item runs from its
    /// push call to the end of its pop or ack.
    async fn queue(
        &self,
        workload: &Workload,
        producers: usize,
        consumers: usize,
        items: u64,
    ) -> Result<BenchResult> {
        let name = self.name(&format!("{}-{consumers}", workload.name()));
        let sessions = self.sessions(producers + consumers).await?;
        let work = matches!(workload, Workload::WorkQueue { .. });
        let handles = sessions
            .iter()
            .map(|s| {
                Ok(if work {
                    QueueHandle::Work(crate::WorkQueue::new(s, &name)?)
                } else {
                    QueueHandle::Fifo(crate::Queue::new(s, &name)?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared::default());
        let all_taken = tokio_util::sync::CancellationToken::new();
        let probe = self.probe().await?;
        let base = Instant::now();
        let mut tasks = JoinSet::new();
        let mut handles = handles.into_iter();
        for (i, handle) in handles.by_ref().take(producers).enumerate() {
            let mine = items / producers as u64 + u64::from((i as u64) < items % producers as u64);
            tasks.spawn(async move {
                for _ in 0..mine {
                    let pushed = base.elapsed().as_nanos() as u64;
                    handle.push(pushed.to_le_bytes().to_vec()).await?;
                }
                Ok(())
            });
        }
        if work {
            // Work-queue consumers compete for a backlog, the case the cost model speaks of
            // ("independent of how many consumers compete"). With consumers faster than the
            // producers they would mostly wait idle for single jobs instead, which costs more
            // per job from two consumers on (see the work queue's docs); the queue workload
            // keeps measuring that mix.
            join_all(&mut tasks).await?;
        }
        for handle in handles {
            let shared = shared.clone();
            let all_taken = all_taken.clone();
            tasks.spawn(async move {
                loop {
                    let value = tokio::select! {
                        _ = all_taken.cancelled() => return Ok(()),
                        value = handle.take() => value?,
                    };
                    let pushed = <[u8; 8]>::try_from(value.as_slice())
                        .map(u64::from_le_bytes)
                        .map_err(|_| {
                            Error::Conflict("a queue item that this run did not push".into())
                        })?;
                    let latency = base.elapsed().saturating_sub(Duration::from_nanos(pushed));
                    shared.samples().latency.push(latency);
                    if shared.done.fetch_add(1, Ordering::AcqRel) + 1 >= items {
                        all_taken.cancel();
                    }
                }
            });
        }
        let (joined, unsynced) = self.watch_load(join_all(&mut tasks)).await;
        joined?;
        let elapsed = base.elapsed();
        close(&sessions).await?;
        let cost = probe.finish(self).await?;
        let mut result = result(
            workload,
            Impl::Coord,
            shared.done.load(Ordering::Acquire),
            elapsed,
            if work {
                "push call to ack returned"
            } else {
                "push call to pop returned"
            },
            shared.take(),
            cost,
        );
        result.params = vec![
            ("producers", json!(producers)),
            ("consumers", json!(consumers)),
            ("items", json!(items)),
        ];
        result.unsynced_watchers = unsynced;
        Ok(result)
    }

    /// Runs `work` while sampling, every 100 ms, the share of etcd's watchers that are
    /// unsynced; `None` if no sample saw a watcher.
    async fn watch_load<T>(&self, work: impl Future<Output = T>) -> (T, Option<f64>) {
        let done = tokio_util::sync::CancellationToken::new();
        let work = async {
            let out = work.await;
            done.cancel();
            out
        };
        let sample = async {
            let (mut slow, mut all) = (0.0, 0.0);
            loop {
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if let Ok(m) = self.metrics().await {
                    slow += m.counter("etcd_debugging_mvcc_slow_watcher_total");
                    all += m.counter("etcd_debugging_mvcc_watcher_total");
                }
            }
            (all > 0.0).then(|| slow / all)
        };
        tokio::join!(work, sample)
    }

    /// `n` sessions, each on its own client (its own connection), made concurrently.
    async fn sessions(&self, n: usize) -> Result<Vec<Session>> {
        let one = || async {
            let client = Connect::new([self.endpoint.clone()]).connect().await?;
            Session::new(client).await
        };
        futures::future::try_join_all((0..n).map(|_| one())).await
    }

    async fn run(&self, workload: &Workload, implementation: Impl) -> Result<Vec<BenchResult>> {
        let single = |r: BenchResult| vec![r];
        Ok(match workload {
            Workload::MutexUncontended { ops } => single(
                self.mutex_uncontended(workload, *ops, implementation)
                    .await?,
            ),
            Workload::TryLockFail { ops } => single(self.try_lock_fail(workload, *ops).await?),
            Workload::MutexContended { contenders, ops } => {
                let name = self.name("mutex-contended");
                let sessions = self.sessions(*contenders).await?;
                let contenders = sessions
                    .iter()
                    .map(|s| Contender::mutex(s, &name, implementation))
                    .collect::<Result<Vec<_>>>()?;
                single(
                    self.contend(workload, implementation, sessions, contenders, *ops, true)
                        .await?,
                )
            }
            Workload::RwLockMixed {
                readers,
                writers,
                ops,
            } => {
                let name = self.name("rwlock-mixed");
                let sessions = self.sessions(readers + writers).await?;
                let contenders = sessions
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let rw = RwLock::new(s, &name)?;
                        Ok(if i < *writers {
                            Contender::Write(rw)
                        } else {
                            Contender::Read(rw)
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                single(
                    self.contend(workload, implementation, sessions, contenders, *ops, false)
                        .await?,
                )
            }
            Workload::Semaphore {
                contenders,
                permits,
                ops,
            } => {
                let name = self.name("semaphore");
                let sessions = self.sessions(*contenders).await?;
                let contenders = sessions
                    .iter()
                    .map(|s| Ok(Contender::Semaphore(Semaphore::new(s, &name, *permits)?)))
                    .collect::<Result<Vec<_>>>()?;
                single(
                    self.contend(workload, implementation, sessions, contenders, *ops, false)
                        .await?,
                )
            }
            Workload::ElectionHandoff { candidates, rounds } => single(
                self.election_handoff(workload, implementation, *candidates, *rounds)
                    .await?,
            ),
            Workload::WaitersScale { waiters, sessions } => {
                let mut out = Vec::new();
                for w in waiters {
                    out.push(self.waiters_scale(workload, *w, *sessions).await?);
                }
                out
            }
            Workload::Queue {
                producers,
                consumers,
                items,
            }
            | Workload::WorkQueue {
                producers,
                consumers,
                items,
            } => {
                let mut out = Vec::new();
                for c in consumers {
                    out.push(self.queue(workload, *producers, *c, *items).await?);
                }
                out
            }
        })
    }

    async fn mutex_uncontended(
        &self,
        workload: &Workload,
        ops: u64,
        implementation: Impl,
    ) -> Result<BenchResult> {
        let name = self.name("mutex-uncontended");
        let sessions = self.sessions(1).await?;
        let mut contender = Contender::mutex(&sessions[0], &name, implementation)?;
        let probe = self.probe().await?;
        let mut samples = Samples::default();
        let start = Instant::now();
        for _ in 0..ops {
            let t0 = Instant::now();
            contender.acquire().await?.release().await?;
            samples.latency.push(t0.elapsed());
        }
        let elapsed = start.elapsed();
        drop(contender);
        close(&sessions).await?;
        let cost = probe.finish(self).await?;
        Ok(result(
            workload,
            implementation,
            ops,
            elapsed,
            "lock call to unlock returned",
            samples,
            cost,
        ))
    }

    async fn try_lock_fail(&self, workload: &Workload, ops: u64) -> Result<BenchResult> {
        let name = self.name("try-lock-fail");
        let sessions = self.sessions(2).await?;
        let holder = bounded("lock", Mutex::new(&sessions[0], &name)?.lock()).await?;
        let mutex = Mutex::new(&sessions[1], &name)?;
        let probe = self.probe().await?;
        let mut samples = Samples::default();
        let start = Instant::now();
        for _ in 0..ops {
            let t0 = Instant::now();
            match bounded("try_lock", mutex.try_lock()).await {
                Err(Error::WouldBlock { .. }) => {}
                Err(e) => return Err(e),
                Ok(_) => {
                    return Err(Error::Conflict(
                        "try_lock succeeded on a mutex another session holds".into(),
                    ))
                }
            }
            samples.latency.push(t0.elapsed());
        }
        let elapsed = start.elapsed();
        // Failed attempts open no stream, so "after" can come before the holder lets go (its
        // unlock is not a try-lock's cost).
        let cost = probe.finish(self).await?;
        bounded("unlock", holder.unlock()).await?;
        close(&sessions).await?;
        Ok(result(
            workload,
            Impl::Coord,
            ops,
            elapsed,
            "failed try_lock",
            samples,
            cost,
        ))
    }

    /// The contention loop shared by lock-like workloads: every contender loops acquire →
    /// release until `target` acquisitions happened in total; those already waiting finish.
    async fn contend(
        &self,
        workload: &Workload,
        implementation: Impl,
        sessions: Vec<Session>,
        contenders: Vec<Contender>,
        target: u64,
        exclusive: bool,
    ) -> Result<BenchResult> {
        let shared = Arc::new(Shared::default());
        let probe = self.probe().await?;
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for mut contender in contenders {
            let shared = shared.clone();
            tasks.spawn(async move {
                let mut mine = 0u64;
                while shared.done.load(Ordering::Acquire) < target {
                    let t0 = Instant::now();
                    let held = contender.acquire().await?;
                    let acquired = Instant::now();
                    shared.done.fetch_add(1, Ordering::AcqRel);
                    mine += 1;
                    if exclusive {
                        // Only the holder moves `last_release`, so the release it shows is the
                        // one that let us in, if we were already waiting for it.
                        let mut last = shared.last_release();
                        let handoff = last.filter(|r| *r > t0).map(|r| acquired - r);
                        *last = Some(Instant::now());
                        drop(last);
                        if let Some(h) = handoff {
                            shared.samples().handoff.push(h);
                        }
                    }
                    held.release().await?;
                    let mut s = shared.samples();
                    s.wait.push(acquired - t0);
                    s.latency.push(t0.elapsed());
                }
                Ok::<_, Error>((contender.kind(), mine))
            });
        }
        let (joined, unsynced) = self
            .watch_load(async {
                let mut by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
                while let Some(joined) = tasks.join_next().await {
                    let (kind, n) = joined.map_err(join_error)??;
                    *by_kind.entry(kind).or_default() += n;
                }
                Ok::<_, Error>(by_kind)
            })
            .await;
        let by_kind = joined?;
        let elapsed = start.elapsed();
        close(&sessions).await?;
        let cost = probe.finish(self).await?;
        let ops = shared.done.load(Ordering::Acquire);
        let mut result = result(
            workload,
            implementation,
            ops,
            elapsed,
            "acquire call to release returned",
            shared.take(),
            cost,
        );
        result.unsynced_watchers = unsynced;
        if by_kind.len() > 1 {
            result.extra = by_kind.into_iter().map(|(k, n)| (k, json!(n))).collect();
        }
        Ok(result)
    }

    async fn election_handoff(
        &self,
        workload: &Workload,
        implementation: Impl,
        candidates: usize,
        rounds: u64,
    ) -> Result<BenchResult> {
        let name = self.name("election-handoff");
        let sessions = self.sessions(candidates).await?;
        let all = sessions
            .iter()
            .map(|s| {
                Ok(match implementation {
                    Impl::Coord => Candidate::Coord(Box::new(Election::new(s, &name)?)),
                    _ => Candidate::Server(Box::new(ServerCandidate {
                        client: s.client().election_client(),
                        name: name.clone(),
                        lease: s.lease_id(),
                    })),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared::default());
        let probe = self.probe().await?;
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for (i, mut candidate) in all.into_iter().enumerate() {
            let shared = shared.clone();
            tasks.spawn(async move {
                let value = format!("candidate-{i}");
                loop {
                    let won = candidate.campaign(&value).await?;
                    let elected = Instant::now();
                    // `rounds` handoffs need `rounds + 1` terms. Once there, every candidate
                    // still queued takes its turn (a real handoff, counted) and leaves.
                    let term = shared.done.fetch_add(1, Ordering::AcqRel) + 1;
                    if term > rounds {
                        shared.stopping.store(true, Ordering::Release);
                    }
                    {
                        let mut last = shared.last_release();
                        if let Some(r) = last.take() {
                            shared.samples().latency.push(elected - r);
                        }
                        *last = Some(Instant::now());
                    }
                    won.resign().await?;
                    if shared.stopping.load(Ordering::Acquire) {
                        return Ok::<_, Error>(());
                    }
                }
            });
        }
        let (joined, unsynced) = self.watch_load(join_all(&mut tasks)).await;
        joined?;
        let elapsed = start.elapsed();
        close(&sessions).await?;
        let cost = probe.finish(self).await?;
        let samples = shared.take();
        let ops = samples.latency.len() as u64;
        let mut result = result(
            workload,
            implementation,
            ops,
            elapsed,
            "resign call to the next campaign returned",
            samples,
            cost,
        );
        result.unsynced_watchers = unsynced;
        Ok(result)
    }

    async fn waiters_scale(
        &self,
        workload: &Workload,
        waiters: usize,
        sessions: usize,
    ) -> Result<BenchResult> {
        let name = self.name(&format!("waiters-scale-{waiters}"));
        let holder_session = self.sessions(1).await?.remove(0);
        let sessions = self.sessions(sessions.min(waiters)).await?;
        let holder = bounded("lock", Mutex::new(&holder_session, &name)?.lock()).await?;
        let base = self.metrics().await?;
        let shared = Arc::new(Shared::default());
        let mut tasks = JoinSet::new();
        for i in 0..waiters {
            let mutex = Mutex::new(&sessions[i % sessions.len()], &name)?;
            let shared = shared.clone();
            tasks.spawn(async move {
                let guard = bounded("lock", mutex.lock()).await?;
                let acquired = Instant::now();
                {
                    let mut last = shared.last_release();
                    if let Some(r) = *last {
                        shared.samples().handoff.push(acquired - r);
                    }
                    *last = Some(Instant::now());
                }
                bounded("unlock", guard.unlock()).await
            });
        }
        // Everyone must be queued and watching before "before", so that joining the queue is
        // not counted: W + 1 keys, and W more watch streams opened.
        let mut control = holder_session.client().clone();
        let key_prefix = prefix(&name);
        let watches = |m: &Metrics| m.counter("grpc_server_started_total{grpc_method=\"Watch\"}");
        let deadline = Instant::now() + REQUEST_BOUND;
        loop {
            let keys = control
                .get(
                    key_prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?
                .count();
            let opened = watches(&self.metrics().await?) - watches(&base);
            if keys == waiters as i64 + 1 && opened >= waiters as f64 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    operation: "queueing the waiters",
                    after: REQUEST_BOUND,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let probe = self.probe().await?;
        let start = Instant::now();
        *shared.last_release() = Some(start);
        bounded("unlock", holder.unlock()).await?;
        let (joined, unsynced) = self.watch_load(join_all(&mut tasks)).await;
        joined?;
        let elapsed = start.elapsed();
        close(&sessions).await?;
        close(std::slice::from_ref(&holder_session)).await?;
        let cost = probe.finish(self).await?;
        let mut samples = shared.take();
        samples.latency = std::mem::take(&mut samples.handoff);
        let mut result = result(
            workload,
            Impl::Coord,
            waiters as u64,
            elapsed,
            "unlock call to the next waiter holding",
            samples,
            cost,
        );
        result.params = vec![
            ("waiters", json!(waiters)),
            ("sessions", json!(sessions.len())),
        ];
        // Releases in the window: the first holder's and every waiter's.
        result.extra = vec![("releases", json!(waiters + 1))];
        result.unsynced_watchers = unsynced;
        Ok(result)
    }
}

/// Turns the samples and cost of one run into its result.
fn result(
    workload: &Workload,
    implementation: Impl,
    ops: u64,
    elapsed: Duration,
    latency_of: &'static str,
    samples: Samples,
    cost: Cost,
) -> BenchResult {
    let optional = |v: Vec<Duration>| (!v.is_empty()).then(|| Percentiles::of(v));
    BenchResult {
        workload: workload.name(),
        implementation: implementation.name(),
        params: workload.params(),
        ops,
        elapsed,
        latency_of,
        latency: Percentiles::of(samples.latency),
        wait: optional(samples.wait),
        handoff: optional(samples.handoff),
        cost,
        unsynced_watchers: None,
        extra: Vec::new(),
    }
}

/// Waits for every task, failing with the first error.
async fn join_all(tasks: &mut JoinSet<Result<()>>) -> Result<()> {
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(join_error)??;
    }
    Ok(())
}

async fn close(sessions: &[Session]) -> Result<()> {
    futures::future::try_join_all(
        sessions
            .iter()
            .map(|s| bounded("closing a session", s.close())),
    )
    .await
    .map(|_| ())
}

fn write_header<W: Write>(out: &mut W, env: &Environment) -> std::io::Result<()> {
    writeln!(out, "etcd-coord benchmarks")?;
    writeln!(
        out,
        "machine: {} CPUs, {}; load average {} at start",
        env.cpus, env.cpu_model, env.load_before
    )?;
    writeln!(
        out,
        "etcd {} at {}{}",
        env.etcd_version,
        env.endpoint,
        match (&env.data_dir, &env.data_dir_fs) {
            (Some(dir), Some(fs)) => format!(", data dir {} ({fs})", dir.display()),
            (Some(dir), None) => format!(", data dir {}", dir.display()),
            _ => String::from(" (external: other clients may add to the request counts)"),
        }
    )?;
    writeln!(
        out,
        "JSON lines start with '{{' (grep '^{{'); requests are counted from etcd's /metrics"
    )
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn row(r: &BenchResult) -> String {
    let mut notes = Vec::new();
    if let Some(w) = r.wait {
        notes.push(format!("wait p50/p99 {}/{} ms", ms(w.p50), ms(w.p99)));
    }
    if let Some(h) = r.handoff {
        notes.push(format!("handoff p50/p99 {}/{} ms", ms(h.p50), ms(h.p99)));
    }
    if let Some(u) = r.unsynced_watchers {
        notes.push(format!("unsynced watchers {:.0}%", u * 100.0));
    }
    format!(
        "{:<18} {:<21} {:<28} {:>6} {:>9.1} {:>8} {:>8} {:>7.2} {:>7.2} {:>6.2}  {}",
        r.workload,
        r.implementation,
        r.params_text(),
        r.ops,
        r.ops_per_s(),
        ms(r.latency.p50),
        ms(r.latency.p99),
        r.requests_per_op(),
        r.work_per_op(),
        r.per_op(r.cost.watch_events),
        notes.join("; ")
    )
}

fn table_header() -> String {
    format!(
        "{:<18} {:<21} {:<28} {:>6} {:>9} {:>8} {:>8} {:>7} {:>7} {:>6}  notes",
        "workload",
        "impl",
        "params",
        "ops",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "req/op",
        "work/op",
        "ev/op"
    )
}

fn breakdown(r: &BenchResult) -> String {
    let methods: Vec<String> = r
        .cost
        .requests
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(m, n)| format!("{m} {:.2}", r.per_op(*n)))
        .collect();
    let store: Vec<String> = r
        .cost
        .store
        .iter()
        .map(|(k, n)| format!("{k} {:.2}", r.per_op(*n)))
        .collect();
    let mut line = format!(
        "requests/op by method: {}; store ops/op: {}",
        methods.join(", "),
        store.join(", ")
    );
    if r.cost.streams_left_open > 0 {
        line.push_str(&format!(
            "; WARNING {} streams still open at the snapshot (not counted)",
            r.cost.streams_left_open
        ));
    }
    line
}

fn write_result<W: Write>(out: &mut W, r: &BenchResult) -> std::io::Result<()> {
    writeln!(out, "{}", row(r))?;
    writeln!(out, "    {}", breakdown(r))?;
    writeln!(out, "{}", r.to_json())?;
    out.flush()
}

fn write_summary<W: Write>(out: &mut W, report: &Report) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(out, "{}", table_header())?;
    for r in &report.results {
        writeln!(out, "{}", row(r))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "checks ([cost] failures fail the run; [target] lines are speed goals, noisy on a shared machine):"
    )?;
    for c in &report.checks {
        writeln!(out, "{}", c.line())?;
    }
    for e in &report.errors {
        writeln!(out, "FAIL [run] {e}")?;
    }
    for paragraph in analysis(report) {
        writeln!(out, "analysis: {paragraph}")?;
    }
    writeln!(
        out,
        "finished in {:.1} s; load average {} at the end; {}",
        report.elapsed.as_secs_f64(),
        report.environment.load_after,
        if report.success() {
            "cost model holds"
        } else {
            "FAILED"
        }
    )
}

/// The checks that the results allow; those whose workloads did not run are left out.
fn checks(results: &[BenchResult], elapsed: Duration, workloads: &[Workload]) -> Vec<Check> {
    let find = |workload: &str, implementation: &str| {
        results
            .iter()
            .find(|r| r.workload == workload && r.implementation == implementation)
    };
    let mut out = Vec::new();
    let mut cost = |name: String, passed: bool, detail: String| {
        out.push(Check {
            name,
            kind: CheckKind::CostModel,
            passed,
            detail,
        })
    };
    let methods = |r: &BenchResult| {
        r.cost
            .requests
            .iter()
            .filter(|(m, n)| **n > 0 && !SESSION_METHODS.contains(&m.as_str()))
            .map(|(m, n)| format!("{m} {:.2}", r.per_op(*n)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(r) = find("mutex-uncontended", IMPL_COORD) {
        let per_op = r.work_per_op();
        cost(
            "uncontended lock+unlock = 2 requests".into(),
            (per_op - 2.0).abs() <= EPS,
            format!("{per_op:.3} per op ({})", methods(r)),
        );
    }
    if let Some(r) = find("try-lock-fail", IMPL_COORD) {
        let per_op = r.work_per_op();
        let puts = r.cost.store.get("put").copied().unwrap_or(0);
        let deletes = r.cost.store.get("delete").copied().unwrap_or(0);
        cost(
            "failed try-lock = 1 request, no key left behind".into(),
            (per_op - 1.0).abs() <= EPS && puts == 0 && deletes == 0,
            format!(
                "{per_op:.3} per op ({}); keys written {puts}, deleted {deletes}",
                methods(r)
            ),
        );
    }
    if let Some(r) = find("mutex-contended", IMPL_COORD) {
        let per_op = r.work_per_op();
        cost(
            "contended acquisition <= 5 requests (join, watch, a re-read only if the queue \
             changed between the read and the watch, one wake-up check, release)"
                .into(),
            per_op <= 5.0 + EPS,
            format!("{per_op:.3} per acquisition ({})", methods(r)),
        );
    }
    let scale: Vec<&BenchResult> = results
        .iter()
        .filter(|r| r.workload == "waiters-scale")
        .collect();
    for r in &scale {
        let w = r.ops;
        let releases = w + 1;
        let writes =
            r.cost.get("Txn") + r.cost.get("Range") + r.cost.get("Put") + r.cost.get("DeleteRange");
        let new_holder = writes.saturating_sub(releases) as f64 / w.max(1) as f64;
        cost(
            format!("new holder spends <= 1 request per handoff (W={w})"),
            new_holder <= 1.0 + EPS,
            format!(
                "{new_holder:.3} (Txn+Range+Put+DeleteRange {writes} - {releases} releases, over {w} handoffs), \
                 plus the watch it opened while queued: Watch {:.2} per handoff",
                r.per_op(r.cost.get("Watch"))
            ),
        );
    }
    if let (Some(small), Some(large)) = (
        scale.iter().min_by_key(|r| r.ops),
        scale.iter().max_by_key(|r| r.ops),
    ) {
        if large.ops > small.ops {
            let (a, b) = (small.work_per_op(), large.work_per_op());
            let (ea, eb) = (
                small.per_op(small.cost.watch_events),
                large.per_op(large.cost.watch_events),
            );
            cost(
                format!(
                    "requests and watch events per handoff do not grow from W={} to W={}",
                    small.ops, large.ops
                ),
                b <= a + 0.05 && eb <= ea + 0.05,
                format!("requests {a:.3} -> {b:.3}, watch events {ea:.3} -> {eb:.3} per handoff"),
            );
        }
    }
    let jobs: Vec<&BenchResult> = results
        .iter()
        .filter(|r| r.workload == "work-queue")
        .collect();
    let consumers = |r: &BenchResult| r.param("consumers").unwrap_or(0);
    if let (Some(few), Some(many)) = (
        jobs.iter().min_by_key(|r| consumers(r)),
        jobs.iter().max_by_key(|r| consumers(r)),
    ) {
        if consumers(many) > consumers(few) {
            let (a, b) = (few.work_per_op(), many.work_per_op());
            cost(
                format!(
                    "work-queue requests per job do not grow from {} to {} consumers",
                    consumers(few),
                    consumers(many)
                ),
                b <= a * (1.0 + WORK_QUEUE_SLACK),
                format!(
                    "{a:.3} ({}) -> {b:.3} ({}) per job; allowed: +{:.0}%",
                    methods(few),
                    methods(many),
                    WORK_QUEUE_SLACK * 100.0
                ),
            );
        }
    }
    let mut target = |name: String, passed: bool, detail: String| {
        out.push(Check {
            name,
            kind: CheckKind::Target,
            passed,
            detail,
        })
    };
    if let (Some(ours), Some(theirs)) = (
        find("mutex-uncontended", IMPL_COORD),
        find("mutex-uncontended", IMPL_SERVER_LOCK),
    ) {
        let ratio = ours.ops_per_s() / theirs.ops_per_s().max(1e-9);
        target(
            "uncontended throughput >= 1.0x etcd's server-side Lock".into(),
            ratio >= 1.0,
            format!(
                "{ratio:.2}x ({:.0} vs {:.0} lock+unlock/s)",
                ours.ops_per_s(),
                theirs.ops_per_s()
            ),
        );
    }
    if let (Some(ours), Some(theirs)) = (
        find("mutex-contended", IMPL_COORD),
        find("mutex-contended", IMPL_SERVER_LOCK),
    ) {
        let ratio = ours.ops_per_s() / theirs.ops_per_s().max(1e-9);
        let c = ours.param("contenders").unwrap_or(0);
        let want = if c == 8 { 5.0 } else { 1.0 };
        target(
            format!("contended throughput ({c} sessions) >= {want}x etcd's server-side Lock"),
            ratio >= want,
            format!(
                "{ratio:.2}x ({:.0} vs {:.0} acquisitions/s; wait p99 {} vs {} ms)",
                ours.ops_per_s(),
                theirs.ops_per_s(),
                ours.wait.map_or("-".into(), |p| ms(p.p99)),
                theirs.wait.map_or("-".into(), |p| ms(p.p99)),
            ),
        );
    }
    if let Some(ours) = find("election-handoff", IMPL_COORD) {
        let theirs = find("election-handoff", IMPL_SERVER_ELECTION).map_or(String::new(), |t| {
            format!(
                "; etcd's server-side Election: p50 {} ms, p99 {} ms",
                ms(t.latency.p50),
                ms(t.latency.p99)
            )
        });
        target(
            "election handoff p99 <= 10 ms".into(),
            ours.latency.p99 <= Duration::from_millis(10),
            format!(
                "p50 {} ms, p99 {} ms{theirs}",
                ms(ours.latency.p50),
                ms(ours.latency.p99)
            ),
        );
    }
    if workloads == Workload::defaults().as_slice() {
        target(
            "the default run finishes in under 3 minutes".into(),
            elapsed < Duration::from_secs(180),
            format!("{:.1} s", elapsed.as_secs_f64()),
        );
    }
    out
}

fn markdown(report: &Report, options: &BenchOptions) -> String {
    let env = &report.environment;
    let mut md = String::new();
    let mut line = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    line("# Benchmarks".into());
    line(String::new());
    line(
        "Generated by the benchmark itself (`benches/coord.rs`, workloads in `src/bench.rs`); \
         do not edit by hand."
            .into(),
    );
    line(String::new());
    line("## How to run".into());
    line(String::new());
    line("```sh".into());
    line("# this file (a release build; the first one takes a few minutes on 2 cores):".into());
    line(if options.args.is_empty() {
        "cargo bench --features bench".to_string()
    } else {
        format!("cargo bench --features bench -- {}", options.args.join(" "))
    });
    line("# one workload, with parameters:".into());
    line("cargo bench --features bench -- mutex-contended --contenders 8 --ops 400".into());
    line("# the JSON lines only:".into());
    line("cargo bench --features bench | grep '^{'".into());
    line("```".into());
    line(String::new());
    line(
        "With no workload named, all run with their defaults (`-- --help` lists them). \
         `ETCD_ENDPOINTS` points the run at an existing server; otherwise it starts a \
         single-member etcd of its own, with its data dir under `/dev/shm` when that is \
         writable. The process exits non-zero if a workload fails or a cost-model check fails; \
         speed targets are reported only. `cargo test --all-targets` builds the benchmark but \
         does not run it (it runs only when `cargo bench` passes `--bench`)."
            .into(),
    );
    line(String::new());
    line("## Machine and server".into());
    line(String::new());
    line(format!(
        "- machine: {} CPUs (`nproc`), {}; load average {} at the start, {} at the end \
         (the machine is shared with other developers' test runs, so speed numbers are noisy; \
         request counts are not)",
        env.cpus, env.cpu_model, env.load_before, env.load_after
    ));
    line(format!("- etcd {} at {}", env.etcd_version, env.endpoint));
    line(format!(
        "- data dir: {}",
        match (&env.data_dir, &env.data_dir_fs) {
            (Some(d), Some(fs)) => format!("`{}` ({fs})", d.display()),
            (Some(d), None) => format!("`{}`", d.display()),
            _ => "external server".into(),
        }
    ));
    line(format!(
        "- whole run: {:.1} s",
        report.elapsed.as_secs_f64()
    ));
    line(String::new());
    line("## Results".into());
    line(String::new());
    line(
        "| workload | impl | params | ops | ops/s | p50 ms | p99 ms | requests/op | work/op | \
         watch events/op | requests/op by method | notes |"
            .into(),
    );
    line("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|".into());
    for r in &report.results {
        let by_method = r
            .cost
            .requests
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| format!("{m} {:.2}", r.per_op(*n)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut notes = vec![format!("latency: {}", r.latency_of)];
        if let Some(w) = r.wait {
            notes.push(format!("wait p50/p99 {}/{} ms", ms(w.p50), ms(w.p99)));
        }
        if let Some(h) = r.handoff {
            notes.push(format!("handoff p50/p99 {}/{} ms", ms(h.p50), ms(h.p99)));
        }
        if let Some(u) = r.unsynced_watchers {
            notes.push(format!("unsynced watchers {:.0}%", u * 100.0));
        }
        for (k, v) in &r.extra {
            notes.push(format!("{k} {v}"));
        }
        line(format!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} |",
            r.workload,
            r.implementation,
            r.params_text(),
            r.ops,
            r.ops_per_s(),
            ms(r.latency.p50),
            ms(r.latency.p99),
            r.requests_per_op(),
            r.work_per_op(),
            r.per_op(r.cost.watch_events),
            by_method,
            notes.join("; ")
        ));
    }
    line(String::new());
    line("## Checks".into());
    line(String::new());
    line("```".into());
    for c in &report.checks {
        line(c.line());
    }
    for e in &report.errors {
        line(format!("FAIL [run] {e}"));
    }
    line("```".into());
    line(String::new());
    let why = analysis(report);
    if !why.is_empty() {
        line("## Why checks failed".into());
        line(String::new());
        for paragraph in why {
            line(paragraph);
            line(String::new());
        }
    }
    line("## How to read the numbers".into());
    line(String::new());
    for note in MARKDOWN_NOTES {
        line(format!("- {note}"));
    }
    md
}

const MARKDOWN_NOTES: &[&str] = &[
    "`requests/op` is the increase of etcd's `grpc_server_handled_total` across the run (from its \
     `/metrics`), divided by the operations; `requests/op by method` splits it by gRPC method. \
     `work/op` leaves out the session lifecycle (`LeaseGrant`, `LeaseRevoke`, `LeaseKeepAlive`); \
     the cost-model checks use it.",
    "Sessions (and their clients) are created before the \"before\" snapshot, so granting leases \
     is not in the per-operation cost. Closing them at the end is: one `LeaseRevoke` per session \
     (spread over all operations, e.g. 8 revokes over 400 acquisitions = 0.02/op).",
    "etcd counts a stream (`Watch`, `LeaseKeepAlive`) when it **ends**, not when it opens. So \
     every workload ends its streams (waits done, sessions closed) before the \"after\" snapshot, \
     and the snapshot waits until etcd's count of open RPCs (`grpc_server_started_total` minus \
     `grpc_server_handled_total`) is back to where it was. A waiter's watch therefore shows up \
     at the handoff that ends it.",
    "`watch events/op` is the increase of `etcd_debugging_mvcc_events_total`, the events etcd's \
     watch service sent to watchers (in-process watchers of the server-side Lock and Election \
     services included). One event per handoff means no herd.",
    "etcd's server-side Lock and Election services run Go's `concurrency` package inside the \
     server against an in-process client, so their gRPC count (Lock + Unlock = 2) hides their \
     store work; the JSON lines carry `store_ops_per_op` (`etcd_mvcc_{range,put,delete,txn}_total`) \
     for both sides. Their lease is kept alive by one of our sessions, as a Rust user of those \
     RPCs would have to.",
    "`unsynced watchers` is the share of etcd's watchers that were \"unsynced\" while the waiters \
     waited, sampled every 100 ms from `etcd_debugging_mvcc_slow_watcher_total` / \
     `etcd_debugging_mvcc_watcher_total`. etcd delivers events to an unsynced watcher only from \
     a catch-up loop that runs every 100 ms, so a handoff to a waiter whose watch is unsynced \
     can take up to 100 ms.",
];

/// Why speed targets may be missed, for the analysis section; shown only for missed targets.
const UNCONTENDED_ANALYSIS: &str = "Uncontended, both sides commit twice per lock+unlock (our \
    two transactions, the server's Lock and Unlock, each one raft proposal), so both are bounded \
    by the same commits and differ only by client overhead and noise.";

const WATCH_START_ANALYSIS: &str = "etcd serves a watch at once only if it starts above the \
    store's current revision when it is created; otherwise the watch is unsynced and gets its \
    events from the catch-up loop that runs every 100 ms. etcd's server-side services (like Go's \
    client) watch from the revision of their read, so under contention nearly all of their \
    waiters' watches are unsynced and most handoffs wait for that loop. Our waiters open their \
    watch without a start revision (always synced) and read the queue again only when something \
    was written between their read and the watch's creation; if the unsynced share of ours is \
    above zero, or throughput is still short, the machine's load (other processes on its two \
    cores) is the next suspect.";

const WORK_QUEUE_ANALYSIS: &str = "A lone consumer spends exactly push 1 + read 1 + claim 1 + \
    ack 1. With several, a claim can lose the race for a job to another consumer (one more \
    transaction; its answer serves as the next read), and a consumer that finds the queue empty \
    joins the idle line (a mutex lock and unlock and a fresh read, plus a watch for the first in \
    line): watch events per job show when that happens, typically once the producers no longer \
    keep all consumers busy. Both are per-claim costs that grow with the number of consumers, \
    which the cost model says they should not; they belong to `src/work_queue.rs` (e.g. claim \
    from a wider random window, or let an idle consumer claim straight from the event that woke \
    it).";

/// Explanations of the failed checks that this run's numbers support.
fn analysis(report: &Report) -> Vec<String> {
    let missed = |prefix: &str| {
        report
            .checks
            .iter()
            .any(|c| c.kind == CheckKind::Target && !c.passed && c.name.starts_with(prefix))
    };
    let mut out = Vec::new();
    if missed("uncontended") {
        out.push(UNCONTENDED_ANALYSIS.to_string());
    }
    if missed("contended") || missed("election") {
        let unsynced: Vec<String> = report
            .results
            .iter()
            .filter_map(|r| {
                let u = r.unsynced_watchers.filter(|u| *u >= 0.05)?;
                Some(format!(
                    "{} on {} {:.0}%",
                    r.workload,
                    r.implementation,
                    u * 100.0
                ))
            })
            .collect();
        if !unsynced.is_empty() {
            out.push(format!(
                "Unsynced watchers while waiters waited: {}.",
                unsynced.join(", ")
            ));
            out.push(WATCH_START_ANALYSIS.to_string());
        }
    }
    let cost_failed = report
        .checks
        .iter()
        .any(|c| c.kind == CheckKind::CostModel && !c.passed && c.name.starts_with("work-queue"));
    if cost_failed {
        let per_job: Vec<String> = report
            .results
            .iter()
            .filter(|r| r.workload == "work-queue")
            .map(|r| {
                format!(
                    "{} consumers {:.2} (Txn {:.2}, watch events {:.2})",
                    r.param("consumers").unwrap_or(0),
                    r.work_per_op(),
                    r.per_op(r.cost.get("Txn")),
                    r.per_op(r.cost.watch_events)
                )
            })
            .collect();
        out.push(format!(
            "Work-queue requests per job: {}. {WORK_QUEUE_ANALYSIS}",
            per_job.join("; ")
        ));
    }
    if missed("the default run") {
        out.push(format!(
            "The run was slow; the load average was {} at the start and {} at the end.",
            report.environment.load_before, report.environment.load_after
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_belong_to_the_workload_named_before_them() {
        let o = BenchOptions::parse([
            "mutex-contended",
            "--contenders=3",
            "--ops",
            "1_000",
            "waiters-scale",
            "--waiters",
            "5,50",
            "--impl",
            "server",
            "--bench",
        ])
        .unwrap();
        assert_eq!(
            o.workloads,
            vec![
                Workload::MutexContended {
                    contenders: 3,
                    ops: 1000
                },
                Workload::WaitersScale {
                    waiters: vec![5, 50],
                    sessions: 10
                },
            ]
        );
        assert_eq!(o.implementations, Implementations::Server);
        assert!(!o.args.iter().any(|a| a == "--bench"));
    }

    #[test]
    fn bad_arguments_are_named() {
        let name = |args: &[&str]| match BenchOptions::parse(args) {
            Err(Error::InvalidArgument { name, .. }) => name,
            other => panic!("expected an invalid argument, got {other:?}"),
        };
        assert_eq!(
            name(&["mutex-contended", "--contenders", "0"]),
            "contenders"
        );
        assert_eq!(name(&["mutex-contended", "--permits", "2"]), "arguments");
        assert_eq!(name(&["--ops", "2"]), "arguments");
        assert_eq!(name(&["semaphore", "--ops"]), "arguments");
        assert_eq!(
            name(&["election-handoff", "--candidates", "1"]),
            "candidates"
        );
        assert_eq!(name(&["waiters-scale", "--waiters", "10,x"]), "waiters");
        assert_eq!(name(&["--impl", "go"]), "impl");
        assert_eq!(name(&["mutex"]), "workload");
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let p = Percentiles::of(vec![Duration::from_millis(3), Duration::from_millis(1)]);
        assert_eq!(
            (p.count, p.p50, p.p99),
            (2, Duration::from_millis(1), Duration::from_millis(3))
        );
    }

    #[test]
    fn every_workload_has_a_help_line() {
        for w in Workload::defaults() {
            assert!(USAGE.contains(w.name()), "{} missing from USAGE", w.name());
        }
    }
}
