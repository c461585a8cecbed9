//! The audit: which entries of a conntrack table are stale right now, from
//! the table alone (no eBPF). `stalewatch check` prints its findings, and
//! `stalewatch watch` runs it periodically to catch what no packet failure
//! reveals: a flow that bypasses a DNAT through a proxy on the host.
//!
//! Pure: entries and facts about the namespace in, findings out.
//!
//! - `bypass`: an entry without NAT delivers a flow to one of the host's
//!   own addresses, while other entries to the same destination (protocol,
//!   address, port) are DNATed: the flow's entry was made while no DNAT
//!   existed, and NAT rules are never consulted for it again.
//! - `stale`: a DNATed entry is pinned to a backend that the host no longer
//!   finds among its neighbours, while the service sends other flows to a
//!   backend that it does find.

use std::collections::{BTreeMap, BTreeSet};

use super::judge::list;
use crate::domain::{Backend, Entry, KnownFacts, Service, Verdict};

/// One stale entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub entry: Entry,
    pub verdict: Verdict,
    /// Where the service sends new flows now.
    pub current_backends: Vec<Backend>,
    pub evidence: Vec<String>,
}

/// Finds the stale entries among `entries`, in a stable order.
pub fn audit(entries: &[Entry], facts: &KnownFacts) -> Vec<Finding> {
    // Where each service sends its DNATed entries.
    let mut dnat: BTreeMap<Service, BTreeSet<Backend>> = BTreeMap::new();
    for entry in entries.iter().filter(|e| e.is_dnat()) {
        dnat.entry(entry.orig.service())
            .or_default()
            .insert(entry.backend());
    }
    let mut findings = Vec::new();
    for entry in entries {
        let Some(backends) = dnat.get(&entry.orig.service()) else {
            continue;
        };
        let destination = Backend::new(entry.orig.dst, entry.orig.dport);
        if !entry.is_dnat() {
            // Delivered here by the engine's own rules is no bypass.
            let delivered_here = entry.reply.src == entry.orig.dst
                && facts.is_local(entry.orig.dst)
                && !facts.served_by_proxy(&entry.orig);
            if delivered_here {
                let current: Vec<Backend> = backends.iter().copied().collect();
                findings.push(Finding {
                    entry: entry.clone(),
                    verdict: Verdict::Bypass,
                    evidence: vec![format!(
                        "its entry has no NAT and delivers it to this host, while {} other \
                         entries to {destination} are DNATed to {}",
                        dnat_count(entries, entry),
                        list(&current)
                    )],
                    current_backends: current,
                });
            }
            continue;
        }
        let addr = entry.backend().addr;
        if !facts.neighbour_failed(addr) {
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

fn dnat_count(entries: &[Entry], of: &Entry) -> usize {
    let service: Service = of.orig.service();
    entries
        .iter()
        .filter(|e| e.is_dnat() && e.orig.service() == service)
        .count()
}

#[cfg(test)]
mod tests {
    use stalewatch_common::ct_status;

    use super::*;
    use crate::domain::udp;

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
        let findings = audit(&entries, &host());
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
            audit(&entries, &facts).len(),
            1,
            "without the engine's word"
        );
        facts.proxied_sources.insert("172.18.0.3".parse().unwrap());
        assert!(audit(&entries, &facts).is_empty());
    }

    #[test]
    fn a_port_that_nothing_publishes_is_not_bypassed() {
        // Delivered to the host with no DNAT anywhere: a service of the
        // host's own, or nothing listening; not a stale entry either way.
        assert!(audit(&[entry(40000, None), entry(40001, None)], &host()).is_empty());
    }

    #[test]
    fn a_flow_to_another_address_is_not_bypassing() {
        // Routed through without NAT, not delivered to this host.
        let mut routed = entry(40000, None);
        routed.orig.dst = "203.0.113.9".parse().unwrap();
        routed.reply.src = routed.orig.dst;
        let dnated = entry(40001, Some("172.18.0.2"));
        assert!(audit(&[routed, dnated], &host()).is_empty());
    }

    #[test]
    fn pinned_to_a_vanished_backend_is_stale_when_another_is_current() {
        let facts = vanished("172.17.0.2");
        let entries = [
            entry(40000, Some("172.17.0.2")),
            entry(40001, Some("172.18.0.2")),
        ];
        let findings = audit(&entries, &facts);
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
        assert!(audit(&entries, &host()).is_empty());
    }

    #[test]
    fn every_entry_at_a_vanished_backend_is_backend_down() {
        let facts = vanished("172.17.0.2");
        let entries = [
            entry(40000, Some("172.17.0.2")),
            entry(40001, Some("172.17.0.2")),
        ];
        let findings = audit(&entries, &facts);
        assert_eq!(findings.len(), 2);
        assert!(findings.iter().all(|f| f.verdict == Verdict::BackendDown));
    }
}
