//! The system as a user installs it: our images, and `helm install` of
//! charts/lossless-ingest with the few values this cluster needs (no load
//! balancer, images only in the nodes' containerd).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;

use crate::Image;
use crate::cluster::{Cluster, eventually};

pub const INGEST_IMAGE: &str = "localhost/ingest-pod:dev";
pub const OPERATOR_IMAGE: &str = "localhost/ingest-operator:dev";
/// The release name; it holds the chart name, so it is also every object's name prefix.
pub const RELEASE: &str = "lossless-ingest";
/// The CRD the chart installs (and keeps on uninstall).
pub const CRD: &str = "ingestdrains.ingest.lossless.dev";
/// Label helm's chart puts on everything of a release.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// The chart's ingest pods.
pub const INGEST_PODS: &str = "app.kubernetes.io/instance=lossless-ingest,app.kubernetes.io/component=ingest";
/// The chart's operator pods.
pub const OPERATOR_PODS: &str = "app.kubernetes.io/instance=lossless-ingest,app.kubernetes.io/component=operator";
/// RTMP port of the ingest Service (chart default).
pub const RTMP_PORT: u16 = 1935;
/// HTTP port of the ingest pods (`/status`).
const INGEST_HTTP_PORT: u16 = 8080;
/// Control API port of the ingest pods (chart default).
pub const CONTROL_PORT: u16 = 9090;

/// grpcurl, as `.ci/setup` builds it into the project's cache.
pub fn grpcurl() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    cache.join("lossless-ingest/bin/grpcurl")
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/lossless-ingest")
}

/// A release binary of the workspace: `$<NAME>_BIN` (`INGEST_POD_BIN`,
/// `INGEST_OPERATOR_BIN`), else `target/release/<name>`.
pub fn release_binary(name: &str) -> Result<PathBuf> {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    let path = std::env::var_os(&var).map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("release")
            .join(name)
    });
    ensure!(
        path.is_file(),
        "{} is missing: run `cargo build --release -p {name}` first (or set {var})",
        path.display()
    );
    Ok(path)
}

pub fn ingest_image() -> Result<Image> {
    Ok(Image::new(INGEST_IMAGE, release_binary("ingest-pod")?))
}

pub fn operator_image() -> Result<Image> {
    Ok(Image::new(OPERATOR_IMAGE, release_binary("ingest-operator")?))
}

/// Object names of the release (the chart's fullname is [`RELEASE`]).
pub fn operator_name() -> String {
    format!("{RELEASE}-operator")
}

pub fn ingest_name() -> String {
    format!("{RELEASE}-ingest")
}

pub fn webhook_name() -> String {
    format!("{RELEASE}-webhook")
}

pub fn webhook_tls_secret() -> String {
    format!("{RELEASE}-webhook-tls")
}

pub fn control_token_secret() -> String {
    format!("{RELEASE}-control-token")
}

/// The pods' control API certificate (server) and the operator's (client).
pub fn control_tls_secrets() -> (String, String) {
    (
        format!("{RELEASE}-control-tls"),
        format!("{RELEASE}-control-client-tls"),
    )
}

/// The values this cluster needs, then `extra` (`key=value`, `--set`).
fn values(upstream: &str, extra: &[&str]) -> Vec<String> {
    let (ingest_repo, ingest_tag) = INGEST_IMAGE.rsplit_once(':').unwrap_or((INGEST_IMAGE, "dev"));
    let (operator_repo, operator_tag) = OPERATOR_IMAGE.rsplit_once(':').unwrap_or((OPERATOR_IMAGE, "dev"));
    let mut args: Vec<String> = [
        "ingest.service.type=ClusterIP".to_owned(),
        "ingest.image.pullPolicy=Never".to_owned(),
        "operator.image.pullPolicy=Never".to_owned(),
        format!("ingest.image.repository={ingest_repo}"),
        format!("ingest.image.tag={ingest_tag}"),
        format!("operator.image.repository={operator_repo}"),
        format!("operator.image.tag={operator_tag}"),
    ]
    .into_iter()
    .chain(extra.iter().map(|s| (*s).to_owned()))
    .flat_map(|kv| ["--set".to_owned(), kv])
    .collect();
    args.extend(["--set-string".to_owned(), format!("ingest.upstream={upstream}")]);
    args
}

/// `helm template` of the chart for `ns` with the local images: what a
/// GitOps tool renders and applies.
pub async fn helm_template(c: &Cluster, ns: &str, upstream: &str, extra: &[&str]) -> Result<String> {
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    let mut args = vec!["template", RELEASE, chart, "--namespace", ns];
    let values = values(upstream, extra);
    args.extend(values.iter().map(String::as_str));
    c.helm(&args).await
}

/// `helm install --wait` (or `upgrade`) of the chart into `ns` with the local images.
pub async fn helm_install(c: &Cluster, verb: &str, ns: &str, upstream: &str, extra: &[&str]) -> Result<String> {
    helm_install_from(c, &chart_dir(), verb, ns, upstream, extra).await
}

/// [`helm_install`] of the chart at `chart` (a modified copy, for example).
pub async fn helm_install_from(
    c: &Cluster,
    chart: &std::path::Path,
    verb: &str,
    ns: &str,
    upstream: &str,
    extra: &[&str],
) -> Result<String> {
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    // Generous: 300 ingest pods on 2 cores take about 280 s to be ready.
    let mut args = vec![verb, RELEASE, chart, "--namespace", ns, "--wait", "--timeout", "600s"];
    let values = values(upstream, extra);
    args.extend(values.iter().map(String::as_str));
    c.helm(&args).await
}

