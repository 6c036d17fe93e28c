//! The story etcd-coord exists for: workers elect a leader, the leader fills a work queue,
//! every worker processes jobs, each in a critical section under a mutex, committing its result
//! with owner-only transactions. One worker is killed with SIGKILL midway; its lease runs out,
//! its job is delivered again, and the books still balance.
//!
//! ```sh
//! cargo run --example demo --features testing            # starts its own etcd
//! ETCD_ENDPOINTS=http://127.0.0.1:2379 cargo run --example demo --features testing
//! ```
//!
//! The workers are separate OS processes (this same binary, started with `worker N`), so the
//! crash is a real one: no destructor runs, no lock is released, the keepalive just stops.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use etcd_coord::etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use etcd_coord::testing::EtcdCluster;
use etcd_coord::{Connect, Election, LeaderEvent, Mutex, Session, WorkQueue};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WORKERS: usize = 3;
const JOBS: u64 = 12;
/// Short, so that the crashed worker's lease (and with it its claim and any lock) runs out
/// quickly. Production services use longer TTLs; see `etcd_coord::DEFAULT_TTL`.
const TTL: Duration = Duration::from_secs(3);
const ROOT: &str = "demo";

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        let id: usize = args[2].parse()?;
        let endpoints: Vec<String> = args[3].split(',').map(String::from).collect();
        return worker(id, endpoints).await;
    }
    coordinator().await
}

/// Each job moves some money into the ledger; the amounts make double-processing visible.
fn amount(job: u64) -> u64 {
    job * 10
}

async fn coordinator() -> Result<(), Error> {
    let etcd = EtcdCluster::from_env_or_start(1).await?;
    let endpoints = etcd.endpoints();
    println!(
        "etcd-coord demo: {WORKERS} workers, {JOBS} jobs, etcd at {}",
        endpoints.join(",")
    );
    if etcd.is_external() {
        println!("(using ETCD_ENDPOINTS; keys live under {ROOT}-<run id>/)");
    }
    let client = Connect::new(endpoints.clone()).connect().await?;
    let run = format!("{ROOT}-{}", uuid::Uuid::new_v4().simple());

    // Watch the election from the outside, the way a dashboard would.
    let observer = Election::observer(client.clone(), format!("{run}/leader"))?;
    let mut leaders = Vec::new();
    let mut events = observer.observe();

    let mut children = Vec::new();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    for id in 1..=WORKERS {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["worker", &id.to_string(), &endpoints.join(","), &run])
            .env("DEMO_RUN", &run)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut out = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = out.next_line().await {
                let _ = tx.send((id, line));
            }
        });
        children.push(child);
    }

    let mut killed: Option<usize> = None;
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while done < JOBS {
        tokio::select! {
            Some((id, line)) = lines.recv() => {
                println!("  worker-{id} | {line}");
                // Redelivered jobs whose result was already recorded do not count twice.
                if line.starts_with("acked") && !line.contains("already recorded") {
                    done += 1;
                }
                // The crash: once a third of the jobs are done, the leader dies with a job in hand.
                let leads = leaders.last().is_some_and(|(w, _)| *w == format!("worker-{id}"));
                if killed.is_none() && leads && done >= JOBS / 3 && line.starts_with("claimed ") {
                    kill(&mut children[id - 1]).await;
                    killed = Some(id);
                    let job = line.split_whitespace().nth(1).unwrap_or("its job");
                    println!(
                        "💥 killed worker-{id}, the leader, with SIGKILL while it held {job}: no \
                         cleanup runs; within {} s its lease ends, another worker leads and {job} \
                         goes back to the queue",
                        TTL.as_secs()
                    );
                }
            }
            Some(event) = events.next() => {
                if let Ok(LeaderEvent::Elected(info)) = event {
                    let who = String::from_utf8_lossy(&info.value).into_owned();
                    println!("👑 {who} leads (fencing token {})", info.create_revision);
                    leaders.push((who, info.create_revision));
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Err("the demo did not finish in 90 s".into()),
        }
    }
    // Tell the workers to finish, and let them close their sessions.
    client
        .clone()
        .put(format!("{run}/finished"), "", None)
        .await?;
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }
    summary(&client, &run, killed, &leaders).await
}

