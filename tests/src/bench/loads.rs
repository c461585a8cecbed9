//! The loads the figures measure: what the sender floods, where its
//! packets are counted, and what else each load's runs measure.

use std::{net::Ipv4Addr, time::Duration};

use super::{flood::Spec, measure::Settings, topo};

/// Where a load's packets are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountAt {
    /// Arrivals at the destination: forwarded packets.
    Destination,
    /// Arrivals at the router: every one is dropped or fails there.
    Router,
}

/// A load: its traffic, where it is counted, and what its runs measure.
pub struct Load {
    pub key: &'static str,
    pub spec: Spec,
    pub count_at: CountAt,
    pub window: Duration,
    pub runs: u32,
    /// Also read the BPF run statistics after the window.
    pub cost: bool,
    /// Also measure empty programs on the same tracepoints.
    pub floor: bool,
    /// Also measure an empty program of stalewatch's kind on kfree_skb.
    pub empty: bool,
    pub max_flows: u32,
    /// A second window for the tool's CPU, right after the first: the
    /// stale floods raise every flow in the first, and run steady here.
    pub steady: Duration,
}

/// Flows of the forwarding loads, figures 1-2.
const FEW: u32 = 64;

/// stalewatch's own `--max-flows` default, or room for every flow of a
/// load with more.
pub fn max_flows(flows: u32) -> u32 {
    65_536.max(flows)
}

/// A load's traffic; `measure` sets its limits.
fn spec(
    dst: Ipv4Addr,
    dport: u16,
    flows: u32,
    first_sport: u16,
    ttl: u8,
    rate: Option<u64>,
) -> Spec {
    Spec {
        dst,
        dport,
        flows,
        first_sport,
        ttl,
        rate,
        limit: Duration::ZERO,
        max_packets: 0,
    }
}

/// The stale floods' traffic, figure 3 and the soak: `flows` flows to the
/// stale backend at `rate`.
pub fn stale_spec(flows: u32, rate: u64) -> Spec {
    spec(
        topo::ROUTER_LAN,
        topo::STALE_PORT,
        flows,
        10_000,
        64,
        Some(rate),
    )
}

impl Load {
    /// One window per run, nothing else measured; the figures' loads say
    /// what they add.
    fn new(key: &'static str, spec: Spec, count_at: CountAt, window: Duration, runs: u32) -> Load {
        Load {
            key,
            max_flows: max_flows(spec.flows),
            spec,
            count_at,
            window,
            runs,
            cost: false,
            floor: false,
            empty: false,
            steady: Duration::ZERO,
        }
    }

    /// A forwarding load of figures 1-2: [`FEW`] flows, sender at full speed.
    fn forwarding(
        key: &'static str,
        dst: Ipv4Addr,
        dport: u16,
        ttl: u8,
        count_at: CountAt,
        s: &Settings,
    ) -> Load {
        let spec = spec(dst, dport, FEW, 20_000, ttl, None);
        Load::new(key, spec, count_at, s.window, s.runs)
    }

    /// Figure 1, healthy: DNATed, forwarded, delivered; neither hook
    /// fires. No program runs, so the ratio is the machine's noise alone,
    /// against a tight target: twice the runs narrow its medians.
    pub fn healthy(s: &Settings) -> Load {
        Load {
            runs: 2 * s.runs,
            ..Load::forwarding(
                "1",
                topo::ROUTER_LAN,
                topo::HEALTHY_PORT,
                64,
                CountAt::Destination,
                s,
            )
        }
    }

    /// Figure 2a: every packet dropped by a FORWARD rule, not DNATed.
    pub fn dropped(s: &Settings) -> Load {
        Load {
            cost: true,
            empty: true,
            ..Load::forwarding("2a", topo::DEST, topo::DROPPED_PORT, 64, CountAt::Router, s)
        }
    }

    /// Figure 2b: the healthy flood with TTL 1, DNATed, then dropped at
    /// forwarding.
    pub fn ttl_expired(s: &Settings) -> Load {
        Load {
            cost: true,
            floor: true,
            empty: true,
            ..Load::forwarding(
                "2b",
                topo::ROUTER_LAN,
                topo::HEALTHY_PORT,
                1,
                CountAt::Router,
                s,
            )
        }
    }

    /// Figure 3: a stale flood of `flows` flows at the set rate, measured
    /// while raising and steady.
    pub fn stale(key: &'static str, flows: u32, cost: bool, s: &Settings) -> Load {
        Load {
            cost,
            steady: s.steady_window,
            ..Load::new(
                key,
                stale_spec(flows, s.rate),
                CountAt::Router,
                s.stale_window,
                s.stale_runs,
            )
        }
    }
}
