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

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
};

use stalewatch_common::ct_status;

use crate::{
    conntrack::Entry,
    correlate::{Backend, Verdict},
    event::{Family, Proto},
    report::addr_port,
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

/// What the audit knows of the namespace besides its conntrack table.
pub trait Facts {
    /// Whether `addr` is one of the namespace's own addresses.
    fn is_local(&self, addr: IpAddr) -> bool;
    /// Whether the namespace failed to find `addr` among its neighbours
    /// (FAILED or INCOMPLETE), i.e. the backend is gone from its link.
    fn neighbour_failed(&self, addr: IpAddr) -> bool;
}

/// Plain facts, gathered beforehand.
#[derive(Clone, Debug, Default)]
pub struct KnownFacts {
    pub local: HashSet<IpAddr>,
    pub failed_neighbours: HashSet<IpAddr>,
}

impl Facts for KnownFacts {
    fn is_local(&self, addr: IpAddr) -> bool {
        self.local.contains(&addr)
    }

    fn neighbour_failed(&self, addr: IpAddr) -> bool {
        self.failed_neighbours.contains(&addr)
    }
}

type Service = (Family, Proto, IpAddr, u16);

fn service(entry: &Entry) -> Service {
    let o = &entry.orig;
    (o.family, o.proto, o.dst, o.dport)
}

fn is_dnat(entry: &Entry) -> bool {
    entry.status & ct_status::DST_NAT != 0
}

fn backend(entry: &Entry) -> Backend {
    (entry.reply.src, entry.reply.sport)
}

/// Reads the table the audit needs: DNATed entries first (the kernel skips
/// the rest, which is most of a busy table), and the others only when some
/// service is DNATed at all.
pub fn read_table(netns: &std::path::Path) -> Result<Vec<Entry>, crate::conntrack::Error> {
    use crate::conntrack::{Filter, dump};
    let dnat = |value| Filter {
        status: Some((value, ct_status::DST_NAT)),
        ..Filter::default()
    };
    let mut entries = dump(Some(netns), &dnat(ct_status::DST_NAT))?;
    if !entries.is_empty() {
        entries.extend(dump(Some(netns), &dnat(0))?);
    }
    Ok(entries)
}

/// Reads what a bypass needs, and no more: the entries without NAT that
/// deliver to this host, and only if there are any, the DNATed entries to
/// their destinations. The watch loop's periodic audit looks for nothing
/// else (pinned entries fail packets, which the kernel path sees), and on
/// a host with many DNATed flows reading them all every interval costs.
pub fn read_bypass_candidates(
    netns: &std::path::Path,
    facts: &impl Facts,
) -> Result<Vec<Entry>, crate::conntrack::Error> {
    use crate::conntrack::{Conn, Filter};
    /// Destinations asked one by one; beyond, one dump of every DNAT.
    const BY_DESTINATION: usize = 16;
    let conn = Conn::open(Some(netns))?;
    let plain = conn.dump(&Filter {
        status: Some((0, ct_status::DST_NAT)),
        ..Filter::default()
    })?;
    let mut entries: Vec<Entry> = plain
        .into_iter()
        .filter(|e| e.reply.src == e.orig.dst && facts.is_local(e.orig.dst))
        .collect();
    let destinations: BTreeSet<(crate::event::Family, crate::event::Proto, IpAddr, u16)> = entries
        .iter()
        .map(|e| (e.orig.family, e.orig.proto, e.orig.dst, e.orig.dport))
        .collect();
    let dnat = |family, proto, orig_dst| Filter {
        family,
        proto,
        status: Some((ct_status::DST_NAT, ct_status::DST_NAT)),
        orig_dst,
    };
    if destinations.len() > BY_DESTINATION {
        entries.extend(conn.dump(&dnat(None, None, None))?);
    } else {
        for (family, proto, addr, port) in destinations {
            entries.extend(conn.dump(&dnat(Some(family), Some(proto), Some((addr, port))))?);
        }
    }
    Ok(entries)
}

/// Finds the stale entries among `entries`, in a stable order.
pub fn audit(entries: &[Entry], facts: &impl Facts) -> Vec<Finding> {
    // Where each service sends its DNATed entries.
    let mut dnat: BTreeMap<Service, BTreeSet<Backend>> = BTreeMap::new();
    for entry in entries.iter().filter(|e| is_dnat(e)) {
        dnat.entry(service(entry))
            .or_default()
            .insert(backend(entry));
    }
    let mut findings = Vec::new();
    for entry in entries {
        let Some(backends) = dnat.get(&service(entry)) else {
            continue;
        };
        let destination = addr_port(entry.orig.dst, entry.orig.dport);
        if !is_dnat(entry) {
            let delivered_here =
                entry.reply.src == entry.orig.dst && facts.is_local(entry.orig.dst);
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
        let (addr, _) = backend(entry);
        if !facts.neighbour_failed(addr) {
            continue;
        }
        let current: Vec<Backend> = backends
            .iter()
            .filter(|(a, _)| !facts.neighbour_failed(*a))
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
    findings.sort_by_key(|f| (service(&f.entry), f.entry.orig));
    findings
}

fn dnat_count(entries: &[Entry], of: &Entry) -> usize {
    entries
        .iter()
        .filter(|e| is_dnat(e) && service(e) == service(of))
        .count()
}

fn list(backends: &[Backend]) -> String {
    backends
        .iter()
        .map(|(a, p)| addr_port(*a, *p))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::udp;

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
        assert_eq!(f.current_backends, [("172.18.0.2".parse().unwrap(), 8888)]);
        assert!(
            f.evidence[0]
                .contains("2 other entries to 198.51.100.1:8888 are DNATed to 172.18.0.2:8888")
        );
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
            [("172.18.0.2".parse().unwrap(), 8888)]
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
