//! The audit: which entries of a conntrack table are stale right now, from
//! the table alone (no eBPF). `stalewatch check` prints its findings, and
//! `stalewatch watch` runs it periodically to catch what no packet failure
//! reveals: a flow that bypasses a DNAT through a proxy on the host.
//!
//! Pure: entries and facts about the namespace in, findings out.
//!
//! - `bypass`: an entry without NAT delivers a flow to one of the host's
//!   own addresses, while a current rule would DNAT this very flow (where
//!   the rules are read; else: other entries to the same destination are
//!   DNATed): the flow's entry was made while no DNAT existed, and NAT
//!   rules are never consulted for it again.
//! - `stale`: a DNATed entry is pinned to a backend that the host no longer
//!   finds among its neighbours, while the service sends other flows to a
//!   backend that it does find.

use std::collections::{BTreeMap, BTreeSet};

use stalewatch_common::ct_status;

use super::judge::list;
use crate::domain::{
    Backend, Entry, Fit, KnownFacts, NatIntent, NatTarget, Service, Tuple, Verdict,
};

/// One stale entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub entry: Entry,
    pub verdict: Verdict,
    /// Where the service sends new flows now.
    pub current_backends: Vec<Backend>,
    pub evidence: Vec<String>,
}

/// Finds the stale entries among `entries`, in a stable order; with the
/// host's NAT `intent`, also the DNATed entries that no current rule would
/// send where they go.
pub fn audit(entries: &[Entry], facts: &KnownFacts, intent: Option<&NatIntent>) -> Vec<Finding> {
    // Where each service sends its DNATed entries.
    let mut dnat: BTreeMap<Service, BTreeSet<Backend>> = BTreeMap::new();
    for entry in entries.iter().filter(|e| e.is_dnat()) {
        dnat.entry(entry.orig.service())
            .or_default()
            .insert(entry.backend());
    }
    let mut findings = Vec::new();
    for entry in entries {
        let siblings = dnat.get(&entry.orig.service());
        if !entry.is_dnat() {
            findings.extend(bypass(entry, siblings, entries, facts, intent));
            continue;
        }
        let Some(backends) = siblings else {
            continue;
        };
        let destination = Backend::new(entry.orig.dst, entry.orig.dport);
        let addr = entry.backend().addr;
        if !facts.neighbour_failed(addr) {
            findings.extend(intent.and_then(|i| against_intent(entry, i, facts)));
            continue;
        }
        let current: Vec<Backend> = backends
            .iter()
            .filter(|b| !facts.neighbour_failed(b.addr))
            .copied()
            .collect();
        let mut evidence = vec![format!(
            "the host no longer finds {addr} among its neighbours"
        )];
        if !current.is_empty() {
            evidence.push(format!(
                "other entries to {destination} are DNATed to {}",
                list(&current)
            ));
        }
        findings.push(Finding {
            entry: entry.clone(),
            verdict: if current.is_empty() {
                Verdict::BackendDown
            } else {
                Verdict::Stale
            },
            current_backends: current,
            evidence,
        });
    }
    findings.sort_by_key(|f| (f.entry.orig.service(), f.entry.orig));
    findings
}

