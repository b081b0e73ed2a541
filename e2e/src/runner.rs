//! The e2e test runner (`harness = false`): one cluster per run, scenarios
//! serially, the starting state restored between them, teardown always —
//! after a failure, a panic, a timeout or Ctrl-C — and a libtest-like summary
//! so CI reads the result.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::cluster::Cluster;

type ScenarioFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
type ScenarioFn = Box<dyn Fn(Arc<Cluster>) -> ScenarioFuture + Send + Sync>;

/// Environment variable that skips the whole run (`E2E_SKIP=1`), e.g. on a
/// machine that is not root. Without it the e2e tests always run.
pub const SKIP_ENV: &str = "E2E_SKIP";

/// One named test against the shared cluster.
pub struct Scenario {
    name: &'static str,
    timeout: Duration,
    run: ScenarioFn,
}

impl Scenario {
    pub fn new<F, Fut>(name: &'static str, f: F) -> Self
    where
        F: Fn(Arc<Cluster>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self {
            name,
            timeout: Duration::from_secs(300),
            run: Box::new(move |c| Box::pin(f(c))),
        }
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// What the command line selects: libtest-style name filters and `--list`.
struct Args {
    filters: Vec<String>,
    list: bool,
}

impl Args {
    fn parse() -> Self {
        let mut filters = Vec::new();
        let mut list = false;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--list" => list = true,
                // Flags cargo or a person may pass to any test binary; nothing to do here.
                a if a.starts_with('-') => {}
                a => filters.push(a.to_owned()),
            }
        }
        Self { filters, list }
    }

    fn selects(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }
}

/// Runs `scenarios` on a fresh cluster of `nodes` nodes. The name used to
/// report the final teardown check is `cluster_down_leaves_nothing`.
pub fn main(nodes: usize, scenarios: Vec<Scenario>) -> ExitCode {
    let args = Args::parse();
    if args.list {
        for s in &scenarios {
            println!("{}: test", s.name);
        }
        return ExitCode::SUCCESS;
    }
    let total = scenarios.len();
    let scenarios: Vec<Scenario> = scenarios.into_iter().filter(|s| args.selects(s.name)).collect();
    let filtered_out = total - scenarios.len();
    let started = Instant::now();
    if scenarios.is_empty() && !args.filters.is_empty() {
        // Nothing here matches the filters: no cluster for nothing.
        summary(0, &[], 0, filtered_out, started);
        return ExitCode::SUCCESS;
    }

    if let Some(v) = std::env::var_os(SKIP_ENV).filter(|v| !v.is_empty() && v != "0") {
        println!("e2e skipped: {SKIP_ENV}={}", v.to_string_lossy());
        summary(0, &[], scenarios.len(), filtered_out, started);
        return ExitCode::SUCCESS;
    }
    println!("\nrunning {} tests", scenarios.len() + 1);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => return fail_all(&format!("tokio runtime: {err}"), filtered_out, started),
    };
    runtime.block_on(run(nodes, scenarios, filtered_out, started))
}

