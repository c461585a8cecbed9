//! What the correlator keeps of each flow, compact: at hundreds of
//! thousands of flows every byte of a [`Tracked`] is a quarter of a MiB.

use std::{sync::Arc, time::Duration};

use foldhash::HashMap;

use crate::domain::{
    Backend, DropEvidence, IcmpEvidence, Judgement, Observation, Proto, Tuple, TuplesV4,
};

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

/// A flow's two tuples: an IPv4 flow's packed in 25 bytes, another's
/// boxed (two [`Tuple`]s take 80).
#[derive(Debug)]
pub enum Tuples {
    V4(TuplesV4, Proto),
    Other(Box<(Tuple, Tuple)>),
}

impl Tuples {
    pub fn new(orig: &Tuple, reply: &Tuple) -> Tuples {
        match TuplesV4::pack(orig, reply) {
            Some(packed) => Tuples::V4(packed, orig.proto),
            None => Tuples::Other(Box::new((*orig, *reply))),
        }
    }

    /// The original and reply tuples.
    pub fn get(&self) -> (Tuple, Tuple) {
        match self {
            Tuples::V4(packed, proto) => packed.unpack(*proto),
            Tuples::Other(both) => **both,
        }
    }
}

/// What the correlator keeps of a flow, compact: at hundreds of thousands
/// of flows every byte here is a quarter of a MiB. Times are monotonic
/// nanoseconds, the drop reason an index into the correlator's names.
#[derive(Debug)]
pub struct Tracked {
    pub tuples: Tuples,
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
        let (orig, reply) = self.tuples.get();
        orig == flow.orig && (flow.ct == 0 || reply == flow.reply)
    }

    pub fn orig(&self) -> Tuple {
        self.tuples.get().0
    }

    pub fn backend(&self) -> Backend {
        self.tuples.get().1.source()
    }

    /// Takes the kernel's facts of `flow` (the alert state stays).
    pub fn set_facts(&mut self, flow: &Observation, reason: u16) {
        self.tuples = Tuples::new(&flow.orig, &flow.reply);
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
        let (orig, reply) = t.tuples.get();
        Observation {
            local: t.local,
            ct: ct_of(key),
            netns: key.netns,
            orig,
            reply,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::udp;

    #[test]
    fn a_flow_is_kept_in_96_bytes_its_tuples_whole() {
        for (orig, reply) in [
            (
                udp("192.0.2.2", 40000, "10.96.0.10", 53),
                udp("10.244.1.7", 53, "192.0.2.2", 40000),
            ),
            (
                udp("2001:db8::2", 40000, "fd00:96::10", 53),
                udp("fd00:244::7", 53, "2001:db8::2", 40000),
            ),
        ] {
            let tuples = Tuples::new(&orig, &reply);
            assert_eq!(matches!(tuples, Tuples::V4(..)), orig.src.is_ipv4());
            assert_eq!(tuples.get(), (orig, reply));
        }
        // 144 with the two tuples as they are: a quarter of a MiB per byte
        // at hundreds of thousands of flows.
        assert_eq!(size_of::<Tracked>(), 96);
    }
}
