//! The demo: two ingest pods and an nginx-rtmp origin on loopback, capable
//! publishers streaming through a readiness-aware balancer (the Service),
//! one pod drained by SIGTERM, and the frame accounting at the origin.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use ingest_pod::drain::Phase;
use ingest_testkit::audit;
use ingest_testkit::lab::{Balancer, LocalPod};
use ingest_testkit::origin::Origin;
use ingest_testkit::publisher::{Publisher, PublisherConfig, PublisherReport};
use tokio_util::sync::CancellationToken;

/// Watch a pod drain without losing a frame.
#[derive(Debug, Parser)]
#[command(name = "ingest-demo", version)]
struct Args {
    /// Capable publishers (cycling Go Away, Reconnect Request, both).
    #[arg(long, env = "INGEST_DEMO_PUBLISHERS", default_value_t = 6)]
    publishers: usize,
    /// Seconds of streaming before the drain.
    #[arg(long, env = "INGEST_DEMO_BEFORE", default_value_t = 4)]
    before: u64,
    /// Seconds of streaming after the drain.
    #[arg(long, env = "INGEST_DEMO_AFTER", default_value_t = 3)]
    after: u64,
    /// Keep the logs of the pods (RUST_LOG=info) instead of the narration only.
    #[arg(long)]
    verbose: bool,
}

fn say(start: Instant, msg: impl AsRef<str>) {
    println!("[{:>6.2}s] {}", start.elapsed().as_secs_f64(), msg.as_ref());
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if args.verbose {
        ingest_runtime::init_logs(ingest_runtime::LogFormat::Text);
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let origin = Origin::start(dir.path(), "127.0.0.1")?;
    say(
        t0,
        format!(
            "nginx-rtmp origin on {} records every stream (record all; record_unique on)",
            origin.addr()
        ),
    );
    let (mut pod_a, pod_b, balancer) = start_pods(t0, &origin).await?;

    let stop = CancellationToken::new();
    let tasks = start_publishers(args.publishers, &balancer.addr.to_string(), &stop)?;
    while pod_a.publishers() < args.publishers {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say(
        t0,
        format!("{} publishers streaming 1 Mbit/s to pod-a (GOP 1 s)", args.publishers),
    );
    pod_b.registry.set_serving(true);
    say(t0, "pod-b is ready");
    tokio::time::sleep(Duration::from_secs(args.before)).await;

    say(
        t0,
        "SIGTERM to pod-a (what kubectl drain or a rollout does): it leaves the Service, waits 1 s, signals in waves",
    );
    let drain_start = Instant::now();
    pod_a.sigterm();
    narrate_drain(t0, &pod_a, &pod_b).await;
    pod_a.wait().await?;
    say(
        t0,
        format!(
            "pod-a drained and exited after {:.2}s",
            drain_start.elapsed().as_secs_f64()
        ),
    );
    tokio::time::sleep(Duration::from_secs(args.after)).await;
    say(t0, "stopping the publishers (clean FCUnpublish/deleteStream)");
    stop.cancel();
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await??);
    }
    while pod_b.registry.relays_active() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record_dir = origin.record_dir();
    drop(origin);
    let lossless = print_audit(&reports, &record_dir)?;
    Ok(if lossless { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// pod-a and pod-b relaying to `origin` behind the Service (a balancer to
/// ready pods); pod-b not ready yet.
async fn start_pods(t0: Instant, origin: &Origin) -> anyhow::Result<(LocalPod, LocalPod, Balancer)> {
    let flags = [
        "--propagation-delay",
        "1s",
        "--drain-rate",
        "20",
        "--grace-period",
        "20s",
        "--drain-deadline",
        "15s",
    ];
    let pod_a = LocalPod::start_relaying_to("pod-a", origin, &flags).await?;
    let pod_b = LocalPod::start_relaying_to("pod-b", origin, &flags).await?;
    pod_b.registry.set_serving(false);
    let balancer = Balancer::start(vec![pod_a.backend(), pod_b.backend()]).await?;
    say(
        t0,
        format!(
            "ingest pods pod-a (rtmp {}) and pod-b (rtmp {}); the Service (a balancer to ready pods) on {}",
            pod_a.rtmp, pod_b.rtmp, balancer.addr
        ),
    );
    say(t0, "pod-b is not ready yet: every publisher lands on pod-a");
    Ok((pod_a, pod_b, balancer))
}

type PublisherTask = tokio::task::JoinHandle<ingest_testkit::publisher::Result<PublisherReport>>;

/// `n` capable publishers through the Service at `addr`, cycling Go Away,
/// Reconnect Request and both.
fn start_publishers(n: usize, addr: &str, stop: &CancellationToken) -> anyhow::Result<Vec<PublisherTask>> {
    let kinds = [
        ("go-away", true, false),
        ("reconnect", false, true),
        ("both", true, true),
    ];
    let mut tasks = Vec::new();
    for i in 0..n {
        let (label, go_away, reconnect) = kinds[i % kinds.len()];
        let cfg = PublisherConfig {
            go_away,
            reconnect,
            fps: 30,
            gop: 30,
            video_bitrate_bps: 1_000_000,
            width: 640,
            height: 360,
            ..PublisherConfig::new(format!("rtmp://{addr}/live/{label}-{i}"))
        };
        tasks.push(tokio::spawn(Publisher::new(cfg)?.run(stop.clone())));
    }
    Ok(tasks)
}

/// A line on every change of pod-a's drain, until it is drained (30 s at most).
async fn narrate_drain(t0: Instant, pod_a: &LocalPod, pod_b: &LocalPod) {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let a = pod_a.drainer.status();
        let line = match &a {
            Some(d) => format!(
                "pod-a {:<11} signalled {:>2}  migrated {:>2}  remaining {:>2}  relays {:>2} | pod-b publishers {:>2}",
                d.phase.label(),
                d.signalled,
                d.migrated,
                d.remaining,
                d.relays_active,
                pod_b.publishers()
            ),
            None => "pod-a starting its drain".into(),
        };
        if line != last {
            say(t0, &line);
            last = line;
        }
        if a.is_some_and(|d| d.phase == Phase::Drained) {
            return;
        }
        if start.elapsed() > Duration::from_secs(30) {
            say(t0, "drain did not finish in 30 s");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The audit of every publisher at the origin, as a table; true if all
/// are lossless.
fn print_audit(reports: &[PublisherReport], record_dir: &std::path::Path) -> anyhow::Result<bool> {
    println!();
    println!(
        "{:<14} {:>6} {:>9} {:>6} {:>5} {:>10} {:>9}  verdict",
        "stream", "sent", "at origin", "lost", "dup", "recordings", "gap (ms)"
    );
    let mut all_ok = true;
    for r in reports {
        let a = audit::audit_dir(&r.stream, &r.sent, record_dir)?;
        let gap = r.max_switch_gap().map_or("-".into(), |g| g.as_millis().to_string());
        let verdict = if a.lossless() { "lossless" } else { "LOSS" };
        all_ok &= a.lossless();
        println!(
            "{:<14} {:>6} {:>9} {:>6} {:>5} {:>10} {:>9}  {}",
            r.stream, a.sent, a.received, a.lost, a.duplicated, a.recordings, gap, verdict
        );
    }
    println!();
    println!("sent and at origin count audio/video messages by payload hash (sequence headers and metadata apart);");
    println!("gap is the publisher's pause between its last message to pod-a and its first to pod-b.");
    Ok(all_ok)
}
