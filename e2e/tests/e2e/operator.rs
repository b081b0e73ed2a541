//! The operator on the real API server (issue 7): the CRD's schema and CEL
//! rules as `kubectl apply` reports them, and — as steps of the chart's
//! install in `chart.rs`, so the operator runs in-cluster with exactly the
//! chart's RBAC — the eviction gate, status by server-side apply and the
//! printer columns, and failurePolicy Ignore with the operator stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{EvictParams, ListParams, PostParams};
use kube::core::Status;
use kube::{Api, ResourceExt};

use ingest_e2e::cluster::eventually;
use ingest_e2e::rtmp::BackgroundPublisher;
use ingest_e2e::system::{self, CRD, OPERATOR_PODS, deployments_available};
use ingest_e2e::{Cluster, Scenario};
use ingest_operator::crd::{DrainPhase, IngestDrain, TRIGGER_LABEL};
use ingest_operator::webhook;

const CRD_NS: &str = "operator-crd";
/// Columns `kubectl get ingestdrains` prints.
const COLUMNS: [&str; 6] = ["NAME", "PHASE", "PODS", "DRAINED", "REMAINING", "AGE"];

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new("operator_crd_validation", |c| async move {
        system::purge(&c, CRD_NS).await?;
        let result = crd_validation(c.clone()).await;
        let purged = system::purge(&c, CRD_NS).await;
        result.and(purged)
    })]
}

/// A bad IngestDrain, the kubectl flags it is applied with, and what the
/// refusal must say.
struct Bad {
    what: &'static str,
    spec: &'static str,
    flags: &'static [&'static str],
    says: &'static str,
}

const SELECTOR: &str = "selector: {matchLabels: {app: ingest}}";

const BAD: [Bad; 6] = [
    Bad {
        what: "empty selector",
        spec: "selector: {}",
        flags: &[],
        says: "selector must have matchLabels or matchExpressions",
    },
    Bad {
        what: "negative rate",
        spec: "rate: -1",
        flags: &[],
        says: "rate is signals per second and must not be negative",
    },
    Bad {
        what: "redirect template that is not rtmp",
        spec: "redirect: {urlTemplate: 'http://{pod}.ingest.example.com/live'}",
        flags: &[],
        says: "redirect.urlTemplate must start with rtmp:// or rtmps://",
    },
    Bad {
        what: "deadlineSeconds 0",
        spec: "deadlineSeconds: 0",
        flags: &[],
        says: "deadlineSeconds must be between 1 and 86400",
    },
    Bad {
        what: "unknown incapablePolicy",
        spec: "incapablePolicy: Sometimes",
        flags: &[],
        says: "Unsupported value: \"Sometimes\"",
    },
    Bad {
        what: "unknown field",
        spec: "colour: red",
        flags: &["--validate=strict"],
        says: "unknown field \"spec.colour\"",
    },
];

fn drain_manifest(ns: &str, name: &str, spec_lines: &[&str]) -> String {
    let spec: String = spec_lines.iter().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: ingest.lossless.dev/v1alpha1\nkind: IngestDrain\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

async fn crd_validation(c: Arc<Cluster>) -> Result<()> {
    let crd_file = system::workspace_root().join("crds").join(format!("{CRD}.yaml"));
    let crd_file = crd_file.to_str().context("CRD path is not UTF-8")?;
    let out = c.kubectl(&["apply", "-f", crd_file]).await?;
    ensure!(out.contains("created"), "kubectl apply of the CRD: {out}");
    c.kubectl(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD}"),
        "--timeout=60s",
    ])
    .await?;
    c.namespace(CRD_NS).await?;
    bad_manifests_refused(&c, CRD_NS).await
}

