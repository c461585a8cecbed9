//! The event ABI shared by the kernel programs (`stalewatch-ebpf`) and the
//! userspace loader (`stalewatch`): the record each side reads and writes, and
//! the names of the read-only globals that userspace fills in at load time.
//!
//! Everything here is plain `#[repr(C)]` data; both sides are compiled from
//! this one definition so they cannot drift apart.
#![no_std]

/// Bytes of a `struct nf_conntrack_tuple`. The kernel copies the tuple raw;
/// userspace decodes it with offsets read from BTF and refuses to start if
/// the running kernel's struct has another size.
pub const TUPLE_SIZE: usize = 40;

/// `enum ip_conntrack_status` bits that stalewatch reads.
pub mod ct_status {
    /// A connection a helper expected (FTP data, SIP media): its NAT comes
    /// from the helper, not from a rule.
    pub const EXPECTED: u32 = 1 << 0;
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
    pub const SRC_NAT_DONE: u32 = 1 << 7;
    pub const DST_NAT_DONE: u32 = 1 << 8;
    pub const DYING: u32 = 1 << 9;
}

/// Which hook saw a failure. A failing packet often shows up at both.
pub mod hook {
    /// `icmp:icmp_send`: this host generated an ICMP destination unreachable.
    pub const ICMP_SEND: u8 = 1;
    /// `skb:kfree_skb`: the packet was dropped with a failure reason.
    pub const KFREE_SKB: u8 = 2;
}

/// `ETH_P_IPV6` as `sk_buff.protocol` holds it (network byte order, read
/// as a little-endian u16 on the BPF side).
pub const ETH_P_IPV6_BE: u16 = 0x86dd_u16.to_be();

/// The immediate of the call instruction that stands for the kernel
/// function `bpf_rdonly_cast` in the compiled programs: no helper has this
/// number. Before loading, userspace rewrites each such call into a kfunc
/// call (`BPF_PSEUDO_KFUNC_CALL`, the kfunc's BTF id) where the kernel has
/// it, else into `r0 = r1`, and sets the `CAST_CT` global to say which.
pub const RDONLY_CAST_CALL: i32 = 0x5357_0c57;

/// ICMP destination unreachable (RFC 792).
pub const ICMP_DEST_UNREACH: u32 = 3;

/// Number of drop reasons the in-kernel filter can express (a bitmap of
/// `DROP_REASON_WORDS` u64s). `enum skb_drop_reason` has about 130 values.
pub const DROP_REASON_WORDS: usize = 4;
pub const DROP_REASON_MAX: u32 = (DROP_REASON_WORDS * 64) as u32;

/// What a ring buffer record is: every record starts with its kind (u32).
pub mod kind {
    /// A [`FlowEvent`](super::FlowEvent).
    pub const FLOW: u32 = 1;
    /// A [`LocalEvent`](super::LocalEvent).
    pub const LOCAL: u32 = 2;
}

/// One failing conntrack entry as the kernel last saw it. Sent on the first
/// failure of an entry, on the first failure once it has failed
/// `MIN_FAILURES` packets over at least `GRACE_NS` (so that userspace can
/// alert at once), then at most once per
/// `EMIT_INTERVAL_NS` while it keeps failing: counters are cumulative since
/// the first failure. Between reports userspace reads the `FLOWS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// `kind::FLOW`.
    pub kind: u32,
    /// Inode of the network namespace the conntrack entry belongs to.
    pub netns: u32,
    /// Address of the `struct nf_conn`: an identity, never dereferenced in
    /// userspace. Entries are reused by the kernel; `orig` disambiguates.
    pub ct: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the first and last failure.
    pub first_ns: u64,
    pub last_ns: u64,
    /// `nf_conn.status` at the last failure.
    pub status: u32,
    /// Destination-unreachable messages this host generated for the entry.
    pub icmp_count: u32,
    /// Packets of the entry dropped with a failure reason.
    pub drop_count: u32,
    /// Last `enum skb_drop_reason` seen (valid when `drop_count > 0`).
    pub drop_reason: u32,
    /// Last ICMP type and code sent (valid when `icmp_count > 0`).
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The hook of the last failure (`hook::*`).
    pub last_hook: u8,
    pub _pad: u8,
    /// Keeps the tuples 8-byte aligned: the kernel side compares and copies
    /// them as five u64 words.
    pub _pad2: u32,
    /// Raw `tuplehash[IP_CT_DIR_ORIGINAL].tuple`: what the sender addressed.
    pub orig: [u8; TUPLE_SIZE],
    /// Raw `tuplehash[IP_CT_DIR_REPLY].tuple`: its source is the backend the
    /// entry is pinned to.
    pub reply: [u8; TUPLE_SIZE],
}

