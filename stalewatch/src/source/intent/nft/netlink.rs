//! nf_tables' own announcements of ruleset changes (`NFNLGRP_NFTABLES`),
//! decoded: each table, chain, rule, set and set element made or deleted
//! in a committed transaction, rules with their expressions read back
//! into the statements `nft -j` would list (the subset that can lead to
//! a DNAT: payload and meta loads, comparisons, prefixes, ranges, set and
//! map lookups, verdicts, `numgen`, `fib`, `dnat` and `redirect`). What
//! it cannot read back is said (`None`), and the reader then lists the
//! ruleset whole: a ruleset of thousands of services is followed change
//! by change at about a microsecond each, not listed again per change.
//!
//! Constants from include/uapi/linux/netfilter/nf_tables.h and
//! nfnetlink.h.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use nftables::{
    expr::{
        Expression, Fib, FibFlag, FibResult, Map, Meta, MetaKey, NamedExpression, NgMode, Numgen,
        Payload, PayloadField, Prefix, Range, SetItem, Verdict,
    },
    stmt::{JumpTarget, Match, NAT, NATFamily, Operator, Statement, VerdictMap},
    types::NfFamily,
};
use smallvec::SmallVec;

use crate::domain::{AddrSpan, Cond, Conditions, Family, NatTarget, PortSpan, Proto};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLM_F_APPEND: u16 = 0x800;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_DESTROYTABLE: u16 = 26;
const NFT_MSG_DESTROYCHAIN: u16 = 27;
const NFT_MSG_DESTROYRULE: u16 = 28;
const NFT_MSG_DESTROYSET: u16 = 29;
const NFT_MSG_DESTROYSETELEM: u16 = 30;

/// `NFT_SET_*` flags.
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
/// `NFT_DATA_VERDICT`: a verdict map's data type.
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// nftables datatype numbers (nftables' include/datatype.h), as
/// `NFTA_SET_KEY_TYPE` carries them, 6 bits each in a concatenation.
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_MARK: u32 = 19;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_BITS: u32 = 6;

/// An object of a table: its family and table, and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Object<'a> {
    pub family: NfFamily,
    pub table: &'a str,
    pub name: &'a str,
}

/// A set as nf_tables announces it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetShape {
    /// The key's fields, in order (datatype numbers).
    pub key: Vec<u32>,
    pub key_len: u32,
    /// A map's data: `NFT_DATA_VERDICT` or datatype numbers.
    pub data: Option<Vec<u32>>,
    pub data_len: u32,
    pub anonymous: bool,
    pub interval: bool,
}

impl SetShape {
    /// The shape of a set `nft -j` listed, from its `type` (one name or
    /// a concatenation's) and `map` (a map's data type). `None` when a
    /// field's type is not one the element reader knows.
    pub fn from_names(key: &[&str], map: Option<&[&str]>, interval: bool) -> Option<SetShape> {
        let ids = |names: &[&str]| -> Option<Vec<u32>> {
            names
                .iter()
                .map(|n| match *n {
                    "ipv4_addr" => Some(TYPE_IPADDR),
                    "ipv6_addr" => Some(TYPE_IP6ADDR),
                    "inet_proto" => Some(TYPE_INET_PROTOCOL),
                    "inet_service" => Some(TYPE_INET_SERVICE),
                    "mark" => Some(TYPE_MARK),
                    "integer" => Some(TYPE_INTEGER),
                    "verdict" => Some(NFT_DATA_VERDICT),
                    _ => None,
                })
                .collect()
        };
        let key = ids(key)?;
        let data = match map {
            Some(m) => Some(ids(m)?),
            None => None,
        };
        let len = |ids: &[u32]| -> Option<u32> {
            if ids.len() == 1 {
                return field_len(ids[0]).or(Some(4));
            }
            ids.iter()
                .map(|&t| field_len(t).map(|l| l.next_multiple_of(4)))
                .sum()
        };
        Some(SetShape {
            key_len: len(&key)?,
            data_len: match &data {
                Some(d) if d.as_slice() != [NFT_DATA_VERDICT] => len(d)?,
                _ => 0,
            },
            key,
            data,
            anonymous: false,
            interval,
        })
    }

    fn is_map(&self) -> bool {
        self.data.is_some()
    }
}

/// The size of one field of a datatype, when fixed.
fn field_len(t: u32) -> Option<u32> {
    match t {
        TYPE_IPADDR | TYPE_MARK => Some(4),
        TYPE_IP6ADDR => Some(16),
        TYPE_INET_PROTOCOL => Some(1),
        TYPE_INET_SERVICE => Some(2),
        _ => None,
    }
}

/// One announced change, read in place from the received buffer.
#[derive(Debug)]
pub enum Announcement<'a> {
    Table {
        family: NfFamily,
        name: &'a str,
        gone: bool,
    },
    Chain {
        chain: Object<'a>,
        /// A NAT base chain at prerouting or output.
        nat_base: bool,
        gone: bool,
    },
    Rule {
        chain: Object<'a>,
        handle: u64,
        /// The rule it follows, when neither first nor last.
        after: Option<u64>,
        append: bool,
        gone: bool,
        /// `NFTA_RULE_EXPRESSIONS`, read by [`statements`] when needed.
        exprs: &'a [u8],
    },
    Set {
        set: Object<'a>,
        shape: SetShape,
        gone: bool,
    },
    Elements {
        set: Object<'a>,
        /// `NFTA_SET_ELEM_LIST_ELEMENTS`, read by [`elements`].
        elements: &'a [u8],
        gone: bool,
    },
    /// The end of a transaction.
    Generation,
}

/// A set element, not yet read.
#[derive(Debug, Clone)]
pub struct RawElement<'a> {
    pub key: &'a [u8],
    pub data: Option<Data<'a>>,
}

