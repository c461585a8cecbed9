//! Correlation: decides, from the kernel's reports about failing conntrack
//! entries, which tracked flows are stale, and when to say so.
//!
//! Pure: observations and a clock go in, alerts come out; no I/O. Time is
//! CLOCK_MONOTONIC as a `Duration`, the clock the kernel stamps events with.
//!
//! A flow is raised when its DNATed conntrack entry has failed at least
//! `min_failures` packets: the entry pins the flow to a backend the host can
//! no longer deliver to, while the NAT rules are never consulted again for
//! it. While it keeps failing, a reminder goes out every `remind_every`; when
//! no failure has come for `resolve_after`, it is resolved.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use crate::event::{Observation, Tuple};

#[derive(Clone, Debug)]
pub struct Config {
    /// Failed packets before a flow is raised.
    pub min_failures: u32,
    /// Interval between reminders for a flow that keeps failing.
    pub remind_every: Duration,
    /// Quiet time after which a raised flow is resolved (and an unraised one
    /// forgotten).
    pub resolve_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_failures: 3,
            remind_every: Duration::from_secs(60),
            resolve_after: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Raised,
    Reminder,
    Resolved,
}

/// What the correlator concluded about one flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub state: AlertState,
    /// The latest kernel report on the flow.
    pub flow: Observation,
    /// When the correlator said it (monotonic).
    pub at: Duration,
    /// How long the flow has failed so far: from its first failure to its
    /// latest one.
    pub failing_for: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    netns: u32,
    ct: u64,
    orig: Tuple,
}

#[derive(Debug)]
struct Tracked {
    flow: Observation,
    /// When the latest report arrived (monotonic); the kernel reports a
    /// failing flow at least once a second, so silence means no failures.
    seen: Duration,
    last_alert: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct Correlator {
    config: Config,
    flows: HashMap<FlowKey, Tracked>,
}

impl Correlator {
    pub fn new(config: Config) -> Self {
        Correlator {
            config,
            flows: HashMap::new(),
        }
    }

    /// Takes one kernel report. Returns the alert it causes, if any.
    pub fn observe(&mut self, flow: Observation, now: Duration) -> Option<Alert> {
        if !flow.is_dnat() || is_not_translated(&flow) {
            return None;
        }
        let key = FlowKey {
            netns: flow.netns,
            ct: flow.ct,
            orig: flow.orig,
        };
        let tracked = self.flows.entry(key).or_insert_with(|| Tracked {
            flow: flow.clone(),
            seen: now,
            last_alert: None,
        });
        tracked.flow = flow;
        tracked.seen = now;
        let state = match tracked.last_alert {
            None if tracked.flow.failures() >= self.config.min_failures => AlertState::Raised,
            Some(last) if now.saturating_sub(last) >= self.config.remind_every => {
                AlertState::Reminder
            }
            _ => return None,
        };
        tracked.last_alert = Some(now);
        Some(alert(state, &tracked.flow, now))
    }

    /// Advances the clock: resolves raised flows that stopped failing and
    /// forgets quiet ones.
    pub fn tick(&mut self, now: Duration) -> Vec<Alert> {
        let quiet = self.config.resolve_after;
        let mut alerts = Vec::new();
        self.flows.retain(|_, tracked| {
            if now.saturating_sub(tracked.seen) < quiet {
                return true;
            }
            if tracked.last_alert.is_some() {
                alerts.push(alert(AlertState::Resolved, &tracked.flow, now));
            }
            false
        });
        alerts.sort_by_key(|a| (a.flow.netns, a.flow.orig));
        alerts
    }

    /// Flows being tracked (raised or not yet).
    pub fn tracked(&self) -> usize {
        self.flows.len()
    }

    /// Flows raised and not yet resolved.
    pub fn raised(&self) -> usize {
        self.flows
            .values()
            .filter(|t| t.last_alert.is_some())
            .count()
    }
}

/// A DNAT that left the destination as it was is no redirection at all.
fn is_not_translated(flow: &Observation) -> bool {
    let (addr, port): (IpAddr, u16) = flow.backend();
    addr == flow.orig.dst && port == flow.orig.dport
}

fn alert(state: AlertState, flow: &Observation, now: Duration) -> Alert {
    Alert {
        state,
        flow: flow.clone(),
        at: now,
        failing_for: flow.last.saturating_sub(flow.first),
    }
}

#[cfg(test)]
mod tests {
    use stalewatch_common::ct_status;

    use super::*;
    use crate::event::{DropEvidence, Family, IcmpEvidence, Proto};

