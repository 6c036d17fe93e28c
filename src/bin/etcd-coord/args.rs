//! The command line's grammar: global options in etcdctl's spelling, one subcommand per
//! primitive, and the duration syntax shared with etcdctl (Go's `time.ParseDuration`).

use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::exit;

const ABOUT: &str = "Distributed locks, elections, semaphores, barriers, work queues and service \
discovery on etcd v3, from the shell. Compatible with `etcdctl lock` and `etcdctl elect` on the \
same names.";

const AFTER_HELP: &str = "\
Exit status:
  0      success (or, with a command, the command's own status)
  1      error: etcd unreachable, permission denied, the session ended while waiting, ...
  2      bad usage
  75     the lock, permit or leadership was lost while held; a running command was stopped
  126    the command could not be run (permission denied)
  127    the command was not found
  128+N  interrupted by signal N while waiting (130 for SIGINT, 143 for SIGTERM), or the
         command was killed by signal N

Examples:
  # a cron job that never overlaps with itself anywhere in the fleet
  etcd-coord --endpoints 10.0.0.1:2379,10.0.0.2:2379 lock backups/nightly -- /usr/local/bin/backup

  # run the scheduler only on the elected leader
  etcd-coord elect services/scheduler \"$(hostname)\" -- ./scheduler

  # follow who leads
  etcd-coord elect --listen services/scheduler

  # a worker that runs a command per job (job on stdin; exit 0 acknowledges it)
  etcd-coord queue work thumbnails -- ./make-thumbnail

Run `etcd-coord <COMMAND> --help` for each command's options and examples.";

/// Everything on the command line.
#[derive(Debug, Parser)]
#[command(
    name = "etcd-coord",
    version,
    about = ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Connection and session options, spelt as etcdctl spells them. Accepted before or after the
/// subcommand.
#[derive(Debug, Args)]
pub struct Global {
    /// etcd endpoints, comma separated: host:port, http://host:port or https://host:port
    #[arg(
        long,
        global = true,
        env = "ETCD_ENDPOINTS",
        hide_env_values = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        value_name = "ENDPOINTS"
    )]
    pub endpoints: Vec<String>,

    /// How long to wait for the cluster to answer when connecting
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub dial_timeout: Duration,

    /// How long one request to etcd may take
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub command_timeout: Duration,

    /// Verify the servers' certificates with this CA bundle (PEM); enables TLS
    #[arg(long, global = true, value_name = "FILE")]
    pub cacert: Option<std::path::PathBuf>,

    /// Identify this client with this TLS certificate (PEM); needs --key
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,

    /// The private key (PEM) of --cert
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,

    /// Authenticate as this etcd user: `name:password`, or `name` with --password
    #[arg(long, global = true, value_name = "USER[:PASSWORD]")]
    pub user: Option<String>,

    /// The password of --user, when it is not given as `name:password`
    #[arg(long, global = true, env = "ETCDCTL_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// Session TTL: how long a crashed holder keeps its locks (whole seconds, e.g. 60 or 60s)
    #[arg(long, global = true, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub ttl: Duration,
}

/// Options of the commands that run a command while holding something.
#[derive(Debug, Args)]
pub struct Holding {
    /// After the lock is lost, how long the command has between SIGTERM and SIGKILL
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub kill_grace: Duration,

    /// The command to run while holding; without one, print the key and hold until SIGINT or
    /// SIGTERM
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Hold a mutex; run a command while holding it, or hold until interrupted
    #[command(after_help = LOCK_HELP)]
    Lock {
        /// The lock's name (a key prefix)
        name: String,
        #[command(flatten)]
        hold: Holding,
    },

