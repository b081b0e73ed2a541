//! Issue 9's scenarios: the chart-installed system on the two-node cluster,
//! publishers through the Service VIP, the nginx-rtmp origin on the host,
//! every loss claim checked by payload hashes (`lossless::stop_and_audit`).
//! Each scenario installs the chart into its own namespace; the runner
//! deletes it (and uncordons the nodes) afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ingest_operator::crd::IngestDrain;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, ResourceExt};

use ingest_e2e::cluster::eventually;
use ingest_e2e::lossless::{self, DrainWatch, IngestPod, Stage, drain_status, ingest_pods, placement, say};
use ingest_e2e::system::{self, OPERATOR_PODS, deployments_available};
use ingest_e2e::{Cluster, Scenario};

use crate::operator;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario("lossless_1_node_drain", lossless::NODE_DRAIN_NS, |c| {
            Box::pin(lossless::node_drain(c))
        }),
        scenario("lossless_2_ingestdrain_kubectl_apply", APPLY_NS, |c| {
            Box::pin(ingestdrain_kubectl_apply(c))
        }),
        scenario("lossless_3_eviction_gate", GATE_NS, |c| Box::pin(eviction_gate(c))),
        scenario("lossless_4_rollout_restart", ROLLOUT_NS, |c| {
            Box::pin(rollout_restart(c))
        }),
        scenario("lossless_5_leader_deleted_mid_drain", LEADER_NS, |c| {
            Box::pin(leader_deleted_mid_drain(c))
        }),
        scenario("lossless_6_uncordon_mid_drain", UNCORDON_NS, |c| {
            Box::pin(uncordon_mid_drain(c))
        }),
        scenario("lossless_7_bad_manifests_refused", BAD_NS, |c| {
            Box::pin(bad_manifests_refused(c))
        }),
    ]
}

const APPLY_NS: &str = "drain-apply";
const GATE_NS: &str = "eviction-gate";
const ROLLOUT_NS: &str = "rollout";
const LEADER_NS: &str = "leader-failover";
const UNCORDON_NS: &str = "uncordon";
const BAD_NS: &str = "bad-manifests";

type ScenarioFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// A scenario on its own install: whatever the chart put outside the
/// namespace (CRD, cluster roles, webhook configuration) is removed after
/// it, also on failure.
pub(crate) fn scenario(name: &'static str, ns: &'static str, run: fn(Arc<Cluster>) -> ScenarioFuture) -> Scenario {
    Scenario::new(name, move |c| async move {
        let result = run(c.clone()).await;
        let rbac = system::operator_never_forbidden(&c, ns).await;
        let purged = system::purge(&c, ns).await;
        result.and(rbac).and(purged)
    })
    .timeout(Duration::from_secs(900))
}

/// The ingest pod holding most publishers.
fn busiest(pods: &[IngestPod]) -> Result<&IngestPod> {
    pods.iter()
        .max_by_key(|p| p.streams.len())
        .filter(|p| !p.streams.is_empty())
        .with_context(|| format!("no ingest pod holds a publisher: {pods:?}"))
}