/// An entry made without NAT that bypasses a DNAT: it delivers its flow to
/// this host (not by the engine's own design), and either a current rule
/// would DNAT this very flow now (with the rules read), or, without them,
/// other entries to the same destination are DNATed. With the proof of a
/// rule, no DNATed sibling is needed: a stream that bypassed the only
/// container publishing a port is the one flow to it.
fn bypass(
    entry: &Entry,
    siblings: Option<&BTreeSet<Backend>>,
    entries: &[Entry],
    facts: &KnownFacts,
    intent: Option<&NatIntent>,
) -> Option<Finding> {
    // Delivered here by the engine's own rules is no bypass.
    let delivered_here = entry.reply.src == entry.orig.dst
        && facts.is_local(entry.orig.dst)
        && !facts.served_by_proxy(&entry.orig);
    if !delivered_here {
        return None;
    }
    let destination = Backend::new(entry.orig.dst, entry.orig.dport);
    let rule = match intent.filter(|i| !i.read().is_empty()) {
        Some(intent) => Some(dnat_now(&entry.orig, intent, facts)?),
        None => None,
    };
    let by_rule = rule
        .as_ref()
        .map(|r| r.backends.clone())
        .filter(|b| !b.is_empty());
    let (current, first) = match siblings {
        Some(backends) => {
            let current: Vec<Backend> = backends.iter().copied().collect();
            let first = format!(
                "its entry has no NAT and delivers it to this host, while {} other entries to \
                 {destination} are DNATed to {}",
                dnat_count(entries, entry),
                list(&current)
            );
            (current, first)
        }
        None => {
            let current = rule.as_ref()?.backends.clone();
            let first = format!(
                "its entry has no NAT and delivers it to this host; no other entry to \
                 {destination} is DNATed"
            );
            (current, first)
        }
    };
    let mut evidence = vec![first];
    evidence.extend(rule.map(|r| r.proof));
    Some(Finding {
        entry: entry.clone(),
        verdict: Verdict::Bypass,
        evidence,
        // Where the rule sends new flows now, where it names backends: the
        // siblings may be pinned themselves.
        current_backends: by_rule.unwrap_or(current),
    })
}

/// The sources of the entries that could bypass a DNAT (no NAT, delivered
/// to this host): whose arrival interfaces [`audit`] needs to know.
pub fn bypass_sources(entries: &[Entry], facts: &KnownFacts) -> Vec<std::net::IpAddr> {
    let mut sources: Vec<std::net::IpAddr> = entries
        .iter()
        .filter(|e| !e.is_dnat() && e.reply.src == e.orig.dst && facts.is_local(e.orig.dst))
        .map(|e| e.orig.src)
        .collect();
    sources.sort_unstable();
    sources.dedup();
    sources
}

/// A current rule that would DNAT a flow made without NAT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnatNow {
    /// The proof in words: which engine's rule, in which chain.
    pub proof: String,
    /// Where it would send the flow (the rule's single backends).
    pub backends: Vec<Backend>,
}

/// Whether a current rule would DNAT a flow `orig` made without NAT now:
/// its source, its destination and the interface it arrives on.
pub fn dnat_now(orig: &Tuple, intent: &NatIntent, facts: &KnownFacts) -> Option<DnatNow> {
    let iif = facts.arrives_on.get(&orig.src).map(String::as_str);
    let (rule, _) = intent
        .for_flow(orig, iif, |a| facts.is_local(a))
        .into_iter()
        .find(|(_, fit)| *fit == Fit::Yes)?;
    let on = iif.map_or(String::new(), |i| format!(", arriving on {i}"));
    let mut backends: Vec<Backend> = rule
        .to
        .iter()
        .filter_map(|t| t.backend(orig.dport))
        .collect();
    backends.sort();
    backends.dedup();
    Some(DnatNow {
        proof: format!(
            "a current {} rule ({}) DNATs this very flow now{on}",
            rule.engine.name(),
            rule.chain
        ),
        backends,
    })
}

/// Where the current rules DNAT the service of `orig` (its destination,
/// port and protocol, from its source): the single backends they name.
pub fn rule_backends(orig: &Tuple, intent: &NatIntent, facts: &KnownFacts) -> Vec<Backend> {
    let mut backends: Vec<Backend> = intent
        .for_flow(orig, None, |a| facts.is_local(a))
        .iter()
        .flat_map(|(rule, _)| rule.to.iter().filter_map(|t| t.backend(orig.dport)))
        .collect();
    backends.sort();
    backends.dedup();
    backends
}

