//! Benchmarks of the ingest pod on loopback, reported and never asserted:
//!
//! - `handover`: the stall a capable publisher's move causes at a real
//!   nginx-rtmp origin, seen by an RTMP player attached to the origin.
//! - `overlap`: the same stall when many publishers move at once: a pod
//!   holding `--moves` capable publishers drains at the operator's default
//!   rate, each watched by its own player at the origin.
//! - `drain100`: drain time of one pod holding 100 capable publishers,
//!   next to the model propagation + one GOP + publishers / rate.
//! - `throughput`: CPU and memory of one ingest-pod process relaying
//!   2.5 Mbit/s publishers to an origin, against nginx-rtmp's `push`, and
//!   the latency and spacing of delivery seen by players at the origin
//!   (publisher write → arrival, one clock, this process), next to the
//!   publishers writing straight to the origin and through a byte-for-byte
//!   TCP forwarder (this executable re-executed; the kernel's floor of any
//!   relay that reads and writes as ingest-pod does).
//!
//! `cargo bench -p ingest-pod --bench ingest -- [handover|overlap|drain100|throughput|all] [--quick] [--moves 15] [--publishers 10,20,40]`
//!
//! The report goes to stdout and, as JSON, to `target/bench/ingest.json`
//! (scenarios run now replace their entry; the others are kept).

use std::collections::HashMap;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use ingest_pod::drain::{DrainSpec, IncapablePolicy, Phase};
use ingest_pod::registry::SignalKind;
use ingest_pod::rtmp::conn::{self, OUTGOING_CHUNK_SIZE, Reader, Writer};
use ingest_rtmp::amf0::Value;
use ingest_rtmp::media::{self, Kind};
use ingest_rtmp::message::{Command as RtmpCommand, Message, UserControl};
use ingest_testkit::audit::{self, AuditReport};
use ingest_testkit::lab::{Balancer, LocalPod};
use ingest_testkit::origin::{self, Origin, RTMP_MODULE};
use ingest_testkit::publisher::{Progress, Publisher, PublisherConfig, PublisherReport, SentFrame, unix_us};
use serde_json::{Value as Json, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Timeout of each step of the player's connect/createStream/play.
const STEP: Duration = Duration::from_secs(5);
/// Upper bounds per scenario, so a hang ends the run with a report.
const HANDOVER_LIMIT: Duration = Duration::from_secs(600);
const OVERLAP_LIMIT: Duration = Duration::from_secs(600);
const DRAIN100_LIMIT: Duration = Duration::from_secs(300);
const THROUGHPUT_LIMIT: Duration = Duration::from_secs(1200);

const USAGE: &str = "usage: cargo bench -p ingest-pod --bench ingest -- [handover|overlap|drain100|throughput|all]... \
                     [--quick] [--moves 15] [--publishers 10,20,40] [--window 20s] [--relays ingest-pod,nginx,forward,direct] \
                     [--pod-args \"--relay-busy-retry=10ms ...\"] [--forward-interval 5ms (0: per packet)] \
                     [--relay-cpus 1 --load-cpus 0 (taskset lists: the relay apart from the load)] \
                     [--no-idle (a nice 19 spinner per CPU, as on a node busy with other work)]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Handover,
    Overlap,
    Drain100,
    Throughput,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::Handover,
        Scenario::Overlap,
        Scenario::Drain100,
        Scenario::Throughput,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Handover => "handover",
            Scenario::Overlap => "overlap",
            Scenario::Drain100 => "drain100",
            Scenario::Throughput => "throughput",
        }
    }
}

#[derive(Debug, Clone)]
struct Opts {
    scenarios: Vec<Scenario>,
    quick: bool,
    /// Publishers moved at once by the overlap scenario.
    moves: usize,
    /// Publisher counts of the throughput scenario.
    publishers: Vec<usize>,
    /// Measurement window of the throughput scenario.
    window: Duration,
    /// Extra ingest-pod flags for every pod (experiments).
    pod_args: Vec<String>,
    /// Relays the throughput scenario measures.
    relays: Vec<Side>,
    /// Read clock of the forward row's forwarder (zero: per packet).
    forward_interval: Duration,
    /// CPUs (a `taskset` list) of the measured relay's processes.
    relay_cpus: Option<String>,
    /// CPUs of this process and what it starts: publishers, players, origin.
    load_cpus: Option<String>,
    /// Keep every CPU busy with a lowest-priority spinner during throughput.
    no_idle: bool,
}

