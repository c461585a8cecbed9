//! Decoding: the raw records the kernel sends become plain facts about a
//! flow (an [`Observation`]), with addresses, ports and reason names, and
//! no kernel layout left.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use stalewatch_common::{FlowEvent, LocalEvent, TUPLE_SIZE, kind};

use super::btf::{DropReasons, TupleLayout};
use crate::{
    domain::{DropEvidence, Family, IcmpEvidence, Observation, Proto, Tuple},
    linux::icmp,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A record from the ring buffer, as the kernel wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawEvent {
    Flow(FlowEvent),
    Local(LocalEvent),
}

/// Copies one ring buffer record out by its kind; `None` for a record that
/// our programs never send.
pub fn raw_event(bytes: &[u8]) -> Option<RawEvent> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        kind::FLOW => copy(bytes).map(RawEvent::Flow),
        kind::LOCAL => copy(bytes).map(RawEvent::Local),
        _ => None,
    }
}

fn copy<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() == std::mem::size_of::<T>()).then(|| {
        // SAFETY: the length matches and T is plain old data (any bit
        // pattern is valid); read_unaligned copes with any alignment.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
    })
}

/// Decodes a raw `struct nf_conntrack_tuple`.
pub fn tuple(raw: &[u8; TUPLE_SIZE], layout: &TupleLayout) -> Option<Tuple> {
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

/// Encodes a tuple as the kernel lays it out (tests and benchmarks).
pub fn encode_tuple(t: &Tuple, layout: &TupleLayout) -> [u8; TUPLE_SIZE] {
    let mut raw = [0u8; TUPLE_SIZE];
    let mut put_addr = |at: usize, addr: IpAddr| match addr {
        IpAddr::V4(a) => raw[at..at + 4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => raw[at..at + 16].copy_from_slice(&a.octets()),
    };
    put_addr(layout.src_addr, t.src);
    put_addr(layout.dst_addr, t.dst);
    let l3num = match t.family {
        Family::Ipv4 => AF_INET,
        Family::Ipv6 => AF_INET6,
    };
    raw[layout.l3num..layout.l3num + 2].copy_from_slice(&l3num.to_ne_bytes());
    raw[layout.src_port..layout.src_port + 2].copy_from_slice(&t.sport.to_be_bytes());
    raw[layout.dst_port..layout.dst_port + 2].copy_from_slice(&t.dport.to_be_bytes());
    raw[layout.protonum] = t.proto.0;
    raw
}

/// A failing conntrack entry's report.
pub fn flow(event: &FlowEvent, layout: &TupleLayout, reasons: &DropReasons) -> Option<Observation> {
    Some(Observation {
        local: false,
        ct: event.ct,
        netns: event.netns,
        orig: tuple(&event.orig, layout)?,
        reply: tuple(&event.reply, layout)?,
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

/// A datagram this host refused: the flow as the packet shows it, and, as
/// its conntrack entry must have it, a reply from the host itself.
pub fn local(event: &LocalEvent) -> Observation {
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
            icmp_type: icmp::DEST_UNREACH,
            code: event.icmp_code,
            count: event.count,
        }),
        drops: None,
    }
}

#[cfg(test)]
mod tests {
    use stalewatch_common::ct_status;

    use super::*;
    use crate::domain::Backend;

    use crate::domain::udp as tuple;

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
        let t = super::tuple(&raw, &TupleLayout::LINUX).unwrap();
        assert_eq!(t, tuple("192.0.2.2", 40000, "192.0.2.1", 8888));
    }

    #[test]
    fn ipv6_tuple_round_trips() {
        let t = tuple("2001:db8::2", 5353, "2001:db8:1::10", 53);
        assert_eq!(
            super::tuple(&encode_tuple(&t, &TupleLayout::LINUX), &TupleLayout::LINUX),
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
        let obs = local(&event);
        assert!(obs.local && !obs.is_dnat());
        assert_eq!(obs.orig, tuple("198.51.100.2", 40000, "198.51.100.1", 8888));
        assert_eq!(
            obs.backend(),
            Backend::new("198.51.100.1".parse().unwrap(), 8888)
        );
        assert_eq!(obs.failures(), 4);
        assert_eq!(obs.icmp.unwrap().code, 3);
    }

    #[test]
    fn unknown_family_is_rejected() {
        assert_eq!(super::tuple(&[0u8; TUPLE_SIZE], &TupleLayout::LINUX), None);
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
            orig: encode_tuple(&tuple("192.0.2.2", 40000, "192.0.2.1", 8888), &layout),
            reply: encode_tuple(&tuple("172.17.0.2", 8888, "192.0.2.2", 40000), &layout),
        };
        let reasons = DropReasons::from_pairs([("SKB_DROP_REASON_NEIGH_FAILED", 58)]);
        let obs = flow(&event, &layout, &reasons).unwrap();
        assert_eq!(obs.failures(), 9);
        assert!(obs.is_dnat());
        assert_eq!(
            obs.backend(),
            Backend::new("172.17.0.2".parse().unwrap(), 8888)
        );
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