/// Scenario 2: a selector-based IngestDrain applied with `kubectl apply -f`,
/// read back the way a user reads it: phases as `kubectl get -w` shows them,
/// per-pod counts, the printer columns, Events in `kubectl describe`.
async fn ingestdrain_kubectl_apply(c: Arc<Cluster>) -> Result<()> {
    let stage = Stage::install(&c, APPLY_NS, &[]).await?;
    let ns = APPLY_NS;
    let fleet = lossless::start_fleet(&stage, "apply", 9).await?;
    let pods = ingest_pods(&c, ns).await?;
    say(&format!("ingest pods:\n{}", placement(&pods).trim_end()));
    let target = busiest(&pods)?.clone();
    let n = target.streams.len();
    c.kubectl(&["-n", ns, "label", "pod", &target.name, "maintenance=now"])
        .await?;
    let manifest = format!(
        r#"apiVersion: ingest.lossless.dev/v1alpha1
kind: IngestDrain
metadata:
  name: maintenance
  namespace: {ns}
spec:
  selector:
    matchLabels:
      app.kubernetes.io/component: ingest
      maintenance: now
  deadlineSeconds: 120
  rate: 2
  propagationDelaySeconds: 8
"#
    );
    say(&format!(
        "$ kubectl apply -f maintenance.yaml (selects {}, {n} publishers)",
        target.name
    ));
    let watch = DrainWatch::start(c.clone(), ns);
    let applied = c.kubectl_with_input(&["apply", "-f", "-"], &manifest).await?;
    say(applied.trim());
    let n_text = n.to_string();
    let draining = eventually(
        "kubectl get ingestdrains to show maintenance Draining with its publishers",
        Duration::from_secs(30),
        || operator::printed(&c, ns, "maintenance", ["Draining", "1", "0", &n_text]),
    )
    .await?;
    // Before the first signal (the propagation delay), the row counts the
    // pod's connections by capability.
    let early = drain_status(&c, ns, "maintenance")
        .await?
        .context("maintenance is gone")?;
    let conns = early["pods"][0]["connections"].clone();
    let capable = conns["goAway"].as_i64().unwrap_or(0) + conns["reconnectRequest"].as_i64().unwrap_or(0);
    ensure!(
        capable == n as i64 && conns["incapable"].as_i64() == Some(0),
        "the row of {} does not count its {n} capable publishers: {conns}",
        target.name
    );
    let drained = eventually(
        "kubectl get ingestdrains to show maintenance Drained",
        Duration::from_secs(120),
        || operator::printed(&c, ns, "maintenance", ["Drained", "1", "1", "0"]),
    )
    .await?;
    // Let the watch (it polls twice a second) print the final row too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = watch.stop().await;
    let phases: Vec<&str> = seen
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .fold(Vec::new(), |mut v, p| {
            if v.last() != Some(&p) {
                v.push(p);
            }
            v
        });
    let draining_at = phases.iter().position(|p| *p == "Draining");
    let drained_at = phases.iter().position(|p| *p == "Drained");
    ensure!(
        matches!((draining_at, drained_at), (Some(a), Some(b)) if a < b),
        "phases seen by kubectl get: {phases:?}, want Draining then Drained"
    );
    say(&format!(
        "$ kubectl get ingestdrains (while draining)\n{}",
        operator::indent(&draining).trim_end()
    ));
    say(&format!(
        "$ kubectl get ingestdrains\n{}",
        operator::indent(&drained).trim_end()
    ));

    let wide = c
        .kubectl(&["-n", ns, "get", "ingestdrains", "maintenance", "-o", "wide"])
        .await?;
    let cols: Vec<Vec<&str>> = wide.lines().map(|l| l.split_whitespace().collect()).collect();
    let migrated = cols
        .first()
        .and_then(|h| h.iter().position(|c| *c == "MIGRATED"))
        .and_then(|i| cols.get(1)?.get(i).copied());
    ensure!(
        migrated == Some(n_text.as_str()),
        "-o wide shows MIGRATED {migrated:?}, want {n}:\n{wide}"
    );
    say(&format!(
        "$ kubectl get ingestdrains -o wide\n{}",
        operator::indent(&wide).trim_end()
    ));
    let drain = Api::<IngestDrain>::namespaced(c.client(), ns)
        .get("maintenance")
        .await?;
    let ssa = drain.managed_fields().iter().any(|m| {
        m.manager.as_deref() == Some("ingest-operator")
            && m.operation.as_deref() == Some("Apply")
            && m.subresource.as_deref() == Some("status")
    });
    ensure!(
        ssa,
        "the status was not server-side applied by ingest-operator: {:?}",
        drain.managed_fields()
    );
    let typed = drain.status.clone().unwrap_or_default();
    ensure!(
        typed.observed_generation == drain.metadata.generation
            && typed.completed_at.is_some()
            && typed.conditions.iter().any(|c| c.status == "True"),
        "incomplete status: {typed:?}"
    );

    let status = drain_status(&c, ns, "maintenance")
        .await?
        .context("maintenance is gone")?;
    let row = status["pods"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == target.name.as_str()))
        .with_context(|| format!("no status row for {}: {status}", target.name))?;
    ensure!(
        row["signalled"].as_i64() == Some(n as i64) && row["migrated"].as_i64() == Some(n as i64),
        "the row of {} does not count its {n} capable publishers as signalled and migrated: {row}",
        target.name
    );
    say(&format!(
        "status row: {} state {} connections {conns} signalled {} migrated {}",
        target.name, row["state"], row["signalled"], row["migrated"]
    ));

    let described = c.kubectl(&["-n", ns, "describe", "ingestdrain", "maintenance"]).await?;
    let events = described
        .split_once("Events:")
        .map(|(_, e)| e.to_owned())
        .context("kubectl describe shows no Events")?;
    for reason in ["Draining", "Drained"] {
        ensure!(
            events.lines().any(|l| l.split_whitespace().nth(1) == Some(reason)),
            "kubectl describe shows no {reason} Event:\n{events}"
        );
    }
    say(&format!(
        "$ kubectl describe ingestdrain maintenance | Events\n{}",
        events.trim_end()
    ));

    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    for r in &rows {
        let moved = target.streams.contains(&r.stream);
        ensure!(
            moved == (r.connections >= 2 && r.signals.len() == 1),
            "{}: on {}: {moved}, yet {r:?}",
            r.stream,
            target.name
        );
    }
    say(&format!("audit at the origin:\n{}", lossless::report(&rows).trim_end()));
    Ok(())
}

