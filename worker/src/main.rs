//! The `worker` binary: parse arguments, run, report errors with their whole cause chain.

fn main() -> std::process::ExitCode {
    mgd3_common::telemetry::init();
    mgd3_common::exit_status(mgd3_worker::cli::run(mgd3_common::args::parse::<mgd3_worker::cli::Cli>()))
}