/// The tuples are copied and compared as u64 words in the kernel.
const _: () = assert!(
    core::mem::offset_of!(FlowEvent, orig) % 8 == 0
        && core::mem::offset_of!(FlowEvent, reply) % 8 == 0
        && TUPLE_SIZE == TUPLE_WORDS * 8
);

/// u64 words of a tuple.
pub const TUPLE_WORDS: usize = 5;

/// u64 words of `struct nf_conn` the kernel side reads in one go on a
/// failing packet: both tuples and the namespace pointer, which sit
/// together (`tuplehash[]` then `status` then `ct_net`).
pub const CT_CHUNK_WORDS: usize = 16;

/// Datagrams this host answered with ICMP port unreachable, by flow: the
/// packet was delivered to the host itself and no socket took it. The kernel
/// has let go of the conntrack entry by then, so the flow comes from the
/// packet's own headers. IPv4 (the icmp_send tracepoint is IPv4 only).
/// Sent like [`FlowEvent`]: first failure, `MIN_FAILURES`, then at most once
/// per interval.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalEvent {
    /// `kind::LOCAL`.
    pub kind: u32,
    /// Inode of the network namespace of the receiving device.
    pub netns: u32,
    pub first_ns: u64,
    pub last_ns: u64,
    pub count: u32,
    /// IP protocol number.
    pub proto: u8,
    pub icmp_code: u8,
    pub _pad: [u8; 2],
    /// Addresses as on the wire (network order).
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Ports as on the wire (network order).
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub _pad2: u32,
}

/// Userspace copies records out of the ring buffer by size: the layouts
/// are fixed, whatever the target.
const _: () = assert!(
    core::mem::size_of::<FlowEvent>() == 56 + 2 * TUPLE_SIZE
        && core::mem::size_of::<LocalEvent>() == 48
        && core::mem::offset_of!(LocalEvent, saddr) == 32
        && core::mem::offset_of!(LocalEvent, sport) == 40
);

/// ICMP code "port unreachable".
pub const ICMP_PORT_UNREACH: u32 = 3;

/// The `FLOWS` map's value: the event userspace gets, and what the kernel
/// keeps to decide when to report it. Userspace reads it on demand for the
/// flows it has raised. The fields a known entry's failing packet reads
/// and writes come first, with the map's own element header and key: a
/// few cache lines fewer to fetch per packet than with the tuples between
/// them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowState {
    /// `nf_conn.ct_net` when the entry was first seen: with the tuples,
    /// tells a reused `nf_conn` from the same entry.
    pub net: u64,
    /// When the entry's tuples were last found the same as its `nf_conn`'s
    /// (see [`VERIFY_NS`]).
    pub checked_ns: u64,
    pub last_emit_ns: u64,
    /// Whether the report that lets userspace raise the entry went out
    /// (`MIN_FAILURES` failures over at least `GRACE_NS`).
    pub reported: u32,
    pub _pad: u32,
    pub event: FlowEvent,
}

/// How long a known entry's failing packets are counted on its `nf_conn`
/// address and namespace alone, before its tuples are compared with the
/// `nf_conn`'s again. The tuples sit on two cache lines of the `nf_conn`
/// that a packet dropped after waiting in a neighbour's queue no longer
/// has in the cache; comparing them once per this long instead of on
/// every packet saves those misses. The price: when the kernel frees an
/// entry and reuses its memory for another flow that fails in the same
/// namespace, up to this long of the new flow's failures count on the old
/// entry before the new one is recorded (and reported) on its own.
pub const VERIFY_NS: u64 = 100_000_000;

