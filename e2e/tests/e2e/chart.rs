//! The chart on a real cluster (issue 8): `helm install --wait` into a
//! namespace that enforces the `restricted` Pod Security level, the leader
//! Lease, the operator's RBAC, `helm upgrade` keeping the generated secrets
//! and applying a changed CRD, a dry-run eviction, `helm uninstall` leaving
//! only the CRD. The eviction gate and the IngestDrain as users apply it
//! run on their own installs in `lossless.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::ListParams;

use ingest_e2e::cluster::eventually;
use ingest_e2e::rtmp::{BackgroundPublisher, HostOrigin};
use ingest_e2e::system::{
    self, CRD, INGEST_PODS, INSTANCE_LABEL, OPERATOR_PODS, RELEASE, RTMP_PORT, deployments_available,
};
use ingest_e2e::{Cluster, Scenario, live_rules, metric_names};

use crate::operator;

const NS: &str = "chart-e2e";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("chart_install_upgrade_uninstall", |c| async move {
            // The chart puts objects outside its namespace (CRD, ClusterRoles, the
            // webhook configuration): remove them before and after, also on failure.
            system::purge(&c, NS).await?;
            let result = install_upgrade_uninstall(c.clone()).await;
            let purged = system::purge(&c, NS).await;
            result.and(purged)
        })
        .timeout(Duration::from_secs(1200)),
    ]
}

/// A copy of the chart as an older release would have it: its CRD lacks
/// the description of the Remaining printer column.
fn older_chart() -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = tempfile::tempdir()?;
    let chart = dir.path().join("lossless-ingest");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(system::chart_dir())
        .arg(&chart)
        .status()?;
    ensure!(status.success(), "copying the chart failed");
    let crd = chart.join("files/crds/ingestdrains.ingest.lossless.dev.yaml");
    let text = std::fs::read_to_string(&crd)?;
    let described = "        - description: \"Publishers still on the pods\"\n          jsonPath: \".status.totals.remainingPublishers\"";
    ensure!(
        text.contains(described),
        "the CRD's Remaining column is not where the test expects it"
    );
    std::fs::write(
        &crd,
        text.replace(described, "        - jsonPath: \".status.totals.remainingPublishers\""),
    )?;
    Ok((dir, chart))
}

/// The description of the live CRD's Remaining printer column.
async fn remaining_description(c: &Cluster) -> Result<String> {
    c.kubectl(&[
        "get",
        "crd",
        "ingestdrains.ingest.lossless.dev",
        "-o",
        "jsonpath={.spec.versions[0].additionalPrinterColumns[?(@.name==\"Remaining\")].description}",
    ])
    .await
}

