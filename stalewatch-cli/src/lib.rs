//! stalewatch's command-line interface, and nothing else: the `stalewatch`
//! binary parses it, and `cargo xtask dist` renders its man pages and shell
//! completions from it without building the eBPF side (which stalewatch's
//! build script does).

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where the running kernel publishes its BTF.
pub const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";

/// How records are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "stalewatch",
    version,
    about = "Finds traffic a Linux host forwards to the wrong place because of a stale conntrack entry"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the kernel for flows pinned to a backend by a stale conntrack
    /// entry, and alert on stdout until SIGINT or SIGTERM.
    Watch(WatchArgs),
    /// Audit a conntrack table once, without eBPF: list the entries that are
    /// stale right now. Exit status 0: none; 1: some; 2: error.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Output format: text for people, json for one object per line.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,

    /// The namespace to audit: a name under /run/netns, a path to a
    /// namespace file, or an inode number. Default: stalewatch's own.
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,

    /// Delete exactly the stale entries found, and print each deletion.
    #[arg(long)]
    pub fix: bool,

    /// A container engine's API socket to name containers with (Docker's,
    /// or Podman's `podman system service`); repeat for several. Default:
    /// $DOCKER_HOST where it is unix://, /var/run/docker.sock and
    /// /run/podman/podman.sock, each where it answers.
    #[arg(long, value_name = "PATH")]
    pub engine_socket: Vec<String>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Output format: text for people, json for one object per line.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,

    /// Watch only this network namespace: a name under /run/netns, a path
    /// to a namespace file, or an inode number. Default: every namespace.
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,

    /// Failed packets of one flow before it is raised (over at least
    /// --grace).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_failures: u32,

    /// Least time from a flow's first failure to the one that raises it:
    /// a flow whose entry an orchestrator deletes within it (a rolling
    /// restart done right) is not raised.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub grace: Duration,

    /// Time between reminders for a flow that keeps failing (the flows of
    /// one service pinned alike share one record).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub remind_every: Duration,

    /// A raised flow with no failure for this long is resolved.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub resolve_after: Duration,

    /// Least time between two kernel reports on one failing flow not yet
    /// raised, besides its first failure and the one that lets it be raised
    /// (reported at once). Afterwards a flow is reported once per
    /// --remind-every at most: raised flows are read from the kernel's map.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub report_interval: Duration,

    /// Failing flows the kernel tracks at once (least recently failing are
    /// evicted beyond that).
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_flows: u32,

    /// How often to audit the conntrack table for flows that bypass a DNAT
    /// without any packet failing (served by a proxy on the host); 0s: never.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub audit_every: Duration,

    /// Delete the conntrack entry of every flow raised as stale or bypass,
    /// and print each deletion. Without it nothing is ever changed.
    #[arg(long)]
    pub fix: bool,

    /// Serve Prometheus/OpenMetrics metrics at http://ADDR/metrics. ADDR is
    /// host:port, or a port alone for 127.0.0.1. Turns on the kernel's BPF
    /// run-time statistics while stalewatch runs (a few ns per program run).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub metrics: Option<std::net::SocketAddr>,

    /// A container engine's API socket to name containers with (Docker's,
    /// or Podman's `podman system service`); repeat for several. Default:
    /// $DOCKER_HOST where it is unix://, /var/run/docker.sock and
    /// /run/podman/podman.sock, each where it answers.
    #[arg(long, value_name = "PATH")]
    pub engine_socket: Vec<String>,

    /// Kernel BTF to read types and tracepoints from.
    #[arg(long, default_value = DEFAULT_BTF, value_name = "PATH")]
    pub btf: PathBuf,
}

/// `host:port`, or a bare port on localhost: metrics stay local unless the
/// user names another address.
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| "expected host:port or a port, like 127.0.0.1:9464 or 9464".to_owned())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// clap's own consistency checks (names, defaults, value parsers), which
    /// otherwise only run when a debug build parses a command line.
    #[test]
    fn the_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
