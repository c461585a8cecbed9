//! What the sinks' unit tests share: the story's stale flow as an alert,
//! and the clock and namespace it is told with.

use std::time::{Duration, UNIX_EPOCH};

use stalewatch_common::ct_status;

use super::record::Clock;
use crate::domain::{
    Alert, AlertState, Backend, DropEvidence, IcmpEvidence, NetnsInfo, Observation, Verdict, udp,
};

pub fn clock() -> Clock {
    Clock {
        monotonic: Duration::from_secs(100),
        wall: UNIX_EPOCH + Duration::from_secs(1_790_000_000),
    }
}

/// The story's stale flow, raised: 192.0.2.2:40000 -> 192.0.2.1:8888
/// pinned to 172.17.0.2:8888 while new flows go to 172.18.0.2:8888.
pub fn alert() -> Alert {
    Alert {
        state: AlertState::Raised,
        verdict: Verdict::Stale,
        current_backends: vec![Backend::new("172.18.0.2".parse().unwrap(), 8888)],
        evidence: vec![
            "newer flows to 192.0.2.1:8888/udp are DNATed to 172.18.0.2:8888, not to 172.17.0.2:8888"
                .into(),
        ],
        resolution: None,
        flow: Observation {
            local: false,
            ct: 1,
            netns: 4026532100,
            orig: udp("192.0.2.2", 40000, "192.0.2.1", 8888),
            reply: udp("172.17.0.2", 8888, "192.0.2.2", 40000),
            status: ct_status::DST_NAT,
            first: Duration::from_secs(95),
            last: Duration::from_millis(98_500),
            icmp: Some(IcmpEvidence {
                icmp_type: 3,
                code: 1,
                count: 12,
            }),
            drops: Some(DropEvidence {
                reason: "NEIGH_FAILED".into(),
                count: 12,
            }),
        },
        at: Duration::from_secs(99),
        failing_for: Duration::from_millis(3500),
    }
}

pub fn named(name: &str) -> NetnsInfo {
    NetnsInfo {
        inode: 4026532100,
        name: Some(name.into()),
        ..Default::default()
    }
}

/// A reminder of `alert()` from source port `sport`, failing `packets`
/// packets from `first` to `last` seconds.
pub fn reminder(sport: u16, packets: u32, first: u64, last: u64) -> Alert {
    let mut a = alert();
    a.state = AlertState::Reminder;
    a.flow.orig.sport = sport;
    a.flow.reply.dport = sport;
    a.flow.first = Duration::from_secs(first);
    a.flow.last = Duration::from_secs(last);
    a.flow.icmp = None;
    a.flow.drops = Some(DropEvidence {
        reason: "NEIGH_FAILED".into(),
        count: packets,
    });
    a
}
