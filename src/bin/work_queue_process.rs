// The example examples/work_queue_process.rs, built as a binary so that integration tests can
// run it (see Cargo.toml). Not a command-line tool of the crate.
include!("../../examples/work_queue_process.rs");