/// A value or a verdict (`NFTA_DATA_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data<'a> {
    Value(&'a [u8]),
    Verdict { code: i32, chain: Option<&'a str> },
}

/// The netlink attributes in `buf`: (type, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// The attributes of `buf` of types below `N`, by type (the first of
/// each, as [`attr`] finds it), read in one pass: a message or an
/// expression asks for several.
fn attr_table<const N: usize>(buf: &[u8]) -> [Option<&[u8]>; N] {
    let mut table = [None; N];
    for (k, p) in attrs(buf) {
        if let Some(slot @ None) = table.get_mut(usize::from(k)) {
            *slot = Some(p);
        }
    }
    table
}

/// A NUL-terminated name's bytes, without the NUL.
fn name_bytes(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn be64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn string(b: &[u8]) -> &str {
    std::str::from_utf8(name_bytes(b)).unwrap_or("")
}

fn family(f: u8) -> Option<NfFamily> {
    Some(match f {
        1 => NfFamily::INet,
        2 => NfFamily::IP,
        3 => NfFamily::ARP,
        5 => NfFamily::NetDev,
        7 => NfFamily::Bridge,
        10 => NfFamily::IP6,
        _ => return None,
    })
}

/// `NFTA_DATA_VALUE` or `NFTA_DATA_VERDICT` in a nest.
fn data(nest: &[u8]) -> Option<Data<'_>> {
    for (k, p) in attrs(nest) {
        match k {
            1 => return Some(Data::Value(p)),
            2 => {
                let code = be32(attr(p, 1)?)? as i32;
                let chain = attr(p, 2).map(string);
                return Some(Data::Verdict { code, chain });
            }
            _ => {}
        }
    }
    None
}

/// The announcements in one received buffer, each given to `each`;
/// messages of other kinds are skipped.
pub fn decode<'a>(mut buf: &'a [u8], mut each: impl FnMut(Announcement<'a>)) {
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap_or_default()) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let flags = u16::from_ne_bytes([buf[6], buf[7]]);
        let msg = &buf[NLMSG_HDRLEN..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        if kind >> 8 != NFNL_SUBSYS_NFTABLES || msg.len() < NFGENMSG_LEN {
            continue;
        }
        if let Some(a) = message(kind & 0xff, flags, msg) {
            each(a);
        }
    }
}

fn message(kind: u16, flags: u16, msg: &[u8]) -> Option<Announcement<'_>> {
    if kind == NFT_MSG_NEWGEN {
        return Some(Announcement::Generation);
    }
    let family = family(msg[0])?;
    let a = attr_table::<8>(&msg[NFGENMSG_LEN..]);
    let at = |k: u16| a.get(usize::from(k)).copied().flatten();
    let text = |k: u16| at(k).map(string).unwrap_or("");
    let object = |table: u16, name: u16| Object {
        family,
        table: text(table),
        name: text(name),
    };
    Some(match kind {
        NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE | NFT_MSG_DESTROYTABLE => Announcement::Table {
            family,
            name: text(1),
            gone: kind != NFT_MSG_NEWTABLE,
        },
        NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN | NFT_MSG_DESTROYCHAIN => {
            let hook = at(4).and_then(|h| attr(h, 1)).and_then(be32);
            Announcement::Chain {
                chain: object(1, 3),
                // NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT
                nat_base: text(7) == "nat" && matches!(hook, Some(0 | 3)),
                gone: kind != NFT_MSG_NEWCHAIN,
            }
        }
        NFT_MSG_NEWRULE | NFT_MSG_DELRULE | NFT_MSG_DESTROYRULE => Announcement::Rule {
            chain: object(1, 2),
            handle: at(3).and_then(be64)?,
            after: at(6).and_then(be64),
            append: flags & NLM_F_APPEND != 0,
            gone: kind != NFT_MSG_NEWRULE,
            exprs: at(4).unwrap_or_default(),
        },
        NFT_MSG_NEWSET | NFT_MSG_DELSET | NFT_MSG_DESTROYSET => {
            let set_flags = at(3).and_then(be32).unwrap_or(0);
            let number = |k: u16| at(k).and_then(be32).unwrap_or(0);
            let data = (set_flags & NFT_SET_MAP != 0).then(|| match number(6) {
                NFT_DATA_VERDICT => vec![NFT_DATA_VERDICT],
                t => split_type(t),
            });
            Announcement::Set {
                set: object(1, 2),
                shape: SetShape {
                    key: split_type(number(4)),
                    key_len: number(5),
                    data,
                    data_len: number(7),
                    anonymous: set_flags & NFT_SET_ANONYMOUS != 0,
                    interval: set_flags & NFT_SET_INTERVAL != 0,
                },
                gone: kind != NFT_MSG_NEWSET,
            }
        }
        NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM | NFT_MSG_DESTROYSETELEM => {
            Announcement::Elements {
                set: object(1, 2),
                elements: at(3).unwrap_or_default(),
                gone: kind != NFT_MSG_NEWSETELEM,
            }
        }
        _ => return None,
    })
}

/// The elements of an `NFTA_SET_ELEM_LIST_ELEMENTS` nest.
pub fn elements(list: &[u8]) -> impl Iterator<Item = RawElement<'_>> {
    attrs(list).filter_map(|(_, e)| {
        let key = match data(attr(e, 1)?)? {
            Data::Value(v) => v,
            Data::Verdict { .. } => return None,
        };
        Some(RawElement {
            key,
            data: attr(e, 2).and_then(data),
        })
    })
}

/// A datatype number split into a concatenation's fields.
fn split_type(mut t: u32) -> Vec<u32> {
    let mut fields = Vec::new();
    while t != 0 {
        fields.push(t & ((1 << TYPE_BITS) - 1));
        t >>= TYPE_BITS;
    }
    fields.reverse();
    fields
}

/// How a value read from a register or a set is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Addr4,
    Addr6,
    Proto,
    Port,
    IfName,
    NfProto,
    /// A number in host byte order (`numgen`, marks).
    Host,
    Opaque,
}

impl Kind {
    fn of_type(t: u32) -> Kind {
        match t {
            TYPE_IPADDR => Kind::Addr4,
            TYPE_IP6ADDR => Kind::Addr6,
            TYPE_INET_PROTOCOL => Kind::Proto,
            TYPE_INET_SERVICE => Kind::Port,
            TYPE_INTEGER | TYPE_MARK => Kind::Host,
            _ => Kind::Opaque,
        }
    }

