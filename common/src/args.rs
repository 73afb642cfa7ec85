//! The command-line parsing both binaries share: clap as declared by each `Cli`, with an
//! environment variable that is set but empty read as unset, and a bad value that came from a
//! variable named as such.

use clap::Command;
use clap::builder::Resettable;

/// Parses this process's arguments into `P`, exiting with clap's message (and status 2) when
/// they are wrong, as `P::parse()` does — except that an environment variable a flag reads
/// (`MGD3_CPU_THREADS`, `MGD3_COORDINATOR`, …) that is set but empty counts as unset, so the
/// flag's default applies. Job scripts write `export MGD3_CPU_THREADS=${SLURM_CPUS_PER_TASK:-}`,
/// and the shell's own convention (`${VAR:-default}`) is that empty means "not given", where
/// clap would refuse `''` as a number or ask for a value.
///
/// A command whose own flags conflict with its subcommands (the worker's cluster mode beside
/// `worker sample`) reads its own flags' variables only when no subcommand is named: a
/// cluster-wide `MGD3_GIVE_UP_AFTER_S` in the job script is not the business of `worker
/// import-fashion-mnist`, which must not refuse to run over it.
pub fn parse<P: clap::Parser>() -> P {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut command = without_unused_env(without_empty_env(P::command()), &args);
    let parsed = command.try_get_matches_from_mut(args).and_then(|mut m| P::from_arg_matches_mut(&mut m));
    parsed.unwrap_or_else(|error| {
        let error = error.format(&mut command);
        if let Some(variable) = from_environment(&command, &error) {
            // clap names the flag; a job script set the variable, so say which.
            let _ = error.print();
            crate::errln!("note: the value came from the environment: {variable}");
            std::process::exit(error.exit_code());
        }
        error.exit()
    })
}

/// The variable (`NAME=value`) an invalid value came from, when `error` is about a value of a
/// flag that was not on the command line but is read from a variable that is set.
fn from_environment(command: &Command, error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else { return None };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let flag = format!("--{long}");
    let given = std::env::args().skip(1).any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if given {
        return None;
    }
    let name = find_env(command, long)?;
    let value = std::env::var(&name).ok().filter(|v| !v.is_empty())?;
    Some(format!("{name}={value}"))
}

/// The variable the flag `--long` of `command` or of one of its subcommands reads.
fn find_env(command: &Command, long: &str) -> Option<String> {
    command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .or_else(|| command.get_subcommands().find_map(|sub| find_env(sub, long)))
}

/// `command` with its own flags reading no variable when `args` (the program name first) name
/// one of its subcommands and its flags conflict with them, so cannot be given beside one: the
/// subcommand's own flags read theirs.
fn without_unused_env(command: Command, args: &[std::ffi::OsString]) -> Command {
    let names_subcommand = args.get(1).is_some_and(|first| command.find_subcommand(first).is_some());
    if command.is_args_conflicts_with_subcommands_set() && names_subcommand {
        command.mut_args(|arg| if arg.get_env().is_some() { arg.env(Resettable::Reset) } else { arg })
    } else {
        command
    }
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
