//! Smoke scenarios (issue 6): the cluster is real enough for the project's
//! claims — a ServiceAccount reaches the API server through the `kubernetes`
//! Service, no pod packet can leave the machine, and ingest pods behind a
//! Service relay a real publisher to a real origin, then survive a real
//! `kubectl drain`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ingest_e2e::cluster::{self, eventually};
use ingest_e2e::rtmp::{self, HostOrigin};
use ingest_e2e::system::{self, INGEST_IMAGE};
use ingest_e2e::{Cluster, Image, Scenario};

const PROBE_IMAGE: &str = "localhost/e2e-probe:dev";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new(
            "smoke_service_account_reaches_api_server",
            service_account_reaches_api_server,
        ),
        Scenario::new("smoke_pods_cannot_leave_the_machine", pods_cannot_leave_the_machine),
        Scenario::new("smoke_ingest_publish_and_drain", ingest_publish_and_drain).timeout(Duration::from_secs(600)),
    ]
}

async fn service_account_reaches_api_server(c: Arc<Cluster>) -> Result<()> {
    c.load_image(&probe_image()).await?;
    let ns = c.namespace("smoke-sa").await?;
    c.apply(&probe_rbac(&ns)).await?;
    c.apply(&probe_pod(&ns, "probe", "probe", &[])).await?;
    let (phase, logs) = c.pod_outcome(&ns, "probe", Duration::from_secs(120)).await?;
    ensure!(phase == "Succeeded", "probe pod {phase}: {logs}");
    // The Service VIP (first Service IP), not the API server's own address.
    ensure!(
        logs.contains("url=https://10.96.0.1"),
        "probe did not use the Service VIP: {logs}"
    );
    ensure!(
        logs.contains(&format!("user=system:serviceaccount:{ns}:probe ")),
        "probe was not its ServiceAccount: {logs}"
    );
    Ok(())
}

/// An address outside every cluster range (TEST-NET-2). While this test runs
/// it is routed into a bridge with no ports, so even if the guard failed the
/// packet would die on this machine.
const OUTSIDE: &str = "198.51.100.7";
/// `lli-` prefix: `cluster down` removes it too if this test dies half way.
const DEAD_END: &str = "lli-deadend";

async fn pods_cannot_leave_the_machine(c: Arc<Cluster>) -> Result<()> {
    c.load_image(&probe_image()).await?;
    let _dead_end = DeadEnd::create()?;
    let before = cluster::guard_dropped_packets()?;
    let ns = c.namespace("smoke-guard").await?;
    c.apply(&probe_pod(
        &ns,
        "knock",
        "default",
        &["connect", &format!("{OUTSIDE}:80")],
    ))
    .await?;
    let (phase, logs) = c.pod_outcome(&ns, "knock", Duration::from_secs(120)).await?;
    ensure!(phase == "Failed", "a pod reached {OUTSIDE}: {logs}");
    let after = cluster::guard_dropped_packets()?;
    ensure!(
        after > before,
        "the forward guard dropped nothing ({before} -> {after}): {logs}"
    );
    Ok(())
}

/// A route for [`OUTSIDE`] into a portless bridge, removed on drop.
struct DeadEnd;

impl DeadEnd {
    fn create() -> Result<Self> {
        let guard = Self;
        ip(&["link", "add", DEAD_END, "type", "bridge"])?;
        ip(&["link", "set", DEAD_END, "up"])?;
        ip(&["route", "add", &format!("{OUTSIDE}/32"), "dev", DEAD_END])?;
        Ok(guard)
    }
}