    /// The value of `bytes`, as `nft -j` shows it.
    fn value(self, bytes: &[u8]) -> Option<Expression<'static>> {
        Some(match self {
            Kind::Addr4 => Expression::String(Cow::Owned(
                Ipv4Addr::from(<[u8; 4]>::try_from(bytes.get(..4)?).ok()?).to_string(),
            )),
            Kind::Addr6 => Expression::String(Cow::Owned(
                Ipv6Addr::from(<[u8; 16]>::try_from(bytes.get(..16)?).ok()?).to_string(),
            )),
            Kind::Proto => Expression::Number(u32::from(*bytes.first()?)),
            Kind::Port => Expression::Number(u32::from(u16::from_be_bytes(
                bytes.get(..2)?.try_into().ok()?,
            ))),
            Kind::IfName => Expression::String(Cow::Owned(string(bytes).to_owned())),
            Kind::NfProto => Expression::String(Cow::Borrowed(match bytes.first()? {
                2 => "ipv4",
                10 => "ipv6",
                _ => return None,
            })),
            Kind::Host => {
                let mut b = [0u8; 4];
                let n = bytes.len().min(4);
                b[..n].copy_from_slice(&bytes[..n]);
                Expression::Number(u32::from_ne_bytes(b))
            }
            Kind::Opaque => return None,
        })
    }

    fn len(self) -> usize {
        match self {
            Kind::Addr4 | Kind::Host => 4,
            Kind::Addr6 => 16,
            Kind::Proto | Kind::NfProto => 1,
            Kind::Port => 2,
            Kind::IfName => 16,
            Kind::Opaque => 0,
        }
    }
}

/// The key and data of a set element, as `nft -j` lists them: a set's
/// element is its key, a map's a `[key, data]` list. `None` when a field
/// is of a type not read.
pub fn element(shape: &SetShape, e: &RawElement<'_>) -> Option<Expression<'static>> {
    let key = fields(&shape.key, e.key)?;
    if !shape.is_map() {
        return Some(key);
    }
    let value = match e.data.as_ref()? {
        Data::Verdict { code, chain } => Expression::Verdict(verdict(*code, *chain)?),
        Data::Value(v) => fields(shape.data.as_deref()?, v)?,
    };
    Some(Expression::List(vec![key, value]))
}

/// The value of `bytes` read as the fields `types` (each field of a
/// concatenation padded to 4 bytes).
fn fields(types: &[u32], bytes: &[u8]) -> Option<Expression<'static>> {
    match types {
        [t] => Kind::of_type(*t).value(bytes),
        _ => {
            let mut at = 0;
            let mut parts = Vec::with_capacity(types.len());
            for &t in types {
                let kind = Kind::of_type(t);
                parts.push(kind.value(bytes.get(at..)?)?);
                at += kind.len().next_multiple_of(4);
            }
            Some(Expression::Named(NamedExpression::Concat(parts)))
        }
    }
}

fn verdict(code: i32, chain: Option<&str>) -> Option<Verdict<'static>> {
    let target = || JumpTarget {
        target: Cow::Owned(chain.unwrap_or_default().to_owned()),
    };
    Some(match code {
        0 => Verdict::Drop,
        1 => Verdict::Accept,
        -1 => Verdict::Continue,
        -3 => Verdict::Jump(target()),
        -4 => Verdict::Goto(target()),
        -5 => Verdict::Return,
        _ => return None,
    })
}

/// What a register holds while a rule's expressions are read.
#[derive(Clone, Debug)]
struct Load {
    expr: Expression<'static>,
    kind: Kind,
    /// A `bitwise` mask of the high `prefix` bits applied.
    prefix: Option<u32>,
    /// The bytes of an `immediate` literal (then `expr` is opaque): read
    /// by what takes the register (a NAT address or port).
    literal: Option<SmallVec<[u8; 16]>>,
}

