//! The correlator at a flow count the shared conntrack table must not be
//! filled to: stalewatch's own `Correlator`, fed synthetic kernel reports
//! in this process, its heap measured by a counting allocator.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use stalewatch::{
    correlate::{Config, Correlator},
    domain::{DropEvidence, Evidence, Family, Observation, Proto, Tuple},
};

/// The system allocator, counting live bytes. The bench binary installs it
/// as its global allocator.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug)]
pub struct CorrelatorFigures {
    pub flows: usize,
    /// Heap with every flow tracked once, below the alert threshold.
    pub tracked_bytes: usize,
    /// Heap with every flow raised; extrapolated per raised flow when the
    /// time budget ran out first (see `raised`).
    pub raised_bytes: f64,
    /// Flows raised within the time budget.
    pub raised: usize,
    /// Mean time of a first report (tracking only), and of a report that
    /// raises its flow. Both include building the decoded `Observation`
    /// (with its reason string, as decoding does).
    pub ns_per_track: f64,
    pub ns_per_raise: f64,
}

/// A report as the kernel sends it for the bench's stale flood: flow `i`
/// from 198.18.x.y:port to the router's 7777, pinned to 198.19.99.2.
fn report(i: u32, failures: u32, at: Duration) -> Observation {
    let src = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1 + (i / 50_000) as u8));
    let sport = 10_000 + (i % 50_000) as u16;
    let router = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let backend = IpAddr::V4(Ipv4Addr::new(198, 19, 99, 2));
    let udp = |src, sport, dst, dport| Tuple {
        family: Family::Ipv4,
        proto: Proto::UDP,
        src,
        sport,
        dst,
        dport,
    };
    Observation {
        local: false,
        ct: 0xffff_8880_0000_0000 + u64::from(i) * 320,
        netns: 4_026_532_000,
        orig: udp(src, sport, router, 7777),
        reply: udp(backend, 7777, src, sport),
        // CONFIRMED | DST_NAT
        status: (1 << 3) | (1 << 5),
        // Failing for a second: past the grace of a raise.
        first: at.saturating_sub(Duration::from_secs(1)),
        last: at,
        icmp: None,
        drops: Some(DropEvidence {
            reason: "NEIGH_QUEUEFULL".into(),
            count: failures,
        }),
    }
}

/// Feeds `flows` distinct failing flows through a correlator with the
/// default settings, as the kernel would: first every flow once below the
/// threshold (tracked), then every flow again above it (raised). Raising
/// stops at `budget`, so that a correlator whose cost grows with the flows
/// it tracks still gives figures in bounded time.
pub fn correlator(flows: usize, budget: Duration) -> CorrelatorFigures {
    let base = live_bytes();
    let mut c = Correlator::new(Config::default());
    let t0 = Duration::from_secs(1_000);
    let started = Instant::now();
    for i in 0..flows as u32 {
        let _ = c.observe(report(i, 1, t0), Evidence::default(), t0);
    }
    let track_time = started.elapsed();
    let tracked_bytes = live_bytes().saturating_sub(base);
    assert_eq!(c.tracked(), flows, "every synthetic flow is distinct");

    let at = t0 + Duration::from_millis(500);
    let started = Instant::now();
    let mut raised = 0usize;
    for i in 0..flows as u32 {
        if raised.is_multiple_of(256) && (started.elapsed() > budget || super::interrupted()) {
            break;
        }
        // The alert a raise returns is printed and dropped in stalewatch;
        // here it is only dropped.
        let _ = c.observe(report(i, 5, at), Evidence::default(), at);
        raised += 1;
    }
    let raise_time = started.elapsed();
    let grown = live_bytes().saturating_sub(base) as f64 - tracked_bytes as f64;
    CorrelatorFigures {
        flows,
        tracked_bytes,
        raised_bytes: tracked_bytes as f64 + grown / raised.max(1) as f64 * flows as f64,
        raised,
        ns_per_track: track_time.as_nanos() as f64 / flows as f64,
        ns_per_raise: raise_time.as_nanos() as f64 / raised.max(1) as f64,
    }
}
