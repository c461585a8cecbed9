//! The watch's loop: wait for kernel reports, signals and timers, and hand
//! each to the pipeline; detach cleanly on SIGINT or SIGTERM.

use std::{io, time::Duration};

use aya::maps::{MapData, RingBuf};
use stalewatch_common::WAKE_GAP_NS;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::Signal,
};

use super::{pipeline::Pipeline, release_free_memory};
use crate::source::kernel::{
    Probes,
    btf::KernelLayout,
    decode::{self, RawEvent},
};

/// How long after a wakeup the loop reads the ring buffer again: a little
/// more than the kernel's gap between wakeups (see `WAKE_GAP_NS`).
const LOOK_AGAIN: Duration = Duration::from_nanos(WAKE_GAP_NS + 1_000_000);
/// How long after a ruleset change the loop audits: an orchestrator
/// writes its rules in several steps.
const RULES_SETTLE: Duration = Duration::from_millis(500);
/// How long after an audit that judged entries stale the loop looks again
/// to confirm them (see `pipeline::CONFIRM_AFTER`).
const CONFIRM: Duration = Duration::from_secs(1);
/// How long after conntrack events arrive the loop reads them, while the
/// audit keeps them: a burst of new connections is read in batches (the
/// socket holds 8 MiB of them), not with a wakeup each, which polling the
/// socket would cost (every datagram wakes an edge-triggered epoll); so
/// the socket is polled only until its first event, then left alone until
/// it is read. A quiet table wakes the loop for nothing.
const EVENTS_EVERY: Duration = Duration::from_millis(100);
/// Reports handled before the loop looks at signals and timers again.
const DRAIN_BATCH: usize = 256;
/// Reports read on each tick, at most: more than the ring buffer holds
/// (2 MiB of records of 48 bytes or more), so all that waited.
const TICK_DRAIN: usize = 65_536;

/// When the loop reads the audit's conntrack events.
#[derive(Default)]
struct MirrorWatch {
    /// The mirror watched (see `Pipeline::mirror_fd`).
    mirror: Option<u64>,
    /// Polled for its first event, while nothing waits to be read: a
    /// duplicate of the pipeline's socket, so that it stays the same open
    /// socket while registered, whatever the pipeline does with its own.
    armed: Option<AsyncFd<std::os::fd::OwnedFd>>,
    /// Events wait: read them then.
    due: Option<tokio::time::Instant>,
    /// It cannot be polled: read it every EVENTS_EVERY instead.
    ticking: bool,
}

impl MirrorWatch {
    /// Follows the pipeline's mirror: a new one is polled, a gone one let go.
    fn follow(&mut self, fd: Option<(u64, std::os::fd::RawFd)>) {
        if fd.map(|(n, _)| n) == self.mirror {
            return;
        }
        // The old registration first: a new socket may have its number.
        *self = MirrorWatch::default();
        if let Some((n, fd)) = fd {
            self.mirror = Some(n);
            self.arm(fd);
        }
    }

    /// Polls the socket for its next event (at once if some wait). `fd`
    /// is the pipeline's mirror socket, open while this runs.
    fn arm(&mut self, fd: std::os::fd::RawFd) {
        // SAFETY: `fd` is the open socket of the pipeline's mirror, which
        // nothing closes while this runs (the loop's one thread); only a
        // duplicate of it outlives this call.
        let dup = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned();
        // SAFETY: the AsyncFd owns its duplicate, open until it is dropped.
        let armed = dup.and_then(|dup| {
            unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
        });
        match armed {
            Ok(a) => self.armed = Some(a),
            Err(e) => {
                log::debug!("conntrack events not polled ({e}): read every {EVENTS_EVERY:?}");
                self.ticking = true;
            }
        }
    }
}

