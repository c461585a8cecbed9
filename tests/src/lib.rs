//! End-to-end harness for stalewatch: builds topologies in network
//! namespaces of its own, drives real traffic through real iptables and
//! conntrack, and runs the real stalewatch binary against them.
//!
//! Everything it creates is named with a per-process prefix and removed on
//! drop, also when a test fails. It never configures the root namespace.

pub mod bench;
pub mod docker;
pub mod multihost;
pub mod netns;
pub mod podman;
pub mod story;
pub mod systemd;
pub mod traffic;
pub mod watcher;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Calls `f` every 50 ms until it returns something or `limit` has passed.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command, failing with its output when it fails.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let (program, rest) = args.split_first().context("empty command")?;
    let out = Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with `input` on its standard input (`nft -f -`,
/// `iptables-restore`), failing with its output when it fails.
pub fn run_input(args: &[&str], input: &str) -> anyhow::Result<String> {
    use std::{io::Write as _, process::Stdio};
    let (program, rest) = args.split_first().context("empty command")?;
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", args.join(" ")))?;
    // Small inputs: the pipe holds them, so writing before reading is safe.
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}\ninput:\n{input}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a shell command line (such as the fix command of an alert).
pub fn sh(line: &str) -> anyhow::Result<String> {
    run(&["sh", "-c", line])
}

/// A prefix unique to this process, for everything the harness names.
pub fn prefix() -> String {
    format!("sw{}", std::process::id() % 100_000)
}
