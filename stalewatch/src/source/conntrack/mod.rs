//! The conntrack table over ctnetlink: dump, look up and delete the entries
//! of a network namespace, without running the `conntrack` command.
//!
//! Requests are built with `netlink-packet-netfilter`'s types. Replies are
//! read in place from the receive buffer (`netlink-packet-core`'s message
//! views and a small attribute walker) instead of through the crate's owned
//! parse, which allocates a dozen vectors per entry: an audit may dump 200k
//! entries, and then the kernel's own formatting is most of the cost.
//!
//! For ICMP and ICMPv6 a [`Tuple`]'s `sport` is the echo id and its `dport`
//! is `type << 8 | code`, which is where the kernel keeps them in its tuple
//! (and so what [`Tuple::decode`] reads from eBPF events too).
//!
//! [`dump`] and [`find`] return the entries of every conntrack zone, each
//! with its zone; [`get`] looks in zone 0 only. Deletions name one entry
//! exactly: its reply tuple, its zone and its id ([`delete_entry`]), so
//! that an entry that replaced the one judged (same original tuple,
//! another reply) is never deleted in its place.
//!
//! Kernel tests of this module live in the `tests` crate
//! (`tests/tests/conntrack.rs`): they need root.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorBuffer, NLA_F_NESTED, NLA_TYPE_MASK, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, parse_i32,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Status,
        Tuple as NlTuple,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::libc;
use stalewatch_common::ct_status;

use super::netns;
use crate::domain::{Entry, Family, KnownFacts, Proto, Tuple};

mod mirror;
pub use mirror::{Mirror, Mirrored, Update};

/// Which entries a dump returns; all `None` is everything. The kernel
/// filters what it can (family, status, and protocol, IPv4 destination
/// address and port through CTA_FILTER); everything is checked again here,
/// so kernels that ignore a filter still give the same answer.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub family: Option<Family>,
    pub proto: Option<Proto>,
    /// `(value, mask)`: entries with `status & mask == value`.
    pub status: Option<(u32, u32)>,
    /// Destination address and port of the original direction.
    pub orig_dst: Option<(IpAddr, u16)>,
    /// Source address and port of the original direction.
    pub orig_src: Option<(IpAddr, u16)>,
}

impl Filter {
    pub fn matches(&self, entry: &Entry) -> bool {
        let orig = &entry.orig;
        self.family.is_none_or(|f| orig.family == f)
            && self.proto.is_none_or(|p| orig.proto == p)
            && self
                .status
                .is_none_or(|(value, mask)| entry.status & mask == value)
            && self
                .orig_dst
                .is_none_or(|(addr, port)| orig.dst == addr && orig.dport == port)
            && self
                .orig_src
                .is_none_or(|(addr, port)| orig.src == addr && orig.sport == port)
    }

    /// The entries whose original tuple is `orig`, in every zone.
    pub fn original(orig: &Tuple) -> Filter {
        Filter {
            family: Some(orig.family),
            proto: Some(orig.proto),
            status: None,
            orig_dst: Some((orig.dst, orig.dport)),
            orig_src: Some((orig.src, orig.sport)),
        }
    }

    /// The family to ask the kernel for, or `None` when the filter
    /// contradicts itself and nothing can match.
    fn dump_family(&self) -> Option<Option<Family>> {
        let mut family = self.family;
        let addrs = [self.orig_dst, self.orig_src];
        for of_addr in addrs.iter().flatten().map(|(addr, _)| Family::of(*addr)) {
            match family {
                Some(f) if f != of_addr => return None,
                _ => family = Some(of_addr),
            }
        }
        Some(family)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot enter network namespace {}: {}{}", .0.display(), .1, needs(.1, "CAP_SYS_ADMIN"))]
    Netns(PathBuf, io::Error),
    #[error("conntrack netlink socket: {0}")]
    Socket(io::Error),
    #[error(
        "conntrack {what} refused by the kernel: {err}{}",
        needs(err, "CAP_NET_ADMIN")
    )]
    Kernel { what: &'static str, err: io::Error },
    #[error("malformed conntrack netlink message: {0}")]
    Malformed(String),
    #[error(
        "{} announces no conntrack events (net.netfilter.nf_conntrack_events = 0)",
        .0.display()
    )]
    NoEvents(PathBuf),
    #[error("malformed conntrack netlink message")]
    Decode(#[source] DecodeError),
}

/// The capability to name when the kernel said no.
fn needs(err: &io::Error, capability: &str) -> String {
    if err.kind() == io::ErrorKind::PermissionDenied {
        format!(" (needs {capability})")
    } else {
        String::new()
    }
}

/// Dumps the conntrack table of a network namespace: `netns` is an nsfs
/// path (/run/netns/NAME, /proc/PID/ns/net, ...) or `None` for our own.
pub fn dump(netns: Option<&Path>, filter: &Filter) -> Result<Vec<Entry>, Error> {
    Conn::open(netns)?.dump(filter)
}

/// Looks up the entry whose original tuple is `orig`.
pub fn get(netns: Option<&Path>, orig: &Tuple) -> Result<Option<Entry>, Error> {
    Conn::open(netns)?.get(orig)
}

/// The entries whose original tuple is `orig`, in every zone: one dump
/// that the kernel filters (IPv4) or that is filtered here (IPv6).
pub fn find(netns: Option<&Path>, orig: &Tuple) -> Result<Vec<Entry>, Error> {
    Conn::open(netns)?.find(orig)
}

/// Deletes exactly `entry`, as a dump listed it: `Ok(false)` when it is
/// gone or was replaced by another entry with its original tuple.
pub fn delete_entry(netns: Option<&Path>, entry: &Entry) -> Result<bool, Error> {
    Conn::open(netns)?.delete_entry(entry)
}

/// Deletes the entry judged from a kernel report, which carries its tuples
/// but not its id or zone: see [`Conn::delete_judged`].
pub fn delete_judged(netns: Option<&Path>, orig: &Tuple, reply: &Tuple) -> Result<Deletion, Error> {
    Conn::open(netns)?.delete_judged(orig, reply)
}

