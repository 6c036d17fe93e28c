//! Real etcd servers for tests, examples and benchmarks.
//!
//! This module (behind the `testing` cargo feature) starts genuine `etcd`
//! processes on loopback ports, so that code built on this crate can be
//! exercised against the real thing: real raft, real leases, real leader
//! elections, real crashes. It is not used by the library itself.
//!
//! # What it does
//!
//! * [`EtcdCluster::single`], [`EtcdCluster::start`] and
//!   [`EtcdCluster::start_with`] start one or more members that form one
//!   cluster, wait until every member reports healthy, and hand back the
//!   client endpoints (`http://127.0.0.1:PORT`).
//! * Ports are chosen by binding `127.0.0.1:0` and releasing the port again.
//!   Many test processes may do this concurrently (cargo-nextest runs every
//!   test in its own process), so a start can lose a race for a port. Such a
//!   failure (a member exits early, a port turns out to be served by some
//!   other etcd, or a member is not ready in time) is retried a few times with
//!   fresh ports before an error, including the tail of the member's log, is
//!   returned.
//! * Each member gets its own temporary directory holding its data dir and a
//!   log file (`etcd.log`, etcd's stdout and stderr). The temporary root is,
//!   in order of preference: [`ClusterOptions::data_dir_root`], the
//!   `ETCD_COORD_DATA_DIR` environment variable, `/dev/shm` when it exists and
//!   is writable (tmpfs makes etcd's fsyncs cheap; note that etcd
//!   pre-allocates 64 MiB WAL segments, which on tmpfs costs RAM), and
//!   finally the system temporary directory. Directories left behind by a
//!   test process that was killed outright are removed by the next start
//!   under the same root (each records its owner's PID in `owner.pid`).
//! * Processes can be killed, paused (`SIGSTOP`), resumed, stopped gracefully
//!   and restarted on the same data dir and ports, which makes failure
//!   scenarios easy to script. [`EtcdCluster::metrics`] scrapes `/metrics`
//!   so tests can count the requests a piece of code sends.
//! * Dropping an [`EtcdCluster`] sends `SIGKILL` to every process it started,
//!   reaps it (with a short bound), and then removes the temporary
//!   directories.
//!
//! # Which binary
//!
//! [`etcd_binary`] picks `ETCD_BIN` if set, otherwise the binary shipped by
//! the `etcd-bin-vendored` crate (etcd 3.7), otherwise `etcd` on `PATH`.
//! The flags used work with etcd 3.4 and later.
//!
//! # External clusters
//!
//! [`EtcdCluster::from_env_or_start`] honours `ETCD_ENDPOINTS`
//! (comma-separated URLs): when it is set, no process is started and the
//! cluster merely wraps those endpoints. Operations that need to control
//! processes then fail with [`io::ErrorKind::Unsupported`]; tests that need
//! them should call [`EtcdCluster::require_local`] and skip.
//!
//! # Orphan protection
//!
//! Every etcd child is started with `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so it
//! is killed by the kernel even when the test process dies without running
//! destructors (a panic with `panic = "abort"`, `SIGKILL` from a test runner's
//! timeout, ...). Linux delivers that signal when the *thread* that forked
//! the child exits, not when the process does. For that reason the children
//! are not forked from the calling thread (which might be a short-lived
//! runtime or blocking-pool thread, e.g. when a cluster is shared between
//! tests through a `static`), but from a dedicated spawner thread that lives
//! as long as the process.
//!
//! Nothing is printed to stdout; start, kill, pause, resume, stop and restart
//! are reported as `tracing` events at debug level.
//!
//! # Faults and TLS
//!
//! [`proxy::Proxy`] sits between clients and a member and cuts, stalls or
//! delays their traffic on demand. [`ClusterOptions::tls`] starts members
//! that serve `https://` client URLs and require client certificates signed
//! by a [`tls::TestCa`]; their `/health` and `/metrics` are then served on a
//! separate plain-HTTP metrics URL, so readiness checks and
//! [`EtcdCluster::metrics`] work as before.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use etcd_coord::testing::EtcdCluster;
//!
//! let cluster = EtcdCluster::from_env_or_start(1).await?;
//! let mut client = cluster.client().await?;
//! client.put("greeting", "hello", None).await?;
//! let resp = client.get("greeting", None).await?;
//! assert_eq!(resp.kvs()[0].value(), b"hello");
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod proxy;
pub mod tls;

/// How long a member may take to become healthy, per start attempt.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Start attempts (each with fresh ports) before giving up.
const START_ATTEMPTS: usize = 4;
/// Restart attempts (same ports) before giving up.
const RESTART_ATTEMPTS: usize = 3;
/// How long [`EtcdCluster::stop`] waits after `SIGTERM` before `SIGKILL`.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`EtcdCluster::pause`] waits for all threads to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Drop` waits for killed processes to be reaped.
const DROP_REAP_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one HTTP request to a member.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on an HTTP response body we are willing to buffer.
const HTTP_MAX_RESPONSE: u64 = 64 << 20;
/// Interval between readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How long [`EtcdCluster::leader_index`] keeps looking for a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(15);

/// Returns the etcd binary to run.
///
/// In order of preference:
/// 1. the `ETCD_BIN` environment variable (a path, or a bare name looked up on `PATH`);
/// 2. the binary vendored by the `etcd-bin-vendored` crate (etcd 3.7);
/// 3. `etcd` on `PATH`.
///
/// # Errors
///
/// [`io::ErrorKind::NotFound`] when `ETCD_BIN` names a missing file or when no
/// binary can be found at all.
///
/// # Examples
///
/// ```no_run
/// let etcd = etcd_coord::testing::etcd_binary()?;
/// println!("using {}", etcd.display());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn etcd_binary() -> io::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ETCD_BIN").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&bin);
        if path.components().count() > 1 || path.is_absolute() {
            if path.is_file() {
                return Ok(path);
            }
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("ETCD_BIN={} does not exist", path.display()),
            ));
        }
        return find_on_path(&path).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("ETCD_BIN={} not found on PATH", path.display()),
            )
        });
    }
    if let Ok(path) = etcd_bin_vendored::etcd_bin_path() {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
    }
    find_on_path(Path::new("etcd")).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no etcd binary found: set ETCD_BIN, use a platform supported by \
             etcd-bin-vendored, or put `etcd` on PATH",
        )
    })
}

fn find_on_path(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Options for [`EtcdCluster::start_with`].
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use etcd_coord::testing::{ClusterOptions, EtcdCluster};
///
/// let cluster = EtcdCluster::start_with(
///     ClusterOptions::new(3)
///         .binary("/usr/bin/etcd")
///         .arg("--auto-compaction-retention=1"),
/// )
/// .await?;
/// assert_eq!(cluster.member_count(), 3);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    members: usize,
    binary: Option<PathBuf>,
    extra_args: Vec<String>,
    data_dir_root: Option<PathBuf>,
    ready_timeout: Duration,
    tls: Option<tls::TestCa>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self::new(1)
    }
}

impl ClusterOptions {
    /// Options for a cluster of `members` members, using [`etcd_binary`],
    /// no extra arguments, the default temporary root and a 20 s readiness
    /// timeout.
    ///
    /// # Examples
    ///
    /// ```
    /// let opts = etcd_coord::testing::ClusterOptions::new(3);
    /// ```
    pub fn new(members: usize) -> Self {
        Self {
            members,
            binary: None,
            extra_args: Vec::new(),
            data_dir_root: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            tls: None,
        }
    }

