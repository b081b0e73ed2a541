//! Issue 18's scenarios on the real API server: maintenance that is not one
//! clean drain at a time. Each installs the chart into its own namespace.

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
            let purged = system::purge(&c, HOLDS_NS).await;
            result.and(purged)
        })
        .timeout(Duration::from_secs(900)),
    ]
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
