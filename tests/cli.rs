//! The `etcd-coord` command line, run as a built binary against real etcd: it excludes and
//! agrees with `etcdctl lock`/`etcdctl elect`, passes the lock to its command, stops the command
//! when the lock is lost, cleans up when interrupted, and fails fast with one clear line.
#![cfg(all(feature = "testing", feature = "cli"))]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{eventually, keys, session, single, unique, within};
use etcd_coord::etcd_client::Client;
use etcd_coord::testing::EtcdCluster;
use etcd_coord::{QueueStats, Registry, WorkQueue};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const BOUND: Duration = Duration::from_secs(15);
const BIN: &str = env!("CARGO_BIN_EXE_etcd-coord");

/// A process under test: its stdout read line by line, its stdin held open until closed.
struct Proc {
    what: String,
    child: Child,
    out: Lines<BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
}

fn spawn(what: &str, mut command: Command) -> Proc {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out = BufReader::new(child.stdout.take().unwrap()).lines();
    let stdin = child.stdin.take();
    Proc {
        what: what.to_owned(),
        child,
        out,
        stdin,
    }
}

/// `etcd-coord --endpoints ... ARGS`.
fn coord(etcd: &EtcdCluster, args: &[&str]) -> Proc {
    let mut command = Command::new(BIN);
    command
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .args(args);
    spawn(&format!("etcd-coord {}", args.join(" ")), command)
}

/// `etcdctl --endpoints ... ARGS` (Debian's etcdctl, API v3).
fn etcdctl(etcd: &EtcdCluster, args: &[&str]) -> Proc {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .args(args);
    spawn(&format!("etcdctl {}", args.join(" ")), command)
}

impl Proc {
    async fn line(&mut self) -> String {
        let what = format!("{} prints a line", self.what);
        match within(BOUND, &what, self.out.next_line()).await {
            Ok(Some(line)) => line,
            other => panic!("{} printed no line: {other:?}", self.what),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id().expect("still running") as i32
    }

    fn signal(&self, signo: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), signo) }, 0);
    }

    /// Closes the process's stdin: the commands in these tests hold until they read EOF.
    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the exit; returns the status code (None if killed by a signal) and stderr.
    async fn exit(mut self) -> (Option<i32>, String) {
        let what = format!("{} exits", self.what);
        let status = within(BOUND, &what, self.child.wait()).await.unwrap();
        let mut err = String::new();
        let mut stderr = self.child.stderr.take().unwrap();
        within(BOUND, &what, stderr.read_to_string(&mut err))
            .await
            .unwrap();
        (status.code(), err)
    }
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(cmd).is_file()))
}

/// A shell command that records when it starts (after `$0.env` gets the lock variables) and,
/// after holding for `hold`, when it ends: the lines of file `$0`.
fn timed(hold: &str) -> String {
    format!("env | grep ^ETCD_ > \"$0.env\"; date +%s%N >> \"$0\"; {hold}; date +%s%N >> \"$0\"")
}

fn interval(log: &Path) -> (u128, u128) {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log:?}: {e}"));
    let v: Vec<u128> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(v.len(), 2, "{log:?} holds {text:?}");
    (v[0], v[1])
}

fn lock_env(log: &Path) -> std::collections::HashMap<String, String> {
    lock_env_named(log, "ETCD_LOCK_")
}

/// The variables starting with `prefix` that the command of [`timed`] saw.
fn lock_env_named(log: &Path, prefix: &str) -> std::collections::HashMap<String, String> {
    let text = std::fs::read_to_string(log.with_extension("env")).unwrap();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The lease of a key `NAME/<lease hex>` or `NAME/<lease hex>_<random>`.
fn lease_of(key: &str, name: &str) -> i64 {
    let rest = key
        .strip_prefix(&format!("{name}/"))
        .unwrap_or_else(|| panic!("{key:?} is not under {name:?}"));
    let hex = rest.split('_').next().unwrap();
    i64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("no lease in {key:?}"))
}

/// Processes of process group `pgid` that are still running (zombies do not count).
fn running_in_group(pgid: i32) -> Vec<i32> {
    let mut running = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            running.push(pid);
        }
    }
    running
}

fn one_error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {stderr:?}");
    assert!(
        lines[0].starts_with("etcd-coord: error: "),
        "not an error line: {stderr:?}"
    );
    lines[0]
}