/// The sets a rule's lookups may name: anonymous ones by their elements
/// (as `nft -j` shows them inline), named ones by their shape.
pub trait Sets {
    /// An anonymous set's shape and elements.
    fn anonymous(&self, name: &str) -> Option<(&SetShape, Vec<Expression<'static>>)>;
    /// A named set's shape.
    fn named(&self, name: &str) -> Option<&SetShape>;
}

/// Whether a rule's expressions look a set up: its statements must be
/// read as it is announced (an anonymous set's elements are announced
/// with the rule, and gone once it is), where other rules may be read
/// later.
pub fn looks_up(exprs: &[u8]) -> bool {
    attrs(exprs).any(|(_, e)| attr(e, 1).map(string) == Some("lookup"))
}

/// Reads a rule's expressions back into statements. `None` when one that
/// can decide a DNAT is not understood (iptables-nft's compat
/// expressions among them).
pub fn statements(
    family: NfFamily,
    exprs: &[u8],
    sets: &dyn Sets,
) -> Option<Vec<Statement<'static>>> {
    let mut regs: [Option<Load>; 16] = Default::default();
    // Most rules are a few matches and a verdict or NAT: one allocation.
    let mut out = Vec::with_capacity(4);
    for (_, e) in attrs(exprs) {
        let name = attr(e, 1).map(string)?;
        let a = attr(e, 2).unwrap_or_default();
        let u32_of = |k: u16| attr(a, k).and_then(be32);
        match name {
            "payload" => {
                let Some(dreg) = u32_of(1) else {
                    continue; // a payload write
                };
                let (base, offset, len) = (u32_of(2)?, u32_of(3)?, u32_of(4)?);
                let (protocol, field, kind) = match (base, offset, len) {
                    (1, 12, 4) => ("ip", "saddr", Kind::Addr4),
                    (1, 16, 4) => ("ip", "daddr", Kind::Addr4),
                    (1, 9, 1) if family != NfFamily::IP6 => ("ip", "protocol", Kind::Proto),
                    (1, 8, 16) => ("ip6", "saddr", Kind::Addr6),
                    (1, 24, 16) => ("ip6", "daddr", Kind::Addr6),
                    (1, 6, 1) if family != NfFamily::IP => ("ip6", "nexthdr", Kind::Proto),
                    (2, 0, 2) => ("th", "sport", Kind::Port),
                    (2, 2, 2) => ("th", "dport", Kind::Port),
                    _ => ("", "", Kind::Opaque),
                };
                let expr = if kind == Kind::Opaque {
                    opaque()
                } else {
                    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                        PayloadField {
                            protocol: Cow::Borrowed(protocol),
                            field: Cow::Borrowed(field),
                        },
                    )))
                };
                set_reg(&mut regs, dreg, expr, kind)?;
            }
            "meta" => {
                let Some(dreg) = u32_of(1) else {
                    continue; // meta set
                };
                let (key, kind) = match u32_of(2)? {
                    4 => (Some(MetaKey::Iif), Kind::Host),
                    6 => (Some(MetaKey::Iifname), Kind::IfName),
                    15 => (Some(MetaKey::Nfproto), Kind::NfProto),
                    16 => (Some(MetaKey::L4proto), Kind::Proto),
                    _ => (None, Kind::Opaque),
                };
                let expr = key.map_or_else(opaque, |key| {
                    Expression::Named(NamedExpression::Meta(Meta { key }))
                });
                set_reg(&mut regs, dreg, expr, kind)?;
            }
            "numgen" => {
                let expr = Expression::Named(NamedExpression::Numgen(Numgen {
                    mode: if u32_of(3) == Some(0) {
                        NgMode::Inc
                    } else {
                        NgMode::Random
                    },
                    ng_mod: u32_of(2).unwrap_or(0),
                    offset: u32_of(4),
                }));
                set_reg(&mut regs, u32_of(1)?, expr, Kind::Host)?;
            }
            "hash" => {
                // jhash/symhash: load balancing, like numgen.
                let expr = Expression::Named(NamedExpression::Numgen(Numgen {
                    mode: NgMode::Random,
                    ng_mod: u32_of(4).unwrap_or(0),
                    offset: None,
                }));
                set_reg(&mut regs, u32_of(2)?, expr, Kind::Host)?;
            }
            "fib" => {
                let flags = u32_of(3).unwrap_or(0);
                let mut set = std::collections::HashSet::new();
                for (bit, flag) in [
                    (1, FibFlag::Saddr),
                    (2, FibFlag::Daddr),
                    (4, FibFlag::Mark),
                    (8, FibFlag::Iif),
                    (16, FibFlag::Oif),
                ] {
                    if flags & bit != 0 {
                        set.insert(flag);
                    }
                }
                let (result, kind) = match u32_of(2)? {
                    3 => (FibResult::Type, Kind::Host),
                    2 => (FibResult::Oifname, Kind::IfName),
                    _ => (FibResult::Oif, Kind::Host),
                };
                let expr = Expression::Named(NamedExpression::Fib(Fib { result, flags: set }));
                set_reg(&mut regs, u32_of(1)?, expr, kind)?;
            }
            "bitwise" => {
                let (sreg, dreg) = (u32_of(1)?, u32_of(2)?);
                let mask = attr(a, 4).and_then(data);
                let xor = attr(a, 5).and_then(data);
                let mut load = get_reg(&regs, sreg)?.clone();
                match (mask, xor) {
                    (Some(Data::Value(m)), Some(Data::Value(x)))
                        if x.iter().all(|&b| b == 0)
                            && matches!(load.kind, Kind::Addr4 | Kind::Addr6) =>
                    {
                        load.prefix = prefix_len(m);
                        if load.prefix.is_none() {
                            load = opaque_load();
                        }
                    }
                    _ => load = opaque_load(),
                }
                put_reg(&mut regs, dreg, load)?;
            }
            "cmp" => {
                let load = get_reg(&regs, u32_of(1)?)?.clone();
                let op = match u32_of(2)? {
                    0 => Operator::EQ,
                    1 => Operator::NEQ,
                    2 => Operator::LT,
                    3 => Operator::LEQ,
                    4 => Operator::GT,
                    _ => Operator::GEQ,
                };
                let right = match attr(a, 3).and_then(data) {
                    Some(Data::Value(v)) => load.kind.value(v),
                    _ => None,
                };
                let m = matched(load, right, op);
                // `dport 1000-2000` is `>= 1000` then `<= 2000`.
                if let (
                    Some(Statement::Match(Match {
                        left,
                        right: lo,
                        op: Operator::GEQ,
                    })),
                    Statement::Match(Match {
                        left: l2,
                        right: hi,
                        op: Operator::LEQ,
                    }),
                ) = (out.last(), &m)
                    && left == l2
                    && *left != opaque()
                {
                    let range = Statement::Match(Match {
                        left: left.clone(),
                        right: Expression::Range(Box::new(Range {
                            range: [lo.clone(), hi.clone()],
                        })),
                        op: Operator::EQ,
                    });
                    out.pop();
                    out.push(range);
                } else {
                    out.push(m);
                }
            }
            "range" => {
                let load = get_reg(&regs, u32_of(1)?)?.clone();
                let op = if u32_of(2) == Some(1) {
                    Operator::NEQ
                } else {
                    Operator::EQ
                };
                let value = |k: u16| match attr(a, k).and_then(data) {
                    Some(Data::Value(v)) => load.kind.value(v),
                    _ => None,
                };
                let right = match (value(3), value(4)) {
                    (Some(lo), Some(hi)) => {
                        Some(Expression::Range(Box::new(Range { range: [lo, hi] })))
                    }
                    _ => None,
                };
                out.push(matched(load, right, op));
            }
            "lookup" => {
                let set = attr(a, 1).map(string)?;
                let sreg = u32_of(2)?;
                let inverted = u32_of(5).unwrap_or(0) & 1 != 0;
                let (shape, inline) = match sets.anonymous(set) {
                    Some((shape, elements)) => (shape, Some(elements)),
                    None => (sets.named(set)?, None),
                };
                let key = key_of(&regs, sreg, shape.key_len)?;
                let data = match inline {
                    Some(elements) => Expression::Named(NamedExpression::Set(
                        elements
                            .into_iter()
                            .map(|e| match e {
                                Expression::List(mut kv) if kv.len() == 2 => {
                                    let v = kv.pop().unwrap_or(Expression::Boolean(false));
                                    let k = kv.pop().unwrap_or(Expression::Boolean(false));
                                    SetItem::Mapping(k, v)
                                }
                                other => SetItem::Element(other),
                            })
                            .collect(),
                    )),
                    None => Expression::String(Cow::Owned(format!("@{set}"))),
                };
                match u32_of(3) {
                    None => out.push(Statement::Match(Match {
                        left: key,
                        right: data,
                        op: if inverted {
                            Operator::NEQ
                        } else {
                            Operator::IN
                        },
                    })),
                    Some(0) => {
                        out.push(Statement::VerdictMap(VerdictMap { key, data }));
                        return Some(out);
                    }
                    Some(dreg) => {
                        let expr =
                            Expression::Named(NamedExpression::Map(Box::new(Map { key, data })));
                        // The map's data fills the registers of its
                        // length: an `addr . port` map gives the port in
                        // the next one.
                        let span = (shape.data_len as usize).div_ceil(4);
                        for s in regs.iter_mut().skip(slot(dreg)?).take(span) {
                            *s = None;
                        }
                        set_reg(&mut regs, dreg, expr, Kind::Opaque)?;
                    }
                }
            }
            "immediate" => {
                let dreg = u32_of(1)?;
                match attr(a, 2).and_then(data)? {
                    Data::Verdict { code, chain } => {
                        let target = || JumpTarget {
                            target: Cow::Owned(chain.unwrap_or_default().to_owned()),
                        };
                        out.push(match code {
                            0 => Statement::Drop(None),
                            1 => Statement::Accept(None),
                            -3 => Statement::Jump(target()),
                            -4 => Statement::Goto(target()),
                            -5 => Statement::Return(None),
                            _ => continue,
                        });
                        return Some(out);
                    }
                    Data::Value(v) => {
                        // A literal, typed by what reads it; an IPv6
                        // address overwrites four 32-bit slots.
                        clear_reg(&mut regs, dreg, v.len())?;
                        let load = Load {
                            literal: Some(SmallVec::from_slice(v)),
                            ..opaque_load()
                        };
                        put_reg(&mut regs, dreg, load)?;
                    }
                }
            }
            "nat" => {
                if u32_of(1)? != 1 {
                    continue; // snat
                }
                let v6 = u32_of(2)? == 10;
                let kind = if v6 { Kind::Addr6 } else { Kind::Addr4 };
                let addr = match u32_of(3) {
                    Some(r) => Some(nat_value(&regs, r, u32_of(4), kind)?),
                    None => None,
                };
                // A map's data may give the port with the address
                // (`... : addr . port`): its register is then not loaded
                // apart.
                let from_map = matches!(addr, Some(Expression::Named(NamedExpression::Map(_))));
                let port = match u32_of(5) {
                    Some(r) if from_map && get_reg(&regs, r).is_none() => None,
                    Some(r) => Some(nat_value(&regs, r, u32_of(6), Kind::Port)?),
                    None => None,
                };
                out.push(Statement::DNAT(Some(NAT {
                    addr,
                    family: Some(if v6 { NATFamily::IP6 } else { NATFamily::IP }),
                    port,
                    flags: None,
                })));
                return Some(out);
            }
            "redir" => {
                let port = match u32_of(1) {
                    Some(r) => Some(nat_value(&regs, r, u32_of(2), Kind::Port)?),
                    None => None,
                };
                out.push(Statement::Redirect(Some(NAT {
                    addr: None,
                    family: None,
                    port,
                    flags: None,
                })));
                return Some(out);
            }
            "reject" => {
                out.push(Statement::Reject(None));
                return Some(out);
            }
            // iptables-nft's: read by iptables-nft-save.
            "match" | "target" => return None,
            // Statements that load nothing and decide nothing here.
            "counter" | "log" | "limit" | "quota" | "notrack" | "objref" | "connlimit" | "last"
            | "dynset" => {}
            "ct" if attr(a, 1).is_some() => {
                put_reg(&mut regs, u32_of(1)?, opaque_load())?;
            }
            // Anything else may load any register: what is matched after
            // it is not read.
            _ => regs.fill(Some(opaque_load())),
        }
    }
    Some(out)
}

