use clap::Parser;
use ingest_pod::config::Args;
use ingest_pod::server::{self, Server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    server::init_tracing();
    let server = Server::bind(args).await?;
    server.run(server::shutdown_signal()).await?;
    Ok(())
}
