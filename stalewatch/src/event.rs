//! Decoding: the raw records the kernel sends become plain facts about a
//! flow, with addresses, ports and reason names, and no kernel layout left.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use stalewatch_common::{FlowEvent, ICMP_DEST_UNREACH, LocalEvent, TUPLE_SIZE, ct_status};

use crate::kernel::btf::{DropReasons, TupleLayout};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// A transport protocol, by IANA number, named where stalewatch knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proto(pub u8);

impl Proto {
    pub const TCP: Proto = Proto(6);
    pub const UDP: Proto = Proto(17);

    pub fn name(self) -> String {
        match self.0 {
            1 => "icmp".into(),
            6 => "tcp".into(),
            17 => "udp".into(),
            58 => "icmpv6".into(),
            132 => "sctp".into(),
            136 => "udplite".into(),
            n => n.to_string(),
        }
    }

    /// Whether the tuple's port fields are ports (not ICMP ids).
    pub fn has_ports(self) -> bool {
        matches!(self.0, 6 | 17 | 33 | 132 | 136)
    }
}

impl serde::Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// One direction of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub family: Family,
    pub proto: Proto,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Tuple {
    /// Decodes a raw `struct nf_conntrack_tuple`.
    pub fn decode(raw: &[u8; TUPLE_SIZE], layout: &TupleLayout) -> Option<Tuple> {
        let u16_ne = |at: usize| u16::from_ne_bytes([raw[at], raw[at + 1]]);
        let u16_be = |at: usize| u16::from_be_bytes([raw[at], raw[at + 1]]);
        let (family, addr): (Family, fn(&[u8]) -> IpAddr) = match u16_ne(layout.l3num) {
            AF_INET => (Family::Ipv4, |b| {
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }),
            AF_INET6 => (Family::Ipv6, |b| {
                let octets: [u8; 16] = b[..16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            }),
            _ => return None,
        };
        Some(Tuple {
            family,
            proto: Proto(raw[layout.protonum]),
            src: addr(&raw[layout.src_addr..layout.src_addr + 16]),
            sport: u16_be(layout.src_port),
            dst: addr(&raw[layout.dst_addr..layout.dst_addr + 16]),
            dport: u16_be(layout.dst_port),
        })
    }

    /// Encodes the tuple as the kernel lays it out (tests and benchmarks).
    pub fn encode(&self, layout: &TupleLayout) -> [u8; TUPLE_SIZE] {
        let mut raw = [0u8; TUPLE_SIZE];
        let mut put_addr = |at: usize, addr: IpAddr| match addr {
            IpAddr::V4(a) => raw[at..at + 4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => raw[at..at + 16].copy_from_slice(&a.octets()),
        };
        put_addr(layout.src_addr, self.src);
        put_addr(layout.dst_addr, self.dst);
        let l3num = match self.family {
            Family::Ipv4 => AF_INET,
            Family::Ipv6 => AF_INET6,
        };
        raw[layout.l3num..layout.l3num + 2].copy_from_slice(&l3num.to_ne_bytes());
        raw[layout.src_port..layout.src_port + 2].copy_from_slice(&self.sport.to_be_bytes());
        raw[layout.dst_port..layout.dst_port + 2].copy_from_slice(&self.dport.to_be_bytes());
        raw[layout.protonum] = self.proto.0;
        raw
    }
}

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
    /// Shared with the kernel layout's table of names: no copy per flow.
    pub reason: std::sync::Arc<str>,
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
    pub fn decode(
        event: &FlowEvent,
        layout: &TupleLayout,
        reasons: &DropReasons,
    ) -> Option<Observation> {
        Some(Observation {
            local: false,
            ct: event.ct,
            netns: event.netns,
            orig: Tuple::decode(&event.orig, layout)?,
            reply: Tuple::decode(&event.reply, layout)?,
            status: event.status,
            first: Duration::from_nanos(event.first_ns),
            last: Duration::from_nanos(event.last_ns),
            icmp: IcmpEvidence::of(event.icmp_type, event.icmp_code, event.icmp_count),
            drops: (event.drop_count > 0).then(|| DropEvidence {
                reason: reasons.name(event.drop_reason),
                count: event.drop_count,
            }),
        })
    }

    /// A datagram this host refused: the flow as the packet shows it, and,
    /// as its conntrack entry must have it, a reply from the host itself.
    pub fn decode_local(event: &LocalEvent) -> Observation {
        let proto = Proto(event.proto);
        let src = IpAddr::V4(Ipv4Addr::from(event.saddr));
        let dst = IpAddr::V4(Ipv4Addr::from(event.daddr));
        let (sport, dport) = (
            u16::from_be_bytes(event.sport),
            u16::from_be_bytes(event.dport),
        );
        let tuple = |src, sport, dst, dport| Tuple {
            family: Family::Ipv4,
            proto,
            src,
            sport,
            dst,
            dport,
        };
        Observation {
            local: true,
            ct: 0,
            netns: event.netns,
            orig: tuple(src, sport, dst, dport),
            reply: tuple(dst, dport, src, sport),
            status: 0,
            first: Duration::from_nanos(event.first_ns),
            last: Duration::from_nanos(event.last_ns),
            icmp: Some(IcmpEvidence {
                icmp_type: ICMP_DEST_UNREACH as u8,
                code: event.icmp_code,
                count: event.count,
            }),
            drops: None,
        }
    }

    /// Packets lost. A packet that fails usually shows at both hooks (an
    /// ICMP error and a drop), so the larger count, not the sum.
    pub fn failures(&self) -> u32 {
        let icmp = self.icmp.map_or(0, |i| i.count);
        let drops = self.drops.as_ref().map_or(0, |d| d.count);
        icmp.max(drops)
    }

    /// Whether the kernel failed to resolve the backend as a neighbour:
    /// the backend has left the link (IPv6 reports this as NOT_SPECIFIED).
    pub fn neighbour_failed(&self) -> bool {
        let by_drop = self.drops.as_ref().is_some_and(|d| {
            d.reason.starts_with("NEIGH_")
                || (&*d.reason == "NOT_SPECIFIED" && self.orig.family == Family::Ipv6)
        });
        let by_icmp = self.icmp.is_some_and(|i| i.code == 1);
        by_drop || by_icmp
    }

    pub fn is_dnat(&self) -> bool {
        self.status & ct_status::DST_NAT != 0
    }

    /// Where the entry sends the flow: the source of its reply direction.
    pub fn backend(&self) -> (IpAddr, u16) {
        (self.reply.src, self.reply.sport)
    }
}

/// A UDP tuple from text, for the unit tests of every stage.
#[cfg(test)]
pub(crate) fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
    let src: IpAddr = src.parse().expect("an address");
    Tuple {
        family: if src.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        },
        proto: Proto::UDP,
        src,
        sport,
        dst: dst.parse().expect("an address"),
        dport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::udp as tuple;

    #[test]
    fn ipv4_tuple_decodes_from_kernel_bytes() {
        // Bytes as the kernel lays out a UDP tuple 192.0.2.2:40000 -> 192.0.2.1:8888.
        let mut raw = [0u8; TUPLE_SIZE];
        raw[0..4].copy_from_slice(&[192, 0, 2, 2]);
        raw[16..18].copy_from_slice(&40000u16.to_be_bytes());
        raw[18..20].copy_from_slice(&2u16.to_ne_bytes());
        raw[20..24].copy_from_slice(&[192, 0, 2, 1]);
        raw[36..38].copy_from_slice(&8888u16.to_be_bytes());
        raw[38] = 17;
        let t = Tuple::decode(&raw, &TupleLayout::LINUX).unwrap();
        assert_eq!(t, tuple("192.0.2.2", 40000, "192.0.2.1", 8888));
    }

    #[test]
    fn ipv6_tuple_round_trips() {
        let t = tuple("2001:db8::2", 5353, "2001:db8:1::10", 53);
        assert_eq!(
            Tuple::decode(&t.encode(&TupleLayout::LINUX), &TupleLayout::LINUX),
            Some(t)
        );
    }

    #[test]
    fn a_refused_datagram_is_a_local_flow_replied_by_the_host() {
        let event = LocalEvent {
            kind: stalewatch_common::kind::LOCAL,
            netns: 7,
            first_ns: 1,
            last_ns: 2,
            count: 4,
            proto: 17,
            icmp_code: 3,
            _pad: [0; 2],
            saddr: [198, 51, 100, 2],
            daddr: [198, 51, 100, 1],
            sport: 40000u16.to_be_bytes(),
            dport: 8888u16.to_be_bytes(),
            _pad2: 0,
        };
        let obs = Observation::decode_local(&event);
        assert!(obs.local && !obs.is_dnat());
        assert_eq!(obs.orig, tuple("198.51.100.2", 40000, "198.51.100.1", 8888));
        assert_eq!(obs.backend(), ("198.51.100.1".parse().unwrap(), 8888));
        assert_eq!(obs.failures(), 4);
        assert_eq!(obs.icmp.unwrap().code, 3);
    }

    #[test]
    fn unknown_family_is_rejected() {
        assert_eq!(Tuple::decode(&[0u8; TUPLE_SIZE], &TupleLayout::LINUX), None);
    }

    #[test]
    fn failures_count_packets_not_hooks() {
        let layout = TupleLayout::LINUX;
        let event = FlowEvent {
            kind: stalewatch_common::kind::FLOW,
            ct: 0xffff_8880_0000_1000,
            first_ns: 1_000,
            last_ns: 2_000,
            netns: 4026532000,
            status: ct_status::DST_NAT | ct_status::CONFIRMED,
            icmp_count: 7,
            drop_count: 9,
            drop_reason: 58,
            icmp_type: 3,
            icmp_code: 1,
            last_hook: 2,
            _pad: 0,
            _pad2: 0,
            orig: tuple("192.0.2.2", 40000, "192.0.2.1", 8888).encode(&layout),
            reply: tuple("172.17.0.2", 8888, "192.0.2.2", 40000).encode(&layout),
        };
        let reasons = DropReasons::from_pairs([("SKB_DROP_REASON_NEIGH_FAILED", 58)]);
        let obs = Observation::decode(&event, &layout, &reasons).unwrap();
        assert_eq!(obs.failures(), 9);
        assert!(obs.is_dnat());
        assert_eq!(obs.backend(), ("172.17.0.2".parse().unwrap(), 8888));
        assert_eq!(&*obs.drops.unwrap().reason, "NEIGH_FAILED");
        assert_eq!(
            obs.icmp,
            Some(IcmpEvidence {
                icmp_type: 3,
                code: 1,
                count: 7
            })
        );
    }
}