    /// Serves clients over TLS: `https://` client URLs with a server
    /// certificate for `localhost` and `127.0.0.1` signed by `ca`, and client
    /// certificates signed by `ca` required (`--client-cert-auth`). Peers
    /// still talk plain HTTP on loopback. `/health` and `/metrics` move to a
    /// plain-HTTP `--listen-metrics-urls` port so that readiness checks and
    /// [`EtcdCluster::metrics`] need no certificate; the harness's own gRPC
    /// calls ([`EtcdCluster::leader_index`], [`EtcdCluster::client`]) use a
    /// client certificate it gets from `ca`. [`EtcdCluster::version`] is not
    /// available over TLS.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// use etcd_coord::testing::{tls::TestCa, ClusterOptions, EtcdCluster};
    /// let ca = TestCa::new("test CA")?;
    /// let etcd = EtcdCluster::start_with(ClusterOptions::new(1).tls(ca)).await?;
    /// assert!(etcd.endpoint(0).starts_with("https://"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls(mut self, ca: tls::TestCa) -> Self {
        self.tls = Some(ca);
        self
    }

    /// Runs this etcd binary instead of [`etcd_binary`]'s choice.
    ///
    /// # Examples
    ///
    /// ```
    /// let opts = etcd_coord::testing::ClusterOptions::new(1).binary("/usr/bin/etcd");
    /// ```
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Appends one command-line argument for every member.
    ///
    /// Extra arguments come after the harness's own flags; etcd lets the last
    /// occurrence of a flag win, so they can also override defaults such as
    /// `--heartbeat-interval`.
    ///
    /// # Examples
    ///
    /// ```
    /// let opts = etcd_coord::testing::ClusterOptions::new(1)
    ///     .arg("--auto-compaction-mode=revision")
    ///     .arg("--auto-compaction-retention=100");
    /// ```
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Appends several command-line arguments; see [`ClusterOptions::arg`].
    ///
    /// # Examples
    ///
    /// ```
    /// let opts = etcd_coord::testing::ClusterOptions::new(1)
    ///     .args(["--quota-backend-bytes", "1048576"]);
    /// ```
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Creates the members' temporary directories below `root` (created if
    /// missing) instead of `ETCD_COORD_DATA_DIR` / `/dev/shm` / the system
    /// temporary directory.
    ///
    /// # Examples
    ///
    /// ```
    /// let opts = etcd_coord::testing::ClusterOptions::new(1).data_dir_root("/var/tmp");
    /// ```
    pub fn data_dir_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.data_dir_root = Some(root.into());
        self
    }

    /// How long each start attempt waits for all members to become healthy
    /// (default 20 s). Also used by [`EtcdCluster::restart`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let opts = etcd_coord::testing::ClusterOptions::new(3).ready_timeout(Duration::from_secs(60));
    /// ```
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }
}

/// A set of etcd members, either started by this process or external.
///
/// Dropping a locally started cluster kills (`SIGKILL`) and reaps every
/// process it started, then removes the temporary directories. Dropping never
/// blocks for long: processes that do not go away within a couple of seconds
/// are left for the kernel (they also die with the test process thanks to
/// `PR_SET_PDEATHSIG`).
///
/// Member indexes are `0..member_count()`. Methods taking an index return an
/// [`io::ErrorKind::InvalidInput`] error for an out-of-range index (except
/// [`EtcdCluster::endpoint`], which panics).
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use etcd_coord::testing::EtcdCluster;
///
/// let mut cluster = EtcdCluster::start(3).await?;
/// let leader = cluster.leader_index().await?;
/// cluster.kill(leader)?;
/// let mut client = cluster.client().await?;
/// client.put("still", "works", None).await?;
/// cluster.restart(leader).await?;
/// # Ok(())
/// # }
/// ```
pub struct EtcdCluster {
    kind: Kind,
}

enum Kind {
    Local(Local),
    External(Vec<String>),
}

impl fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Local(local) => f
                .debug_struct("EtcdCluster")
                .field("binary", &local.binary)
                .field("endpoints", &self.endpoints())
                .field(
                    "pids",
                    &(0..local.members.len())
                        .map(|i| self.pid(i))
                        .collect::<Vec<_>>(),
                )
                .finish(),
            Kind::External(endpoints) => f
                .debug_struct("EtcdCluster")
                .field("external", &true)
                .field("endpoints", endpoints)
                .finish(),
        }
    }
}

