//! Correlation: decides, from the kernel's reports about failing conntrack
//! entries, which tracked flows are stale, and when to say so.
//!
//! Pure: observations and a clock go in, alerts come out; no I/O. Time is
//! CLOCK_MONOTONIC as a `Duration`, the clock the kernel stamps events with.
//!
//! A flow is raised when its DNATed conntrack entry has failed at least
//! `min_failures` packets over at least `grace`: the entry pins the flow to a backend the host can
//! no longer deliver to, while the NAT rules are never consulted again for
//! it. While it keeps failing, a reminder goes out every `remind_every`. It
//! is resolved when its entry is gone (deleted or expired) or when no
//! failure has come for `resolve_after`.
//!
//! Each alert carries a verdict, from the flow's evidence and its siblings
//! (other flows to the same service, in the same namespace):
//! - `stale`: newer flows to the service reach another backend, or the
//!   kernel could not find the old backend among its neighbours while the
//!   flow kept coming;
//! - `backend_down`: other flows to the service fail at the same backend
//!   and none goes elsewhere;
//! - `unconfirmed`: neither can be told yet;
//! - `bypass`: the flow's entry was made without NAT (while no DNAT rule
//!   existed) and delivers it to this host, while a current rule would
//!   DNAT this very flow (where the rules are read), or newer flows to the
//!   same destination are DNATed elsewhere (where they are not). Such flows
//!   reach the correlator as datagrams this host refused, or from the
//!   audit; without either proof they are no stale flow and stay quiet.

pub mod audit;
mod judge;
mod tracked;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

// A fast hash, seeded per process: the keys come from the network.
use foldhash::HashMap;
use indexmap::IndexMap;

use self::tracked::{FlowKey, NEVER, Reasons, Tracked, Tuples, ct_of, entry_id, key_of, nanos};
use crate::domain::{
    Alert, AlertState, Backend, Evidence, Judgement, Observation, Resolution, Service, Siblings,
    Tuple,
};

#[derive(Clone, Debug)]
pub struct Config {
    /// Failed packets before a flow is raised...
    pub min_failures: u32,
    /// ... from its first failure to its latest at least this far apart.
    pub grace: Duration,
    /// Interval between reminders for a flow that keeps failing.
    pub remind_every: Duration,
    /// Quiet time after which a raised flow is resolved (and an unraised one
    /// forgotten).
    pub resolve_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_failures: 2,
            grace: Duration::from_millis(500),
            remind_every: Duration::from_secs(60),
            resolve_after: Duration::from_secs(30),
        }
    }
}

/// A raised flow, as [`Correlator::quiet_raised`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RaisedFlow {
    pub netns: u32,
    pub orig: Tuple,
    pub reply: Tuple,
    /// The conntrack entry's address (0 for a flow seen as refused
    /// datagrams, or found by the audit).
    pub ct: u64,
    pub local: bool,
    /// Its latest failure known (monotonic).
    pub last: Duration,
}

/// How much earlier than `remind_every` a reminder may go out: flows raised
/// within a second of each other (one tick of the watch loop) are reminded
/// of together, and so can be told of in one record.
const REMIND_SLACK: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Correlator {
    config: Config,
    /// Entries in one dense Vec, the hash table holding only indices: at
    /// hundreds of thousands of flows a plain hash map leaves up to half
    /// its (large) slots empty.
    flows: IndexMap<FlowKey, Tracked, foldhash::fast::RandomState>,
    /// How many tracked flows of each service fail at each backend, so
    /// that judging one flow looks at its service's flows only, not at
    /// every flow.
    by_service: HashMap<ServiceKey, HashMap<Backend, u32>>,
    /// The latest judgement of each service, for flows judged alike to
    /// share.
    judgements: HashMap<ServiceKey, Arc<Judgement>>,
    reasons: Reasons,
    /// Flows raised and not resolved: asked every second, so counted, not
    /// found by a walk over every flow.
    raised: usize,
}

/// A service in a namespace.
type ServiceKey = (u32, Service);

/// What a verdict is made from: the flow's siblings (the correlator
/// judges), or a judgement the audit made.
enum Basis<'a> {
    /// Siblings, whether a current rule would DNAT the flow now, and
    /// where the current rules send its service.
    Siblings(Option<&'a Siblings>, Option<bool>, Option<&'a [Backend]>),
    Judged(Judgement),
}

fn service_of(flow: &Observation) -> ServiceKey {
    (flow.netns, flow.orig.service())
}

impl Correlator {
    pub fn new(config: Config) -> Self {
        Correlator {
            config,
            flows: IndexMap::default(),
            by_service: HashMap::default(),
            judgements: HashMap::default(),
            reasons: Reasons::default(),
            raised: 0,
        }
    }

    /// The flow tracked under `flow`'s entry, if it is that flow.
    fn tracked_as(&self, flow: &Observation) -> Option<&Tracked> {
        self.flows.get(&key_of(flow)).filter(|t| t.is(flow))
    }

    fn alert(
        &self,
        state: AlertState,
        key: &FlowKey,
        tracked: &Tracked,
        resolution: Option<Resolution>,
        now: Duration,
    ) -> Alert {
        let judgement = match &tracked.judged {
            Some(j) => Judgement::clone(j),
            None => Judgement::unconfirmed(),
        };
        let flow = tracked.observation(key, &self.reasons);
        Alert {
            state,
            verdict: judgement.verdict,
            current_backends: judgement.current,
            evidence: judgement.evidence,
            resolution,
            at: now,
            failing_for: flow.last.saturating_sub(flow.first),
            flow,
        }
    }