/// What became of a deletion of a judged entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// This entry, the one judged, was deleted.
    Deleted(Entry),
    /// No entry has the original tuple any more.
    Gone,
    /// The entries with the original tuple are not the one judged (their
    /// reply differs: a new entry replaced it), or changed between the
    /// look-up and the deletion. Nothing was deleted.
    Replaced(Vec<Entry>),
    /// Entries of several zones have the judged tuples, and the report does
    /// not tell which one failed. Nothing was deleted.
    Ambiguous(Vec<Entry>),
}

/// Reads the table an audit needs: the DNATed entries and the others. A
/// bypass needs no DNATed sibling to be proven (the host's rules say what
/// they would DNAT), so the entries without NAT are read even where no
/// flow is DNATed now: a stream that bypassed the only container
/// publishing a port is the one flow to it.
pub fn read_table(netns: &Path) -> Result<Vec<Entry>, Error> {
    let conn = Conn::open(Some(netns))?;
    let dnat = |value| Filter {
        status: Some((value, ct_status::DST_NAT)),
        ..Filter::default()
    };
    let mut entries = conn.dump(&dnat(ct_status::DST_NAT))?;
    entries.extend(conn.dump(&dnat(0))?);
    Ok(entries)
}

/// Reads what the watch's periodic audit needs, and no more: the entries
/// without NAT that deliver to this host (bypass candidates), and the
/// DNATed entries: every one when `every_dnat` (to judge them against the
/// host's NAT intent), else only those to the candidates' destinations
/// (pinned entries fail packets, which the kernel path sees, and on a host
/// with many DNATed flows reading them all every interval costs).
pub fn read_audit_candidates(
    netns: &Path,
    facts: &KnownFacts,
    every_dnat: bool,
) -> Result<Vec<Entry>, Error> {
    /// Destinations asked one by one; beyond, one dump of every DNAT.
    const BY_DESTINATION: usize = 16;
    let conn = Conn::open(Some(netns))?;
    let mut entries = bypass_candidates(&conn, facts)?;
    let services: std::collections::BTreeSet<crate::domain::Service> =
        entries.iter().map(|e| e.orig.service()).collect();
    let dnat = |family, proto, orig_dst| Filter {
        family,
        proto,
        status: Some((ct_status::DST_NAT, ct_status::DST_NAT)),
        orig_dst,
        orig_src: None,
    };
    if every_dnat || services.len() > BY_DESTINATION {
        entries.extend(conn.dump(&dnat(None, None, None))?);
    } else {
        for service in services {
            entries.extend(conn.dump(&dnat(
                Some(service.family()),
                Some(service.proto),
                Some((service.addr, service.port)),
            ))?);
        }
    }
    Ok(entries)
}

/// The entries without NAT that deliver to this host (bypass candidates).
fn bypass_candidates(conn: &Conn, facts: &KnownFacts) -> Result<Vec<Entry>, Error> {
    // The kernel skips the DNATed entries itself: no message for them.
    let plain = conn.dump(&Filter {
        status: Some((0, ct_status::DST_NAT)),
        ..Filter::default()
    })?;
    Ok(plain
        .into_iter()
        .filter(|e| e.reply.src == e.orig.dst && facts.is_local(e.orig.dst))
        .collect())
}

/// A ctnetlink socket in one namespace, for several requests in a row
/// (opening one in another namespace costs a thread). Replies are matched
/// to requests by sequence number. Hold it briefly: an open socket keeps
/// its namespace alive after the namespace is deleted.
pub struct Conn {
    sock: Socket,
    seq: std::cell::Cell<u32>,
}

impl Conn {
    /// `netns` as for [`dump`].
    pub fn open(netns: Option<&Path>) -> Result<Conn, Error> {
        Ok(Conn {
            sock: open(netns)?,
            seq: std::cell::Cell::new(0),
        })
    }

    fn next_seq(&self) -> u32 {
        let seq = self.seq.get().wrapping_add(1).max(1);
        self.seq.set(seq);
        seq
    }

    /// As [`dump`].
    pub fn dump(&self, filter: &Filter) -> Result<Vec<Entry>, Error> {
        let Some(family) = filter.dump_family() else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::new();
        let (attrs, cta_filter) = dump_attributes(filter, family);
        let asked_kernel = !attrs.is_empty() || cta_filter.is_some();
        let mut keep = |e: Entry| {
            if filter.matches(&e) {
                entries.push(e);
            }
        };
        let seq = self.next_seq();
        let mut outcome = dump_on(&self.sock, seq, family, attrs, cta_filter, &mut keep)?;
        // A kernel that cannot parse a filter refuses the dump before sending
        // anything: ask again for the whole family and filter here alone.
        if asked_kernel && matches!(outcome, Outcome::Errno(libc::EINVAL | libc::EOPNOTSUPP)) {
            entries.clear();
            let mut keep = |e: Entry| {
                if filter.matches(&e) {
                    entries.push(e);
                }
            };
            let seq = self.next_seq();
            outcome = dump_on(&self.sock, seq, family, vec![], None, &mut keep)?;
        }
        match outcome {
            Outcome::Done => Ok(entries),
            Outcome::Errno(errno) => Err(refused("dump", errno)),
        }
    }

    /// What the kernel itself returns for `filter`, without the check
    /// [`Conn::dump`] makes again here: for tests of the kernel's filters.
    pub fn dump_kernel_filtered(&self, filter: &Filter) -> Result<Vec<Entry>, Error> {
        let Some(family) = filter.dump_family() else {
            return Ok(Vec::new());
        };
        let (attrs, cta_filter) = dump_attributes(filter, family);
        let mut got = Vec::new();
        let seq = self.next_seq();
        match dump_on(&self.sock, seq, family, attrs, cta_filter, &mut |e| {
            got.push(e)
        })? {
            Outcome::Done => Ok(got),
            Outcome::Errno(errno) => Err(refused("dump", errno)),
        }
    }

