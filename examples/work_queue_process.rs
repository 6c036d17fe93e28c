// One producer or consumer process of a work queue, for the multi-process test in
// `tests/work_queue.rs` (which kills consumers with SIGKILL and starts them again).
//
// ```text
// work_queue_process produce <endpoints> <queue> <tag> <count>
//     pushes <count> jobs with payloads "<tag>-<n>", then exits
// work_queue_process consume <endpoints> <queue> <results prefix> <concurrency>
//     handles jobs until killed: each job's payload is written to <results prefix><job id>
//     in the same fenced transaction as its ack
// ```
//
// Endpoints are comma-separated. Consumers use a 2 s session TTL so that the jobs of a
// killed consumer are delivered again quickly.

use std::time::Duration;

use etcd_coord::etcd_client::TxnOp;
use etcd_coord::{Connect, Session, WorkQueue};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["produce", endpoints, queue, tag, count] => runtime.block_on(produce(
            endpoints,
            queue,
            tag,
            count.parse().expect("count"),
        )),
        ["consume", endpoints, queue, results, concurrency] => runtime.block_on(consume(
            endpoints,
            queue,
            results,
            concurrency.parse().expect("concurrency"),
        )),
        _ => {
            eprintln!("usage: see the top of examples/work_queue_process.rs");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("work_queue_process {}: {e}", args.join(" "));
        std::process::exit(1);
    }
}

async fn queue(endpoints: &str, name: &str, ttl: Duration) -> etcd_coord::Result<WorkQueue> {
    let client = Connect::new(endpoints.split(',')).connect().await?;
    let session = Session::builder(client)
        .ttl(ttl)
        .request_timeout(Duration::from_secs(1))
        .build()
        .await?;
    // Five kills could, in the worst case, hit one job five times: keep it out of the dead
    // letters.
    WorkQueue::builder(&session, name).max_attempts(100).build()
}

async fn produce(endpoints: &str, name: &str, tag: &str, count: usize) -> etcd_coord::Result<()> {
    let queue = queue(endpoints, name, Duration::from_secs(10)).await?;
    for n in 0..count {
        queue.push(format!("{tag}-{n}")).await?;
    }
    Ok(())
}

async fn consume(
    endpoints: &str,
    name: &str,
    results: &str,
    concurrency: usize,
) -> etcd_coord::Result<()> {
    let queue = queue(endpoints, name, Duration::from_secs(2)).await?;
    let results = results.to_string();
    queue
        .consumer()
        .concurrency(concurrency)
        .run(move |job| {
            let key = format!("{results}{}", job.id());
            async move {
                // Some work, so that kills land while jobs are in flight.
                let ms = 1 + (uuid::Uuid::new_v4().as_u128() % 15) as u64;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, String>(vec![TxnOp::put(key, job.payload().to_vec(), None)])
            }
        })
        .await
}
