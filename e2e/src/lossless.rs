//! The system as its users run it, proven lossless (issue 9): the chart
//! installed with the local images, an nginx-rtmp origin on the host that
//! records every stream and times every upstream publish (notify hooks),
//! publishers on the host connecting through the ingest Service VIP, and
//! the loss audit by payload hashes afterwards.
//!
//! The node-drain scenario lives here rather than among the tests because
//! the README demo runs it too, with the same narration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ingest_pod::registry::SignalKind;
use ingest_testkit::publisher::PublisherReport;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, eventually};
use crate::rtmp::{self, BackgroundPublisher, FfmpegPublisher, HostOrigin};
use crate::system::{self, INGEST_PODS, RTMP_PORT, deployments_available};

/// The namespace the node-drain scenario installs into.
pub const NODE_DRAIN_NS: &str = "node-drain";
/// Deadline of operator drains in the node-drain scenario: when the
/// incapable publisher is cut (policy `disconnect`) and its pod let go.
pub const NODE_DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// Capable publishers of the node-drain scenario.
pub const NODE_DRAIN_PUBLISHERS: usize = 20;

/// The installed system of one scenario.
pub struct Stage {
    pub ns: String,
    pub origin: HostOrigin,
    /// ClusterIP of the ingest Service (publishers connect here).
    pub vip: String,
}

impl Stage {
    /// Starts the origin, loads the images and `helm install`s the chart into
    /// `ns` with `extra` values (`key=value`); waits until all is Available.
    pub async fn install(c: &Cluster, ns: &str, extra: &[&str]) -> Result<Self> {
        system::purge(c, ns).await?;
        let origin = HostOrigin::start_with_hooks().await?;
        c.load_image(&system::ingest_image()?).await?;
        c.load_image(&system::operator_image()?).await?;
        c.namespace(ns).await?;
        let upstream = origin.upstream_template();
        let t = Instant::now();
        // These scenarios place publishers by their stream keys in /status:
        // keys in clear here. The chart scenario installs with the default
        // (keys hashed) and checks that no key shows.
        let mut values = vec!["ingest.revealStreamKeys=true"];
        values.extend_from_slice(extra);
        system::helm_install(c, "install", ns, &upstream, &values).await?;
        deployments_available(c, ns, Duration::from_secs(120)).await?;
        let vip = system::ingest_vip(c, ns).await?;
        say(&format!(
            "helm install --wait into {ns}: {:.1?} (ingest Service {vip}:{RTMP_PORT}, origin {})",
            t.elapsed(),
            origin.upstream_template()
        ));
        Ok(Self {
            ns: ns.to_owned(),
            origin,
            vip,
        })
    }

    /// The publish URL of `stream` through the ingest Service.
    pub fn url(&self, stream: &str) -> String {
        format!("rtmp://{}:{RTMP_PORT}/live/{stream}", self.vip)
    }
}

/// A line of narration (tests print it too: it is their log).
pub fn say(line: &str) {
    println!("  {line}");
}

/// An ingest pod as the cluster and its own `/status` see it.
#[derive(Debug, Clone)]
pub struct IngestPod {
    pub name: String,
    pub node: String,
    pub ready: bool,
    /// Stream keys of the connections on the pod.
    pub streams: Vec<String>,
}

/// The ingest pods of `ns` (not terminating), with their streams.
pub async fn ingest_pods(c: &Cluster, ns: &str) -> Result<Vec<IngestPod>> {
    let mut pods = Vec::new();
    for (name, node, ready) in c.pods(ns, INGEST_PODS).await? {
        let streams = streams_on(c, ns, &name).await.unwrap_or_default();
        pods.push(IngestPod {
            name,
            node,
            ready,
            streams,
        });
    }
    pods.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    Ok(pods)
}

/// Stream keys of the connections on an ingest pod (its `/status`, through
/// the API server's pod proxy).
pub async fn streams_on(c: &Cluster, ns: &str, pod: &str) -> Result<Vec<String>> {
    let path = format!("/api/v1/namespaces/{ns}/pods/{pod}:8080/proxy/status");
    let body = c.kubectl(&["get", "--raw", &path]).await?;
    let status: Value = serde_json::from_str(&body).with_context(|| format!("{pod} /status: {body}"))?;
    Ok(status["connections"]
        .as_array()
        .with_context(|| format!("{pod} /status has no connections: {body}"))?
        .iter()
        .filter_map(|c| c["stream"].as_str().map(str::to_owned))
        .collect())
}