/// One slot of the `CACHE` map: a raised entry's failures since they
/// were last added to its `FLOWS` value. A failing packet of the entry
/// that holds the slot (same `nf_conn`, same namespace, before `due_ns`)
/// is counted here, in one cache line found by arithmetic, instead of in
/// the LRU hash map, whose lookup costs a bucket and an element that a
/// packet out of a neighbour's queue no longer has in the cache (and, with
/// elements spread over megabytes, a TLB miss, dear in a virtual machine).
/// Once per `VERIFY_NS` the entry's tuples are compared with the slot's
/// digest of them, as the `FLOWS` path compares them with its copy. The
/// kernel adds the slot to the entry's `FLOWS` value on its first packet
/// from `due_ns` (when its next report is due, which then carries them, or
/// after [`CACHE_HOLD_NS`]),
/// and userspace adds what is still here whenever it reads `FLOWS` (see
/// [`cache_slot`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowCache {
    /// The entry's `nf_conn` address, 0 for a free slot.
    pub ct: u64,
    /// `FlowState::net` of the entry.
    pub net: u64,
    /// Failures are counted here until then: the entry's next report is
    /// due (the `FLOWS` path sends it, and holds the slot again), or
    /// `CACHE_HOLD_NS` has passed.
    pub due_ns: u64,
    /// When the entry's tuples are to be compared with `digest` again.
    pub verify_ns: u64,
    /// [`tuple_digest`] of the entry's tuples.
    pub digest: u64,
    pub last_ns: u64,
    /// Failures not yet added to the `FLOWS` value.
    pub icmp_count: u32,
    pub drop_count: u32,
    pub status: u32,
    /// The last drop reason (below `DROP_REASON_MAX`).
    pub drop_reason: u16,
    pub icmp_code: u8,
    pub last_hook: u8,
}

/// A digest of an entry's two tuples (as the kernel side reads them, in
/// u64 words): a reused `nf_conn` holding another flow differs in it.
#[inline(always)]
pub fn tuple_digest(orig: &[u64; TUPLE_WORDS], reply: &[u64; TUPLE_WORDS]) -> u64 {
    // Written out: a loop over the words would be a pointer the BPF
    // verifier cannot bound.
    #[inline(always)]
    fn mix(h: u64, w: u64) -> u64 {
        let h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ h >> 29
    }
    let h = mix(
        mix(mix(mix(mix(0, orig[0]), orig[1]), orig[2]), orig[3]),
        orig[4],
    );
    mix(
        mix(mix(mix(mix(h, reply[0]), reply[1]), reply[2]), reply[3]),
        reply[4],
    )
}

/// A slot is one cache line.
const _: () = assert!(core::mem::size_of::<FlowCache>() == 64);

/// Most slots of the `CACHE` map (256 KiB, 64 pages): `--max-flows`
/// rounded up to a power of two, up to this. More would cost TLB misses:
/// with 65,536 slots (4 MiB) a 1,000-flow flood cost about 40 ns a packet
/// more than with 4,096. Raised flows beyond it (two in one slot) are
/// counted in `FLOWS`, as without the cache; a flow failing less than
/// once per `VERIFY_NS` gains little from a slot anyway.
pub const CACHE_SLOTS_MAX: u32 = 4_096;