/// A match of a rule in the common shapes, read straight from its
/// expressions: what it adds to the conditions on the way to a DNAT (as
/// [`statements`] read by the walk would add it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Narrow {
    /// A match on an IP header field is of that family.
    Family(Family),
    Proto(Cond<Proto>),
    Saddr(Cond<AddrSpan>),
    Daddr(Cond<AddrSpan>),
    Dport(Cond<PortSpan>),
}

impl Narrow {
    pub fn apply(&self, when: &mut Conditions) {
        match self {
            Narrow::Family(f) => when.family = Some(*f),
            Narrow::Proto(c) => when.proto.push(c.clone()),
            Narrow::Saddr(c) => when.saddr.push(c.clone()),
            Narrow::Daddr(c) => when.daddr.push(c.clone()),
            Narrow::Dport(c) => when.dport.push(c.clone()),
        }
    }
}

/// How a rule in the common shapes ends, its jumps to chains named by
/// `C` (as announced, a name; as kept, an id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending<C> {
    /// No verdict: the packet goes on to the next rule.
    Next,
    /// Accept, drop, return or reject: the chain ends here for the
    /// packets that match.
    Stop,
    Jump(C),
    Goto(C),
    Dnat(NatTarget),
}

impl<C> Ending<C> {
    /// The same ending, its chain named by `f` of its name.
    pub fn map<D>(self, mut f: impl FnMut(C) -> D) -> Ending<D> {
        match self {
            Ending::Next => Ending::Next,
            Ending::Stop => Ending::Stop,
            Ending::Jump(c) => Ending::Jump(f(c)),
            Ending::Goto(c) => Ending::Goto(f(c)),
            Ending::Dnat(t) => Ending::Dnat(t),
        }
    }
}

/// A rule in the common shapes, read without [`statements`]: matches of
/// addresses (or prefixes), protocols and destination ports against
/// literals, ended by a verdict or a DNAT to a literal address and port
/// (a kube-proxy endpoint, a port mapping). No `nftables` tree is made:
/// no address is written out as text to be parsed back, and a storm of
/// endpoint rules replaced every few seconds costs a fraction of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape<'a> {
    /// As the rule keeps them: most have one.
    pub matches: SmallVec<[Narrow; 1]>,
    pub end: Ending<&'a str>,
}

/// A packet field a register holds, for [`compact`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Saddr(Family),
    Daddr(Family),
    /// `ip protocol` (IPv4), `ip6 nexthdr` (IPv6), `meta l4proto` (none).
    Proto(Option<Family>),
    /// `th dport`.
    Dport,
    NfProto,
}

/// What a register holds, for [`compact`]; the slots it spans as
/// [`put_reg`] counts them.
#[derive(Clone, Copy, Debug)]
enum Held {
    Field { field: Field, prefix: Option<u32> },
    Literal { bytes: [u8; 16], len: usize },
    Opaque,
}

impl Span for Held {
    fn slots(&self) -> usize {
        match self {
            Held::Field {
                field: Field::Saddr(Family::Ipv6) | Field::Daddr(Family::Ipv6),
                ..
            } => 4,
            _ => 1,
        }
    }
}

