//! The watch's periodic audit. Flows that bypass a DNAT while a proxy on
//! the host serves them fail no packet, and flows pinned to a backend on
//! another host fail none here: only the conntrack table, held against the
//! host's NAT intent, shows them. An entry judged stale against the rules
//! is raised only when a second look still finds it (an orchestrator that
//! deletes old entries right after changing its rules is doing it right).

use std::{
    collections::HashMap, net::IpAddr, os::unix::fs::MetadataExt as _, path::PathBuf,
    time::Duration,
};

use super::{monotonic, view::View};
use crate::{
    correlate::{Correlator, audit},
    domain::{Alert, Judgement, Observation, Siblings, Tuple, Verdict},
    error::chain,
    source::{conntrack, engine::Engine, netns},
};

/// An entry the audit judges stale is raised when a look at least this
/// much later still does.
pub const CONFIRM_AFTER: Duration = Duration::from_millis(900);

pub struct Auditor {
    /// The namespace the audit reads.
    path: PathBuf,
    /// Entries judged stale against the NAT intent, with when they first
    /// were (monotonic): raised at a look at least CONFIRM_AFTER later that
    /// still judges so.
    pending: HashMap<(Tuple, Tuple), Duration>,
}

impl Auditor {
    pub fn new(path: PathBuf) -> Self {
        Auditor {
            path,
            pending: HashMap::new(),
        }
    }

    /// One audit: the table's candidates judged, what the correlator
    /// raises from them, and whether a follow-up audit is due soon.
    pub fn run(
        &mut self,
        view: &mut View,
        engine: Option<&Engine>,
        correlator: &mut Correlator,
    ) -> (Vec<Alert>, bool) {
        let path = self.path.clone();
        let Ok(inode) = std::fs::metadata(&path).map(|m| m.ino() as u32) else {
            return (Vec::new(), false);
        };
        let mut facts = view.facts(&path);
        if netns::own_inode() == Some(inode)
            && let Some(engine) = engine
        {
            facts.proxied_sources = engine.snapshot().container_addresses();
        }
        let intent = view.intent(&path);
        let judge_dnat = intent.as_ref().is_some_and(|i| !i.read().is_empty());
        let entries = match conntrack::read_audit_candidates(&path, &facts, judge_dnat) {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("audit: {}", chain(&e));
                return (Vec::new(), false);
            }
        };
        if judge_dnat {
            let sources = audit::bypass_sources(&entries, &facts);
            match netns::arrival_interfaces(&path, sources) {
                Ok(routes) => facts.arrives_on = routes,
                Err(e) => log::warn!("audit: routes back to the sources: {e}"),
            }
        }
        // The DNATed entries of each service, for the bypasses' siblings.
        let mut siblings_of: HashMap<crate::domain::Service, Siblings> = HashMap::new();
        for other in entries.iter().filter(|o| o.is_dnat()) {
            *siblings_of
                .entry(other.orig.service())
                .or_default()
                .dnat_backends
                .entry(other.backend())
                .or_default() += 1;
        }
        let now = monotonic();
        let mut seen = HashMap::new();
        let mut follow_up = false;
        let mut alerts = Vec::new();
        let findings = audit::audit(&entries, &facts, intent.as_deref());
        // Judged against the rules only where the packets leave for another
        // host: on this host's links, or with no route at all, they fail
        // here, where the kernel path sees them (with their evidence).
        let mut backends: Vec<IpAddr> = findings
            .iter()
            .filter(|f| f.verdict != Verdict::Bypass && f.entry.is_dnat())
            .map(|f| f.entry.backend().addr)
            .collect();
        backends.sort_unstable();
        backends.dedup();
        let remote = netns::gateways(&path, backends)
            .map_err(|e| log::warn!("audit: routes to the backends: {e}"))
            .unwrap_or_default();
        for finding in findings {
            let e = &finding.entry;
            let mut flow = Observation {
                local: true,
                ct: 0,
                netns: inode,
                orig: e.orig,
                reply: e.reply,
                status: e.status,
                first: now,
                last: now,
                icmp: None,
                drops: None,
            };
            let alert = if finding.verdict == Verdict::Bypass {
                // Its DNATed siblings, and the rule that would DNAT it.
                let siblings = siblings_of
                    .get(&e.orig.service())
                    .cloned()
                    .unwrap_or_default();
                // With the rules read, the audit judged it a bypass only
                // on a rule's proof, whose backends are the current ones.
                let rules = (judge_dnat || siblings.dnat_backends.is_empty())
                    .then(|| finding.current_backends.clone());
                correlator.observe_audited(flow, &siblings, rules, now)
            } else if !e.is_dnat() || facts.neighbour_failed(e.backend().addr) {
                // Failing here: the kernel path raises it, with evidence.
                continue;
            } else if !remote.contains_key(&e.backend().addr) {
                // On this host's links, or with no route at all, its packets
                // fail here once its neighbour does: the kernel path raises
                // it then, with evidence. The rules alone are no proof
                // here (a draining pod still serves after its rule went).
                continue;
            } else {
                let first = *self.pending.get(&(e.orig, e.reply)).unwrap_or(&now);
                seen.insert((e.orig, e.reply), first);
                if now.saturating_sub(first) < CONFIRM_AFTER {
                    follow_up = true;
                    continue;
                }
                flow.local = false;
                flow.first = first;
                let judgement = Judgement {
                    verdict: finding.verdict,
                    current: finding.current_backends.clone(),
                    evidence: finding.evidence.clone(),
                };
                correlator.observe_judged(flow, judgement, now)
            };
            alerts.extend(alert);
        }
        // An entry no longer judged stale starts afresh if it is again.
        self.pending = seen;
        (alerts, follow_up)
    }
}
