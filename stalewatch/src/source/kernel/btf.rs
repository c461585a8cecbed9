//! Everything stalewatch needs to know about the running kernel's types,
//! resolved once at start-up from its BTF: struct field offsets for the eBPF
//! programs, the layout of a conntrack tuple for decoding, the numbers of
//! the drop reasons, and whether the tracepoints exist at all.
//!
//! Nothing here is hard-coded from one kernel: a field that a kernel lacks
//! fails at start-up with its name, instead of reading garbage later.

use std::{collections::HashMap, path::Path, sync::Arc};

use btf_rs::{Btf, BtfType, Type};
use stalewatch_common::{
    CT_CHUNK_WORDS, DROP_REASON_MAX, DROP_REASON_WORDS, TUPLE_SIZE, TUPLE_WORDS,
};

use crate::{
    error::Error,
    linux::{TRACEPOINTS, drop_reason},
};

/// Offsets (bytes) inside a `struct nf_conntrack_tuple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleLayout {
    pub src_addr: usize,
    pub src_port: usize,
    pub l3num: usize,
    pub dst_addr: usize,
    pub dst_port: usize,
    pub protonum: usize,
}

impl TupleLayout {
    /// The layout of every kernel since conntrack tuples got their current
    /// shape. At run time the layout comes from BTF; the programs' loads
    /// through `bpf_rdonly_cast` assume this one.
    pub const LINUX: TupleLayout = TupleLayout {
        src_addr: 0,
        src_port: 16,
        l3num: 18,
        dst_addr: 20,
        dst_port: 36,
        protonum: 38,
    };
}

/// Offsets the eBPF programs read through, plus what userspace decodes with.
#[derive(Clone, Debug)]
pub struct KernelLayout {
    pub skb_nfct: u64,
    pub skb_protocol: u64,
    pub skb_head: u64,
    pub skb_network_header: u64,
    pub skb_transport_header: u64,
    pub skb_dev: u64,
    /// `net_device.nd_net.net`.
    pub dev_net: u64,
    pub ct_status: u64,
    pub ct_tuple_orig: u64,
    pub ct_tuple_reply: u64,
    pub ct_net: u64,
    /// The three above, as one read.
    pub ct_chunk: CtChunk,
    pub net_ns_inum: u64,
    pub tuple: TupleLayout,
    pub drop_reasons: DropReasons,
    /// The kernel's `bpf_rdonly_cast`, where it has one (6.2 and later).
    pub rdonly_cast: Option<RdonlyCast>,
    /// `neigh_invalidate`'s address and size in the kernel's text, from
    /// /proc/kallsyms (where its addresses are shown: root): where IPv6
    /// drops packets no neighbour answered for.
    pub neigh_invalidate: Option<(u64, u64)>,
}

/// A function's address and size in the kernel's text, from a
/// /proc/kallsyms listing: up to the next symbol's address. `None` where
/// the listing hides addresses (zeros) or lacks it.
pub fn symbol_range(kallsyms: &str, name: &str) -> Option<(u64, u64)> {
    let addr_of = |line: &str| u64::from_str_radix(line.split(' ').next()?, 16).ok();
    let at = kallsyms
        .lines()
        .find(|l| {
            let mut f = l.split(' ');
            let (_, kind, sym) = (f.next(), f.next(), f.next());
            matches!(kind, Some("t" | "T")) && sym == Some(name) && f.next().is_none()
        })
        .and_then(addr_of)
        .filter(|a| *a != 0)?;
    let next = kallsyms
        .lines()
        .filter_map(addr_of)
        .filter(|a| *a > at)
        .min()?;
    Some((at, next - at))
}

/// BTF ids for a `bpf_rdonly_cast(ct, nf_conn)` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdonlyCast {
    /// The kfunc.
    pub func: u32,
    /// `struct nf_conn`.
    pub nf_conn: u32,
}

/// Where the kernel side reads both tuples and the namespace pointer of an
/// `nf_conn` in one go: the offset of the read, and where each field sits
/// in it, in u64 words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtChunk {
    pub start: u64,
    pub orig: u32,
    pub reply: u32,
    pub net: u32,
}