/// A rule's expressions read in the common shapes ([`Shape`]), or `None`
/// for anything else (set lookups, maps, `numgen`, ranges, comparisons
/// other than equality, interfaces, compat expressions...): those are
/// read by [`statements`], and the walk takes either form to the same
/// conditions.
pub fn compact(family: NfFamily, exprs: &[u8]) -> Option<Shape<'_>> {
    let mut regs: [Option<Held>; 16] = [None; 16];
    let mut matches = SmallVec::new();
    let get = |regs: &[Option<Held>; 16], reg: u32| get_reg(regs, reg).copied();
    for (_, e) in attrs(exprs) {
        let [_, name, a] = attr_table::<3>(e);
        let name = name_bytes(name?);
        let a = attr_table::<8>(a.unwrap_or_default());
        let at = |k: u16| a.get(usize::from(k)).copied().flatten();
        let u32_of = |k: u16| at(k).and_then(be32);
        match name {
            b"payload" | b"meta" => {
                let field = if name == b"meta" {
                    match u32_of(2)? {
                        15 => Field::NfProto,
                        16 => Field::Proto(None),
                        _ => return None,
                    }
                } else {
                    match (u32_of(2)?, u32_of(3)?, u32_of(4)?) {
                        (1, 12, 4) => Field::Saddr(Family::Ipv4),
                        (1, 16, 4) => Field::Daddr(Family::Ipv4),
                        (1, 9, 1) if family != NfFamily::IP6 => Field::Proto(Some(Family::Ipv4)),
                        (1, 8, 16) => Field::Saddr(Family::Ipv6),
                        (1, 24, 16) => Field::Daddr(Family::Ipv6),
                        (1, 6, 1) if family != NfFamily::IP => Field::Proto(Some(Family::Ipv6)),
                        (2, 2, 2) => Field::Dport,
                        _ => return None,
                    }
                };
                let held = Held::Field {
                    field,
                    prefix: None,
                };
                put_reg(&mut regs, u32_of(1)?, held)?;
            }
            b"bitwise" => {
                let Some(Held::Field {
                    field: field @ (Field::Saddr(_) | Field::Daddr(_)),
                    prefix: None,
                }) = get(&regs, u32_of(1)?)
                else {
                    return None;
                };
                let (Some(Data::Value(mask)), Some(Data::Value(xor))) =
                    (at(4).and_then(data), at(5).and_then(data))
                else {
                    return None;
                };
                if xor.iter().any(|&b| b != 0) {
                    return None;
                }
                let held = Held::Field {
                    field,
                    prefix: Some(prefix_len(mask)?),
                };
                put_reg(&mut regs, u32_of(2)?, held)?;
            }
            b"cmp" => {
                let Some(Held::Field { field, prefix }) = get(&regs, u32_of(1)?) else {
                    return None;
                };
                let negated = match u32_of(2)? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let Some(Data::Value(v)) = at(3).and_then(data) else {
                    return None;
                };
                let addr = |f: Family| -> Option<AddrSpan> {
                    let ip = match f {
                        Family::Ipv4 => IpAddr::from(<[u8; 4]>::try_from(v.get(..4)?).ok()?),
                        Family::Ipv6 => IpAddr::from(<[u8; 16]>::try_from(v.get(..16)?).ok()?),
                    };
                    Some(match prefix {
                        Some(len) => AddrSpan::prefix(ip, len.min(128) as u8),
                        None => AddrSpan::one(ip),
                    })
                };
                let one = |x| Cond::new([x], negated);
                match field {
                    Field::Saddr(f) => {
                        matches.push(Narrow::Family(f));
                        matches.push(Narrow::Saddr(one(addr(f)?)));
                    }
                    Field::Daddr(f) => {
                        matches.push(Narrow::Family(f));
                        matches.push(Narrow::Daddr(one(addr(f)?)));
                    }
                    Field::Proto(f) => {
                        if let Some(f) = f {
                            matches.push(Narrow::Family(f));
                        }
                        matches.push(Narrow::Proto(Cond::new([Proto(*v.first()?)], negated)));
                    }
                    Field::Dport => {
                        let port = u16::from_be_bytes(v.get(..2)?.try_into().ok()?);
                        matches.push(Narrow::Dport(Cond::new([PortSpan::one(port)], negated)));
                    }
                    Field::NfProto => match (negated, v.first()?) {
                        (false, 2) => matches.push(Narrow::Family(Family::Ipv4)),
                        (false, 10) => matches.push(Narrow::Family(Family::Ipv6)),
                        _ => return None,
                    },
                }
            }
            b"immediate" => {
                let dreg = u32_of(1)?;
                match at(2).and_then(data)? {
                    Data::Verdict { code, chain } => {
                        let end = match code {
                            0 | 1 | -5 => Ending::Stop,
                            -3 => Ending::Jump(chain.unwrap_or_default()),
                            -4 => Ending::Goto(chain.unwrap_or_default()),
                            _ => return None,
                        };
                        return Some(Shape { matches, end });
                    }
                    Data::Value(v) => {
                        // As statements does: the slots of its length
                        // cleared, the literal in the first.
                        clear_reg(&mut regs, dreg, v.len())?;
                        let mut bytes = [0; 16];
                        bytes.get_mut(..v.len())?.copy_from_slice(v);
                        put_reg(
                            &mut regs,
                            dreg,
                            Held::Literal {
                                bytes,
                                len: v.len(),
                            },
                        )?;
                    }
                }
            }
            b"nat" => {
                if u32_of(1)? != 1 {
                    return None; // snat
                }
                let v6 = u32_of(2)? == 10;
                let literal = |reg: u32| match get(&regs, reg)? {
                    Held::Literal { bytes, len } => Some((bytes, len)),
                    _ => None,
                };
                let addr_of = |reg: u32| -> Option<IpAddr> {
                    let (b, len) = literal(reg)?;
                    if v6 {
                        (len >= 16).then(|| IpAddr::from(b))
                    } else {
                        (len >= 4).then(|| IpAddr::from([b[0], b[1], b[2], b[3]]))
                    }
                };
                let port_of = |reg: u32| -> Option<u16> {
                    let (b, len) = literal(reg)?;
                    (len >= 2).then(|| u16::from_be_bytes([b[0], b[1]]))
                };
                let lo = u32_of(3)?;
                let addr = match u32_of(4).filter(|&hi| hi != lo) {
                    Some(hi) => AddrSpan {
                        lo: addr_of(lo)?,
                        hi: addr_of(hi)?,
                    },
                    None => AddrSpan::one(addr_of(lo)?),
                };
                let port = match u32_of(5) {
                    Some(lo) => Some(match u32_of(6).filter(|&hi| hi != lo) {
                        Some(hi) => PortSpan {
                            lo: port_of(lo)?,
                            hi: port_of(hi)?,
                        },
                        None => PortSpan::one(port_of(lo)?),
                    }),
                    None => None,
                };
                return Some(Shape {
                    matches,
                    end: Ending::Dnat(NatTarget { addr, port }),
                });
            }
            b"reject" => {
                return Some(Shape {
                    matches,
                    end: Ending::Stop,
                });
            }
            b"counter" | b"log" | b"limit" | b"quota" | b"notrack" | b"objref" | b"connlimit"
            | b"last" | b"dynset" => {}
            b"ct" if at(1).is_some() => put_reg(&mut regs, u32_of(1)?, Held::Opaque)?,
            b"ct" => regs.fill(Some(Held::Opaque)),
            _ => return None,
        }
    }
    Some(Shape {
        matches,
        end: Ending::Next,
    })
}