impl Drop for DeadEnd {
    fn drop(&mut self) {
        // The route goes with the link.
        let _ = ip(&["link", "delete", DEAD_END]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let status = std::process::Command::new("ip").args(args).status()?;
    ensure!(status.success(), "ip {} failed ({status})", args.join(" "));
    Ok(())
}

async fn ingest_publish_and_drain(c: Arc<Cluster>) -> Result<()> {
    let origin = HostOrigin::start()?;
    c.load_image(&system::ingest_image()?).await?;
    let ns = c.namespace("smoke-ingest").await?;
    c.apply(&ingest_manifests(&ns, &origin.upstream_template())).await?;
    c.kubectl(&["-n", &ns, "rollout", "status", "deployment/ingest", "--timeout=180s"])
        .await?;
    let nodes = ready_nodes(&c, &ns, 3).await?;
    ensure!(nodes.len() == 2, "3 replicas should span both nodes, ran on {nodes:?}");

    let vip = c
        .kubectl(&[
            "-n",
            &ns,
            "get",
            "service",
            "ingest",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .await?;
    accepts(&vip).await?;
    rtmp::publish(&format!("rtmp://{vip}:1935/live/smoke"), 6).await?;
    recorded(&origin, 1, 4.0).await?;

    let drained = &c.nodes()[0];
    c.kubectl(&[
        "drain",
        drained,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout=180s",
    ])
    .await?;
    let survivor = c.nodes()[1].clone();
    eventually(
        &format!("3 ready ingest pods, all on {survivor}"),
        Duration::from_secs(120),
        || async {
            let nodes = ready_nodes(&c, &ns, 3).await?;
            if nodes == BTreeSet::from([survivor.clone()]) {
                Ok(())
            } else {
                bail!("on {nodes:?}")
            }
        },
    )
    .await?;

    // The Service still takes publishers, now only on the surviving node.
    accepts(&vip).await?;
    rtmp::publish(&format!("rtmp://{vip}:1935/live/smoke"), 4).await?;
    recorded(&origin, 2, 2.5)
        .await
        .with_context(|| format!("origin log: {}", origin.error_log().display()))
}

/// Waits until the Service VIP takes TCP connections: kube-proxy programs
/// its rules a moment after the endpoints turn ready.
async fn accepts(vip: &str) -> Result<()> {
    eventually(
        &format!("{vip}:1935 accepting connections"),
        Duration::from_secs(30),
        || async {
            tokio::net::TcpStream::connect((vip, 1935)).await?;
            Ok(())
        },
    )
    .await
}

/// Nodes of the ingest pods, once exactly `want` of them are Ready.
async fn ready_nodes(c: &Cluster, ns: &str, want: usize) -> Result<BTreeSet<String>> {
    let pods = c.pods(ns, "app=ingest").await?;
    let ready: Vec<_> = pods.iter().filter(|(_, _, ready)| *ready).collect();
    ensure!(
        ready.len() == want && pods.len() == want,
        "{} of {} ingest pods ready, want {want}",
        ready.len(),
        pods.len()
    );
    Ok(ready.iter().map(|(_, node, _)| node.clone()).collect())
}

/// Waits until the origin holds `count` recordings of `smoke`, the newest
/// with at least `seconds` of H.264 video.
async fn recorded(origin: &HostOrigin, count: usize, seconds: f64) -> Result<()> {
    eventually("the stream to reach the origin", Duration::from_secs(30), || async {
        let files = origin.recordings("smoke");
        let newest = files.last().context("no recording yet")?;
        ensure!(files.len() == count, "{} recordings, want {count}", files.len());
        let got = rtmp::video_duration(newest).await?;
        ensure!(
            got >= seconds,
            "{} holds {got:.1}s of video, want {seconds}s",
            newest.display()
        );
        Ok(())
    })
    .await
}

fn probe_image() -> Image {
    Image::new(PROBE_IMAGE, env!("CARGO_BIN_EXE_probe")).strip_debug()
}

/// ServiceAccount `probe`, allowed to list the pods of its namespace.
fn probe_rbac(ns: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: probe, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: list-pods, namespace: {ns}}}
rules: [{{apiGroups: [""], resources: [pods], verbs: [list]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: probe-list-pods, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: list-pods}}
subjects: [{{kind: ServiceAccount, name: probe, namespace: {ns}}}]
"#
    )
}

/// A run-once pod of the probe image with `args`.
fn probe_pod(ns: &str, name: &str, service_account: &str, args: &[&str]) -> String {
    let args = serde_json::to_string(args).unwrap_or_default();
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  serviceAccountName: {service_account}
  restartPolicy: Never
  containers:
  - name: probe
    image: {PROBE_IMAGE}
    imagePullPolicy: Never
    args: {args}
    securityContext: {{runAsNonRoot: true, allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
"#
    )
}

fn ingest_manifests(ns: &str, upstream: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: ingest, namespace: {ns}}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: ingest}}}}
  template:
    metadata: {{labels: {{app: ingest}}}}
    spec:
      terminationGracePeriodSeconds: 10
      # Spread over the nodes; a cordoned node stops counting (Honor), so a
      # drain moves every replica to the node that is left.
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        nodeTaintsPolicy: Honor
        labelSelector: {{matchLabels: {{app: ingest}}}}
      containers:
      - name: ingest
        image: {INGEST_IMAGE}
        imagePullPolicy: Never
        args: [--rtmp-listen, "0.0.0.0:1935", --http-listen, "0.0.0.0:8080", --upstream, "{upstream}"]
        ports: [{{name: rtmp, containerPort: 1935}}, {{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /readyz, port: http}}, periodSeconds: 1}}
        securityContext:
          runAsNonRoot: true
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {{drop: [ALL]}}
---
apiVersion: v1
kind: Service
metadata: {{name: ingest, namespace: {ns}}}
spec:
  selector: {{app: ingest}}
  ports: [{{name: rtmp, port: 1935, targetPort: rtmp}}, {{name: http, port: 8080, targetPort: http}}]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {{name: ingest, namespace: {ns}}}
spec:
  maxUnavailable: 1
  selector: {{matchLabels: {{app: ingest}}}}
"#
    )
}