impl CtChunk {
    /// From the fields' offsets in `nf_conn`. They sit together and 8-byte
    /// aligned on every kernel stalewatch knows; another layout is refused.
    pub fn new(orig: u64, reply: u64, net: u64) -> Result<CtChunk, Error> {
        let start = orig.min(reply).min(net);
        let word = |name: &str, offset: u64, words: usize| -> Result<u32, Error> {
            let rel = offset - start;
            if !rel.is_multiple_of(8) || rel / 8 + words as u64 > CT_CHUNK_WORDS as u64 {
                return Err(Error::Layout(format!(
                    "nf_conn.{name} at byte {offset} is not within {} aligned bytes of byte {start}",
                    CT_CHUNK_WORDS * 8
                )));
            }
            Ok((rel / 8) as u32)
        };
        Ok(CtChunk {
            start,
            orig: word("tuplehash[0].tuple", orig, TUPLE_WORDS)?,
            reply: word("tuplehash[1].tuple", reply, TUPLE_WORDS)?,
            net: word("ct_net", net, 1)?,
        })
    }
}

/// `enum skb_drop_reason`, by number, as this kernel numbers it.
#[derive(Clone, Debug, Default)]
pub struct DropReasons {
    names: HashMap<u32, Arc<str>>,
    failure_bitmap: [u64; DROP_REASON_WORDS],
    failure_bitmap_v6: [u64; DROP_REASON_WORDS],
    dead_bitmap: [u64; DROP_REASON_WORDS],
}

impl DropReasons {
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let mut reasons = DropReasons::default();
        for (name, value) in pairs {
            let name = name.strip_prefix(drop_reason::PREFIX).unwrap_or(name);
            if value < DROP_REASON_MAX {
                let (word, bit) = ((value / 64) as usize, 1 << (value % 64));
                if drop_reason::FAILURES.contains(&name) {
                    reasons.failure_bitmap[word] |= bit;
                }
                if drop_reason::FAILURES_V6.contains(&name) {
                    reasons.failure_bitmap_v6[word] |= bit;
                }
                if drop_reason::is_neighbour_failure(name, false) {
                    reasons.dead_bitmap[word] |= bit;
                }
            }
            reasons.names.insert(value, Arc::from(name));
        }
        reasons
    }

    /// The reason's name, or its number when this kernel has no name for it.
    pub fn name(&self, value: u32) -> Arc<str> {
        self.names
            .get(&value)
            .cloned()
            .unwrap_or_else(|| Arc::from(value.to_string()))
    }

    /// The bitmap the kfree_skb program filters on.
    pub fn failure_bitmap(&self) -> [u64; DROP_REASON_WORDS] {
        self.failure_bitmap
    }

    /// The reasons that count only for IPv6 packets.
    pub fn failure_bitmap_v6(&self) -> [u64; DROP_REASON_WORDS] {
        self.failure_bitmap_v6
    }

    /// The reasons that say no neighbour answers (any NAT).
    pub fn dead_bitmap(&self) -> [u64; DROP_REASON_WORDS] {
        self.dead_bitmap
    }
}

impl KernelLayout {
    /// Resolves everything from the BTF file at `path` (normally
    /// `/sys/kernel/btf/vmlinux`).
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        if !path.exists() {
            return Err(Error::NoBtf(path.to_owned()));
        }
        let btf = Btf::from_file(path).map_err(|e| Error::BadBtf {
            path: path.to_owned(),
            source: e.into(),
        })?;
        let types = Types { btf: &btf, path };
        for tracepoint in TRACEPOINTS {
            if btf
                .resolve_ids_by_name(&format!("btf_trace_{}", tracepoint.function))
                .map(|ids| ids.is_empty())
                .unwrap_or(true)
            {
                return Err(Error::NoTracepoint(tracepoint.name.to_owned()));
            }
        }

        let tuple_size = types.struct_size("nf_conntrack_tuple")?;
        if tuple_size != TUPLE_SIZE {
            return Err(Error::Layout(format!(
                "struct nf_conntrack_tuple is {tuple_size} bytes on this kernel, stalewatch reads {TUPLE_SIZE}"
            )));
        }
        let (tuplehash, tuplehash_ty) = types.field("nf_conn", &["tuplehash"])?;
        let hash_size = types.element_size(&tuplehash_ty, "nf_conn.tuplehash")?;
        let (tuple_in_hash, _) = types.field("nf_conntrack_tuple_hash", &["tuple"])?;
        let (ct_net, _) = types.field("nf_conn", &["ct_net"])?;
        let (net_in_possible, _) = types.field("possible_net_t", &["net"])?;
        let (dev_nd_net, _) = types.field("net_device", &["nd_net"])?;
        let field = |s: &str, path: &[&str]| types.field(s, path).map(|(off, _)| off);
        let ct_tuple_orig = (tuplehash + tuple_in_hash) as u64;
        let ct_tuple_reply = (tuplehash + hash_size + tuple_in_hash) as u64;
        let ct_net = (ct_net + net_in_possible) as u64;
        let tuple = TupleLayout {
            src_addr: field("nf_conntrack_tuple", &["src", "u3"])?,
            src_port: field("nf_conntrack_tuple", &["src", "u"])?,
            l3num: field("nf_conntrack_tuple", &["src", "l3num"])?,
            dst_addr: field("nf_conntrack_tuple", &["dst", "u3"])?,
            dst_port: field("nf_conntrack_tuple", &["dst", "u"])?,
            protonum: field("nf_conntrack_tuple", &["dst", "protonum"])?,
        };