    /// A report whose entry (`nf_conn` address) the correlator tracks with
    /// another flow in it: the kernel reused the address, so the old entry
    /// is gone. Forgets the old flow, and resolves it if it was raised.
    fn displaced(&mut self, flow: &Observation, now: Duration) -> Option<Alert> {
        let key = key_of(flow);
        if self.flows.get(&key)?.is(flow) {
            return None;
        }
        let old = self.forget(&key)?;
        old.raised.then(|| {
            self.alert(
                AlertState::Resolved,
                &key,
                &old,
                Some(Resolution::EntryGone),
                now,
            )
        })
    }

    /// The verdict, backends and evidence of a judgement, shared with the
    /// latest flow of the same service judged alike: a flood of flows to
    /// one service keeps one copy of its words, not one per flow.
    fn shared(&mut self, service: ServiceKey, judgement: Judgement) -> Arc<Judgement> {
        match self.judgements.get(&service) {
            Some(known) if **known == judgement => known.clone(),
            _ => {
                let shared = Arc::new(judgement);
                self.judgements.insert(service, shared.clone());
                shared
            }
        }
    }

    /// Forgets a flow, and returns it.
    fn forget(&mut self, key: &FlowKey) -> Option<Tracked> {
        let tracked = self.flows.swap_remove(key)?;
        self.raised -= usize::from(tracked.raised);
        let service = (key.netns, tracked.orig().service());
        if let Some(backends) = self.by_service.get_mut(&service) {
            let backend = tracked.backend();
            if let Some(n) = backends.get_mut(&backend) {
                *n -= 1;
                if *n == 0 {
                    backends.remove(&backend);
                }
            }
            if backends.is_empty() {
                self.by_service.remove(&service);
                self.judgements.remove(&service);
            }
        }
        Some(tracked)
    }

    /// The alert [`Correlator::observe`] would give on this report, if
    /// any: only then does the caller gather [`Evidence`] for it, which
    /// costs conntrack queries.
    pub fn due(&self, flow: &Observation, now: Duration) -> Option<AlertState> {
        if !self.relevant(flow) {
            return None;
        }
        self.due_at(flow, now, false)
    }

    fn relevant(&self, flow: &Observation) -> bool {
        flow.local
            || (flow.is_dnat() && !is_not_translated(flow))
            || judge::is_dead_destination(flow)
    }

    /// The alert `flow` is due for now, if any.
    fn due_at(&self, flow: &Observation, now: Duration, audited: bool) -> Option<AlertState> {
        let elapsed =
            |since: Duration| now.saturating_sub(since) + REMIND_SLACK >= self.config.remind_every;
        let tracked = self.tracked_as(flow);
        let at = |ns: u64| (ns != NEVER).then(|| Duration::from_nanos(ns));
        match (
            tracked.filter(|t| t.raised).and_then(|t| at(t.mark)),
            tracked.filter(|t| !t.raised).and_then(|t| at(t.mark)),
        ) {
            (Some(last), _) => elapsed(last).then_some(AlertState::Reminder),
            // The audit's finding is new proof (a rule published the port
            // since the kernel's refused datagrams were judged): due at once.
            (None, checked) => (audited
                || (flow.failures() >= self.config.min_failures
                    && flow.last.saturating_sub(flow.first) >= self.config.grace
                    && checked.is_none_or(elapsed)))
            .then_some(AlertState::Raised),
        }
    }

    /// Takes one kernel report, with the evidence the caller gathered for
    /// it when it was [due](Correlator::due) (else none). Returns what to
    /// say: an old flow resolved because the kernel reused its entry for
    /// this one; this flow resolved because its entry is gone; or this
    /// flow raised or reminded of.
    pub fn observe(&mut self, flow: Observation, evidence: Evidence, now: Duration) -> Vec<Alert> {
        let mut alerts: Vec<Alert> = self.displaced(&flow, now).into_iter().collect();
        if evidence.entry_exists == Some(false) {
            alerts.extend(self.entry_gone(flow.netns, flow.ct, &flow.orig, now));
            return alerts;
        }
        alerts.extend(self.observe_inner(
            flow,
            Basis::Siblings(
                evidence.siblings.as_ref(),
                evidence.dnat_now,
                evidence.rule_backends.as_deref(),
            ),
            now,
            false,
        ));
        alerts
    }

    /// Takes a flow that the periodic conntrack audit found bypassing a
    /// DNAT: no packet of it needs to fail (a proxy on the host may serve
    /// it), so it is due at once. Its kernel counters, if any, are kept.
    /// `rules`: where the audit proved it by a current rule that would DNAT
    /// it (or, without the rules, found no sibling), the current backends.
    pub fn observe_audited(
        &mut self,
        flow: Observation,
        siblings: &Siblings,
        rules: Option<Vec<Backend>>,
        now: Duration,
    ) -> Option<Alert> {
        let dnat_now = rules.as_ref().map(|_| true);
        let basis = Basis::Siblings(Some(siblings), dnat_now, rules.as_deref());
        self.observe_inner(flow, basis, now, true)
    }

    /// Takes a DNATed flow that the audit judged against the host's NAT
    /// intent: no packet of it fails here (the failure, if any, is on
    /// another host), so it is due at once. Left to the kernel path when
    /// flows of its service fail at the same backend here.
    pub fn observe_judged(
        &mut self,
        flow: Observation,
        judgement: Judgement,
        now: Duration,
    ) -> Option<Alert> {
        let ours = self.flows.contains_key(&key_of(&flow));
        let failing_here = self
            .by_service
            .get(&service_of(&flow))
            .is_some_and(|b| b.contains_key(&flow.backend()));
        if !ours && failing_here {
            return None;
        }
        self.observe_inner(flow, Basis::Judged(judgement), now, true)
    }