async fn install_upgrade_uninstall(c: Arc<Cluster>) -> Result<()> {
    let origin = HostOrigin::start()?;
    c.load_image(&system::ingest_image()?).await?;
    c.load_image(&system::operator_image()?).await?;
    c.namespace(NS).await?;
    c.kubectl(&[
        "label",
        "namespace",
        NS,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
        "--overwrite",
    ])
    .await?;
    let upstream = origin.upstream_template();

    // Install an older chart whose CRD differs (a column description),
    // so the upgrade below must apply a changed CRD (Helm never upgrades a
    // chart's crds/ folder; ours templates the CRD for that reason).
    let (_older_dir, older) = older_chart()?;
    let t = Instant::now();
    system::helm_install_from(&c, &older, "install", NS, &upstream, &[]).await?;
    println!("  helm install --wait (older CRD): {:.1?}", t.elapsed());
    ensure!(
        remaining_description(&c).await?.trim().is_empty(),
        "the older chart's CRD was installed"
    );
    every_deployment_available(&c).await?;
    nothing_rejected_by_pod_security(&c).await?;
    leader_lease_names_an_operator_pod(&c).await?;

    let vip = system::ingest_vip(&c, NS).await?;
    let publisher = BackgroundPublisher::start(&format!("rtmp://{vip}:{RTMP_PORT}/live/chart"))?;
    eventually("the publisher to stream", Duration::from_secs(30), || async {
        let p = publisher.progress();
        ensure!(p.video_frames >= 60, "{p:?}");
        Ok(())
    })
    .await?;

    operator_has_no_forbidden_calls(&c).await?;
    operator_rbac_is_least(&c).await?;
    stream_keys_hidden(&c).await?;
    documented_metrics_exist(&c, &upstream).await?;
    control_api_needs_the_operators_certificate(&c).await?;

    upgrade_keeps_secrets(&c, &upstream).await?;
    let description = remaining_description(&c).await?;
    ensure!(
        description.trim() == "Publishers still on the pods",
        "helm upgrade did not apply the changed CRD: Remaining column description {description:?}"
    );
    println!("  helm upgrade applied the changed CRD");
    operator::dry_run_eviction_starts_nothing(&c, NS).await?;
    gitops_apply_restarts_nothing(&c, &upstream).await?;
    operator_has_no_forbidden_calls(&c).await?;

    // The publisher may have moved (the upgrade removed an ingest pod by its
    // SIGTERM drain); whatever happened was lossless.
    let report = publisher.stop().await?;
    println!(
        "  publisher: {} connections, {} signals, longest switch gap {:?}",
        report.connections,
        report.signals.len(),
        report.max_switch_gap()
    );
    ensure!(
        report.error.is_none(),
        "the publisher stopped early: {:?}",
        report.error
    );
    let audit = eventually("a lossless audit at the origin", Duration::from_secs(30), || async {
        let audit = ingest_testkit::audit::audit_dir(&report.stream, &report.sent, &origin.record_dir())?;
        ensure!(audit.lossless(), "{audit}");
        Ok(audit)
    })
    .await
    .with_context(|| format!("origin log: {}", origin.error_log().display()))?;
    println!("  audit: {audit}");

    uninstall_leaves_only_the_crd(&c).await
}

async fn every_deployment_available(c: &Cluster) -> Result<()> {
    let names = deployments_available(c, NS, Duration::from_secs(60)).await?;
    let mut want = vec![system::ingest_name(), system::operator_name()];
    want.sort();
    let mut got = names.clone();
    got.sort();
    ensure!(got == want, "deployments {got:?}, want {want:?}");
    println!("  Available: {}", names.join(", "));
    Ok(())
}

/// The namespace enforces `restricted` (a violating pod is refused), and
/// none of the chart's pods was: no FailedCreate event, no ReplicaFailure.
async fn nothing_rejected_by_pod_security(c: &Cluster) -> Result<()> {
    let violating = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: psa-control, namespace: {NS}}}\n\
         spec: {{containers: [{{name: c, image: localhost/pause:local}}]}}\n"
    );
    match c
        .kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], &violating)
        .await
    {
        Ok(out) => bail!("{NS} does not enforce restricted: a root pod without a security context was accepted: {out}"),
        Err(err) => ensure!(
            format!("{err:#}").contains("violates PodSecurity \"restricted:latest\""),
            "a violating pod was refused, but not by Pod Security admission: {err:#}"
        ),
    }
    let events = Api::<Event>::namespaced(c.client(), NS)
        .list(&ListParams::default())
        .await?;
    let rejected: Vec<String> = events
        .items
        .iter()
        .filter(|e| {
            let msg = e.message.as_deref().unwrap_or_default();
            e.reason.as_deref() == Some("FailedCreate") || msg.contains("PodSecurity") || msg.contains("forbidden")
        })
        .map(|e| format!("{:?}: {}", e.reason, e.message.as_deref().unwrap_or_default()))
        .collect();
    ensure!(rejected.is_empty(), "pods were rejected: {rejected:#?}");
    let replica_sets = Api::<ReplicaSet>::namespaced(c.client(), NS)
        .list(&ListParams::default())
        .await?;
    for rs in replica_sets.items {
        let failures: Vec<String> = rs
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.type_ == "ReplicaFailure")
            .map(|c| c.message.unwrap_or_default())
            .collect();
        ensure!(
            failures.is_empty(),
            "ReplicaSet {} failed to create pods: {failures:?}",
            rs.metadata.name.unwrap_or_default()
        );
    }
    println!("  Pod Security restricted enforced; no pod rejected");
    Ok(())
}

