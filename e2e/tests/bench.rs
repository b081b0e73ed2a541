//! Benchmarks on the real cluster, run by hand and reported, never in CI
//! and never asserted as timings (correctness still is):
//!
//! - `operator_scale`: the operator with 300 ingest pods (`SCALE_PODS` to
//!   change it) — webhook latency (client side through the API server, and
//!   the operator's own histogram), reconcile latency (histogram), time to
//!   Drained of one IngestDrain over all of them, the API requests that
//!   drain cost (the API server's own `apiserver_request_total`, before and
//!   after), operator RSS.
//! - `node_drain_200`: 200 low-bitrate capable publishers on one node,
//!   `kubectl drain` with a wave rate; 0 lost; the drain time next to
//!   propagation delay + one GOP + publishers / rate.
//!
//! - `obs_node_drain_{1,2,3}`: Debian's OBS Studio 29 (Go Away client)
//!   headless under Xvfb through a node drain, audited against its own
//!   local recording (`ingest_e2e::obs`).
//!
//! Build it in release: the publishers hash every frame, and hundreds of
//! them in a debug build starve the machine.
//!
//! `cargo build --release -p ingest-pod -p ingest-operator && cargo test --release -p ingest-e2e --test bench -- [NAME]`

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ingest_e2e::cluster::eventually;
use ingest_e2e::lossless::{self, Capable, Stage, drain_status, percentile, say};
use ingest_e2e::rtmp::BackgroundPublisher;
use ingest_e2e::system::{self, INGEST_PODS, OPERATOR_PODS, deployments_available};
use ingest_e2e::{Cluster, Scenario, obs, runner};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{EvictParams, PostParams};

fn main() -> ExitCode {
    runner::main(
        2,
        vec![
            Scenario::new("operator_scale", |c| async move {
                let r = operator_scale(c.clone()).await;
                let purged = system::purge(&c, SCALE_NS).await;
                r.and(purged)
            })
            .timeout(Duration::from_secs(1800)),
            Scenario::new("node_drain_200", |c| async move {
                let r = node_drain_200(c.clone()).await;
                let purged = system::purge(&c, DRAIN_NS).await;
                r.and(purged)
            })
            .timeout(Duration::from_secs(1800)),
            // OBS 29 has a rare reconnect race: run it more than once.
            obs_run("obs_node_drain_1"),
            obs_run("obs_node_drain_2"),
            obs_run("obs_node_drain_3"),
        ],
    )
}

/// One run of Debian's OBS Studio through a node drain (scenario 9).
fn obs_run(name: &'static str) -> Scenario {
    Scenario::new(name, |c| async move {
        let r = obs::obs_node_drain(c.clone()).await;
        let purged = system::purge(&c, obs::OBS_NODE_DRAIN_NS).await;
        r.and(purged)
    })
    .timeout(Duration::from_secs(900))
}

