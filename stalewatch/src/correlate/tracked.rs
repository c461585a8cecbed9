//! What the correlator keeps of each flow, compact: at hundreds of
//! thousands of flows every byte of a [`Tracked`] is a quarter of a MiB.

use std::{sync::Arc, time::Duration};

use foldhash::HashMap;

use crate::domain::{Backend, DropEvidence, IcmpEvidence, Judgement, Observation, Tuple};

/// A tracked conntrack entry: its namespace and `nf_conn` address (see
/// [`entry_id`]). A reused address with another flow in it means the old
/// entry is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns: u32,
    pub id: u64,
}

/// `Tracked` times (monotonic, ns) that have not happened.
pub const NEVER: u64 = u64::MAX;

pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(NEVER - 1)
}

/// Drop reason names, by the index flows keep (0: none): a reason's name
/// is stored once, not with each of thousands of flows.
#[derive(Debug)]
pub struct Reasons {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u16>,
}

impl Default for Reasons {
    fn default() -> Self {
        Reasons {
            names: vec![Arc::from("")],
            ids: HashMap::default(),
        }
    }
}

impl Reasons {
    /// The index of a flow's drop reason (0 for none).
    pub fn id_of(&mut self, flow: &Observation) -> u16 {
        flow.drops.as_ref().map_or(0, |d| self.intern(&d.reason))
    }

    /// The index of a drop reason's name (0, no name, past 65,535 names).
    fn intern(&mut self, name: &Arc<str>) -> u16 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let Ok(id) = u16::try_from(self.names.len()) else {
            return 0;
        };
        self.names.push(name.clone());
        self.ids.insert(name.clone(), id);
        id
    }

    pub fn name(&self, id: u16) -> &Arc<str> {
        &self.names[usize::from(id)]
    }
}

/// What the correlator keeps of a flow, compact: at hundreds of thousands
/// of flows every byte here is a quarter of a MiB. Times are monotonic
/// nanoseconds, the drop reason an index into the correlator's names.
#[derive(Debug)]
pub struct Tracked {
    pub orig: Tuple,
    pub reply: Tuple,
    /// First and latest failure.
    pub first: u64,
    pub last: u64,
    /// When the latest report arrived.
    pub seen: u64,
    /// Raised: its latest alert. Not raised: when its siblings were last
    /// looked at and did not make it stale (a refused datagram with no DNAT
    /// beside it), or NEVER. One field for both: a flow is raised for good.
    pub mark: u64,
    pub status: u32,
    pub icmp_count: u32,
    pub drop_count: u32,
    pub reason: u16,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub local: bool,
    pub raised: bool,
    /// The verdict of the latest alert, shared by the flows of a service
    /// judged alike (see `judgements`).
    pub judged: Option<Arc<Judgement>>,
}

impl Tracked {
    /// As [`Observation::failures`].
    pub fn failures(&self) -> u32 {
        self.icmp_count.max(self.drop_count)
    }

    /// Whether `flow` is this flow. An entry's address is reused by the
    /// kernel for other flows, or for the same flow to another backend; a
    /// flow known without an address (refused datagrams, the audit) is
    /// its original tuple, whatever reply each source derived.
    pub fn is(&self, flow: &Observation) -> bool {
        self.orig == flow.orig && (flow.ct == 0 || self.reply == flow.reply)
    }

    pub fn backend(&self) -> Backend {
        self.reply.source()
    }

    /// Takes the kernel's facts of `flow` (the alert state stays).
    pub fn set_facts(&mut self, flow: &Observation, reason: u16) {
        self.orig = flow.orig;
        self.reply = flow.reply;
        self.first = nanos(flow.first);
        self.last = nanos(flow.last);
        self.status = flow.status;
        let icmp = flow.icmp.unwrap_or(IcmpEvidence {
            icmp_type: 0,
            code: 0,
            count: 0,
        });
        (self.icmp_type, self.icmp_code, self.icmp_count) = (icmp.icmp_type, icmp.code, icmp.count);
        self.drop_count = flow.drops.as_ref().map_or(0, |d| d.count);
        self.reason = reason;
        self.local = flow.local;
    }

    /// The flow as a report, from what is kept of it.
    pub fn observation(&self, key: &FlowKey, reasons: &Reasons) -> Observation {
        let t = self;
        Observation {
            local: t.local,
            ct: ct_of(key),
            netns: key.netns,
            orig: t.orig,
            reply: t.reply,
            status: t.status,
            first: Duration::from_nanos(t.first),
            last: Duration::from_nanos(t.last),
            icmp: IcmpEvidence::of(t.icmp_type, t.icmp_code, t.icmp_count),
            drops: (t.drop_count > 0).then(|| DropEvidence {
                reason: reasons.name(t.reason).clone(),
                count: t.drop_count,
            }),
        }
    }
}

pub fn key_of(flow: &Observation) -> FlowKey {
    FlowKey {
        netns: flow.netns,
        id: entry_id(flow.ct, &flow.orig),
    }
}

/// The entry's `nf_conn` address, or for a flow known without one (refused
/// datagrams, the audit) a stand-in made from its original tuple: odd, so
/// never an `nf_conn` address (those are 8-byte aligned).
pub fn entry_id(ct: u64, orig: &Tuple) -> u64 {
    if ct != 0 {
        return ct;
    }
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    orig.hash(&mut h);
    h.finish() | 1
}

pub fn ct_of(key: &FlowKey) -> u64 {
    if key.id & 1 == 1 { 0 } else { key.id }
}