    const NETNS: u32 = 4026532100;
    const CT: u64 = 0xffff_8880_1234_5000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            family: Family::Ipv4,
            proto: Proto::UDP,
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
        }
    }

    /// A report on the story's stale flow: 192.0.2.2:40000 -> 192.0.2.1:8888
    /// pinned to 172.17.0.2:8888, with `failed` packets lost by `at`.
    fn stale(failed: u32, at: u64) -> Observation {
        Observation {
            ct: CT,
            netns: NETNS,
            orig: udp("192.0.2.2", 40000, "192.0.2.1", 8888),
            reply: udp("172.17.0.2", 8888, "192.0.2.2", 40000),
            status: ct_status::DST_NAT | ct_status::CONFIRMED | ct_status::SEEN_REPLY,
            first: secs(10),
            last: secs(at),
            icmp: Some(IcmpEvidence {
                icmp_type: 3,
                code: 1,
                count: failed,
            }),
            drops: Some(DropEvidence {
                reason: "NEIGH_FAILED".into(),
                count: failed,
            }),
        }
    }

    fn states(alerts: &[Alert]) -> Vec<AlertState> {
        alerts.iter().map(|a| a.state).collect()
    }

    #[test]
    fn raises_once_enough_packets_failed() {
        let mut c = Correlator::new(Config::default());
        assert_eq!(c.observe(stale(1, 10), secs(10)), None);
        let alert = c.observe(stale(4, 11), secs(11)).expect("raised");
        assert_eq!(alert.state, AlertState::Raised);
        assert_eq!(alert.failing_for, secs(1));
        assert_eq!(c.observe(stale(14, 12), secs(12)), None, "raised only once");
        assert_eq!(c.raised(), 1);
    }

    #[test]
    fn reminds_at_a_bounded_rate_while_failing() {
        let mut c = Correlator::new(Config::default());
        c.observe(stale(5, 11), secs(11)).expect("raised");
        let mut reminders = 0;
        for t in 12..=131 {
            if let Some(a) = c.observe(stale(t as u32 * 10, t), secs(t)) {
                assert_eq!(a.state, AlertState::Reminder);
                reminders += 1;
            }
            assert!(c.tick(secs(t)).is_empty());
        }
        assert_eq!(reminders, 2, "one a minute over two minutes");
    }

    #[test]
    fn resolves_when_failures_stop() {
        let mut c = Correlator::new(Config::default());
        c.observe(stale(5, 11), secs(11)).expect("raised");
        assert!(c.tick(secs(40)).is_empty(), "quiet for 29 s only");
        let alerts = c.tick(secs(41));
        assert_eq!(states(&alerts), [AlertState::Resolved]);
        assert_eq!(alerts[0].flow.failures(), 5);
        assert_eq!(c.tracked(), 0);
        assert!(c.tick(secs(100)).is_empty(), "resolved once");
    }

    #[test]
    fn a_flow_without_dnat_is_not_stale() {
        let mut c = Correlator::new(Config::default());
        let mut flow = stale(50, 20);
        flow.status = ct_status::CONFIRMED;
        flow.reply = udp("192.0.2.1", 8888, "192.0.2.2", 40000);
        assert_eq!(c.observe(flow, secs(20)), None);
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn a_dnat_to_the_same_destination_is_not_a_redirection() {
        let mut c = Correlator::new(Config::default());
        let mut flow = stale(50, 20);
        flow.reply = udp("192.0.2.1", 8888, "192.0.2.2", 40000);
        assert_eq!(c.observe(flow, secs(20)), None);
    }

    #[test]
    fn few_failures_then_silence_stay_quiet() {
        // A rolling restart handled well: a packet or two fail, then the
        // entry goes away and nothing more fails.
        let mut c = Correlator::new(Config::default());
        assert_eq!(c.observe(stale(2, 10), secs(10)), None);
        assert!(c.tick(secs(60)).is_empty());
        assert_eq!(c.tracked(), 0, "forgotten");
    }

    #[test]
    fn a_reused_conntrack_entry_is_a_new_flow() {
        let mut c = Correlator::new(Config::default());
        c.observe(stale(5, 11), secs(11)).expect("raised");
        let mut other = stale(5, 12);
        other.orig = udp("192.0.2.3", 40001, "192.0.2.1", 8888);
        other.reply = udp("172.17.0.2", 8888, "192.0.2.3", 40001);
        let alert = c.observe(other, secs(12)).expect("raised too");
        assert_eq!(alert.flow.orig.sport, 40001);
        assert_eq!(c.raised(), 2);
    }
}
