//! Scenario 9 on loopback, a reported benchmark (not CI): OBS Studio 29
//! headless publishes through two in-process ingest pods, the pod it is on
//! drains (Go Away), OBS moves to the other one, and the origin's
//! recordings are audited against OBS's own recording. Repeated, since OBS
//! 29 has a rare reconnect race; prints one row per run.
//!
//! Needs root (installs obs-studio and xvfb when absent) and nginx with the
//! RTMP module. No Kubernetes.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use ingest_e2e::obs::{self, LoopbackRun, LoopbackTiming};

const USAGE: &str = "usage: obs-loopback [--runs N] [--before SECS] [--after SECS]

Runs OBS through a drain of its ingest pod N times (default 5), streaming
SECS before the drain (default 6) and after it (default 5), and prints the
audit of each run against OBS's local recording.";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("obs-loopback: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// What the command line asks for.
enum Asked {
    /// `runs` drains with this timing.
    Runs(u32, LoopbackTiming),
    /// The usage, printed; `true` when it was asked for (`--help`).
    Usage(bool),
}

fn run() -> Result<bool> {
    let (runs, timing) = match parse_args()? {
        Asked::Runs(runs, timing) => (runs, timing),
        Asked::Usage(asked) => return Ok(asked),
    };
    if std::env::var_os("RUST_LOG").is_some() {
        ingest_runtime::init_logs(ingest_runtime::LogFormat::Text);
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    let mut all_ok = true;
    for i in 1..=runs {
        println!("run {i}/{runs}");
        let row = match rt.block_on(obs::loopback_drain(timing)) {
            Ok(r) => {
                let (row, ok) = report(i, &r);
                all_ok &= ok;
                row
            }
            Err(e) => {
                all_ok = false;
                println!("  failed: {e:#}");
                format!("{i:>3} run failed: {}", first_line(&format!("{e:#}")))
            }
        };
        rows.push(row);
    }
    print_table(&rows);
    Ok(all_ok)
}

fn parse_args() -> Result<Asked> {
    let (mut runs, mut before, mut after) = (5u32, 6u64, 5u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64> {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))?
                .parse()
                .with_context(|| format!("{name} takes a number\n{USAGE}"))
        };
        match arg.as_str() {
            "--runs" => runs = u32::try_from(value("--runs")?)?,
            "--before" => before = value("--before")?,
            "--after" => after = value("--after")?,
            _ => {
                println!("{USAGE}");
                return Ok(Asked::Usage(arg == "--help" || arg == "-h"));
            }
        }
    }
    let timing = LoopbackTiming {
        before: Duration::from_secs(before),
        after: Duration::from_secs(after),
    };
    Ok(Asked::Runs(runs, timing))
}

/// Prints the audit of run `i` (and the end of OBS's log unless it was
/// lossless); its row of the table, and whether it was lossless.
fn report(i: u32, r: &LoopbackRun) -> (String, bool) {
    let ok = r.audit.lossless() && r.crash.is_none() && r.reconnects.go_aways >= 1;
    println!("  {}", r.audit);
    if !ok {
        let lines: Vec<&str> = r.log.lines().collect();
        println!("  end of the OBS log:");
        for line in &lines[lines.len().saturating_sub(30)..] {
            println!("    {line}");
        }
    }
    let row = format!(
        "{i:>3} {:>6} {:>9} {:>5} {:>4} {:>4} {:>7} {:>6} {:>12} {:>11} {:>6.1} {:<9} {}",
        r.audit.sent,
        r.audit.received,
        r.audit.lost,
        r.audit.duplicated,
        r.audit.out_of_order,
        r.audit.unknown,
        r.reconnects.go_aways,
        ms(&r.reconnects.gaps),
        ms(&r.stalls),
        r.drain.as_secs_f64(),
        r.drain_phase.label(),
        match (&r.crash, ok) {
            (Some(exit), _) => format!("OBS CRASHED ({exit})"),
            (None, true) => "lossless".into(),
            (None, false) => "LOSS".into(),
        }
    );
    (row, ok)
}

fn print_table(rows: &[String]) {
    println!();
    println!("run   sent at-origin  lost  dup  ooo unknown goaway  gap (ms)  stall (ms) drain (s)        verdict");
    for row in rows {
        println!("{row}");
    }
    println!();
    println!("sent: audio/video packets in OBS's local recording (sequence headers and metadata apart);");
    println!("unknown: packets the stream carried before or after the recording (not a loss);");
    println!("gap: Go Away to the next successful connection in OBS's log; stall: at the origin (notify hooks).");
}

fn ms(durations: &[Duration]) -> String {
    if durations.is_empty() {
        return "-".into();
    }
    durations
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
        .collect::<Vec<_>>()
        .join(",")
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}