/// A valid IngestDrain is accepted and listed with our printer columns;
/// each bad one is refused by the API server (schema, CEL, strict field
/// validation) with a message that says what is wrong, and not created.
pub async fn bad_manifests_refused(c: &Cluster, ns: &str) -> Result<()> {
    // A good one is accepted (once discovery knows the new kind).
    let good = drain_manifest(ns, "good", &[SELECTOR, "deadlineSeconds: 60"]);
    eventually("a valid IngestDrain to be accepted", Duration::from_secs(30), || {
        c.kubectl_with_input(&["apply", "-f", "-"], &good)
    })
    .await?;
    let table = c.kubectl(&["-n", ns, "get", "ingestdrains"]).await?;
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    ensure!(
        header == COLUMNS,
        "kubectl get ingestdrains prints {header:?}, want {COLUMNS:?}"
    );

    for (i, bad) in BAD.iter().enumerate() {
        let name = format!("bad-{i}");
        let spec = if bad.spec.starts_with("selector") {
            drain_manifest(ns, &name, &[bad.spec])
        } else {
            drain_manifest(ns, &name, &[SELECTOR, bad.spec])
        };
        let mut args = vec!["apply"];
        args.extend(bad.flags);
        args.extend(["-f", "-"]);
        let refusal = match c.kubectl_with_input(&args, &spec).await {
            Ok(out) => bail!(
                "the API server accepted an IngestDrain with {}: {out}\n{spec}",
                bad.what
            ),
            Err(err) => format!("{err:#}"),
        };
        ensure!(
            refusal.contains(bad.says),
            "an IngestDrain with {} was refused, but kubectl does not say {:?}:\n{refusal}",
            bad.what,
            bad.says
        );
        let exists = c
            .kubectl(&[
                "-n",
                ns,
                "get",
                "ingestdrain",
                &name,
                "--ignore-not-found",
                "-o",
                "name",
            ])
            .await?;
        ensure!(
            exists.trim().is_empty(),
            "{name} ({}) exists after its refusal",
            bad.what
        );
        // kubectl's own words, without our "kubectl ... failed (exit status)" prefix.
        let line = refusal.lines().find(|l| l.contains(bad.says)).unwrap_or_default();
        let said = line.split_once("): ").map_or(line, |(_, said)| said).trim();
        println!("  {}: {said}", bad.what);
    }
    c.kubectl(&["-n", ns, "delete", "ingestdrain", "good", "--timeout=60s"])
        .await?;
    Ok(())
}

/// An eviction through the API server: `None` if allowed, else the refusal.
async fn evict(c: &Cluster, ns: &str, pod: &str, dry_run: bool) -> Result<Option<Box<Status>>> {
    let params = EvictParams {
        post_options: PostParams {
            dry_run,
            ..PostParams::default()
        },
        ..EvictParams::default()
    };
    match Api::<Pod>::namespaced(c.client(), ns).evict(pod, &params).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) => Ok(Some(status)),
        Err(err) => Err(err).with_context(|| format!("evicting {ns}/{pod}")),
    }
}

/// Waits until the publisher made `more` connections than in `before`
/// (it moved pods) after being signalled.
async fn publisher_moved(publisher: &BackgroundPublisher, connections_before: u32) -> Result<()> {
    eventually(
        "the publisher to reconnect elsewhere",
        Duration::from_secs(60),
        || async {
            let p = publisher.progress();
            ensure!(!p.done, "the publisher stopped: {p:?}");
            ensure!(
                p.connections > connections_before,
                "still on connection {} of {connections_before}: {p:?}",
                p.connections
            );
            Ok(())
        },
    )
    .await
}

async fn gone(c: &Cluster, ns: &str, pod: &str, uid: &str, timeout: Duration) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    eventually(&format!("pod {pod} to go"), timeout, || async {
        match pods.get_opt(pod).await? {
            Some(p) if p.uid().as_deref() == Some(uid) => bail!(
                "{pod} is still there (terminating: {})",
                p.metadata.deletion_timestamp.is_some()
            ),
            _ => Ok(()),
        }
    })
    .await
}