async fn leader_lease_names_an_operator_pod(c: &Cluster) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(c.client(), NS);
    let lease_name = system::operator_name();
    let holder = eventually(
        "the operator's leader Lease to name an operator pod",
        Duration::from_secs(60),
        || async {
            let lease = leases
                .get_opt(&lease_name)
                .await?
                .with_context(|| format!("no Lease {NS}/{lease_name}"))?;
            let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
            let pods: Vec<String> = c.pods(NS, OPERATOR_PODS).await?.into_iter().map(|p| p.0).collect();
            ensure!(pods.len() == 2, "operator pods {pods:?}, want 2");
            ensure!(
                pods.contains(&holder),
                "Lease holder {holder:?} is none of the operator pods {pods:?}"
            );
            Ok(holder)
        },
    )
    .await?;
    println!("  leader: {holder}");
    Ok(())
}

/// The operator runs with exactly the chart's RBAC (in-cluster, its
/// ServiceAccount): its watches synced, the leader started its controllers,
/// and the API server refused it nothing.
async fn operator_has_no_forbidden_calls(c: &Cluster) -> Result<()> {
    system::operator_never_forbidden(c, NS).await?;
    let logs = c
        .kubectl(&["-n", NS, "logs", "-l", OPERATOR_PODS, "--tail=-1", "--prefix"])
        .await?;
    ensure!(
        logs.matches("caches synced").count() == 2,
        "not both operator replicas synced their caches:\n{logs}"
    );
    ensure!(
        logs.contains("leading: starting the controllers"),
        "no operator replica leads:\n{logs}"
    );
    // Container stdout is no terminal: a log platform gets no escape codes.
    ensure!(
        !logs.contains('\u{1b}'),
        "escape codes in the operator's pod logs:\n{logs}"
    );
    println!("  operator logs: caches synced on both replicas, a leader, nothing forbidden, no escape codes");
    Ok(())
}

/// The operator's ServiceAccount may do what its code uses and nothing
/// more: `kubectl auth can-i` for the verbs it needs and for each verb the
/// chart granted before it was trimmed.
async fn operator_rbac_is_least(c: &Cluster) -> Result<()> {
    let sa = format!("system:serviceaccount:{NS}:{}", system::operator_name());
    let can = |verb: &'static str, resource: &'static str, sub: &'static str| {
        let sa = sa.clone();
        async move {
            let mut args = vec!["auth", "can-i", verb, resource, "--as", sa.as_str(), "-n", NS];
            if !sub.is_empty() {
                args.push("--subresource");
                args.push(sub);
            }
            // "no" exits 1: read the answer, not the status.
            let out = c.kubectl_command(&args).output().await?;
            Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out.stdout).trim() == "yes")
        }
    };
    let drains = "ingestdrains.ingest.lossless.dev";
    let needed = [
        ("list", "pods", ""),
        ("watch", "nodes", ""),
        ("create", "pods", "eviction"),
        ("patch", drains, ""),
        ("delete", drains, ""),
        ("patch", drains, "status"),
        ("create", "events.events.k8s.io", ""),
        ("update", "leases.coordination.k8s.io", ""),
    ];
    for (verb, resource, sub) in needed {
        ensure!(
            can(verb, resource, sub).await?,
            "the operator may not {verb} {resource} {sub}"
        );
    }
    let removed = [
        ("delete", "pods", ""),
        ("get", "pods", ""),
        ("update", drains, ""),
        ("update", drains, "finalizers"),
        ("update", drains, "status"),
        ("create", "events", ""),
        ("patch", "leases.coordination.k8s.io", ""),
        ("get", "secrets", ""),
    ];
    for (verb, resource, sub) in removed {
        ensure!(
            !can(verb, resource, sub).await?,
            "the operator may still {verb} {resource} {sub}"
        );
    }
    // Pods only in the ingest namespaces (a Role there), not cluster-wide.
    for scope in [["-n", "default"], ["--all-namespaces", "--quiet"]] {
        let mut args = vec!["auth", "can-i", "list", "pods", "--as", sa.as_str()];
        args.extend(scope);
        let out = c.kubectl_command(&args).output().await?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() != "yes" && !out.status.success(),
            "the operator may list pods outside the ingest namespaces ({scope:?})"
        );
    }
    println!(
        "  kubectl auth can-i: the operator may do the {} things it uses and none of {} others; pods only in the ingest namespaces",
        needed.len(),
        removed.len()
    );
    Ok(())
}