    /// As [`get`].
    pub fn get(&self, orig: &Tuple) -> Result<Option<Entry>, Error> {
        let mut buf = Vec::with_capacity(SMALL_RECV_BUF);
        let request =
            ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(tuple_nlas(orig))]);
        let seq = self.next_seq();
        send(&self.sock, seq, NLM_F_ACK, Some(orig.family), request, None)?;
        let mut found = None;
        match receive(&self.sock, seq, &mut buf, &mut |e| found = Some(e))? {
            Outcome::Done => Ok(found),
            Outcome::Errno(libc::ENOENT) => Ok(None),
            Outcome::Errno(errno) => Err(refused("get", errno)),
        }
    }

    /// As [`find`].
    pub fn find(&self, orig: &Tuple) -> Result<Vec<Entry>, Error> {
        self.dump(&Filter::original(orig))
    }

    /// As [`delete_entry`]. The kernel finds the entry by its reply tuple
    /// in its zone, and deletes it only if its id is the one given (ENOENT
    /// otherwise): see [`delete_request`]. An entry without an id is never
    /// deleted.
    pub fn delete_entry(&self, entry: &Entry) -> Result<bool, Error> {
        let Some(request) = delete_request(entry) else {
            return Ok(false);
        };
        let mut buf = Vec::with_capacity(SMALL_RECV_BUF);
        let seq = self.next_seq();
        send(
            &self.sock,
            seq,
            NLM_F_ACK,
            Some(entry.orig.family),
            request,
            None,
        )?;
        match receive(&self.sock, seq, &mut buf, &mut |_| {})? {
            Outcome::Done => Ok(true),
            Outcome::Errno(libc::ENOENT) => Ok(false),
            Outcome::Errno(errno) => Err(refused("delete", errno)),
        }
    }

    /// As [`delete_judged`]: finds the entries with the original tuple in
    /// every zone, keeps the one whose reply is the judged one, and deletes
    /// it by id and zone; anything else deletes nothing.
    pub fn delete_judged(&self, orig: &Tuple, reply: &Tuple) -> Result<Deletion, Error> {
        let found = self.find(orig)?;
        let (judged, others): (Vec<Entry>, Vec<Entry>) =
            found.into_iter().partition(|e| e.reply == *reply);
        match judged.len() {
            0 if others.is_empty() => Ok(Deletion::Gone),
            0 => Ok(Deletion::Replaced(others)),
            1 => {
                let entry = judged.into_iter().next().expect("one entry");
                if self.delete_entry(&entry)? {
                    Ok(Deletion::Deleted(entry))
                } else {
                    Ok(Deletion::Replaced(vec![entry]))
                }
            }
            _ => Ok(Deletion::Ambiguous(judged)),
        }
    }
}

/// The request that deletes exactly `entry`: its reply tuple, zone and
/// id. The kernel finds the entry by the reply tuple (so its reply is the
/// one given), and compares the id, a hash of the entry's address and its
/// original tuple (so its original tuple is the one given, and it is the
/// same allocation). The id alone is not enough: a new entry with the same
/// original tuple reuses a freed slot at once and then has the same id,
/// whatever its reply. `None` without an id. Never a delete without a
/// tuple: the kernel reads that as a flush of the whole table.
fn delete_request(entry: &Entry) -> Option<ConntrackMessage> {
    let id = entry.id?;
    Some(ConntrackMessage::Delete(vec![
        ConntrackAttribute::CtaTupleReply(tuple_nlas(&entry.reply)),
        ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, entry.zone.to_be_bytes().to_vec())),
        ConntrackAttribute::Other(DefaultNla::new(CTA_ID, id.to_be_bytes().to_vec())),
    ]))
}

// Netlink and ctnetlink numbers (linux/netfilter/nfnetlink_conntrack.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_STATUS_MASK: u16 = 26;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
// Which fields of CTA_TUPLE_ORIG a dump filter compares (net/netfilter/nf_internals.h).
const CTA_FILTER_F_IP_SRC: u32 = 1 << 0;
const CTA_FILTER_F_IP_DST: u32 = 1 << 1;
const CTA_FILTER_F_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_F_PROTO_SRC_PORT: u32 = 1 << 4;
const CTA_FILTER_F_PROTO_DST_PORT: u32 = 1 << 5;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// The kernel fills one dump datagram of at most 32 KiB per read; the rest
/// is headroom, and truncation is still detected.
const DUMP_RECV_BUF: usize = 1 << 20;
const SMALL_RECV_BUF: usize = 64 << 10;
/// SO_RCVBUF, best effort (capped by net.core.rmem_max). A dump refills the
/// queue only as we read, so this is headroom, not speed.
const SOCKET_RCVBUF: libc::c_int = 4 << 20;

/// How an exchange ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// NLMSG_DONE after a dump, or a positive acknowledgement.
    Done,
    /// The kernel's error, as a positive errno.
    Errno(i32),
}

fn refused(what: &'static str, errno: i32) -> Error {
    Error::Kernel {
        what,
        err: io::Error::from_raw_os_error(errno),
    }
}

fn malformed(e: DecodeError) -> Error {
    Error::Decode(e)
}

fn open(netns: Option<&Path>) -> Result<Socket, Error> {
    let Some(path) = netns else {
        return new_socket().map_err(Error::Socket);
    };
    // A socket stays in the namespace it was made in.
    netns::in_netns(path, new_socket)
        .map_err(|e| Error::Netns(path.to_path_buf(), e))?
        .map_err(Error::Socket)
}

fn new_socket() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    // Best effort: a smaller buffer only costs speed.
    let _ = sock.set_rx_buf_sz(SOCKET_RCVBUF);
    Ok(sock)
}

/// One dump request and its replies.
fn dump_on(
    sock: &Socket,
    seq: u32,
    family: Option<Family>,
    attrs: Vec<ConntrackAttribute>,
    cta_filter: Option<DefaultNla>,
    on_entry: &mut dyn FnMut(Entry),
) -> Result<Outcome, Error> {
    let request = ConntrackMessage::Get(attrs);
    send(sock, seq, NLM_F_DUMP, family, request, cta_filter.as_ref())?;
    let mut buf = Vec::with_capacity(DUMP_RECV_BUF);
    receive(sock, seq, &mut buf, on_entry)
}

fn send(
    sock: &Socket,
    seq: u32,
    flags: u16,
    family: Option<Family>,
    message: ConntrackMessage,
    nested: Option<&DefaultNla>,
) -> Result<(), Error> {
    let bytes = request_bytes(seq, flags, family, message, nested);
    sock.send(&bytes, 0).map_err(Error::Socket)?;
    Ok(())
}