impl EtcdCluster {
    /// Starts a single-member cluster with the default [`ClusterOptions`].
    ///
    /// # Errors
    ///
    /// Fails when no etcd binary is found or the member does not become
    /// healthy after several attempts; the error includes the tail of the
    /// member's log.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// println!("etcd at {}", cluster.endpoint(0));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn single() -> io::Result<EtcdCluster> {
        Self::start(1).await
    }

    /// Starts `n` members as one cluster and waits until all are healthy.
    ///
    /// # Errors
    ///
    /// As [`EtcdCluster::start_with`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::start(3).await?;
    /// assert_eq!(cluster.endpoints().len(), 3);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(n: usize) -> io::Result<EtcdCluster> {
        Self::start_with(ClusterOptions::new(n)).await
    }

    /// Starts a cluster as described by `opts` and waits until every member
    /// is healthy.
    ///
    /// Each attempt picks fresh loopback ports and fresh directories; when a
    /// member exits early, turns out to be shadowed by another etcd on the
    /// same port, or is not healthy within the ready timeout, everything of
    /// that attempt is killed and the start is retried (4 attempts in all).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for zero members, `NotFound` when the
    /// binary does not exist, otherwise the last attempt's error including
    /// the tail of the failing member's log.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// use etcd_coord::testing::{ClusterOptions, EtcdCluster};
    /// let cluster = EtcdCluster::start_with(ClusterOptions::new(1).arg("--max-txn-ops=1024")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_with(opts: ClusterOptions) -> io::Result<EtcdCluster> {
        if opts.members == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an etcd cluster needs at least one member",
            ));
        }
        let binary = match &opts.binary {
            Some(path) => path.clone(),
            None => etcd_binary()?,
        };
        if !binary.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("etcd binary {} does not exist", binary.display()),
            ));
        }
        let root = data_root(opts.data_dir_root.as_deref())?;
        sweep_stale_dirs(&root);
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            match Local::try_start(&binary, &opts, &root).await {
                Ok(local) => {
                    return Ok(EtcdCluster {
                        kind: Kind::Local(local),
                    })
                }
                Err(error) => {
                    tracing::debug!(
                        attempt,
                        members = opts.members,
                        %error,
                        "etcd cluster start attempt failed; retrying with fresh ports"
                    );
                    last_error = Some(error);
                }
            }
        }
        let (kind, message) = match last_error {
            Some(e) => (e.kind(), e.to_string()),
            None => (io::ErrorKind::Other, String::from("no attempt made")),
        };
        Err(io::Error::new(
            kind,
            format!(
                "failed to start a {}-member etcd cluster with {} after {} attempts: {}",
                opts.members,
                binary.display(),
                START_ATTEMPTS,
                message
            ),
        ))
    }

    /// Wraps the endpoints in `ETCD_ENDPOINTS` (comma separated) when that
    /// variable is set and non-empty, starting nothing; otherwise starts `n`
    /// members like [`EtcdCluster::start`].
    ///
    /// # Errors
    ///
    /// As [`EtcdCluster::start_with`] when a cluster is started.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::from_env_or_start(3).await?;
    /// if let Err(reason) = cluster.require_local() {
    ///     eprintln!("skipped: {reason}");
    ///     return Ok(());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn from_env_or_start(n: usize) -> io::Result<EtcdCluster> {
        if let Ok(value) = std::env::var("ETCD_ENDPOINTS") {
            let endpoints: Vec<&str> = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if !endpoints.is_empty() {
                return Ok(Self::external(endpoints));
            }
        }
        Self::start(n).await
    }

    /// Wraps already-running etcd endpoints without starting anything.
    ///
    /// Endpoints without a scheme get `http://` prepended. Operations that
    /// control processes return [`io::ErrorKind::Unsupported`] errors.
    ///
    /// # Examples
    ///
    /// ```
    /// let cluster = etcd_coord::testing::EtcdCluster::external(["127.0.0.1:2379"]);
    /// assert!(cluster.is_external());
    /// assert_eq!(cluster.endpoint(0), "http://127.0.0.1:2379");
    /// ```
    pub fn external<I, S>(endpoints: I) -> EtcdCluster
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints = endpoints
            .into_iter()
            .map(|e| {
                let e = e.as_ref().trim();
                if e.contains("://") {
                    e.to_string()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        EtcdCluster {
            kind: Kind::External(endpoints),
        }
    }

    /// Whether this cluster wraps external endpoints (see
    /// [`EtcdCluster::from_env_or_start`]) rather than processes it started.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// assert!(!cluster.is_external());
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_external(&self) -> bool {
        matches!(self.kind, Kind::External(_))
    }

    /// `Ok(())` when the processes are local and can be killed, paused and
    /// restarted; otherwise `Err(reason)`, so a test can print
    /// `skipped: <reason>` and return.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let mut cluster = etcd_coord::testing::EtcdCluster::from_env_or_start(3).await?;
    /// if let Err(reason) = cluster.require_local() {
    ///     eprintln!("skipped: {reason}");
    ///     return Ok(());
    /// }
    /// cluster.kill(0)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn require_local(&self) -> Result<(), String> {
        match &self.kind {
            Kind::Local(_) => Ok(()),
            Kind::External(endpoints) => Err(format!(
                "the etcd cluster is external ({}); this needs etcd processes started by the test",
                endpoints.join(",")
            )),
        }
    }

    /// Client URLs, one per member, e.g. `http://127.0.0.1:40123`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::start(3).await?;
    /// let client = etcd_client::Client::connect(cluster.endpoints(), None).await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn endpoints(&self) -> Vec<String> {
        match &self.kind {
            Kind::Local(local) => local.members.iter().map(Member::client_url).collect(),
            Kind::External(endpoints) => endpoints.clone(),
        }
    }

    /// Number of members (or of external endpoints).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::start(3).await?;
    /// assert_eq!(cluster.member_count(), 3);
    /// # Ok(())
    /// # }
    /// ```
    pub fn member_count(&self) -> usize {
        match &self.kind {
            Kind::Local(local) => local.members.len(),
            Kind::External(endpoints) => endpoints.len(),
        }
    }

    /// Client URL of member `i`.
    ///
    /// # Panics
    ///
    /// When `i >= self.member_count()`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let cluster = etcd_coord::testing::EtcdCluster::start(3).await?;
    /// // A client that only talks to member 1.
    /// let client = etcd_client::Client::connect([cluster.endpoint(1)], None).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn endpoint(&self, i: usize) -> String {
        match &self.kind {
            Kind::Local(local) => local.members[i].client_url(),
            Kind::External(endpoints) => endpoints[i].clone(),
        }
    }

    /// PID of member `i`'s process; `None` when it is not running because it
    /// was killed or stopped (or the cluster is external, or `i` is out of
    /// range). A process that crashed on its own keeps its PID until it is
    /// killed, stopped or restarted through this type.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// println!("etcd pid {:?}", cluster.pid(0));
    /// # Ok(())
    /// # }
    /// ```
    pub fn pid(&self, i: usize) -> Option<u32> {
        match &self.kind {
            Kind::Local(local) => local.members.get(i)?.lock_child().as_ref().map(Child::id),
            Kind::External(_) => None,
        }
    }

    /// Member `i`'s data directory (`None` for external clusters or an
    /// out-of-range index). It survives kill, stop and restart and is removed
    /// when the cluster is dropped.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// let wal = cluster.data_dir(0).unwrap().join("member").join("wal");
    /// # Ok(())
    /// # }
    /// ```
    pub fn data_dir(&self, i: usize) -> Option<PathBuf> {
        match &self.kind {
            Kind::Local(local) => local.members.get(i).map(Member::data_dir),
            Kind::External(_) => None,
        }
    }

    /// Kills member `i` with `SIGKILL` and reaps it. Killing a member that is
    /// not running is a no-op. Its data dir stays; see
    /// [`EtcdCluster::restart`].
    ///
    /// # Errors
    ///
    /// `Unsupported` for external clusters, `InvalidInput` for a bad index,
    /// or the error of waiting for the process.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let mut cluster = etcd_coord::testing::EtcdCluster::start(3).await?;
    /// cluster.kill(0)?;
    /// assert_eq!(cluster.pid(0), None);
    /// # Ok(())
    /// # }
    /// ```
    pub fn kill(&mut self, i: usize) -> io::Result<()> {
        self.local_mut("kill")?.kill_member(i)
    }

    /// Freezes member `i` with `SIGSTOP`: it keeps its sockets open but
    /// answers nothing, like a hung machine. Returns once every thread of
    /// the process is stopped (checked via `/proc`, bounded by 5 s).
    /// Dropping the cluster still kills a paused member.
    ///
    /// # Errors
    ///
    /// `Unsupported` for external clusters, `InvalidInput` for a bad index,
    /// `NotFound` when the member is not running, `TimedOut` when the
    /// process did not stop in time.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// cluster.pause(0)?;
    /// // ... requests now hang ...
    /// cluster.resume(0)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn pause(&self, i: usize) -> io::Result<()> {
        self.local("pause")?
            .signal(i, libc::SIGSTOP, "paused etcd member")
    }

    /// Resumes member `i` with `SIGCONT` after [`EtcdCluster::pause`].
    ///
    /// # Errors
    ///
    /// As [`EtcdCluster::pause`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// cluster.pause(0)?;
    /// cluster.resume(0)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn resume(&self, i: usize) -> io::Result<()> {
        self.local("resume")?
            .signal(i, libc::SIGCONT, "resumed etcd member")
    }

    /// Stops member `i` gracefully: `SIGTERM` (plus `SIGCONT`, in case it is
    /// paused), then waits up to 10 s for it to exit before falling back to
    /// `SIGKILL`. Stopping a member that is not running is a no-op.
    ///
    /// # Errors
    ///
    /// `Unsupported` for external clusters, `InvalidInput` for a bad index,
    /// or the error of waiting for the process.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let mut cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// cluster.stop(0).await?;
    /// cluster.restart(0).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stop(&mut self, i: usize) -> io::Result<()> {
        self.local_mut("stop")?.stop(i).await
    }

    /// Starts member `i` again on the same data dir and the same ports (with
    /// `--initial-cluster-state existing`) and waits until it is healthy. A
    /// member that is still running is stopped first (see
    /// [`EtcdCluster::stop`]).
    ///
    /// The ports are fixed (they are part of the cluster membership), so if
    /// another process grabbed one in the meantime the restart fails after a
    /// few attempts.
    ///
    /// # Errors
    ///
    /// `Unsupported` for external clusters, `InvalidInput` for a bad index,
    /// otherwise an error including the tail of the member's log.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let mut cluster = etcd_coord::testing::EtcdCluster::start(3).await?;
    /// cluster.kill(2)?;
    /// cluster.restart(2).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn restart(&mut self, i: usize) -> io::Result<()> {
        self.local_mut("restart")?.restart(i).await
    }

    /// Waits up to `deadline` (a duration from now) until member `i` answers
    /// `GET /health` with `{"health":"true"}`. For a local member it fails
    /// early when the process has exited.
    ///
    /// # Errors
    ///
    /// `TimedOut` when the member is not healthy in time (with the tail of
    /// its log for local members), `InvalidInput` for a bad index, another
    /// error when the local process has exited, `Unsupported` for an
    /// external `https` endpoint.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// let cluster = etcd_coord::testing::EtcdCluster::start(3).await?;
    /// cluster.wait_ready(1, Duration::from_secs(5)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_ready(&self, i: usize, deadline: Duration) -> io::Result<()> {
        let until = Instant::now() + deadline;
        match &self.kind {
            Kind::Local(local) => {
                local.member(i)?;
                local.wait_member_ready(i, until).await
            }
            Kind::External(endpoints) => {
                let endpoint = endpoints
                    .get(i)
                    .ok_or_else(|| bad_index(i, endpoints.len()))?;
                let authority = http_authority(endpoint)?;
                loop {
                    if health_ok(authority, remaining(until)).await {
                        return Ok(());
                    }
                    if Instant::now() >= until {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("etcd at {endpoint} not healthy within {deadline:?}"),
                        ));
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        }
    }

    /// Index of the current raft leader.
    ///
    /// Asks every reachable member for its status (`member_id` in the
    /// response header, `leader`), trusts the answer with the highest raft
    /// term, and maps the leader's ID back to a member index. Members that
    /// are killed, stopped or paused are skipped. Retries for up to 15 s
    /// while an election is in progress.
    ///
    /// # Errors
    ///
    /// `TimedOut` when no member reports a leader that is one of ours in time.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let mut cluster = etcd_coord::testing::EtcdCluster::start(3).await?;
    /// let leader = cluster.leader_index().await?;
    /// cluster.kill(leader)?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn leader_index(&self) -> io::Result<usize> {
        let until = Instant::now() + LEADER_TIMEOUT;
        let mut last_problem = String::from("no member answered");
        loop {
            // (index, member_id, leader, raft_term)
            let mut statuses = Vec::new();
            for i in 0..self.member_count() {
                if let Kind::Local(local) = &self.kind {
                    if local.members[i].lock_child().is_none() {
                        continue;
                    }
                }
                match member_status(&self.endpoint(i), self.client_tls()).await {
                    Ok(status) => statuses.push((i, status.0, status.1, status.2)),
                    Err(e) => last_problem = format!("member {i}: {e}"),
                }
            }
            if let Some(&(_, _, leader_id, _)) =
                statuses.iter().filter(|s| s.2 != 0).max_by_key(|s| s.3)
            {
                if let Some(&(i, ..)) = statuses.iter().find(|s| s.1 == leader_id) {
                    return Ok(i);
                }
                last_problem = format!("leader {leader_id:x} is not among the reachable members");
            } else if !statuses.is_empty() {
                last_problem = String::from("no member knows a leader");
            }
            if Instant::now() >= until {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no etcd leader found within {LEADER_TIMEOUT:?}: {last_problem}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server version (the `etcdserver` field of `GET /version`), e.g.
    /// `"3.7.2"`, from member 0, or from the next member when member 0 does
    /// not answer.
    ///
    /// # Errors
    ///
    /// When no member answers with a parsable version.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// assert!(cluster.version().await?.starts_with("3."));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn version(&self) -> io::Result<String> {
        let mut last_error = io::Error::new(io::ErrorKind::NotFound, "cluster has no members");
        for endpoint in self.endpoints() {
            let result = async {
                let authority = http_authority(&endpoint)?;
                let (status, body) =
                    http_request(authority, "GET", "/version", b"", HTTP_TIMEOUT).await?;
                let body = String::from_utf8_lossy(&body);
                match (status, json_string_field(&body, "etcdserver")) {
                    (200, Some(version)) => Ok(version),
                    _ => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "unexpected /version answer from {endpoint}: HTTP {status}: {body}"
                        ),
                    )),
                }
            }
            .await;
            match result {
                Ok(version) => return Ok(version),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// Connects an [`etcd_client::Client`] to all endpoints (no options).
    ///
    /// # Errors
    ///
    /// Whatever [`etcd_client::Client::connect`] returns.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// let mut client = cluster.client().await?;
    /// client.put("k", "v", None).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let options = self
            .client_tls()
            .map(|tls| etcd_client::ConnectOptions::new().with_tls(tls));
        etcd_client::Client::connect(self.endpoints(), options).await
    }

    /// TLS options with the harness's own client certificate, for a cluster
    /// started with [`ClusterOptions::tls`].
    fn client_tls(&self) -> Option<etcd_client::TlsOptions> {
        match &self.kind {
            Kind::Local(local) => local.tls.as_ref().map(HarnessTls::options),
            Kind::External(_) => None,
        }
    }

    /// Scrapes member `i`'s `/metrics` (plain `http` endpoints only).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a bad index, `Unsupported` for `https` endpoints,
    /// otherwise connection errors or a non-200 answer.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
    /// let mut client = cluster.client().await?;
    /// let before = cluster.metrics(0).await?;
    /// client.get("k", None).await?;
    /// let delta = cluster.metrics(0).await?.since(&before);
    /// assert_eq!(delta.get("Range"), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn metrics(&self, i: usize) -> io::Result<Metrics> {
        if i >= self.member_count() {
            return Err(bad_index(i, self.member_count()));
        }
        let endpoint = match &self.kind {
            Kind::Local(local) => local.members[i].http_url(),
            Kind::External(_) => self.endpoint(i),
        };
        let authority = http_authority(&endpoint)?;
        let (status, body) = http_request(authority, "GET", "/metrics", b"", HTTP_TIMEOUT).await?;
        let text = String::from_utf8_lossy(&body);
        if status != 200 {
            return Err(io::Error::other(format!(
                "GET {endpoint}/metrics answered HTTP {status}"
            )));
        }
        Ok(Metrics::parse(&text))
    }

    fn local(&self, what: &str) -> io::Result<&Local> {
        match &self.kind {
            Kind::Local(local) => Ok(local),
            Kind::External(endpoints) => Err(external_error(what, endpoints)),
        }
    }

    fn local_mut(&mut self, what: &str) -> io::Result<&mut Local> {
        match &mut self.kind {
            Kind::Local(local) => Ok(local),
            Kind::External(endpoints) => Err(external_error(what, endpoints)),
        }
    }
}