/// With the chart's defaults the publisher's stream key ("chart") shows
/// nowhere: `/status` holds keyed hashes, and neither the ingest pods' logs
/// nor the namespace's Events name it.
async fn stream_keys_hidden(c: &Cluster) -> Result<()> {
    let mut hashes = Vec::new();
    for (pod, _, _) in c.pods(NS, system::INGEST_PODS).await? {
        hashes.extend(ingest_e2e::lossless::streams_on(c, NS, &pod).await?);
    }
    ensure!(
        hashes.len() == 1 && hashes[0].starts_with("hmac:"),
        "/status should show the one publisher's key as a keyed hash: {hashes:?}"
    );
    let logs = c
        .kubectl(&["-n", NS, "logs", "-l", system::INGEST_PODS, "--tail=-1", "--prefix"])
        .await?;
    ensure!(logs.contains(&hashes[0]), "the pods' logs name the stream by its hash");
    let events = c.kubectl(&["-n", NS, "get", "events", "-o", "json"]).await?;
    for (what, text) in [("the ingest pods' logs", &logs), ("the Events", &events)] {
        let leak = text
            .lines()
            .find(|l| l.contains("/chart") || l.contains("\"chart\"") || l.contains("=chart"));
        ensure!(
            leak.is_none(),
            "the stream key shows in {what}: {}",
            leak.unwrap_or_default()
        );
    }
    println!(
        "  stream key hidden: /status shows {}, not in the pods' logs nor the Events",
        hashes[0]
    );
    Ok(())
}

/// The control API of an installed pod, called by grpcurl from outside
/// the pod with the chart's certificates: only TLS with the operator's
/// client certificate (and the token) gets an answer.
async fn control_api_needs_the_operators_certificate(c: &Cluster) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(c.client(), NS);
    let (_, client) = system::control_tls_secrets();
    let client = secrets.get(&client).await?.data.unwrap_or_default();
    let token = secrets
        .get(&system::control_token_secret())
        .await?
        .data
        .unwrap_or_default();
    let token = String::from_utf8(token.get("token").context("no token")?.0.clone())?;
    let dir = tempfile::tempdir()?;
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let pem = client
            .get(key)
            .with_context(|| format!("the operator's Secret has no {key}"))?;
        std::fs::write(dir.path().join(key), &pem.0)?;
    }
    let server_name = c
        .kubectl(&[
            "-n",
            NS,
            "get",
            "deployment",
            &system::operator_name(),
            "-o",
            "jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"OPERATOR_CONTROL_TLS_SERVER_NAME\")].value}",
        ])
        .await?;
    let server_name = server_name.trim();
    ensure!(!server_name.is_empty(), "the operator has no control TLS server name");
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.client(), NS)
        .list(&ListParams::default().labels(system::INGEST_PODS))
        .await?;
    let (pod, ip) = pods
        .items
        .iter()
        .find_map(|p| Some((p.metadata.name.clone()?, p.status.as_ref()?.pod_ip.clone()?)))
        .context("no ingest pod with an IP")?;
    let addr = format!("{ip}:{}", system::CONTROL_PORT);
    let path = |k: &str| dir.path().join(k).display().to_string();
    let tls = [
        "-cacert".to_owned(),
        path("ca.crt"),
        "-servername".to_owned(),
        server_name.to_owned(),
    ];
    let identity = ["-cert".to_owned(), path("tls.crt"), "-key".to_owned(), path("tls.key")];
    let call = |args: Vec<String>| {
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            let out = tokio::process::Command::new(system::grpcurl())
                .args(["-connect-timeout", "5"])
                .args(&args)
                .args(["-H", &format!("authorization: Bearer {}", token.trim())])
                .args([addr.as_str(), "ingest.control.v1.IngestControl/GetStatus"])
                .output()
                .await?;
            anyhow::Ok((
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ))
        }
    };
    let (ok, out) = call([tls.to_vec(), identity.to_vec()].concat()).await?;
    ensure!(
        ok && out.contains(&format!("\"pod\": \"{pod}\"")),
        "grpcurl with the operator's certificate: {out}"
    );
    for (what, args) in [
        ("plaintext", vec!["-plaintext".to_owned()]),
        ("TLS without the client certificate", tls.to_vec()),
    ] {
        let (ok, out) = call(args).await?;
        ensure!(!ok, "{what} got an answer from {pod}: {out}");
    }
    println!(
        "  control API of {pod}: TLS with {server_name} and the operator's certificate answers; plaintext and no client certificate do not"
    );
    Ok(())
}