/// The pods, one line each: name, node, readiness, publishers.
pub fn placement(pods: &[IngestPod]) -> String {
    pods.iter()
        .map(|p| {
            format!(
                "    {:<40} {:<8} {:<8} {} publisher(s)\n",
                p.name,
                p.node,
                if p.ready { "ready" } else { "unready" },
                p.streams.len()
            )
        })
        .collect()
}

/// A capable test publisher of the fleet and what it announces.
pub struct Capable {
    pub stream: String,
    pub announces: Announces,
    pub publisher: BackgroundPublisher,
}

/// Which signals a capable publisher announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announces {
    GoAway,
    ReconnectRequest,
    Both,
}

impl Announces {
    pub fn label(self) -> &'static str {
        match self {
            Announces::GoAway => "go-away",
            Announces::ReconnectRequest => "reconnect",
            Announces::Both => "both",
        }
    }

    /// The signal the ingest pod must send it (Reconnect Request when both).
    pub fn expected(self) -> SignalKind {
        match self {
            Announces::GoAway => SignalKind::GoAway,
            Announces::ReconnectRequest | Announces::Both => SignalKind::ReconnectRequest,
        }
    }
}

/// Starts `n` capable publishers through the Service, streams `<prefix>-<i>`,
/// announcing Go Away only, Reconnect Request only, or both, in turn; waits
/// until each has sent two seconds of video.
pub async fn start_fleet(stage: &Stage, prefix: &str, n: usize) -> Result<Vec<Capable>> {
    let mut fleet = Vec::with_capacity(n);
    for i in 0..n {
        let announces = [Announces::Both, Announces::GoAway, Announces::ReconnectRequest][i % 3];
        let stream = format!("{prefix}-{i:02}");
        let publisher = BackgroundPublisher::with_signals(
            &stage.url(&stream),
            announces != Announces::ReconnectRequest,
            announces != Announces::GoAway,
        )?;
        fleet.push(Capable {
            stream,
            announces,
            publisher,
        });
    }
    eventually(
        &format!("{n} publishers streaming"),
        Duration::from_secs(60),
        || async {
            let slow: Vec<&str> = fleet
                .iter()
                .filter(|p| p.publisher.progress().video_frames < 60)
                .map(|p| p.stream.as_str())
                .collect();
            ensure!(slow.is_empty(), "not streaming yet: {slow:?}");
            Ok(())
        },
    )
    .await?;
    Ok(fleet)
}

/// One publisher's outcome at the origin.
#[derive(Debug, Clone)]
pub struct Row {
    pub stream: String,
    pub announces: Announces,
    pub connections: u32,
    pub signals: Vec<SignalKind>,
    pub sent: usize,
    pub received: usize,
    pub lost: usize,
    pub duplicated: usize,
    /// Handover stalls at the origin (notify hooks), one per move.
    pub stalls: Vec<Duration>,
}

/// Stops every publisher (a clean teardown), then audits each stream's
/// recordings against what it sent. Fails unless every one is lossless
/// (exactly once, in order, timelines monotonic) and none stopped early.
pub async fn stop_and_audit(stage: &Stage, fleet: Vec<Capable>) -> Result<Vec<Row>> {
    let mut reports: Vec<(Announces, PublisherReport)> = Vec::with_capacity(fleet.len());
    for p in fleet {
        let report = p.publisher.stop().await?;
        ensure!(
            report.error.is_none(),
            "publisher {} stopped early: {:?}",
            p.stream,
            report.error
        );
        reports.push((p.announces, report));
    }
    let record_dir = stage.origin.record_dir();
    let audits = eventually("a lossless audit at the origin", Duration::from_secs(30), || async {
        let mut audits = Vec::with_capacity(reports.len());
        let mut bad = Vec::new();
        for (_, report) in &reports {
            let audit = ingest_testkit::audit::audit_dir(&report.stream, &report.sent, &record_dir)?;
            if !audit.lossless() {
                bad.push(audit.to_string());
            }
            audits.push(audit);
        }
        ensure!(bad.is_empty(), "not lossless:\n{}", bad.join("\n"));
        Ok(audits)
    })
    .await
    .with_context(|| format!("origin log: {}", stage.origin.error_log().display()))?;
    let events = stage.origin.notifications();
    Ok(reports
        .iter()
        .zip(audits)
        .map(|((announces, report), audit)| Row {
            stream: report.stream.clone(),
            announces: *announces,
            connections: report.connections,
            signals: report.signals.iter().map(|s| s.0).collect(),
            sent: audit.sent,
            received: audit.received,
            lost: audit.lost,
            duplicated: audit.duplicated,
            stalls: rtmp::stalls(&events, &report.stream),
        })
        .collect())
}