fn external_error(what: &str, endpoints: &[String]) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "cannot {what}: the etcd cluster is external ({}), its processes are not ours",
            endpoints.join(",")
        ),
    )
}

fn bad_index(i: usize, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("no etcd member {i}: the cluster has {len} members"),
    )
}

fn remaining(until: Instant) -> Duration {
    until.saturating_duration_since(Instant::now())
}

/// One etcd process (possibly not running) and its directory.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP port for `/health` and `/metrics` when clients use TLS.
    metrics_port: Option<u16>,
    /// Holds `data/` and `etcd.log`; removed on drop (after the process is dead).
    dir: tempfile::TempDir,
    /// `None` when not running. While a `Child` is held it has not been
    /// reaped, so its PID cannot be reused and signalling it is safe.
    child: Mutex<Option<Child>>,
}

impl Member {
    fn client_url(&self) -> String {
        let scheme = if self.metrics_port.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Where `/health` and `/metrics` are served over plain HTTP.
    fn http_url(&self) -> String {
        match self.metrics_port {
            Some(port) => format!("http://127.0.0.1:{port}"),
            None => self.client_url(),
        }
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Some(status)` when the process we hold has exited.
    fn exit_status(&self) -> io::Result<Option<ExitStatus>> {
        match self.lock_child().as_mut() {
            Some(child) => child.try_wait(),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("etcd member {} is not running", self.name),
            )),
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 20, 8192)
    }
}

/// A cluster of processes started by us.
struct Local {
    binary: PathBuf,
    members: Vec<Member>,
    token: String,
    initial_cluster: String,
    extra_args: Vec<String>,
    ready_timeout: Duration,
    tls: Option<HarnessTls>,
}

/// The files etcd serves TLS with, and the harness's own client identity.
struct HarnessTls {
    ca_pem: String,
    client: tls::CertKey,
}

impl HarnessTls {
    fn options(&self) -> etcd_client::TlsOptions {
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem))
            .identity(etcd_client::Identity::from_pem(
                &self.client.cert_pem,
                &self.client.key_pem,
            ))
    }
}

/// Names of the PEM files in a member's directory when it serves TLS.
const TLS_FILES: [&str; 3] = ["ca.pem", "server.pem", "server-key.pem"];

impl Local {
    async fn try_start(binary: &Path, opts: &ClusterOptions, root: &Path) -> io::Result<Local> {
        let n = opts.members;
        let per_member = if opts.tls.is_some() { 3 } else { 2 };
        let ports = free_ports(per_member * n)?;
        let server = match &opts.tls {
            Some(ca) => Some(ca.server_cert()?),
            None => None,
        };
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let dir = tempfile::Builder::new()
                .prefix(&format!("{DIR_PREFIX}m{i}-"))
                .tempdir_in(root)?;
            std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
            if let (Some(ca), Some(server)) = (&opts.tls, &server) {
                let pems = [ca.cert_pem(), &server.cert_pem, &server.key_pem];
                for (file, pem) in TLS_FILES.iter().zip(pems) {
                    std::fs::write(dir.path().join(file), pem)?;
                }
            }
            members.push(Member {
                name: format!("m{i}"),
                client_port: ports[per_member * i],
                peer_port: ports[per_member * i + 1],
                metrics_port: (per_member == 3).then(|| ports[per_member * i + 2]),
                dir,
                child: Mutex::new(None),
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let local = Local {
            binary: binary.to_path_buf(),
            members,
            token: format!("etcd-coord-{}", uuid::Uuid::new_v4().simple()),
            initial_cluster,
            extra_args: opts.extra_args.clone(),
            ready_timeout: opts.ready_timeout,
            tls: match &opts.tls {
                Some(ca) => Some(HarnessTls {
                    ca_pem: ca.cert_pem().to_string(),
                    client: ca.client_cert("etcd-coord-harness")?,
                }),
                None => None,
            },
        };
        // On any error below, dropping `local` kills what was started.
        for i in 0..n {
            local.spawn_member(i, "new").await?;
        }
        let until = Instant::now() + local.ready_timeout;
        for i in 0..n {
            local.wait_member_ready(i, until).await?;
        }
        Ok(local)
    }

    fn member(&self, i: usize) -> io::Result<&Member> {
        self.members
            .get(i)
            .ok_or_else(|| bad_index(i, self.members.len()))
    }

    fn member_args(&self, i: usize, state: &str) -> Vec<String> {
        let m = &self.members[i];
        let (heartbeat, election) = if self.members.len() == 1 {
            ("50", "500")
        } else {
            ("100", "1000")
        };
        let mut args: Vec<String> = [
            "--name",
            &m.name,
            "--data-dir",
            &m.data_dir().to_string_lossy(),
            "--listen-client-urls",
            &m.client_url(),
            "--advertise-client-urls",
            &m.client_url(),
            "--listen-peer-urls",
            &m.peer_url(),
            "--initial-advertise-peer-urls",
            &m.peer_url(),
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            &self.token,
            "--logger",
            "zap",
            "--log-level",
            "warn",
            "--heartbeat-interval",
            heartbeat,
            "--election-timeout",
            election,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(port) = m.metrics_port {
            let file = |name: &str| m.dir.path().join(name).to_string_lossy().into_owned();
            args.extend([
                "--trusted-ca-file".to_string(),
                file(TLS_FILES[0]),
                "--cert-file".to_string(),
                file(TLS_FILES[1]),
                "--key-file".to_string(),
                file(TLS_FILES[2]),
                "--client-cert-auth".to_string(),
                "--listen-metrics-urls".to_string(),
                format!("http://127.0.0.1:{port}"),
            ]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    async fn spawn_member(&self, i: usize, state: &str) -> io::Result<u32> {
        let m = self.member(i)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.log_path())?;
        let log_err = log.try_clone()?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.member_args(i, state))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(goarch) = unsupported_arch_env(&self.binary) {
            cmd.env("ETCD_UNSUPPORTED_ARCH", goarch);
        }
        set_parent_death_signal(&mut cmd);
        let child = spawn_child(cmd).await?;
        let pid = child.id();
        *m.lock_child() = Some(child);
        tracing::debug!(
            member = %m.name,
            pid,
            client_port = m.client_port,
            peer_port = m.peer_port,
            state,
            binary = %self.binary.display(),
            "started etcd member"
        );
        Ok(pid)
    }

    /// Polls `/health` until healthy, then checks (once) that the member on
    /// that port really is ours and still running.
    async fn wait_member_ready(&self, i: usize, until: Instant) -> io::Result<()> {
        let m = self.member(i)?;
        let client_url = m.client_url();
        let http_url = m.http_url();
        let authority = http_authority(&http_url)?;
        let own_peer = format!("\"{}\"", m.peer_url());
        loop {
            self.ensure_running(m, "while starting")?;
            // Stop waiting for an answer as soon as the process exits (e.g.
            // when someone else holds the port and never answers).
            let healthy = tokio::select! {
                healthy = health_ok(authority, remaining(until)) => healthy,
                () = wait_for_exit(m) => false,
            };
            if healthy {
                let identity = match &self.tls {
                    // The JSON gateway is on the TLS port; ask over gRPC instead.
                    Some(tls) => member_peer_urls(&client_url, tls.options())
                        .await
                        .map(|urls| (200, format!("{urls:?}").into_bytes())),
                    None => {
                        http_request(
                            authority,
                            "POST",
                            "/v3/cluster/member/list",
                            b"{}",
                            remaining(until).min(HTTP_TIMEOUT),
                        )
                        .await
                    }
                };
                // With auth enabled (a restarted member of a cluster whose test turned auth
                // on), the member list needs a user; the running process is then ours.
                let identity = match identity {
                    Ok((_, body))
                        if String::from_utf8_lossy(&body).contains("user name is empty") =>
                    {
                        Ok((200, own_peer.clone().into_bytes()))
                    }
                    other => other,
                };
                if let Ok((200, body)) = identity {
                    if !String::from_utf8_lossy(&body).contains(&own_peer) {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!(
                                "port {} is served by an etcd that is not member {} (port race?)\n\
                                 log tail:\n{}",
                                m.client_port,
                                m.name,
                                m.log_tail()
                            ),
                        ));
                    }
                    self.ensure_running(m, "after reporting healthy")?;
                    return Ok(());
                }
            }
            if Instant::now() >= until {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd member {} ({client_url}) not healthy in time\nlog tail:\n{}",
                        m.name,
                        m.log_tail()
                    ),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn ensure_running(&self, m: &Member, when: &str) -> io::Result<()> {
        if let Some(status) = m.exit_status()? {
            return Err(io::Error::other(format!(
                "etcd member {} (client port {}, peer port {}) exited {when}: {status}\nlog tail:\n{}",
                m.name,
                m.client_port,
                m.peer_port,
                m.log_tail()
            )));
        }
        Ok(())
    }

    fn signal(&self, i: usize, signal: libc::c_int, what: &'static str) -> io::Result<()> {
        let m = self.member(i)?;
        let mut guard = m.lock_child();
        let child = guard.as_mut().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("etcd member {} is not running", m.name),
            )
        })?;
        if child.try_wait()?.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("etcd member {} has exited", m.name),
            ));
        }
        let pid = child.id();
        send_signal(pid, signal)?;
        if signal == libc::SIGSTOP {
            // kill() returns before every thread has actually stopped; a
            // thread still running could answer one more request. Wait
            // (briefly) until all of them are in the stopped state.
            let until = Instant::now() + PAUSE_TIMEOUT;
            while !all_threads_stopped(pid) {
                if Instant::now() >= until {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "etcd member {} (pid {pid}) did not stop within {PAUSE_TIMEOUT:?}",
                            m.name
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        tracing::debug!(
            member = %m.name,
            pid,
            client_port = m.client_port,
            peer_port = m.peer_port,
            "{what}"
        );
        Ok(())
    }

    async fn stop(&mut self, i: usize) -> io::Result<()> {
        let m = self.member(i)?;
        let pid = {
            let mut guard = m.lock_child();
            let Some(child) = guard.as_mut() else {
                return Ok(());
            };
            if child.try_wait()?.is_none() {
                send_signal(child.id(), libc::SIGTERM)?;
                // A paused process only acts on SIGTERM once continued.
                send_signal(child.id(), libc::SIGCONT)?;
            }
            child.id()
        };
        let until = Instant::now() + STOP_TIMEOUT;
        // The child stays in the member while we wait, so if this future is
        // cancelled the cluster's Drop still kills it.
        let graceful = loop {
            if let Some(status) = m.exit_status()? {
                break Some(status);
            }
            if Instant::now() >= until {
                break None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let child = m.lock_child().take();
        let status = match (graceful, child) {
            (Some(status), _) => status,
            (None, Some(mut child)) => {
                let _ = child.kill();
                child.wait()?
            }
            (None, None) => return Ok(()),
        };
        tracing::debug!(
            member = %m.name,
            pid,
            client_port = m.client_port,
            peer_port = m.peer_port,
            %status,
            graceful = graceful.is_some(),
            "stopped etcd member"
        );
        Ok(())
    }

    async fn restart(&mut self, i: usize) -> io::Result<()> {
        self.member(i)?;
        self.stop(i).await?;
        let mut last_error = None;
        for attempt in 1..=RESTART_ATTEMPTS {
            let pid = self.spawn_member(i, "existing").await?;
            let until = Instant::now() + self.ready_timeout;
            match self.wait_member_ready(i, until).await {
                Ok(()) => {
                    let m = &self.members[i];
                    tracing::debug!(
                        member = %m.name,
                        pid,
                        client_port = m.client_port,
                        peer_port = m.peer_port,
                        attempt,
                        "restarted etcd member"
                    );
                    return Ok(());
                }
                Err(error) => {
                    tracing::debug!(attempt, %error, "etcd member restart attempt failed");
                    self.kill_member(i)?;
                    last_error = Some(error);
                }
            }
        }
        let (kind, message) = match last_error {
            Some(e) => (e.kind(), e.to_string()),
            None => (io::ErrorKind::Other, String::from("no attempt made")),
        };
        Err(io::Error::new(
            kind,
            format!(
                "failed to restart etcd member {} after {RESTART_ATTEMPTS} attempts: {message}",
                self.members[i].name
            ),
        ))
    }

    /// SIGKILL + reap; a no-op when the member is not running.
    fn kill_member(&mut self, i: usize) -> io::Result<()> {
        let len = self.members.len();
        let member = self.members.get_mut(i).ok_or_else(|| bad_index(i, len))?;
        let child = member
            .child
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut child) = child {
            let pid = child.id();
            // Ok(()) also when the process already exited.
            let _ = child.kill();
            let status = child.wait()?;
            tracing::debug!(
                member = %member.name,
                pid,
                client_port = member.client_port,
                peer_port = member.peer_port,
                %status,
                "killed etcd member"
            );
        }
        Ok(())
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let mut dying = Vec::new();
        for m in &mut self.members {
            let child = m
                .child
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(mut child) = child {
                let pid = child.id();
                // SIGKILL also ends stopped (paused) processes; SIGCONT is harmless.
                let _ = child.kill();
                let _ = send_signal(pid, libc::SIGCONT);
                tracing::debug!(
                    member = %m.name,
                    pid,
                    client_port = m.client_port,
                    peer_port = m.peer_port,
                    "killed etcd member (cluster dropped)"
                );
                dying.push(child);
            }
        }
        let until = Instant::now() + DROP_REAP_TIMEOUT;
        while !dying.is_empty() {
            dying.retain_mut(|child| !matches!(child.try_wait(), Ok(Some(_)) | Err(_)));
            if dying.is_empty() || Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for child in &dying {
            tracing::debug!(
                pid = child.id(),
                "etcd process not reaped in time; leaving it"
            );
        }
        // The TempDirs (fields) are removed after this, with the processes gone.
    }
}

/// Whether every thread of `pid` is in the stopped (`T`) state, according to
/// `/proc/<pid>/task/*/stat`. Dead threads count as stopped.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut seen = 0;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread exited meanwhile
        };
        // The state follows the parenthesised command name, which may contain spaces.
        let state = stat
            .rfind(')')
            .and_then(|close| stat[close + 1..].split_whitespace().next());
        match state {
            Some("T" | "Z" | "X" | "x") => seen += 1,
            _ => return false,
        }
    }
    seen > 0
}

fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: plain syscall; the caller holds the unreaped Child, so the PID
    // still belongs to our process.
    if unsafe { libc::kill(pid, signal) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure only performs async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            // The parent died before prctl took effect: do not outlive it.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

struct SpawnJob {
    cmd: Command,
    reply: tokio::sync::oneshot::Sender<io::Result<Child>>,
}

/// The long-lived thread that forks etcd children (see the module docs on
/// `PR_SET_PDEATHSIG`).
fn spawner() -> Option<&'static mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnJob>();
            std::thread::Builder::new()
                .name("etcd-coord-spawner".into())
                .spawn(move || {
                    for job in rx {
                        let mut cmd = job.cmd;
                        if let Err(Ok(mut orphan)) = job.reply.send(cmd.spawn()) {
                            // Nobody waits for it any more (cancelled start).
                            let _ = orphan.kill();
                            let _ = orphan.wait();
                        }
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

async fn spawn_child(cmd: Command) -> io::Result<Child> {
    let Some(spawner) = spawner() else {
        let mut cmd = cmd;
        return cmd.spawn();
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    match spawner.send(SpawnJob { cmd, reply }) {
        Ok(()) => answer
            .await
            .map_err(|_| io::Error::other("etcd spawner thread went away"))?,
        Err(mpsc::SendError(job)) => {
            let mut cmd = job.cmd;
            cmd.spawn()
        }
    }
}

/// Reserves `n` distinct free loopback ports (released again before use).
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

fn data_root(explicit: Option<&Path>) -> io::Result<PathBuf> {
    if let Some(root) = explicit {
        std::fs::create_dir_all(root)?;
        return Ok(root.to_path_buf());
    }
    if let Some(root) = std::env::var_os("ETCD_COORD_DATA_DIR").filter(|v| !v.is_empty()) {
        let root = PathBuf::from(root);
        std::fs::create_dir_all(&root)?;
        return Ok(root);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && is_writable_dir(shm) {
        return Ok(shm.to_path_buf());
    }
    Ok(std::env::temp_dir())
}

/// Prefix of the members' temporary directories.
const DIR_PREFIX: &str = "etcd-coord-";
/// File in a member directory holding the PID of the process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Removes member directories left behind by test processes that were killed
/// before they could clean up (their etcd children died with them). Runs once
/// per process and root; only directories whose owner process is gone are
/// touched.
fn sweep_stale_dirs(root: &Path) {
    static SWEPT: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    {
        let mut swept = SWEPT
            .get_or_init(|| Mutex::new(Vec::new()))
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if swept.iter().any(|r| r == root) {
            return;
        }
        swept.push(root.to_path_buf());
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let Ok(owner) = owner.trim().parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            tracing::debug!(dir = %dir.display(), owner, "removing stale etcd directory");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn is_writable_dir(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// `ETCD_UNSUPPORTED_ARCH` value to set, if any. etcd refuses to start on
/// architectures it does not officially support unless this is set: 3.4
/// supports amd64 and ppc64le; 3.5+ adds arm64 and s390x. Nothing is set on
/// x86_64 or when the variable is inherited from the environment.
fn unsupported_arch_env(binary: &Path) -> Option<&'static str> {
    let goarch = match std::env::consts::ARCH {
        "x86_64" => return None,
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "x86" => "386",
        other => other,
    };
    if std::env::var_os("ETCD_UNSUPPORTED_ARCH").is_some() {
        return None;
    }
    let supported = match binary_version(binary) {
        Some((3, 4)) => goarch == "ppc64le",
        Some((major, minor)) if (major, minor) >= (3, 5) => {
            matches!(goarch, "arm64" | "ppc64le" | "s390x")
        }
        _ => false,
    };
    (!supported).then_some(goarch)
}

/// `(major, minor)` from `etcd --version`, cached per binary.
fn binary_version(binary: &Path) -> Option<(u32, u32)> {
    type Versions = HashMap<PathBuf, Option<(u32, u32)>>;
    static CACHE: OnceLock<Mutex<Versions>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(v) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(binary)
    {
        return *v;
    }
    let version = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text.lines().find(|l| l.starts_with("etcd Version:"))?;
            let mut parts = line["etcd Version:".len()..].trim().split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        });
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(binary.to_path_buf(), version);
    version
}

/// The last `lines` lines (at most `max_bytes`) of a log file.
fn log_tail(path: &Path, lines: usize, max_bytes: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let all: Vec<&str> = text.lines().collect();
        Ok(all[all.len().saturating_sub(lines)..].join("\n"))
    };
    match read() {
        Ok(tail) if tail.is_empty() => format!("({} is empty)", path.display()),
        Ok(tail) => tail,
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// `host:port` of a plain-HTTP endpoint URL.
fn http_authority(endpoint: &str) -> io::Result<&str> {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("only http:// endpoints can be queried over HTTP, not {endpoint}"),
        ));
    };
    Ok(match rest.find('/') {
        Some(slash) => &rest[..slash],
        None => rest,
    })
}

async fn health_ok(authority: &str, budget: Duration) -> bool {
    let timeout = budget.clamp(Duration::from_millis(100), Duration::from_secs(2));
    match http_request(authority, "GET", "/health", b"", timeout).await {
        Ok((200, body)) => String::from_utf8_lossy(&body).contains("\"health\":\"true\""),
        _ => false,
    }
}

/// Resolves once member `m`'s process has exited (or is not running).
async fn wait_for_exit(m: &Member) {
    while let Ok(None) = m.exit_status() {
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The peer URLs of every member, as listed by the member at `endpoint`.
async fn member_peer_urls(endpoint: &str, tls: etcd_client::TlsOptions) -> io::Result<Vec<String>> {
    let options = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    let call = async {
        let mut client = etcd_client::Client::connect([endpoint], Some(options)).await?;
        client.member_list().await
    };
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Ok(list)) => Ok(list
            .members()
            .iter()
            .flat_map(|m| m.peer_urls().iter().cloned())
            .collect()),
        Ok(Err(e)) => Err(io::Error::other(e.to_string())),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "member list timed out",
        )),
    }
}

/// `(member_id, leader, raft_term)` of one member.
async fn member_status(
    endpoint: &str,
    tls: Option<etcd_client::TlsOptions>,
) -> Result<(u64, u64, u64), String> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        options = options.with_tls(tls);
    }
    let call = async {
        let mut client = etcd_client::Client::connect([endpoint], Some(options)).await?;
        client.status().await
    };
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Ok(status)) => {
            let header = status
                .header()
                .ok_or_else(|| String::from("status response without header"))?;
            Ok((header.member_id(), status.leader(), header.raft_term()))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(String::from("status timed out")),
    }
}

/// A tiny HTTP/1.0 client: one request per connection, `Connection: close`,
/// body read to EOF (chunked and Content-Length bodies are handled too).
async fn http_request(
    authority: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<(u16, Vec<u8>)> {
    let exchange = async {
        let mut stream = TcpStream::connect(authority).await?;
        let mut request = format!(
            "{method} {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\nAccept: */*\r\n"
        );
        if !body.is_empty() || method != "GET" {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.flush().await?;
        let mut response = Vec::new();
        (&mut stream)
            .take(HTTP_MAX_RESPONSE)
            .read_to_end(&mut response)
            .await?;
        parse_http_response(&response)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{method} http://{authority}{path} timed out after {timeout:?}"),
        )),
    }
}