    /// A kernel report of a flow that an audit raised (known by its
    /// original tuple alone, the kernel's entry address unknown to the
    /// audit): the same flow, kept under the address from now on, raised
    /// once.
    fn adopt(&mut self, flow: &Observation) {
        if flow.ct == 0 {
            return;
        }
        let key = key_of(flow);
        if self.flows.contains_key(&key) {
            return;
        }
        let stand_in = FlowKey {
            netns: flow.netns,
            id: entry_id(0, &flow.orig),
        };
        if self
            .flows
            .get(&stand_in)
            .is_none_or(|t| t.tuples.get() != (flow.orig, flow.reply))
        {
            return;
        }
        if let Some(tracked) = self.flows.swap_remove(&stand_in) {
            self.flows.insert(key, tracked);
        }
    }

    fn observe_inner(
        &mut self,
        flow: Observation,
        basis: Basis<'_>,
        now: Duration,
        audited: bool,
    ) -> Option<Alert> {
        if !self.relevant(&flow) {
            return None;
        }
        self.adopt(&flow);
        let key = key_of(&flow);
        // Another flow in a reused entry: the old one is gone.
        if self.flows.get(&key).is_some_and(|t| !t.is(&flow)) {
            self.forget(&key);
        }
        let state = self.due_at(&flow, now, audited);
        let judged = state
            .and_then(|_| match basis {
                Basis::Siblings(siblings, dnat_now, rules) => {
                    self.judge(&flow, siblings, dnat_now, rules)
                }
                Basis::Judged(judgement) => Some(judgement),
            })
            .map(|j| self.shared(service_of(&flow), j));
        let reason = self.reasons.id_of(&flow);
        if !self.flows.contains_key(&key) {
            let backends = self.by_service.entry(service_of(&flow)).or_default();
            *backends.entry(flow.backend()).or_default() += 1;
            // Left to itself, IndexMap grows its entries to what its index
            // table can hold (7/8 of a power of two): up to 1.75 times the
            // entries in use. Doubling exactly keeps it at most twice, and
            // exactly the flows at a power of two.
            if self.flows.len() == self.flows.capacity() {
                self.flows.reserve_exact(self.flows.len().max(64));
            }
            let mut fresh = Tracked {
                tuples: Tuples::new(&flow.orig, &flow.reply),
                first: 0,
                last: 0,
                seen: 0,
                mark: NEVER,
                status: 0,
                icmp_count: 0,
                drop_count: 0,
                reason: 0,
                icmp_type: 0,
                icmp_code: 0,
                local: false,
                raised: false,
                judged: None,
            };
            fresh.set_facts(&flow, reason);
            self.flows.insert(key, fresh);
        }
        let tracked = self.flows.get_mut(&key)?;
        if !audited || tracked.failures() == 0 {
            tracked.set_facts(&flow, reason);
        }
        tracked.seen = nanos(now);
        let state = state?;
        if judged.is_none() {
            tracked.mark = nanos(now);
            return None;
        }
        tracked.mark = nanos(now);
        let newly = !tracked.raised;
        tracked.raised = true;
        tracked.judged = judged;
        self.raised += usize::from(newly);
        let tracked = self.flows.get(&key)?;
        Some(self.alert(state, &key, tracked, None, now))
    }

    /// The verdict on `flow` (see [`judge`]), with the failing flows of its
    /// service that the correlator tracks; `None` for a flow delivered here
    /// that nothing shows to be a bypass.
    fn judge(
        &self,
        flow: &Observation,
        siblings: Option<&Siblings>,
        dnat_now: Option<bool>,
        rules: Option<&[Backend]>,
    ) -> Option<Judgement> {
        if flow.local {
            return judge::delivered_here(flow, siblings, dnat_now, rules);
        }
        if !flow.is_dnat() {
            return Some(judge::dead_destination(flow));
        }
        let stale = flow.backend();
        // Other flows to the same service that fail too, by backend: the
        // counts include this flow itself once it is tracked.
        let own = u32::from(self.tracked_as(flow).is_some());
        let failing: BTreeSet<Backend> = self
            .by_service
            .get(&service_of(flow))
            .map(|backends| {
                backends
                    .iter()
                    .filter(|(b, n)| **n > if **b == stale { own } else { 0 })
                    .map(|(b, _)| *b)
                    .collect()
            })
            .unwrap_or_default();
        Some(judge::pinned(flow, &failing, siblings, rules))
    }

    /// Flows raised and not yet resolved that have failed no packet for
    /// `quiet`, for the caller to check whether their conntrack entries
    /// still exist.
    pub fn quiet_raised(&self, now: Duration, quiet: Duration) -> Vec<RaisedFlow> {
        let (now, quiet) = (nanos(now), nanos(quiet));
        let mut flows: Vec<RaisedFlow> = self
            .flows
            .iter()
            .filter(|(_, t)| t.raised && now.saturating_sub(t.last) >= quiet)
            .map(|(key, t)| {
                let (orig, reply) = t.tuples.get();
                RaisedFlow {
                    netns: key.netns,
                    orig,
                    reply,
                    ct: ct_of(key),
                    local: t.local,
                    last: Duration::from_nanos(t.last),
                }
            })
            .collect();
        flows.sort();
        flows
    }

    /// Brings a raised flow's counters up to date from the kernel (its map,
    /// or a report), at no cost beyond the update: a flow that keeps
    /// failing stays raised. `None` when the flow is not raised, or its
    /// entry now holds another flow (the caller passes the full report to
    /// [`Correlator::observe`]); else whether its reminder is due (then the
    /// caller does the same).
    pub fn refresh(&mut self, flow: &Observation, now: Duration) -> Option<bool> {
        // One hash lookup: the whole map is refreshed every few seconds.
        let at = self.flows.get_index_of(&key_of(flow))?;
        let known = &self.flows[at];
        // Another flow in a reused entry is not this raised flow.
        if !(known.raised && known.is(flow)) {
            return None;
        }
        if nanos(flow.last) <= known.last {
            return Some(false);
        }
        let reason = match &flow.drops {
            Some(d) if **self.reasons.name(known.reason) == *d.reason => known.reason,
            _ => self.reasons.id_of(flow),
        };
        let remind_every = nanos(self.config.remind_every);
        let t = &mut self.flows[at];
        t.set_facts(flow, reason);
        t.seen = nanos(now);
        Some(nanos(now).saturating_sub(t.mark) + nanos(REMIND_SLACK) >= remind_every)
    }