/// A DNATed entry that the host's current rules would not send where it
/// goes: its service's rules name other backends, or none any more.
pub fn against_intent(entry: &Entry, intent: &NatIntent, facts: &KnownFacts) -> Option<Finding> {
    // A helper's expected connection takes its NAT from the helper.
    if entry.status & ct_status::EXPECTED != 0 {
        return None;
    }
    let orig = &entry.orig;
    let (backend, service) = (entry.backend(), orig.service());
    let rules = intent.for_flow(orig, None, |a| facts.is_local(a));
    if rules
        .iter()
        .any(|(r, _)| r.to.iter().any(|t| t.reaches(orig.dport, backend)))
    {
        return None;
    }
    let mut evidence = Vec::new();
    let mut current: Vec<Backend> = Vec::new();
    if rules.is_empty() {
        // Only a reading that understood every DNAT can say there is none.
        if !intent.complete() {
            return None;
        }
        evidence.push(format!(
            "no current rule ({}) DNATs {service} any more, yet its entry sends it to {backend}",
            intent.engines()
        ));
    } else {
        let mut engines: Vec<&str> = rules.iter().map(|(r, _)| r.engine.name()).collect();
        engines.sort_unstable();
        engines.dedup();
        let mut targets: Vec<String> = Vec::new();
        for (rule, _) in &rules {
            for t in &rule.to {
                match t.backend(orig.dport) {
                    Some(b) if !current.contains(&b) => current.push(b),
                    Some(_) => {}
                    None => targets.push(span(t)),
                }
            }
        }
        current.sort();
        targets.splice(0..0, current.iter().map(Backend::to_string));
        evidence.push(format!(
            "the current {} rules DNAT {service} to {}, not to {backend}",
            engines.join(" and "),
            targets.join(", ")
        ));
    }
    let serves = intent.services_sending_to(backend, &service);
    if !serves.is_empty() {
        let names: Vec<String> = serves.iter().map(Service::to_string).collect();
        evidence.push(format!(
            "{backend} is now a backend of {} only",
            names.join(", ")
        ));
    }
    Some(Finding {
        entry: entry.clone(),
        verdict: Verdict::Stale,
        current_backends: current,
        evidence,
    })
}

/// A target that is no one backend: `10.1.0.1-10.1.0.5:3000-4000`.
fn span(t: &NatTarget) -> String {
    let addrs = if t.addr.lo == t.addr.hi {
        t.addr.lo.to_string()
    } else {
        format!("{}-{}", t.addr.lo, t.addr.hi)
    };
    match t.port {
        Some(p) if p.lo == p.hi => format!("{addrs}:{}", p.lo),
        Some(p) => format!("{addrs}:{}-{}", p.lo, p.hi),
        None => addrs,
    }
}

