//! The `worker` binary: parse arguments, run, report errors with their whole cause chain.

use clap::Parser;

fn main() -> std::process::ExitCode {
    mgd3_common::default_sigpipe();
    mgd3_common::telemetry::init();
    match mgd3_worker::cli::run(mgd3_worker::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", mgd3_common::error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