/// The final table: per publisher, then totals and the stall percentiles.
pub fn report(rows: &[Row]) -> String {
    let mut out = format!(
        "    {:<16} {:<10} {:>5} {:>7} {:>8} {:>10} {:>5} {:>5} {:>10}\n",
        "publisher", "announces", "moves", "signals", "sent", "at origin", "lost", "dup", "stall ms"
    );
    for r in rows {
        let stall = r
            .stalls
            .iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(",");
        out.push_str(&format!(
            "    {:<16} {:<10} {:>5} {:>7} {:>8} {:>10} {:>5} {:>5} {:>10}\n",
            r.stream,
            r.announces.label(),
            r.connections.saturating_sub(1),
            r.signals.len(),
            r.sent,
            r.received,
            r.lost,
            r.duplicated,
            if stall.is_empty() { "-".into() } else { stall }
        ));
    }
    let sent: usize = rows.iter().map(|r| r.sent).sum();
    let received: usize = rows.iter().map(|r| r.received).sum();
    let lost: usize = rows.iter().map(|r| r.lost).sum();
    let duplicated: usize = rows.iter().map(|r| r.duplicated).sum();
    let moves: u32 = rows.iter().map(|r| r.connections.saturating_sub(1)).sum();
    out.push_str(&format!(
        "    {:<16} {:<10} {moves:>5} {:>7} {sent:>8} {received:>10} {lost:>5} {duplicated:>5}\n",
        "total",
        rows.len(),
        rows.iter().map(|r| r.signals.len()).sum::<usize>()
    ));
    let mut stalls: Vec<Duration> = rows.iter().flat_map(|r| r.stalls.iter().copied()).collect();
    stalls.sort();
    if let (Some(p50), Some(p99), Some(max)) = (percentile(&stalls, 0.50), percentile(&stalls, 0.99), stalls.last()) {
        out.push_str(&format!(
            "    handover stall at the origin over {} moves: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
            stalls.len(),
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0
        ));
    }
    out
}

/// The `p` quantile (0..=1) of sorted durations, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Prints `kubectl get ingestdrains` rows of a namespace as they change,
/// like `kubectl get ingestdrains -w`, until stopped.
pub struct DrainWatch {
    stop: CancellationToken,
    task: JoinHandle<()>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl DrainWatch {
    pub fn start(c: Arc<Cluster>, ns: &str) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let ns = ns.to_owned();
        let started = Instant::now();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut last: BTreeMap<String, String> = BTreeMap::new();
            let mut header = false;
            loop {
                if let Ok(table) = c.kubectl(&["-n", &ns, "get", "ingestdrains"]).await {
                    let mut lines = table.lines();
                    let head = lines.next().unwrap_or_default();
                    for line in lines {
                        let name = line.split_whitespace().next().unwrap_or_default().to_owned();
                        // The AGE column changes every second; compare the rest.
                        let key = line.rsplit_once(char::is_whitespace).map_or(line, |(rest, _)| rest);
                        if last.get(&name).map(String::as_str) != Some(key.trim_end()) {
                            if !header {
                                println!("    {:>6}  {head}", "t");
                                header = true;
                            }
                            println!("    {:>5.1}s  {line}", started.elapsed().as_secs_f64());
                            if let Ok(mut seen) = record.lock() {
                                seen.push(line.to_owned());
                            }
                            last.insert(name, key.trim_end().to_owned());
                        }
                    }
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
        Self { stop, task, seen }
    }

    /// Stops watching; the rows as they changed (name, phase, pods, ...).
    pub async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        let _ = self.task.await;
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// What `kubectl drain` did.
pub struct NodeDrain {
    pub took: Duration,
    /// Refused evictions per pod (kubectl's "error when evicting ... will retry").
    pub refused: BTreeMap<String, usize>,
    /// The refusals per pod, as kubectl printed them.
    pub refusals: BTreeMap<String, Vec<String>>,
}

/// Runs `kubectl drain <node> --ignore-daemonsets --delete-emptydir-data
/// --timeout=<timeout>`, printing its output as it comes.
pub async fn kubectl_drain(c: &Cluster, node: &str, timeout: Duration) -> Result<NodeDrain> {
    let timeout_flag = format!("--timeout={}s", timeout.as_secs());
    let args = [
        "drain",
        node,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        &timeout_flag,
    ];
    say(&format!("$ kubectl {}", args.join(" ")));
    let t = Instant::now();
    let mut child = c
        .kubectl_command(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting kubectl drain")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(spawn_lines(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(spawn_lines(err, tx.clone()));
    }
    drop(tx);
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    let mut refusals: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while let Some(line) = rx.recv().await {
        println!("    {:>5.1}s  kubectl: {line}", t.elapsed().as_secs_f64());
        if line.contains("error when evicting") && line.contains("will retry") {
            let pod = line
                .split("pods/\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_owned();
            *refused.entry(pod.clone()).or_default() += 1;
            refusals.entry(pod).or_default().push(line);
        }
    }
    let status = child.wait().await?;
    for r in readers {
        let _ = r.await;
    }
    ensure!(status.success(), "kubectl drain {node} failed ({status})");
    Ok(NodeDrain {
        took: t.elapsed(),
        refused,
        refusals,
    })
}

fn spawn_lines<R>(reader: R, tx: tokio::sync::mpsc::UnboundedSender<String>) -> JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                return;
            }
        }
    })
}