/// GitOps (Argo CD, `helm template | kubectl apply`): with the token and
/// the webhook certificate given as existing Secrets (here the ones the
/// install made) two renders are byte-identical, and applying the second
/// over the first restarts no pod.
async fn gitops_apply_restarts_nothing(c: &Cluster, upstream: &str) -> Result<()> {
    let tls = Api::<Secret>::namespaced(c.client(), NS)
        .get(&system::webhook_tls_secret())
        .await?;
    let ca = tls
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .context("the webhook Secret has no ca.crt")?;
    // A ByteString serializes as its base64 text: the caBundle value as is.
    let ca = serde_json::to_value(ca)?
        .as_str()
        .context("ca.crt as base64")?
        .to_owned();
    let token = format!("controlToken.existingSecret={}", system::control_token_secret());
    let cert = format!("webhook.tls.existingSecret={}", system::webhook_tls_secret());
    let bundle = format!("webhook.tls.caBundle={ca}");
    let (server, client) = system::control_tls_secrets();
    let server = format!("controlTLS.existingSecrets.server={server}");
    let client = format!("controlTLS.existingSecrets.client={client}");
    let extra = [&token, &cert, &bundle, &server, &client].map(String::as_str);
    let first = system::helm_template(c, NS, upstream, &extra).await?;
    c.kubectl_with_input(&["apply", "-f", "-"], &first).await?;
    for d in [system::operator_name(), system::ingest_name()] {
        let name = format!("deployment/{d}");
        c.kubectl(&["-n", NS, "rollout", "status", &name, "--timeout=180s"])
            .await?;
    }
    let client = c.client();
    let pods = || async {
        let mut uids: Vec<String> = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), NS)
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.uid)
            .collect();
        uids.sort();
        anyhow::Ok(uids)
    };
    let before = pods().await?;
    let second = system::helm_template(c, NS, upstream, &extra).await?;
    ensure!(first == second, "two renders with existing Secrets differ");
    c.kubectl_with_input(&["apply", "-f", "-"], &second).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = pods().await?;
    ensure!(
        before == after,
        "the second apply restarted pods: {before:?} -> {after:?}"
    );
    println!(
        "  helm template | kubectl apply with existing Secrets: renders identical, the second apply restarted none of {} pods",
        after.len()
    );
    Ok(())
}