// ---- lock ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_etcdctl_lock_never_run_their_commands_at_once() {
    if !which("etcdctl") {
        eprintln!("skipped: etcdctl is not installed (Debian package etcd-client)");
        return;
    }
    let (etcd, client) = single().await;
    let name = unique("cli-lock");
    let dir = tempfile::tempdir().unwrap();
    let script = timed("sleep 0.2");
    let mut procs = Vec::new();
    for i in 0..3 {
        for tool in ["coord", "ctl"] {
            let log = dir.path().join(format!("{tool}{i}"));
            let args = [
                "lock",
                &name,
                "--",
                "sh",
                "-c",
                &script,
                log.to_str().unwrap(),
            ];
            let p = match tool {
                "coord" => coord(&etcd, &args),
                _ => etcdctl(&etcd, &args),
            };
            procs.push((log, tool, p));
        }
    }
    let mut held = Vec::new();
    for (log, tool, p) in procs {
        let (code, err) = p.exit().await;
        assert_eq!(code, Some(0), "{tool} failed: {err}");
        held.push((interval(&log), tool, lock_env(&log)));
    }
    held.sort_by_key(|(iv, ..)| *iv);
    for pair in held.windows(2) {
        let ((_, end), first, _) = &pair[0];
        let ((start, _), second, _) = &pair[1];
        assert!(
            end <= start,
            "{first} and {second} ran their commands at the same time"
        );
    }
    // Both tools pass the lock to the command; ours adds the fencing token, and tokens grow
    // from one holder to the next.
    let mut last_token = 0;
    for (_, tool, env) in &held {
        let key = &env["ETCD_LOCK_KEY"];
        lease_of(key, &name);
        let rev: i64 = env["ETCD_LOCK_REV"].parse().unwrap();
        assert!(rev > 0);
        if *tool == "coord" {
            let token: i64 = env["ETCD_LOCK_FENCING_TOKEN"].parse().unwrap();
            assert!(0 < token && token <= rev, "token {token}, rev {rev}");
            assert!(token > last_token, "fencing tokens do not grow");
            last_token = token;
        }
    }
    assert!(keys(&client, &format!("{name}/")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_without_a_command_prints_its_key_and_releases_it_when_interrupted() {
    let (etcd, client) = single().await;
    for signo in [libc::SIGINT, libc::SIGTERM] {
        let name = unique("cli-hold");
        let mut p = coord(&etcd, &["lock", &name]);
        let key = p.line().await;
        let lease = lease_of(&key, &name);
        assert_eq!(keys(&client, &format!("{name}/")).await, vec![key.clone()]);
        p.signal(signo);
        let (code, err) = p.exit().await;
        assert_eq!(code, Some(0), "{err}");
        assert!(keys(&client, &format!("{name}/")).await.is_empty());
        // The session is closed too: its lease is gone, not left to expire.
        let ttl = client
            .clone()
            .lease_time_to_live(lease, None)
            .await
            .unwrap();
        assert_eq!(ttl.ttl(), -1, "the lease outlived the process");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_interrupted_by_a_signal_leaves_no_key_behind() {
    let (etcd, client) = single().await;
    let name = unique("cli-wait");
    let prefix = format!("{name}/");
    let mut holder = coord(&etcd, &["lock", &name]);
    let key = holder.line().await;
    let waiter = coord(&etcd, &["lock", &name, "--", "true"]);
    eventually(BOUND, "the waiter queues", || {
        let (c, p) = (client.clone(), prefix.clone());
        async move { keys(&c, &p).await.len() == 2 }
    })
    .await;
    waiter.signal(libc::SIGTERM);
    let (code, err) = waiter.exit().await;
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    assert_eq!(keys(&client, &prefix).await, [key]);
    holder.signal(libc::SIGTERM);
    assert_eq!(holder.exit().await.0, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_stops_the_command_when_its_session_is_revoked() {
    let (etcd, client) = single().await;
    let name = unique("cli-lost");
    // The command ignores SIGTERM, so stopping it takes the SIGKILL after the grace period;
    // `sleep` is a separate process of its group.
    let script = "echo \"$ETCD_LOCK_KEY $$\"; trap '' TERM; sleep 30; echo finished";
    let mut p = coord(
        &etcd,
        &[
            "--ttl",
            "10",
            "lock",
            &name,
            "--kill-grace",
            "1s",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let line = p.line().await;
    let (key, pid) = line.split_once(' ').unwrap();
    let pgid: i32 = pid.parse().unwrap();
    eventually(BOUND, "sleep runs", || async {
        running_in_group(pgid).len() == 2
    })
    .await;

    let revoked_at = tokio::time::Instant::now();
    client
        .clone()
        .lease_revoke(lease_of(key, &name))
        .await
        .unwrap();
    let (code, err) = p.exit().await;
    let took = revoked_at.elapsed();
    assert_eq!(code, Some(75), "{err}");
    let line = one_error_line(&err);
    assert!(line.contains("lost lock") && line.contains(key), "{line}");
    assert!(running_in_group(pgid).is_empty(), "the command survived");
    // SIGTERM was ignored, so the kill waited for the grace period, and not much longer.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "stopped after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_status_is_passed_through_and_bad_input_is_one_line() {
    let (etcd, client) = single().await;
    let name = unique("cli-status");
    let cases: [(&[&str], Option<i32>); 3] = [
        (&["sh", "-c", "exit 7"], Some(7)),
        (&["sh", "-c", "kill -TERM $$"], Some(128 + libc::SIGTERM)),
        (&["/nonexistent/command"], Some(127)),
    ];
    for (command, want) in cases {
        let mut args = vec!["lock", name.as_str(), "--"];
        args.extend_from_slice(command);
        let (code, err) = coord(&etcd, &args).exit().await;
        assert_eq!(code, want, "{command:?}: {err}");
        if want == Some(127) {
            assert!(
                one_error_line(&err).contains("/nonexistent/command"),
                "{err}"
            );
        }
    }
    assert!(keys(&client, &format!("{name}/")).await.is_empty());

    // SIGTERM to etcd-coord reaches the whole command; the lock is released after it exits.
    let script = "echo $$; sleep 30";
    let mut p = coord(&etcd, &["lock", &name, "--", "sh", "-c", script]);
    let pgid: i32 = p.line().await.parse().unwrap();
    eventually(BOUND, "sleep runs", || async {
        running_in_group(pgid).len() == 2
    })
    .await;
    p.signal(libc::SIGTERM);
    let (code, err) = p.exit().await;
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    assert!(running_in_group(pgid).is_empty(), "the command survived");
    assert!(keys(&client, &format!("{name}/")).await.is_empty());

    for (args, arg) in [
        (&["lock", ""][..], "name"),
        (&["lock", "trailing/"][..], "name"),
        (&["--ttl", "0", "lock", "x"][..], "ttl"),
    ] {
        let (code, err) = coord(&etcd, args).exit().await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(one_error_line(&err).contains(arg), "{err}");
    }
}

// ---- elect --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elect_listen_prints_leaders_set_by_etcdctl_and_by_etcd_coord() {
    if !which("etcdctl") {
        eprintln!("skipped: etcdctl is not installed (Debian package etcd-client)");
        return;
    }
    let (etcd, client) = single().await;
    let name = unique("cli-elect");
    let mut listen = coord(&etcd, &["elect", "--listen", &name]);
    assert_eq!(listen.line().await, "no leader");

    let mut ctl = etcdctl(&etcd, &["elect", &name, "ctl-1"]);
    let ctl_key = ctl.line().await;
    assert_eq!(
        listen.line().await,
        format!("elected {ctl_key} ctl-1"),
        "etcdctl's leader"
    );

    let mut ours = coord(&etcd, &["elect", &name, "coord 1"]);
    eventually(BOUND, "our candidate queues", || {
        let (c, p) = (client.clone(), format!("{name}/"));
        async move { keys(&c, &p).await.len() == 2 }
    })
    .await;
    ctl.signal(libc::SIGTERM); // etcdctl resigns
    let our_key = ours.line().await;
    assert_eq!(listen.line().await, format!("elected {our_key} coord 1"));

    ours.signal(libc::SIGTERM); // we resign
    assert_eq!(ours.exit().await.0, Some(0));
    assert_eq!(listen.line().await, "no leader");
    listen.signal(libc::SIGINT);
    assert_eq!(listen.exit().await.0, Some(0));
    let _ = ctl.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elect_runs_its_command_only_while_leading() {
    let (etcd, _client) = single().await;
    let name = unique("cli-lead");
    let dir = tempfile::tempdir().unwrap();
    // Each command holds until its stdin (the test's pipe, inherited) is closed.
    let script = timed("cat > /dev/null");
    let (log_a, log_b) = (dir.path().join("a"), dir.path().join("b"));
    let mut a = coord(
        &etcd,
        &[
            "elect",
            &name,
            "a",
            "--",
            "sh",
            "-c",
            &script,
            log_a.to_str().unwrap(),
        ],
    );
    eventually(BOUND, "a's command runs", || async { log_a.exists() }).await;
    let mut b = coord(
        &etcd,
        &[
            "elect",
            &name,
            "b",
            "--",
            "sh",
            "-c",
            &script,
            log_b.to_str().unwrap(),
        ],
    );
    if which("etcdctl") {
        // etcdctl's observer agrees that `a` leads.
        let mut ctl = etcdctl(&etcd, &["elect", "--listen", &name]);
        let key = ctl.line().await;
        assert_eq!(key, lock_env(&log_a)["ETCD_LOCK_KEY"]);
        assert_eq!(ctl.line().await, "a");
    }
    a.close_stdin();
    let (code, err) = a.exit().await;
    assert_eq!(code, Some(0), "{err}");
    eventually(BOUND, "b's command runs", || async { log_b.exists() }).await;
    b.close_stdin();
    assert_eq!(b.exit().await.0, Some(0));

    let (ia, ib) = (interval(&log_a), interval(&log_b));
    assert!(ia.1 <= ib.0, "b ran while a led");
    let token = |log: &Path| {
        lock_env(log)["ETCD_LOCK_FENCING_TOKEN"]
            .parse::<i64>()
            .unwrap()
    };
    assert!(token(&log_b) > token(&log_a));
}

// ---- rwlock and semaphore -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_readers_share_and_a_writer_waits_for_them() {
    let (etcd, client) = single().await;
    let name = unique("cli-rw");
    let dir = tempfile::tempdir().unwrap();
    let script = timed("cat > /dev/null");
    let log = |n: &str| dir.path().join(n);
    let run = |mode: &str, n: &str| {
        let path = log(n);
        coord(
            &etcd,
            &[
                "rwlock",
                &name,
                mode,
                "--",
                "sh",
                "-c",
                &script,
                path.to_str().unwrap(),
            ],
        )
    };
    let mut r1 = run("--read", "r1");
    let mut r2 = run("--read", "r2");
    // Both readers in at once: they share.
    eventually(BOUND, "both readers run", || async {
        log("r1").exists() && log("r2").exists()
    })
    .await;
    let mut w = run("--write", "w");
    eventually(BOUND, "the writer queues", || {
        let c = client.clone();
        let prefix = format!("{name}/");
        async move { keys(&c, &prefix).await.len() == 3 }
    })
    .await;
    r1.close_stdin();
    r2.close_stdin();
    eventually(BOUND, "the writer runs", || async { log("w").exists() }).await;
    w.close_stdin();
    for p in [r1, r2, w] {
        assert_eq!(p.exit().await.0, Some(0));
    }
    let (r1, r2, w) = (
        interval(&log("r1")),
        interval(&log("r2")),
        interval(&log("w")),
    );
    assert!(r1.0 < r2.1 && r2.0 < r1.1, "the readers did not overlap");
    assert!(w.0 >= r1.1 && w.0 >= r2.1, "the writer ran with a reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_runs_at_most_its_permits_at_once() {
    let (etcd, client) = single().await;
    let name = unique("cli-sem");
    let dir = tempfile::tempdir().unwrap();
    let script = timed("cat > /dev/null");
    let log = |n: &str| dir.path().join(n);
    let run = |n: &str| {
        let path = log(n);
        coord(
            &etcd,
            &[
                "semaphore",
                &name,
                "--permits",
                "2",
                "--",
                "sh",
                "-c",
                &script,
                path.to_str().unwrap(),
            ],
        )
    };
    let mut first = run("1");
    let mut second = run("2");
    eventually(BOUND, "two holders run", || async {
        log("1").exists() && log("2").exists()
    })
    .await;
    let mut third = run("3");
    eventually(BOUND, "the third queues", || {
        let c = client.clone();
        let prefix = format!("{name}/");
        async move { keys(&c, &prefix).await.len() == 3 }
    })
    .await;
    // Someone who disagrees on the permits is told so in one line.
    let (code, err) = coord(&etcd, &["semaphore", &name, "--permits", "3", "--", "true"])
        .exit()
        .await;
    assert_eq!(code, Some(1), "{err}");
    one_error_line(&err);

    first.close_stdin();
    eventually(BOUND, "the third runs", || async { log("3").exists() }).await;
    second.close_stdin();
    third.close_stdin();
    for p in [first, second, third] {
        assert_eq!(p.exit().await.0, Some(0));
    }
    assert!(
        interval(&log("3")).0 >= interval(&log("1")).1,
        "three ran at once"
    );
}

// ---- barriers -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_wait_returns_only_when_the_hold_ends() {
    let (etcd, client) = single().await;
    let name = unique("cli-gate");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("holder");
    let leases = || async {
        let mut c = client.clone();
        c.leases().await.unwrap().leases().len()
    };
    let before = leases().await;
    let script = timed("cat > /dev/null");
    let mut holder = coord(
        &etcd,
        &[
            "barrier",
            "hold",
            &name,
            "--",
            "sh",
            "-c",
            &script,
            log.to_str().unwrap(),
        ],
    );
    eventually(BOUND, "the hold's command runs", || async { log.exists() }).await;
    let env = lock_env_named(&log, "ETCD_BARRIER_");
    assert_eq!(env["ETCD_BARRIER_KEY"], name);

    // A second hold fails at once, in one line.
    let (code, err) = coord(&etcd, &["barrier", "hold", &name]).exit().await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        one_error_line(&err).contains("held by someone else"),
        "{err}"
    );

    let waiter = coord(&etcd, &["barrier", "wait", &name]);
    // The waiter's session exists: it is about to wait, or waiting.
    eventually(BOUND, "the waiter starts", || async {
        leases().await > before + 1
    })
    .await;
    let waited = tokio::spawn(async move {
        let exited = waiter.exit().await;
        (now_ns(), exited)
    });
    holder.close_stdin();
    assert_eq!(holder.exit().await.0, Some(0));
    let (waiter_done, (code, err)) = within(BOUND, "the waiter returns", waited).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(waiter_done >= interval(&log).1, "wait returned while held");
    assert!(keys(&client, &name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_barrier_hold_outlives_the_process_until_released() {
    let (etcd, client) = single().await;
    let name = unique("cli-persistent");
    let mut p = coord(&etcd, &["barrier", "hold", "--persistent", &name]);
    assert_eq!(p.line().await, name);
    assert_eq!(p.exit().await.0, Some(0));
    let resp = client.clone().get(name.as_str(), None).await.unwrap();
    assert_eq!(resp.kvs().len(), 1, "the hold went with the process");
    assert_eq!(resp.kvs()[0].lease(), 0, "the hold is bound to a lease");

    for want in ["released", "not held"] {
        let mut p = coord(&etcd, &["barrier", "release", &name]);
        assert_eq!(p.line().await, want);
        assert_eq!(p.exit().await.0, Some(0));
    }
    assert!(keys(&client, &name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_enter_starts_commands_together_and_waits_for_all_to_finish() {
    let (etcd, client) = single().await;
    let name = unique("cli-meet");
    let dir = tempfile::tempdir().unwrap();
    let script = timed("cat > /dev/null");
    let log = |i: usize| dir.path().join(i.to_string());
    let enter = |i: usize| {
        let path = log(i);
        coord(
            &etcd,
            &[
                "barrier",
                "enter",
                &name,
                "--count",
                "3",
                "--",
                "sh",
                "-c",
                &script,
                path.to_str().unwrap(),
            ],
        )
    };
    let first = enter(0);
    let mut others = vec![enter(1)];
    eventually(BOUND, "two participants wait", || {
        let (c, p) = (client.clone(), format!("{name}/0/"));
        async move { keys(&c, &p).await.len() == 2 }
    })
    .await;
    let third_spawned = now_ns();
    others.push(enter(2));
    eventually(BOUND, "all three commands run", || async {
        (0..3).all(|i| log(i).exists())
    })
    .await;
    for i in 0..3 {
        let env = lock_env_named(&log(i), "ETCD_BARRIER_");
        assert_eq!(env["ETCD_BARRIER_ROUND"], "0");
    }
    let mut first = first;
    first.close_stdin();
    let first_done = tokio::spawn(async move {
        let exited = first.exit().await;
        (now_ns(), exited)
    });
    eventually(BOUND, "the first command ends", || async {
        std::fs::read_to_string(log(0)).is_ok_and(|t| t.lines().count() == 2)
    })
    .await;
    let others_released = now_ns();
    for p in &mut others {
        p.close_stdin();
    }
    for p in others {
        assert_eq!(p.exit().await.0, Some(0));
    }
    let (first_exit, (code, err)) = within(BOUND, "the first leaves", first_done).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    for i in 0..3 {
        assert!(
            interval(&log(i)).0 >= third_spawned,
            "{i} started before all were there"
        );
    }
    assert!(
        first_exit >= others_released,
        "the first left before the others were done"
    );
}

// ---- queue --------------------------------------------------------------------------------

async fn queue_stats(client: &Client, name: &str) -> QueueStats {
    let s = session(client, 5).await;
    let stats = WorkQueue::new(&s, name).unwrap().stats().await.unwrap();
    s.close().await.unwrap();
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_push_pop_and_len_share_one_work_queue() {
    let (etcd, client) = single().await;
    let name = unique("cli-queue");
    let mut push = coord(&etcd, &["queue", "push", &name, "first"]);
    let first_id = push.line().await;
    assert_eq!(push.exit().await.0, Some(0));
    let mut push = coord(&etcd, &["queue", "push", &name, "--lines"]);
    push.stdin
        .as_mut()
        .unwrap()
        .write_all(b"second\n\nthird\n")
        .await
        .unwrap();
    push.close_stdin();
    let ids = [push.line().await, push.line().await];
    assert_eq!(push.exit().await.0, Some(0));
    assert!(ids.iter().all(|id| *id != first_id && !id.is_empty()));

    let mut len = coord(&etcd, &["queue", "len", &name]);
    assert_eq!(len.line().await, "3");
    assert_eq!(len.exit().await.0, Some(0));
    for want in ["first", "second", "third"] {
        let mut pop = coord(&etcd, &["queue", "pop", &name]);
        assert_eq!(pop.line().await, want, "pops in push order, as pushed");
        assert_eq!(pop.exit().await.0, Some(0));
    }
    let mut len = coord(&etcd, &["queue", "len", &name, "--json"]);
    let counts: serde_json::Value = serde_json::from_str(&len.line().await).unwrap();
    assert_eq!(
        counts,
        serde_json::json!({"ready": 0, "in_flight": 0, "delayed": 0, "dead": 0})
    );
    assert_eq!(len.exit().await.0, Some(0));
    // Acknowledged jobs leave nothing behind but the queue's bookkeeping.
    let left = keys(&client, &format!("{name}/")).await;
    assert!(
        left.iter()
            .all(|k| !k.contains("/jobs/") && !k.contains("/data/")),
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_work_redelivers_a_job_after_the_worker_is_killed_mid_job() {
    let (etcd, client) = single().await;
    let name = unique("cli-work");
    let mut push = coord(&etcd, &["queue", "push", &name, "payload-1"]);
    push.line().await;
    assert_eq!(push.exit().await.0, Some(0));

    // The first worker takes the job and is killed while its command runs.
    let script = "echo \"start $ETCD_JOB_ATTEMPT $(cat) $$\"; exec sleep 30";
    let mut first = coord(
        &etcd,
        &[
            "--ttl", "2", "queue", "work", &name, "--", "sh", "-c", script,
        ],
    );
    let line = first.line().await;
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields[..3], ["start", "1", "payload-1"], "{line}");
    let pgid: i32 = fields[3].parse().unwrap();
    first.signal(libc::SIGKILL);
    let _ = first.exit().await;
    // Its command does not outlive it.
    eventually(BOUND, "the orphaned command dies", || async {
        running_in_group(pgid).is_empty()
    })
    .await;

    // Once the dead worker's session expires, another worker gets the job again.
    let script = "echo \"done $ETCD_JOB_ATTEMPT $(cat)\"";
    let mut second = coord(
        &etcd,
        &[
            "--ttl", "2", "queue", "work", &name, "--", "sh", "-c", script,
        ],
    );
    assert_eq!(second.line().await, "done 2 payload-1");
    eventually(BOUND, "the job is acknowledged", || {
        let (c, n) = (client.clone(), name.clone());
        async move { queue_stats(&c, &n).await == QueueStats::default() }
    })
    .await;
    second.signal(libc::SIGTERM);
    let (code, err) = second.exit().await;
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_delivered_again_and_finally_dead_lettered() {
    let (etcd, client) = single().await;
    let name = unique("cli-dead");
    let mut push = coord(&etcd, &["queue", "push", &name, "bad"]);
    let id = push.line().await;
    assert_eq!(push.exit().await.0, Some(0));

    let script = "echo \"fail $ETCD_JOB_ATTEMPT $ETCD_JOB_ID\"; exit 1";
    let mut worker = coord(
        &etcd,
        &[
            "queue",
            "work",
            &name,
            "--max-attempts",
            "3",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    for attempt in 1..=3 {
        assert_eq!(worker.line().await, format!("fail {attempt} {id}"));
    }
    eventually(BOUND, "the job is dead-lettered", || {
        let (c, n) = (client.clone(), name.clone());
        async move { queue_stats(&c, &n).await.dead == 1 }
    })
    .await;
    assert_eq!(
        keys(&client, &format!("{name}/dead/")).await,
        [format!("{name}/dead/{id}")]
    );
    worker.signal(libc::SIGTERM);
    let (code, err) = worker.exit().await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        err.lines().count(),
        3,
        "one warning per failed delivery: {err}"
    );

    // A command that cannot run stops the worker at the first job, which goes back.
    let mut push = coord(&etcd, &["queue", "push", &name, "next"]);
    push.line().await;
    assert_eq!(push.exit().await.0, Some(0));
    let (code, err) = coord(
        &etcd,
        &["queue", "work", &name, "--", "/nonexistent/command"],
    )
    .exit()
    .await;
    assert_eq!(code, Some(127), "{err}");
    one_error_line(&err);
    let stats = queue_stats(&client, &name).await;
    assert_eq!((stats.ready, stats.in_flight), (1, 0));
}

// ---- discover -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_prints_instances_and_their_changes() {
    let (etcd, client) = single().await;
    let prefix = unique("cli-services");
    let s = session(&client, 10).await;
    let registry = Registry::new(&s, prefix.as_str()).unwrap();
    let one = registry
        .register(
            "api",
            "one",
            "10.0.0.1:80",
            serde_json::json!({"zone": "a"}),
        )
        .await
        .unwrap();

    let mut follow = coord(&etcd, &["discover", "api", "--prefix", &prefix]);
    assert_eq!(follow.line().await, r#"added one 10.0.0.1:80 {"zone":"a"}"#);
    let two = registry
        .register("api", "two", "10.0.0.2:80", serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(follow.line().await, "added two 10.0.0.2:80");
    one.deregister().await.unwrap();
    assert_eq!(follow.line().await, "removed one");

    let mut once = coord(
        &etcd,
        &["discover", "api", "--prefix", &prefix, "--once", "--json"],
    );
    let listed: serde_json::Value = serde_json::from_str(&once.line().await).unwrap();
    assert_eq!(listed["event"], "added");
    assert_eq!(listed["id"], "two");
    assert_eq!(listed["address"], "10.0.0.2:80");
    assert_eq!(once.exit().await.0, Some(0));

    follow.signal(libc::SIGTERM);
    assert_eq!(follow.exit().await.0, Some(0));
    two.deregister().await.unwrap();
    s.close().await.unwrap();
}

// ---- bench --------------------------------------------------------------------------------

#[cfg(feature = "bench")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_workloads_and_checks_the_cost_model() {
    let (etcd, _client) = single().await;
    // Costs are counted from the server's metrics: nobody else may use it.
    if common::skip_unless_local(&etcd, "bench (counts the server's requests)") {
        return;
    }
    let endpoints = format!("--endpoints={}", etcd.endpoints().join(","));
    let args = [
        endpoints.as_str(),
        "bench",
        "mutex-uncontended",
        "--ops",
        "20",
        "try-lock-fail",
        "--ops",
        "10",
        "--impl",
        "coord",
    ];
    let out = within(
        Duration::from_secs(60),
        "the benchmark finishes",
        Command::new(BIN).args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("PASS [cost] uncontended lock+unlock = 2 requests"),
        "{text}"
    );
    assert!(text.contains("cost model holds"), "{text}");
    let results = text.lines().filter(|l| l.starts_with('{')).count();
    assert_eq!(results, 2, "one JSON result per workload: {text}");

    let out = Command::new(BIN)
        .args([endpoints.as_str(), "bench", "no-such-workload"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    one_error_line(&String::from_utf8_lossy(&out.stderr));
}

// ---- errors and help ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoints_fail_with_one_line_within_the_dial_timeout() {
    // A port that refuses, and one that accepts connections but never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = silent.local_addr().unwrap().to_string();
    for endpoint in ["127.0.0.1:1", silent.as_str()] {
        let started = tokio::time::Instant::now();
        let mut command = Command::new(BIN);
        command.args(["--endpoints", endpoint, "--dial-timeout", "1s", "lock", "x"]);
        let (code, err) = spawn("etcd-coord", command).exit().await;
        let took = started.elapsed();
        assert_eq!(code, Some(1), "{err}");
        let line = one_error_line(&err);
        assert!(line.contains("cannot connect to etcd at"), "{line}");
        assert!(took < Duration::from_secs(3), "{endpoint}: took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_authenticates_like_etcdctl_and_refusals_are_one_line() {
    let (etcd, mut root) = single().await;
    if common::skip_unless_local(&etcd, "auth test (enables auth on the server)") {
        return;
    }
    root.user_add("root", "root-pw", None).await.unwrap();
    root.user_grant_role("root", "root").await.unwrap();
    root.user_add("app", "app-pw", None).await.unwrap(); // no roles: no rights
    root.auth_enable().await.unwrap();
    let name = unique("cli-auth");
    for user in [
        &["--user", "root:root-pw"][..],
        &["--user", "root", "--password", "root-pw"],
    ] {
        let mut args = user.to_vec();
        args.extend(["lock", name.as_str(), "--", "true"]);
        let (code, err) = coord(&etcd, &args).exit().await;
        assert_eq!(code, Some(0), "{user:?}: {err}");
    }
    for (user, want) in [
        ("root:wrong", "authentication"),
        ("app:app-pw", "permission denied"),
    ] {
        let (code, err) = coord(&etcd, &["--user", user, "lock", &name, "--", "true"])
            .exit()
            .await;
        assert_eq!(code, Some(1), "{user}: {err}");
        let line = one_error_line(&err);
        assert!(line.to_lowercase().contains(want), "{user}: {line}");
    }
    let (code, err) = coord(&etcd, &["--user", "root", "lock", &name])
        .exit()
        .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(one_error_line(&err).contains("--password"), "{err}");
}

#[tokio::test]
async fn every_command_has_help_with_examples_and_usage_errors_exit_2() {
    for args in [
        &["--help"][..],
        &["lock", "--help"],
        &["elect", "--help"],
        &["rwlock", "--help"],
        &["semaphore", "--help"],
        &["discover", "--help"],
        &["barrier", "hold", "--help"],
        &["barrier", "release", "--help"],
        &["barrier", "wait", "--help"],
        &["barrier", "enter", "--help"],
        &["queue", "push", "--help"],
        &["queue", "pop", "--help"],
        &["queue", "len", "--help"],
        &["queue", "work", "--help"],
        &["bench", "--help"],
    ] {
        let out = Command::new(BIN).args(args).output().await.unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("Examples:"),
            "{args:?} has no examples:\n{text}"
        );
    }
    for args in [
        &["lock"][..],
        &["lock", "x", "cmd-without-dashes"],
        &["rwlock", "x", "--", "true"],
        &["elect", "x"],
        &["elect", "--listen", "x", "proposal"],
        &["semaphore", "x", "--permits", "0"],
        &["barrier", "enter", "x", "--count", "0"],
        &["barrier", "hold", "--persistent", "x", "--", "true"],
        &["queue", "work", "x"],
        &["queue", "work", "x", "--concurrency", "0", "--", "true"],
        &["queue", "push", "x", "job", "--lines"],
        &["--dial-timeout", "soon", "lock", "x"],
    ] {
        let out = Command::new(BIN).args(args).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
