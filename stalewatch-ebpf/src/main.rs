//! Kernel side of stalewatch.
//!
//! Two BTF tracepoint programs watch where the kernel gives up on a packet:
//! `icmp:icmp_send` (this host answers "destination unreachable") and
//! `skb:kfree_skb` (the packet is dropped, with a reason). Both hand the
//! packet to [`record_failure`], which keeps only packets whose conntrack
//! entry was DNATed, or whose destination no neighbour answers (a dead
//! destination, whatever the entry's NAT), aggregates failures per entry
//! in the `FLOWS` map and
//! tells userspace about an entry on its first failure, on the failure that
//! reaches `MIN_FAILURES`, and then at most once per `EMIT_INTERVAL_NS`
//! (`REPORTED_INTERVAL_NS` once reported): userspace work grows with
//! failing flows, not with failing packets, and between reports userspace
//! reads the counters from the map. Only the report that lets an entry be
//! raised wakes userspace at once, and at most one report per
//! `WAKE_GAP_NS` does; the others wait for its next look.
//!
//! A failing packet of a known entry costs a few plain loads (the packet's
//! conntrack pointer, the entry's status and namespace, on one cache line
//! of the entry), one map lookup and, once per `VERIFY_NS`, the entry's
//! tuples; the clock is read once a jiffy per CPU. The entry is no typed
//! pointer to the
//! verifier: on kernels with `bpf_rdonly_cast` (6.2+) it is cast to one, so
//! that loading through it needs no helper call; elsewhere two helper reads
//! do it (see `rdonly_cast`).
//!
//! No CO-RE here: every struct offset is a read-only global that userspace
//! resolves from the running kernel's BTF before loading.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ptr::read_volatile;

    use aya_ebpf::{
        bindings::{
            BPF_ANY, BPF_F_MMAPABLE, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
            BPF_RB_NO_WAKEUP,
        },
        helpers::{
            bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
        },
        macros::{btf_tracepoint, map},
        maps::{Array, LruHashMap, PerCpuArray, RingBuf},
        programs::BtfTracePointContext,
    };
    use stalewatch_common::{
        CACHE_HOLD_NS, CACHE_IDLE_NS, CACHE_SLOTS_MAX, CAUSE_ICMP, CAUSES as CAUSE_SLOTS,
        CT_CHUNK_WORDS, DROP_REASON_MAX, DROP_REASON_WORDS, ETH_P_IPV6_BE, FlowCache, FlowEvent,
        FlowState, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, LocalEvent, LocalKey, LocalState,
        RDONLY_CAST_CALL, TUPLE_SIZE, TUPLE_WORDS, VERIFY_NS, WAKE_GAP_NS, cache_slot, ct_status,
        hook, kind, stat, tuple_digest,
    };

    // Read-only globals, set by userspace from BTF (see stalewatch-common's
    // `globals`). Zero offsets are never valid for these fields, so a program
    // loaded without them reads nothing useful and userspace refuses that.
    #[unsafe(no_mangle)]
    static OFF_SKB_NFCT: u64 = 0;
    #[unsafe(no_mangle)]
    static OFF_CT_STATUS: u64 = 0;
    /// 1 when `rdonly_cast` is the kernel's `bpf_rdonly_cast` (see
    /// stalewatch-common's `RDONLY_CAST_CALL`): an entry's status is then
    /// a plain load. 0: read with a helper call, as on kernels before 6.2.
    #[unsafe(no_mangle)]
    static CAST_CT: u32 = 0;
    /// The BTF id of `struct nf_conn` in the kernel's BTF.
    #[unsafe(no_mangle)]
    static NF_CONN_BTF_ID: u32 = 0;
    /// Where the chunk of `nf_conn` read on a failing packet starts, and
    /// where in it (in u64 words) the tuples and the namespace pointer are.
    #[unsafe(no_mangle)]
    static OFF_CT_CHUNK: u64 = 0;
    #[unsafe(no_mangle)]
    static CHUNK_ORIG: u32 = 0;
    #[unsafe(no_mangle)]
    static CHUNK_REPLY: u32 = 0;
    #[unsafe(no_mangle)]
    static CHUNK_NET: u32 = 0;
    #[unsafe(no_mangle)]
    static OFF_NET_NS_INUM: u64 = 0;
    /// Only this network namespace (inode), or every namespace when 0.
    #[unsafe(no_mangle)]
    static NETNS_FILTER: u32 = 0;
    #[unsafe(no_mangle)]
    static EMIT_INTERVAL_NS: u64 = 1_000_000_000;
    /// The same for an entry already reported at `MIN_FAILURES`: userspace
    /// reads raised entries from the map, so these reports only let it look
    /// again at entries it did not raise.
    #[unsafe(no_mangle)]
    static REPORTED_INTERVAL_NS: u64 = 60_000_000_000;
    /// Failed packets at which an entry is reported at once, whatever the
    /// interval: userspace raises it on that report...
    #[unsafe(no_mangle)]
    static MIN_FAILURES: u32 = 2;
    /// ... over at least this long: a burst that an orchestrator cleans up
    /// at once is no stale flow.
    #[unsafe(no_mangle)]
    static GRACE_NS: u64 = 500_000_000;
    /// Bitmap of the `enum skb_drop_reason` values that count as a failure.
    #[unsafe(no_mangle)]
    static DROP_REASONS: [u64; DROP_REASON_WORDS] = [0; DROP_REASON_WORDS];
    /// Reasons that count only for IPv6 packets: IPv6 neighbour discovery
    /// failures are dropped as NOT_SPECIFIED, a reason far too common to
    /// follow for every packet.
    #[unsafe(no_mangle)]
    static DROP_REASONS_V6: [u64; DROP_REASON_WORDS] = [0; DROP_REASON_WORDS];
    /// Reasons that say no neighbour answers for the packet's destination:
    /// a failure worth following for an entry without NAT too (a host that
    /// receives traffic for a dead address, pinned by another host's
    /// entry).
    #[unsafe(no_mangle)]
    static DEAD_REASONS: [u64; DROP_REASON_WORDS] = [0; DROP_REASON_WORDS];
    /// Where `neigh_invalidate` lies in the kernel's text (its address and
    /// size, from /proc/kallsyms; size 0 when unknown). IPv6 drops the
    /// packets queued for a neighbour that never answered there, with no
    /// specific reason (`ndisc_error_report` tail-calls `kfree_skb`), so
    /// that drop site is what tells a dead IPv6 destination.
    #[unsafe(no_mangle)]
    static NEIGH_INVALIDATE_AT: u64 = 0;
    #[unsafe(no_mangle)]
    static NEIGH_INVALIDATE_SIZE: u64 = 0;
    #[unsafe(no_mangle)]
    static OFF_SKB_PROTOCOL: u64 = 0;
    #[unsafe(no_mangle)]
    static OFF_SKB_HEAD: u64 = 0;
    #[unsafe(no_mangle)]
    static OFF_SKB_NETWORK_HEADER: u64 = 0;
    #[unsafe(no_mangle)]
    static OFF_SKB_TRANSPORT_HEADER: u64 = 0;
    #[unsafe(no_mangle)]
    static OFF_SKB_DEV: u64 = 0;
    /// `net_device.nd_net.net`.
    #[unsafe(no_mangle)]
    static OFF_DEV_NET: u64 = 0;
    /// Slots of `CACHE` less one (a power of two less one), as userspace
    /// sized it.
    #[unsafe(no_mangle)]
    static CACHE_MASK: u32 = 0;

    /// 2 MiB: room for about 14,000 reports, so that a burst of new failing
    /// flows (two reports each within milliseconds) waits for userspace.
    #[map(name = "EVENTS")]
    static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
    const EVENTS_BYTES: u32 = 2 * 1024 * 1024;
    /// Reports waiting beyond this wake userspace whatever their kind: a
    /// burst of reports that wake no one must not fill the ring buffer.
    const WAKE_AT_BYTES: u64 = EVENTS_BYTES as u64 / 8;

    /// When a report last woke userspace (CLOCK_MONOTONIC ns), for every
    /// CPU: see `WAKE_GAP_NS`.
    #[map(name = "WOKEN")]
    static WOKEN: Array<u64> = Array::with_max_entries(1, 0);

    /// Failing entries by `struct nf_conn *`. LRU: a flood of distinct failing
    /// flows evicts the oldest instead of failing inserts. Userspace may
    /// resize it before load.
    #[map(name = "FLOWS")]
    static FLOWS: LruHashMap<u64, FlowState> = LruHashMap::with_max_entries(65_536, 0);

    /// Raised entries' failures, direct-mapped by `nf_conn` address (see
    /// stalewatch-common's `FlowCache`). Mmapable: userspace reads the
    /// slots of the entries it reads from `FLOWS` in place, and a slot is
    /// one whole cache line of the page-aligned array.
    #[map(name = "CACHE")]
    static CACHE: Array<FlowCache> = Array::with_max_entries(CACHE_SLOTS_MAX, BPF_F_MMAPABLE);

    #[map(name = "LOCALS")]
    static LOCALS: LruHashMap<LocalKey, LocalState> = LruHashMap::with_max_entries(16_384, 0);

    #[map(name = "STATS")]
    static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

    /// Per CPU: the jiffy in which the clock was last read, and what it
    /// read (see `now`).
    #[map(name = "CLOCK")]
    static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

    /// Failed packets by cause (see stalewatch-common's `CAUSE_ICMP`).
    #[map(name = "CAUSES")]
    static CAUSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(CAUSE_SLOTS, 0);

    const NFCT_PTRMASK: u64 = !7;

    #[inline(always)]
    fn global<T: Copy>(value: &'static T) -> T {
        // SAFETY: a plain read of a global; volatile so that the compiler
        // does not fold the value userspace overrides at load time.
        unsafe { read_volatile(value) }
    }

    #[inline(always)]
    fn count(index: u32) {
        count_in(&STATS, index);
    }

    /// Counts a failed packet by its cause: the drop reason, or the ICMP code.
    #[inline(always)]
    fn count_cause(hook_id: u8, icmp_code: u8, drop_reason: u32) {
        let slot = if hook_id == hook::ICMP_SEND {
            CAUSE_ICMP + u32::from(icmp_code & 15)
        } else {
            drop_reason
        };
        count_in(&CAUSES, slot);
    }

    #[inline(always)]
    fn count_in(array: &PerCpuArray<u64>, index: u32) {
        if let Some(counter) = array.get_ptr_mut(index) {
            // SAFETY: a per-CPU slot, only this CPU writes it.
            unsafe { *counter += 1 };
        }
    }

    #[inline(always)]
    fn read<T>(addr: u64) -> Result<T, ()> {
        // SAFETY: bpf_probe_read_kernel checks the address; a bad one fails.
        unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| count(stat::READ_ERRORS))
    }

    /// A field of the tracepoint's own `struct sk_buff *` argument, loaded
    /// directly: the argument is a BTF pointer, and the offset a frozen
    /// read-only global, so the verifier knows which field this is and
    /// checks it against the kernel's BTF; no helper call.
    #[inline(always)]
    fn skb_field<T: Copy>(skb: u64, offset: &'static u64) -> T {
        // SAFETY: verified by the kernel at load time (see above); a field
        // of a live packet for the length of the program.
        unsafe { read_volatile((skb + global(offset)) as *const T) }
    }

    /// `bpf_rdonly_cast(obj, btf_id)`, written as a call of the helper
    /// numbered `RDONLY_CAST_CALL` (Rust's BPF target has no kfunc calls),
    /// which userspace rewrites before loading. With `CAST_CT` set, the
    /// verifier knows the result as a read-only `struct nf_conn *`: loads
    /// through it are plain loads (one that faulted would read 0, through
    /// the kernel's exception table, not crash); the kernel inlines the
    /// call itself as `r0 = r1`. Else it is `r0 = r1`, and unused.
    #[inline(always)]
    fn rdonly_cast(obj: u64, btf_id: u32) -> u64 {
        // SAFETY: see above: the call is rewritten before the program loads.
        unsafe {
            let cast: unsafe extern "C" fn(u64, u32) -> u64 =
                core::mem::transmute(RDONLY_CAST_CALL as usize);
            cast(obj, btf_id)
        }
    }

    /// A field of an entry through a pointer from `rdonly_cast`.
    #[inline(always)]
    fn load<T: Into<u64> + Copy>(at: u64) -> u64 {
        // SAFETY: a BTF-typed load that the verifier checks, made safe
        // against faults by the kernel (see `rdonly_cast`).
        unsafe { read_volatile(at as *const T) }.into()
    }

    /// A `struct nf_conntrack_tuple` at `at` (from `rdonly_cast`) as the
    /// five u64 words its 40 bytes make: source address (16 bytes), port
    /// (2), l3num (2), destination address (16), port (2), protonum (1),
    /// dir (1).
    #[inline(always)]
    fn load_tuple(at: u64) -> [u64; TUPLE_WORDS] {
        [
            load::<u64>(at),
            load::<u64>(at + 8),
            load::<u16>(at + 16) | load::<u16>(at + 18) << 16 | load::<u32>(at + 20) << 32,
            load::<u64>(at + 24),
            load::<u32>(at + 32)
                | load::<u16>(at + 36) << 32
                | load::<u8>(at + 38) << 48
                | load::<u8>(at + 39) << 56,
        ]
    }

    /// An entry's status: one load (see `rdonly_cast`), or a helper call
    /// where the kernel has no `bpf_rdonly_cast`. Unrelated drops of
    /// tracked packets pay this, so it is worth the trouble.
    #[inline(always)]
    fn ct_status_of(ct: u64) -> Result<u32, ()> {
        if global(&CAST_CT) != 0 {
            let ct = rdonly_cast(ct, global(&NF_CONN_BTF_ID));
            Ok(load::<u32>(ct + global(&OFF_CT_STATUS)) as u32)
        } else {
            read(ct + global(&OFF_CT_STATUS))
        }
    }

    /// The part of one `nf_conn` that holds its tuples (and its namespace
    /// pointer), read at once with a helper (kernels without
    /// `bpf_rdonly_cast`).
    struct Chunk([u64; CT_CHUNK_WORDS]);

    /// An entry's original and reply tuples. With `CAST_CT`, loaded field
    /// by field through `bpf_rdonly_cast`: no helper call, no copy (the
    /// verifier lets a load span array elements but not struct fields, so
    /// `load_tuple` assembles each tuple, whose layout userspace checked,
    /// from nine loads). Else one helper read of the chunk that holds both.
    #[inline(always)]
    fn tuples_of(ct: u64) -> Result<([u64; TUPLE_WORDS], [u64; TUPLE_WORDS]), ()> {
        if global(&CAST_CT) != 0 {
            let at = rdonly_cast(ct, global(&NF_CONN_BTF_ID)) + global(&OFF_CT_CHUNK);
            let word = |i: u32| at + 8 * u64::from(i);
            return Ok((
                load_tuple(word(global(&CHUNK_ORIG))),
                load_tuple(word(global(&CHUNK_REPLY))),
            ));
        }
        let chunk = Chunk::read(ct)?;
        Ok((
            chunk.tuple(global(&CHUNK_ORIG))?,
            chunk.tuple(global(&CHUNK_REPLY))?,
        ))
    }

    /// An entry's namespace pointer alone: on the cache line of its status,
    /// which the packet has just loaded.
    #[inline(always)]
    fn net_of(ct: u64) -> Result<u64, ()> {
        let at = global(&OFF_CT_CHUNK) + 8 * u64::from(global(&CHUNK_NET));
        if global(&CAST_CT) != 0 {
            Ok(load::<u64>(rdonly_cast(ct, global(&NF_CONN_BTF_ID)) + at))
        } else {
            read(ct + at)
        }
    }

    impl Chunk {
        #[inline(always)]
        fn read(ct: u64) -> Result<Chunk, ()> {
            let mut chunk = Chunk([0; CT_CHUNK_WORDS]);
            // SAFETY: as in `read`; the buffer is plain u64s.
            let bytes = unsafe {
                core::slice::from_raw_parts_mut(
                    chunk.0.as_mut_ptr().cast::<u8>(),
                    CT_CHUNK_WORDS * 8,
                )
            };
            // SAFETY: as in `read`.
            unsafe { bpf_probe_read_kernel_buf((ct + global(&OFF_CT_CHUNK)) as *const u8, bytes) }
                .map_err(|_| count(stat::READ_ERRORS))?;
            Ok(chunk)
        }

        /// The tuple at word `at`. Userspace checked that every index fits;
        /// the bound here is for the verifier.
        #[inline(always)]
        fn tuple(&self, at: u32) -> Result<[u64; TUPLE_WORDS], ()> {
            let at = at as usize;
            if at > CT_CHUNK_WORDS - TUPLE_WORDS {
                return Err(());
            }
            let w = &self.0;
            Ok([w[at], w[at + 1], w[at + 2], w[at + 3], w[at + 4]])
        }
    }

    /// Word by word, without branches (an array `==` may become a byte
    /// loop or a bcmp call on this target).
    #[inline(always)]
    fn same(a: &[u64; TUPLE_WORDS], b: &[u64; TUPLE_WORDS]) -> bool {
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) == 0
    }

    /// A tuple field of an event as the u64 words it is compared and
    /// copied as (it sits 8-byte aligned: see stalewatch-common).
    #[inline(always)]
    fn words(tuple: &mut [u8; TUPLE_SIZE]) -> &mut [u64; TUPLE_WORDS] {
        // SAFETY: FlowEvent keeps its tuples 8-byte aligned (asserted in
        // stalewatch-common) and every bit pattern is a valid u64.
        unsafe { &mut *tuple.as_mut_ptr().cast::<[u64; TUPLE_WORDS]>() }
    }

    #[btf_tracepoint(function = "icmp_send")]
    pub fn icmp_send(ctx: BtfTracePointContext) -> u32 {
        // TP_PROTO(const struct sk_buff *skb, int type, int code)
        let icmp_type: i32 = ctx.arg(1);
        if icmp_type as u32 != ICMP_DEST_UNREACH {
            return 0;
        }
        let icmp_code: i32 = ctx.arg(2);
        let skb: u64 = ctx.arg(0);
        // Host unreachable: no neighbour answers for the destination.
        let dead = icmp_code == 1;
        if record_failure(skb, hook::ICMP_SEND, icmp_code as u8, 0, dead) == Ok(false)
            && icmp_code as u32 == ICMP_PORT_UNREACH
        {
            let _ = record_local(skb, icmp_code as u8);
        }
        0
    }

    /// A datagram delivered to this host that no socket took. Its flow may
    /// bypass a DNAT (an entry made while no rule existed); userspace
    /// decides, from the conntrack table. The UDP receive path has already
    /// dropped the packet's conntrack reference, so the flow is read from
    /// the packet's own IPv4 and transport headers.
    #[inline(always)]
    fn record_local(skb: u64, icmp_code: u8) -> Result<(), ()> {
        let dev: u64 = read(skb + global(&OFF_SKB_DEV))?;
        if dev == 0 {
            return Ok(());
        }
        let net: u64 = read(dev + global(&OFF_DEV_NET))?;
        let netns: u32 = read(net + global(&OFF_NET_NS_INUM))?;
        let filter = global(&NETNS_FILTER);
        if filter != 0 && filter != netns {
            return Ok(());
        }
        let head: u64 = read(skb + global(&OFF_SKB_HEAD))?;
        let network: u16 = read(skb + global(&OFF_SKB_NETWORK_HEADER))?;
        let transport: u16 = read(skb + global(&OFF_SKB_TRANSPORT_HEADER))?;
        // IPv4 header: protocol at 9, addresses at 12 and 16.
        let ip: [u8; 20] = read(head + u64::from(network))?;
        if ip[0] >> 4 != 4 {
            return Ok(());
        }
        let ports: [u8; 4] = read(head + u64::from(transport))?;
        let key = LocalKey {
            netns,
            saddr: [ip[12], ip[13], ip[14], ip[15]],
            daddr: [ip[16], ip[17], ip[18], ip[19]],
            sport: [ports[0], ports[1]],
            dport: [ports[2], ports[3]],
            proto: u32::from(ip[9]),
        };
        count_cause(hook::ICMP_SEND, icmp_code, 0);
        let now = now();
        if let Some(state) = LOCALS.get_ptr_mut(&key) {
            // SAFETY: a value of our own map, alive while the program runs.
            let state = unsafe { &mut *state };
            state.event.count = state.event.count.wrapping_add(1);
            state.event.last_ns = state.event.last_ns.max(now);
            if let Some(urgent) = due(
                &mut state.reported,
                state.event.count,
                state.event.first_ns,
                state.last_emit_ns,
                now,
            ) {
                state.last_emit_ns = now;
                emit(&state.event, urgent, now);
            }
            return Ok(());
        }
        let state = LocalState {
            event: LocalEvent {
                kind: kind::LOCAL,
                netns,
                first_ns: now,
                last_ns: now,
                count: 1,
                proto: ip[9],
                icmp_code,
                _pad: [0; 2],
                saddr: key.saddr,
                daddr: key.daddr,
                sport: key.sport,
                dport: key.dport,
                _pad2: 0,
            },
            last_emit_ns: now,
            reported: 0,
            _pad: 0,
        };
        if LOCALS.insert(&key, &state, BPF_ANY as u64).is_ok() {
            count(stat::LOCALS_INSERTED);
        }
        emit(&state.event, raised_at_first(), now);
        Ok(())
    }

    #[btf_tracepoint(function = "kfree_skb")]
    pub fn kfree_skb(ctx: BtfTracePointContext) -> u32 {
        // TP_PROTO(struct sk_buff *skb, void *location,
        //          enum skb_drop_reason reason, struct sock *rx_sk)
        // Most drops are of no interest: decide on the reason first, from
        // the argument alone, before touching the packet.
        let reason: u32 = ctx.arg(2);
        if reason >= DROP_REASON_MAX {
            return 0;
        }
        let skb: u64 = ctx.arg(0);
        let mut dead = false;
        if !has(&DROP_REASONS, reason) {
            if !has(&DROP_REASONS_V6, reason) {
                return 0;
            }
            if skb_field::<u16>(skb, &OFF_SKB_PROTOCOL) != ETH_P_IPV6_BE {
                return 0;
            }
            // IPv6's neighbour failures come as NOT_SPECIFIED, a reason
            // too vague to follow without NAT; where they were dropped
            // tells them.
            let location: u64 = ctx.arg(1);
            dead = location.wrapping_sub(global(&NEIGH_INVALIDATE_AT))
                < global(&NEIGH_INVALIDATE_SIZE);
        }
        let dead = dead || has(&DEAD_REASONS, reason);
        let _ = record_failure(skb, hook::KFREE_SKB, 0, reason, dead);
        0
    }

    /// Does nothing. stalewatch never attaches it: the benchmark does, where
    /// `kfree_skb` goes, to measure what any program of this kind costs on
    /// that tracepoint (the floor under every drop the host makes).
    #[btf_tracepoint(function = "kfree_skb")]
    pub fn empty_kfree_skb(_ctx: BtfTracePointContext) -> u32 {
        0
    }

    /// CLOCK_MONOTONIC, read at most once a jiffy on each CPU: later
    /// failures in the same jiffy take that read, at most a jiffy (1-10 ms)
    /// behind, which is far finer than any interval the times serve
    /// (`GRACE_NS`, reports, userspace's seconds). The read itself
    /// (`bpf_ktime_get_ns`, an ordered TSC read) waits for every load before
    /// it, among them the misses of a packet that waited in a neighbour's
    /// queue; `jiffies` is a plain load, and the coarse clock is not
    /// allowed in tracing programs.
    #[inline(always)]
    fn now() -> u64 {
        // SAFETY: no preconditions (the kernel inlines it as a load).
        let jiffy = unsafe { bpf_jiffies64() };
        let Some(clock) = CLOCK.get_ptr_mut(0) else {
            // SAFETY: no preconditions.
            return unsafe { bpf_ktime_get_ns() };
        };
        // SAFETY: this CPU's slot of our own map; a program is not
        // migrated while it runs, and one that interrupts another on this
        // CPU at worst reads the clock once more.
        let clock = unsafe { &mut *clock };
        if clock[0] == jiffy {
            return clock[1];
        }
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        clock[0] = jiffy;
        clock[1] = now;
        now
    }

    /// Whether a drop reason bitmap holds `reason` (below DROP_REASON_MAX):
    /// one load of the word that holds it, not a copy of the bitmap.
    #[inline(always)]
    fn has(bitmap: &'static [u64; DROP_REASON_WORDS], reason: u32) -> bool {
        let word = (reason / 64) as usize % DROP_REASON_WORDS;
        // SAFETY: a plain read of a global, volatile as in `global`.
        let bits = unsafe { read_volatile(&bitmap[word]) };
        bits & (1u64 << (reason % 64)) != 0
    }

    /// Counts a failed packet against its DNATed conntrack entry. `Ok(false)`
    /// when the packet has no conntrack entry at all.
    #[inline(always)]
    /// A failing packet: kept when its entry was DNATed, or when `dead`
    /// (no neighbour answers for its destination) whatever its NAT.
    fn record_failure(
        skb: u64,
        hook_id: u8,
        icmp_code: u8,
        drop_reason: u32,
        dead: bool,
    ) -> Result<bool, ()> {
        let nfct: u64 = skb_field(skb, &OFF_SKB_NFCT);
        let ct = nfct & NFCT_PTRMASK;
        if ct == 0 {
            return Ok(false);
        }
        let status = ct_status_of(ct)?;
        if status & ct_status::DST_NAT == 0 && !dead {
            return Ok(true);
        }
        let now = now();
        let net = net_of(ct)?;

        // A raised entry that holds its slot: counted there, no FLOWS
        // lookup (see `FlowCache`). Its tuples are compared with the
        // slot's digest of them once per `VERIFY_NS`, as below with the
        // FLOWS copy; a reused `nf_conn` goes the FLOWS way.
        let slot = pick_slot(ct);
        if let Some(cache) = slot {
            // SAFETY: a value of our own map, alive while the program runs;
            // races with another CPU only ever lose a count (see `update`).
            let cache = unsafe { &mut *cache };
            let mut held = cache.ct == ct && cache.net == net && now < cache.due_ns;
            if held && now >= cache.verify_ns {
                let (orig, reply) = tuples_of(ct)?;
                held = tuple_digest(&orig, &reply) == cache.digest;
                if held {
                    cache.verify_ns = now.saturating_add(VERIFY_NS);
                }
            }
            if held {
                if hook_id == hook::ICMP_SEND {
                    cache.icmp_count = cache.icmp_count.wrapping_add(1);
                    cache.icmp_code = icmp_code;
                } else {
                    cache.drop_count = cache.drop_count.wrapping_add(1);
                    cache.drop_reason = drop_reason as u16;
                }
                cache.last_ns = cache.last_ns.max(now);
                cache.status = status;
                cache.last_hook = hook_id;
                count(stat::FAILURES);
                count_cause(hook_id, icmp_code, drop_reason);
                return Ok(true);
            }
        }

        // A known entry: it passed the namespace filter when first seen.
        // Another flow in a reused nf_conn differs in its tuples (a flow
        // re-created after its entry was deleted goes to another backend)
        // or its namespace. The tuples are compared once per `VERIFY_NS`
        // (see there); the namespace on every packet.
        let mut tuples = None;
        if let Some(state) = FLOWS.get_ptr_mut(&ct) {
            // SAFETY: a value of our own map, alive while the program runs.
            let state = unsafe { &mut *state };
            if state.net == net {
                if let Some(cache) = slot {
                    // SAFETY: as above.
                    let cache = unsafe { &mut *cache };
                    if cache.ct == ct && cache.net == net {
                        take_cached(state, cache);
                    }
                }
                let mut known = true;
                if now.saturating_sub(state.checked_ns) >= VERIFY_NS {
                    let (orig, reply) = tuples_of(ct)?;
                    known = same(words(&mut state.event.orig), &orig)
                        && same(words(&mut state.event.reply), &reply);
                    if known {
                        state.checked_ns = now;
                    } else {
                        tuples = Some((orig, reply));
                    }
                }
                if known {
                    count(stat::FAILURES);
                    count_cause(hook_id, icmp_code, drop_reason);
                    update(state, now, status, hook_id, icmp_code, drop_reason);
                    if let Some(cache) = slot {
                        // SAFETY: as above.
                        hold_slot(unsafe { &mut *cache }, ct, net, state, now);
                    }
                    return Ok(true);
                }
            }
        }
        // Another namespace's entry is left before its tuples are read: a
        // watch of one namespace meets every other's failing packets too.
        let netns: u32 = read(net + global(&OFF_NET_NS_INUM))?;
        let filter = global(&NETNS_FILTER);
        if filter != 0 && filter != netns {
            return Ok(true);
        }
        if let Some(cache) = slot {
            // SAFETY: as above.
            let cache = unsafe { &mut *cache };
            if cache.ct == ct {
                // Counts of a record that is gone (evicted, or replaced by
                // this one): not to be added to the new record, here or by
                // userspace.
                cache.ct = 0;
                cache.icmp_count = 0;
                cache.drop_count = 0;
            }
        }
        let (orig, reply) = match tuples {
            Some(tuples) => tuples,
            None => tuples_of(ct)?,
        };
        count(stat::FAILURES);
        count_cause(hook_id, icmp_code, drop_reason);
        let mut state = FlowState {
            event: FlowEvent {
                kind: kind::FLOW,
                ct,
                first_ns: now,
                last_ns: now,
                netns,
                status,
                icmp_count: 0,
                drop_count: 0,
                drop_reason: 0,
                icmp_type: 0,
                icmp_code: 0,
                last_hook: hook_id,
                _pad: 0,
                _pad2: 0,
                orig: [0; TUPLE_SIZE],
                reply: [0; TUPLE_SIZE],
            },
            last_emit_ns: now,
            net,
            checked_ns: now,
            reported: 0,
            _pad: 0,
        };
        *words(&mut state.event.orig) = orig;
        *words(&mut state.event.reply) = reply;
        note(&mut state.event, hook_id, icmp_code, drop_reason);
        if FLOWS.insert(&ct, &state, BPF_NOEXIST as u64).is_ok() {
            count(stat::FLOWS_INSERTED);
        } else {
            // Another CPU inserted it first (or the nf_conn was reused):
            // count on its copy, or overwrite a stale one.
            if let Some(existing) = FLOWS.get_ptr_mut(&ct) {
                // SAFETY: as above.
                let existing = unsafe { &mut *existing };
                if existing.net == net
                    && same(words(&mut existing.event.orig), &orig)
                    && same(words(&mut existing.event.reply), &reply)
                {
                    update(existing, now, status, hook_id, icmp_code, drop_reason);
                    return Ok(true);
                }
            }
            FLOWS
                .insert(&ct, &state, BPF_ANY as u64)
                .map_err(|_| count(stat::READ_ERRORS))?;
        }
        emit(&state.event, raised_at_first(), now);
        Ok(true)
    }

    /// The slot of an entry: of the two its address maps to (a pair on
    /// one 128-byte block, see stalewatch-common's `cache_slot`), the one
    /// it holds; else a free one, else the one that failed last longer
    /// ago, for `hold_slot` to decide on.
    #[inline(always)]
    fn pick_slot(ct: u64) -> Option<*mut FlowCache> {
        let index = cache_slot(ct, global(&CACHE_MASK));
        let first = CACHE.get_ptr_mut(index)?;
        // SAFETY: values of our own map, alive while the program runs.
        let (first_ct, first_last) = unsafe { ((*first).ct, (*first).last_ns) };
        if first_ct == ct {
            return Some(first);
        }
        let Some(second) = CACHE.get_ptr_mut(index ^ 1) else {
            return Some(first);
        };
        // SAFETY: as above.
        let (second_ct, second_last) = unsafe { ((*second).ct, (*second).last_ns) };
        if second_ct == ct || (first_ct != 0 && (second_ct == 0 || second_last < first_last)) {
            return Some(second);
        }
        Some(first)
    }

    /// Adds what a slot counted for an entry to the entry's `FLOWS` value,
    /// and empties it.
    #[inline(always)]
    fn take_cached(state: &mut FlowState, cache: &mut FlowCache) {
        let event = &mut state.event;
        if cache.icmp_count != 0 {
            event.icmp_count = event.icmp_count.wrapping_add(cache.icmp_count);
            event.icmp_type = ICMP_DEST_UNREACH as u8;
            event.icmp_code = cache.icmp_code;
            cache.icmp_count = 0;
        }
        if cache.drop_count != 0 {
            event.drop_count = event.drop_count.wrapping_add(cache.drop_count);
            event.drop_reason = u32::from(cache.drop_reason);
            cache.drop_count = 0;
        }
        if cache.last_ns > event.last_ns {
            event.last_ns = cache.last_ns;
            event.status = cache.status;
            event.last_hook = cache.last_hook;
        }
    }

    /// After a raised entry's packet was counted on its `FLOWS` value: lets
    /// its next packets count in its slot until its next report is due
    /// (`update` then sends it, with the slot added) or for
    /// `CACHE_HOLD_NS` at most, its tuples compared with their digest once
    /// per `VERIFY_NS`. A slot that another raised entry
    /// holds is taken only once that entry has not failed for
    /// `CACHE_IDLE_NS`, its counts first added to its own `FLOWS` value;
    /// entries not raised yet never take one (their reports depend on each
    /// failure).
    #[inline(always)]
    fn hold_slot(cache: &mut FlowCache, ct: u64, net: u64, state: &mut FlowState, now: u64) {
        if state.reported == 0 {
            return;
        }
        if cache.ct != ct && cache.ct != 0 {
            if now.saturating_sub(cache.last_ns) < CACHE_IDLE_NS {
                return;
            }
            if cache.icmp_count | cache.drop_count != 0 {
                let holder = cache.ct;
                if let Some(other) = FLOWS.get_ptr_mut(&holder) {
                    // SAFETY: a value of our own map, as in `record_failure`.
                    let other = unsafe { &mut *other };
                    if other.net == cache.net {
                        take_cached(other, cache);
                    }
                }
            }
        }
        let digest = tuple_digest(words(&mut state.event.orig), words(&mut state.event.reply));
        cache.ct = ct;
        cache.net = net;
        cache.icmp_count = 0;
        cache.drop_count = 0;
        cache.last_ns = state.event.last_ns;
        cache.digest = digest;
        cache.verify_ns = state.checked_ns.saturating_add(VERIFY_NS);
        cache.due_ns = state
            .last_emit_ns
            .saturating_add(global(&REPORTED_INTERVAL_NS))
            .min(now.saturating_add(CACHE_HOLD_NS));
    }

    #[inline(always)]
    fn note(event: &mut FlowEvent, hook_id: u8, icmp_code: u8, drop_reason: u32) {
        event.last_hook = hook_id;
        if hook_id == hook::ICMP_SEND {
            event.icmp_count = 1;
            event.icmp_type = ICMP_DEST_UNREACH as u8;
            event.icmp_code = icmp_code;
        } else {
            event.drop_count = 1;
            event.drop_reason = drop_reason;
        }
    }

    #[inline(always)]
    fn update(
        state: &mut FlowState,
        now: u64,
        status: u32,
        hook_id: u8,
        icmp_code: u8,
        drop_reason: u32,
    ) {
        // Plain increments: the BPF target has no atomics in Rust's core,
        // and one flow's packets are handled by one CPU at a time in
        // practice (RSS and conntrack keep a flow on its queue), so a lost
        // increment is rare and only ever undercounts.
        let event = &mut state.event;
        if hook_id == hook::ICMP_SEND {
            event.icmp_count = event.icmp_count.wrapping_add(1);
            event.icmp_type = ICMP_DEST_UNREACH as u8;
            event.icmp_code = icmp_code;
        } else {
            event.drop_count = event.drop_count.wrapping_add(1);
            event.drop_reason = drop_reason;
        }
        // Userspace counts a flow's failed packets as the larger of the two
        // counts: a packet often shows at both hooks.
        let failures = event.icmp_count.max(event.drop_count);
        // Never back: another CPU's clock read may be up to a jiffy
        // fresher than this one's (see `now`).
        event.last_ns = event.last_ns.max(now);
        event.status = status;
        event.last_hook = hook_id;
        if let Some(urgent) = due(
            &mut state.reported,
            failures,
            event.first_ns,
            state.last_emit_ns,
            now,
        ) {
            state.last_emit_ns = now;
            emit(&state.event, urgent, now);
        }
    }

    /// Whether a first failure is already the one an entry is raised on
    /// (`--min-failures 1 --grace 0`). Else its report waits for
    /// userspace's next look: nothing can be raised before `GRACE_NS`.
    #[inline(always)]
    fn raised_at_first() -> bool {
        global(&MIN_FAILURES) <= 1 && global(&GRACE_NS) == 0
    }

    /// Whether an entry that just failed again is reported now, and whether
    /// the report is urgent. The report of its `MIN_FAILURES`th failure
    /// over at least `GRACE_NS` is the one userspace raises it on: sent at
    /// once, and urgent. Others (at most one per `EMIT_INTERVAL_NS`, or
    /// `REPORTED_INTERVAL_NS` after that one) are not: userspace drains
    /// them every second, so that thousands of failing flows do not cost
    /// thousands of wakeups.
    #[inline(always)]
    fn due(
        reported: &mut u32,
        failures: u32,
        first_ns: u64,
        last_emit_ns: u64,
        now: u64,
    ) -> Option<bool> {
        // Saturating: `now` may be up to a jiffy behind a time another CPU
        // wrote (see `now`), which is no interval at all.
        let interval = if *reported == 0 {
            if failures >= global(&MIN_FAILURES)
                && now.saturating_sub(first_ns) >= global(&GRACE_NS)
            {
                *reported = 1;
                return Some(true);
            }
            global(&EMIT_INTERVAL_NS)
        } else {
            global(&REPORTED_INTERVAL_NS)
        };
        (now.saturating_sub(last_emit_ns) >= interval).then_some(false)
    }

    /// Sends a report. An urgent one wakes userspace, and so does any once
    /// an eighth of the ring buffer is waiting (a burst of reports that wake
    /// no one must not fill it); either only if no report woke it in the
    /// last `WAKE_GAP_NS` (userspace looks again that long after a wakeup).
    #[inline(always)]
    fn emit<T>(event: &T, urgent: bool, now: u64) {
        let wake =
            (urgent || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKE_AT_BYTES) && take_wakeup(now);
        let flags = if wake {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        if EVENTS.output::<T>(event, flags as u64).is_ok() {
            count(stat::EVENTS_SENT);
            if wake {
                count(stat::WAKEUPS);
            }
        } else {
            count(stat::EVENTS_LOST);
        }
    }

    /// Whether this report may wake userspace: none did for `WAKE_GAP_NS`.
    /// Two CPUs may both take it at once, which costs one more wakeup.
    #[inline(always)]
    fn take_wakeup(now: u64) -> bool {
        let Some(woken) = WOKEN.get_ptr_mut(0) else {
            return true;
        };
        // SAFETY: the one slot of our own array map; a racy read or write
        // only ever costs or saves one wakeup.
        unsafe {
            if now.saturating_sub(read_volatile(woken)) < WAKE_GAP_NS {
                return false;
            }
            core::ptr::write_volatile(woken, now);
        }
        true
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only by workspace-wide tools (clippy, tests); the
    // real program is the BPF target build that stalewatch's build.rs runs.
}