    /// Campaign for leadership and lead until interrupted (or while a command runs), or follow
    /// the leader with --listen
    #[command(after_help = ELECT_HELP)]
    Elect {
        /// The election's name (a key prefix)
        name: String,
        /// This candidate's value (an address, a host name), shown to observers
        #[arg(required_unless_present = "listen")]
        proposal: Option<String>,
        /// Print every change of leader (including "no leader") instead of campaigning
        #[arg(short, long, conflicts_with_all = ["proposal", "command", "kill_grace"])]
        listen: bool,
        /// With --listen: print one JSON object per line
        #[arg(long, requires = "listen")]
        json: bool,
        #[command(flatten)]
        hold: Holding,
    },

    /// Hold a reader-writer lock for reading (shared) or writing (exclusive)
    #[command(
        after_help = RWLOCK_HELP,
        group(ArgGroup::new("mode").required(true).args(["read", "write"]))
    )]
    Rwlock {
        /// The lock's name (a key prefix)
        name: String,
        /// Share the lock with other readers
        #[arg(long)]
        read: bool,
        /// Hold the lock alone
        #[arg(long)]
        write: bool,
        #[command(flatten)]
        hold: Holding,
    },

    /// Hold one of N permits of a counting semaphore
    #[command(after_help = SEMAPHORE_HELP)]
    Semaphore {
        /// The semaphore's name (a key prefix)
        name: String,
        /// How many holders at once; every user of the name must agree
        #[arg(long, value_name = "N")]
        permits: usize,
        #[command(flatten)]
        hold: Holding,
    },

    /// Hold a barrier closed, open it, or wait until it opens; or meet at a double barrier
    #[command(subcommand)]
    Barrier(BarrierCommand),

    /// Push, pop and count jobs of an at-least-once work queue, or work them off with a command
    #[command(subcommand)]
    Queue(QueueCommand),

    /// Run the benchmark workloads against --endpoints (or a server started for the run)
    #[command(after_help = BENCH_HELP, hide = cfg!(not(feature = "bench")))]
    Bench {
        /// Start a single-member etcd for the run instead of using --endpoints
        #[arg(long)]
        start_etcd: bool,
        /// Workloads, their parameters and the benchmark's options (see below)
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },

    /// Print the instances of a service registered under a prefix, then every change
    #[command(after_help = DISCOVER_HELP)]
    Discover {
        /// The service name
        service: String,
        /// The registry's key prefix: instances live at PREFIX/SERVICE/ID
        #[arg(long, default_value = "services")]
        prefix: String,
        /// Print the current instances and exit instead of following changes
        #[arg(long)]
        once: bool,
        /// Print one JSON object per line
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BarrierCommand {
    /// Close the barrier until interrupted, for as long as a command runs, or (--persistent)
    /// until someone releases it
    #[command(after_help = BARRIER_HELP)]
    Hold {
        /// The barrier's name (its key)
        name: String,
        /// Leave the barrier closed after exiting, until `barrier release NAME`
        #[arg(long, conflicts_with_all = ["command", "kill_grace"])]
        persistent: bool,
        #[command(flatten)]
        hold: Holding,
    },
    /// Open the barrier, whoever closed it
    #[command(after_help = BARRIER_HELP)]
    Release {
        /// The barrier's name (its key)
        name: String,
    },
    /// Wait until the barrier is open
    #[command(after_help = BARRIER_HELP)]
    Wait {
        /// The barrier's name (its key)
        name: String,
    },
    /// Double barrier: wait until COUNT participants are here, run the command, then wait
    /// until all of them are done
    #[command(after_help = ENTER_HELP)]
    Enter {
        /// The double barrier's name (a key prefix; not the same keys as hold/wait)
        name: String,
        /// How many participants make a round; everyone must agree
        #[arg(long, value_name = "N")]
        count: usize,
        #[command(flatten)]
        hold: Holding,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Add a job (the argument, each line of stdin with --lines, or all of stdin); print its id
    #[command(after_help = QUEUE_HELP)]
    Push {
        /// The queue's name (a key prefix)
        name: String,
        /// The job; read from stdin if absent
        #[arg(conflicts_with = "lines")]
        job: Option<String>,
        /// Push every non-empty line of stdin as a job of its own
        #[arg(long)]
        lines: bool,
        /// Higher priorities are delivered first
        #[arg(long, default_value_t = 0)]
        priority: u16,
        /// Make the job visible only after this long
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        delay: Option<Duration>,
    },
    /// Take the next job (waiting for one), print it on stdout and acknowledge it
    #[command(after_help = QUEUE_HELP)]
    Pop {
        /// The queue's name (a key prefix)
        name: String,
    },
    /// Print how many jobs are ready (with --json: ready, in flight, delayed and dead)
    #[command(after_help = QUEUE_HELP)]
    Len {
        /// The queue's name (a key prefix)
        name: String,
        /// Print all the counts as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Run a command for each job, the job on its stdin: exit 0 acknowledges the job, anything
    /// else gives it back to be delivered again
    #[command(after_help = WORK_HELP)]
    Work {
        /// The queue's name (a key prefix)
        name: String,
        /// How many commands may run at once
        #[arg(long, default_value_t = 1, value_name = "N")]
        concurrency: usize,
        /// Deliveries of a job before it moves to the dead letters (NAME/dead/)
        #[arg(long, default_value_t = etcd_coord::DEFAULT_MAX_ATTEMPTS, value_name = "N")]
        max_attempts: u32,
        /// How long a failed job waits before it is delivered again
        #[arg(long, default_value = "0s", value_parser = parse_duration, value_name = "DURATION")]
        retry_delay: Duration,
        /// After the session is lost, how long a command has between SIGTERM and SIGKILL
        #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
        kill_grace: Duration,
        /// The command to run for each job
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

const QUEUE_HELP: &str = "\
The queue is this crate's WorkQueue: a job stays in etcd until a consumer acknowledges it, so a
consumer that crashes loses nothing (its claim ends with its session and the job is delivered
again). `pop` acknowledges the job once it is written to stdout; `queue work` acknowledges a job
only when its command succeeds. Jobs are delivered by priority, then in the order they were
pushed.

Examples:
  etcd-coord queue push thumbnails img-123.png
  ls *.png | etcd-coord queue push thumbnails --lines
  etcd-coord queue push reports --priority 10 --delay 5m < request.json
  job=$(etcd-coord queue pop thumbnails)
  etcd-coord queue len thumbnails --json";

const WORK_HELP: &str = "\
For each job, the command runs in its own process group with the job on stdin and ETCD_JOB_ID,
ETCD_JOB_ATTEMPT (1 on the first delivery) and ETCD_JOB_FENCING_TOKEN in its environment. Exit
status 0 acknowledges the job; anything else gives it back (after --retry-delay), and after
--max-attempts deliveries the job moves to the dead letters (NAME/dead/ID). A job whose worker
dies is delivered again once the worker's session expires (--ttl).

SIGINT or SIGTERM stops claiming, passes the signal on to the running commands, and exits 0 once
they are done (their jobs are acknowledged or given back by their status). If the session is
lost, the running commands are stopped (SIGTERM, then SIGKILL after --kill-grace) and etcd-coord
exits with 75; their jobs are delivered again.

Examples:
  etcd-coord --ttl 10s queue work thumbnails --concurrency 4 -- sh -c 'convert - -resize 50% out/$ETCD_JOB_ID.png'
  etcd-coord queue work emails --max-attempts 3 --retry-delay 30s -- ./send-email";

/// Completed at run time with the library's list of workloads; see [`with_bench_help`].
#[cfg(feature = "bench")]
const BENCH_HELP: &str = "\
Runs the workloads of etcd_coord::bench (as `cargo bench --features bench` does) and exits 1 if
one fails or the cost model does not hold. The cost is counted from the server's metrics, so run
it on a server nobody else is using, or with --start-etcd. --cacert, --cert, --key and --user are
not supported here.

Examples:
  etcd-coord bench --start-etcd
  etcd-coord bench mutex-contended --contenders 16 --ops 1000 --impl coord
  etcd-coord bench --start-etcd --markdown BENCHMARKS.md";
#[cfg(not(feature = "bench"))]
const BENCH_HELP: &str = "\
This etcd-coord was built without the `bench` feature (build it with --features cli,bench).

Examples:
  cargo install etcd-coord --features cli,bench";

/// The command line's grammar, with the benchmark's workloads in `bench --help`.
pub fn with_bench_help(command: clap::Command) -> clap::Command {
    #[cfg(feature = "bench")]
    {
        let usage = etcd_coord::bench::USAGE;
        // The library's text starts with how `cargo bench` is invoked; keep the lists.
        let lists = usage
            .find("workloads and parameters")
            .map_or(usage, |at| &usage[at..]);
        command.mut_subcommand("bench", |c| {
            c.after_help(format!("{BENCH_HELP}\n\n{}", lists.trim_end()))
        })
    }
    #[cfg(not(feature = "bench"))]
    command
}

const BARRIER_HELP: &str = "\
A barrier is one key, NAME (the layout of Go's recipes.Barrier): `hold` closes it and fails if it
is already closed; `wait` returns once it is open; `release` opens it, whoever closed it, and
prints `released` or `not held`. A plain hold lasts until SIGINT or SIGTERM (the key is printed),
or for as long as its command runs (with ETCD_BARRIER_KEY and ETCD_BARRIER_REV set), and ends
with the session if etcd-coord dies; a command whose session is lost is stopped as for `lock`
(exit 75). A --persistent hold is not bound to any session: it stays until released.

Examples:
  # workers wait until the input is ready
  etcd-coord barrier wait etl/input-ready && ./work
  # the coordinator keeps them waiting while it prepares the input
  etcd-coord barrier hold etl/input-ready -- ./prepare-input
  # across separate steps of a script
  etcd-coord barrier hold --persistent etl/input-ready
  ./prepare-input; etcd-coord barrier release etl/input-ready";

const ENTER_HELP: &str = "\
A double barrier: each round starts when COUNT participants have entered, and ends when all of
them have left. Without a command, `enter` is a meeting point: it returns once COUNT participants
are there. With a command, it runs the command once the round starts (with ETCD_BARRIER_KEY and
ETCD_BARRIER_ROUND set), then waits until every member is done, and exits with the command's
status. A participant whose session is lost has its command stopped, as for `lock` (exit 75).

Examples:
  # three workers start their stage together and finish it together
  etcd-coord barrier enter etl/stage-2 --count 3 -- ./stage-2";

const LOCK_HELP: &str = "\
The lock is the same as Go's concurrency.Mutex and `etcdctl lock NAME`: they exclude each other.
Without a command, the key (NAME/<lease hex>_<id>) is printed on stdout and the lock is held until
SIGINT or SIGTERM, then released (exit 0). With a command, the command runs in its own process
group with ETCD_LOCK_KEY, ETCD_LOCK_REV (the revision at which the lock was acquired) and
ETCD_LOCK_FENCING_TOKEN (the key's create revision, larger for every later holder) in its
environment; etcd-coord exits with its status. SIGINT and SIGTERM are passed on to the command.
If the lock is lost while held (the session expires, the key is deleted), the command gets
SIGTERM, then SIGKILL after --kill-grace, and etcd-coord exits with 75.

Examples:
  etcd-coord lock backups/nightly -- /usr/local/bin/backup --full
  etcd-coord --ttl 10s lock deploy -- sh -c 'echo \"token $ETCD_LOCK_FENCING_TOKEN\"; ./deploy'
  # hold across several steps of a shell script
  etcd-coord lock maintenance > /tmp/lock.key & holder=$!
  until [ -s /tmp/lock.key ]; do sleep 0.1; done    # acquired
  ./step1 && ./step2; kill $holder                   # released";

const ELECT_HELP: &str = "\
The election is the same as Go's concurrency.Election and `etcdctl elect`: they agree on the
leader. Campaigning prints the leader key once elected and leads until SIGINT or SIGTERM, then
resigns (exit 0); with a command, the command runs only while leading, with ETCD_LOCK_KEY,
ETCD_LOCK_REV and ETCD_LOCK_FENCING_TOKEN in its environment (as for `lock`), and is stopped
(SIGTERM, then SIGKILL after --kill-grace; exit 75) if leadership is lost.

--listen prints one line per change: `elected KEY VALUE`, `proclaimed KEY VALUE` (the leader
changed its value) or `no leader`; the first line describes the present. Non-printable characters
of values are escaped. --json prints objects with event, key, value, fencing_token and revision.

Examples:
  etcd-coord elect services/scheduler \"$(hostname)\" -- ./scheduler
  etcd-coord elect --listen services/scheduler
  etcd-coord elect --listen --json services/scheduler | jq -r .value";

const RWLOCK_HELP: &str = "\
Readers share the lock; a writer holds it alone. Waiters are served in arrival order, so a
waiting writer is not starved by later readers. Holding, commands, the environment and the loss
rule are as for `lock`.

Examples:
  etcd-coord rwlock config/db --read -- ./read-config
  etcd-coord rwlock config/db --write -- ./migrate";

const SEMAPHORE_HELP: &str = "\
At most N holders at once, served in arrival order. Every user of the name must pass the same
--permits (the first user records it; a different number is an error). Holding, commands, the
environment and the loss rule are as for `lock`.

Examples:
  # at most 3 concurrent transcodes across the fleet
  etcd-coord semaphore jobs/transcode --permits 3 -- ./transcode input.mkv";

const DISCOVER_HELP: &str = "\
Instances are the keys PREFIX/SERVICE/ID with Go's naming/endpoints JSON value
({\"Addr\": ..., \"Metadata\": ...}), as written by this crate's Registry and by Go's
endpoints.Manager. Lines are `added ID ADDRESS [METADATA]`, `updated ID ADDRESS [METADATA]` and
`removed ID`; the current instances come first as `added` lines. --json prints objects with
event, id, address, metadata and revision.

Examples:
  etcd-coord discover billing
  etcd-coord discover --prefix prod/services billing --once --json";

/// Parses a duration the way etcdctl does (`1m30s`, `500ms`, `1.5h`; units ns, us, µs, ms,
/// s, m, h), and also a bare number of seconds (`60`), as `--ttl` is spelt in etcdctl.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let bad = || format!("{text:?} is not a duration (examples: 60, 60s, 1m30s, 500ms, 1.5h)");
    if let Ok(seconds) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).map_err(|_| bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += Duration::try_from_secs_f64(number * scale).map_err(|_| bad())?;
        rest = tail;
    }
    Ok(total)
}

impl Holding {
    /// The command to run, if any.
    pub fn command(&self) -> Option<&[String]> {
        (!self.command.is_empty()).then_some(self.command.as_slice())
    }
}

/// Checks what clap cannot: values that are valid separately but not for etcd.
pub fn check(cli: &Cli) -> Result<(), exit::Failure> {
    match cli.command {
        Command::Semaphore { permits: 0, .. } => {
            Err(exit::Failure::usage("--permits must be at least 1"))
        }
        Command::Barrier(BarrierCommand::Enter { count: 0, .. }) => {
            Err(exit::Failure::usage("--count must be at least 1"))
        }
        Command::Queue(QueueCommand::Work { concurrency: 0, .. }) => {
            Err(exit::Failure::usage("--concurrency must be at least 1"))
        }
        Command::Queue(QueueCommand::Work {
            max_attempts: 0, ..
        }) => Err(exit::Failure::usage("--max-attempts must be at least 1")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_etcdctl() {
        let ok = [
            ("60", Duration::from_secs(60)),
            ("2s", Duration::from_secs(2)),
            ("500ms", Duration::from_millis(500)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5h", Duration::from_secs(5400)),
            ("0.25", Duration::from_millis(250)),
            ("10us", Duration::from_micros(10)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "s", "10x", "-1", "1m-2s", "ms10"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
