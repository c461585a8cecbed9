//! What the sources tell of a flow: the kernel's report on its failing
//! packets, its conntrack entry, what the table shows of its siblings, and
//! what is known of its namespace. Plain facts, gathered before anything is
//! judged.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use stalewatch_common::ct_status;

use super::flow::{Backend, Tuple};

/// The ICMP message this host sent back for a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IcmpEvidence {
    #[serde(rename = "type")]
    pub icmp_type: u8,
    pub code: u8,
    pub count: u32,
}

impl IcmpEvidence {
    /// From the kernel's counters: none when no message was sent.
    pub fn of(icmp_type: u8, code: u8, count: u32) -> Option<IcmpEvidence> {
        (count > 0).then_some(IcmpEvidence {
            icmp_type,
            code,
            count,
        })
    }
}

/// What the drop path saw for a flow.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DropEvidence {
    /// The kernel's name of the reason, without `SKB_DROP_REASON_`; shared
    /// with the table of names: no copy per flow.
    pub reason: Arc<str>,
    pub count: u32,
}

/// A conntrack entry whose packets the kernel failed to deliver, as known at
/// the latest kernel report. Counters are cumulative since `first`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// Delivered to this host itself and refused (port unreachable), read
    /// from the packet: the kernel had let go of the entry. Such a flow is
    /// stale only if it bypasses a current DNAT, which its siblings tell.
    pub local: bool,
    /// The conntrack entry's kernel address: identity only.
    pub ct: u64,
    pub netns: u32,
    /// What the sender addressed.
    pub orig: Tuple,
    /// The reply direction: its source is where the entry sends the flow.
    pub reply: Tuple,
    pub status: u32,
    /// CLOCK_MONOTONIC times of the first and latest failure.
    pub first: Duration,
    pub last: Duration,
    pub icmp: Option<IcmpEvidence>,
    pub drops: Option<DropEvidence>,
}

impl Observation {
    /// Packets lost. A packet that fails usually shows at both hooks (an
    /// ICMP error and a drop), so the larger count, not the sum.
    pub fn failures(&self) -> u32 {
        let icmp = self.icmp.map_or(0, |i| i.count);
        let drops = self.drops.as_ref().map_or(0, |d| d.count);
        icmp.max(drops)
    }

    pub fn is_dnat(&self) -> bool {
        self.status & ct_status::DST_NAT != 0
    }

    /// Where the entry sends the flow: the source of its reply direction.
    pub fn backend(&self) -> Backend {
        self.reply.source()
    }
}

/// One conntrack entry, as the table lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// CTA_TUPLE_ORIG: what the sender addressed.
    pub orig: Tuple,
    /// CTA_TUPLE_REPLY: its source is the backend for a DNATed flow.
    pub reply: Tuple,
    /// CTA_STATUS: IPS_* bits, see `stalewatch_common::ct_status`.
    pub status: u32,
    /// CTA_TIMEOUT: seconds left.
    pub timeout: Option<u32>,
    /// CTA_ID: the kernel's id of this entry, which changes when an entry
    /// with the same tuples replaces it.
    pub id: Option<u32>,
    /// CTA_ZONE: the conntrack zone (0, the default, when the kernel sends
    /// none). Entries of different zones may share their tuples.
    pub zone: u16,
}

impl Entry {
    pub fn is_dnat(&self) -> bool {
        self.status & ct_status::DST_NAT != 0
    }

    /// Where the entry sends its flow.
    pub fn backend(&self) -> Backend {
        self.reply.source()
    }
}

/// What the conntrack table shows of a flow's siblings: the other entries
/// to the same service in its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Siblings {
    /// Where DNATed siblings are sent, with how many entries go there.
    pub dnat_backends: BTreeMap<Backend, u32>,
}

/// What a namespace shows besides its conntrack table, gathered before an
/// audit or a judgement.
#[derive(Clone, Debug, Default)]
pub struct KnownFacts {
    /// The namespace's own addresses.
    pub local: HashSet<IpAddr>,
    /// Neighbours it failed to resolve: backends gone from its links.
    pub failed_neighbours: HashSet<IpAddr>,
    /// Sources whose flows a container engine's own rules deliver to the
    /// host by design (Docker returns traffic from its bridges to its
    /// proxy): such a flow has no NAT however often its entry is made.
    pub proxied_sources: HashSet<IpAddr>,
    /// The interface flows from a source arrive on (the route back to
    /// it), for the sources a judgement needs.
    pub arrives_on: HashMap<IpAddr, String>,
}

impl KnownFacts {
    pub fn is_local(&self, addr: IpAddr) -> bool {
        self.local.contains(&addr)
    }

    pub fn neighbour_failed(&self, addr: IpAddr) -> bool {
        self.failed_neighbours.contains(&addr)
    }

    /// Whether the engine's rules deliver a flow from `orig` to the host.
    pub fn served_by_proxy(&self, orig: &Tuple) -> bool {
        self.proxied_sources.contains(&orig.src)
    }
}

/// What the watch looked up for one kernel report before the correlator
/// judges it: gathered only for a report that is due for an alert.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// Whether the flow's conntrack entry still exists; `None` when not
    /// looked up (the report is fresh) or the table could not be read.
    pub entry_exists: Option<bool>,
    /// Its siblings; `None` when the table could not be read, or when they
    /// cannot make the flow stale (a flow the engine proxies by design).
    pub siblings: Option<Siblings>,
    /// For a flow delivered to this host: whether a current rule would
    /// DNAT it now (its source, destination and the interface it arrives
    /// on); `None` when the rules could not be read.
    pub dnat_now: Option<bool>,
    /// Where the current rules send the flow's service (a flow delivered
    /// here: the rule that would DNAT it); `None` when the rules could not
    /// be read. What names the current backend where no sibling does.
    pub rule_backends: Option<Vec<Backend>>,
}
