//! The README demo on a real cluster: brings a two-node Kubernetes cluster
//! up on this machine, installs the chart, and runs the node-drain scenario
//! with narration (20 capable publishers and one ffmpeg through the ingest
//! Service, `kubectl drain` of the node with two ingest pods, the
//! IngestDrain as `kubectl get ingestdrains -w` shows it, the audit at the
//! origin). Tears the cluster down at the end unless `--keep`.
//!
//! Needs root and the release binaries of ingest-pod and ingest-operator;
//! `.ci/demo` builds everything first.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use ingest_e2e::Cluster;
use ingest_e2e::lossless;

const USAGE: &str = "usage: demo [--keep]

Brings up a two-node cluster, installs the lossless-ingest chart and drains
a node under 20 capable publishers and one ffmpeg publisher, then prints
what reached the origin.

  --keep   leave the cluster (and the install) running afterwards and print
           how to reach it; `e2e/cluster/cluster down` removes it";

fn main() -> ExitCode {
    let mut keep = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--keep" => keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(keep)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\ndemo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(keep: bool) -> Result<()> {
    let t = Instant::now();
    println!("== bringing up a two-node Kubernetes cluster on this machine");
    let cluster = Arc::new(Cluster::up(2).await?);
    println!("   cluster up in {:.1?}", t.elapsed());
    println!(
        "\n== installing the chart, publishing, and draining the node with two ingest pods\n   \
         (the IngestDrain rows below are what `kubectl get ingestdrains -w` shows)"
    );
    let result = tokio::select! {
        r = lossless::node_drain(cluster.clone()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if keep {
        cluster.keep();
        println!(
            "\n== the cluster keeps running:\n   export KUBECONFIG={}\n   {} get pods,ingestdrains -n {}\n   \
             e2e/cluster/cluster down    # removes it",
            cluster.kubeconfig().display(),
            cluster.kubectl_path().display(),
            lossless::NODE_DRAIN_NS
        );
    } else {
        println!("\n== tearing the cluster down");
        cluster.down()?;
    }
    result?;
    println!(
        "\n== done in {:.1?}: zero capable-publisher messages lost across the node drain",
        t.elapsed()
    );
    Ok(())
}