fn parse_http_response(raw: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad HTTP response: {what}"),
        )
    };
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid("no status code"))?;
    let mut chunked = false;
    let mut content_length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if name == "content-length" {
                content_length = value.parse::<usize>().ok();
            }
        }
    }
    let body = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(body).ok_or_else(|| invalid("malformed chunked body"))?
    } else if let Some(len) = content_length {
        body[..len.min(body.len())].to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_hex = size_line.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size..)?;
        data = data.strip_prefix(b"\r\n").unwrap_or(data);
    }
}

/// The string value of `"field":"value"` in a flat JSON object.
fn json_string_field(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\"");
    let after_key = &json[json.find(&key)? + key.len()..];
    let after_colon = after_key.trim_start().strip_prefix(':')?.trim_start();
    let value = after_colon.strip_prefix('"')?;
    Some(value[..value.find('"')?].to_string())
}

/// A parsed scrape of etcd's Prometheus `/metrics`.
///
/// [`Metrics::handled`] counts `grpc_server_handled_total` by gRPC method
/// (e.g. `"Range"`, `"Put"`, `"Txn"`, `"LeaseGrant"`, `"Watch"`), summed over
/// result codes and services. Any other sample is available through
/// [`Metrics::counter`].
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let cluster = etcd_coord::testing::EtcdCluster::single().await?;
/// let mut client = cluster.client().await?;
/// let before = cluster.metrics(0).await?;
/// client.put("k", "v", None).await?;
/// let delta = cluster.metrics(0).await?.since(&before);
/// assert_eq!(delta.get("Put"), 1);
/// assert_eq!(delta.total(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `grpc_server_handled_total` by `grpc_method`, summed over codes and services.
    pub handled: BTreeMap<String, u64>,
    /// Every sample, keyed by its canonical series name.
    samples: BTreeMap<String, Sample>,
}

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    /// Sorted by label name.
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn key(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

impl Metrics {
    /// Total number of handled gRPC requests over all methods.
    ///
    /// # Examples
    ///
    /// ```
    /// use etcd_coord::testing::Metrics;
    /// let m = Metrics::parse(
    ///     "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 3\n",
    /// );
    /// assert_eq!(m.total(), 3);
    /// ```
    pub fn total(&self) -> u64 {
        self.handled.values().sum()
    }

    /// Number of handled requests of gRPC method `method` (e.g. `"Range"`);
    /// 0 when absent.
    ///
    /// # Examples
    ///
    /// ```
    /// use etcd_coord::testing::Metrics;
    /// let m = Metrics::parse(
    ///     "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 2\n",
    /// );
    /// assert_eq!(m.get("Put"), 2);
    /// assert_eq!(m.get("Range"), 0);
    /// ```
    pub fn get(&self, method: &str) -> u64 {
        self.handled.get(method).copied().unwrap_or(0)
    }

    /// `self - earlier`: the requests handled in between, per method
    /// (saturating at 0). Other samples are subtracted series by series, so
    /// [`Metrics::counter`] on the result gives counter increases (and, for
    /// gauges, the change, which may be negative).
    ///
    /// # Examples
    ///
    /// ```
    /// use etcd_coord::testing::Metrics;
    /// let line = |n: u32| format!(
    ///     "grpc_server_handled_total{{grpc_code=\"OK\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}} {n}\n");
    /// let before = Metrics::parse(&line(5));
    /// let after = Metrics::parse(&line(7));
    /// assert_eq!(after.since(&before).get("Range"), 2);
    /// ```
    pub fn since(&self, earlier: &Metrics) -> Metrics {
        let handled = self
            .handled
            .iter()
            .map(|(method, &n)| (method.clone(), n.saturating_sub(earlier.get(method))))
            .collect();
        let samples = self
            .samples
            .iter()
            .map(|(key, sample)| {
                let before = earlier.samples.get(key).map_or(0.0, |s| s.value);
                let mut delta = sample.clone();
                delta.value -= before;
                (key.clone(), delta)
            })
            .collect();
        Metrics { handled, samples }
    }

    /// Sum of the samples selected by `selector`: a metric name, optionally
    /// followed by label matchers, e.g. `"etcd_debugging_mvcc_watch_stream_total"`
    /// or `grpc_server_handled_total{grpc_method="Range",grpc_code="OK"}`.
    /// A sample matches when its name equals the given name and it carries
    /// every given label with the given value (other labels are ignored).
    /// Returns 0.0 when nothing matches or the selector cannot be parsed.
    ///
    /// # Examples
    ///
    /// ```
    /// use etcd_coord::testing::Metrics;
    /// let m = Metrics::parse("etcd_debugging_mvcc_watcher_total 4\n");
    /// assert_eq!(m.counter("etcd_debugging_mvcc_watcher_total"), 4.0);
    /// ```
    pub fn counter(&self, selector: &str) -> f64 {
        let selector = selector.trim();
        let (name, wanted) = match selector.find('{') {
            Some(brace) => match parse_labels(&selector[brace + 1..]) {
                Some((labels, _)) => (selector[..brace].trim(), labels),
                None => return 0.0,
            },
            None => (selector, Vec::new()),
        };
        self.samples
            .values()
            .filter(|s| s.name == name && wanted.iter().all(|w| s.labels.contains(w)))
            .map(|s| s.value)
            .sum()
    }

    /// Parses the Prometheus text exposition format. Comment lines and lines
    /// that cannot be parsed are ignored.
    ///
    /// # Examples
    ///
    /// ```
    /// use etcd_coord::testing::Metrics;
    /// let text = "\
    /// # TYPE grpc_server_handled_total counter
    /// grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 10
    /// grpc_server_handled_total{grpc_code=\"NotFound\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1
    /// etcd_server_has_leader 1
    /// ";
    /// let m = Metrics::parse(text);
    /// assert_eq!(m.get("Range"), 11);
    /// assert_eq!(m.counter("etcd_server_has_leader"), 1.0);
    /// ```
    pub fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        for sample in text.lines().filter_map(parse_sample) {
            if sample.name == "grpc_server_handled_total" {
                if let Some((_, method)) = sample.labels.iter().find(|(k, _)| k == "grpc_method") {
                    let n = if sample.value.is_finite() && sample.value > 0.0 {
                        sample.value as u64
                    } else {
                        0
                    };
                    *metrics.handled.entry(method.clone()).or_insert(0) += n;
                }
            }
            let key = sample.key();
            match metrics.samples.get_mut(&key) {
                // Duplicate series should not happen; sum to be safe.
                Some(existing) => existing.value += sample.value,
                None => {
                    metrics.samples.insert(key, sample);
                }
            }
        }
        metrics
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    let value = parse_float(rest.split_whitespace().next()?)?;
    labels.sort();
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (the part after `{`); returns the labels and the
/// text after the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (idx, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break idx,
                other => value.push(other),
            }
        };
        labels.push((key, value));
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        }
    }
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}
