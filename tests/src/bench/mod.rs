//! `stalewatch-bench`: what stalewatch costs the host, measured on real
//! forwarding in network namespaces of its own.
//!
//! A benchmark, not a test: it prints figures and never fails on timing.
//! Machines are shared and noisy, so every figure comes from runs without
//! and with the tool under test taken alternately in one invocation, and is
//! reported as a median and a with/without ratio.
//!
//! - [`topo`]: sender, router (DNAT, conntrack) and destination namespaces.
//! - [`flood`]: the load generator and the sink.
//! - [`procfs`]: counters of namespaces and processes.
//! - [`tools`]: stalewatch and bpftrace as a user runs them, and the
//!   kernel's own BPF run statistics.
//! - [`synthetic`]: the correlator's memory, in process, at flow counts the
//!   shared conntrack table must not be filled to.
//! - [`table`]: medians and the printed table.
//! - [`loads`]: the figures' loads.
//! - [`measure`]: a load's runs, without and with each tool, and what one
//!   run collects.
//! - [`render`]: the report's header and the table's rows.
//! - [`details`]: the report's per-run values.
//! - [`figures`]: the figures, each its loads' runs and rows.
//! - [`soak`]: `--soak`, stalewatch under one long stale flood.
//! - [`intent`]: figure 4's loads: a ruleset of thousands of services
//!   rewritten as it is read, a table of DNATed entries, and the CPU of
//!   one-shot commands.

pub mod details;
pub mod figures;
pub mod flood;
pub mod intent;
pub mod loads;
pub mod measure;
pub mod procfs;
pub mod render;
pub mod soak;
pub mod synthetic;
pub mod table;
pub mod tools;
pub mod topo;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;

/// Set by the binary's SIGINT/SIGTERM handler; every wait checks it so that
/// the guards clean up promptly.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Sleeps for `d`, failing early on Ctrl-C.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// The prefix of everything the bench names: `swb<pid>`.
pub fn prefix() -> String {
    format!("swb{}", std::process::id())
}
