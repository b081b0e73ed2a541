use clap::Parser;
use ingest_operator::config::Args;
use ingest_operator::run;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run::init_tracing();
    let client = kube::Client::try_default().await?;
    run::run(args, client, run::shutdown_signal()).await?;
    Ok(())
}