async fn kill(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

async fn summary(
    client: &Client,
    run: &str,
    killed: Option<usize>,
    leaders: &[(String, i64)],
) -> Result<(), Error> {
    let mut c = client.clone();
    let results = c
        .get(
            format!("{run}/results/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let mut by_worker: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut redelivered = Vec::new();
    for kv in results.kvs() {
        let job = kv
            .key_str()?
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let v = kv.value_str()?;
        let (who, attempt) = v.split_once(" attempt ").unwrap_or((v, "1"));
        if attempt != "1" {
            redelivered.push(format!("{job} (attempt {attempt}, by {who})"));
        }
        by_worker.entry(who.to_string()).or_default().push(job);
    }
    let ledger: u64 = c
        .get(format!("{run}/ledger"), None)
        .await?
        .kvs()
        .first()
        .and_then(|kv| kv.value_str().ok()?.parse().ok())
        .unwrap_or(0);
    let expected: u64 = (1..=JOBS).map(amount).sum();
    let left = c
        .get(
            format!("{run}/jobs/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();

    println!();
    println!("── summary ──────────────────────────────────────────────");
    println!(
        "jobs done:      {} of {JOBS} (each exactly once: one result record per job)",
        results.kvs().len()
    );
    for (who, jobs) in &by_worker {
        println!("  {who}: {}", jobs.join(", "));
    }
    println!(
        "redeliveries:   {}",
        if redelivered.is_empty() {
            "none".into()
        } else {
            redelivered.join("; ")
        }
    );
    if let Some(id) = killed {
        println!("crashed:        worker-{id} (SIGKILL)");
    }
    let history: Vec<String> = leaders
        .iter()
        .map(|(w, t)| format!("{w} (token {t})"))
        .collect();
    println!("leaders:        {}", history.join(" → "));
    println!(
        "ledger:         {ledger} (expected {expected}: {})",
        if ledger == expected {
            "balanced"
        } else {
            "WRONG"
        }
    );
    println!("queue keys left: {left}");
    if results.kvs().len() as u64 != JOBS || ledger != expected || left != 0 {
        return Err("the demo's invariants do not hold".into());
    }
    Ok(())
}

async fn worker(id: usize, endpoints: Vec<String>) -> Result<(), Error> {
    let run = std::env::var("DEMO_RUN")?;
    let me = format!("worker-{id}");
    let client = Connect::new(endpoints).connect().await?;
    let session = Session::builder(client.clone()).ttl(TTL).build().await?;
    let queue = WorkQueue::new(&session, format!("{run}/jobs"))?;
    let ledger_lock = Mutex::new(&session, format!("{run}/ledger-lock"))?;
    say(format!("started (lease {:x})", session.lease_id()));

    // Campaign in the background; whoever leads fills the queue once.
    let election = Election::new(&session, format!("{run}/leader"))?;
    let (filler_queue, filler_run) = (queue.clone(), run.clone());
    tokio::spawn(async move {
        let _ = election
            .lead_forever(me.clone(), |term| {
                let (queue, run) = (filler_queue.clone(), filler_run.clone());
                async move {
                    say(format!("I lead (fencing token {})", term.fencing_token()));
                    // Only a leader that still leads may mark the batch as enqueued.
                    let first = term
                        .txn(
                            Txn::new()
                                .when([Compare::version(
                                    format!("{run}/enqueued"),
                                    CompareOp::Equal,
                                    0,
                                )])
                                .and_then([TxnOp::put(format!("{run}/enqueued"), "", None)]),
                        )
                        .await
                        .map(|r| r.succeeded())
                        .unwrap_or(false);
                    if first {
                        for job in 1..=JOBS {
                            let _ = queue.push(format!("job-{job}")).await;
                        }
                        say(format!("enqueued {JOBS} jobs"));
                    }
                    term.cancelled().await;
                    say("no longer leading".to_string());
                }
            })
            .await;
    });

    let finished = format!("{run}/finished");
    loop {
        let claim = match tokio::time::timeout(Duration::from_millis(500), queue.claim()).await {
            Ok(claim) => claim?,
            Err(_) => {
                let mut c = client.clone();
                if c.get(finished.as_str(), None).await?.count() > 0 {
                    break;
                }
                continue;
            }
        };
        let job = String::from_utf8_lossy(claim.payload()).into_owned();
        say(format!(
            "claimed {job} (attempt {}, claim token {})",
            claim.attempt(),
            claim.fencing_token()
        ));
        // The work itself, outside any lock.
        tokio::time::sleep(Duration::from_millis(150)).await;

        let n: u64 = job.trim_start_matches("job-").parse()?;
        let result_key = format!("{run}/results/{job}");
        let guard = ledger_lock.lock().await?;
        say(format!(
            "enters the ledger's critical section (fencing token {})",
            guard.fencing_token()
        ));
        let mut c = client.clone();
        let balance: u64 = c
            .get(format!("{run}/ledger"), None)
            .await?
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok()?.parse().ok())
            .unwrap_or(0);
        // Commits only while this worker holds both the lock and the claim, and only once per
        // job: a redelivered job whose result is already recorded changes nothing.
        let committed = guard
            .txn(
                Txn::new()
                    .when([
                        claim.is_owner(),
                        Compare::version(result_key.as_str(), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        TxnOp::put(
                            format!("{run}/ledger"),
                            (balance + amount(n)).to_string(),
                            None,
                        ),
                        TxnOp::put(
                            result_key.as_str(),
                            format!("worker-{id} attempt {}", claim.attempt()),
                            None,
                        ),
                    ]),
            )
            .await?
            .succeeded();
        guard.unlock().await?;
        claim.ack().await?;
        say(format!(
            "acked {job}: ledger {balance} → {}{}",
            balance + amount(n),
            if committed {
                ""
            } else {
                " (already recorded; nothing changed)"
            }
        ));
    }
    session.close().await?;
    Ok(())
}

fn say(line: String) {
    println!("{line}");
}
