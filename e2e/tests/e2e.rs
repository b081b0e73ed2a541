//! End-to-end tests on a real cluster (see e2e/README.md). `harness = false`:
//! the runner brings one cluster up, runs these serially and always tears down.
//! Filter by name like libtest: `cargo test -p ingest-e2e --test e2e -- smoke`.

use std::process::ExitCode;

use ingest_e2e::runner;

// Scenarios live in tests/e2e/ so cargo does not take them for test targets of their own.
#[path = "e2e/chart.rs"]
mod chart;
#[path = "e2e/lossless.rs"]
mod lossless;
#[path = "e2e/operator.rs"]
mod operator;
#[path = "e2e/plugin.rs"]
mod plugin;
#[path = "e2e/smoke.rs"]
mod smoke;

fn main() -> ExitCode {
    let mut scenarios = smoke::scenarios();
    scenarios.extend(operator::scenarios());
    scenarios.extend(chart::scenarios());
    scenarios.extend(lossless::scenarios());
    scenarios.extend(plugin::scenarios());
    runner::main(2, scenarios)
}