/// An IngestDrain's status as JSON (`kubectl get -o json`), `None` if absent.
pub async fn drain_status(c: &Cluster, ns: &str, name: &str) -> Result<Option<Value>> {
    let out = c
        .kubectl(&["-n", ns, "get", "ingestdrain", name, "--ignore-not-found", "-o", "json"])
        .await?;
    if out.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(&out)?;
    Ok(Some(v["status"].clone()))
}

/// Scenario 1: `kubectl drain` of the node that holds two of the three
/// ingest pods, with 20 capable publishers and one ffmpeg publisher on the
/// Service. The webhook holds each ingest pod's eviction with 429 until the
/// pod is empty; every capable publisher on the node moves without losing a
/// message; ffmpeg, which supports neither signal, is cut at the drain's
/// deadline (policy `disconnect`); the pods come back on the other node.
pub async fn node_drain(c: Arc<Cluster>) -> Result<()> {
    let deadline = format!("operator.drain.deadline={}s", NODE_DRAIN_DEADLINE.as_secs());
    let stage = Stage::install(
        &c,
        NODE_DRAIN_NS,
        &[&deadline, "operator.drain.incapablePolicy=disconnect"],
    )
    .await?;
    let ns = stage.ns.clone();
    let (drained, other) = node_to_drain(&c, &ns).await?;

    say(&format!(
        "starting {NODE_DRAIN_PUBLISHERS} capable publishers (Go Away, Reconnect Request, both) through the Service"
    ));
    let fleet = start_fleet(&stage, "cap", NODE_DRAIN_PUBLISHERS).await?;
    let (ffmpeg, ffmpeg_pod) = ffmpeg_on_node(&c, &stage, &drained).await?;
    say(&format!(
        "ffmpeg (supports neither signal) publishes {} on {ffmpeg_pod} ({drained})",
        ffmpeg.stream
    ));
    let (on_drained, drained_pods) = on_node_before_the_drain(&c, &ns, &drained, &ffmpeg.stream).await?;

    say(&format!(
        "draining {drained}: the operator's webhook holds each ingest pod's eviction (429) until it is empty"
    ));
    let watch = DrainWatch::start(c.clone(), &ns);
    let drain_started = Instant::now();
    let result = kubectl_drain(&c, &drained, Duration::from_secs(300)).await;
    let _ = watch.stop().await;
    let node_drain = result?;
    say(&format!("kubectl drain {drained} succeeded in {:.1?}", node_drain.took));

    check_evictions_held(&node_drain, &drained_pods)?;
    check_node_explained(&c, &drained).await?;
    let cut_after = check_ffmpeg_cut_at_deadline(ffmpeg, &ffmpeg_pod, drain_started).await?;
    check_node_ingest_drain(&c, &ns, &drained, on_drained.len()).await?;
    check_pods_back_on(&c, &ns, &other).await?;

    let rows = stop_and_audit(&stage, fleet).await?;
    check_moved_only_off(&rows, &on_drained, &drained, &other)?;
    say(&format!(
        "every message of the {} capable publishers reached the origin exactly once, in order ({} moved off {drained}):\n{}",
        rows.len(),
        on_drained.len(),
        report(&rows).trim_end()
    ));
    say(&format!(
        "node drain took {:.1?} (kubectl drain), ffmpeg cut {:.1?} after it began (deadline {:?})",
        node_drain.took, cut_after, NODE_DRAIN_DEADLINE
    ));
    Ok(())
}

