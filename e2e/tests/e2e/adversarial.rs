//! Maintenance that is not one clean drain at a time, on a real three-node
//! cluster (`tests/maintenance.rs`): holds that must end, and node drains
//! that overlap and chain. Each scenario installs the chart into its own
//! namespace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{EvictParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use ingest_e2e::cluster::eventually;
use ingest_e2e::lossless::{self, Stage, drain_status, ingest_pods, say};
use ingest_e2e::system;
use ingest_e2e::{Cluster, Scenario};

const HOLDS_NS: &str = "holds-end";
const CONCURRENT_NS: &str = "concurrent-drains";
/// Capable publishers of the concurrent-drain scenario.
const CONCURRENT_PUBLISHERS: usize = 12;
/// The operator's drain deadline in these scenarios.
const DEADLINE: Duration = Duration::from_secs(40);
/// What an eviction may take beyond the deadline: the gate's grace (15 s),
/// a retry interval (5 s), the pod's own termination and the cluster's
/// latency.
const SLACK: Duration = Duration::from_secs(50);
/// Between two evictions of a held pod, as `kubectl drain` waits.
const RETRY: Duration = Duration::from_secs(5);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("adversarial_1_every_hold_ends", |c| async move {
            let result = every_hold_ends(c.clone()).await;
            let rbac = system::operator_never_forbidden(&c, HOLDS_NS).await;
            let purged = system::purge(&c, HOLDS_NS).await;
            result.and(rbac).and(purged)
        })
        .timeout(Duration::from_secs(900)),
        Scenario::new("adversarial_2_concurrent_and_chained_node_drains", |c| async move {
            let result = concurrent_and_chained_node_drains(c.clone()).await;
            let rbac = system::operator_never_forbidden(&c, CONCURRENT_NS).await;
            let purged = system::purge(&c, CONCURRENT_NS).await;
            result.and(rbac).and(purged)
        })
        .timeout(Duration::from_secs(900)),
    ]
}

/// Scenario 2: two nodes drained at once, as a consolidation does, the
/// second a moment after the first, once publishers moved from the first
/// node onto the second: those move again (A→B→C) while the first node's
/// pods may still hold their streams at the origin. Both `kubectl drain`s
/// finish (every eviction allowed in the end) and the origin gets every
/// publisher's media exactly once and in order.
async fn concurrent_and_chained_node_drains(c: Arc<Cluster>) -> Result<()> {
    let ns = CONCURRENT_NS;
    ensure!(c.nodes().len() >= 3, "this scenario needs three nodes: {:?}", c.nodes());
    let deadline = format!("operator.drain.deadline={}s", DEADLINE.as_secs() * 2);
    let stage = Stage::install(&c, ns, &[&deadline]).await?;
    let fleet = lossless::start_fleet(&stage, "cc", CONCURRENT_PUBLISHERS).await?;
    let before = ingest_pods(&c, ns).await?;
    say(&format!(
        "ingest pods before:\n{}",
        lossless::placement(&before).trim_end()
    ));
    let first = busiest_node(&before, &[])?;
    let on_first: Vec<String> = before
        .iter()
        .filter(|p| p.node == first)
        .flat_map(|p| p.streams.clone())
        .collect();
    let second_pods: Vec<String> = before
        .iter()
        .filter(|p| p.node != first)
        .map(|p| p.name.clone())
        .collect();

    let watch = lossless::DrainWatch::start(c.clone(), ns);
    let t = Instant::now();
    let first_drain = {
        let (c, node) = (c.clone(), first.clone());
        tokio::spawn(async move { lossless::kubectl_drain(&c, &node, DEADLINE * 2 + SLACK).await })
    };
    // The second node: the first whose pod took a publisher off the first node.
    let second = eventually(
        "a publisher moved off the first node",
        Duration::from_secs(90),
        || async {
            let now = ingest_pods(&c, ns).await?;
            now.iter()
                .filter(|p| p.node != first && second_pods.contains(&p.name))
                .find(|p| p.streams.iter().any(|s| on_first.contains(s)))
                .map(|p| p.node.clone())
                .context("none yet")
        },
    )
    .await?;
    say(&format!(
        "{:.1?}: a publisher moved from {first} to {second}; draining {second} too",
        t.elapsed()
    ));
    let second_drain = lossless::kubectl_drain(&c, &second, DEADLINE * 2 + SLACK).await;
    let first_drain = first_drain.await.context("kubectl drain task")?;
    let _ = watch.stop().await;
    let (first_drain, second_drain) = (first_drain?, second_drain?);
    say(&format!(
        "kubectl drain {first}: {:.1?}; kubectl drain {second}: {:.1?}",
        first_drain.took, second_drain.took
    ));
    for node in [&first, &second] {
        c.kubectl(&["uncordon", node]).await?;
    }
    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    let chained = rows.iter().filter(|r| r.connections >= 3).count();
    say(&format!(
        "audit at the origin ({chained} publishers moved twice or more):\n{}",
        lossless::report(&rows).trim_end()
    ));
    ensure!(chained >= 1, "no publisher moved twice: the chain was not exercised");
    Ok(())
}