        Ok(KernelLayout {
            skb_nfct: field("sk_buff", &["_nfct"])? as u64,
            skb_protocol: field("sk_buff", &["protocol"])? as u64,
            skb_head: field("sk_buff", &["head"])? as u64,
            skb_network_header: field("sk_buff", &["network_header"])? as u64,
            skb_transport_header: field("sk_buff", &["transport_header"])? as u64,
            skb_dev: field("sk_buff", &["dev"])? as u64,
            dev_net: (dev_nd_net + net_in_possible) as u64,
            ct_status: field("nf_conn", &["status"])? as u64,
            ct_tuple_orig,
            ct_tuple_reply,
            ct_net,
            ct_chunk: CtChunk::new(ct_tuple_orig, ct_tuple_reply, ct_net)?,
            net_ns_inum: field("net", &["ns", "inum"])? as u64,
            tuple,
            drop_reasons: types.drop_reasons()?,
            // Its loads follow the usual tuple layout (see the programs).
            rdonly_cast: types.rdonly_cast().filter(|_| tuple == TupleLayout::LINUX),
            neigh_invalidate: std::fs::read_to_string("/proc/kallsyms")
                .ok()
                .and_then(|k| symbol_range(&k, "neigh_invalidate")),
        })
    }
}

struct Types<'a> {
    btf: &'a Btf,
    path: &'a Path,
}