/// Scenario 3: the eviction gate through the API server. An undrained
/// ingest pod's eviction gets 429 naming its remaining publishers until the
/// operator drained it (then the operator evicts it); a non-ingest pod's
/// eviction passes at once; with the operator scaled to zero every eviction
/// passes (failurePolicy Ignore) and the pod's SIGTERM drain still moves
/// the publisher. All of it lossless.
async fn eviction_gate(c: Arc<Cluster>) -> Result<()> {
    let stage = Stage::install(&c, GATE_NS, &[]).await?;
    let fleet = lossless::start_fleet(&stage, "gate", 1).await?;
    let publisher = &fleet[0].publisher;
    operator::eviction_held_until_drained(&c, GATE_NS, publisher).await?;
    operator::non_ingest_eviction_allowed(&c, GATE_NS).await?;
    operator_metrics_counted_it(&c, GATE_NS).await?;
    operator::eviction_allowed_without_operator(&c, GATE_NS, publisher).await?;
    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    ensure!(
        rows[0].connections >= 3,
        "the publisher should have moved twice (held eviction, eviction without operator): {:?}",
        rows[0]
    );
    say(&format!("audit at the origin:\n{}", lossless::report(&rows).trim_end()));
    Ok(())
}

/// The sum over the operator replicas of every sample of `metric` whose
/// labels contain `labels` (their `/metrics`, through the API server).
fn sum_of(pages: &[String], metric: &str, labels: &str) -> f64 {
    pages
        .iter()
        .flat_map(|p| p.lines())
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(name, _)| {
            let (base, rest) = name.split_once('{').unwrap_or((name, ""));
            base == metric && rest.contains(labels)
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// The operators' `/metrics` counted what the gate and the drain did:
/// webhook decisions (start, hold, allow) and their latency, reconciles,
/// the finished drain, its duration and the migrated publisher.
async fn operator_metrics_counted_it(c: &Cluster, ns: &str) -> Result<()> {
    let mut pages = Vec::new();
    for (pod, _, _) in c.pods(ns, OPERATOR_PODS).await? {
        let path = format!("/api/v1/namespaces/{ns}/pods/{pod}:8080/proxy/metrics");
        pages.push(c.kubectl(&["get", "--raw", &path]).await?);
    }
    let want = [
        ("ingest_operator_webhook_decisions_total", r#"decision="start""#),
        ("ingest_operator_webhook_decisions_total", r#"decision="hold""#),
        ("ingest_operator_webhook_decisions_total", r#"decision="allow""#),
        ("ingest_operator_webhook_duration_seconds_count", ""),
        ("ingest_operator_reconciles_total", ""),
        ("ingest_operator_reconcile_duration_seconds_count", ""),
        ("ingest_operator_drain_duration_seconds_count", ""),
        ("ingest_operator_publishers_migrated_total", ""),
        ("ingest_operator_leader", ""),
    ];
    for (metric, labels) in want {
        let v = sum_of(&pages, metric, labels);
        ensure!(v >= 1.0, "{metric}{{{labels}}} is {v} on the operators' /metrics");
    }
    // Drains by phase is a gauge recounted from the cache (the gate's drain
    // went with its evicted pod): it must be exported, whatever its value.
    ensure!(
        pages.iter().any(|p| p
            .lines()
            .any(|l| l.starts_with(r#"ingest_operator_drains{phase="Drained"}"#))),
        "the operators' /metrics have no drains-by-phase gauge"
    );
    say(&format!(
        "operator /metrics: webhook start {} hold {} allow {}, reconciles {}, migrated {}",
        sum_of(&pages, "ingest_operator_webhook_decisions_total", r#"decision="start""#),
        sum_of(&pages, "ingest_operator_webhook_decisions_total", r#"decision="hold""#),
        sum_of(&pages, "ingest_operator_webhook_decisions_total", r#"decision="allow""#),
        sum_of(&pages, "ingest_operator_reconciles_total", ""),
        sum_of(&pages, "ingest_operator_publishers_migrated_total", "")
    ));
    Ok(())
}

/// Scenario 4: `kubectl rollout restart` of the ingest Deployment. Every
/// old pod goes by its own SIGTERM drain within the chart's grace period;
/// every publisher moves at least once, losing nothing.
async fn rollout_restart(c: Arc<Cluster>) -> Result<()> {
    let stage = Stage::install(&c, ROLLOUT_NS, &[]).await?;
    let ns = ROLLOUT_NS;
    let fleet = lossless::start_fleet(&stage, "roll", 12).await?;
    let before = ingest_pods(&c, ns).await?;
    say(&format!("ingest pods before:\n{}", placement(&before).trim_end()));
    let deployment = format!("deployment/{}", system::ingest_name());
    let t = Instant::now();
    say(&format!("$ kubectl rollout restart {deployment}"));
    c.kubectl(&["-n", ns, "rollout", "restart", &deployment]).await?;
    let out = c
        .kubectl(&["-n", ns, "rollout", "status", &deployment, "--timeout=600s"])
        .await?;
    say(&format!(
        "{} ({:.1?})",
        out.lines().last().unwrap_or_default(),
        t.elapsed()
    ));
    eventually("the old ingest pods gone", Duration::from_secs(120), || async {
        let names: Vec<String> = system::all_pods(&c, ns, system::INGEST_PODS)
            .await?
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        let left: Vec<&String> = names.iter().filter(|n| before.iter().any(|b| &b.name == *n)).collect();
        ensure!(left.is_empty(), "old pods still there: {left:?}");
        Ok(())
    })
    .await?;
    let rollout = t.elapsed();
    let after = ingest_pods(&c, ns).await?;
    say(&format!("ingest pods after:\n{}", placement(&after).trim_end()));
    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    let unmoved: Vec<&str> = rows
        .iter()
        .filter(|r| r.connections < 2)
        .map(|r| r.stream.as_str())
        .collect();
    ensure!(
        unmoved.is_empty(),
        "every old pod was replaced, yet these publishers never moved: {unmoved:?}"
    );
    say(&format!(
        "rollout of 3 pods in {rollout:.1?}; audit at the origin:\n{}",
        lossless::report(&rows).trim_end()
    ));
    Ok(())
}

/// The holder of the operator's leader Lease.
async fn leader(c: &Cluster, ns: &str) -> Result<String> {
    let lease = Api::<Lease>::namespaced(c.client(), ns)
        .get(&system::operator_name())
        .await?;
    lease
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
        .context("the Lease has no holder")
}

/// Scenario 5: the leading operator pod is deleted while an IngestDrain
/// signals publishers in slow waves. Another replica takes the Lease and
/// finishes the drain from its status; no publisher is signalled twice.
async fn leader_deleted_mid_drain(c: Arc<Cluster>) -> Result<()> {
    let stage = Stage::install(&c, LEADER_NS, &[]).await?;
    let ns = LEADER_NS;
    let fleet = lossless::start_fleet(&stage, "lead", 12).await?;
    let pods = ingest_pods(&c, ns).await?;
    let target = busiest(&pods)?.clone();
    let n = target.streams.len();
    ensure!(n >= 2, "want at least 2 publishers on one pod: {pods:?}");
    let old_leader = eventually("a leader", Duration::from_secs(60), || leader(&c, ns)).await?;
    say(&format!(
        "leader {old_leader}; draining {} ({n} publishers) at one signal every 2 s",
        target.name
    ));
    let manifest = format!(
        r#"apiVersion: ingest.lossless.dev/v1alpha1
kind: IngestDrain
metadata: {{name: slow, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app.kubernetes.io/component: ingest}}}}
  podNames: [{pod}]
  deadlineSeconds: 300
  rate: 0.5
  propagationDelaySeconds: 3
"#,
        pod = target.name
    );
    let watch = DrainWatch::start(c.clone(), ns);
    c.kubectl_with_input(&["apply", "-f", "-"], &manifest).await?;
    eventually("the first signal", Duration::from_secs(60), || async {
        let status = drain_status(&c, ns, "slow").await?.unwrap_or_default();
        let signalled = status["totals"]["signalled"].as_i64().unwrap_or(0);
        ensure!(signalled >= 1, "signalled {signalled}");
        ensure!(
            (signalled as usize) < n,
            "all {n} signalled before the leader could be deleted; slow the waves"
        );
        Ok(())
    })
    .await?;
    say(&format!("$ kubectl delete pod {old_leader} (mid-drain)"));
    c.kubectl(&["-n", ns, "delete", "pod", &old_leader, "--wait=false"])
        .await?;
    let t = Instant::now();
    let new_leader = eventually(
        "another operator pod to take the Lease",
        Duration::from_secs(90),
        || async {
            let holder = leader(&c, ns).await?;
            ensure!(holder != old_leader, "{old_leader} still holds the Lease");
            Ok(holder)
        },
    )
    .await?;
    say(&format!(
        "{new_leader} took the Lease {:.1?} after the delete",
        t.elapsed()
    ));
    eventually("slow Drained", Duration::from_secs(180), || async {
        let status = drain_status(&c, ns, "slow").await?.unwrap_or_default();
        ensure!(status["phase"] == "Drained", "phase {}", status["phase"]);
        Ok(())
    })
    .await?;
    let _ = watch.stop().await;
    let logs = c
        .kubectl(&["-n", ns, "logs", &new_leader, "--tail=-1"])
        .await
        .unwrap_or_default();
    ensure!(
        logs.contains("leading: starting the controllers"),
        "{new_leader} never started leading:\n{logs}"
    );
    let operators: Vec<String> = c.pods(ns, OPERATOR_PODS).await?.into_iter().map(|p| p.0).collect();
    ensure!(
        operators.contains(&new_leader),
        "the new leader {new_leader} is not among the operator pods {operators:?}"
    );

    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    for r in &rows {
        let on_target = target.streams.contains(&r.stream);
        let want = usize::from(on_target);
        ensure!(
            r.signals.len() == want,
            "{} got {} signal(s), want {want} (on {}: {on_target}): {r:?}",
            r.stream,
            r.signals.len(),
            target.name
        );
    }
    say(&format!(
        "every publisher of {} signalled exactly once, none elsewhere; audit:\n{}",
        target.name,
        lossless::report(&rows).trim_end()
    ));
    Ok(())
}

/// Scenario 6: a node is cordoned (the operator drains its ingest pods in
/// waves of one signal a second) and uncordoned mid-drain: the IngestDrain is Cancelled, the
/// pods turn ready again and keep the publishers not yet signalled.
async fn uncordon_mid_drain(c: Arc<Cluster>) -> Result<()> {
    // One signal a second (helm's --set reads 0.5 as a string; whole numbers only here).
    let stage = Stage::install(&c, UNCORDON_NS, &["operator.drain.rate=1"]).await?;
    let ns = UNCORDON_NS;
    let fleet = lossless::start_fleet(&stage, "unc", 12).await?;
    let pods = ingest_pods(&c, ns).await?;
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &pods {
        *per_node.entry(p.node.as_str()).or_default() += p.streams.len();
    }
    let node = per_node
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(node, _)| (*node).to_owned())
        .context("no node")?;
    let node_pods: Vec<IngestPod> = pods.iter().filter(|p| p.node == node).cloned().collect();
    let on_node: Vec<String> = node_pods.iter().flat_map(|p| p.streams.clone()).collect();
    ensure!(on_node.len() >= 3, "want at least 3 publishers on {node}: {pods:?}");
    say(&format!(
        "$ kubectl cordon {node} ({} publishers on its ingest pods)",
        on_node.len()
    ));
    let watch = DrainWatch::start(c.clone(), ns);
    c.kubectl(&["cordon", &node]).await?;
    let name = format!("node-{node}");
    eventually("the first signal", Duration::from_secs(60), || async {
        let status = drain_status(&c, ns, &name).await?.unwrap_or_default();
        let signalled = status["totals"]["signalled"].as_i64().unwrap_or(0);
        ensure!(signalled >= 1, "signalled {signalled}");
        Ok(())
    })
    .await?;
    say(&format!("$ kubectl uncordon {node} (mid-drain)"));
    c.kubectl(&["uncordon", &node]).await?;
    let status = eventually(&format!("{name} Cancelled"), Duration::from_secs(60), || async {
        let status = drain_status(&c, ns, &name).await?.unwrap_or_default();
        ensure!(status["phase"] == "Cancelled", "phase {}", status["phase"]);
        Ok(status)
    })
    .await?;
    let signalled = status["totals"]["signalled"].as_i64().unwrap_or(0);
    ensure!(
        (signalled as usize) < on_node.len(),
        "all {} publishers were signalled before the cancel took effect",
        on_node.len()
    );
    eventually(
        "the node's ingest pods ready again",
        Duration::from_secs(60),
        || async {
            let now = ingest_pods(&c, ns).await?;
            let unready: Vec<&str> = now
                .iter()
                .filter(|p| p.node == node && !p.ready)
                .map(|p| p.name.as_str())
                .collect();
            ensure!(unready.is_empty(), "unready: {unready:?}");
            Ok(())
        },
    )
    .await?;
    // The waves stopped: nothing more is signalled after a while.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _ = watch.stop().await;
    let after = ingest_pods(&c, ns).await?;
    say(&format!(
        "ingest pods after the uncordon:\n{}",
        placement(&after).trim_end()
    ));
    // A pod whose publishers had all left before the cancel took effect was
    // released (node drains evict), and its replacement may start anywhere;
    // every other pod stays.
    let rows_at_cancel = status["pods"].as_array().cloned().unwrap_or_default();
    let released: Vec<&str> = rows_at_cancel
        .iter()
        .filter(|r| matches!(r["state"].as_str(), Some("Drained" | "Evicted")))
        .filter_map(|r| r["name"].as_str())
        .collect();
    for r in &rows_at_cancel {
        if released.contains(&r["name"].as_str().unwrap_or_default()) {
            ensure!(
                r["remaining"].as_i64() == Some(0),
                "a pod was released with publishers left: {r}"
            );
        }
    }
    ensure!(
        rows_at_cancel.iter().any(|r| r["state"] == "Cancelled"),
        "no pod's drain was cancelled: {status}"
    );
    let kept_pods: Vec<&str> = pods
        .iter()
        .map(|p| p.name.as_str())
        .filter(|name| !released.contains(name))
        .collect();
    let missing: Vec<&&str> = kept_pods
        .iter()
        .filter(|name| !after.iter().any(|p| p.name == **name))
        .collect();
    ensure!(
        missing.is_empty(),
        "ingest pods not drained at the cancel went away: {missing:?}; {pods:?} -> {after:?}; released {released:?}"
    );

    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    let kept: Vec<&str> = rows
        .iter()
        .filter(|r| on_node.contains(&r.stream) && r.signals.is_empty())
        .map(|r| r.stream.as_str())
        .collect();
    for r in &rows {
        ensure!(
            r.signals.is_empty() == (r.connections == 1),
            "{}: signalled and reconnected must go together: {r:?}",
            r.stream
        );
        ensure!(
            on_node.contains(&r.stream) || r.signals.is_empty(),
            "{} was not on {node}, yet it was signalled: {r:?}",
            r.stream
        );
    }
    let moved = rows.iter().filter(|r| !r.signals.is_empty()).count();
    ensure!(
        moved >= 1 && !kept.is_empty(),
        "the cancelled drain moved {moved} publisher(s) and kept {kept:?} on {node}; want some of each"
    );
    say(&format!(
        "cancelled after {signalled} signal(s); {} publishers stayed on {node}; audit:\n{}",
        kept.len(),
        lossless::report(&rows).trim_end()
    ));
    Ok(())
}

/// Scenario 7: bad IngestDrain manifests against the installed system are
/// refused by the API server with messages that say what is wrong.
async fn bad_manifests_refused(c: Arc<Cluster>) -> Result<()> {
    let _stage = Stage::install(&c, BAD_NS, &[]).await?;
    operator::bad_manifests_refused(&c, BAD_NS).await?;
    deployments_available(&c, BAD_NS, Duration::from_secs(30)).await?;
    Ok(())
}