/// `helm upgrade` with a changed value keeps the webhook's certificate (Secret
/// and caBundle) and the control token, so the operator pods do not roll.
async fn upgrade_keeps_secrets(c: &Cluster, upstream: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(c.client(), NS);
    let webhooks: Api<ValidatingWebhookConfiguration> = Api::all(c.client());
    let snapshot = || async {
        let (control_server, control_client) = system::control_tls_secrets();
        let tls = (
            secrets.get(&system::webhook_tls_secret()).await?.data,
            secrets.get(&control_server).await?.data,
            secrets.get(&control_client).await?.data,
        );
        let token = secrets.get(&system::control_token_secret()).await?.data;
        let ca = webhooks
            .get(&system::webhook_name())
            .await?
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| w.client_config.ca_bundle)
            .collect::<Vec<_>>();
        let mut operators: Vec<(String, String)> = system::all_pods(c, NS, OPERATOR_PODS)
            .await?
            .into_iter()
            .map(|p| (p.metadata.name.unwrap_or_default(), p.metadata.uid.unwrap_or_default()))
            .collect();
        operators.sort();
        anyhow::Ok((tls, token, ca, operators))
    };
    let (tls, token, ca, operators) = snapshot().await?;
    ensure!(
        tls.0.is_some() && tls.1.is_some() && tls.2.is_some() && token.is_some(),
        "the chart made no TLS or token Secret"
    );
    ensure!(
        ca.len() == 1 && ca[0].is_some(),
        "webhook {} has no caBundle",
        system::webhook_name()
    );

    let t = Instant::now();
    system::helm_install(c, "upgrade", NS, upstream, &["ingest.replicaCount=2"]).await?;
    println!(
        "  helm upgrade --wait (ingest.replicaCount 3 -> 2): {:.1?}",
        t.elapsed()
    );
    let ingest = c
        .kubectl(&[
            "-n",
            NS,
            "get",
            "deployment",
            &system::ingest_name(),
            "-o",
            "jsonpath={.spec.replicas}",
        ])
        .await?;
    ensure!(
        ingest == "2",
        "the upgrade did not apply ingest.replicaCount=2: replicas {ingest}"
    );
    deployments_available(c, NS, Duration::from_secs(120)).await?;

    let (tls2, token2, ca2, operators2) = snapshot().await?;
    ensure!(tls2.0 == tls.0, "helm upgrade replaced the webhook's TLS Secret");
    ensure!(
        tls2.1 == tls.1 && tls2.2 == tls.2,
        "helm upgrade replaced the control API's certificates"
    );
    ensure!(ca2 == ca, "helm upgrade changed the webhook's caBundle");
    ensure!(token2 == token, "helm upgrade replaced the control token");
    ensure!(
        operators2 == operators,
        "the operator pods rolled on an upgrade that changed neither certificate nor token: {operators:?} -> {operators2:?}"
    );
    println!("  upgrade kept the webhook certificate, caBundle, the control API's certificates and token");
    Ok(())
}

