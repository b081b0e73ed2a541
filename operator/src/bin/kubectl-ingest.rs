//! `kubectl ingest`: the kubectl plugin (copy it onto PATH). See
//! `kubectl ingest --help`; the logic is in `ingest_operator::plugin`.

use std::process::ExitCode;

use clap::Parser;
use ingest_operator::plugin::{self, Args, Exit};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match plugin::run(args, ingest_runtime::shutdown_signal()).await {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(Exit::Error.code())
        }
    }
}