/// The eviction gate, through the API server: an ingest pod with a capable
/// publisher is held with 429 while the gate starts its drain (IngestDrain
/// `evict-<pod>`), retries are held with the count of remaining publishers,
/// the drain reaches Drained and the operator evicts the pod itself.
pub async fn eviction_held_until_drained(c: &Cluster, ns: &str, publisher: &BackgroundPublisher) -> Result<()> {
    let (pod, n) = system::pod_with_publishers(c, ns).await?;
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    let uid = pods.get(&pod).await?.uid().unwrap_or_default();
    let connections = publisher.progress().connections;

    let t = Instant::now();
    let first = evict(c, ns, &pod, false)
        .await?
        .with_context(|| format!("the eviction of {pod}, which holds {n} publisher(s), was allowed at once"))?;
    ensure!(
        first.code == 429 && first.reason == "TooManyRequests",
        "the eviction of {pod} was refused with {} {} (want 429 TooManyRequests, which kubectl drain retries): {}",
        first.code,
        first.reason,
        first.message
    );
    ensure!(
        first.message.contains(&pod),
        "the 429 does not name {pod}: {}",
        first.message
    );
    println!("  evict {pod}: {} {}: {}", first.code, first.reason, first.message);

    let drains: Api<IngestDrain> = Api::namespaced(c.client(), ns);
    let name = webhook::drain_name(&pod);
    let drain = eventually(&format!("IngestDrain {name}"), Duration::from_secs(30), || async {
        drains
            .get_opt(&name)
            .await?
            .with_context(|| format!("no IngestDrain {name}"))
    })
    .await?;
    ensure!(
        drain.labels().get(TRIGGER_LABEL).map(String::as_str) == Some("eviction"),
        "{name} is not labelled {TRIGGER_LABEL}=eviction: {:?}",
        drain.labels()
    );
    ensure!(
        drain.spec.pod_names.as_deref() == Some(std::slice::from_ref(&pod)) && drain.spec.evict,
        "{name} does not drain and evict exactly {pod}: {:?}",
        drain.spec
    );
    ensure!(
        drain
            .owner_references()
            .iter()
            .any(|o| o.kind == "Pod" && o.name == pod && o.uid == uid),
        "{name} is not owned by pod {pod}: {:?}",
        drain.owner_references()
    );

    // Retries are held by the drain, naming the publishers still on the
    // pod. A replica whose cache has not seen the drain yet answers with a
    // start instead (and may name the count too): retry until the drain
    // itself holds the pod, so the gate's hold is what is checked.
    let want = format!("{n} publishers remain");
    let by_drain = format!("(IngestDrain {name})");
    let held = eventually(
        "a held eviction naming the remaining publishers",
        Duration::from_secs(60),
        || async {
            Ok(match evict(c, ns, &pod, false).await? {
                None => Err(anyhow!(
                    "the eviction of {pod} was allowed before the operator drained it"
                )),
                Some(s) if s.code != 429 => Err(anyhow!(
                    "the eviction of {pod} was refused with {} (want 429): {}",
                    s.code,
                    s.message
                )),
                Some(s) if s.message.contains(&want) && s.message.contains(&by_drain) => Ok(s.message),
                Some(s) => bail!("held, without {want:?} by {by_drain}: {}", s.message),
            })
        },
    )
    .await??;
    println!("  evict {pod} again: 429: {held}");

    // `kubectl describe pod` explains the hold while kubectl drain waits.
    let explained = eventually("an EvictionHeld Event on the pod", Duration::from_secs(30), || async {
        Api::<Event>::namespaced(c.client(), ns)
            .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
            .await?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("EvictionHeld"))
            .and_then(|e| e.message)
            .context("no EvictionHeld Event yet")
    })
    .await?;
    ensure!(
        explained.starts_with("eviction held: ") && explained.contains(&pod),
        "the Event does not explain the hold: {explained}"
    );
    println!("  Event on {pod}: EvictionHeld: {explained}");

    // The drain finishes. The pod owns it, so once the operator evicted the
    // pod it may already be garbage collected: its Drained Event stays.
    eventually(
        &format!("IngestDrain {name} Drained"),
        Duration::from_secs(120),
        || async {
            if let Some(d) = drains.get_opt(&name).await? {
                let status = d.status.unwrap_or_default();
                ensure!(
                    status.phase == DrainPhase::Drained,
                    "phase {:?}: {:?}",
                    status.phase,
                    status.pods
                );
                return Ok(());
            }
            let events = Api::<Event>::namespaced(c.client(), ns)
                .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
                .await?;
            ensure!(
                events.items.iter().any(|e| e.reason.as_deref() == Some("Drained")),
                "{name} is gone and never reported Drained"
            );
            Ok(())
        },
    )
    .await?;
    gone(c, ns, &pod, &uid, Duration::from_secs(120)).await?;
    println!(
        "  {pod} drained and evicted by the operator {:.1?} after the first eviction",
        t.elapsed()
    );
    publisher_moved(publisher, connections).await?;
    deployments_available(c, ns, Duration::from_secs(120)).await?;
    Ok(())
}

