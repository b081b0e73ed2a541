//! Compares publisher logs with an origin's recordings, stream by stream.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ingest_testkit::audit;

/// Loss audit: every audio/video message in the publisher logs
/// (`ingest-publisher --log-dir`) must appear exactly once, in order, in the
/// origin's recordings (nginx-rtmp `record all; record_unique on;`).
/// Exits with 1 when any stream lost, duplicated or reordered a message.
#[derive(Debug, Parser)]
#[command(name = "ingest-audit", version)]
struct Args {
    /// Directory of publisher logs (<stream>.jsonl).
    #[arg(long, env = "INGEST_AUDIT_LOG_DIR")]
    log_dir: PathBuf,
    /// Directory of the origin's recordings (<stream>-<unix time>.flv).
    #[arg(long, env = "INGEST_AUDIT_RECORD_DIR")]
    record_dir: PathBuf,
}

fn main() -> anyhow::Result<ExitCode> {
    let Args { log_dir, record_dir } = Args::parse();
    let reports = audit::audit_all(&log_dir, &record_dir)?;
    print!("{}", audit::table(&reports));
    Ok(if reports.iter().all(audit::AuditReport::lossless) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