async fn run(nodes: usize, scenarios: Vec<Scenario>, filtered_out: usize, started: Instant) -> ExitCode {
    if !is_root() {
        return fail_all(
            "the e2e cluster needs root (bridges, routes, cgroups); set E2E_SKIP=1 to skip",
            filtered_out,
            started,
        );
    }
    let up = Instant::now();
    let cluster = match Cluster::up(nodes).await {
        Ok(c) => Arc::new(c),
        Err(err) => return fail_all(&format!("cluster up: {err:#}"), filtered_out, started),
    };
    println!(
        "cluster up ({nodes} nodes) in {:.1?}; KUBECONFIG={}",
        up.elapsed(),
        cluster.kubeconfig().display()
    );

    let (mut passed, mut failures) = run_scenarios(&scenarios, &cluster).await;
    // Teardown, then prove it left nothing behind.
    match tear_down(&cluster) {
        Ok(()) => passed += 1,
        Err(why) => failures.push(("cluster_down_leaves_nothing".into(), why)),
    }
    drop(cluster);
    summary(passed, &failures, 0, filtered_out, started);
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `scenarios` one after the other, restoring the starting state after
/// each, until the end or Ctrl-C: how many passed, and the failures.
async fn run_scenarios(scenarios: &[Scenario], cluster: &Arc<Cluster>) -> (usize, Vec<(String, String)>) {
    let mut passed = 0;
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut interrupted = false;
    for scenario in scenarios {
        let t = Instant::now();
        let result = tokio::select! {
            r = run_one(scenario, cluster.clone()) => r,
            _ = tokio::signal::ctrl_c() => { interrupted = true; Err(anyhow!("interrupted")) }
        };
        // Restore the starting state even after a failure: the next scenario
        // must not see this one's namespaces or a cordoned node.
        let result = match (result, interrupted) {
            (Ok(()), false) => cluster
                .reset()
                .await
                .map_err(|e| e.context("restoring the starting state")),
            (r, _) => {
                if !interrupted {
                    let _ = cluster.reset().await;
                }
                r
            }
        };
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {} ... ok ({:.1?})", scenario.name, t.elapsed());
            }
            Err(err) => {
                println!("test {} ... FAILED ({:.1?})", scenario.name, t.elapsed());
                failures.push((
                    scenario.name.to_owned(),
                    format!("{err:#}\n(component logs: {})", cluster.log_dir().display()),
                ));
            }
        }
        if interrupted {
            break;
        }
    }
    (passed, failures)
}

/// Takes the cluster down and checks that it left nothing behind; the
/// reason when it did not.
fn tear_down(cluster: &Cluster) -> Result<(), String> {
    let down = Instant::now();
    let down_result = cluster.down();
    let leftovers = cluster.leftovers();
    match (down_result, leftovers.is_empty()) {
        (Ok(()), true) => {
            println!("test cluster_down_leaves_nothing ... ok ({:.1?})", down.elapsed());
            Ok(())
        }
        (result, _) => {
            println!("test cluster_down_leaves_nothing ... FAILED");
            let mut why = result.err().map(|e| format!("{e:#}\n")).unwrap_or_default();
            why.push_str(&leftovers.join("\n"));
            Err(why)
        }
    }
}

/// Runs one scenario as its own task, so a panic is caught (as a `JoinError`)
/// instead of unwinding through the runner, and a hang ends at the timeout.
async fn run_one(scenario: &Scenario, cluster: Arc<Cluster>) -> Result<()> {
    let mut task = tokio::spawn((scenario.run)(cluster));
    match tokio::time::timeout(scenario.timeout, &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) if join.is_panic() => {
            let panic = join.into_panic();
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Err(anyhow!("panicked: {msg}"))
        }
        Ok(Err(join)) => Err(anyhow!("scenario task failed: {join}")),
        Err(_) => {
            task.abort();
            Err(anyhow!("timed out after {:?}", scenario.timeout))
        }
    }
}

fn fail_all(why: &str, filtered_out: usize, started: Instant) -> ExitCode {
    println!("test cluster_up ... FAILED");
    summary(0, &[("cluster_up".into(), why.into())], 0, filtered_out, started);
    ExitCode::FAILURE
}

/// libtest's closing lines, which CI reads.
fn summary(passed: usize, failures: &[(String, String)], ignored: usize, filtered_out: usize, started: Instant) {
    if !failures.is_empty() {
        println!("\nfailures:\n");
        for (name, why) in failures {
            println!("---- {name} ----\n{why}\n");
        }
        println!("failures:");
        for (name, _) in failures {
            println!("    {name}");
        }
    }
    let verdict = if failures.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {} failed; {ignored} ignored; 0 measured; {filtered_out} filtered out; finished in {:.2}s\n",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
}

fn is_root() -> bool {
    // /proc/self/status "Uid: real effective ...": no libc call, no unsafe.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
