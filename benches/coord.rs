//! `cargo bench --features bench [-- WORKLOAD --PARAM VALUE ...]`: runs the workloads of
//! `etcd_coord::bench` and exits non-zero if one fails or the cost model does not hold.
//! `cargo bench --features bench -- --help` lists the workloads and their parameters.

use std::process::ExitCode;

use etcd_coord::bench::{self, BenchOptions, USAGE};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Test runners build this target too (`cargo test --all-targets`, nextest's listing): it is
    // a program, not a test, so it has no tests to list and runs only under `cargo bench`,
    // which passes `--bench`.
    if args.iter().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    if !args.iter().any(|a| a == "--bench") {
        eprintln!(
            "coord: a benchmark; run it with `cargo bench --features bench` (or pass --bench)"
        );
        return ExitCode::SUCCESS;
    }
    let options = match BenchOptions::parse(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if options.help {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench::run(&options, &mut std::io::stdout())) {
        Ok(report) if report.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}