/// The node with two of the three ingest pods (the one drained) and the other node.
async fn node_to_drain(c: &Cluster, ns: &str) -> Result<(String, String)> {
    let pods = ingest_pods(c, ns).await?;
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in &pods {
        *by_node.entry(p.node.clone()).or_default() += 1;
    }
    ensure!(
        pods.len() == 3 && by_node.len() == 2,
        "want 3 ingest pods on 2 nodes: {pods:?}"
    );
    let drained = by_node
        .iter()
        .find(|(_, n)| **n == 2)
        .map(|(node, _)| node.clone())
        .with_context(|| format!("no node holds 2 ingest pods: {by_node:?}"))?;
    let other = by_node
        .keys()
        .find(|n| **n != drained)
        .cloned()
        .context("no second node")?;
    Ok((drained, other))
}

/// Says where the ingest pods and their publishers are, and returns the
/// capable publishers' streams on `drained` (all but `ffmpeg`'s) and the
/// ingest pods there.
async fn on_node_before_the_drain(
    c: &Cluster,
    ns: &str,
    drained: &str,
    ffmpeg: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let before = ingest_pods(c, ns).await?;
    say(&format!(
        "ingest pods before the drain:\n{}",
        placement(&before).trim_end()
    ));
    let on_drained: Vec<String> = before
        .iter()
        .filter(|p| p.node == drained)
        .flat_map(|p| p.streams.iter().cloned())
        .filter(|s| *s != ffmpeg)
        .collect();
    let drained_pods: Vec<String> = before
        .iter()
        .filter(|p| p.node == drained)
        .map(|p| p.name.clone())
        .collect();
    Ok((on_drained, drained_pods))
}

/// Each ingest pod of the node was refused (429) at least once first.
fn check_evictions_held(node_drain: &NodeDrain, drained_pods: &[String]) -> Result<()> {
    for pod in drained_pods {
        let n = node_drain.refused.get(pod).copied().unwrap_or(0);
        ensure!(
            n >= 1,
            "kubectl drain never saw the eviction of {pod} refused: {:?}",
            node_drain.refused
        );
        say(&format!("evictions of {pod} refused {n} time(s) before it went"));
        // kubectl drain retries only a 429: every refusal above was one. The
        // webhook names the publishers left on the pod.
        let lines = node_drain.refusals.get(pod).cloned().unwrap_or_default();
        ensure!(
            lines.iter().any(|l| l.contains("publishers remain")),
            "no refusal of {pod} named its remaining publishers: {lines:#?}"
        );
    }
    Ok(())
}

/// ffmpeg was cut at the deadline, as the policy says: how long after the
/// drain began.
async fn check_ffmpeg_cut_at_deadline(
    ffmpeg: FfmpegPublisher,
    ffmpeg_pod: &str,
    drain_started: Instant,
) -> Result<Duration> {
    let exit = ffmpeg.wait(Duration::from_secs(60)).await?;
    let cut_after = exit.at.saturating_duration_since(drain_started);
    ensure!(
        cut_after >= NODE_DRAIN_DEADLINE,
        "ffmpeg ended {cut_after:.1?} after the node drain began, before the {NODE_DRAIN_DEADLINE:?} deadline: {} {}",
        exit.status,
        exit.stderr
    );
    say(&format!(
        "ffmpeg on {ffmpeg_pod} was disconnected {cut_after:.1?} after the drain began (deadline {NODE_DRAIN_DEADLINE:?}, policy disconnect): {}",
        exit.stderr.lines().last().unwrap_or(&exit.status.to_string())
    ));
    Ok(cut_after)
}

