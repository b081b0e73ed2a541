use clap::Parser;
use ingest_pod::config::Args;
use ingest_pod::server::Server;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = match args.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(n))
            .enable_all()
            .build()?,
    };
    runtime.block_on(async {
        ingest_runtime::init_logs(args.log_format);
        let server = Server::bind(args).await?;
        server.run(ingest_runtime::shutdown_signal()).await?;
        Ok(())
    })
}
