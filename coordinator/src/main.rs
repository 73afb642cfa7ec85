//! The `coordinator` binary: parse arguments, run, report errors with their whole cause chain.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mgd3_common::telemetry::init();
    mgd3_common::exit_status(mgd3_coordinator::cli::run(mgd3_common::args::parse::<mgd3_coordinator::cli::Cli>()).await)
}
