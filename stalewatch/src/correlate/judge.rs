//! The verdict on one failing flow, from its own evidence, the other
//! failing flows of its service, and its siblings in the conntrack table.
//! Pure: every fact comes in as an argument.

use std::collections::BTreeSet;

use crate::{
    domain::{Backend, Judgement, Observation, Siblings, Verdict},
    linux::{drop_reason, icmp},
};

/// A flow the kernel saw failing at a DNATed backend: `failing` holds the
/// backends where other tracked flows of its service fail.
pub fn pinned(
    flow: &Observation,
    failing: &BTreeSet<Backend>,
    siblings: Option<&Siblings>,
    rules: Option<&[Backend]>,
) -> Judgement {
    let stale = flow.backend();
    let service = flow.orig.service();
    let current: Vec<Backend> = siblings
        .map(|s| {
            s.dnat_backends
                .keys()
                .filter(|b| **b != stale && !failing.contains(b))
                .copied()
                .collect()
        })
        .unwrap_or_default();
    if !current.is_empty() {
        let evidence = format!(
            "newer flows to {service} are DNATed to {}, not to {stale}",
            list(&current)
        );
        return judged(Verdict::Stale, current, evidence);
    }
    if failing.contains(&stale) {
        let evidence =
            format!("other flows to {service} fail at the same backend, and none goes elsewhere");
        return judged(Verdict::BackendDown, vec![stale], evidence);
    }
    if neighbour_failed(flow) {
        let mut evidence = vec![format!(
            "the host no longer finds {} among its neighbours, yet the flow keeps coming",
            stale.addr
        )];
        // No newer flow shows where the service goes now: its rules do.
        let current: Vec<Backend> = rules
            .unwrap_or_default()
            .iter()
            .filter(|b| **b != stale && !failing.contains(b))
            .copied()
            .collect();
        if !current.is_empty() {
            evidence.push(format!(
                "the current rules DNAT {service} to {}",
                list(&current)
            ));
        }
        return Judgement {
            verdict: Verdict::Stale,
            current,
            evidence,
        };
    }
    Judgement::unconfirmed()
}

/// A flow delivered to this host without NAT (refused datagrams, or found
/// by the audit): a bypass only when DNATed siblings show that its
/// destination is published elsewhere now, or a current rule would DNAT
/// this very flow (`dnat_now`, where the rules could be read; with them, a
/// sibling is no proof without it); else nothing to say.
pub fn delivered_here(
    flow: &Observation,
    siblings: Option<&Siblings>,
    dnat_now: Option<bool>,
    rules: Option<&[Backend]>,
) -> Option<Judgement> {
    if dnat_now == Some(false) {
        return None;
    }
    // The rule that would DNAT it says where new flows go now; its
    // siblings may be pinned themselves (to a container replaced since).
    let by_rule = dnat_now == Some(true) && rules.is_some_and(|r| !r.is_empty());
    let current: Vec<Backend> = if by_rule {
        rules.unwrap_or_default().to_vec()
    } else {
        siblings
            .map(|s| s.dnat_backends.keys().copied().collect())
            .unwrap_or_default()
    };
    if current.is_empty() {
        return None;
    }
    let taken = if flow.failures() > 0 {
        "which refuses it"
    } else {
        "where something (a proxy) takes it"
    };
    let destination = Backend::new(flow.orig.dst, flow.orig.dport);
    let evidence = if by_rule {
        format!(
            "its conntrack entry has no NAT and delivers it to this host, {taken}, \
             while a current rule DNATs flows to {destination} to {}",
            list(&current)
        )
    } else {
        format!(
            "its conntrack entry has no NAT and delivers it to this host, {taken}, \
             while newer flows to {destination} are DNATed to {}",
            list(&current)
        )
    };
    Some(judged(Verdict::Bypass, current, evidence))
}

/// Traffic without NAT that fails because no neighbour answers for its
/// destination: another host's entry may still send it here.
pub fn is_dead_destination(flow: &Observation) -> bool {
    !flow.is_dnat() && !flow.local && neighbour_failed(flow)
}

/// The verdict on a dead destination: what this host sees of it.
pub fn dead_destination(flow: &Observation) -> Judgement {
    judged(
        Verdict::DeadDestination,
        Vec::new(),
        format!(
            "no neighbour answers for {} here, yet traffic for it keeps coming",
            flow.orig.dst
        ),
    )
}

/// Whether the kernel failed to resolve the flow's backend as a
/// neighbour: the backend has left the link.
fn neighbour_failed(flow: &Observation) -> bool {
    let ipv6 = flow.orig.dst.is_ipv6();
    let by_drop = flow
        .drops
        .as_ref()
        .is_some_and(|d| drop_reason::is_neighbour_failure(&d.reason, ipv6));
    let by_icmp = flow.icmp.is_some_and(|i| i.code == icmp::HOST_UNREACH);
    by_drop || by_icmp
}

fn judged(verdict: Verdict, current: Vec<Backend>, evidence: String) -> Judgement {
    Judgement {
        verdict,
        current,
        evidence: vec![evidence],
    }
}

/// `a, b`: backends as evidence lists them.
pub fn list(backends: &[Backend]) -> String {
    backends
        .iter()
        .map(Backend::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
