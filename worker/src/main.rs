//! The `worker` binary: parse arguments, run, report errors with their whole cause chain.

use clap::Parser;

fn main() -> std::process::ExitCode {
    mgd3_common::telemetry::init();
    mgd3_common::exit_status(mgd3_worker::cli::run(mgd3_worker::cli::Cli::parse()))
}