    /// The conntrack entry of a flow (`nf_conn` `ct`, original tuple
    /// `orig`) is gone: forget it, and resolve it if it was raised.
    pub fn entry_gone(
        &mut self,
        netns: u32,
        ct: u64,
        orig: &Tuple,
        now: Duration,
    ) -> Option<Alert> {
        let key = FlowKey {
            netns,
            id: entry_id(ct, orig),
        };
        if self.flows.get(&key)?.orig() != *orig {
            return None;
        }
        let gone = self.forget(&key)?;
        gone.raised.then(|| {
            self.alert(
                AlertState::Resolved,
                &key,
                &gone,
                Some(Resolution::EntryGone),
                now,
            )
        })
    }

    /// Advances the clock: resolves raised flows that stopped failing and
    /// forgets quiet ones.
    pub fn tick(&mut self, now: Duration) -> Vec<Alert> {
        let quiet = nanos(self.config.resolve_after);
        let idle: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, tracked)| nanos(now).saturating_sub(tracked.seen) >= quiet)
            .map(|(key, _)| *key)
            .collect();
        let mut alerts = Vec::new();
        for key in idle {
            if let Some(gone) = self.forget(&key).filter(|t| t.raised) {
                alerts.push(self.alert(
                    AlertState::Resolved,
                    &key,
                    &gone,
                    Some(Resolution::FailuresStopped),
                    now,
                ));
            }
        }
        alerts.sort_by_key(|a| (a.flow.netns, a.flow.orig));
        alerts
    }

    /// Flows being tracked (raised or not yet).
    pub fn tracked(&self) -> usize {
        self.flows.len()
    }

    /// Flows raised and not yet resolved.
    pub fn raised_count(&self) -> usize {
        self.raised
    }
}

/// A DNAT that left the destination as it was is no redirection at all.
fn is_not_translated(flow: &Observation) -> bool {
    flow.backend() == Backend::new(flow.orig.dst, flow.orig.dport)
}

#[cfg(test)]
mod tests {
    use stalewatch_common::ct_status;

    use super::*;
    use crate::domain::{DropEvidence, IcmpEvidence, Verdict, udp};