/// The node whose ingest pods hold most publishers, not in `not`.
fn busiest_node(pods: &[lossless::IngestPod], not: &[&str]) -> Result<String> {
    let mut by_node: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in pods.iter().filter(|p| !not.contains(&p.node.as_str())) {
        *by_node.entry(p.node.as_str()).or_default() += p.streams.len();
    }
    by_node
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .filter(|(_, n)| *n > 0)
        .map(|(node, _)| node.to_owned())
        .with_context(|| format!("no node holds a publisher: {pods:?}"))
}

/// Scenario 1: an eviction is never held for ever.
/// - A drain that froze its rows before the pods were in its scope (an
///   IngestDrain per node applied while no ingest pod ran) does not hold
///   them: a bare eviction (no cordon) starts the pod's own drain, and
///   `kubectl drain` finishes as usual.
/// - With no leader (a foreign holder on the Lease), nobody writes drain
///   status: the gate still lets each eviction through at the drain's
///   deadline plus its grace, counted from the drain's creation.
///
/// Every eviction must end within deadline + slack, and the publishers
/// (moved by the drains, or by each pod's own SIGTERM drain) lose nothing.
async fn every_hold_ends(c: Arc<Cluster>) -> Result<()> {
    let ns = HOLDS_NS;
    let deadline = format!("operator.drain.deadline={}s", DEADLINE.as_secs());
    let stage = Stage::install(&c, ns, &[&deadline, "ingest.replicaCount=0"]).await?;
    for node in c.nodes() {
        pre_node_drain(&c, ns, node).await?;
    }
    let ingest = system::ingest_name();
    c.kubectl(&["-n", ns, "scale", "deployment", &ingest, "--replicas=3"])
        .await?;
    system::deployments_available(&c, ns, Duration::from_secs(120)).await?;
    let fleet = lossless::start_fleet(&stage, "hold", 3).await?;

    say("case 1: IngestDrains applied before the pods landed on their nodes");
    let pod = busiest_pod(&c, ns).await?;
    let took = evict_until_done(&c, ns, &pod).await?;
    say(&format!("bare eviction of {pod} (no cordon): done in {took:.1?}"));
    let node = node_of_an_ingest_pod(&c, ns, &pod).await?;
    let t = Instant::now();
    lossless::kubectl_drain(&c, &node, DEADLINE + SLACK).await?;
    say(&format!("kubectl drain {node}: done in {:.1?}", t.elapsed()));
    c.kubectl(&["uncordon", &node]).await?;
    system::deployments_available(&c, ns, Duration::from_secs(120)).await?;

    say("case 2: no leader, so no drain status is ever written");
    hijack_lease(&c, ns).await?;
    let pod = busiest_pod(&c, ns).await?;
    let took = evict_until_done(&c, ns, &pod).await?;
    let evict_drain = ingest_operator::webhook::drain_name(&pod);
    if let Some(status) = drain_status(&c, ns, &evict_drain).await? {
        ensure!(
            status["phase"].is_null() || status["phase"] == "Pending",
            "IngestDrain {evict_drain} has status {status} although no operator leads"
        );
    }
    say(&format!("bare eviction of {pod}, no leader: done in {took:.1?}"));
    let node = node_of_an_ingest_pod(&c, ns, &pod).await?;
    let t = Instant::now();
    lossless::kubectl_drain(&c, &node, DEADLINE + SLACK).await?;
    say(&format!("kubectl drain {node}, no leader: done in {:.1?}", t.elapsed()));
    c.kubectl(&["uncordon", &node]).await?;
    Api::<Lease>::namespaced(c.client(), ns)
        .delete(&system::operator_name(), &Default::default())
        .await?;

    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    say(&format!("audit at the origin:\n{}", lossless::report(&rows).trim_end()));
    Ok(())
}