fn opaque() -> Expression<'static> {
    Expression::String(Cow::Borrowed("?"))
}

fn opaque_load() -> Load {
    Load {
        expr: opaque(),
        kind: Kind::Opaque,
        prefix: None,
        literal: None,
    }
}

/// A match of a register's load against `right` (opaque when the value
/// could not be read).
fn matched(load: Load, right: Option<Expression<'static>>, op: Operator) -> Statement<'static> {
    let right = match (right, load.prefix) {
        (Some(addr), Some(len)) => Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(addr),
            len,
        })),
        (Some(r), None) => r,
        (None, _) => opaque(),
    };
    let left = if right == opaque() {
        opaque()
    } else {
        load.expr
    };
    Statement::Match(Match { left, right, op })
}

/// The number of leading one bits of a mask that is a prefix.
fn prefix_len(mask: &[u8]) -> Option<u32> {
    let ones: u32 = mask.iter().map(|b| b.count_ones()).sum();
    let leading: u32 = {
        let mut n = 0;
        for &b in mask {
            n += b.leading_ones();
            if b != 0xff {
                break;
            }
        }
        n
    };
    (ones == leading).then_some(ones)
}

/// A register's 32-bit slot: `NFT_REG_1..4` are 16 bytes each,
/// `NFT_REG32_00..15` 4 bytes.
fn slot(reg: u32) -> Option<usize> {
    match reg {
        1..=4 => Some(((reg - 1) * 4) as usize),
        8..=23 => Some((reg - 8) as usize),
        _ => None,
    }
}

fn set_reg(
    regs: &mut [Option<Load>; 16],
    reg: u32,
    expr: Expression<'static>,
    kind: Kind,
) -> Option<()> {
    put_reg(
        regs,
        reg,
        Load {
            expr,
            kind,
            prefix: None,
            literal: None,
        },
    )
}

/// What a register holds ([`Load`] for [`statements`], [`Held`] for
/// [`compact`]): the 32-bit slots it spans.
trait Span {
    fn slots(&self) -> usize;
}

impl Span for Load {
    fn slots(&self) -> usize {
        self.kind.len().div_ceil(4).max(1)
    }
}

fn put_reg<T: Span>(regs: &mut [Option<T>; 16], reg: u32, value: T) -> Option<()> {
    // A value spans the slots of its length; what it overwrites is gone.
    let at = clear_reg(regs, reg, value.slots() * 4)?;
    *regs.get_mut(at)? = Some(value);
    Some(())
}

/// Clears the slots `len` bytes loaded into `reg` overwrite (an IPv6
/// address four of them); returns the first.
fn clear_reg<T>(regs: &mut [Option<T>; 16], reg: u32, len: usize) -> Option<usize> {
    let at = slot(reg)?;
    for s in regs.iter_mut().skip(at).take(len.div_ceil(4)) {
        *s = None;
    }
    Some(at)
}

fn get_reg<T>(regs: &[Option<T>; 16], reg: u32) -> Option<&T> {
    regs.get(slot(reg)?)?.as_ref()
}

/// The key a lookup reads from `sreg`: one load, or a concatenation of
/// the loads in the slots that follow, `key_len` bytes in all.
fn key_of(regs: &[Option<Load>; 16], sreg: u32, key_len: u32) -> Option<Expression<'static>> {
    let mut at = slot(sreg)?;
    let first = regs.get(at)?.as_ref()?;
    if first.kind.len() >= key_len as usize || key_len <= 4 {
        return Some(first.expr.clone());
    }
    let mut parts = Vec::new();
    let mut covered = 0usize;
    while covered < key_len as usize {
        let load = regs.get(at)?.as_ref()?;
        let len = load.kind.len().max(1).next_multiple_of(4);
        parts.push(load.expr.clone());
        covered += len;
        at += len / 4;
    }
    Some(Expression::Named(NamedExpression::Concat(parts)))
}

