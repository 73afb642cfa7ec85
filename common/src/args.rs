//! The command-line parsing both binaries share: clap as declared by each `Cli`, with an
//! environment variable that is set but empty read as unset.

use clap::Command;
use clap::builder::Resettable;

/// Parses this process's arguments into `P`, exiting with clap's message (and status 2) when
/// they are wrong, as `P::parse()` does — except that an environment variable a flag reads
/// (`MGD3_CPU_THREADS`, `MGD3_COORDINATOR`, …) that is set but empty counts as unset, so the
/// flag's default applies. Job scripts write `export MGD3_CPU_THREADS=${SLURM_CPUS_PER_TASK:-}`,
/// and the shell's own convention (`${VAR:-default}`) is that empty means "not given", where
/// clap would refuse `''` as a number or ask for a value.
pub fn parse<P: clap::Parser>() -> P {
    let mut command = without_empty_env(P::command());
    let parsed =
        command.try_get_matches_from_mut(std::env::args_os()).and_then(|mut m| P::from_arg_matches_mut(&mut m));
    parsed.unwrap_or_else(|error| error.format(&mut command).exit())
}

/// `command` without the environment variables that are set but empty, in its subcommands too.
fn without_empty_env(command: Command) -> Command {
    command
        .mut_args(|arg| {
            let empty = arg.get_env().is_some_and(|name| std::env::var_os(name).is_some_and(|v| v.is_empty()));
            if empty { arg.env(Resettable::Reset) } else { arg }
        })
        .mut_subcommands(without_empty_env)
}