/// The node's IngestDrain: TimedOut, since ffmpeg stayed until the
/// deadline, having signalled every capable publisher on the node.
async fn check_node_ingest_drain(c: &Cluster, ns: &str, drained: &str, capable_on_node: usize) -> Result<()> {
    let name = format!("node-{drained}");
    let status = drain_status(c, ns, &name)
        .await?
        .with_context(|| format!("no IngestDrain {name}"))?;
    let phase = status["phase"].as_str().unwrap_or_default();
    ensure!(
        phase == "TimedOut",
        "IngestDrain {name} is {phase}, want TimedOut (ffmpeg held a pod to the deadline): {status}"
    );
    for row in status["pods"].as_array().into_iter().flatten() {
        say(&format!(
            "IngestDrain {name}: pod {} {} signalled {} migrated {}",
            row["name"].as_str().unwrap_or_default(),
            row["state"].as_str().unwrap_or_default(),
            row["signalled"],
            row["migrated"]
        ));
    }
    let signalled = status["totals"]["signalled"].as_i64().unwrap_or(-1);
    ensure!(
        signalled == capable_on_node as i64,
        "{name} signalled {signalled} publishers, {} capable ones were on {drained}: {status}",
        capable_on_node
    );
    // Its TimedOut Event counts ffmpeg among the publishers left.
    let selector = format!("involvedObject.name={name},reason=TimedOut");
    let said = c
        .kubectl(&[
            "-n",
            ns,
            "get",
            "events",
            "--field-selector",
            &selector,
            "-o",
            "jsonpath={.items[*].message}",
        ])
        .await?;
    let left = said
        .strip_prefix("deadline passed with ")
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(n, _)| n.parse::<u32>().ok())
        .with_context(|| format!("no TimedOut Event on {name} saying how many publishers were left: {said:?}"))?;
    ensure!(
        left >= 1,
        "the TimedOut Event of {name} counts no publisher left, yet ffmpeg held a pod to the deadline: {said}"
    );
    say(&format!("IngestDrain {name} Event TimedOut: {said}"));
    Ok(())
}

/// `kubectl describe node` said why the evictions were held while
/// `kubectl drain` waited (the gate's `EvictionHeld` Event on the Node).
async fn check_node_explained(c: &Cluster, node: &str) -> Result<()> {
    let described = c.kubectl(&["describe", "node", node]).await?;
    let explained = described
        .lines()
        .find(|l| l.contains("EvictionHeld"))
        .with_context(|| format!("kubectl describe node {node} does not explain the held evictions:\n{described}"))?;
    ensure!(
        explained.contains("eviction held: pod "),
        "the Event on {node} does not say which pod is held: {explained}"
    );
    say(&format!("kubectl describe node {node}: {}", explained.trim()));
    Ok(())
}

/// The drained node's pods come back on the other node.
async fn check_pods_back_on(c: &Cluster, ns: &str, other: &str) -> Result<()> {
    deployments_available(c, ns, Duration::from_secs(120)).await?;
    let after = ingest_pods(c, ns).await?;
    ensure!(
        after.len() == 3 && after.iter().all(|p| p.node == other),
        "the ingest pods are not all back on {other}: {after:?}"
    );
    say(&format!(
        "ingest pods after the drain:\n{}",
        placement(&after).trim_end()
    ));
    Ok(())
}

/// The publishers that were on the drained node moved, on the signal they
/// announce; the others were neither signalled nor reconnected.
fn check_moved_only_off(rows: &[Row], on_drained: &[String], drained: &str, other: &str) -> Result<()> {
    for r in rows {
        let moved = on_drained.contains(&r.stream);
        if moved {
            ensure!(
                r.connections >= 2 && !r.signals.is_empty(),
                "{} was on {drained} but did not move: {r:?}",
                r.stream
            );
            ensure!(
                r.signals.iter().all(|k| *k == r.announces.expected()),
                "{} announces {:?} and was sent {:?}",
                r.stream,
                r.announces,
                r.signals
            );
        } else {
            ensure!(
                r.connections == 1 && r.signals.is_empty(),
                "{} was on {other}, yet it was signalled or reconnected: {r:?}",
                r.stream
            );
        }
    }
    Ok(())
}

/// Starts ffmpeg on the Service until kube-proxy puts it on a pod of
/// `node` (each try is a new stream; a try elsewhere is stopped).
async fn ffmpeg_on_node(c: &Cluster, stage: &Stage, node: &str) -> Result<(FfmpegPublisher, String)> {
    for attempt in 0..12 {
        let stream = format!("ffmpeg-{attempt}");
        let ffmpeg = FfmpegPublisher::start(&stage.url(&stream))?;
        let pod = eventually(
            &format!("{stream} on an ingest pod"),
            Duration::from_secs(30),
            || async {
                ingest_pods(c, &stage.ns)
                    .await?
                    .into_iter()
                    .find(|p| p.streams.contains(&stream))
                    .with_context(|| format!("{stream} is on no ingest pod yet"))
            },
        )
        .await?;
        if pod.node == node {
            return Ok((ffmpeg, pod.name));
        }
        drop(ffmpeg);
    }
    bail!("ffmpeg never landed on {node} in 12 tries")
}