/// A NAT address or port from registers: a literal (or a range of two),
/// or a map's data (`dnat to ip daddr map { ... }`).
fn nat_value(
    regs: &[Option<Load>; 16],
    min: u32,
    max: Option<u32>,
    kind: Kind,
) -> Option<Expression<'static>> {
    let read = |reg: u32| -> Option<Expression<'static>> {
        let load = get_reg(regs, reg)?;
        match (&load.literal, &load.expr) {
            (Some(bytes), _) => kind.value(bytes),
            (None, Expression::Named(NamedExpression::Map(_))) => Some(load.expr.clone()),
            _ => None,
        }
    };
    let lo = read(min)?;
    match max.filter(|&m| m != min) {
        Some(m) => {
            let hi = read(m)?;
            if hi == lo {
                Some(lo)
            } else {
                Some(Expression::Range(Box::new(Range { range: [lo, hi] })))
            }
        }
        None => Some(lo),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A netlink attribute.
    pub(in super::super) fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    pub(in super::super) fn nest(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        nla(kind | 0x8000, &children.concat())
    }

    pub(in super::super) fn text(kind: u16, s: &str) -> Vec<u8> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        nla(kind, &b)
    }

    pub(in super::super) fn u32be(kind: u16, v: u32) -> Vec<u8> {
        nla(kind, &v.to_be_bytes())
    }

    pub(in super::super) fn value(kind: u16, bytes: &[u8]) -> Vec<u8> {
        nest(kind, &[nla(1, bytes)])
    }

    pub(in super::super) fn expr(name: &str, attrs: &[Vec<u8>]) -> Vec<u8> {
        nest(1, &[text(1, name), nest(2, attrs)])
    }

    /// `immediate` of a verdict into register 0 (`NFT_REG_VERDICT`).
    pub(in super::super) fn verdict(code: i32, chain: Option<&str>) -> Vec<u8> {
        let mut v = vec![u32be(1, code as u32)];
        v.extend(chain.map(|c| text(2, c)));
        expr("immediate", &[u32be(1, 0), nest(2, &[nest(2, &v)])])
    }

    /// A whole nfnetlink message of nf_tables.
    fn message(kind: u16, flags: u16, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body = [vec![family, 0, 0, 0], attrs.concat()].concat();
        let mut out = Vec::new();
        out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&body);
        out
    }

    pub(in super::super) struct NoSets;

    impl Sets for NoSets {
        fn anonymous(&self, _: &str) -> Option<(&SetShape, Vec<Expression<'static>>)> {
            None
        }
        fn named(&self, _: &str) -> Option<&SetShape> {
            None
        }
    }

    /// `meta l4proto tcp th dport 1000-2000 dnat ip to 10.1.0.42:8080`,
    /// as the kernel announces it after `nft add rule`.
    fn dnat_rule() -> Vec<Vec<u8>> {
        vec![
            expr("meta", &[u32be(2, 16), u32be(1, 1)]),
            expr("cmp", &[u32be(1, 1), u32be(2, 0), value(3, &[6])]),
            expr(
                "payload",
                &[u32be(1, 1), u32be(2, 2), u32be(3, 2), u32be(4, 2)],
            ),
            expr(
                "cmp",
                &[u32be(1, 1), u32be(2, 5), value(3, &1000u16.to_be_bytes())],
            ),
            expr(
                "cmp",
                &[u32be(1, 1), u32be(2, 3), value(3, &2000u16.to_be_bytes())],
            ),
            expr("counter", &[]),
            expr("immediate", &[u32be(1, 1), value(2, &[10, 1, 0, 42])]),
            expr(
                "immediate",
                &[u32be(1, 2), value(2, &8080u16.to_be_bytes())],
            ),
            expr(
                "nat",
                &[
                    u32be(1, 1),
                    u32be(2, 2),
                    u32be(3, 1),
                    u32be(4, 1),
                    u32be(5, 2),
                    u32be(6, 2),
                ],
            ),
        ]
    }

    #[test]
    fn a_rule_announced_reads_as_nft_lists_it() {
        let msg = message(
            NFT_MSG_NEWRULE,
            NLM_F_APPEND,
            2,
            &[
                text(1, "nat"),
                text(2, "pre"),
                nla(3, &7u64.to_be_bytes()),
                nest(4, &dnat_rule()),
            ],
        );
        let mut seen = Vec::new();
        decode(&msg, |a| {
            if let Announcement::Rule {
                chain,
                handle,
                after,
                append,
                gone,
                exprs,
            } = a
            {
                seen.push((chain.table, chain.name, handle, after, append, gone));
                let statements = statements(chain.family, exprs, &NoSets).expect("read back");
                let json = serde_json::to_string(&statements).unwrap();
                assert_eq!(
                    json,
                    r#"[{"match":{"left":{"meta":{"key":"l4proto"}},"right":6,"op":"=="}},{"match":{"left":{"payload":{"protocol":"th","field":"dport"}},"right":{"range":[1000,2000]},"op":"=="}},{"dnat":{"addr":"10.1.0.42","family":"ip","port":8080}}]"#
                );
            }
        });
        assert_eq!(seen, [("nat", "pre", 7, None, true, false)]);
    }

    #[test]
    fn what_is_not_read_back_is_said() {
        // iptables-nft's compat target.
        let xt = expr("target", &[text(1, "DNAT")]);
        assert!(statements(NfFamily::IP, &xt, &NoSets).is_none());
        // A lookup in a set nobody announced.
        let lookup = [
            expr(
                "payload",
                &[u32be(1, 1), u32be(2, 1), u32be(3, 16), u32be(4, 4)],
            ),
            expr("lookup", &[text(1, "nowhere"), u32be(2, 1)]),
        ]
        .concat();
        assert!(statements(NfFamily::IP, &lookup, &NoSets).is_none());
        // A match after an expression not evaluated is opaque, not wrong.
        let odd = [
            expr(
                "payload",
                &[u32be(1, 1), u32be(2, 1), u32be(3, 16), u32be(4, 4)],
            ),
            expr("socket", &[u32be(1, 1), u32be(2, 1)]),
            expr("cmp", &[u32be(1, 1), u32be(2, 0), value(3, &[10, 0, 0, 1])]),
        ]
        .concat();
        let read = statements(NfFamily::IP, &odd, &NoSets).unwrap();
        assert_eq!(
            serde_json::to_string(&read).unwrap(),
            r#"[{"match":{"left":"?","right":"?","op":"=="}}]"#
        );
        // A 16-byte literal loaded into register 1 overwrites the 32-bit
        // slots 0-3: `ip daddr` loaded into slot 1 before it is gone, and
        // a compare of slot 1 is not read as a match on it.
        let overwritten = [
            expr(
                "payload",
                &[u32be(1, 9), u32be(2, 1), u32be(3, 16), u32be(4, 4)],
            ),
            expr("immediate", &[u32be(1, 1), value(2, &[0xfd; 16])]),
            expr("cmp", &[u32be(1, 9), u32be(2, 0), value(3, &[10, 0, 0, 1])]),
        ]
        .concat();
        assert!(statements(NfFamily::IP, &overwritten, &NoSets).is_none());
    }

    #[test]
    fn truncated_messages_are_skipped() {
        let msg = message(NFT_MSG_DELRULE, 0, 2, &[text(1, "nat"), text(2, "pre")]);
        for cut in 0..msg.len() {
            decode(&msg[..cut], |_| {});
        }
        // No handle: not a rule announcement that can be applied.
        let mut n = 0;
        decode(&msg, |_| n += 1);
        assert_eq!(n, 0);
    }

    #[test]
    fn types_split_and_prefixes() {
        assert_eq!(
            split_type((TYPE_IPADDR << 12) | (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE),
            vec![TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]
        );
        assert_eq!(prefix_len(&[0xff, 0xff, 0xf0, 0]), Some(20));
        assert_eq!(prefix_len(&[0xff, 0x0f, 0, 0]), None);
        let shape = SetShape::from_names(&["ipv4_addr", "inet_proto", "inet_service"], None, false)
            .unwrap();
        assert_eq!(shape.key_len, 12);
        let e = RawElement {
            key: &[172, 30, 0, 2, 6, 0, 0, 0, 0, 80, 0, 0],
            data: None,
        };
        assert_eq!(
            element(&shape, &e),
            Some(Expression::Named(NamedExpression::Concat(vec![
                Expression::String("172.30.0.2".into()),
                Expression::Number(6),
                Expression::Number(80),
            ])))
        );
    }
}