/// The slot of an `nf_conn` in a `CACHE` of `mask + 1` slots (a power of
/// two): a multiplicative hash of its address, the same in the kernel and
/// in userspace. The entry may hold this slot or its neighbour `slot ^ 1`
/// (two ways: with one, about one flow in eight of 1,000 shared a slot
/// with another and went the `FLOWS` way).
#[inline(always)]
pub fn cache_slot(ct: u64, mask: u32) -> u32 {
    (ct.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32 & mask
}

/// Longest a slot counts an entry's failures before they go to its
/// `FLOWS` value, even when no report is due: the value (and its LRU
/// recency, which a slot's packets do not refresh) lags by at most this
/// much, and an entry that the LRU evicted anyway is recorded again, with
/// a first report, within this long, as it was on its next packet without
/// the cache.
pub const CACHE_HOLD_NS: u64 = 1_000_000_000;

/// A slot whose holder failed last this long ago may be taken by another
/// raised entry that maps to it (its failures then go to its `FLOWS`
/// value first).
pub const CACHE_IDLE_NS: u64 = 1_000_000_000;

/// The `LOCALS` map's key: a flow as a refused datagram shows it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LocalKey {
    pub netns: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct LocalState {
    pub event: LocalEvent,
    pub last_emit_ns: u64,
    /// As in [`FlowState`].
    pub reported: u32,
    pub _pad: u32,
}

/// Slots of the `CAUSES` per-CPU array: failed packets by cause. A drop
/// counts at its `enum skb_drop_reason` number, an ICMP destination
/// unreachable at `CAUSE_ICMP + code`.
pub const CAUSE_ICMP: u32 = DROP_REASON_MAX;
pub const CAUSES: u32 = DROP_REASON_MAX + 16;

/// Counters in the `STATS` per-CPU array, by index.
pub mod stat {
    /// Events that did not fit in the ring buffer.
    pub const EVENTS_LOST: u32 = 0;
    /// Failures of DNATed entries seen (packets, both hooks).
    pub const FAILURES: u32 = 1;
    /// Events written to the ring buffer.
    pub const EVENTS_SENT: u32 = 2;
    /// Kernel reads that failed (a struct layout we did not expect).
    pub const READ_ERRORS: u32 = 3;
    /// Entries inserted into `FLOWS` and `LOCALS` (never deleted: the
    /// difference to their occupancy is what LRU evicted).
    pub const FLOWS_INSERTED: u32 = 4;
    pub const LOCALS_INSERTED: u32 = 5;
    /// Reports that woke userspace (at most one per `WAKE_GAP_NS`).
    pub const WAKEUPS: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// The programs wake userspace at most once per this long: a wakeup is an
/// interrupt (an inter-processor interrupt to itself, a VM exit on a
/// virtual machine) that costs the failing packet's CPU microseconds, and
/// thousands of flows raised at once must not each pay it. A report left
/// unannounced inside the gap is read by the look userspace takes this
/// long after each wakeup.
pub const WAKE_GAP_NS: u64 = 5_000_000;

/// Names of the read-only globals that userspace sets from BTF at load time.
pub mod globals {
    pub const OFF_SKB_NFCT: &str = "OFF_SKB_NFCT";
    pub const OFF_CT_STATUS: &str = "OFF_CT_STATUS";
    pub const OFF_CT_CHUNK: &str = "OFF_CT_CHUNK";
    pub const CHUNK_ORIG: &str = "CHUNK_ORIG";
    pub const CHUNK_REPLY: &str = "CHUNK_REPLY";
    pub const CHUNK_NET: &str = "CHUNK_NET";
    pub const MIN_FAILURES: &str = "MIN_FAILURES";
    pub const GRACE_NS: &str = "GRACE_NS";
    pub const OFF_NET_NS_INUM: &str = "OFF_NET_NS_INUM";
    pub const NETNS_FILTER: &str = "NETNS_FILTER";
    pub const EMIT_INTERVAL_NS: &str = "EMIT_INTERVAL_NS";
    pub const REPORTED_INTERVAL_NS: &str = "REPORTED_INTERVAL_NS";
    pub const CAST_CT: &str = "CAST_CT";
    pub const NF_CONN_BTF_ID: &str = "NF_CONN_BTF_ID";
    pub const DROP_REASONS: &str = "DROP_REASONS";
    pub const DROP_REASONS_V6: &str = "DROP_REASONS_V6";
    pub const DEAD_REASONS: &str = "DEAD_REASONS";
    pub const NEIGH_INVALIDATE_AT: &str = "NEIGH_INVALIDATE_AT";
    pub const NEIGH_INVALIDATE_SIZE: &str = "NEIGH_INVALIDATE_SIZE";
    pub const OFF_SKB_PROTOCOL: &str = "OFF_SKB_PROTOCOL";
    pub const OFF_SKB_HEAD: &str = "OFF_SKB_HEAD";
    pub const OFF_SKB_NETWORK_HEADER: &str = "OFF_SKB_NETWORK_HEADER";
    pub const OFF_SKB_TRANSPORT_HEADER: &str = "OFF_SKB_TRANSPORT_HEADER";
    pub const OFF_SKB_DEV: &str = "OFF_SKB_DEV";
    pub const OFF_DEV_NET: &str = "OFF_DEV_NET";
    pub const CACHE_MASK: &str = "CACHE_MASK";
}

/// Names of the programs and maps in the object file.
pub mod names {
    pub const PROG_ICMP_SEND: &str = "icmp_send";
    pub const PROG_KFREE_SKB: &str = "kfree_skb";
    /// A program that does nothing, on the same tracepoint as
    /// `PROG_KFREE_SKB`: what the benchmark measures as the floor.
    pub const PROG_EMPTY_KFREE_SKB: &str = "empty_kfree_skb";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_FLOWS: &str = "FLOWS";
    pub const MAP_LOCALS: &str = "LOCALS";
    pub const MAP_CAUSES: &str = "CAUSES";
    pub const MAP_STATS: &str = "STATS";
    pub const MAP_CACHE: &str = "CACHE";
}

#[cfg(feature = "user")]
// SAFETY: FlowEvent is repr(C), Copy, and every bit pattern is a valid value.
unsafe impl aya::Pod for FlowEvent {}

#[cfg(feature = "user")]
// SAFETY: as for FlowEvent.
unsafe impl aya::Pod for LocalEvent {}

#[cfg(feature = "user")]
// SAFETY: repr(C) plain data, every bit pattern valid.
unsafe impl aya::Pod for FlowState {}

#[cfg(feature = "user")]
// SAFETY: as for FlowEvent.
unsafe impl aya::Pod for FlowCache {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for LocalKey {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for LocalState {}