impl Opts {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Self> {
        let mut scenarios = Vec::new();
        let mut quick = false;
        let mut moves = None;
        let mut publishers = None;
        let mut window = None;
        let mut pod_args = Vec::new();
        let mut relays = Vec::new();
        // ingest-pod's default `--media-read-interval`.
        let mut forward_interval = Duration::from_millis(5);
        let mut relay_cpus = None;
        let mut load_cpus = None;
        let mut no_idle = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                "--quick" => quick = true,
                "--publishers" => {
                    let list = args
                        .next()
                        .ok_or_else(|| anyhow!("--publishers needs a list\n{USAGE}"))?;
                    let counts = list
                        .split(',')
                        .map(|n| n.trim().parse::<usize>())
                        .collect::<Result<Vec<_>, _>>();
                    publishers = Some(counts.with_context(|| format!("--publishers {list:?}\n{USAGE}"))?);
                }
                "--moves" => {
                    let n = args.next().ok_or_else(|| anyhow!("--moves needs a count\n{USAGE}"))?;
                    let n = n
                        .trim()
                        .parse::<usize>()
                        .with_context(|| format!("--moves {n:?}\n{USAGE}"))?;
                    if n == 0 {
                        bail!("--moves must be at least 1\n{USAGE}");
                    }
                    moves = Some(n);
                }
                "--relays" => {
                    let list = args.next().ok_or_else(|| anyhow!("--relays needs a list\n{USAGE}"))?;
                    for name in list.split(',') {
                        let side = Side::ALL
                            .into_iter()
                            .find(|s| s.name() == name.trim())
                            .ok_or_else(|| anyhow!("unknown relay {name:?}\n{USAGE}"))?;
                        relays.push(side);
                    }
                }
                "--pod-args" => {
                    let flags = args.next().ok_or_else(|| anyhow!("--pod-args needs flags\n{USAGE}"))?;
                    pod_args.extend(flags.split_whitespace().map(str::to_owned));
                }
                "--window" => {
                    let w = args
                        .next()
                        .ok_or_else(|| anyhow!("--window needs a duration\n{USAGE}"))?;
                    window = Some(ingest_runtime::parse_duration(&w).map_err(|e| anyhow!("--window: {e}"))?);
                }
                "--forward-interval" => {
                    let d = args
                        .next()
                        .ok_or_else(|| anyhow!("--forward-interval needs a duration\n{USAGE}"))?;
                    forward_interval =
                        ingest_runtime::parse_duration(&d).map_err(|e| anyhow!("--forward-interval: {e}"))?;
                }
                "--relay-cpus" => {
                    relay_cpus = Some(
                        args.next()
                            .ok_or_else(|| anyhow!("--relay-cpus needs a CPU list\n{USAGE}"))?,
                    );
                }
                "--load-cpus" => {
                    load_cpus = Some(
                        args.next()
                            .ok_or_else(|| anyhow!("--load-cpus needs a CPU list\n{USAGE}"))?,
                    );
                }
                "--no-idle" => no_idle = true,
                "all" => scenarios.extend(Scenario::ALL),
                "-h" | "--help" => bail!("{USAGE}"),
                name => match Scenario::ALL.into_iter().find(|s| s.name() == name) {
                    Some(s) => scenarios.push(s),
                    None => bail!("unknown argument {name:?}\n{USAGE}"),
                },
            }
        }
        if scenarios.is_empty() {
            scenarios.extend(Scenario::ALL);
        }
        scenarios.dedup();
        let moves = moves.unwrap_or(if quick { 6 } else { 15 });
        let publishers = publishers.unwrap_or_else(|| if quick { vec![10] } else { vec![10, 20, 40] });
        let window = window.unwrap_or(if quick {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(20)
        });
        if relays.is_empty() {
            relays.extend(Side::ALL);
        }
        Ok(Self {
            scenarios,
            quick,
            moves,
            publishers,
            window,
            pod_args,
            relays,
            forward_interval,
            relay_cpus,
            load_cpus,
            no_idle,
        })
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.next_if_eq(FORWARD_ARG).is_some() {
        init_tracing();
        return forward_main(args);
    }
    if args.next_if_eq(SPIN_ARG).is_some() {
        spin();
    }
    let opts = Opts::parse(args)?;
    init_tracing();
    if let Some(cpus) = &opts.load_cpus {
        // Before the runtime: its threads, and every process started, inherit it.
        pin(std::process::id(), cpus)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let results = runtime.block_on(async {
        tokio::select! {
            r = run(&opts) => Some(r),
            // Dropping the scenarios stops the pods, nginx and child processes.
            () = ingest_runtime::shutdown_signal() => None,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let Some(results) = results else { bail!("interrupted") };
    let path = write_json(&opts, &results)?;
    println!("\nJSON report: {}", path.display());
    if results.iter().any(|(_, r)| r.get("error").is_some()) {
        bail!("a scenario failed (see above)");
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(opts: &Opts) -> Vec<(Scenario, Json)> {
    let mut out = Vec::new();
    for &scenario in &opts.scenarios {
        println!(
            "\n=== {} {}===",
            scenario.name(),
            if opts.quick { "(quick) " } else { "" }
        );
        let started = Instant::now();
        let (limit, result) = match scenario {
            Scenario::Handover => (
                HANDOVER_LIMIT,
                tokio::time::timeout(HANDOVER_LIMIT, handover(opts)).await,
            ),
            Scenario::Overlap => (OVERLAP_LIMIT, tokio::time::timeout(OVERLAP_LIMIT, overlap(opts)).await),
            Scenario::Drain100 => (
                DRAIN100_LIMIT,
                tokio::time::timeout(DRAIN100_LIMIT, drain100(opts)).await,
            ),
            Scenario::Throughput => (
                THROUGHPUT_LIMIT,
                tokio::time::timeout(THROUGHPUT_LIMIT, throughput(opts)).await,
            ),
        };
        let mut value = match result {
            Ok(Ok(v)) => v,
            Ok(Err(err)) => {
                println!("{} FAILED: {err:#}", scenario.name());
                json!({ "error": format!("{err:#}") })
            }
            Err(_) => {
                println!("{} did not finish within {limit:?}", scenario.name());
                json!({ "error": format!("timed out after {limit:?}") })
            }
        };
        value["wall_s"] = json!(secs(started.elapsed()));
        out.push((scenario, value));
    }
    out
}

fn write_json(opts: &Opts, results: &[(Scenario, Json)]) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("ingest.json");
    let mut doc = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Json>(&b).ok())
        .filter(Json::is_object)
        .unwrap_or_else(|| json!({}));
    for (scenario, value) in results {
        doc[scenario.name()] = json!({
            "quick": opts.quick,
            "finished_unix_s": unix_ms() / 1000,
            "result": value,
        });
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------------------
// Small helpers: time, statistics, waiting.

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// p50 / p99 / max / mean of a sample (nearest rank).
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            n: v.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }

    fn json(&self) -> Json {
        json!({ "n": self.n, "p50": self.p50, "p99": self.p99, "max": self.max, "mean": (self.mean * 10.0).round() / 10.0 })
    }

    fn text(&self) -> String {
        format!(
            "p50 {:>7.1}  p99 {:>7.1}  max {:>7.1}  (n={})",
            self.p50, self.p99, self.max, self.n
        )
    }
}

/// Polls `check` every 10 ms until it holds or `limit` passes.
async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A publisher running in this process.
struct Running {
    stream: String,
    progress: watch::Receiver<Progress>,
    task: JoinHandle<ingest_testkit::publisher::Result<PublisherReport>>,
}

fn spawn_publisher(cfg: PublisherConfig, stop: &CancellationToken) -> Result<Running> {
    let publisher = Publisher::new(cfg)?;
    let stream = publisher.stream().to_owned();
    let progress = publisher.progress();
    let task = tokio::spawn(publisher.run(stop.clone()));
    Ok(Running { stream, progress, task })
}

async fn join_publisher(p: Running) -> Result<PublisherReport> {
    let report = p
        .task
        .await
        .with_context(|| format!("publisher {} panicked", p.stream))?;
    report.with_context(|| format!("publisher {}", p.stream))
}

fn lab_args(opts: &Opts, template: &str, grace: &str) -> Vec<String> {
    [
        "--upstream",
        template,
        "--propagation-delay",
        "300ms",
        "--grace-period",
        grace,
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(opts.pod_args.iter().cloned())
    .collect()
}

async fn start_pod(name: &str, args: &[String]) -> Result<LocalPod> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    LocalPod::start(name, &refs)
        .await
        .with_context(|| format!("starting {name}"))
}

/// Audits every stream's recordings at the origin (call after nginx stopped).
fn audit_streams(record_dir: &Path, reports: &[&PublisherReport]) -> Result<Vec<AuditReport>> {
    reports
        .iter()
        .map(|r| audit::audit_dir(&r.stream, &r.sent, record_dir).map_err(Into::into))
        .collect()
}

fn audit_json(results: &[AuditReport]) -> Json {
    let sum = |f: fn(&AuditReport) -> usize| results.iter().map(f).sum::<usize>();
    json!({
        "streams": results.len(),
        "lossless_streams": results.iter().filter(|r| r.lossless()).count(),
        "sent": sum(|r| r.sent),
        "received": sum(|r| r.received),
        "lost": sum(|r| r.lost),
        "duplicated": sum(|r| r.duplicated),
        "out_of_order": sum(|r| r.out_of_order),
        "timestamp_violations": sum(|r| r.timestamp_violations),
        "timeline_violations": sum(|r| r.timeline_violations),
        "not_lossless": results.iter().filter(|r| !r.lossless()).map(|r| r.to_string()).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------
// The RTMP player at the origin.

/// One audio/video message as it arrived at the player.
#[derive(Debug, Clone)]
struct Arrival {
    at: Instant,
    /// The same moment on the clock of [`SentFrame::sent_at_us`].
    wall_us: u64,
    kind: Kind,
    size: usize,
    hash: String,
}

#[derive(Debug, Default)]
struct PlayerLog {
    arrivals: Vec<Arrival>,
    /// Status codes and stream events nginx sent, with their times.
    events: Vec<(Instant, String)>,
    /// Times the origin closed the player's connection and it played again.
    reconnects: u32,
}

/// Waits for the `_result` of transaction `txn`, answering pings.
async fn result_of(reader: &mut Reader, writer: &mut Writer, txn: f64) -> Result<RtmpCommand> {
    loop {
        match reader.next_within(STEP).await? {
            None => bail!("origin closed the connection"),
            Some(Message::Command { command, .. }) if command.transaction == txn && command.name == "_result" => {
                return Ok(command);
            }
            Some(Message::Command { command, .. }) if command.transaction == txn && command.name == "_error" => {
                bail!("origin refused: {:?}", command.args)
            }
            Some(Message::UserControl(UserControl::PingRequest(t))) => {
                writer.send(&Message::UserControl(UserControl::PingResponse(t))).await?
            }
            Some(_) => {}
        }
    }
}

/// connect("live"), createStream, play(stream).
async fn open_player(origin: SocketAddr, stream: &str) -> Result<(Reader, Writer)> {
    let tcp = TcpStream::connect(origin)
        .await
        .with_context(|| format!("player: connecting to {origin}"))?;
    tcp.set_nodelay(true)?;
    let (mut reader, mut writer) = conn::connect(tcp, STEP).await?;
    writer.queue(&Message::SetChunkSize(OUTGOING_CHUNK_SIZE));
    let object = Value::object([
        ("app", Value::string("live")),
        ("flashVer", Value::string("LNX 9,0,124,2")),
        ("tcUrl", Value::string(format!("rtmp://{origin}/live"))),
        ("fpad", Value::Boolean(false)),
        ("capabilities", Value::Number(15.0)),
        ("audioCodecs", Value::Number(4071.0)),
        ("videoCodecs", Value::Number(252.0)),
        ("videoFunction", Value::Number(1.0)),
    ]);
    writer.queue(&Message::command(0, "connect", 1.0, vec![object]));
    writer.flush().await?;
    result_of(&mut reader, &mut writer, 1.0)
        .await
        .context("player: connect")?;
    writer
        .send(&Message::command(0, "createStream", 2.0, vec![Value::Null]))
        .await?;
    let created = result_of(&mut reader, &mut writer, 2.0)
        .await
        .context("player: createStream")?;
    let sid = created.args.iter().find_map(Value::as_number).unwrap_or(1.0) as u32;
    // Start -2000: live, or recorded if there is no live stream (what ffplay sends).
    writer.queue(&Message::command(
        sid,
        "play",
        3.0,
        vec![Value::Null, Value::string(stream), Value::Number(-2000.0)],
    ));
    writer.queue(&Message::UserControl(UserControl::SetBufferLength(sid, 1000)));
    writer.flush().await?;
    Ok((reader, writer))
}

/// Plays `stream` at the origin until `stop`, timestamping every audio and
/// video message; plays again if the origin closes the connection.
async fn player(
    origin: SocketAddr,
    stream: String,
    stop: CancellationToken,
    ready: watch::Sender<bool>,
) -> Result<PlayerLog> {
    let mut log = PlayerLog::default();
    loop {
        let (mut reader, mut writer) = open_player(origin, &stream).await?;
        ready.send_replace(true);
        loop {
            let msg = tokio::select! {
                m = reader.next() => m,
                () = stop.cancelled() => return Ok(log),
            };
            let (at, wall_us) = (Instant::now(), unix_us());
            match msg {
                Ok(Some(Message::Audio { payload, .. })) => log.arrivals.push(Arrival {
                    at,
                    wall_us,
                    kind: Kind::Audio,
                    size: payload.len(),
                    hash: media::payload_hash(&payload),
                }),
                Ok(Some(Message::Video { payload, .. })) => log.arrivals.push(Arrival {
                    at,
                    wall_us,
                    kind: Kind::Video,
                    size: payload.len(),
                    hash: media::payload_hash(&payload),
                }),
                Ok(Some(Message::Command { command, .. })) if command.name == "onStatus" => {
                    let code = command
                        .args
                        .iter()
                        .find_map(|v| v.get("code"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    log.events.push((at, code.to_owned()));
                }
                Ok(Some(Message::UserControl(UserControl::PingRequest(t)))) => {
                    writer.send(&Message::UserControl(UserControl::PingResponse(t))).await?
                }
                Ok(Some(Message::UserControl(ev))) => log.events.push((at, format!("{ev:?}"))),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    log.events.push((at, "player connection closed".to_owned()));
                    break;
                }
            }
            if let Some(ack) = reader.ack_due() {
                writer.send(&ack).await?;
            }
        }
        if stop.is_cancelled() {
            return Ok(log);
        }
        log.reconnects += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// Scenario 1: the handover stall at the origin.

/// What one move looked like at the origin.
#[derive(Debug, Clone)]
struct Handover {
    stream: String,
    kind: SignalKind,
    /// Last message via the old pod → first via the new one, at the player.
    stall_ms: f64,
    /// Publisher media time between those two messages (the gap there would
    /// be with no stall at all).
    media_gap_ms: f64,
    /// Largest arrival gap within one second either side of the switch.
    max_gap_around_ms: f64,
    /// Arrival gaps between consecutive messages via the old pod (steady state).
    steady_all: Stats,
    steady_video: Stats,
    /// The publisher's own largest wall-clock gap at its switch.
    publisher_gap_ms: Option<f64>,
    /// Messages the player saw against those sent.
    player_received: usize,
    sent: usize,
    /// Messages via the new pod that arrived before the last via the old.
    interleaved: usize,
    player_reconnects: u32,
    player_events: Vec<String>,
}

impl Handover {
    fn json(&self) -> Json {
        json!({
            "stream": self.stream,
            "kind": self.kind.label(),
            "stall_ms": self.stall_ms,
            "media_gap_ms": self.media_gap_ms,
            "largest_gap_within_1s_ms": self.max_gap_around_ms,
            "steady_gap_all_ms": self.steady_all.json(),
            "steady_gap_video_ms": self.steady_video.json(),
            "publisher_switch_gap_ms": self.publisher_gap_ms,
            "player_received": self.player_received,
            "sent": self.sent,
            "player_events": self.player_events,
        })
    }
}

fn analyse_handover(kind: SignalKind, report: &PublisherReport, log: &PlayerLog) -> Result<Handover> {
    let by_hash: HashMap<&str, &SentFrame> = report.sent.iter().map(|f| (f.hash.as_str(), f)).collect();
    let known: Vec<(&Arrival, &SentFrame)> = log
        .arrivals
        .iter()
        .filter_map(|a| by_hash.get(a.hash.as_str()).map(|f| (a, *f)))
        .collect();
    let last_old = known
        .iter()
        .rposition(|(_, f)| f.conn == 0)
        .ok_or_else(|| anyhow!("player saw nothing via the first pod"))?;
    let first_new = known
        .iter()
        .position(|(_, f)| f.conn > 0)
        .ok_or_else(|| anyhow!("player saw nothing via the second pod"))?;
    let interleaved = known[..last_old].iter().filter(|(_, f)| f.conn > 0).count();
    let (old_at, new_at) = (known[last_old].0.at, known[first_new].0.at);
    let stall = new_at.saturating_duration_since(old_at);
    let media_gap = known[first_new].1.pts as f64 - known[last_old].1.pts as f64;
    let lo = old_at.checked_sub(Duration::from_secs(1)).unwrap_or(old_at);
    let hi = new_at + Duration::from_secs(1);
    let max_gap_around = known
        .windows(2)
        .filter(|w| w[0].0.at >= lo && w[1].0.at <= hi)
        .map(|w| ms(w[1].0.at.saturating_duration_since(w[0].0.at)))
        .fold(0.0, f64::max);
    // Steady state: the old pod's messages after the first half second.
    let old: Vec<&(&Arrival, &SentFrame)> = known[..=last_old].iter().filter(|(_, f)| f.conn == 0).collect();
    let t0 = old
        .first()
        .map(|(a, _)| a.at + Duration::from_millis(500))
        .unwrap_or(old_at);
    let steady: Vec<&(&Arrival, &SentFrame)> = old.into_iter().filter(|(a, _)| a.at >= t0).collect();
    let gaps = |only_video: bool| -> Vec<f64> {
        let sel: Vec<Instant> = steady
            .iter()
            .filter(|(a, _)| !only_video || a.kind == Kind::Video)
            .map(|(a, _)| a.at)
            .collect();
        sel.windows(2)
            .map(|w| ms(w[1].saturating_duration_since(w[0])))
            .collect()
    };
    let start = log.arrivals.first().map(|a| a.at).unwrap_or(old_at);
    Ok(Handover {
        stream: report.stream.clone(),
        kind,
        stall_ms: ms(stall),
        media_gap_ms: media_gap,
        max_gap_around_ms: max_gap_around,
        steady_all: Stats::of(&gaps(false)),
        steady_video: Stats::of(&gaps(true)),
        publisher_gap_ms: report.max_switch_gap().map(ms),
        player_received: known.len(),
        sent: report.sent.len(),
        interleaved,
        player_reconnects: log.reconnects,
        player_events: log
            .events
            .iter()
            .map(|(at, e)| format!("{:+.3}s {e}", at.saturating_duration_since(start).as_secs_f64()))
            .collect(),
    })
}

async fn handover(opts: &Opts) -> Result<Json> {
    let reps = if opts.quick { 3 } else { 10 };
    let (_dir, origin, pods, balancer) = move_lab(opts).await?;
    println!(
        "{reps} moves per signal kind; publisher 2.5 Mbit/s video + 128 kbit/s audio, 30 fps, GOP 30, via the balancer; \
         drain propagation 300 ms; player attached to nginx at {}",
        origin.addr()
    );
    let mut moves: Vec<Move> = Vec::new();
    for kind in [SignalKind::GoAway, SignalKind::ReconnectRequest] {
        for rep in 0..reps {
            let stream = format!("ho-{}-{rep}", kind.label().replace('_', "-"));
            let (report, log) = one_move(&pods, &balancer, origin.addr(), &stream, kind).await?;
            moves.push((kind, report, log));
        }
    }
    relays_finished(&pods).await?;
    let record_dir = origin.record_dir();
    drop(origin); // nginx closes its recordings
    let reports: Vec<&PublisherReport> = moves.iter().map(|(_, r, _)| r).collect();
    let audits = audit_streams(&record_dir, &reports)?;
    let mut results = Vec::new();
    for (kind, report, log) in &moves {
        match analyse_handover(*kind, report, log) {
            Ok(h) => results.push(h),
            Err(err) => println!("{}: cannot measure the stall: {err:#}", report.stream),
        }
    }

    print_moves(&results, &audits);
    let mut per_kind = serde_json::Map::new();
    println!();
    for kind in [SignalKind::GoAway, SignalKind::ReconnectRequest] {
        let hs: Vec<&Handover> = results.iter().filter(|h| h.kind == kind).collect();
        let stall = Stats::of(&hs.iter().map(|h| h.stall_ms).collect::<Vec<_>>());
        let around = Stats::of(&hs.iter().map(|h| h.max_gap_around_ms).collect::<Vec<_>>());
        let extra = Stats::of(&hs.iter().map(|h| h.stall_ms - h.media_gap_ms).collect::<Vec<_>>());
        let steady_all: Vec<f64> = hs.iter().map(|h| h.steady_all.p50).collect();
        let steady_p99: Vec<f64> = hs.iter().map(|h| h.steady_all.p99).collect();
        let steady_video: Vec<f64> = hs.iter().map(|h| h.steady_video.p50).collect();
        let pub_gap = Stats::of(&hs.iter().filter_map(|h| h.publisher_gap_ms).collect::<Vec<_>>());
        println!("{:<18} stall at origin (ms)        {}", kind.label(), stall.text());
        println!("{:<18} stall minus media gap (ms)  {}", "", extra.text());
        println!("{:<18} largest gap ±1 s (ms)       {}", "", around.text());
        println!("{:<18} publisher switch gap (ms)   {}", "", pub_gap.text());
        println!(
            "{:<18} steady gap: all messages p50 {:.1} ms (p99 {:.1}), video p50 {:.1} ms",
            "",
            Stats::of(&steady_all).p50,
            Stats::of(&steady_p99).max,
            Stats::of(&steady_video).p50
        );
        per_kind.insert(
            kind.label().to_owned(),
            json!({
                "stall_ms": stall.json(),
                "stall_minus_media_gap_ms": extra.json(),
                "largest_gap_within_1s_ms": around.json(),
                "publisher_switch_gap_ms": pub_gap.json(),
                "steady_gap_all_p50_ms": Stats::of(&steady_all).p50,
                "steady_gap_all_p99_max_ms": Stats::of(&steady_p99).max,
                "steady_gap_video_p50_ms": Stats::of(&steady_video).p50,
            }),
        );
    }
    let all = Stats::of(&results.iter().map(|h| h.stall_ms).collect::<Vec<_>>());
    let lost: usize = audits.iter().map(|a| a.lost).sum();
    let lossless = audits.iter().filter(|a| a.lossless()).count();
    let reconnects: u32 = results.iter().map(|h| h.player_reconnects).sum();
    let interleaved: usize = results.iter().map(|h| h.interleaved).sum();
    println!("{:<18} stall at origin (ms)        {}", "all moves", all.text());
    println!(
        "messages lost: {lost} ({lossless}/{} streams lossless by the audit)",
        audits.len()
    );
    println!(
        "player: {} reconnect(s) (nginx {} players attached across the publisher switch); {interleaved} message(s) via the new pod before the old pod's last",
        reconnects,
        if reconnects == 0 { "kept" } else { "did not keep" }
    );
    for a in audits.iter().filter(|a| !a.lossless()) {
        println!("  AUDIT: {a}");
    }
    if let Some(h) = results.first() {
        println!("player events of {}: {}", h.stream, h.player_events.join(", "));
    }
    Ok(json!({
        "reps_per_kind": reps,
        "publisher": { "video_bitrate_bps": 2_500_000, "fps": 30, "gop": 30, "audio": true },
        "stall_ms": all.json(),
        "by_kind": per_kind,
        "messages_lost": lost,
        "audit": audit_json(&audits),
        "player_reconnects": reconnects,
        "interleaved_messages": interleaved,
        "moves": results.iter().map(Handover::json).collect::<Vec<_>>(),
    }))
}

/// An nginx-rtmp origin (recording into a temporary directory), two pods
/// relaying to it and a balancer in front of them.
async fn move_lab(opts: &Opts) -> Result<(tempfile::TempDir, Origin, [LocalPod; 2], Balancer)> {
    let dir = tempfile::tempdir()?;
    let origin = Origin::start(dir.path(), "127.0.0.1").context("starting the nginx-rtmp origin")?;
    let args = lab_args(opts, &origin.template(), "60s");
    let pods = [start_pod("pod-a", &args).await?, start_pod("pod-b", &args).await?];
    let balancer = Balancer::start(pods.iter().map(LocalPod::backend).collect()).await?;
    Ok((dir, origin, pods, balancer))
}

/// Waits until no relay of `pods` is running.
async fn relays_finished(pods: &[LocalPod]) -> Result<()> {
    for pod in pods {
        let r = pod.registry.clone();
        until("relays finished", Duration::from_secs(30), || r.relays_active() == 0).await?;
    }
    Ok(())
}

/// A player of `stream` at the origin, once it has asked to play.
async fn start_player(
    origin: SocketAddr,
    stream: &str,
    stop: &CancellationToken,
) -> Result<JoinHandle<Result<PlayerLog>>> {
    let (ready_tx, mut ready) = watch::channel(false);
    let task = tokio::spawn(player(origin, stream.to_owned(), stop.clone(), ready_tx));
    tokio::time::timeout(STEP, ready.wait_for(|r| *r))
        .await
        .context("player did not start")??;
    Ok(task)
}

/// One publisher through the balancer, moved once by draining its pod,
/// watched by a player at the origin.
async fn one_move(
    pods: &[LocalPod; 2],
    balancer: &Balancer,
    origin: SocketAddr,
    stream: &str,
    kind: SignalKind,
) -> Result<(PublisherReport, PlayerLog)> {
    let stop_player = CancellationToken::new();
    let player = start_player(origin, stream, &stop_player).await?;
    let stop = CancellationToken::new();
    let publisher = spawn_publisher(move_publisher(balancer, stream, kind), &stop)?;
    let p = publisher.progress.clone();
    until("2 s of media", Duration::from_secs(20), || {
        p.borrow().video_frames >= 60
    })
    .await?;
    let landed = pods
        .iter()
        .position(|pod| {
            pod.registry
                .connections()
                .iter()
                .any(|c| c.stream.as_deref() == Some(stream))
        })
        .ok_or_else(|| anyhow!("{stream} is on no pod"))?;
    let pod = &pods[landed];
    pod.drainer.start(DrainSpec {
        id: stream.to_owned(),
        deadline: Duration::from_secs(20),
        rate: 0.0,
        max_in_flight: 0,
        incapable: IncapablePolicy::Wait,
        redirects: vec![],
        propagation_delay: Duration::from_millis(300),
    })?;
    let p = publisher.progress.clone();
    until("the publisher moved", Duration::from_secs(20), || {
        p.borrow().connections >= 2
    })
    .await?;
    let reg = pod.registry.clone();
    until("the drained pod emptied", Duration::from_secs(30), || {
        reg.connection_count() == 0 && reg.relays_active() == 0
    })
    .await?;
    let p = publisher.progress.clone();
    let moved_at = p.borrow().video_frames;
    until("1 s on the new pod", Duration::from_secs(20), || {
        p.borrow().video_frames >= moved_at + 30
    })
    .await?;
    stop.cancel();
    let report = join_publisher(publisher).await?;
    pod.drainer.cancel().expect("a drain runs"); // serve again for the next move
    relays_finished(pods).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_player.cancel();
    let log = player.await.context("player panicked")??;
    if let Some(err) = &report.error {
        bail!("{stream}: publisher error: {err}");
    }
    Ok((report, log))
}

/// One line per move: its stall, the gaps around it and what the audit found.
fn print_moves(results: &[Handover], audits: &[AuditReport]) {
    println!(
        "\n{:<22} {:>9} {:>9} {:>10} {:>10} {:>11} {:>10} {:>9} {:>5}",
        "stream", "stall ms", "media ms", "max±1s ms", "steady p50", "steady v p99", "pub gap ms", "played", "lost"
    );
    for h in results {
        let lost = audits.iter().find(|a| a.stream == h.stream).map_or(0, |a| a.lost);
        println!(
            "{:<22} {:>9.1} {:>9.0} {:>10.1} {:>10.1} {:>11.1} {:>10} {:>4}/{:<4} {:>5}",
            h.stream,
            h.stall_ms,
            h.media_gap_ms,
            h.max_gap_around_ms,
            h.steady_all.p50,
            h.steady_video.p99,
            h.publisher_gap_ms.map_or("-".to_owned(), |g| format!("{g:.0}")),
            h.player_received,
            h.sent,
            lost
        );
    }
}

/// One publisher's move with what its player saw.
type Move = (SignalKind, PublisherReport, PlayerLog);

/// The publisher every move uses: 2.5 Mbit/s video at 30 fps, GOP 30, audio.
fn move_publisher(balancer: &Balancer, stream: &str, kind: SignalKind) -> PublisherConfig {
    PublisherConfig {
        go_away: kind == SignalKind::GoAway,
        reconnect: kind == SignalKind::ReconnectRequest,
        fps: 30,
        gop: 30,
        video_bitrate_bps: 2_500_000,
        ..PublisherConfig::new(format!("rtmp://{}/live/{stream}", balancer.addr))
    }
}

// ---------------------------------------------------------------------------
// Scenario 2: many moves at once.

/// Drain rate of the overlap scenario: the operator's default.
const OVERLAP_RATE: f64 = 50.0;

async fn overlap(opts: &Opts) -> Result<Json> {
    let reps = if opts.quick { 1 } else { 3 };
    let n = opts.moves;
    let (_dir, origin, pods, balancer) = move_lab(opts).await?;
    println!(
        "{reps} rounds of {n} capable publishers (even: Go Away, odd: Reconnect Request) on one pod, drained at \
         {OVERLAP_RATE}/s with propagation 300 ms; publisher 2.5 Mbit/s video + 128 kbit/s audio, 30 fps, GOP 30; \
         a player per stream attached to nginx at {}",
        origin.addr()
    );
    let mut rounds: Vec<Vec<Move>> = Vec::new();
    for round in 0..reps {
        rounds.push(overlapping_moves(&pods, &balancer, origin.addr(), round, n).await?);
    }
    let record_dir = origin.record_dir();
    drop(origin); // nginx closes its recordings
    let reports: Vec<&PublisherReport> = rounds.iter().flatten().map(|(_, r, _)| r).collect();
    let audits = audit_streams(&record_dir, &reports)?;
    let mut results = Vec::new();
    let mut per_round = Vec::new();
    for (round, moves) in rounds.iter().enumerate() {
        let mut stalls = Vec::new();
        for (kind, report, log) in moves {
            match analyse_handover(*kind, report, log) {
                Ok(h) => {
                    stalls.push(h.stall_ms);
                    results.push(h);
                }
                Err(err) => println!("{}: cannot measure the stall: {err:#}", report.stream),
            }
        }
        per_round.push((round, Stats::of(&stalls)));
    }
    print_moves(&results, &audits);
    println!();
    for (round, stall) in &per_round {
        println!("round {round:<12} stall at origin (ms)        {}", stall.text());
    }
    let all = Stats::of(&results.iter().map(|h| h.stall_ms).collect::<Vec<_>>());
    let extra = Stats::of(&results.iter().map(|h| h.stall_ms - h.media_gap_ms).collect::<Vec<_>>());
    let lost: usize = audits.iter().map(|a| a.lost).sum();
    let lossless = audits.iter().filter(|a| a.lossless()).count();
    println!("{:<18} stall at origin (ms)        {}", "all moves", all.text());
    println!("{:<18} stall minus media gap (ms)  {}", "", extra.text());
    println!(
        "messages lost: {lost} ({lossless}/{} streams lossless by the audit)",
        audits.len()
    );
    for a in audits.iter().filter(|a| !a.lossless()) {
        println!("  AUDIT: {a}");
    }
    Ok(json!({
        "rounds": reps,
        "moves_per_round": n,
        "drain_rate_per_s": OVERLAP_RATE,
        "publisher": { "video_bitrate_bps": 2_500_000, "fps": 30, "gop": 30, "audio": true },
        "stall_ms": all.json(),
        "stall_minus_media_gap_ms": extra.json(),
        "stall_ms_by_round": per_round.iter().map(|(_, s)| s.json()).collect::<Vec<_>>(),
        "messages_lost": lost,
        "audit": audit_json(&audits),
        "moves": results.iter().map(Handover::json).collect::<Vec<_>>(),
    }))
}

/// `n` publishers on pod A, each watched by a player at the origin; A
/// drains and all of them move to pod B, overlapping.
async fn overlapping_moves(
    pods: &[LocalPod; 2],
    balancer: &Balancer,
    origin: SocketAddr,
    round: usize,
    n: usize,
) -> Result<Vec<Move>> {
    let (a, b) = (&pods[0], &pods[1]);
    b.registry.set_serving(false); // everyone lands on pod A
    let stop_players = CancellationToken::new();
    let mut players = Vec::with_capacity(n);
    let mut publishers = Vec::with_capacity(n);
    let stop = CancellationToken::new();
    for i in 0..n {
        let stream = format!("ov-{round}-{i:02}");
        let kind = if i % 2 == 0 {
            SignalKind::GoAway
        } else {
            SignalKind::ReconnectRequest
        };
        players.push(start_player(origin, &stream, &stop_players).await?);
        publishers.push((kind, spawn_publisher(move_publisher(balancer, &stream, kind), &stop)?));
    }
    let progress: Vec<_> = publishers.iter().map(|(_, p)| p.progress.clone()).collect();
    until("2 s of media from every publisher", Duration::from_secs(60), || {
        progress.iter().all(|p| p.borrow().video_frames >= 60)
    })
    .await?;
    let on_a = a
        .registry
        .connections()
        .iter()
        .filter(|c| c.publishing_since.is_some())
        .count();
    if on_a != n {
        bail!("{on_a} of {n} publishers on pod A");
    }
    b.registry.set_serving(true);
    a.drainer.start(DrainSpec {
        id: format!("overlap-{round}"),
        deadline: Duration::from_secs(30),
        rate: OVERLAP_RATE,
        max_in_flight: 0,
        incapable: IncapablePolicy::Wait,
        redirects: vec![],
        propagation_delay: Duration::from_millis(300),
    })?;
    until("every publisher moved", Duration::from_secs(30), || {
        progress.iter().all(|p| p.borrow().connections >= 2)
    })
    .await?;
    let reg = a.registry.clone();
    until("the drained pod emptied", Duration::from_secs(30), || {
        reg.connection_count() == 0 && reg.relays_active() == 0
    })
    .await?;
    let moved_at: Vec<u64> = progress.iter().map(|p| p.borrow().video_frames).collect();
    until("1 s on the new pod", Duration::from_secs(20), || {
        progress
            .iter()
            .zip(&moved_at)
            .all(|(p, at)| p.borrow().video_frames >= at + 30)
    })
    .await?;
    stop.cancel();
    let mut reports = Vec::with_capacity(n);
    for (kind, p) in publishers {
        reports.push((kind, join_publisher(p).await?));
    }
    a.drainer.cancel().expect("a drain runs"); // serve again for the next round
    relays_finished(pods).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_players.cancel();
    let mut moves = Vec::with_capacity(n);
    for ((kind, report), player) in reports.into_iter().zip(players) {
        let log = player.await.context("player panicked")??;
        if let Some(err) = &report.error {
            bail!("{}: publisher error: {err}", report.stream);
        }
        moves.push((kind, report, log));
    }
    Ok(moves)
}

// ---------------------------------------------------------------------------
// Scenario 3: draining 100 publishers.

async fn drain100(opts: &Opts) -> Result<Json> {
    const PUBLISHERS: usize = 100;
    const RATE: f64 = 50.0;
    const PROPAGATION: Duration = Duration::from_secs(1);
    const FPS: u32 = 25;
    const GOP: u32 = 25;
    let dir = tempfile::tempdir()?;
    let origin = Origin::start(dir.path(), "127.0.0.1").context("starting the nginx-rtmp origin")?;
    let args = lab_args(opts, &origin.template(), "60s");
    let pods = [start_pod("pod-a", &args).await?, start_pod("pod-b", &args).await?];
    let (a, b) = (&pods[0], &pods[1]);
    b.registry.set_serving(false); // everyone lands on pod A
    let balancer = Balancer::start(pods.iter().map(LocalPod::backend).collect()).await?;
    println!(
        "{PUBLISHERS} capable publishers (even: Go Away, odd: Reconnect Request), 300 kbit/s video + 128 kbit/s audio, \
         {FPS} fps, GOP {GOP}, all on pod A; drain A at {RATE}/s, propagation {PROPAGATION:?}"
    );
    let stop = CancellationToken::new();
    let mut publishers = Vec::with_capacity(PUBLISHERS);
    for i in 0..PUBLISHERS {
        let cfg = PublisherConfig {
            go_away: i % 2 == 0,
            reconnect: i % 2 == 1,
            fps: FPS,
            gop: GOP,
            video_bitrate_bps: 300_000,
            width: 640,
            height: 360,
            ..PublisherConfig::new(format!("rtmp://{}/live/d100-{i:03}", balancer.addr))
        };
        publishers.push(spawn_publisher(cfg, &stop)?);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reg_a = a.registry.clone();
    let publishing = move || {
        reg_a
            .connections()
            .iter()
            .filter(|c| c.publishing_since.is_some())
            .count()
    };
    until("100 publishers on pod A", Duration::from_secs(60), || {
        publishing() == PUBLISHERS
    })
    .await?;
    b.registry.set_serving(true);
    tokio::time::sleep(if opts.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(4)
    })
    .await;

    let t0 = Instant::now();
    a.drainer.start(DrainSpec {
        id: "drain100".into(),
        deadline: Duration::from_secs(60),
        rate: RATE,
        max_in_flight: 0,
        incapable: IncapablePolicy::Disconnect,
        redirects: vec![],
        propagation_delay: PROPAGATION,
    })?;
    let mut marks: Vec<(&str, Option<Duration>)> = vec![
        ("signalling", None),
        ("first signal", None),
        ("all signalled", None),
        ("publishers gone", None),
        ("drained", None),
    ];
    let final_phase = loop {
        let st = a.drainer.status().ok_or_else(|| anyhow!("no drain status"))?;
        let now = t0.elapsed();
        let hit = [
            st.phase != Phase::Propagating,
            st.signalled > 0,
            st.signalled >= PUBLISHERS as u64,
            st.remaining == 0,
            matches!(st.phase, Phase::Drained | Phase::TimedOut),
        ];
        for (mark, h) in marks.iter_mut().zip(hit) {
            if h && mark.1.is_none() {
                mark.1 = Some(now);
            }
        }
        if matches!(st.phase, Phase::Drained | Phase::TimedOut | Phase::Cancelled) || now > Duration::from_secs(90) {
            break st.phase;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let drain_time = marks[4].1;
    // Stream a second more on pod B, then stop everyone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let mut reports = Vec::with_capacity(PUBLISHERS);
    for p in publishers {
        reports.push(join_publisher(p).await?);
    }
    relays_finished(&pods).await?;
    let record_dir = origin.record_dir();
    drop(origin);
    let audits = audit_streams(&record_dir, &reports.iter().collect::<Vec<_>>())?;

    let model = PROPAGATION.as_secs_f64() + f64::from(GOP) / f64::from(FPS) + PUBLISHERS as f64 / RATE;
    println!();
    for (name, at) in &marks {
        println!(
            "  {:<16} {}",
            name,
            at.map_or("never".to_owned(), |d| format!("{:>7.3} s", d.as_secs_f64()))
        );
    }
    println!("final phase: {}", final_phase.label());
    println!(
        "drain time {}   model: propagation {:.1} s + one GOP {:.1} s + {} publishers / {} per s = {:.1} s",
        drain_time.map_or("-".to_owned(), |d| format!("{:.3} s", d.as_secs_f64())),
        PROPAGATION.as_secs_f64(),
        f64::from(GOP) / f64::from(FPS),
        PUBLISHERS,
        RATE,
        model
    );
    // The drain engine's token bucket starts full: one second of signals goes out at once.
    let model_burst =
        PROPAGATION.as_secs_f64() + f64::from(GOP) / f64::from(FPS) + (PUBLISHERS as f64 - RATE).max(0.0) / RATE;
    println!(
        "{:>20} with the engine's initial burst of {RATE} signals: {:.1} s + {:.1} s + ({PUBLISHERS} - {RATE}) / {RATE} = {model_burst:.1} s",
        "",
        PROPAGATION.as_secs_f64(),
        f64::from(GOP) / f64::from(FPS)
    );
    let lost: usize = audits.iter().map(|a| a.lost).sum();
    let lossless = audits.iter().filter(|a| a.lossless()).count();
    let signals = |k: SignalKind| {
        reports
            .iter()
            .filter(|r| r.signals.iter().any(|(s, _)| *s == k))
            .count()
    };
    let unplanned: u32 = reports.iter().map(|r| r.unplanned_reconnects).sum();
    let errors: Vec<String> = reports
        .iter()
        .filter_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.stream)))
        .collect();
    let gaps = Stats::of(
        &reports
            .iter()
            .filter_map(|r| r.max_switch_gap().map(ms))
            .collect::<Vec<_>>(),
    );
    println!(
        "signals: {} go_away, {} reconnect_request; unplanned reconnects {unplanned}; publisher errors {}",
        signals(SignalKind::GoAway),
        signals(SignalKind::ReconnectRequest),
        errors.len()
    );
    println!("publisher switch gap (ms): {}", gaps.text());
    println!(
        "messages lost: {lost} across {} streams ({lossless} lossless by the audit)",
        audits.len()
    );
    for a in audits.iter().filter(|a| !a.lossless()).take(10) {
        println!("  AUDIT: {a}");
    }
    for e in errors.iter().take(10) {
        println!("  ERROR: {e}");
    }
    Ok(json!({
        "publishers": PUBLISHERS,
        "rate_per_s": RATE,
        "propagation_s": PROPAGATION.as_secs_f64(),
        "gop_s": f64::from(GOP) / f64::from(FPS),
        "drain_time_s": drain_time.map(secs),
        "model_s": model,
        "model_with_initial_burst_s": model_burst,
        "final_phase": final_phase.label(),
        "marks_s": marks.iter().map(|(n, d)| (n.to_string(), json!(d.map(secs)))).collect::<serde_json::Map<_, _>>(),
        "signals": { "go_away": signals(SignalKind::GoAway), "reconnect_request": signals(SignalKind::ReconnectRequest) },
        "unplanned_reconnects": unplanned,
        "publisher_errors": errors,
        "publisher_switch_gap_ms": gaps.json(),
        "messages_lost": lost,
        "audit": audit_json(&audits),
    }))
}

// ---------------------------------------------------------------------------
// Scenario 4: relay throughput, ingest-pod against nginx-rtmp push.

/// An nginx with the RTMP module and a configuration of ours; stopped on drop.
/// (The lab's [`Origin`] records everything; these need `push` and no recording.)
struct Nginx {
    child: Child,
    addr: SocketAddr,
    /// HTTP address serving `rtmp_stat` (byte counters of the RTMP server).
    stat: SocketAddr,
}

impl Nginx {
    /// Starts nginx (one worker) with `application live { <app> }` on a free port.
    fn start(dir: &Path, app: &str) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| anyhow!("nginx is not installed; run .ci/setup"))?;
        if !Path::new(RTMP_MODULE).exists() {
            bail!("{RTMP_MODULE} is missing; run .ci/setup");
        }
        std::fs::create_dir_all(dir.join("tmp"))?;
        let addr = origin::free_port("127.0.0.1")?;
        let stat = origin::free_port("127.0.0.1")?;
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let conf = format!(
            r#"load_module {RTMP_MODULE};
daemon off;
master_process on;
worker_processes 1;
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    server {{
        listen {stat};
        location /stat {{ rtmp_stat all; }}
    }}
}}
rtmp {{
    access_log off;
    server {{
        listen {addr};
        chunk_size 4096;
        application live {{
            live on;
            {app}
        }}
    }}
}}
"#,
            user = if root { "user root;\n" } else { "" },
            dir = dir.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir.join("tmp"))
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let nginx = Self { child, addr, stat };
        wait_listening(addr, &dir.join("error.log"))?;
        Ok(nginx)
    }

    /// Bytes the RTMP server has received and sent, from `rtmp_stat`.
    async fn bytes(&self) -> Result<(u64, u64)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(self.stat).await?;
        tcp.write_all(b"GET /stat HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut body = String::new();
        tokio::time::timeout(STEP, tcp.read_to_string(&mut body))
            .await
            .context("rtmp_stat")??;
        let field = |name: &str| -> Result<u64> {
            let open = format!("<{name}>");
            let start = body.find(&open).ok_or_else(|| anyhow!("no <{name}> in rtmp_stat"))? + open.len();
            let end = body[start..].find('<').ok_or_else(|| anyhow!("bad rtmp_stat"))?;
            Ok(body[start..start + end].trim().parse()?)
        };
        Ok((field("bytes_in")?, field("bytes_out")?))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown of master and workers; then make sure.
        let workers = children_of(self.child.id());
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            if Path::new(&format!("/proc/{w}")).exists() {
                let _ = Command::new("kill").arg("-KILL").arg(w.to_string()).status();
            }
        }
    }
}

/// A relay in a child process of its own (the release ingest-pod binary,
/// or the forwarder), listening at `addr`; killed on drop.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
}

impl RelayProcess {
    fn ingest_pod(dir: &Path, upstream: &str, extra: &[String]) -> Result<Self> {
        // Cargo builds the package's binaries (with the bench profile, i.e. release) for its benches.
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ingest-pod"));
        let addr = origin::free_port("127.0.0.1")?;
        cmd.args([
            "--rtmp-listen",
            &addr.to_string(),
            "--http-listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", upstream, "--pod-name", "bench"])
        .args(extra);
        Self::spawn(cmd, addr, &dir.join("ingest-pod.log"))
    }

    /// This executable as the forward row's relay (see [`forward_main`]).
    fn forward(dir: &Path, upstream: SocketAddr, interval: Duration) -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe().context("locating the bench executable")?);
        let addr = origin::free_port("127.0.0.1")?;
        cmd.args([
            FORWARD_ARG,
            &addr.to_string(),
            &upstream.to_string(),
            // Microseconds: exact, and read back by the same parser as the flag.
            &format!("{}us", interval.as_micros()),
        ]);
        Self::spawn(cmd, addr, &dir.join("forward.log"))
    }

    fn spawn(mut cmd: Command, addr: SocketAddr, log: &Path) -> Result<Self> {
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
        let relay = Self { child, addr };
        wait_listening(addr, log)?;
        Ok(relay)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(addr: SocketAddr, log: &Path) -> Result<()> {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            bail!("nothing listens on {addr} after 10 s; {}:\n{tail}", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Field `i` (0 = the state, field 3 of proc(5)) after the command name of /proc/<pid>/stat.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// Argument that makes this executable a spinner (see [`Spinners`]).
const SPIN_ARG: &str = "__spin";

/// Spins until killed.
fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

/// One lowest-priority spinner per CPU, so no CPU ever idles: per-MB costs
/// as on a node busy with other work, without the cost of waking idle CPUs
/// (large in a virtual machine). Nice 19 takes only what others leave.
struct Spinners(Vec<Child>);

impl Spinners {
    fn start() -> Result<Self> {
        let exe = std::env::current_exe().context("locating the bench executable")?;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let mut spinners = Self(Vec::with_capacity(cpus));
        for cpu in 0..cpus {
            let child = Command::new("nice")
                .args(["-n", "19"])
                .arg(&exe)
                .arg(SPIN_ARG)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a spinner under nice (coreutils)")?;
            let pid = child.id();
            spinners.0.push(child);
            pin(pid, &cpu.to_string())?;
        }
        Ok(spinners)
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Binds every thread of process `pid` to the CPUs of `list` (`taskset`).
fn pin(pid: u32, list: &str) -> Result<()> {
    let out = Command::new("taskset")
        .args(["--all-tasks", "--cpu-list", "--pid", list, &pid.to_string()])
        .output()
        .context("running taskset (util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset --cpu-list {list} for process {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_fields(p).and_then(|f| f.get(1).copied()) == Some(u64::from(pid)))
        .collect()
}

fn status_kb(pid: u32, field: &str, file: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU and memory of a set of processes at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    cpu_ticks: u64,
    rss_kb: u64,
    pss_kb: u64,
}

fn sample(pids: &[u32]) -> ProcSample {
    let mut s = ProcSample::default();
    for &pid in pids {
        if let Some(f) = stat_fields(pid) {
            // utime and stime: fields 14 and 15 of proc(5).
            s.cpu_ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        }
        s.rss_kb += status_kb(pid, "VmRSS:", "status");
        s.pss_kb += status_kb(pid, "Pss:", "smaps_rollup");
    }
    s
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    IngestPod,
    NginxPush,
    /// Publishers to the origin through a byte-for-byte TCP forwarder (see
    /// [`forward_main`]): the CPU floor of a relay with ingest-pod's syscalls.
    Forward,
    /// Publishers straight to the origin: the latency floor a relay adds to.
    Direct,
}

impl Side {
    const ALL: [Side; 4] = [Side::IngestPod, Side::NginxPush, Side::Forward, Side::Direct];

    /// The name `--relays` takes.
    fn name(self) -> &'static str {
        match self {
            Side::IngestPod => "ingest-pod",
            Side::NginxPush => "nginx",
            Side::Forward => "forward",
            Side::Direct => "direct",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Side::IngestPod => "ingest-pod",
            Side::NginxPush => "nginx-rtmp push",
            Side::Forward => "tcp forward floor",
            Side::Direct => "direct (no relay)",
        }
    }
}

/// Streams of a throughput run that a player at the origin watches.
const WATCHED_STREAMS: usize = 20;
/// Arrivals at a player closer than this to the previous one belong to the same burst.
const BURST_GAP_MS: f64 = 1.0;

/// What players at the origin saw of the frames published in the window.
#[derive(Debug, Clone, Default)]
struct Delivery {
    /// Streams watched.
    streams: usize,
    /// Publisher write → player arrival, per frame (ms).
    latency: Stats,
    /// Gaps between consecutive arrivals of a stream (ms).
    gaps: Stats,
    /// Frames and kilobytes per burst at a player.
    burst_frames: Stats,
    burst_kb: Stats,
    /// Frames published in the window on the watched streams that no player saw.
    unseen: usize,
}

impl Delivery {
    fn of(watched: &[(&PublisherReport, PlayerLog)], in_window: impl Fn(&SentFrame) -> bool) -> Self {
        let (mut latency, mut gaps, mut frames, mut kb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut unseen = 0;
        for (report, log) in watched {
            let sent: HashMap<&str, &SentFrame> = report
                .sent
                .iter()
                .filter(|f| in_window(f))
                .map(|f| (f.hash.as_str(), f))
                .collect();
            let seen: Vec<(&Arrival, &SentFrame)> = log
                .arrivals
                .iter()
                .filter_map(|a| sent.get(a.hash.as_str()).map(|f| (a, *f)))
                .collect();
            unseen += sent.len().saturating_sub(seen.len());
            latency.extend(
                seen.iter()
                    .map(|(a, f)| a.wall_us.saturating_sub(f.sent_at_us) as f64 / 1000.0),
            );
            let mut burst = (0usize, 0usize);
            for (i, (a, _)) in seen.iter().enumerate() {
                if i > 0 {
                    let gap = ms(a.at.saturating_duration_since(seen[i - 1].0.at));
                    gaps.push(gap);
                    if gap >= BURST_GAP_MS {
                        frames.push(burst.0 as f64);
                        kb.push(burst.1 as f64 / 1024.0);
                        burst = (0, 0);
                    }
                }
                burst = (burst.0 + 1, burst.1 + a.size);
            }
            if burst.0 > 0 {
                frames.push(burst.0 as f64);
                kb.push(burst.1 as f64 / 1024.0);
            }
        }
        Self {
            streams: watched.len(),
            latency: Stats::of(&latency),
            gaps: Stats::of(&gaps),
            burst_frames: Stats::of(&frames),
            burst_kb: Stats::of(&kb),
            unseen,
        }
    }

    fn json(&self) -> Json {
        json!({
            "streams_watched": self.streams,
            "latency_ms": self.latency.json(),
            "arrival_gap_ms": self.gaps.json(),
            "burst_frames": self.burst_frames.json(),
            "burst_kb": self.burst_kb.json(),
            "frames_unseen": self.unseen,
        })
    }
}

/// One throughput measurement.
#[derive(Debug, Clone)]
struct Throughput {
    side: Side,
    publishers: usize,
    window_s: f64,
    cpu_s: f64,
    /// Bytes the origin received in the window (what was relayed, with RTMP framing).
    relayed_mb: f64,
    /// Audio/video payload the publishers wrote in the window.
    published_mb: f64,
    rss_base_mb: f64,
    rss_mean_mb: f64,
    rss_max_mb: f64,
    pss_mean_mb: f64,
    /// Largest delay of a frame behind its schedule at the publisher in the window.
    max_lag_ms: f64,
    publisher_errors: usize,
    unplanned_reconnects: u32,
    delivery: Delivery,
}

impl Throughput {
    fn cpu_per_mb(&self) -> f64 {
        if self.relayed_mb > 0.0 {
            self.cpu_s / self.relayed_mb
        } else {
            f64::NAN
        }
    }

    fn rss_per_publisher_kb(&self) -> f64 {
        (self.rss_mean_mb - self.rss_base_mb) * 1024.0 / self.publishers as f64
    }

    fn total_rss_per_publisher_kb(&self) -> f64 {
        self.rss_mean_mb * 1024.0 / self.publishers as f64
    }

    fn json(&self) -> Json {
        json!({
            "side": self.side.label(),
            "publishers": self.publishers,
            "window_s": self.window_s,
            "cpu_s": round3(self.cpu_s),
            "cpu_util_percent": round3(100.0 * self.cpu_s / self.window_s),
            "relayed_mb": round3(self.relayed_mb),
            "published_mb": round3(self.published_mb),
            "cpu_s_per_relayed_mb": round3(self.cpu_per_mb() * 1000.0) / 1000.0,
            "rss_baseline_mb": round3(self.rss_base_mb),
            "rss_mean_mb": round3(self.rss_mean_mb),
            "rss_max_mb": round3(self.rss_max_mb),
            "pss_mean_mb": round3(self.pss_mean_mb),
            "rss_per_publisher_kb_over_baseline": round3(self.rss_per_publisher_kb()),
            "rss_per_publisher_kb_total": round3(self.total_rss_per_publisher_kb()),
            "max_publisher_lag_ms": self.max_lag_ms,
            "publisher_errors": self.publisher_errors,
            "unplanned_reconnects": self.unplanned_reconnects,
            "delivery_at_origin": self.delivery.json(),
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn throughput(opts: &Opts) -> Result<Json> {
    let warmup = if opts.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(5)
    };
    let hz = clock_ticks();
    println!(
        "publishers: 2.5 Mbit/s video + 128 kbit/s audio, 30 fps, GOP 30, in this process; relay: one ingest-pod process \
         ({}), nginx-rtmp (1 worker, `push`) or a TCP forwarder (this executable, {}), all to an nginx-rtmp origin; \
         warm-up {warmup:?}, window {:?}",
        env!("CARGO_BIN_EXE_ingest-pod"),
        forward_mode(opts.forward_interval),
        opts.window
    );
    let _spinners = if opts.no_idle {
        let spinners = Spinners::start()?;
        println!(
            "no idle CPU: a spinner at nice 19 on each of the {} CPUs takes what the measured processes leave",
            spinners.0.len()
        );
        Some(spinners)
    } else {
        None
    };
    if opts.relay_cpus.is_some() || opts.load_cpus.is_some() {
        let all = "any CPU".to_owned();
        println!(
            "CPUs: relay on {}, publishers, players and origin on {}",
            opts.relay_cpus.as_ref().unwrap_or(&all),
            opts.load_cpus.as_ref().unwrap_or(&all)
        );
    }
    let mut rows = Vec::new();
    for &n in &opts.publishers {
        for &side in &opts.relays {
            let row = measure(opts, side, n, warmup, hz)
                .await
                .with_context(|| format!("{} with {n} publishers", side.label()))?;
            println!(
                "  {:<16} {:>3} publishers: {:.2} CPU s in {:.0} s, {:.1} MB relayed → {:.4} CPU s/MB; RSS {:.1} MB ({:.0} kB/publisher over idle {:.1} MB)",
                side.label(),
                n,
                row.cpu_s,
                row.window_s,
                row.relayed_mb,
                row.cpu_per_mb(),
                row.rss_mean_mb,
                row.rss_per_publisher_kb(),
                row.rss_base_mb
            );
            rows.push(row);
        }
    }

    println!(
        "\n{:<18} {:>4} {:>8} {:>7} {:>9} {:>9} {:>11} {:>8} {:>8} {:>9} {:>9} {:>8} {:>6}",
        "relay",
        "pubs",
        "CPU s",
        "CPU %",
        "relay MB",
        "pub MB",
        "CPU s/MB",
        "RSS MB",
        "PSS MB",
        "kB/pub+",
        "kB/pub",
        "lag ms",
        "errors"
    );
    for r in &rows {
        println!(
            "{:<18} {:>4} {:>8.2} {:>7.1} {:>9.1} {:>9.1} {:>11.5} {:>8.1} {:>8.1} {:>9.0} {:>9.0} {:>8.0} {:>6}",
            r.side.label(),
            r.publishers,
            r.cpu_s,
            100.0 * r.cpu_s / r.window_s,
            r.relayed_mb,
            r.published_mb,
            r.cpu_per_mb(),
            r.rss_mean_mb,
            r.pss_mean_mb,
            r.rss_per_publisher_kb(),
            r.total_rss_per_publisher_kb(),
            r.max_lag_ms,
            r.publisher_errors + r.unplanned_reconnects as usize
        );
    }
    println!(
        "(kB/pub+: RSS above the idle process per publisher; kB/pub: whole RSS per publisher; lag: worst frame delay at the publishers)"
    );
    println!(
        "\nDelivery at the origin (up to {WATCHED_STREAMS} streams per run watched by players at the origin; frames published in the window):"
    );
    println!(
        "{:<18} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>10} {:>7}",
        "relay",
        "pubs",
        "lat p50",
        "lat p99",
        "lat max",
        "gap p50",
        "gap p99",
        "burst fr 50",
        "burst fr 99",
        "burst kB99",
        "unseen"
    );
    for r in &rows {
        let d = &r.delivery;
        println!(
            "{:<18} {:>4} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.0} {:>11.0} {:>10.1} {:>7}",
            r.side.label(),
            r.publishers,
            d.latency.p50,
            d.latency.p99,
            d.latency.max,
            d.gaps.p50,
            d.gaps.p99,
            d.burst_frames.p50,
            d.burst_frames.p99,
            d.burst_kb.p99,
            d.unseen
        );
    }
    println!(
        "(lat: publisher write → player at the origin, ms, includes the origin's own hop (see the direct row); gap: between \
         consecutive arrivals of a stream, ms; burst: arrivals less than {BURST_GAP_MS} ms apart)"
    );
    let mut ratios = Vec::new();
    println!("\ningest-pod ÷ nginx-rtmp (target: CPU per MB ≤ 0.5, memory per publisher ≤ 1.0):");
    for &n in &opts.publishers {
        let find = |s: Side| rows.iter().find(|r| r.side == s && r.publishers == n);
        let (Some(i), Some(x)) = (find(Side::IngestPod), find(Side::NginxPush)) else {
            continue;
        };
        let cpu = i.cpu_per_mb() / x.cpu_per_mb();
        let mem = i.rss_per_publisher_kb() / x.rss_per_publisher_kb();
        let mem_total = i.total_rss_per_publisher_kb() / x.total_rss_per_publisher_kb();
        // Added latency: over the direct path's, p99 against p99.
        let floor = find(Side::Direct).map_or(0.0, |d| d.delivery.latency.p99);
        let added = i.delivery.latency.p99 - floor;
        let added_nginx = x.delivery.latency.p99 - floor;
        println!(
            "  {n:>3} publishers: CPU/MB {cpu:.2} ({}), RSS/publisher over idle {mem:.2} ({}), whole RSS/publisher {mem_total:.2}, \
             latency p99 over the direct path {added:.1} ms ({}; nginx-rtmp {added_nginx:.1} ms)",
            if cpu <= 0.5 { "meets" } else { "misses" },
            if mem <= 1.0 { "meets" } else { "misses" },
            if added <= 10.0 { "meets ≤ 10" } else { "misses ≤ 10" },
        );
        ratios.push(json!({
            "publishers": n,
            "cpu_per_mb_ratio": round3(cpu),
            "rss_per_publisher_ratio": round3(mem),
            "whole_rss_per_publisher_ratio": round3(mem_total),
            "cpu_target_met": cpu <= 0.5,
            "memory_target_met": mem <= 1.0,
            "added_latency_p99_ms": round3(added),
            "nginx_added_latency_p99_ms": round3(added_nginx),
            "latency_target_met": added <= 10.0,
        }));
    }
    let floor_ratios = floor_ratios(opts, &rows);
    let syscall_ns = syscall_round_trip_ns();
    println!(
        "a system call's round trip on this machine (getpid): {syscall_ns:.0} ns, what batching submissions (io_uring) \
         could save per read or write"
    );
    Ok(json!({
        "window_s": opts.window.as_secs_f64(),
        "warmup_s": warmup.as_secs_f64(),
        "forward_interval_ms": opts.relays.contains(&Side::Forward).then(|| ms(opts.forward_interval)),
        "relay_cpus": opts.relay_cpus,
        "no_idle": opts.no_idle,
        "load_cpus": opts.load_cpus,
        "rows": rows.iter().map(Throughput::json).collect::<Vec<_>>(),
        "ratios": ratios,
        "floor_ratios": floor_ratios,
        "syscall_round_trip_ns": syscall_ns.round(),
    }))
}

fn forward_mode(interval: Duration) -> String {
    if interval.is_zero() {
        "reading per packet".to_owned()
    } else {
        format!("reading on a {interval:?} clock")
    }
}

/// Prints and returns the forward row's CPU per MB against nginx-rtmp's,
/// for each publisher count where both ran.
fn floor_ratios(opts: &Opts, rows: &[Throughput]) -> Vec<Json> {
    let mut out = Vec::new();
    for &n in &opts.publishers {
        let find = |s: Side| rows.iter().find(|r| r.side == s && r.publishers == n);
        let (Some(f), Some(x)) = (find(Side::Forward), find(Side::NginxPush)) else {
            continue;
        };
        if out.is_empty() {
            println!(
                "\ntcp forward floor ({}) ÷ nginx-rtmp: what the kernel alone costs a relay that reads and writes this way",
                forward_mode(opts.forward_interval)
            );
        }
        let cpu = f.cpu_per_mb() / x.cpu_per_mb();
        println!("  {n:>3} publishers: CPU/MB {cpu:.2}");
        out.push(json!({ "publishers": n, "cpu_per_mb_ratio": round3(cpu) }));
    }
    out
}

/// Mean time of the cheapest system call, getpid (not cached by glibc),
/// over a million calls: the entry and exit every read and write pays.
fn syscall_round_trip_ns() -> f64 {
    const CALLS: u32 = 1_000_000;
    let start = Instant::now();
    for _ in 0..CALLS {
        std::hint::black_box(std::process::id());
    }
    start.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

/// Runs `n` publishers through one relay for warm-up + window and samples it.
async fn measure(opts: &Opts, side: Side, n: usize, warmup: Duration, hz: f64) -> Result<Throughput> {
    let window = opts.window;
    let dir = tempfile::tempdir()?;
    let sink = Nginx::start(&dir.path().join("origin"), "")?;
    let upstream = format!("rtmp://{}/live", sink.addr);
    let (relay, nginx) = match side {
        Side::IngestPod => (
            Some(RelayProcess::ingest_pod(
                dir.path(),
                &format!("{upstream}/{{stream}}"),
                &opts.pod_args,
            )?),
            None,
        ),
        Side::NginxPush => (
            None,
            Some(Nginx::start(&dir.path().join("relay"), &format!("push {upstream};"))?),
        ),
        // Each publisher's own session reaches the origin, as in the direct row.
        Side::Forward => (
            Some(RelayProcess::forward(dir.path(), sink.addr, opts.forward_interval)?),
            None,
        ),
        Side::Direct => (None, None),
    };
    let (addr, pids): (SocketAddr, Box<dyn Fn() -> Vec<u32>>) = match (&relay, &nginx) {
        (Some(p), _) => {
            let pid = p.child.id();
            (p.addr, Box::new(move || vec![pid]))
        }
        (_, Some(x)) => {
            let master = x.child.id();
            (
                x.addr,
                Box::new(move || {
                    let mut v = vec![master];
                    v.extend(children_of(master));
                    v
                }),
            )
        }
        _ => (sink.addr, Box::new(Vec::new)),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Some(cpus) = &opts.relay_cpus {
        for pid in pids() {
            pin(pid, cpus)?;
        }
    }
    let base = sample(&pids());
    // Players at the origin, attached before their publishers start.
    let stop_players = CancellationToken::new();
    let mut players = Vec::new();
    for i in (0..n).step_by(n.div_ceil(WATCHED_STREAMS).max(1)) {
        let (ready_tx, mut ready) = watch::channel(false);
        let task = tokio::spawn(player(sink.addr, format!("tp-{i:03}"), stop_players.clone(), ready_tx));
        tokio::time::timeout(STEP, ready.wait_for(|r| *r))
            .await
            .context("player did not start")??;
        players.push((i, task));
    }
    let stop = CancellationToken::new();
    let mut publishers = Vec::with_capacity(n);
    let stagger = Duration::from_millis(1000 / n.max(1) as u64).min(Duration::from_millis(50));
    for i in 0..n {
        let cfg = PublisherConfig {
            go_away: false,
            reconnect: false,
            fps: 30,
            gop: 30,
            video_bitrate_bps: 2_500_000,
            ..PublisherConfig::new(format!("rtmp://{addr}/live/tp-{i:03}"))
        };
        publishers.push(spawn_publisher(cfg, &stop)?);
        tokio::time::sleep(stagger).await;
    }
    until("every publisher streaming", Duration::from_secs(30), || {
        publishers.iter().all(|p| p.progress.borrow().frames > 0)
    })
    .await?;
    tokio::time::sleep(warmup).await;
    let (k0, _) = sink.bytes().await?;
    let (s0, w0, t0) = (sample(&pids()), unix_ms(), Instant::now());
    let mut rss = Vec::new();
    let mut pss = Vec::new();
    while t0.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1).min(window.saturating_sub(t0.elapsed()))).await;
        let s = sample(&pids());
        rss.push(s.rss_kb as f64 / 1024.0);
        pss.push(s.pss_kb as f64 / 1024.0);
    }
    let (s1, w1, elapsed) = (sample(&pids()), unix_ms(), t0.elapsed());
    let (k1, _) = sink.bytes().await?;
    stop.cancel();
    // Frames of the window still on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_players.cancel();
    let mut logs = HashMap::new();
    for (i, task) in players {
        logs.insert(format!("tp-{i:03}"), task.await.context("player panicked")??);
    }
    let mut reports = Vec::with_capacity(n);
    let mut errors = 0;
    for p in publishers {
        match join_publisher(p).await {
            Ok(r) => {
                errors += usize::from(r.error.is_some());
                reports.push(r);
            }
            Err(err) => {
                println!("    publisher failed: {err:#}");
                errors += 1;
            }
        }
    }
    drop((relay, nginx, sink));
    let mb = |b: u64| b as f64 / 1e6;
    let in_window = |f: &&SentFrame| f.sent_at_ms >= w0 && f.sent_at_ms < w1;
    let watched: Vec<(&PublisherReport, PlayerLog)> = reports
        .iter()
        .filter_map(|r| logs.remove(&r.stream).map(|log| (r, log)))
        .collect();
    let delivery = Delivery::of(&watched, |f| in_window(&f));
    let published: u64 = reports
        .iter()
        .flat_map(|r| r.sent.iter().filter(in_window))
        .map(|f| f.size as u64)
        .sum();
    // Lag: how far behind its schedule a frame went out, relative to the stream's best.
    let max_lag = reports
        .iter()
        .filter_map(|r| {
            let skew: Vec<i64> = r.sent.iter().map(|f| f.sent_at_ms as i64 - f.pts as i64).collect();
            let best = *skew.iter().min()?;
            let worst = r
                .sent
                .iter()
                .zip(&skew)
                .filter(|(f, _)| in_window(f))
                .map(|(_, s)| *s)
                .max()?;
            Some((worst - best) as f64)
        })
        .fold(0.0, f64::max);
    Ok(Throughput {
        side,
        publishers: n,
        window_s: round3(elapsed.as_secs_f64()),
        cpu_s: (s1.cpu_ticks - s0.cpu_ticks) as f64 / hz,
        relayed_mb: mb(k1.saturating_sub(k0)),
        published_mb: mb(published),
        rss_base_mb: base.rss_kb as f64 / 1024.0,
        rss_mean_mb: rss.iter().sum::<f64>() / rss.len().max(1) as f64,
        rss_max_mb: rss.iter().copied().fold(0.0, f64::max),
        pss_mean_mb: pss.iter().sum::<f64>() / pss.len().max(1) as f64,
        max_lag_ms: max_lag,
        publisher_errors: errors,
        unplanned_reconnects: reports.iter().map(|r| r.unplanned_reconnects).sum(),
        delivery,
    })
}

// ---------------------------------------------------------------------------
// The forward row's relay: this executable as a byte-for-byte TCP forwarder.

/// First argument that makes this executable the forwarder instead of the
/// bench: `__forward LISTEN_ADDR UPSTREAM_ADDR INTERVAL` (see [`RelayProcess::forward`]).
const FORWARD_ARG: &str = "__forward";
/// Output held for a socket whose peer does not keep up; above it the
/// forwarder stops reading the other side (and TCP slows that sender down).
const FORWARD_PENDING_LIMIT: usize = 1024 * 1024;
/// Longest wait for a connection to the upstream.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const LISTENER: mio::Token = mio::Token(0);

/// The forwarder's `main`: accepts on LISTEN_ADDR, opens one connection to
/// UPSTREAM_ADDR per accepted one and copies bytes both ways, on one thread,
/// with ingest-pod's syscall pattern and none of its RTMP work. INTERVAL as
/// ingest-pod's `--media-read-interval`: `0` serves each socket when it
/// becomes readable; otherwise it sleeps the interval, looks at the epoll
/// set without blocking and serves the sockets that received something
/// since: one read each (another while reads fill the buffer), one write.
fn forward_main(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut next = |what: &str| args.next().ok_or_else(|| anyhow!("{FORWARD_ARG} needs {what}"));
    let listen: SocketAddr = next("LISTEN_ADDR")?.parse().context("LISTEN_ADDR")?;
    let upstream: SocketAddr = next("UPSTREAM_ADDR")?.parse().context("UPSTREAM_ADDR")?;
    let interval = ingest_runtime::parse_duration(&next("INTERVAL")?).map_err(|e| anyhow!("INTERVAL: {e}"))?;
    Forwarder::bind(listen, upstream)?.run(interval)
}

/// One socket of a forwarded connection.
struct End {
    stream: mio::net::TcpStream,
    /// The socket may hold unread bytes: an event came, the last read filled
    /// the buffer, or reading stopped for the other end's backlog.
    more: bool,
    /// The peer closed or the socket failed: read until a read says which,
    /// however short the reads (no further event announces it).
    hup: bool,
    /// Read from the other end, not yet taken by this socket.
    pending: Vec<u8>,
}

/// An accepted connection (end 0) and its connection to the upstream (end 1).
struct Pair {
    ends: [End; 2],
    /// The end that closed: the other follows once its pending bytes are out.
    closed: Option<usize>,
}

struct Forwarder {
    poll: mio::Poll,
    listener: mio::net::TcpListener,
    upstream: SocketAddr,
    /// By id; the tokens of a pair's ends are `2 * id` and `2 * id + 1`.
    pairs: HashMap<usize, Pair>,
    /// Ids are never reused: a late event of a closed pair finds nothing.
    next_id: usize,
    /// The one read buffer, of ingest-pod's clocked read size.
    buf: Vec<u8>,
}

fn end_token(id: usize, end: usize) -> mio::Token {
    mio::Token(2 * id + end)
}

impl Forwarder {
    fn bind(listen: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        let poll = mio::Poll::new()?;
        let mut listener = mio::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
        poll.registry()
            .register(&mut listener, LISTENER, mio::Interest::READABLE)?;
        Ok(Self {
            poll,
            listener,
            upstream,
            pairs: HashMap::new(),
            next_id: 1,
            buf: vec![0; conn::CLOCKED_READ_SIZE],
        })
    }

    fn run(mut self, interval: Duration) -> Result<()> {
        let mut events = mio::Events::with_capacity(1024);
        let mut ready = Vec::new();
        let mut tick = Instant::now();
        loop {
            // Per packet, or nothing to forward (like ingest-pod's clock, no
            // tick while idle): wait for the next event.
            let timeout = if interval.is_zero() || self.pairs.is_empty() {
                None
            } else {
                tick += interval;
                let now = Instant::now();
                if tick > now {
                    std::thread::sleep(tick - now);
                } else {
                    // Behind (or back from idle): tick now, the next one an interval later.
                    tick = now;
                }
                Some(Duration::ZERO)
            };
            loop {
                match self.poll.poll(&mut events, timeout) {
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    r => r.context("polling")?,
                }
                for event in &events {
                    if event.token() == LISTENER {
                        self.accept();
                        continue;
                    }
                    let (id, side) = (event.token().0 / 2, event.token().0 % 2);
                    let Some(pair) = self.pairs.get_mut(&id) else { continue };
                    let end = &mut pair.ends[side];
                    end.hup |= event.is_read_closed() || event.is_error();
                    end.more |= event.is_readable() || end.hup;
                    ready.push(id);
                }
                // A full list may have left events behind (as the clock looks again).
                if timeout.is_none() || events.iter().count() < events.capacity() {
                    break;
                }
            }
            ready.sort_unstable();
            ready.dedup();
            for id in ready.drain(..) {
                self.serve(id);
            }
        }
    }

    /// Accepts every waiting connection and connects it to the upstream.
    fn accept(&mut self) {
        loop {
            let (client, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::warn!(?err, "forward: accept failed");
                    return;
                }
            };
            if let Err(err) = self.open(client) {
                tracing::warn!(%peer, ?err, "forward: no connection to the upstream");
            }
        }
    }

    fn open(&mut self, mut client: mio::net::TcpStream) -> std::io::Result<()> {
        // A blocking connect: loopback, once per publisher, before the loop sees the pair.
        let upstream = std::net::TcpStream::connect_timeout(&self.upstream, FORWARD_CONNECT_TIMEOUT)?;
        upstream.set_nonblocking(true)?;
        let mut upstream = mio::net::TcpStream::from_std(upstream);
        // As ingest-pod sets both of its sockets.
        client.set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        let id = self.next_id;
        self.next_id += 1;
        // Edge-triggered (mio always is), as the clock's set: bytes that are
        // already there raise the first event.
        let registry = self.poll.registry();
        registry.register(&mut client, end_token(id, 0), mio::Interest::READABLE)?;
        registry.register(&mut upstream, end_token(id, 1), mio::Interest::READABLE)?;
        let end = |stream| End {
            stream,
            more: false,
            hup: false,
            pending: Vec::new(),
        };
        let pair = Pair {
            ends: [end(client), end(upstream)],
            closed: None,
        };
        self.pairs.insert(id, pair);
        Ok(())
    }

    /// Does what the events of pair `id` allow; drops (closes) it when done.
    fn serve(&mut self, id: usize) {
        let Some(pair) = self.pairs.get_mut(&id) else { return };
        match pair.serve(id, &mut self.buf, self.poll.registry()) {
            Ok(true) => {}
            Ok(false) => {
                self.pairs.remove(&id);
            }
            Err(err) => {
                tracing::debug!(pair = id, ?err, "forward: closing");
                self.pairs.remove(&id);
            }
        }
    }
}

impl Pair {
    /// Flushes backlogs and copies both ways; false once the pair is done.
    fn serve(&mut self, id: usize, buf: &mut [u8], registry: &mio::Registry) -> std::io::Result<bool> {
        for side in 0..2 {
            self.flush(id, side, registry)?;
        }
        for from in 0..2 {
            if self.closed.is_none() {
                self.copy(id, from, buf, registry)?;
            }
        }
        // After a close, the other end gets what was read for it, then closes too.
        Ok(self
            .closed
            .is_none_or(|closed| !self.ends[1 - closed].pending.is_empty()))
    }

    /// Reads end `from` while it may hold bytes and the other end's backlog
    /// allows, and passes what came on.
    fn copy(&mut self, id: usize, from: usize, buf: &mut [u8], registry: &mio::Registry) -> std::io::Result<()> {
        let to = 1 - from;
        while self.ends[from].more && self.ends[to].pending.len() < FORWARD_PENDING_LIMIT {
            let end = &mut self.ends[from];
            let n = match end.stream.read(buf) {
                Ok(0) => {
                    self.closed = Some(from);
                    return Ok(());
                }
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    end.more = false;
                    return Ok(());
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            // A short read emptied the socket: the next arrival raises an event.
            end.more = n == buf.len() || end.hup;
            self.send(id, to, &buf[..n], registry)?;
        }
        Ok(())
    }

    /// Writes `data` to end `to`; what the socket does not take waits, in
    /// order, behind any earlier backlog.
    fn send(&mut self, id: usize, to: usize, data: &[u8], registry: &mio::Registry) -> std::io::Result<()> {
        let end = &mut self.ends[to];
        let written = if end.pending.is_empty() {
            write_some(&end.stream, data)?
        } else {
            0
        };
        if written < data.len() {
            if end.pending.is_empty() {
                // Told when the socket takes more, until the backlog is out.
                let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
                registry.reregister(&mut end.stream, end_token(id, to), interest)?;
            }
            end.pending.extend_from_slice(&data[written..]);
        }
        Ok(())
    }

    /// Writes what waits for end `side`.
    fn flush(&mut self, id: usize, side: usize, registry: &mio::Registry) -> std::io::Result<()> {
        let end = &mut self.ends[side];
        if end.pending.is_empty() {
            return Ok(());
        }
        let written = write_some(&end.stream, &end.pending)?;
        end.pending.drain(..written);
        if end.pending.is_empty() {
            // The backlog's allocation goes with it.
            end.pending = Vec::new();
            registry.reregister(&mut end.stream, end_token(id, side), mio::Interest::READABLE)?;
        }
        Ok(())
    }
}

/// Writes until `data` is out or the socket is full; returns the bytes written.
fn write_some(mut stream: &mio::net::TcpStream, data: &[u8]) -> std::io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match stream.write(&data[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(err) if err.kind() == ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(written)
}
