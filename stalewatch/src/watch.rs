//! `stalewatch watch`: load the probes, stream kernel reports through the
//! correlator, print alerts, and detach cleanly on SIGINT or SIGTERM.

use std::{
    io,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use nix::time::{ClockId, clock_gettime};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::WatchArgs,
    conntrack,
    correlate::{self, Alert, Correlator, Siblings},
    event::{Observation, Tuple},
    kernel::{self, Probes},
    netns,
    report::{Clock, Record, Reporter, StaleFlow},
};

pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let netns_filter = args.netns.as_deref().map(netns::resolve).transpose()?;
    let options = kernel::Options {
        btf: args.btf.clone(),
        netns: netns_filter,
        emit_interval: args.report_interval,
        max_flows: args.max_flows,
    };
    let mut probes = Probes::load(&options)?;
    let events = probes.take_events()?;
    let scope = match (&args.netns, netns_filter) {
        (Some(name), Some(inode)) => format!("network namespace {name} (inode {inode})"),
        _ => "every network namespace".to_owned(),
    };
    eprintln!("stalewatch: attached to icmp:icmp_send and skb:kfree_skb; watching {scope}");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let config = correlate::Config {
        min_failures: args.min_failures,
        remind_every: args.remind_every,
        resolve_after: args.resolve_after,
    };
    let reporter = Reporter::new(args.format, io::stdout().lock());
    runtime.block_on(event_loop(
        probes,
        events,
        Correlator::new(config),
        reporter,
    ))?;
    Ok(ExitCode::SUCCESS)
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

async fn event_loop<W: io::Write>(
    probes: Probes,
    events: RingBuf<MapData>,
    mut correlator: Correlator,
    mut reporter: Reporter<W>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and
    // unchanged until the AsyncFd (and with it the RingBuf) is dropped.
    let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut lost_reported = 0;
    let layout = probes.layout.clone();

    let emit = |alert: &Alert, reporter: &mut Reporter<W>| -> io::Result<()> {
        let info = netns::describe(alert.flow.netns);
        reporter.write(&Record::StaleFlow(Box::new(StaleFlow::new(
            alert,
            info,
            &clock(),
        ))))
    };

    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    let flow = match kernel::read_event(&item) {
                        Some(kernel::Record::Flow(raw)) => {
                            Observation::decode(&raw, &layout.tuple, &layout.drop_reasons)
                        }
                        Some(kernel::Record::Local(raw)) => Some(Observation::decode_local(&raw)),
                        None => None,
                    };
                    let Some(flow) = flow else { continue };
                    let now = monotonic();
                    // Only flows about to be alerted cost conntrack queries:
                    // is the entry still there (an orchestrator may have
                    // cleaned it up already), and where do its siblings go?
                    let mut siblings = None;
                    if correlator.would_alert(&flow, now) {
                        if entry_exists(flow.netns, &flow.orig, &flow.reply) == Some(false) {
                            for alert in correlator.entry_gone(flow.netns, &flow.orig, now) {
                                emit(&alert, &mut reporter)?;
                            }
                            continue;
                        }
                        siblings = siblings_of(&flow);
                    }
                    if let Some(alert) = correlator.observe(flow, siblings.as_ref(), now) {
                        emit(&alert, &mut reporter)?;
                    }
                }
                guard.clear_ready();
            }
            _ = ticker.tick() => {
                for (netns, orig, reply) in correlator.raised_flows() {
                    if entry_exists(netns, &orig, &reply) == Some(false) {
                        for alert in correlator.entry_gone(netns, &orig, monotonic()) {
                            emit(&alert, &mut reporter)?;
                        }
                    }
                }
                for alert in correlator.tick(monotonic()) {
                    emit(&alert, &mut reporter)?;
                }
                let stats = probes.stats()?;
                if stats.events_lost > lost_reported {
                    reporter.write(&Record::EventsLost {
                        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                        count: stats.events_lost - lost_reported,
                        total: stats.events_lost,
                    })?;
                    lost_reported = stats.events_lost;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    let stats = probes.stats()?;
    drop(probes);
    eprintln!(
        "stalewatch: detached; {} failing packets of DNATed flows seen, {} kernel reports, {} lost",
        stats.failures, stats.events_sent, stats.events_lost
    );
    Ok(())
}

/// What the conntrack table of the flow's namespace shows of its siblings:
/// the other DNATed entries to the same destination. `None` when the table
/// cannot be read (the namespace cannot be entered, say).
fn siblings_of(flow: &Observation) -> Option<Siblings> {
    let path = netns::path_of(&netns::describe(flow.netns))?;
    let filter = conntrack::Filter {
        family: Some(flow.orig.family),
        proto: Some(flow.orig.proto),
        status: Some((
            stalewatch_common::ct_status::DST_NAT,
            stalewatch_common::ct_status::DST_NAT,
        )),
        orig_dst: Some((flow.orig.dst, flow.orig.dport)),
    };
    let entries = conntrack::dump(Some(&path), &filter)
        .map_err(|e| log::warn!("reading conntrack for siblings: {e}"))
        .ok()?;
    let mut siblings = Siblings::default();
    for entry in entries.iter().filter(|e| e.orig != flow.orig) {
        *siblings
            .dnat_backends
            .entry((entry.reply.src, entry.reply.sport))
            .or_default() += 1;
    }
    Some(siblings)
}

/// Whether the conntrack entry `orig`/`reply` still exists in namespace
/// `netns`; `None` when that cannot be told. A live flow gets a new entry
/// with the same original tuple at once when its entry is deleted: that one
/// differs in its reply (the backend), and is not the stale entry.
fn entry_exists(netns: u32, orig: &Tuple, reply: &Tuple) -> Option<bool> {
    let path = netns::path_of(&netns::describe(netns))?;
    conntrack::get(Some(&path), orig)
        .map(|entry| entry.is_some_and(|e| e.reply == *reply))
        .map_err(|e| log::warn!("looking up a conntrack entry: {e}"))
        .ok()
}
