use std::process::ExitCode;

use clap::{Parser as _, error::ErrorKind};
use stalewatch::command::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("stalewatch: a command is required: `stalewatch watch` (see --help)");
            return ExitCode::from(2);
        }
        Err(err) => {
            eprintln!("stalewatch: {} (see --help)", one_line(&err.to_string()));
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let result = match cli.command {
        Command::Watch(args) => stalewatch::command::watch::run(args),
        Command::Check(args) => stalewatch::command::check::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("stalewatch: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Clap's multi-line message as one line: scripts and logs read one line per
/// error.
fn one_line(message: &str) -> String {
    let mut parts = message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l));
    let first = parts.next().unwrap_or("invalid arguments").to_owned();
    let rest: Vec<&str> = parts.collect();
    if rest.is_empty() {
        first
    } else {
        format!("{first} {}", rest.join(" "))
    }
}