/// Applies an IngestDrain of `node`'s ingest pods while none runs there:
/// it lists no pod and is Drained with zero rows.
async fn pre_node_drain(c: &Cluster, ns: &str, node: &str) -> Result<()> {
    let name = format!("pre-{node}");
    let manifest = format!(
        "apiVersion: ingest.lossless.dev/v1alpha1\nkind: IngestDrain\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  selector: {{matchLabels: {{app.kubernetes.io/component: ingest}}}}\n  nodeName: {node}\n  \
         deadlineSeconds: {}\n",
        DEADLINE.as_secs()
    );
    c.kubectl_with_input(&["apply", "-f", "-"], &manifest).await?;
    eventually(
        &format!("IngestDrain {name} Drained"),
        Duration::from_secs(60),
        || async {
            let status = drain_status(c, ns, &name).await?.unwrap_or_default();
            ensure!(status["phase"] == "Drained", "phase {}", status["phase"]);
            ensure!(status["totals"]["pods"] == 0, "rows {}", status["pods"]);
            Ok(())
        },
    )
    .await?;
    say(&format!(
        "IngestDrain {name} applied with no ingest pod on {node}: Drained, 0 pods"
    ));
    Ok(())
}

/// The ingest pod with most publishers.
async fn busiest_pod(c: &Cluster, ns: &str) -> Result<String> {
    let pods = ingest_pods(c, ns).await?;
    pods.iter()
        .filter(|p| p.ready)
        .max_by_key(|p| p.streams.len())
        .map(|p| p.name.clone())
        .with_context(|| format!("no ready ingest pod: {pods:?}"))
}

/// A node that runs an ingest pod other than `not`, preferring one with
/// publishers.
async fn node_of_an_ingest_pod(c: &Cluster, ns: &str, not: &str) -> Result<String> {
    let pods = ingest_pods(c, ns).await?;
    pods.iter()
        .filter(|p| p.name != not)
        .max_by_key(|p| p.streams.len())
        .map(|p| p.node.clone())
        .with_context(|| format!("no other ingest pod: {pods:?}"))
}

/// Names a holder that is not an operator pod on the operators' Lease, for
/// an hour: no replica leads, the webhook still answers.
async fn hijack_lease(c: &Cluster, ns: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(c.client(), ns);
    let name = system::operator_name();
    let patch = serde_json::json!({ "spec": {
        "holderIdentity": "maintenance-window",
        "leaseDurationSeconds": 3600,
        "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
    }});
    leases
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    // A leader notices at its next renewal (a third of the lease duration).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let holder = leases.get(&name).await?.spec.and_then(|s| s.holder_identity);
    ensure!(
        holder.as_deref() == Some("maintenance-window"),
        "an operator took the Lease back: {holder:?}"
    );
    say("Lease held by maintenance-window: no operator leads");
    Ok(())
}

/// Evicts `pod` through the Eviction API as `kubectl drain` does, retrying
/// every 429 after [`RETRY`], until the eviction is allowed or the pod is
/// gone; fails past [`DEADLINE`] + [`SLACK`]. Returns the time it took.
async fn evict_until_done(c: &Cluster, ns: &str, pod: &str) -> Result<Duration> {
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    let uid = pods.get(pod).await?.uid().unwrap_or_default();
    let t = Instant::now();
    let mut refusals = 0;
    loop {
        match pods.evict(pod, &EvictParams::default()).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 404 => break,
            Err(kube::Error::Api(s)) if s.code == 429 => {
                refusals += 1;
                if refusals == 1 || refusals % 4 == 0 {
                    println!(
                        "    {:>5.1}s  evict {pod}: 429 {}",
                        t.elapsed().as_secs_f64(),
                        s.message
                    );
                }
            }
            Err(err) => return Err(err).with_context(|| format!("evicting {pod}")),
        }
        if t.elapsed() > DEADLINE + SLACK {
            bail!(
                "the eviction of {pod} is still held after {:.0?} ({refusals} refusals); \
                 a hold must end by the drain deadline ({DEADLINE:?}) plus slack",
                t.elapsed()
            );
        }
        tokio::time::sleep(RETRY).await;
    }
    let took = t.elapsed();
    println!(
        "    {:>5.1}s  evict {pod}: done after {refusals} refusals",
        took.as_secs_f64()
    );
    eventually(&format!("pod {pod} to go"), Duration::from_secs(90), || async {
        match pods.get_opt(pod).await? {
            Some(p) if p.uid().as_deref() == Some(uid.as_str()) => bail!("{pod} is still there"),
            _ => Ok(()),
        }
    })
    .await?;
    Ok(took)
}