/// The operator pods of `ns` were never refused by RBAC: no "forbidden" in
/// their logs (the chart grants exactly what the code uses).
pub async fn operator_never_forbidden(c: &Cluster, ns: &str) -> Result<()> {
    let logs = c
        .kubectl(&["-n", ns, "logs", "-l", OPERATOR_PODS, "--tail=-1", "--prefix"])
        .await?;
    let forbidden: Vec<&str> = logs
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect();
    ensure!(
        forbidden.is_empty(),
        "the operator was refused by RBAC:\n{}",
        forbidden.join("\n")
    );
    Ok(())
}

/// Removes whatever an earlier (maybe failed) install left outside its
/// namespace, which the runner's reset does not know: the release, the
/// IngestDrains' finalizers (no operator is left to remove them), the CRD,
/// and cluster-scoped objects labelled with the release.
pub async fn purge(c: &Cluster, ns: &str) -> Result<()> {
    let _ = c
        .helm(&[
            "uninstall",
            RELEASE,
            "--namespace",
            ns,
            "--ignore-not-found",
            "--wait",
            "--timeout",
            "120s",
        ])
        .await;
    if let Ok(names) = c.kubectl(&["get", "ingestdrains", "-A", "-o", "json"]).await {
        let list: Value = serde_json::from_str(&names)?;
        for d in list["items"].as_array().into_iter().flatten() {
            let (Some(name), Some(dns)) = (d["metadata"]["name"].as_str(), d["metadata"]["namespace"].as_str()) else {
                continue;
            };
            let patch = r#"{"metadata":{"finalizers":null}}"#;
            let _ = c
                .kubectl(&["-n", dns, "patch", "ingestdrain", name, "--type=merge", "-p", patch])
                .await;
        }
    }
    c.kubectl(&["delete", "crd", CRD, "--ignore-not-found", "--timeout=120s"])
        .await?;
    let selector = format!("{INSTANCE_LABEL}={RELEASE}");
    c.kubectl(&[
        "delete",
        "clusterroles,clusterrolebindings,validatingwebhookconfigurations",
        "-l",
        &selector,
        "--ignore-not-found",
    ])
    .await?;
    Ok(())
}

/// The ingest Service's ClusterIP (reachable from the host through kube-proxy).
pub async fn ingest_vip(c: &Cluster, ns: &str) -> Result<String> {
    let vip = c
        .kubectl(&[
            "-n",
            ns,
            "get",
            "service",
            &ingest_name(),
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .await?;
    ensure!(
        !vip.trim().is_empty(),
        "service {ns}/{} has no ClusterIP",
        ingest_name()
    );
    Ok(vip.trim().to_owned())
}

/// Publishers (RTMP connections) on an ingest pod, from its `/status`
/// through the API server's pod proxy.
pub async fn publishers_on(c: &Cluster, ns: &str, pod: &str) -> Result<usize> {
    let path = format!("/api/v1/namespaces/{ns}/pods/{pod}:{INGEST_HTTP_PORT}/proxy/status");
    let body = c.kubectl(&["get", "--raw", &path]).await?;
    let status: Value = serde_json::from_str(&body).with_context(|| format!("{pod} /status: {body}"))?;
    status["connections"]
        .as_array()
        .map(Vec::len)
        .with_context(|| format!("{pod} /status has no connections: {body}"))
}

/// The one ingest pod (not being deleted) that holds publishers, and its publisher count.
pub async fn pod_with_publishers(c: &Cluster, ns: &str) -> Result<(String, usize)> {
    eventually("an ingest pod with a publisher", Duration::from_secs(60), || async {
        let mut found = Vec::new();
        for (name, _, _) in c.pods(ns, INGEST_PODS).await? {
            let n = publishers_on(c, ns, &name).await.unwrap_or(0);
            if n > 0 {
                found.push((name, n));
            }
        }
        ensure!(found.len() == 1, "ingest pods with publishers: {found:?}");
        Ok(found.remove(0))
    })
    .await
}

/// Waits until every Deployment in `ns` is Available with all its replicas
/// ready and updated; returns their names.
pub async fn deployments_available(c: &Cluster, ns: &str, timeout: Duration) -> Result<Vec<String>> {
    eventually(&format!("every Deployment in {ns} Available"), timeout, || async {
        let list = Api::<Deployment>::namespaced(c.client(), ns)
            .list(&ListParams::default())
            .await?;
        let mut names = Vec::new();
        for d in list.items {
            let name = d.metadata.name.clone().unwrap_or_default();
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let status = d.status.unwrap_or_default();
            let available = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Available" && c.status == "True");
            let ready = status.ready_replicas.unwrap_or(0);
            let total = status.replicas.unwrap_or(0);
            ensure!(
                available && ready == want && total == want,
                "deployment {name}: Available={available}, {ready} ready of {total}, want {want}"
            );
            names.push(name);
        }
        ensure!(!names.is_empty(), "no Deployment in {ns}");
        Ok(names)
    })
    .await
}

/// Pods in `ns` (all, terminating ones included).
pub async fn all_pods(c: &Cluster, ns: &str, selector: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(c.client(), ns)
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}
