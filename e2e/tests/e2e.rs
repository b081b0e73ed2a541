//! End-to-end tests on a real cluster (see e2e/README.md). `harness = false`:
//! the runner brings one cluster up, runs these serially and always tears down.
//! Filter by name like libtest: `cargo test -p ingest-e2e --test e2e -- smoke`.

use std::process::ExitCode;

use ingest_e2e::runner;

// Scenarios live in tests/e2e/ so cargo does not take them for test targets of their own.
#[path = "e2e/smoke.rs"]
mod smoke;

fn main() -> ExitCode {
    let mut s = smoke::scenarios();
    s.push(ingest_e2e::Scenario::new("zz_fail", |c| async move { c.namespace("zz-fail").await?; anyhow::bail!("deliberate") }));
    s.push(ingest_e2e::Scenario::new("zz_panic", |c| async move { c.kubectl(&["cordon", "node-a"]).await?; panic!("deliberate panic") }));
    s.push(ingest_e2e::Scenario::new("zz_check_reset", |c| async move {
        let ns = c.kubectl(&["get", "ns", "-l", "lossless-ingest.e2e/test", "-o", "name"]).await?;
        anyhow::ensure!(ns.trim().is_empty(), "left: {ns}");
        let u = c.kubectl(&["get", "node", "node-a", "-o", "jsonpath={.spec.unschedulable}"]).await?;
        anyhow::ensure!(u.trim().is_empty(), "node-a still cordoned: {u}");
        Ok(())
    }));
    runner::main(2, s)
}
