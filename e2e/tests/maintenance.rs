//! Maintenance that is not one clean drain at a time, on a real three-node
//! cluster (see e2e/README.md): `harness = false`, like `tests/e2e.rs`, with
//! a cluster of its own. Filter by name: `cargo test -p ingest-e2e --test
//! maintenance -- chained`.

use std::process::ExitCode;

use ingest_e2e::runner;

#[path = "e2e/adversarial.rs"]
mod adversarial;

fn main() -> ExitCode {
    runner::main(3, adversarial::scenarios())
}
