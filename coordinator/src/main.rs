//! The `coordinator` binary: parse arguments, run, report errors with their whole cause chain.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mgd3_common::default_sigpipe();
    mgd3_common::telemetry::init();
    match mgd3_coordinator::cli::run(mgd3_coordinator::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", mgd3_common::error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