pub async fn run<W: io::Write>(
    mut pipeline: Pipeline<W>,
    probes: Probes,
    events: RingBuf<MapData>,
    (mut sigint, mut sigterm): (Signal, Signal),
    audit_every: Duration,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and
    // unchanged until the AsyncFd (and with it the RingBuf) is dropped.
    let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    // An interval of zero disables the audit.
    let mut auditor = tokio::time::interval(audit_every.max(Duration::from_millis(100)));
    let mut lost_reported = 0;
    let mut ticks = 0u64;
    let layout = probes.layout.clone();
    // A second look after each wakeup: the kernel wakes this loop at most
    // once per WAKE_GAP_NS, so urgent reports sent in the gap after a
    // wakeup wait for this look, not for the next tick.
    let mut look_again: Option<tokio::time::Instant> = None;
    // An audit sooner than the interval: to confirm what the last one
    // judged stale, or because the rules changed.
    let mut audit_soon: Option<tokio::time::Instant> = None;
    let mut events_tick = tokio::time::interval(EVENTS_EVERY);
    events_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mirror = MirrorWatch::default();

    loop {
        mirror.follow(pipeline.mirror_fd());
        tokio::select! {
            _ = events_tick.tick(), if mirror.ticking => {
                pipeline.update_mirror();
            }
            _ = async { mirror.armed.as_ref()?.readable().await.ok() }, if mirror.armed.is_some() => {
                // Left alone until read: its next events wake no one.
                mirror.armed = None;
                mirror.due = Some(tokio::time::Instant::now() + EVENTS_EVERY);
            }
            _ = tokio::time::sleep_until(mirror.due.unwrap_or_else(tokio::time::Instant::now)), if mirror.due.is_some() => {
                mirror.due = None;
                pipeline.update_mirror();
                // Events left (a read takes a bounded batch) or come since
                // make it ready again at once.
                if let Some((_, fd)) = pipeline.mirror_fd() {
                    mirror.arm(fd);
                }
            }
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let handled = drain(&mut pipeline, guard.get_inner_mut(), &layout, DRAIN_BATCH)?;
                // A full batch may have left reports behind: stay ready so
                // the loop comes back after a look at the signals.
                if handled < DRAIN_BATCH {
                    guard.clear_ready();
                }
                // From the latest wakeup: reports suppressed after it come
                // within the gap that follows it.
                look_again = Some(tokio::time::Instant::now() + LOOK_AGAIN);
            }
            _ = tokio::time::sleep_until(look_again.unwrap_or_else(tokio::time::Instant::now)), if look_again.is_some() => {
                look_again = None;
                drain(&mut pipeline, events.get_mut(), &layout, TICK_DRAIN)?;
            }
            _ = ticker.tick() => {
                // Most reports wake no one (see the kernel's `due`): they
                // are read here, all of them, once a second.
                drain(&mut pipeline, events.get_mut(), &layout, TICK_DRAIN)?;
                // The mirror's own clocks (reading the table again after
                // lost events, or for entries never announced) need a
                // look when no event comes.
                if mirror.armed.is_some() {
                    pipeline.update_mirror();
                }
                pipeline.tick(&probes, ticks)?;
                ticks += 1;
                // Counting map entries walks the maps: every 5 s only.
                if ticks % 5 == 1 {
                    refresh_metrics(&pipeline, &probes)?;
                    // Raising many flows at once leaves big buffers
                    // (conntrack dumps) freed behind.
                    release_free_memory();
                }
                if !audit_every.is_zero() && audit_soon.is_none() && pipeline.rules_changed() {
                    audit_soon = Some(tokio::time::Instant::now() + RULES_SETTLE);
                }
                let stats = probes.stats()?;
                if stats.events_lost > lost_reported {
                    pipeline
                        .output
                        .events_lost(stats.events_lost - lost_reported, stats.events_lost)?;
                    lost_reported = stats.events_lost;
                }
            }
            _ = auditor.tick(), if !audit_every.is_zero() => {
                if pipeline.audit()? {
                    audit_soon = Some(tokio::time::Instant::now() + CONFIRM);
                }
                // The audit's dump was the largest buffer of the round.
                release_free_memory();
            }
            _ = tokio::time::sleep_until(audit_soon.unwrap_or_else(tokio::time::Instant::now)), if audit_soon.is_some() => {
                audit_soon = None;
                if pipeline.audit()? {
                    audit_soon = Some(tokio::time::Instant::now() + CONFIRM);
                }
                release_free_memory();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        pipeline.end_round()?;
    }
    pipeline.remind()?;
    pipeline.end_round()?;
    let stats = probes.stats()?;
    drop(probes);
    eprintln!(
        "stalewatch: detached; {} failing packets followed, {} kernel reports, {} lost",
        stats.failures, stats.events_sent, stats.events_lost
    );
    Ok(())
}

/// Hands up to `max` reports from the ring buffer to the pipeline; returns
/// how many were read.
fn drain<W: io::Write>(
    pipeline: &mut Pipeline<W>,
    ring: &mut RingBuf<MapData>,
    layout: &KernelLayout,
    max: usize,
) -> io::Result<usize> {
    let mut handled = 0;
    while handled < max {
        let Some(item) = ring.next() else { break };
        handled += 1;
        let report = match decode::raw_event(&item) {
            Some(RawEvent::Flow(raw)) => decode::flow(&raw, &layout.tuple, &layout.drop_reasons),
            Some(RawEvent::Local(raw)) => Some(decode::local(&raw)),
            None => None,
        };
        drop(item);
        if let Some(report) = report {
            pipeline.report(report)?;
        }
    }
    Ok(handled)
}

fn refresh_metrics<W: io::Write>(pipeline: &Pipeline<W>, probes: &Probes) -> anyhow::Result<()> {
    let Some(metrics) = pipeline.output.metrics() else {
        return Ok(());
    };
    let counters = probes.counters()?;
    if let Ok(mut m) = metrics.lock() {
        m.refresh(&counters, &probes.layout.drop_reasons);
        m.flows(
            pipeline.correlator.tracked(),
            pipeline.correlator.raised_count(),
        );
    }
    Ok(())
}