impl Types<'_> {
    fn missing(&self, what: String) -> Error {
        Error::Layout(format!("{what} not found in {}", self.path.display()))
    }

    /// The ids of `bpf_rdonly_cast` (a function) and `struct nf_conn`.
    fn rdonly_cast(&self) -> Option<RdonlyCast> {
        let id_of = |name: &str, pick: fn(&Type) -> bool| {
            self.btf
                .resolve_ids_by_name(name)
                .unwrap_or_default()
                .into_iter()
                .find(|id| self.btf.resolve_type_by_id(*id).is_ok_and(|t| pick(&t)))
        };
        Some(RdonlyCast {
            func: id_of("bpf_rdonly_cast", |t| matches!(t, Type::Func(_)))?,
            nf_conn: id_of(
                "nf_conn",
                |t| matches!(t, Type::Struct(s) if !s.members.is_empty()),
            )?,
        })
    }

    fn named_struct(&self, name: &str) -> Result<btf_rs::Struct, Error> {
        self.btf
            .resolve_types_by_name(name)
            .unwrap_or_default()
            .into_iter()
            .find_map(|t| match self.strip(t) {
                Ok(Type::Struct(s)) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| self.missing(format!("struct {name}")))
    }

    fn struct_size(&self, name: &str) -> Result<usize, Error> {
        Ok(self.named_struct(name)?.size())
    }

    /// Follows typedefs and qualifiers to the type underneath.
    fn strip(&self, mut ty: Type) -> Result<Type, Error> {
        loop {
            ty = match &ty {
                Type::Typedef(t) => self.chained(t)?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => self.chained(t)?,
                Type::TypeTag(t) => self.chained(t)?,
                _ => return Ok(ty),
            };
        }
    }

    fn chained(&self, t: &dyn BtfType) -> Result<Type, Error> {
        self.btf
            .resolve_chained_type(t)
            .map_err(|e| Error::Layout(format!("BTF: {e}")))
    }

    /// Byte offset and type of `path` inside `struct name`, descending into
    /// anonymous structs and unions as the C compiler (and libbpf) do.
    fn field(&self, name: &str, path: &[&str]) -> Result<(usize, Type), Error> {
        let mut ty = Type::Struct(self.named_struct(name)?);
        let mut offset = 0;
        for part in path {
            let (inner, inner_ty) = self
                .member(&ty, part)?
                .ok_or_else(|| self.missing(format!("{name}.{}", path.join("."))))?;
            offset += inner;
            ty = inner_ty;
        }
        Ok((offset, ty))
    }

    fn member(&self, ty: &Type, wanted: &str) -> Result<Option<(usize, Type)>, Error> {
        let members = match self.strip(ty.clone())? {
            Type::Struct(s) | Type::Union(s) => s.members,
            _ => return Ok(None),
        };
        for member in &members {
            let name = self.btf.resolve_name(member).unwrap_or_default();
            let offset = (member.bit_offset() / 8) as usize;
            let member_ty = self.strip(self.chained(member)?)?;
            if name == wanted {
                return Ok(Some((offset, member_ty)));
            }
            if name.is_empty()
                && let Some((inner, inner_ty)) = self.member(&member_ty, wanted)?
            {
                return Ok(Some((offset + inner, inner_ty)));
            }
        }
        Ok(None)
    }

    fn element_size(&self, array: &Type, what: &str) -> Result<usize, Error> {
        let Type::Array(array) = array else {
            return Err(Error::Layout(format!("{what} is not an array")));
        };
        match self.strip(self.chained(array)?)? {
            Type::Struct(s) => Ok(s.size()),
            _ => Err(Error::Layout(format!("{what}: unexpected element type"))),
        }
    }

    fn drop_reasons(&self) -> Result<DropReasons, Error> {
        let types = self
            .btf
            .resolve_types_by_name("skb_drop_reason")
            .unwrap_or_default();
        for ty in types {
            if let Type::Enum(e) = ty {
                let pairs: Vec<(String, u32)> = e
                    .members
                    .iter()
                    .map(|m| (self.btf.resolve_name(m).unwrap_or_default(), m.val()))
                    .collect();
                return Ok(DropReasons::from_pairs(
                    pairs.iter().map(|(n, v)| (n.as_str(), *v)),
                ));
            }
        }
        Err(self.missing("enum skb_drop_reason".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_spans_to_the_next_symbol() {
        let listing = "\
ffffffff81e72400 t neigh_flush_dev
ffffffff81e72470 t neigh_invalidate
ffffffff81e72610 T neigh_destroy
ffffffffc0a01000 t neigh_invalidate\t[some_module]
ffffffff81e72600 d some_data
";
        assert_eq!(
            symbol_range(listing, "neigh_invalidate"),
            Some((0xffff_ffff_81e7_2470, 0x190))
        );
        assert_eq!(symbol_range(listing, "ndisc_error_report"), None);
        // Addresses hidden from the unprivileged.
        let hidden = "0000000000000000 t neigh_invalidate\n0000000000000000 T neigh_destroy\n";
        assert_eq!(symbol_range(hidden, "neigh_invalidate"), None);
    }

    #[test]
    fn drop_reasons_strip_the_prefix_and_mark_failures() {
        let reasons = DropReasons::from_pairs([
            ("SKB_DROP_REASON_NOT_SPECIFIED", 2),
            ("SKB_DROP_REASON_NETFILTER_DROP", 12),
            ("SKB_DROP_REASON_NEIGH_FAILED", 58),
            ("SKB_DROP_REASON_TCP_CSUM", 70),
        ]);
        assert_eq!(&*reasons.name(58), "NEIGH_FAILED");
        assert_eq!(&*reasons.name(999), "999");
        let bitmap = reasons.failure_bitmap();
        assert_eq!(bitmap[0], 1 << 12 | 1 << 58);
        assert_eq!(reasons.failure_bitmap_v6()[0], 1 << 2);
        assert_eq!(reasons.dead_bitmap()[0], 1 << 58);
        assert_eq!(bitmap[1], 0, "TCP_CSUM is not a delivery failure");
    }

    #[test]
    fn the_chunk_holds_both_tuples_and_the_namespace() {
        // Linux 6.18: tuplehash at 16 (56 bytes each, tuple 16 in),
        // status at 128, ct_net at 136.
        let chunk = CtChunk::new(32, 88, 136).unwrap();
        assert_eq!(
            chunk,
            CtChunk {
                start: 32,
                orig: 0,
                reply: 7,
                net: 13
            }
        );
        // Misaligned, or too far apart for one read: refused, not misread.
        assert!(CtChunk::new(32, 84, 136).is_err());
        assert!(CtChunk::new(32, 88, 160).is_err());
        assert!(CtChunk::new(0, 200, 8).is_err());
    }
}
