//! `stalewatch watch`: load the probes, stream kernel reports through the
//! correlator, audit the conntrack table now and then for what no packet
//! failure shows, print alerts, and detach cleanly on SIGINT or SIGTERM.
//!
//! Its parts: [`event_loop`] waits for reports, signals and timers;
//! [`pipeline`] gathers the evidence a report needs from the [`view`] of
//! the host's conntrack tables, asks the correlator, and hands what it says
//! to the [`output`].

mod audit;
mod event_loop;
mod output;
mod pipeline;
mod rules;
mod view;

use std::{
    io,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use nix::time::{ClockId, clock_gettime};
use tokio::signal::unix::{SignalKind, signal};

use self::{output::Output, pipeline::Pipeline};
use super::cli::WatchArgs;
use crate::{
    correlate::{self, Correlator},
    sink::{
        metrics::{self, Metrics},
        record::Clock,
    },
    source::{
        conntrack,
        engine::Engine,
        kernel::{self, Probes},
        netns,
    },
};

pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let netns_filter = args.netns.as_deref().map(netns::resolve).transpose()?;
    // The namespace the audit reads: the watched one, or our own.
    let (_, audit_path) = netns::target(args.netns.as_deref())?;
    let options = kernel::Options {
        btf: args.btf.clone(),
        netns: netns_filter,
        emit_interval: args.report_interval,
        // Reports of entries already reported at --min-failures bring back
        // only those not raised (raised ones are read from the map): a flow
        // whose raising report was lost, or resolved when it paused. As
        // often as a reminder.
        reported_interval: args.report_interval.max(args.remind_every),
        min_failures: args.min_failures,
        grace: args.grace,
        max_flows: args.max_flows,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // Handlers first: a signal that comes while we load must not kill us
    // with the programs attached half-way.
    let signals = {
        let _guard = runtime.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    // Bad input first: nothing gets attached if the address is taken.
    let listener = match args.metrics {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            listener.set_nonblocking(true)?;
            let _guard = runtime.enter();
            Some((addr, tokio::net::TcpListener::from_std(listener)?))
        }
        None => None,
    };

    let mut probes = Probes::load(&options)?;
    // The audit needs the conntrack table (CAP_NET_ADMIN, and CAP_SYS_ADMIN
    // to enter another namespace): say so now, not every audit interval (the
    // programs detach as `probes` drops).
    if !args.audit_every.is_zero() {
        conntrack::read_table(&audit_path).with_context(|| {
            format!(
                "cannot audit {} (--audit-every 0s skips the audit)",
                audit_path.display()
            )
        })?;
    }
    let events = probes.take_events()?;
    // Parsing the kernel's BTF (twice: offsets, then the loader) peaks at
    // tens of MiB, all freed by now.
    release_free_memory();
    let scope = match (&args.netns, netns_filter) {
        (Some(name), Some(inode)) => format!("network namespace {name} (inode {inode})"),
        _ => "every network namespace".to_owned(),
    };

    let metrics = match listener {
        Some((addr, listener)) => {
            // Run counts and times of our programs: kept while this fd lives.
            let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .map_err(|e| log::warn!("BPF run-time statistics unavailable: {e}"))
                .ok();
            let metrics = Arc::new(Mutex::new(Metrics::new()));
            runtime.spawn(metrics::serve(listener, metrics.clone()));
            eprintln!("stalewatch: metrics at http://{addr}/metrics");
            Some((metrics, stats))
        }
        None => None,
    };
    let correlator = Correlator::new(correlate::Config {
        min_failures: args.min_failures,
        grace: args.grace,
        remind_every: args.remind_every,
        resolve_after: args.resolve_after,
    });
    // Flushed once a round of the loop (see `Pipeline::end_round`).
    let out = io::BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let output = Output::new(
        args.format,
        out,
        metrics.as_ref().map(|(m, _)| m.clone()),
        args.fix,
    );
    let pipeline = Pipeline::new(
        correlator,
        output,
        Engine::connect(&args.engine_socket),
        args.resolve_after,
        audit_path,
    );
    // Said last, once SIGINT and SIGTERM are handled: whoever waits for
    // this line may stop us at once.
    eprintln!(
        "stalewatch: attached to icmp:icmp_send and skb:kfree_skb (conntrack entries read {}); watching {scope}",
        probes.reads
    );
    runtime.block_on(event_loop::run(
        pipeline,
        probes,
        events,
        signals,
        args.audit_every,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Growth of the resident set, in pages, past which free heap is handed
/// back (4 MiB): the rules' walk frees and takes again a few MiB each
/// time, and handing those back costs a page fault per page when the next
/// walk takes them (a storm of rule changes walks every few seconds);
/// `malloc_trim` itself walks the heap.
const TRIM_AFTER_PAGES: u64 = 1024;

/// Hands free heap memory back to the system once the resident set grew
/// by TRIM_AFTER_PAGES since the last time: big transient buffers (BTF
/// parsing, conntrack dumps of large tables, thousands of alerts raised
/// at once) would otherwise stay resident for good in glibc's arenas. A
/// no-op with other C libraries.
fn release_free_memory() {
    static AFTER_LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let resident = || -> u64 {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let last = AFTER_LAST.load(std::sync::atomic::Ordering::Relaxed);
    if last != 0 && resident() < last.saturating_add(TRIM_AFTER_PAGES) {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: no preconditions; it only releases free heap memory.
    unsafe {
        nix::libc::malloc_trim(0);
    }
    AFTER_LAST.store(resident().max(1), std::sync::atomic::Ordering::Relaxed);
}

fn monotonic() -> Duration {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

fn clock() -> Clock {
    Clock {
        monotonic: monotonic(),
        wall: SystemTime::now(),
    }
}
