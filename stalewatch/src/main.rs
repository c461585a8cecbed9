use std::process::ExitCode;

use clap::Parser as _;
use stalewatch::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let result = match cli.command {
        Command::Watch(args) => stalewatch::watch::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("stalewatch: {err:#}");
            ExitCode::from(2)
        }
    }
}