/// The request's bytes. `nested` is appended after the crate's attributes:
/// `ConntrackAttribute::Other` would drop its NLA_F_NESTED flag.
fn request_bytes(
    seq: u32,
    flags: u16,
    family: Option<Family>,
    message: ConntrackMessage,
    nested: Option<&DefaultNla>,
) -> Vec<u8> {
    let family = match family {
        None => NetfilterProtoFamily::Unspec,
        Some(Family::Ipv4) => NetfilterProtoFamily::IPv4,
        Some(Family::Ipv6) => NetfilterProtoFamily::IPv6,
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let payload = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), message);
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    packet.finalize();
    let len = packet.buffer_len();
    let extra = nested.map_or(0, |n| n.buffer_len());
    let mut bytes = vec![0; len + extra];
    packet.serialize(&mut bytes[..len]);
    if let Some(nla) = nested {
        nla.emit(&mut bytes[len..]);
        // Attributes are 4-byte aligned, so the total needs no padding.
        let total = (len + extra) as u32;
        bytes[..4].copy_from_slice(&total.to_ne_bytes());
    }
    bytes
}

/// The request attributes that let the kernel skip entries itself, and
/// CTA_FILTER apart (see [`request_bytes`]).
fn dump_attributes(
    filter: &Filter,
    family: Option<Family>,
) -> (Vec<ConntrackAttribute>, Option<DefaultNla>) {
    let mut attrs = Vec::new();
    // The kernel rejects a zero mask; it matches everything or nothing, and
    // the check here settles which.
    if let Some((value, mask)) = filter.status
        && mask != 0
    {
        attrs.push(ConntrackAttribute::CtaStatus(Status::from_bits_retain(
            value,
        )));
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_STATUS_MASK,
            mask.to_be_bytes().to_vec(),
        )));
    }
    // CTA_FILTER compares tuples of one family only.
    if family.is_none() {
        return (attrs, None);
    }
    let mut flags = 0;
    let mut tuple = Vec::new();
    // IPv4 only: the kernel's IPv6 address comparison in dump filters is
    // inverted (it skips the entries that match).
    let mut ips = Vec::new();
    if let Some((addr @ IpAddr::V4(_), _)) = filter.orig_src {
        flags |= CTA_FILTER_F_IP_SRC;
        ips.push(IPTuple::SourceAddress(addr));
    }
    if let Some((addr @ IpAddr::V4(_), _)) = filter.orig_dst {
        flags |= CTA_FILTER_F_IP_DST;
        ips.push(IPTuple::DestinationAddress(addr));
    }
    if !ips.is_empty() {
        tuple.push(NlTuple::Ip(ips));
    }
    // Ports need the protocol: the kernel refuses a port filter without one.
    if let Some(proto) = filter.proto {
        flags |= CTA_FILTER_F_PROTO_NUM;
        let mut nlas = vec![ProtoTuple::Protocol(Protocol::from(proto.0))];
        if proto.has_ports() {
            if let Some((_, port)) = filter.orig_src {
                flags |= CTA_FILTER_F_PROTO_SRC_PORT;
                nlas.push(ProtoTuple::SourcePort(port));
            }
            if let Some((_, port)) = filter.orig_dst {
                flags |= CTA_FILTER_F_PROTO_DST_PORT;
                nlas.push(ProtoTuple::DestinationPort(port));
            }
        }
        tuple.push(NlTuple::Proto(nlas));
    }
    if flags == 0 {
        return (attrs, None);
    }
    attrs.push(ConntrackAttribute::CtaTupleOrig(tuple));
    let orig_flags = DefaultNla::new(CTA_FILTER_ORIG_FLAGS, flags.to_ne_bytes().to_vec());
    let mut value = vec![0; orig_flags.buffer_len()];
    orig_flags.emit(&mut value);
    // The kernel parses CTA_FILTER strictly: without NLA_F_NESTED it
    // refuses the dump.
    (
        attrs,
        Some(DefaultNla::new(CTA_FILTER | NLA_F_NESTED, value)),
    )
}

/// A tuple as ctnetlink takes it in requests.
fn tuple_nlas(t: &Tuple) -> Vec<NlTuple> {
    let be16 = |kind, v: u16| ProtoTuple::Other(DefaultNla::new(kind, v.to_be_bytes().to_vec()));
    let byte = |kind, v: u16| ProtoTuple::Other(DefaultNla::new(kind, vec![v as u8]));
    let mut proto = vec![ProtoTuple::Protocol(Protocol::from(t.proto.0))];
    match t.proto.0 {
        IPPROTO_ICMP => proto.extend([
            be16(CTA_PROTO_ICMP_ID, t.sport),
            byte(CTA_PROTO_ICMP_TYPE, t.dport >> 8),
            byte(CTA_PROTO_ICMP_CODE, t.dport & 0xff),
        ]),
        IPPROTO_ICMPV6 => proto.extend([
            be16(CTA_PROTO_ICMPV6_ID, t.sport),
            byte(CTA_PROTO_ICMPV6_TYPE, t.dport >> 8),
            byte(CTA_PROTO_ICMPV6_CODE, t.dport & 0xff),
        ]),
        _ => proto.extend([
            ProtoTuple::SourcePort(t.sport),
            ProtoTuple::DestinationPort(t.dport),
        ]),
    }
    vec![
        NlTuple::Ip(vec![
            IPTuple::SourceAddress(t.src),
            IPTuple::DestinationAddress(t.dst),
        ]),
        NlTuple::Proto(proto),
    ]
}

/// Reads replies to request `seq` until the kernel ends the exchange,
/// handing each entry to `on_entry`.
fn receive(
    sock: &Socket,
    seq: u32,
    buf: &mut Vec<u8>,
    on_entry: &mut dyn FnMut(Entry),
) -> Result<Outcome, Error> {
    loop {
        buf.clear();
        let len = match sock.recv(buf, libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Socket(e)),
        };
        // With MSG_TRUNC the datagram's real size comes back.
        if len > buf.len() {
            return Err(Error::Malformed(format!(
                "a {len} byte datagram does not fit the {} byte buffer",
                buf.capacity()
            )));
        }
        if let Some(outcome) = parse_datagram(&buf[..len], seq, on_entry)? {
            return Ok(outcome);
        }
    }
}