const SCALE_NS: &str = "scale";
const DRAIN_NS: &str = "drain-200";
/// Ingest pods of `operator_scale`: `SCALE_PODS`, else 300.
fn scale_pods() -> usize {
    std::env::var("SCALE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// `apiserver_request_total` of the API server now, by (verb, resource,
/// subresource), summed over codes and scopes.
async fn api_requests(c: &Cluster) -> Result<std::collections::BTreeMap<String, f64>> {
    let text = c.kubectl(&["get", "--raw", "/metrics"]).await?;
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        let key = format!(
            "{} {}{}",
            label("verb"),
            label("resource"),
            match label("subresource").as_str() {
                "" => String::new(),
                sub => format!("/{sub}"),
            }
        );
        *out.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// The requests counted between two [`api_requests`] readings, as a table.
fn request_delta(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> String {
    let mut rows: Vec<(f64, &String)> = after
        .iter()
        .map(|(k, v)| (v - before.get(k).copied().unwrap_or(0.0), k))
        .filter(|(d, _)| *d > 0.0)
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: f64 = rows.iter().map(|(d, _)| d).sum();
    let mut out = format!("{total:.0} API requests in all\n");
    for (d, k) in rows {
        out.push_str(&format!("    {d:>7.0}  {k}\n"));
    }
    out
}

/// A histogram of the operators' `/metrics`, summed over the replicas.
#[derive(Debug, Default)]
struct Histogram {
    /// (upper bound, cumulative count)
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
}

impl Histogram {
    fn parse_into(&mut self, text: &str, name: &str) {
        let bucket = format!("{name}_bucket{{le=\"");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket) {
                let Some((le, value)) = rest.split_once("\"} ") else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                let value: f64 = value.trim().parse().unwrap_or(0.0);
                match self.buckets.iter_mut().find(|b| b.0 == le) {
                    Some(b) => b.1 += value,
                    None => self.buckets.push((le, value)),
                }
            } else if let Some(v) = line.strip_prefix(&format!("{name}_count ")) {
                self.count += v.trim().parse::<f64>().unwrap_or(0.0);
            } else if let Some(v) = line.strip_prefix(&format!("{name}_sum ")) {
                self.sum += v.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// Adds the series of `name` whose labels contain `selector` (the API
    /// server's histograms carry labels besides `le`).
    fn parse_series(&mut self, text: &str, name: &str, selector: &str) {
        let bucket = format!("{name}_bucket{{");
        let count = format!("{name}_count{{");
        let sum = format!("{name}_sum{{");
        let value = |line: &str| line.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok());
        for line in text.lines().filter(|l| l.contains(selector)) {
            if line.starts_with(&bucket) {
                let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                let n = value(line).unwrap_or(0.0);
                match self.buckets.iter_mut().find(|b| b.0 == le) {
                    Some(b) => b.1 += n,
                    None => self.buckets.push((le, n)),
                }
            } else if line.starts_with(&count) {
                self.count += value(line).unwrap_or(0.0);
            } else if line.starts_with(&sum) {
                self.sum += value(line).unwrap_or(0.0);
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// Share of the observations at or under `le` (a bucket bound).
    fn share_under(&self, le: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        let under = self.buckets.iter().find(|b| b.0 == le)?.1;
        (total > 0.0).then(|| under / total)
    }

    /// The observations made after `earlier` was scraped.
    fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |le: f64| earlier.buckets.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
        Histogram {
            buckets: self.buckets.iter().map(|&(le, n)| (le, n - before(le))).collect(),
            count: self.count - earlier.count,
            sum: self.sum - earlier.sum,
        }
    }

    /// Prometheus' histogram_quantile: linear within the bucket.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let width = cum - lower.1;
                let frac = if width > 0.0 { (rank - lower.1) / width } else { 1.0 };
                return Some(lower.0 + (le - lower.0) * frac);
            }
            lower = (le, cum);
        }
        None
    }

    fn text(&self) -> String {
        format!(
            "n {}, mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms",
            self.count,
            if self.count > 0.0 {
                self.sum / self.count * 1000.0
            } else {
                0.0
            },
            self.quantile(0.5).unwrap_or(f64::NAN) * 1000.0,
            self.quantile(0.99).unwrap_or(f64::NAN) * 1000.0
        )
    }
}

async fn operator_metrics(c: &Cluster, ns: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (pod, _, _) in c.pods(ns, OPERATOR_PODS).await? {
        let path = format!("/api/v1/namespaces/{ns}/pods/{pod}:8080/proxy/metrics");
        out.push(c.kubectl(&["get", "--raw", &path]).await?);
    }
    Ok(out)
}

/// The histogram `name` of the operators' `/metrics` now, summed over replicas.
async fn scrape(c: &Cluster, name: &str) -> Result<Histogram> {
    let mut h = Histogram::default();
    for m in operator_metrics(c, SCALE_NS).await? {
        h.parse_into(&m, name);
    }
    Ok(h)
}

const WEBHOOK_SECONDS: &str = "ingest_operator_webhook_duration_seconds";

/// The API server's own time for each call of our webhook (the share of an
/// eviction's latency that `kubectl drain` owes to the gate).
const ADMISSION_SECONDS: &str = "apiserver_admission_webhook_admission_duration_seconds";
const GATE_SERIES: &str = "name=\"eviction.ingest.lossless.dev\"";

async fn admission(c: &Cluster) -> Result<Histogram> {
    let text = c.kubectl(&["get", "--raw", "/metrics"]).await?;
    let mut h = Histogram::default();
    h.parse_series(&text, ADMISSION_SECONDS, GATE_SERIES);
    Ok(h)
}

/// The API server's view of the gate since `before`.
fn admission_text(h: &Histogram) -> String {
    format!(
        "{}; under 5 ms {:.1}%, under 25 ms {:.1}%",
        h.text(),
        h.share_under(0.005).unwrap_or(f64::NAN) * 100.0,
        h.share_under(0.025).unwrap_or(f64::NAN) * 100.0
    )
}
const RECONCILE_SECONDS: &str = "ingest_operator_reconcile_duration_seconds";
const WEBHOOK_CONNECTIONS: &str = "ingest_operator_webhook_connections_total";

/// The counter `name` of the operators' `/metrics` now, summed over replicas.
async fn counter(c: &Cluster, name: &str) -> Result<f64> {
    let mut sum = 0.0;
    for m in operator_metrics(c, SCALE_NS).await? {
        let value = m
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .with_context(|| format!("no {name} in the operator's metrics"))?;
        sum += value;
    }
    Ok(sum)
}

/// This machine's load averages (1, 5, 15 minutes).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Waits until this machine's 1-minute load average is at most twice its
/// cores, or `at_most`; returns how long it waited.
async fn settle(at_most: Duration) -> Duration {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get) as f64;
    let t = Instant::now();
    while t.elapsed() < at_most {
        let one_minute = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if one_minute <= 2.0 * cores {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    t.elapsed()
}

/// A pod in a namespace the webhook does not select, guarded by a
/// PodDisruptionBudget that refuses its eviction.
struct Baseline {
    api: Api<Pod>,
}

const BASELINE_NS: &str = "bench-baseline";

impl Baseline {
    async fn start(c: &Cluster) -> Result<Self> {
        c.kubectl(&["create", "namespace", BASELINE_NS]).await?;
        let image = format!("--image={}", system::INGEST_IMAGE);
        c.kubectl(&[
            "-n",
            BASELINE_NS,
            "run",
            "baseline",
            &image,
            "--image-pull-policy=Never",
            "--restart=Never",
        ])
        .await?;
        c.kubectl(&[
            "-n",
            BASELINE_NS,
            "wait",
            "--for=condition=Ready",
            "pod/baseline",
            "--timeout=120s",
        ])
        .await?;
        // Refused by a PodDisruptionBudget: a 429 as the gate's, answered
        // by the API server itself.
        c.kubectl(&[
            "-n",
            BASELINE_NS,
            "create",
            "poddisruptionbudget",
            "baseline",
            "--selector=run=baseline",
            "--min-available=1",
        ])
        .await?;
        Ok(Self {
            api: Api::namespaced(c.client(), BASELINE_NS),
        })
    }

    /// Client time of one dry-run eviction, refused by the budget.
    async fn evict(&self, params: &EvictParams) -> Result<Duration> {
        let t = Instant::now();
        let answer = self.api.evict("baseline", params).await;
        let took = t.elapsed();
        match answer {
            Err(kube::Error::Api(s)) if s.code == 429 => Ok(took),
            other => anyhow::bail!("dry-run eviction of the baseline pod: {other:?}"),
        }
    }

    async fn stop(self, c: &Cluster) {
        let _ = c.kubectl(&["delete", "namespace", BASELINE_NS, "--wait=false"]).await;
    }
}

/// VmRSS and VmHWM (kB) of every ingest-operator process on this machine
/// (the containers run here).
fn operator_rss() -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
        if !argv0.ends_with(b"ingest-operator") {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        out.push((pid, kb("VmRSS:"), kb("VmHWM:")));
    }
    out
}

async fn operator_scale(c: Arc<Cluster>) -> Result<()> {
    let scale = scale_pods();
    let replicas = format!("ingest.replicaCount={scale}");
    let t = Instant::now();
    let _stage = Stage::install(
        &c,
        SCALE_NS,
        &[
            &replicas,
            "ingest.resources.requests.cpu=1m",
            "ingest.resources.requests.memory=8Mi",
            "ingest.podDisruptionBudget.enabled=false",
        ],
    )
    .await?;
    let pods = c.pods(SCALE_NS, INGEST_PODS).await?;
    ensure!(pods.len() == scale, "{} ingest pods", pods.len());
    let per_node = c
        .nodes()
        .iter()
        .map(|n| (n.clone(), pods.iter().filter(|p| &p.1 == n).count()))
        .collect::<Vec<_>>();
    say(&format!(
        "{scale} ingest pods ready in {:.1?}: {per_node:?}",
        t.elapsed()
    ));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = operator_rss();
    say(&format!(
        "operator RSS with {scale} ingest pods cached (pid, VmRSS kB, VmHWM kB): {idle:?}"
    ));

    // Webhook: dry-run evictions (answered, no side effect) of every pod, twice.
    let api: Api<Pod> = Api::namespaced(c.client(), SCALE_NS);
    let params = EvictParams {
        post_options: PostParams {
            dry_run: true,
            ..PostParams::default()
        },
        ..EvictParams::default()
    };
    // Each one next to a dry-run eviction of a pod the webhook is not
    // asked about, refused with 429 by its PodDisruptionBudget: the same
    // answer from the same API server on the same busy machine, so the
    // difference is what the gate adds to an eviction.
    let baseline = Baseline::start(&c).await?;
    // Measured once the pods' start is over: what is left is the steady
    // noise of 300 idle pods (their probes), not their start.
    let waited = settle(Duration::from_secs(120)).await;
    say(&format!(
        "load average before the holds (after {waited:.0?} of settling): {}",
        load_average()
    ));
    let mut client_side = Vec::new();
    let mut without_gate = Vec::new();
    let admission_before = admission(&c).await?;
    let connections_before = counter(&c, WEBHOOK_CONNECTIONS).await?;
    for round in 0..2 {
        for (pod, _, _) in &pods {
            without_gate.push(baseline.evict(&params).await?);
            let t = Instant::now();
            let answer = api.evict(pod, &params).await;
            client_side.push(t.elapsed());
            match answer {
                Err(kube::Error::Api(s)) if s.code == 429 => {}
                other => anyhow::bail!("round {round}: dry-run eviction of {pod}: {other:?}"),
            }
        }
    }
    let connections = counter(&c, WEBHOOK_CONNECTIONS).await? - connections_before;
    baseline.stop(&c).await;
    client_side.sort();
    without_gate.sort();
    let hook = scrape(&c, WEBHOOK_SECONDS).await?;
    say(&format!(
        "webhook: {} dry-run evictions through the API server: client p50 {:.1?}, p99 {:.1?}; operator histogram {}",
        client_side.len(),
        percentile(&client_side, 0.5).unwrap_or_default(),
        percentile(&client_side, 0.99).unwrap_or_default(),
        hook.text()
    ));
    say(&format!(
        "the same number of dry-run evictions the webhook is not asked about, refused by a PodDisruptionBudget (the API server's own 429), interleaved: client p50 {:.1?}, p99 {:.1?}",
        percentile(&without_gate, 0.5).unwrap_or_default(),
        percentile(&without_gate, 0.99).unwrap_or_default(),
    ));
    say(&format!(
        "webhook as the API server timed its calls (what kubectl drain waits for): {}; {connections} new connections to the webhook",
        admission_text(&admission(&c).await?.since(&admission_before))
    ));

    // Reconcile: one IngestDrain over all 100 pods.
    let before = scrape(&c, RECONCILE_SECONDS).await?;
    let manifest = format!(
        "apiVersion: ingest.lossless.dev/v1alpha1\nkind: IngestDrain\nmetadata: {{name: all, namespace: {SCALE_NS}}}\n\
         spec:\n  selector: {{matchLabels: {{app.kubernetes.io/component: ingest}}}}\n  deadlineSeconds: 600\n  propagationDelaySeconds: 5\n"
    );
    let requests_before = api_requests(&c).await?;
    let t = Instant::now();
    c.kubectl_with_input(&["apply", "-f", "-"], &manifest).await?;
    let listed = eventually("every pod Draining", Duration::from_secs(300), || async {
        let s = drain_status(&c, SCALE_NS, "all").await?.unwrap_or_default();
        let draining = s["pods"]
            .as_array()
            .map(|r| r.iter().filter(|r| r["state"] != "Pending").count())
            .unwrap_or(0);
        ensure!(draining == scale, "{draining} pods started");
        Ok(t.elapsed())
    })
    .await?;
    let drained = eventually("all Drained", Duration::from_secs(600), || async {
        let s = drain_status(&c, SCALE_NS, "all").await?.unwrap_or_default();
        ensure!(s["phase"] == "Drained", "phase {}", s["phase"]);
        Ok(t.elapsed())
    })
    .await?;
    let after = scrape(&c, RECONCILE_SECONDS).await?;
    let requests_after = api_requests(&c).await?;
    let busy = operator_rss();
    say(&format!(
        "IngestDrain over {scale} pods: every pod started in {listed:.1?}, Drained in {drained:.1?} (propagation 5 s)"
    ));
    say(&format!("reconciles of the drain: {}", after.since(&before).text()));
    say(&format!(
        "API requests of the whole cluster from the apply to Drained (kubelets' pod status updates included): {}",
        request_delta(&requests_before, &requests_after)
    ));
    say(&format!(
        "operator RSS after the drain (pid, VmRSS kB, VmHWM kB): {busy:?}"
    ));

    // The webhook once the pods are drained: it allows (a dry run evicts nothing).
    let before = scrape(&c, WEBHOOK_SECONDS).await?;
    let admission_before = admission(&c).await?;
    let mut allowed = Vec::new();
    for (pod, _, _) in &pods {
        let t = Instant::now();
        let answer = api.evict(pod, &params).await;
        allowed.push(t.elapsed());
        ensure!(answer.is_ok(), "dry-run eviction of drained {pod}: {answer:?}");
    }
    allowed.sort();
    let after = scrape(&c, WEBHOOK_SECONDS).await?;
    say(&format!(
        "webhook, drained pods (allow): {} dry-run evictions: client p50 {:.1?}, p99 {:.1?}; operator histogram {}",
        allowed.len(),
        percentile(&allowed, 0.5).unwrap_or_default(),
        percentile(&allowed, 0.99).unwrap_or_default(),
        after.since(&before).text()
    ));
    say(&format!(
        "webhook (allow) as the API server timed its calls: {}",
        admission_text(&admission(&c).await?.since(&admission_before))
    ));
    Ok(())
}

/// Scenario 8: 200 capable publishers of a low-bitrate stream on the ingest
/// pod of one node, moved by `kubectl drain` at a wave rate.
async fn node_drain_200(c: Arc<Cluster>) -> Result<()> {
    const PUBLISHERS: usize = 200;
    const RATE: u32 = 20;
    let nodes = c.nodes().to_vec();
    let (drained, other) = (nodes[0].clone(), nodes[1].clone());
    // One ingest pod, on the node to drain.
    c.kubectl(&["cordon", &other]).await?;
    let rate = format!("operator.drain.rate={RATE}");
    let stage = Stage::install(
        &c,
        DRAIN_NS,
        &[
            "ingest.replicaCount=1",
            &rate,
            "operator.drain.deadline=600s",
            "operator.replicaCount=1",
        ],
    )
    .await;
    c.kubectl(&["uncordon", &other]).await?;
    let stage = stage?;
    let mut fleet = Vec::with_capacity(PUBLISHERS);
    for i in 0..PUBLISHERS {
        let stream = format!("many-{i:03}");
        let publisher = BackgroundPublisher::low_bitrate(&stage.url(&stream))?;
        fleet.push(Capable {
            stream,
            announces: lossless::Announces::Both,
            publisher,
        });
    }
    eventually("200 publishers streaming", Duration::from_secs(120), || async {
        let slow = fleet
            .iter()
            .filter(|p| p.publisher.progress().video_frames < 30)
            .count();
        ensure!(slow == 0, "{slow} not streaming yet");
        Ok(())
    })
    .await?;
    // A second pod on the other node to take them.
    c.kubectl(&[
        "-n",
        DRAIN_NS,
        "scale",
        &format!("deployment/{}", system::ingest_name()),
        "--replicas=2",
    ])
    .await?;
    deployments_available(&c, DRAIN_NS, Duration::from_secs(120)).await?;
    let pods = lossless::ingest_pods(&c, DRAIN_NS).await?;
    say(&format!("before:\n{}", lossless::placement(&pods).trim_end()));
    let on_drained: usize = pods.iter().filter(|p| p.node == drained).map(|p| p.streams.len()).sum();
    ensure!(on_drained == PUBLISHERS, "{on_drained} publishers on {drained}");

    let node_drain = lossless::kubectl_drain(&c, &drained, Duration::from_secs(600)).await?;
    let status = drain_status(&c, DRAIN_NS, &format!("node-{drained}"))
        .await?
        .context("no node drain")?;
    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    ensure!(rows.iter().all(|r| r.connections >= 2), "a publisher did not move");
    let gop = Duration::from_secs(1);
    let model = Duration::from_secs(5) + gop + Duration::from_secs_f64(PUBLISHERS as f64 / f64::from(RATE));
    let mut stalls: Vec<Duration> = rows.iter().flat_map(|r| r.stalls.iter().copied()).collect();
    stalls.sort();
    say(&format!(
        "{PUBLISHERS} publishers, rate {RATE}/s: kubectl drain {:.1?}; IngestDrain {} ({} .. {}); model propagation 5 s + GOP 1 s + {PUBLISHERS}/{RATE} s = {model:.1?}",
        node_drain.took, status["phase"], status["startedAt"], status["completedAt"]
    ));
    let lost: usize = rows.iter().map(|r| r.lost).sum();
    let sent: usize = rows.iter().map(|r| r.sent).sum();
    say(&format!(
        "messages sent {sent}, lost {lost}; stall p50 {:.1?} p99 {:.1?} over {} moves",
        percentile(&stalls, 0.5).unwrap_or_default(),
        percentile(&stalls, 0.99).unwrap_or_default(),
        stalls.len()
    ));
    Ok(())
}