    const NETNS: u32 = 4026532100;
    const CT: u64 = 0xffff_8880_1234_5000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A report on the story's stale flow: 192.0.2.2:40000 -> 192.0.2.1:8888
    /// pinned to 172.17.0.2:8888, with `failed` packets lost by `at`.
    fn stale(failed: u32, at: u64) -> Observation {
        Observation {
            local: false,
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

    impl Correlator {
        /// `observe` without sibling facts, as when conntrack cannot be read.
        fn observe_plain(&mut self, flow: Observation, now: Duration) -> Option<Alert> {
            self.observe_with(flow, None, now)
        }

        /// `observe` with these siblings: the one alert it gives, if any.
        fn observe_with(
            &mut self,
            flow: Observation,
            siblings: Option<&Siblings>,
            now: Duration,
        ) -> Option<Alert> {
            let evidence = Evidence {
                entry_exists: None,
                siblings: siblings.cloned(),
                dnat_now: None,
                rule_backends: None,
            };
            let mut alerts = self.observe(flow, evidence, now);
            assert!(alerts.len() <= 1, "{alerts:?}");
            alerts.pop()
        }

        fn would_alert(&self, flow: &Observation, now: Duration) -> bool {
            self.due(flow, now).is_some()
        }
    }

    fn backend(s: &str) -> Backend {
        Backend::new(s.parse().unwrap(), 8888)
    }

    fn siblings(backends: &[(&str, u32)]) -> Siblings {
        Siblings {
            dnat_backends: backends.iter().map(|(b, n)| (backend(b), *n)).collect(),
        }
    }

    /// Another flow to the same service, from `sport`, pinned to `to`.
    fn sibling(sport: u16, to: &str, failed: u32, at: u64) -> Observation {
        let mut flow = stale(failed, at);
        flow.ct = CT + u64::from(sport);
        flow.orig.sport = sport;
        flow.reply = udp(to, 8888, "192.0.2.2", sport);
        flow
    }

    #[test]
    fn a_burst_shorter_than_the_grace_is_not_raised() {
        let mut c = Correlator::new(Config::default());
        let mut burst = stale(40, 10);
        burst.last = burst.first + Duration::from_millis(499);
        assert!(!c.would_alert(&burst, burst.last));
        assert_eq!(c.observe_plain(burst.clone(), burst.last), None);
        burst.last = burst.first + Duration::from_millis(500);
        assert!(c.would_alert(&burst, burst.last));
        let alert = c.observe_plain(burst.clone(), burst.last).expect("raised");
        assert_eq!(alert.failing_for, Duration::from_millis(500));
    }

    #[test]
    fn raises_once_enough_packets_failed() {
        let mut c = Correlator::new(Config::default());
        assert_eq!(c.observe_plain(stale(1, 10), secs(10)), None);
        assert!(
            !c.would_alert(&stale(2, 10), secs(10)),
            "not within --grace"
        );
        assert!(!c.would_alert(&stale(1, 11), secs(11)), "one packet");
        assert!(c.would_alert(&stale(2, 11), secs(11)));
        assert!(c.would_alert(&stale(4, 11), secs(11)));
        let alert = c.observe_plain(stale(4, 11), secs(11)).expect("raised");
        assert_eq!(alert.state, AlertState::Raised);
        assert!(!c.would_alert(&stale(14, 12), secs(12)));
        assert_eq!(alert.failing_for, secs(1));
        assert_eq!(
            c.observe_plain(stale(14, 12), secs(12)),
            None,
            "raised only once"
        );
        assert_eq!(c.raised_count(), 1);
    }

    #[test]
    fn reminds_at_a_bounded_rate_while_failing() {
        let mut c = Correlator::new(Config::default());
        c.observe_plain(stale(5, 11), secs(11)).expect("raised");
        let mut reminders = 0;
        for t in 12..=131 {
            if let Some(a) = c.observe_plain(stale(t as u32 * 10, t), secs(t)) {
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
        c.observe_plain(stale(5, 11), secs(11)).expect("raised");
        assert_eq!(c.raised_count(), 1);
        assert!(c.tick(secs(40)).is_empty(), "quiet for 29 s only");
        let alerts = c.tick(secs(41));
        assert_eq!(c.raised_count(), 0, "resolved flows are not counted");
        assert_eq!(states(&alerts), [AlertState::Resolved]);
        assert_eq!(alerts[0].resolution, Some(Resolution::FailuresStopped));
        assert_eq!(alerts[0].flow.failures(), 5);
        assert_eq!(c.tracked(), 0);
        assert!(c.tick(secs(100)).is_empty(), "resolved once");
    }

    #[test]
    fn traffic_without_nat_to_an_address_no_neighbour_answers_is_a_dead_destination() {
        // Node B of two: it forwards a client's stream, pinned by node A's
        // entry, to a pod address nobody holds any more.
        let mut c = Correlator::new(Config::default());
        let mut flow = stale(1, 10);
        flow.status = ct_status::CONFIRMED;
        flow.orig = udp("192.0.2.2", 40000, "10.244.1.7", 53);
        flow.reply = udp("10.244.1.7", 53, "192.0.2.2", 40000);
        assert_eq!(c.observe_plain(flow.clone(), secs(10)), None, "one packet");
        flow.icmp.as_mut().unwrap().count = 5;
        flow.drops.as_mut().unwrap().count = 5;
        flow.last = secs(11);
        let a = c.observe_plain(flow.clone(), secs(11)).expect("raised");
        assert_eq!(a.verdict, Verdict::DeadDestination);
        assert_eq!(
            a.evidence,
            ["no neighbour answers for 10.244.1.7 here, yet traffic for it keeps coming"]
        );
        // Dropped by a firewall instead: nothing tells a dead address.
        let mut filtered = flow;
        filtered.orig.sport = 40001;
        filtered.reply.dport = 40001;
        filtered.ct += 8;
        filtered.icmp = None;
        filtered.drops = Some(DropEvidence {
            reason: "NETFILTER_DROP".into(),
            count: 9,
        });
        assert_eq!(c.observe_plain(filtered, secs(11)), None);
    }

    #[test]
    fn a_flow_without_dnat_is_not_stale() {
        // (One whose destination no neighbour answers is a dead
        // destination: see above.)
        let mut c = Correlator::new(Config::default());
        let mut flow = stale(50, 20);
        flow.status = ct_status::CONFIRMED;
        flow.reply = udp("192.0.2.1", 8888, "192.0.2.2", 40000);
        flow.icmp = None;
        flow.drops.as_mut().unwrap().reason = "NETFILTER_DROP".into();
        assert_eq!(c.observe_with(flow, None, secs(20)), None);
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn a_dnat_to_the_same_destination_is_not_a_redirection() {
        let mut c = Correlator::new(Config::default());
        let mut flow = stale(50, 20);
        flow.reply = udp("192.0.2.1", 8888, "192.0.2.2", 40000);
        assert_eq!(c.observe_with(flow, None, secs(20)), None);
    }

    #[test]
    fn few_failures_then_silence_stay_quiet() {
        // A rolling restart handled well: a packet or two fail, then the
        // entry goes away and nothing more fails.
        let mut c = Correlator::new(Config::default());
        assert_eq!(c.observe_plain(stale(2, 10), secs(10)), None);
        assert!(c.tick(secs(60)).is_empty());
        assert_eq!(c.tracked(), 0, "forgotten");
    }

    #[test]
    fn a_reused_conntrack_entry_is_a_new_flow_and_the_old_one_is_gone() {
        let mut c = Correlator::new(Config::default());
        c.observe_plain(stale(5, 11), secs(11)).expect("raised");
        let mut other = stale(5, 12);
        other.orig = udp("192.0.2.3", 40001, "192.0.2.1", 8888);
        other.reply = udp("172.17.0.2", 8888, "192.0.2.3", 40001);
        // The same nf_conn address with another flow in it: the kernel
        // freed the old entry.
        let gone = c.displaced(&other, secs(12)).expect("the old one resolved");
        assert_eq!(gone.state, AlertState::Resolved);
        assert_eq!(gone.resolution, Some(Resolution::EntryGone));
        assert_eq!(gone.flow.orig.sport, 40000);
        assert_eq!(c.displaced(&other, secs(12)), None, "once");
        let alert = c
            .observe_with(other.clone(), None, secs(12))
            .expect("raised");
        assert_eq!(alert.flow.orig.sport, 40001);
        assert_eq!(c.raised_count(), 1);
        // Observed at once, the old one is resolved by the same call.
        let mut third = other;
        third.reply = udp("172.17.0.9", 8888, "192.0.2.3", 40001);
        let alerts = c.observe(third, Evidence::default(), secs(13));
        assert_eq!(states(&alerts), [AlertState::Resolved, AlertState::Raised]);
        assert_eq!(alerts[0].flow.reply.src.to_string(), "172.17.0.2");
        assert_eq!((c.raised_count(), c.tracked()), (1, 1));
    }

    #[test]
    fn a_flow_read_back_is_the_flow_reported() {
        // What the correlator keeps is compact; the alert's flow must be
        // the report, field for field.
        let mut c = Correlator::new(Config::default());
        let mut flow = stale(7, 11);
        flow.icmp = None;
        flow.status |= ct_status::ASSURED;
        let alert = c.observe_plain(flow.clone(), secs(11)).expect("raised");
        assert_eq!(alert.flow, flow);
        let mut local = refused(4, 12);
        local.first = secs(11);
        c.observe_plain(local.clone(), secs(12));
        let key = key_of(&local);
        assert_eq!(ct_of(&key), 0, "a stand-in id is never an address");
        assert_eq!(c.flows[&key].observation(&key, &c.reasons), local);
    }

    #[test]
    fn refreshed_counters_keep_a_flow_raised_and_bring_its_reminder() {
        let mut c = Correlator::new(Config::default());
        c.observe_plain(stale(5, 11), secs(11)).expect("raised");
        // What the kernel's map holds: drops counted, no ICMP sent.
        let refresh = |failed: u32, at: u64| Observation {
            icmp: None,
            ..stale(failed, at)
        };
        // Failing on, with no kernel report: never resolved as stopped.
        for at in (12..71).step_by(10) {
            assert_eq!(c.refresh(&refresh(at as u32, at), secs(at)), Some(false));
            assert!(c.tick(secs(at)).is_empty());
        }
        // Nothing newer than what it has: nothing changes.
        assert_eq!(c.refresh(&refresh(1, 11), secs(71)), Some(false));
        // A minute after the raise, the caller is told the reminder is due,
        // and the reminder carries the refreshed counters.
        assert_eq!(c.refresh(&refresh(71, 71), secs(71)), Some(true));
        let mut report = stale(71, 71);
        report.drops.as_mut().unwrap().count = 71;
        let alert = c.observe_plain(report, secs(71)).expect("reminder");
        assert_eq!(alert.state, AlertState::Reminder);
        assert_eq!(alert.flow.failures(), 71);
        // Another entry's counters change nothing here.
        let mut other = refresh(99, 80);
        other.ct = CT + 1;
        assert_eq!(c.refresh(&other, secs(80)), None, "not raised");
        let mut reused = refresh(99, 80);
        reused.reply = udp("172.17.0.3", 8888, "192.0.2.2", 40000);
        assert_eq!(
            c.refresh(&reused, secs(80)),
            None,
            "another flow in the entry"
        );
        // Silence: resolved after resolve_after.
        let alerts = c.tick(secs(71 + 30));
        assert_eq!(states(&alerts), [AlertState::Resolved]);
        assert_eq!(alerts[0].resolution, Some(Resolution::FailuresStopped));
    }

    #[test]
    fn resolves_at_once_when_the_entry_is_gone() {
        let mut c = Correlator::new(Config::default());
        c.observe_plain(stale(5, 11), secs(11)).expect("raised");
        let flow = stale(5, 11);
        assert!(
            c.quiet_raised(secs(12), secs(2)).is_empty(),
            "failed 1 s ago"
        );
        let raised = c.quiet_raised(secs(12), secs(1));
        assert_eq!(
            raised
                .iter()
                .map(|r| (r.netns, r.orig, r.reply, r.ct, r.last))
                .collect::<Vec<_>>(),
            [(NETNS, flow.orig, flow.reply, CT, flow.last)]
        );
        assert!(
            c.entry_gone(NETNS + 1, CT, &flow.orig, secs(12)).is_none(),
            "other netns"
        );
        assert!(
            c.entry_gone(NETNS, CT + 1, &flow.orig, secs(12)).is_none(),
            "another entry"
        );
        let alerts: Vec<Alert> = c
            .entry_gone(NETNS, CT, &flow.orig, secs(12))
            .into_iter()
            .collect();
        assert_eq!(states(&alerts), [AlertState::Resolved]);
        assert_eq!(alerts[0].resolution, Some(Resolution::EntryGone));
        assert!(c.quiet_raised(secs(99), secs(1)).is_empty());
        assert_eq!(c.raised_count(), 0);
    }

    #[test]
    fn a_report_whose_entry_is_gone_resolves_it_and_raises_nothing() {
        let mut c = Correlator::new(Config::default());
        c.observe_plain(stale(5, 11), secs(11)).expect("raised");
        let gone = Evidence {
            entry_exists: Some(false),
            siblings: Some(siblings(&[("172.18.0.2", 1)])),
            dnat_now: None,
            rule_backends: None,
        };
        let alerts = c.observe(stale(70, 71), gone.clone(), secs(71));
        assert_eq!(states(&alerts), [AlertState::Resolved]);
        assert_eq!(alerts[0].resolution, Some(Resolution::EntryGone));
        assert_eq!(c.tracked(), 0);
        // Never raised: nothing to say, nothing kept.
        assert!(c.observe(stale(70, 71), gone, secs(72)).is_empty());
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn stale_when_newer_flows_reach_another_backend() {
        let mut c = Correlator::new(Config::default());
        let view = siblings(&[("172.17.0.2", 1), ("172.18.0.2", 3)]);
        let a = c
            .observe_with(stale(5, 11), Some(&view), secs(11))
            .expect("raised");
        assert_eq!(a.verdict, Verdict::Stale);
        assert_eq!(a.current_backends, [backend("172.18.0.2")]);
        assert_eq!(
            a.evidence,
            [
                "newer flows to 192.0.2.1:8888/udp are DNATed to 172.18.0.2:8888, not to 172.17.0.2:8888"
            ]
        );
    }

    #[test]
    fn backend_down_when_every_flow_fails_at_the_same_backend() {
        let mut c = Correlator::new(Config::default());
        c.observe_plain(sibling(40001, "172.17.0.2", 1, 10), secs(10));
        let view = siblings(&[("172.17.0.2", 2)]);
        let a = c
            .observe_with(stale(5, 11), Some(&view), secs(11))
            .expect("raised");
        assert_eq!(a.verdict, Verdict::BackendDown);
        assert_eq!(a.current_backends, [backend("172.17.0.2")]);
    }

    #[test]
    fn a_sibling_failing_elsewhere_is_no_current_backend() {
        // Flows to two dead backends: neither is where the service works.
        let mut c = Correlator::new(Config::default());
        c.observe_plain(sibling(40001, "172.18.0.9", 1, 10), secs(10));
        let view = siblings(&[("172.17.0.2", 1), ("172.18.0.9", 1)]);
        let a = c
            .observe_with(stale(5, 11), Some(&view), secs(11))
            .expect("raised");
        assert!(a.current_backends.is_empty());
        assert_eq!(a.verdict, Verdict::Stale, "the neighbour evidence remains");
    }

    #[test]
    fn stale_on_neighbour_evidence_alone() {
        let mut c = Correlator::new(Config::default());
        let a = c.observe_plain(stale(5, 11), secs(11)).expect("raised");
        assert_eq!(a.verdict, Verdict::Stale);
        assert!(a.evidence[0].contains("no longer finds 172.17.0.2 among its neighbours"));
    }

    #[test]
    fn unconfirmed_without_siblings_or_neighbour_evidence() {
        // Dropped by netfilter, no ICMP, nothing known of other flows.
        let mut c = Correlator::new(Config::default());
        let mut flow = stale(5, 11);
        flow.icmp = None;
        flow.drops = Some(DropEvidence {
            reason: "NETFILTER_DROP".into(),
            count: 5,
        });
        let a = c.observe_plain(flow.clone(), secs(11)).expect("raised");
        assert_eq!(a.verdict, Verdict::Unconfirmed);
        // A reminder re-judges with what is known by then.
        let view = siblings(&[("172.18.0.2", 1)]);
        flow.drops.as_mut().unwrap().count = 50;
        let r = c
            .observe_with(flow, Some(&view), secs(71))
            .expect("reminder");
        assert_eq!(r.state, AlertState::Reminder);
        assert_eq!(r.verdict, Verdict::Stale);
    }

    /// A datagram stream that this host refuses: 198.51.100.2:40000 to the
    /// host's 198.51.100.1:8888.
    fn refused(count: u32, at: u64) -> Observation {
        let host = udp("198.51.100.1", 8888, "198.51.100.2", 40000);
        Observation {
            local: true,
            ct: 0,
            netns: NETNS,
            orig: udp("198.51.100.2", 40000, "198.51.100.1", 8888),
            reply: host,
            status: 0,
            first: secs(10),
            last: secs(at),
            icmp: Some(IcmpEvidence {
                icmp_type: 3,
                code: 3,
                count,
            }),
            drops: None,
        }
    }

    #[test]
    fn a_refused_flow_bypasses_a_dnat_that_newer_flows_take() {
        let mut c = Correlator::new(Config::default());
        let view = siblings(&[("172.18.0.2", 2)]);
        assert!(c.would_alert(&refused(5, 11), secs(11)));
        let a = c
            .observe_with(refused(5, 11), Some(&view), secs(11))
            .expect("raised");
        assert_eq!(a.verdict, Verdict::Bypass);
        assert_eq!(a.current_backends, [backend("172.18.0.2")]);
        assert_eq!(a.flow.backend(), backend("198.51.100.1"));
        assert!(
            a.evidence[0].contains("DNATed to 172.18.0.2:8888"),
            "{:?}",
            a.evidence
        );
    }

    #[test]
    fn a_refused_flow_no_current_rule_would_dnat_is_no_bypass() {
        // The DNAT is limited to another interface: the host's own service
        // takes this flow by design, whatever its siblings.
        let mut c = Correlator::new(Config::default());
        let view = siblings(&[("172.18.0.2", 2)]);
        let not_now = Evidence {
            entry_exists: None,
            siblings: Some(view.clone()),
            dnat_now: Some(false),
            rule_backends: None,
        };
        assert!(c.observe(refused(5, 11), not_now, secs(11)).is_empty());
        let proven = Evidence {
            dnat_now: Some(true),
            rule_backends: None,
            siblings: Some(view),
            entry_exists: None,
        };
        let alerts = c.observe(refused(80, 72), proven, secs(72));
        assert_eq!(alerts[0].verdict, Verdict::Bypass);
    }

    #[test]
    fn where_no_newer_flow_shows_the_current_backend_the_rules_do() {
        // One stream, pinned to a container that is gone; nothing else
        // flows to the service, but its rules DNAT it to 172.18.0.9 now.
        let mut c = Correlator::new(Config::default());
        let rules = Evidence {
            entry_exists: None,
            siblings: Some(Siblings::default()),
            dnat_now: None,
            rule_backends: Some(vec![backend("172.17.0.2"), backend("172.18.0.9")]),
        };
        let a = c
            .observe(stale(5, 11), rules, secs(11))
            .pop()
            .expect("raised");
        assert_eq!(a.verdict, Verdict::Stale);
        // The stale backend itself is no current one.
        assert_eq!(a.current_backends, [backend("172.18.0.9")]);
        assert_eq!(
            a.evidence[1],
            "the current rules DNAT 192.0.2.1:8888/udp to 172.18.0.9:8888"
        );
    }

    #[test]
    fn a_lone_refused_flow_a_current_rule_would_dnat_bypasses_it() {
        let mut c = Correlator::new(Config::default());
        let lone = Evidence {
            entry_exists: None,
            siblings: Some(Siblings::default()),
            dnat_now: Some(true),
            rule_backends: Some(vec![backend("10.89.77.13")]),
        };
        let a = c
            .observe(refused(5, 11), lone, secs(11))
            .pop()
            .expect("raised");
        assert_eq!(a.verdict, Verdict::Bypass);
        assert_eq!(a.current_backends, [backend("10.89.77.13")]);
        assert!(
            a.evidence[0].contains(
                "while a current rule DNATs flows to 198.51.100.1:8888 to 10.89.77.13:8888"
            ),
            "{:?}",
            a.evidence
        );
    }

    #[test]
    fn a_refused_flow_without_any_dnat_is_quiet_and_rechecked_rarely() {
        // Nothing publishes the port and nothing listens: no stale flow.
        let mut c = Correlator::new(Config::default());
        let none = Siblings::default();
        assert_eq!(c.observe_with(refused(5, 11), Some(&none), secs(11)), None);
        assert_eq!(c.observe_with(refused(9, 12), None, secs(12)), None);
        assert!(
            !c.would_alert(&refused(20, 30), secs(30)),
            "the siblings are not looked up again before remind_every"
        );
        assert!(c.would_alert(&refused(80, 72), secs(72)));
        // Published meanwhile: now it bypasses.
        let view = siblings(&[("172.18.0.2", 1)]);
        let a = c
            .observe_with(refused(80, 72), Some(&view), secs(72))
            .expect("raised");
        assert_eq!(a.state, AlertState::Raised);
    }

    #[test]
    fn refused_while_nothing_published_then_audited_once_a_rule_would_dnat_it() {
        // Podman's silent shape: the stream's datagrams are refused while
        // no container publishes the port (no rule: not a bypass), then a
        // container publishes it and conmon takes the stream unread. The
        // audit's proof is not held back by the earlier look.
        let mut c = Correlator::new(Config::default());
        let unpublished = Evidence {
            siblings: Some(Siblings::default()),
            dnat_now: Some(false),
            ..Evidence::default()
        };
        assert!(c.observe(refused(5, 11), unpublished, secs(11)).is_empty());
        let a = c
            .observe_audited(
                refused(5, 14),
                &Siblings::default(),
                Some(vec![backend("10.89.77.13")]),
                secs(14),
            )
            .expect("raised by the audit at once");
        assert_eq!(a.verdict, Verdict::Bypass);
        assert_eq!(a.current_backends, [backend("10.89.77.13")]);
        assert!(
            a.evidence[0].contains("while a current rule DNATs"),
            "{:?}",
            a.evidence
        );
        // Without the rule's word nor siblings, the audit proves nothing.
        let mut c = Correlator::new(Config::default());
        assert_eq!(
            c.observe_audited(refused(0, 10), &Siblings::default(), None, secs(10)),
            None
        );
    }

    #[test]
    fn an_audited_bypass_is_raised_without_failures_and_kept_fresh() {
        let mut c = Correlator::new(Config::default());
        let view = siblings(&[("172.18.0.2", 1)]);
        let proxied = refused(0, 10);
        let a = c
            .observe_audited(proxied.clone(), &view, None, secs(10))
            .expect("raised");
        assert_eq!((a.state, a.verdict), (AlertState::Raised, Verdict::Bypass));
        // Found again by the next audits: no new alert, and not resolved by
        // silence while it is still there.
        for t in [20, 30, 40] {
            assert_eq!(
                c.observe_audited(proxied.clone(), &view, None, secs(t)),
                None
            );
            assert!(c.tick(secs(t)).is_empty());
        }
        // The same flow as the refused datagrams show it (their reply is
        // derived, not read): still the same flow, no new alert.
        let mut refused_now = refused(3, 45);
        refused_now.reply.sport = 1;
        assert_eq!(c.displaced(&refused_now, secs(45)), None);
        assert_eq!(c.observe_plain(refused_now, secs(45)), None);
        assert_eq!(c.tracked(), 1);
        assert_eq!(
            c.tick(secs(76)).len(),
            1,
            "resolved once the audits stop finding it"
        );
    }

    /// The story's flow as the audit knows it: no entry address, no
    /// failures.
    fn audited(at: u64) -> Observation {
        let mut flow = stale(0, at);
        flow.ct = 0;
        flow.first = secs(at);
        flow.icmp = None;
        flow.drops = None;
        flow
    }

    fn against_intent() -> Judgement {
        Judgement {
            verdict: Verdict::Stale,
            current: vec![backend("172.18.0.2")],
            evidence: vec!["the current nftables rules DNAT ...".into()],
        }
    }

    #[test]
    fn an_audit_judged_flow_is_raised_once_and_kept_while_found() {
        let mut c = Correlator::new(Config::default());
        let a = c
            .observe_judged(audited(10), against_intent(), secs(10))
            .expect("raised at once");
        assert_eq!((a.state, a.verdict), (AlertState::Raised, Verdict::Stale));
        assert_eq!(a.current_backends, [backend("172.18.0.2")]);
        for t in [20, 30, 40] {
            assert_eq!(
                c.observe_judged(audited(t), against_intent(), secs(t)),
                None
            );
            assert!(c.tick(secs(t)).is_empty());
        }
        // Then the kernel sees it fail here: the same flow, not a new one.
        let alerts = c.observe(stale(5, 45), Evidence::default(), secs(45));
        assert!(alerts.is_empty(), "{alerts:?}");
        assert_eq!((c.tracked(), c.raised_count()), (1, 1));
        // And its counters come from the kernel's reports from now on.
        assert_eq!(c.refresh(&stale(9, 50), secs(50)), Some(false));
        assert_eq!(c.tick(secs(81)).len(), 1, "resolved once both go quiet");
    }

    #[test]
    fn the_audit_leaves_to_the_kernel_a_flow_it_sees_failing() {
        let mut c = Correlator::new(Config::default());
        c.observe_plain(stale(5, 11), secs(11)).expect("raised");
        assert_eq!(
            c.observe_judged(audited(12), against_intent(), secs(12)),
            None
        );
        assert_eq!(c.tracked(), 1);
    }
}