/// A dry-run eviction (`sideEffects: NoneOnDryRun`) of an ingest pod gets
/// the webhook's answer, 429, and starts nothing.
pub async fn dry_run_eviction_starts_nothing(c: &Cluster, ns: &str) -> Result<()> {
    let pod = c
        .pods(ns, system::INGEST_PODS)
        .await?
        .into_iter()
        .map(|p| p.0)
        .next()
        .context("no ingest pod")?;
    let answer = evict(c, ns, &pod, true)
        .await?
        .with_context(|| format!("a dry-run eviction of ingest pod {pod} was allowed"))?;
    ensure!(
        answer.code == 429,
        "a dry-run eviction of {pod} got {} (want the webhook's 429): {}",
        answer.code,
        answer.message
    );
    // A real eviction starts a drain at once; a dry run may start none.
    let drain = Api::<IngestDrain>::namespaced(c.client(), ns)
        .get_opt(&webhook::drain_name(&pod))
        .await?;
    ensure!(
        drain.is_none(),
        "a dry-run eviction of {pod} started a drain: {drain:?}"
    );
    println!("  dry-run evict {pod}: 429, no drain started");
    Ok(())
}

/// A pod that is not an ingest pod, in the same (webhook-selected)
/// namespace, is evicted at once.
pub async fn non_ingest_eviction_allowed(c: &Cluster, ns: &str) -> Result<()> {
    c.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: bystander, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: {{runAsNonRoot: true, runAsUser: 65532, seccompProfile: {{type: RuntimeDefault}}}}
  containers:
  - name: pause
    image: localhost/pause:local
    imagePullPolicy: Never
    securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
"#
    ))
    .await?;
    let pods: Api<Pod> = Api::namespaced(c.client(), ns);
    let uid = eventually("pod bystander Running", Duration::from_secs(60), || async {
        let p = pods.get("bystander").await?;
        let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        ensure!(phase == "Running", "phase {phase}");
        Ok(p.uid().unwrap_or_default())
    })
    .await?;
    let t = Instant::now();
    if let Some(s) = evict(c, ns, "bystander", false).await? {
        bail!(
            "the eviction of a non-ingest pod was refused with {} {}: {}",
            s.code,
            s.reason,
            s.message
        );
    }
    println!("  evict a non-ingest pod in {ns}: allowed in {:.1?}", t.elapsed());
    gone(c, ns, "bystander", &uid, Duration::from_secs(60)).await
}

/// `kubectl get ingestdrains` once the row of `name` reads `want`
/// (PHASE, PODS, DRAINED, REMAINING; AGE must be there too).
pub async fn printed(c: &Cluster, ns: &str, name: &str, want: [&str; 4]) -> Result<String> {
    let table = c.kubectl(&["-n", ns, "get", "ingestdrains"]).await?;
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    ensure!(header == COLUMNS, "columns {header:?}, want {COLUMNS:?}");
    let row: Vec<&str> = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&name))
        .with_context(|| format!("no row {name}:\n{table}"))?;
    ensure!(
        row.len() == COLUMNS.len() && row[1..5] == want && !row[5].is_empty(),
        "row {row:?}, want {name} {want:?} AGE:\n{table}"
    );
    Ok(table)
}

/// With the operator scaled to zero, the webhook cannot answer and
/// failurePolicy Ignore lets an ingest pod's eviction through; the pod's
/// own SIGTERM drain still moves the publisher.
pub async fn eviction_allowed_without_operator(c: &Cluster, ns: &str, publisher: &BackgroundPublisher) -> Result<()> {
    c.kubectl(&[
        "-n",
        ns,
        "scale",
        "deployment",
        &system::operator_name(),
        "--replicas=0",
    ])
    .await?;
    eventually("no operator pod left", Duration::from_secs(90), || async {
        let left = system::all_pods(c, ns, OPERATOR_PODS).await?;
        ensure!(left.is_empty(), "{} operator pods left", left.len());
        Ok(())
    })
    .await?;
    let (pod, n) = system::pod_with_publishers(c, ns).await?;
    let uid = Api::<Pod>::namespaced(c.client(), ns)
        .get(&pod)
        .await?
        .uid()
        .unwrap_or_default();
    let connections = publisher.progress().connections;
    let t = Instant::now();
    if let Some(s) = evict(c, ns, &pod, false).await? {
        bail!(
            "with the operator at zero replicas the eviction of {pod} was refused ({} {}): {}; \
             failurePolicy Ignore should let it through",
            s.code,
            s.reason,
            s.message
        );
    }
    println!(
        "  operator at 0 replicas: evict {pod} ({n} publisher): allowed in {:.1?}",
        t.elapsed()
    );
    publisher_moved(publisher, connections).await?;
    gone(c, ns, &pod, &uid, Duration::from_secs(120)).await
}

pub fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
