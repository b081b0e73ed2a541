//! In-cluster probe: proves a pod reaches the API server through the
//! `kubernetes` Service with its ServiceAccount. It reads the token and CA
//! from the mounted ServiceAccount, dials KUBERNETES_SERVICE_HOST:PORT (the
//! Service VIP; there is no cluster DNS), verifies TLS, asks the API server
//! who it is (SelfSubjectReview) and lists the pods of its own namespace
//! (allowed only by the Role the test binds to it). Prints one line and
//! exits 0, or the error and exits 1.
//!
//! `probe connect ADDR:PORT` instead tries one TCP connection (3 s) and exits
//! 0 only if it was accepted: the guard test uses it to knock on a door that
//! must stay shut.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, Config};

const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => api().await,
        [cmd, addr] if cmd == "connect" => connect(addr).await,
        _ => anyhow::bail!("usage: probe [connect ADDR:PORT]"),
    }
}

async fn connect(addr: &str) -> Result<()> {
    let attempt = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr)).await;
    match attempt {
        Ok(Ok(_)) => {
            println!("probe connect: {addr} accepted");
            Ok(())
        }
        Ok(Err(err)) => anyhow::bail!("probe connect: {addr}: {err}"),
        Err(_) => anyhow::bail!("probe connect: {addr}: no answer in 3s"),
    }
}

async fn api() -> Result<()> {
    let config = Config::incluster_env().context("in-cluster config from KUBERNETES_SERVICE_HOST/PORT")?;
    let url = config.cluster_url.clone();
    let client = Client::try_from(config)?;
    let version = client.apiserver_version().await.context("GET /version")?;
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("SelfSubjectReview")?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default();
    let namespace = std::fs::read_to_string(NAMESPACE_FILE).context("reading the pod's namespace")?;
    let pods = Api::<Pod>::namespaced(client, namespace.trim())
        .list(&ListParams::default())
        .await
        .context("listing pods of the own namespace")?;
    println!(
        "probe ok: url={url} server={} user={user} pods={}",
        version.git_version,
        pods.items.len()
    );
    Ok(())
}