async fn uninstall_leaves_only_the_crd(c: &Cluster) -> Result<()> {
    let t = Instant::now();
    c.helm(&["uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", "180s"])
        .await?;
    println!("  helm uninstall --wait: {:.1?}", t.elapsed());
    eventually("no pod left in the namespace", Duration::from_secs(120), || async {
        let left: Vec<String> = system::all_pods(c, NS, "")
            .await?
            .into_iter()
            .map(|p| p.metadata.name.unwrap_or_default())
            .collect();
        ensure!(left.is_empty(), "orphan pods: {left:?}");
        Ok(())
    })
    .await?;

    // Everything of any listable kind, cluster-wide, labelled with the release.
    let kinds = c.kubectl(&["api-resources", "--verbs=list", "-o", "name"]).await?;
    let kinds: Vec<&str> = kinds
        .lines()
        .filter(|k| !k.is_empty() && *k != "events" && !k.starts_with("events."))
        .collect();
    let selector = format!("{INSTANCE_LABEL}={RELEASE}");
    let kinds = kinds.join(",");
    let crd = format!("customresourcedefinition.apiextensions.k8s.io/{CRD}");
    // Helm deletes in the background: ReplicaSets (labelled like their
    // pods) go with their Deployment a moment later.
    eventually(
        "only the CRD left labelled with the release",
        Duration::from_secs(60),
        || async {
            let left = c.kubectl(&["get", &kinds, "-A", "-l", &selector, "-o", "name"]).await?;
            let left: Vec<&str> = left.lines().filter(|l| !l.is_empty()).collect();
            ensure!(
                left == [crd.as_str()],
                "helm uninstall left {left:?} labelled {selector}; want only the CRD"
            );
            Ok(())
        },
    )
    .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client());
    let kept = crds.get(CRD).await.context("the CRD is gone after uninstall")?;
    ensure!(
        kept.metadata.deletion_timestamp.is_none(),
        "the CRD is being deleted after uninstall"
    );
    // Not the chart's: the Lease the operator made at run time stays with the namespace.
    let leases = c.kubectl(&["-n", NS, "get", "leases", "-o", "name"]).await?;
    println!(
        "  uninstall left the CRD (kept) and, unlabelled, {}",
        leases.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

/// Every metric name the docs and the chart use is one a live ingest pod or
/// operator exports (scraped through the API server's pod proxy), and the
/// chart's dashboard and alerts work on those metrics (promtool).
async fn documented_metrics_exist(c: &Cluster, upstream: &str) -> Result<()> {
    let mut exported = BTreeSet::new();
    let mut scrapes = Vec::new();
    for (selector, job) in [(INGEST_PODS, "ingest"), (OPERATOR_PODS, "operator")] {
        let pods = c.pods(NS, selector).await?;
        ensure!(!pods.is_empty(), "no pod of {selector}");
        for (pod, _, _) in pods {
            let path = format!("/api/v1/namespaces/{NS}/pods/{pod}:8080/proxy/metrics");
            let text = c.kubectl(&["get", "--raw", &path]).await?;
            metric_names::exported(&text, &mut exported);
            let target = [
                ("namespace", NS),
                ("job", job),
                ("pod", &pod),
                ("instance", &format!("{pod}:8080")),
            ];
            let target = target.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            scrapes.push(live_rules::Scrape { target, text });
        }
    }
    ensure!(
        exported.contains("ingest_operator_build_info") && exported.contains("ingest_connections"),
        "the scrape misses the pod's or the operator's metrics: {exported:?}"
    );
    let documented = metric_names::documented(&system::workspace_root())?;
    let missing: Vec<_> = documented.iter().filter(|(name, _)| !exported.contains(name)).collect();
    ensure!(
        missing.is_empty(),
        "the docs name metrics that do not exist (name, file): {missing:?}; exported: {exported:?}"
    );
    println!(
        "  {} metric names in the docs and the chart, all exported ({} series names scraped)",
        documented.len(),
        exported.len()
    );
    dashboard_and_alerts_work_on(c, upstream, &scrapes).await
}

/// promtool over the live scrapes: every dashboard query returns data,
/// every series an alert reads exists, and no alert fires.
async fn dashboard_and_alerts_work_on(c: &Cluster, upstream: &str, scrapes: &[live_rules::Scrape]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rendered = system::helm_template(c, NS, upstream, &["monitoring.prometheusRule.enabled=true"]).await?;
    let alerts = live_rules::rule_file(&rendered)?;
    std::fs::write(dir.path().join("alerts.rules.yaml"), &alerts)?;
    let dashboard = system::chart_dir().join("files/dashboards/lossless-ingest.json");
    let queries = live_rules::dashboard_queries(&std::fs::read_to_string(&dashboard)?)?;
    let (returning, series) = live_rules::write_test(dir.path(), scrapes, &queries, &alerts)?;
    let out = tokio::process::Command::new(c.promtool_path())
        .args(["test", "rules", "live.test.json"])
        .current_dir(dir.path())
        .output()
        .await
        .context("running promtool")?;
    ensure!(
        out.status.success(),
        "promtool over the live scrape: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "  promtool over a live scrape of {} pods: {returning} of {} dashboard queries return data \
         (the others show drains under way), the {series} series they and the alerts read exist, no alert fires",
        scrapes.len(),
        queries.len(),
    );
    Ok(())
}
