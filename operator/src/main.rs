use clap::Parser;
use ingest_operator::config::Args;
use ingest_operator::run;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ingest_runtime::init_logs(args.log_format);
    // kube's default client retries a 429 with backoff for many minutes: an
    // eviction that the eviction webhook or a PodDisruptionBudget refuses
    // would block the reconcile that asked for it (and the status write
    // that lets the webhook allow it). Reconciles requeue on their own.
    let mut config = kube::Config::infer().await?;
    config.default_retry = false;
    let client = kube::Client::try_from(config)?;
    run::run(args, client, ingest_runtime::shutdown_signal()).await?;
    Ok(())
}