fn dnat_count(entries: &[Entry], of: &Entry) -> usize {
    let service: Service = of.orig.service();
    entries
        .iter()
        .filter(|e| e.is_dnat() && e.orig.service() == service)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        AddrSpan, Cond, Conditions, DnatRule, EngineRead, PortSpan, Proto, RuleEngine, udp,
    };

    /// A flow from `sport` to the host's 198.51.100.1:8888, sent on to
    /// `to` (DNAT) or delivered to the host (`None`).
    fn entry(sport: u16, to: Option<&str>) -> Entry {
        let (reply_src, status) = match to {
            Some(backend) => (backend, ct_status::DST_NAT | ct_status::CONFIRMED),
            None => ("198.51.100.1", ct_status::CONFIRMED),
        };
        Entry {
            orig: udp("198.51.100.2", sport, "198.51.100.1", 8888),
            reply: udp(reply_src, 8888, "198.51.100.2", sport),
            status,
            timeout: Some(30),
            id: Some(u32::from(sport)),
            zone: 0,
        }
    }

    fn host() -> KnownFacts {
        KnownFacts {
            local: ["198.51.100.1".parse().unwrap()].into(),
            ..Default::default()
        }
    }

    /// The host, which failed to resolve `backend` as a neighbour.
    fn vanished(backend: &str) -> KnownFacts {
        let mut facts = host();
        facts.failed_neighbours.insert(backend.parse().unwrap());
        facts
    }

    #[test]
    fn an_entry_without_nat_beside_dnated_siblings_bypasses() {
        let entries = [
            entry(40000, None),
            entry(40001, Some("172.18.0.2")),
            entry(40002, Some("172.18.0.2")),
        ];
        let findings = audit(&entries, &host(), None);
        assert_eq!(findings.len(), 1);
        let f = &findings[0];
        assert_eq!(f.entry.orig.sport, 40000);
        assert_eq!(f.verdict, Verdict::Bypass);
        assert_eq!(
            f.current_backends,
            [Backend::new("172.18.0.2".parse().unwrap(), 8888)]
        );
        assert!(
            f.evidence[0]
                .contains("2 other entries to 198.51.100.1:8888 are DNATed to 172.18.0.2:8888")
        );
    }

    #[test]
    fn a_flow_the_engine_delivers_here_by_design_is_no_bypass() {
        // Docker returns traffic from its bridges to its proxy: a container
        // sending to a published port through a host address.
        let mut from_container = entry(40000, None);
        from_container.orig.src = "172.18.0.3".parse().unwrap();
        let entries = [from_container, entry(40001, Some("172.18.0.2"))];
        let mut facts = host();
        assert_eq!(
            audit(&entries, &facts, None).len(),
            1,
            "without the engine's word"
        );
        facts.proxied_sources.insert("172.18.0.3".parse().unwrap());
        assert!(audit(&entries, &facts, None).is_empty());
    }

    #[test]
    fn a_port_that_nothing_publishes_is_not_bypassed() {
        // Delivered to the host with no DNAT anywhere: a service of the
        // host's own, or nothing listening; not a stale entry either way.
        assert!(audit(&[entry(40000, None), entry(40001, None)], &host(), None).is_empty());
    }

    #[test]
    fn a_flow_to_another_address_is_not_bypassing() {
        // Routed through without NAT, not delivered to this host.
        let mut routed = entry(40000, None);
        routed.orig.dst = "203.0.113.9".parse().unwrap();
        routed.reply.src = routed.orig.dst;
        let dnated = entry(40001, Some("172.18.0.2"));
        assert!(audit(&[routed, dnated], &host(), None).is_empty());
    }

    #[test]
    fn pinned_to_a_vanished_backend_is_stale_when_another_is_current() {
        let facts = vanished("172.17.0.2");
        let entries = [
            entry(40000, Some("172.17.0.2")),
            entry(40001, Some("172.18.0.2")),
        ];
        let findings = audit(&entries, &facts, None);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].entry.orig.sport, 40000);
        assert_eq!(findings[0].verdict, Verdict::Stale);
        assert_eq!(
            findings[0].current_backends,
            [Backend::new("172.18.0.2".parse().unwrap(), 8888)]
        );
    }

    #[test]
    fn healthy_load_balancing_is_quiet() {
        // kube-proxy spreading flows over two live endpoints.
        let entries = [
            entry(40000, Some("10.0.0.1")),
            entry(40001, Some("10.0.0.2")),
        ];
        assert!(audit(&entries, &host(), None).is_empty());
    }

    #[test]
    fn every_entry_at_a_vanished_backend_is_backend_down() {
        let facts = vanished("172.17.0.2");
        let entries = [
            entry(40000, Some("172.17.0.2")),
            entry(40001, Some("172.17.0.2")),
        ];
        let findings = audit(&entries, &facts, None);
        assert_eq!(findings.len(), 2);
        assert!(findings.iter().all(|f| f.verdict == Verdict::BackendDown));
    }

    /// A kube-proxy-style rule: service `vip`:53/udp DNATed to `to`:53.
    fn dns_rule(vip: &str, to: &str) -> DnatRule {
        DnatRule {
            engine: RuleEngine::Nftables,
            chain: "ip kube-proxy/endpoint".into(),
            when: Conditions {
                proto: smallvec::smallvec![Cond::is(vec![Proto::UDP])],
                daddr: smallvec::smallvec![Cond::is(vec![AddrSpan::one(vip.parse().unwrap())])],
                dport: smallvec::smallvec![Cond::is(vec![PortSpan::one(53)])],
                ..Conditions::default()
            },
            to: smallvec::smallvec![NatTarget {
                addr: AddrSpan::one(to.parse().unwrap()),
                port: Some(PortSpan::one(53)),
            }],
        }
    }

    fn intent(rules: Vec<DnatRule>, complete: bool) -> NatIntent {
        NatIntent::new(
            rules,
            vec![EngineRead {
                engine: RuleEngine::Nftables,
                complete,
            }],
        )
    }

    /// Node A's entry of a client's DNS stream, DNATed to `to`.
    fn pinned(to: &str) -> Entry {
        Entry {
            orig: udp("192.0.2.2", 40000, "10.96.0.10", 53),
            reply: udp(to, 53, "192.0.2.2", 40000),
            status: ct_status::DST_NAT | ct_status::CONFIRMED | ct_status::SEEN_REPLY,
            timeout: Some(120),
            id: Some(1),
            zone: 0,
        }
    }

    #[test]
    fn an_entry_pinned_to_a_backend_no_rule_names_is_stale() {
        let rules = intent(vec![dns_rule("10.96.0.10", "10.244.1.8")], true);
        let findings = audit(&[pinned("10.244.1.7")], &host(), Some(&rules));
        assert_eq!(findings.len(), 1);
        let f = &findings[0];
        assert_eq!(f.verdict, Verdict::Stale);
        assert_eq!(
            f.current_backends,
            [Backend::new("10.244.1.8".parse().unwrap(), 53)]
        );
        assert_eq!(
            f.evidence,
            [
                "the current nftables rules DNAT 10.96.0.10:53/udp to 10.244.1.8:53, not to 10.244.1.7:53"
            ]
        );
        // The entry that goes where the rules send it is healthy.
        assert!(audit(&[pinned("10.244.1.8")], &host(), Some(&rules)).is_empty());
        // Without the intent, nothing tells.
        assert!(audit(&[pinned("10.244.1.7")], &host(), None).is_empty());
    }

    #[test]
    fn a_service_with_no_rule_left_is_stale_only_when_every_dnat_was_read() {
        let elsewhere = dns_rule("10.96.0.99", "10.244.1.9");
        let findings = audit(
            &[pinned("10.244.1.7")],
            &host(),
            Some(&intent(vec![elsewhere.clone()], true)),
        );
        assert_eq!(findings.len(), 1);
        assert!(findings[0].current_backends.is_empty());
        assert_eq!(
            findings[0].evidence,
            [
                "no current rule (nftables) DNATs 10.96.0.10:53/udp any more, yet its entry sends it to 10.244.1.7:53"
            ]
        );
        let partial = intent(vec![elsewhere], false);
        assert!(audit(&[pinned("10.244.1.7")], &host(), Some(&partial)).is_empty());
    }

    #[test]
    fn an_address_given_to_another_services_pod_is_named() {
        let rules = intent(
            vec![
                dns_rule("10.96.0.10", "10.244.1.8"),
                dns_rule("10.96.0.11", "10.244.1.7"),
            ],
            true,
        );
        let findings = audit(&[pinned("10.244.1.7")], &host(), Some(&rules));
        assert_eq!(findings.len(), 1);
        assert_eq!(
            findings[0].evidence[1],
            "10.244.1.7:53 is now a backend of 10.96.0.11:53/udp only"
        );
    }

    #[test]
    fn load_balancing_ranges_and_helpers_are_quiet() {
        let balanced = intent(
            vec![
                dns_rule("10.96.0.10", "10.244.1.7"),
                dns_rule("10.96.0.10", "10.244.1.8"),
            ],
            true,
        );
        assert!(
            audit(
                &[pinned("10.244.1.7"), pinned("10.244.1.8")],
                &host(),
                Some(&balanced)
            )
            .is_empty()
        );
        let mut range = dns_rule("10.96.0.10", "10.244.1.1");
        range.to[0].addr.hi = "10.244.1.9".parse().unwrap();
        assert!(
            audit(
                &[pinned("10.244.1.7")],
                &host(),
                Some(&intent(vec![range], true))
            )
            .is_empty()
        );
        let mut expected = pinned("10.244.1.7");
        expected.status |= ct_status::EXPECTED;
        let moved = intent(vec![dns_rule("10.96.0.10", "10.244.1.8")], true);
        assert!(audit(&[expected], &host(), Some(&moved)).is_empty());
    }

    #[test]
    fn a_bypass_needs_a_rule_that_would_dnat_this_very_flow() {
        // The router DNATs 8888 arriving on `ext` only, and serves 8888
        // itself to its internal clients.
        let mut published = dns_rule("198.51.100.1", "172.18.0.2");
        published.when.dport = smallvec::smallvec![Cond::is(vec![PortSpan::one(8888)])];
        published.when.iif = vec![Cond::is(vec!["ext".to_owned()])];
        published.to[0].port = Some(PortSpan::one(8888));
        let rules = intent(vec![published], true);
        let entries = [entry(40000, None), entry(40001, Some("172.18.0.2"))];
        let mut facts = host();
        let client: std::net::IpAddr = "198.51.100.2".parse().unwrap();
        assert_eq!(bypass_sources(&entries, &facts), [client]);
        facts.arrives_on.insert(client, "int".into());
        assert!(
            audit(&entries, &facts, Some(&rules)).is_empty(),
            "internal: by design"
        );
        facts.arrives_on.insert(client, "ext".into());
        let findings = audit(&entries, &facts, Some(&rules));
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].verdict, Verdict::Bypass);
        assert_eq!(
            findings[0].evidence[1],
            "a current nftables rule (ip kube-proxy/endpoint) DNATs this very flow now, arriving on ext"
        );
        // Where the route back is unknown, nothing proves it.
        facts.arrives_on.clear();
        assert!(audit(&entries, &facts, Some(&rules)).is_empty());
    }

    #[test]
    fn a_lone_stream_without_nat_is_a_bypass_where_a_rule_would_dnat_it() {
        // Podman: the only container publishing 8888 was replaced while the
        // stream's entry was deleted; no other flow to the port is DNATed,
        // yet netavark's rule would DNAT this one.
        let mut published = dns_rule("198.51.100.1", "10.89.77.13");
        published.when.dport = smallvec::smallvec![Cond::is(vec![PortSpan::one(8888)])];
        published.to[0].port = Some(PortSpan::one(8888));
        let rules = intent(vec![published], true);
        let entries = [entry(40000, None)];
        // Without the rules, a lone entry proves nothing.
        assert!(audit(&entries, &host(), None).is_empty());
        let findings = audit(&entries, &host(), Some(&rules));
        assert_eq!(findings.len(), 1);
        let f = &findings[0];
        assert_eq!(f.verdict, Verdict::Bypass);
        assert_eq!(
            f.current_backends,
            [Backend::new("10.89.77.13".parse().unwrap(), 8888)]
        );
        assert_eq!(
            f.evidence[0],
            "its entry has no NAT and delivers it to this host; no other entry to \
             198.51.100.1:8888 is DNATed"
        );
        assert!(f.evidence[1].contains("DNATs this very flow now"));
        assert_eq!(
            rule_backends(&entries[0].orig, &rules, &host()),
            f.current_backends
        );
        // A port no rule DNATs stays quiet, alone or not.
        let other = intent(vec![dns_rule("198.51.100.1", "10.89.77.13")], true);
        assert!(audit(&entries, &host(), Some(&other)).is_empty());
    }
}