/// Walks the netlink messages of one datagram. `Some` when the exchange
/// ended in it.
fn parse_datagram(
    mut rest: &[u8],
    seq: u32,
    on_entry: &mut dyn FnMut(Entry),
) -> Result<Option<Outcome>, Error> {
    while !rest.is_empty() {
        let msg = NetlinkBuffer::new_checked(rest).map_err(malformed)?;
        let len = msg.length() as usize;
        // Anything but ours (nothing else should arrive on this socket) is skipped.
        if msg.sequence_number() == seq {
            let payload = msg.payload();
            match msg.message_type() {
                NLMSG_DONE => return Ok(Some(done_outcome(payload)?)),
                NLMSG_ERROR => {
                    let err = ErrorBuffer::new_checked(payload).map_err(malformed)?;
                    return Ok(Some(match err.code() {
                        None => Outcome::Done,
                        Some(code) => Outcome::Errno(code.get().saturating_abs()),
                    }));
                }
                t if t >> 8 == NFNL_SUBSYS_CTNETLINK
                    && matches!(t & 0xff, IPCTNL_MSG_CT_NEW | IPCTNL_MSG_CT_GET) =>
                {
                    if let Some(entry) = parse_entry(payload)? {
                        on_entry(entry);
                    }
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned; the last one may lack its padding.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(None)
}

fn done_outcome(payload: &[u8]) -> Result<Outcome, Error> {
    // NLMSG_DONE carries the dump's status, and may be empty.
    let code = match payload.get(..4) {
        Some(code) => parse_i32(code).map_err(malformed)?,
        None => 0,
    };
    Ok(if code < 0 {
        Outcome::Errno(code.saturating_abs())
    } else {
        Outcome::Done
    })
}

/// One IPCTNL_MSG_CT_NEW/GET payload: nfgenmsg, then attributes. `None` for
/// a family other than IPv4 and IPv6.
fn parse_entry(payload: &[u8]) -> Result<Option<Entry>, Error> {
    let Some((&[l3, ..], attrs)) = payload.split_first_chunk::<4>() else {
        return Err(Error::Malformed(format!(
            "a conntrack message of {} bytes has no nfgenmsg header",
            payload.len()
        )));
    };
    let family = match l3 {
        AF_INET => Family::Ipv4,
        AF_INET6 => Family::Ipv6,
        _ => return Ok(None),
    };
    let (mut orig, mut reply, mut status, mut timeout, mut id) = (None, None, None, None, None);
    let mut zone = 0;
    for nla in Nlas(attrs) {
        let (kind, value) = nla?;
        match kind {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(value, family)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(value, family)?),
            CTA_STATUS => status = Some(u32::from_be_bytes(fixed(value, "CTA_STATUS")?)),
            CTA_TIMEOUT => timeout = Some(u32::from_be_bytes(fixed(value, "CTA_TIMEOUT")?)),
            CTA_ID => id = Some(u32::from_be_bytes(fixed(value, "CTA_ID")?)),
            CTA_ZONE => zone = u16::from_be_bytes(fixed(value, "CTA_ZONE")?),
            _ => {}
        }
    }
    match (orig, reply, status) {
        (Some(orig), Some(reply), Some(status)) => Ok(Some(Entry {
            orig,
            reply,
            status,
            timeout,
            id,
            zone,
        })),
        _ => Err(Error::Malformed(
            "a conntrack entry lacks its original tuple, reply tuple or status".into(),
        )),
    }
}

/// A nested CTA_TUPLE_* attribute of an entry of `family`.
fn parse_tuple(buf: &[u8], family: Family) -> Result<Tuple, Error> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport) = (0u16, 0u16);
    for nla in Nlas(buf) {
        match nla? {
            (CTA_TUPLE_IP, ips) => {
                for ip in Nlas(ips) {
                    match ip? {
                        (CTA_IP_V4_SRC | CTA_IP_V6_SRC, v) => src = Some(parse_addr(v, family)?),
                        (CTA_IP_V4_DST | CTA_IP_V6_DST, v) => dst = Some(parse_addr(v, family)?),
                        _ => {}
                    }
                }
            }
            (CTA_TUPLE_PROTO, protos) => {
                for p in Nlas(protos) {
                    let (kind, v) = p?;
                    match kind {
                        CTA_PROTO_NUM => proto = Some(fixed::<1>(v, "CTA_PROTO_NUM")?[0]),
                        CTA_PROTO_SRC_PORT | CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                            sport = u16::from_be_bytes(fixed(v, "source port")?);
                        }
                        CTA_PROTO_DST_PORT => {
                            dport = u16::from_be_bytes(fixed(v, "CTA_PROTO_DST_PORT")?);
                        }
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                            let [ty] = fixed(v, "ICMP type")?;
                            dport = (dport & 0x00ff) | u16::from(ty) << 8;
                        }
                        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                            let [code] = fixed(v, "ICMP code")?;
                            dport = (dport & 0xff00) | u16::from(code);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    match (src, dst, proto) {
        (Some(src), Some(dst), Some(proto)) => Ok(Tuple {
            family,
            proto: Proto(proto),
            src,
            sport,
            dst,
            dport,
        }),
        _ => Err(Error::Malformed(
            "a conntrack tuple lacks its source, destination or protocol".into(),
        )),
    }
}

/// The attributes of one nest as `(kind, value)`, borrowed and
/// bounds-checked. This is the hot loop of a dump, a few plain byte reads
/// per attribute (`NlasIterator` costs several times more here).
struct Nlas<'a>(&'a [u8]);

impl<'a> Iterator for Nlas<'a> {
    type Item = Result<(u16, &'a [u8]), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.0);
        let Some(&[l0, l1, k0, k1]) = rest.first_chunk::<4>() else {
            return Some(Err(Error::Malformed(format!(
                "{} bytes left where an attribute header should be",
                rest.len()
            ))));
        };
        let len = usize::from(u16::from_ne_bytes([l0, l1]));
        if len < 4 || len > rest.len() {
            return Some(Err(Error::Malformed(format!(
                "an attribute of {len} bytes in {} bytes",
                rest.len()
            ))));
        }
        // Attributes are 4-byte aligned; the last may lack its padding.
        self.0 = &rest[len.next_multiple_of(4).min(rest.len())..];
        let kind = u16::from_ne_bytes([k0, k1]) & NLA_TYPE_MASK;
        Some(Ok((kind, &rest[4..len])))
    }
}

/// An attribute value of exactly `N` bytes.
fn fixed<const N: usize>(value: &[u8], what: &str) -> Result<[u8; N], Error> {
    value
        .try_into()
        .map_err(|_| Error::Malformed(format!("{what} has {} bytes instead of {N}", value.len())))
}

fn parse_addr(value: &[u8], family: Family) -> Result<IpAddr, Error> {
    let addr = match family {
        Family::Ipv4 => <[u8; 4]>::try_from(value).map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        Family::Ipv6 => <[u8; 16]>::try_from(value).map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    };
    addr.map_err(|_| {
        Error::Malformed(format!(
            "a {} byte address in an {family:?} conntrack tuple",
            value.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NLM_F_MULTIPART, NlasIterator};

    use super::*;
    use crate::domain::udp;

    fn dnat_entry() -> Entry {
        Entry {
            orig: udp("192.0.2.2", 40000, "192.0.2.1", 8888),
            reply: udp("172.17.0.2", 8888, "192.0.2.2", 40000),
            status: ct_status::CONFIRMED | ct_status::DST_NAT | ct_status::DST_NAT_DONE,
            timeout: Some(29),
            id: Some(0xdead_beef),
            zone: 0,
        }
    }

    /// An entry as the kernel sends it, emitted by netlink-packet-netfilter,
    /// with attributes this module skips.
    fn entry_message(seq: u32, e: &Entry) -> Vec<u8> {
        let counters = {
            let packets = DefaultNla::new(1, 7u64.to_be_bytes().to_vec());
            let mut b = vec![0; packets.buffer_len()];
            packets.emit(&mut b);
            b
        };
        let mut attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple_nlas(&e.orig)),
            ConntrackAttribute::CtaTupleReply(tuple_nlas(&e.reply)),
            ConntrackAttribute::Other(DefaultNla::new(9 | NLA_F_NESTED, counters)),
            ConntrackAttribute::CtaStatus(Status::from_bits_retain(e.status)),
            ConntrackAttribute::CtaMark(0),
            ConntrackAttribute::Other(DefaultNla::new(11, 1u32.to_be_bytes().to_vec())),
        ];
        attrs.extend(e.timeout.map(ConntrackAttribute::CtaTimeout));
        attrs.extend(e.id.map(|id| {
            ConntrackAttribute::Other(DefaultNla::new(CTA_ID, id.to_be_bytes().to_vec()))
        }));
        if e.zone != 0 {
            attrs.push(ConntrackAttribute::Other(DefaultNla::new(
                CTA_ZONE,
                e.zone.to_be_bytes().to_vec(),
            )));
        }
        let mut bytes = request_bytes(
            seq,
            0,
            Some(e.orig.family),
            ConntrackMessage::New(attrs),
            None,
        );
        // As the kernel sends it: a multipart reply, not a request.
        bytes[6..8].copy_from_slice(&NLM_F_MULTIPART.to_ne_bytes());
        bytes
    }

    fn control_message(seq: u32, kind: u16, code: i32) -> Vec<u8> {
        let mut m = Vec::new();
        let len: u32 = if kind == NLMSG_ERROR { 36 } else { 20 };
        m.extend(len.to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend(NLM_F_MULTIPART.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(code.to_ne_bytes());
        m.resize(len as usize, 0);
        m
    }

    fn parse_all(datagram: &[u8], seq: u32) -> Result<(Vec<Entry>, Option<Outcome>), Error> {
        let mut entries = Vec::new();
        let outcome = parse_datagram(datagram, seq, &mut |e| entries.push(e))?;
        Ok((entries, outcome))
    }

    #[test]
    fn parses_an_entry_emitted_by_netlink_packet_netfilter() {
        let e = dnat_entry();
        let (entries, outcome) = parse_all(&entry_message(5, &e), 5).unwrap();
        assert_eq!(entries, vec![e]);
        assert_eq!(outcome, None);
    }

    #[test]
    fn parses_ipv6_and_icmp_tuples() {
        let mut v6 = dnat_entry();
        v6.orig = udp("2001:db8::2", 5353, "2001:db8::1", 53);
        v6.reply = udp("2001:db8:1::10", 53, "2001:db8::2", 5353);
        v6.timeout = None;
        v6.id = None;
        let mut icmp = dnat_entry();
        // Echo request id 0x1234: type 8, code 0; the reply is type 0.
        icmp.orig = Tuple {
            proto: Proto(IPPROTO_ICMP),
            ..udp("192.0.2.2", 0x1234, "192.0.2.1", 8 << 8)
        };
        icmp.reply = Tuple {
            proto: Proto(IPPROTO_ICMP),
            ..udp("192.0.2.1", 0x1234, "192.0.2.2", 0)
        };
        let mut icmp6 = v6.clone();
        icmp6.orig = Tuple {
            proto: Proto(IPPROTO_ICMPV6),
            ..udp("2001:db8::2", 7, "2001:db8::1", 128 << 8)
        };
        icmp6.reply = Tuple {
            proto: Proto(IPPROTO_ICMPV6),
            ..udp("2001:db8::1", 7, "2001:db8::2", 129 << 8)
        };
        let mut datagram = Vec::new();
        for e in [&v6, &icmp, &icmp6] {
            datagram.extend(entry_message(1, e));
        }
        let (entries, _) = parse_all(&datagram, 1).unwrap();
        assert_eq!(entries, vec![v6, icmp, icmp6]);
    }

    #[test]
    fn a_dump_ends_at_done_and_skips_other_requests() {
        let e = dnat_entry();
        let mut datagram = entry_message(3, &e);
        datagram.extend(entry_message(4, &e));
        datagram.extend(entry_message(3, &e));
        datagram.extend(control_message(3, NLMSG_DONE, 0));
        let (entries, outcome) = parse_all(&datagram, 3).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(outcome, Some(Outcome::Done));
    }

    #[test]
    fn errors_and_acks_end_an_exchange() {
        let parse = |m: Vec<u8>| parse_all(&m, 9).unwrap().1;
        assert_eq!(
            parse(control_message(9, NLMSG_ERROR, -libc::ENOENT)),
            Some(Outcome::Errno(libc::ENOENT))
        );
        assert_eq!(
            parse(control_message(9, NLMSG_ERROR, 0)),
            Some(Outcome::Done)
        );
        assert_eq!(
            parse(control_message(9, NLMSG_DONE, -libc::EINTR)),
            Some(Outcome::Errno(libc::EINTR))
        );
        assert_eq!(
            parse(control_message(9, NLMSG_ERROR, i32::MIN)),
            Some(Outcome::Errno(i32::MAX))
        );
        // NLMSG_DONE without a status.
        let mut empty_done = control_message(9, NLMSG_DONE, 0);
        empty_done.truncate(16);
        empty_done[0..4].copy_from_slice(&16u32.to_ne_bytes());
        assert_eq!(parse(empty_done), Some(Outcome::Done));
    }

    #[test]
    fn damaged_messages_are_errors_not_panics() {
        let mut datagram = entry_message(1, &dnat_entry());
        datagram.extend(control_message(1, NLMSG_DONE, 0));
        for cut in 0..datagram.len() {
            let _ = parse_all(&datagram[..cut], 1);
        }
        for at in 0..datagram.len() {
            for byte in [0x00, 0x01, 0x03, 0x7f, 0xff] {
                let mut bad = datagram.clone();
                bad[at] = byte;
                let _ = parse_all(&bad, 1);
            }
        }
        // A cut inside the last attribute is reported, not skipped.
        let mut cut = entry_message(1, &dnat_entry());
        let new_len = cut.len() as u32 - 6;
        cut.truncate(new_len as usize);
        cut[0..4].copy_from_slice(&new_len.to_ne_bytes());
        assert!(parse_all(&cut, 1).is_err());
    }

    #[test]
    fn an_entry_without_status_or_with_a_short_address_is_an_error() {
        let e = dnat_entry();
        let no_status = vec![
            ConntrackAttribute::CtaTupleOrig(tuple_nlas(&e.orig)),
            ConntrackAttribute::CtaTupleReply(tuple_nlas(&e.reply)),
        ];
        let m = request_bytes(
            1,
            0,
            Some(Family::Ipv4),
            ConntrackMessage::New(no_status),
            None,
        );
        assert!(matches!(parse_all(&m, 1), Err(Error::Malformed(_))));
        // An IPv6 tuple in an IPv4 message.
        let mut mixed = e.clone();
        mixed.orig = udp("2001:db8::2", 1, "2001:db8::1", 2);
        let mut m = entry_message(1, &mixed);
        m[16] = AF_INET;
        assert!(matches!(parse_all(&m, 1), Err(Error::Malformed(_))));
    }

    #[test]
    fn other_families_are_skipped() {
        let mut m = entry_message(1, &dnat_entry());
        m[16] = 7; // NFPROTO_BRIDGE
        assert_eq!(parse_all(&m, 1).unwrap().0, vec![]);
    }

    #[test]
    fn filter_matches_every_field() {
        let e = dnat_entry();
        let dst = (e.orig.dst, e.orig.dport);
        let yes = [
            Filter::default(),
            Filter {
                family: Some(Family::Ipv4),
                proto: Some(Proto::UDP),
                status: Some((ct_status::DST_NAT, ct_status::DST_NAT)),
                orig_dst: Some(dst),
                orig_src: Some((e.orig.src, e.orig.sport)),
            },
            Filter {
                status: Some((0, ct_status::SEEN_REPLY)),
                ..Filter::default()
            },
        ];
        let no = [
            Filter {
                family: Some(Family::Ipv6),
                ..Filter::default()
            },
            Filter {
                proto: Some(Proto::TCP),
                ..Filter::default()
            },
            Filter {
                status: Some((ct_status::SEEN_REPLY, ct_status::SEEN_REPLY)),
                ..Filter::default()
            },
            Filter {
                orig_dst: Some((dst.0, dst.1 + 1)),
                ..Filter::default()
            },
            Filter {
                orig_dst: Some((e.reply.src, dst.1)),
                ..Filter::default()
            },
            Filter {
                orig_src: Some((e.orig.src, e.orig.sport + 1)),
                ..Filter::default()
            },
        ];
        for f in yes {
            assert!(f.matches(&e), "{f:?}");
        }
        for f in no {
            assert!(!f.matches(&e), "{f:?}");
        }
    }

    /// The top-level attributes of a request, as (kind with flags, value).
    fn request_attrs(bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let msg = NetlinkBuffer::new_checked(bytes).unwrap();
        NlasIterator::new(&msg.payload()[4..])
            .map(|nla| {
                let nla = nla.unwrap();
                let flags = if nla.nested_flag() { NLA_F_NESTED } else { 0 };
                (nla.kind() | flags, nla.value().to_vec())
            })
            .collect()
    }

    fn dump_request(filter: &Filter) -> Vec<u8> {
        let family = filter.dump_family().unwrap();
        let (attrs, cta_filter) = dump_attributes(filter, family);
        let request = ConntrackMessage::Get(attrs);
        request_bytes(1, NLM_F_DUMP, family, request, cta_filter.as_ref())
    }

    #[test]
    fn the_kernel_filters_status_family_proto_and_ipv4_destination() {
        let filter = Filter {
            family: None,
            proto: Some(Proto::UDP),
            status: Some((
                ct_status::DST_NAT,
                ct_status::DST_NAT | ct_status::SEEN_REPLY,
            )),
            orig_dst: Some(("192.0.2.1".parse().unwrap(), 8888)),
            orig_src: None,
        };
        let bytes = dump_request(&filter);
        // nfgen_family comes from the destination address.
        assert_eq!(bytes[16], AF_INET);
        let attrs = request_attrs(&bytes);
        let kinds: Vec<u16> = attrs.iter().map(|a| a.0).collect();
        assert_eq!(
            kinds,
            [
                CTA_STATUS,
                CTA_STATUS_MASK,
                CTA_TUPLE_ORIG | NLA_F_NESTED,
                CTA_FILTER | NLA_F_NESTED
            ]
        );
        assert_eq!(attrs[0].1, ct_status::DST_NAT.to_be_bytes());
        assert_eq!(
            attrs[1].1,
            (ct_status::DST_NAT | ct_status::SEEN_REPLY).to_be_bytes()
        );
        let flags = CTA_FILTER_F_IP_DST | CTA_FILTER_F_PROTO_NUM | CTA_FILTER_F_PROTO_DST_PORT;
        let mut nested = vec![8, 0, 1, 0];
        nested.extend(flags.to_ne_bytes());
        assert_eq!(attrs[3].1, nested);
        // The filter tuple parses back to what it asks for.
        let mut ip = Vec::new();
        let mut proto = Vec::new();
        for nla in NlasIterator::new(&attrs[2].1[..]) {
            let nla = nla.unwrap();
            for inner in NlasIterator::new(nla.value()) {
                let inner = inner.unwrap();
                let v = (inner.kind(), inner.value().to_vec());
                match nla.kind() {
                    CTA_TUPLE_IP => ip.push(v),
                    _ => proto.push(v),
                }
            }
        }
        assert_eq!(ip, [(CTA_IP_V4_DST, vec![192, 0, 2, 1])]);
        assert_eq!(
            proto,
            [
                (CTA_PROTO_NUM, vec![17]),
                (CTA_PROTO_DST_PORT, 8888u16.to_be_bytes().to_vec())
            ]
        );
    }

    #[test]
    fn kernel_filters_are_left_out_where_the_kernel_would_get_them_wrong() {
        // IPv6 addresses: the kernel's comparison is inverted. Ports without
        // a protocol: refused.
        let f = Filter {
            orig_dst: Some(("2001:db8::1".parse().unwrap(), 53)),
            ..Filter::default()
        };
        assert_eq!(dump_request(&f)[16], AF_INET6);
        assert_eq!(request_attrs(&dump_request(&f)), []);
        // A zero status mask: refused.
        let f = Filter {
            status: Some((0, 0)),
            ..Filter::default()
        };
        assert_eq!(request_attrs(&dump_request(&f)), []);
        // A protocol without a family: CTA_FILTER needs one.
        let f = Filter {
            proto: Some(Proto::TCP),
            ..Filter::default()
        };
        assert_eq!(dump_request(&f)[16], 0);
        assert_eq!(request_attrs(&dump_request(&f)), []);
        // A family that contradicts the address matches nothing.
        let f = Filter {
            family: Some(Family::Ipv6),
            orig_dst: Some(("192.0.2.1".parse().unwrap(), 53)),
            ..Filter::default()
        };
        assert_eq!(f.dump_family(), None);
    }

    #[test]
    fn a_delete_names_the_entry_by_tuple_zone_and_id() {
        let mut e = dnat_entry();
        e.zone = 7;
        let m = delete_request(&e).unwrap();
        let bytes = request_bytes(1, NLM_F_ACK, Some(e.orig.family), m, None);
        let msg = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(msg.message_type(), NFNL_SUBSYS_CTNETLINK << 8 | 2);
        assert_eq!(msg.flags(), NLM_F_REQUEST | NLM_F_ACK);
        let attrs = request_attrs(&bytes);
        let kinds: Vec<u16> = attrs.iter().map(|a| a.0).collect();
        assert_eq!(kinds, [CTA_TUPLE_REPLY | NLA_F_NESTED, CTA_ZONE, CTA_ID]);
        assert_eq!(parse_tuple(&attrs[0].1, Family::Ipv4).unwrap(), e.reply);
        assert_eq!(attrs[1].1, 7u16.to_be_bytes());
        assert_eq!(attrs[2].1, 0xdead_beefu32.to_be_bytes());
        // Without an id there is nothing exact to ask for.
        e.id = None;
        assert!(delete_request(&e).is_none());
    }

    #[test]
    fn zones_are_parsed_from_dumps() {
        let mut e = dnat_entry();
        e.zone = 0x1234;
        let (entries, _) = parse_all(&entry_message(2, &e), 2).unwrap();
        assert_eq!(entries, vec![e]);
    }

    #[test]
    fn a_look_up_of_an_original_tuple_filters_on_all_of_it() {
        let t = udp("192.0.2.2", 40000, "192.0.2.1", 8888);
        let attrs = request_attrs(&dump_request(&Filter::original(&t)));
        let flags = CTA_FILTER_F_IP_SRC
            | CTA_FILTER_F_IP_DST
            | CTA_FILTER_F_PROTO_NUM
            | CTA_FILTER_F_PROTO_SRC_PORT
            | CTA_FILTER_F_PROTO_DST_PORT;
        let filter = attrs.last().unwrap();
        assert_eq!(filter.0, CTA_FILTER | NLA_F_NESTED);
        assert_eq!(filter.1[4..8], flags.to_ne_bytes());
        // IPv6: ports only, addresses are compared here.
        let t6 = udp("2001:db8::2", 40000, "2001:db8::1", 8888);
        let attrs = request_attrs(&dump_request(&Filter::original(&t6)));
        let flags =
            CTA_FILTER_F_PROTO_NUM | CTA_FILTER_F_PROTO_SRC_PORT | CTA_FILTER_F_PROTO_DST_PORT;
        assert_eq!(attrs.last().unwrap().1[4..8], flags.to_ne_bytes());
        let mut other = dnat_entry();
        other.orig = udp("2001:db8::3", 40000, "2001:db8::1", 8888);
        assert!(!Filter::original(&t6).matches(&other));
        other.orig = t6;
        assert!(Filter::original(&t6).matches(&other));
    }

    #[test]
    fn errors_read_as_one_line() {
        let errors = [
            Error::Netns(
                "/run/netns/x".into(),
                io::Error::from_raw_os_error(libc::ENOENT),
            ),
            Error::Socket(io::Error::from_raw_os_error(libc::EPERM)),
            refused("dump", libc::EPERM),
            Error::Malformed("x".into()),
            malformed(DecodeError::from("x")),
        ];
        for e in errors {
            let line = e.to_string();
            assert!(!line.contains('\n'), "{line}");
        }
        assert_eq!(
            refused("delete", libc::EPERM).to_string(),
            "conntrack delete refused by the kernel: Operation not permitted (os error 1) (needs CAP_NET_ADMIN)"
        );
    }
}
