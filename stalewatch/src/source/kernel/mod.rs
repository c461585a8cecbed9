//! The kernel side as userspace sees it: resolve the running kernel's
//! layout, load and attach the eBPF programs, and hand out their event
//! stream and counters. Dropping [`Probes`] detaches everything.

pub mod btf;
pub mod decode;

use std::{
    error::Error as StdError,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use stalewatch_common::{
    CACHE_SLOTS_MAX, FlowCache, FlowEvent, FlowState, LocalEvent, LocalKey, LocalState,
    RDONLY_CAST_CALL, cache_slot, globals, names, stat,
};

use nix::libc;

use self::btf::{KernelLayout, RdonlyCast};
use crate::{
    domain::{Observation, Tuple},
    error::Error,
    linux::{KFREE_SKB, TRACEPOINTS, Tracepoint},
};

/// The eBPF object built by build.rs from `stalewatch-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stalewatch-probes"));

/// Set (to anything) in the environment, stalewatch reads conntrack entries
/// with helper calls even where `bpf_rdonly_cast` would do, as on kernels
/// before 6.2: the tests run that path too.
pub const HELPERS_ONLY: &str = "STALEWATCH_READ_WITH_HELPERS";

/// The object with every call of `RDONLY_CAST_CALL` (see stalewatch-common)
/// rewritten: into a call of the kernel function whose BTF id is `func`, or
/// without one into `r0 = r1` (the programs then do not use its result).
/// BPF code sits 8-byte aligned in the ELF file, one instruction per 8
/// bytes, so the instructions are found without parsing the file; the
/// copy is heap memory, aligned for the ELF parser as the original.
fn patch_casts(object: &[u8], func: Option<u32>) -> Result<Vec<u8>, Error> {
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const PSEUDO_KFUNC_CALL: u8 = 2;
    let mut call = [CALL, 0, 0, 0, 0, 0, 0, 0];
    call[4..].copy_from_slice(&RDONLY_CAST_CALL.to_le_bytes());
    let mut patched = object.to_vec();
    let mut found = 0;
    for insn in patched.chunks_exact_mut(8) {
        if insn != call {
            continue;
        }
        found += 1;
        let new = match func {
            // src_reg (high nibble): a kfunc; off 0: of vmlinux; imm: its id.
            Some(_) => [CALL, PSEUDO_KFUNC_CALL << 4, 0, 0],
            // dst_reg r0 (low nibble), src_reg r1.
            None => [MOV64_X, 1 << 4, 0, 0],
        };
        insn[..4].copy_from_slice(&new);
        insn[4..].copy_from_slice(&func.map_or(0, |id| id as i32).to_le_bytes());
    }
    if found == 0 {
        return Err(Error::Object("bpf_rdonly_cast call to link".into()));
    }
    Ok(patched)
}

pub use stalewatch_cli::DEFAULT_BTF;

#[derive(Clone, Debug)]
pub struct Options {
    /// Kernel BTF to resolve types and tracepoints from.
    pub btf: PathBuf,
    /// Watch only this network namespace (inode).
    pub netns: Option<u32>,
    /// Least time between two reports on one failing entry...
    pub emit_interval: Duration,
    /// ... once it has been reported at `min_failures` (userspace reads
    /// raised entries from the map instead).
    pub reported_interval: Duration,
    /// Failures at which an entry is reported at once...
    pub min_failures: u32,
    /// ... once it has failed for this long.
    pub grace: Duration,
    /// Failing entries the kernel tracks at once (LRU beyond that).
    pub max_flows: u32,
}

/// Counters the programs keep, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events_lost: u64,
    pub events_sent: u64,
    pub wakeups: u64,
    pub failures: u64,
    pub read_errors: u64,
    pub flows_inserted: u64,
    pub locals_inserted: u64,
}

/// One program's run statistics (kept by the kernel while BPF stats are on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramRuns {
    pub name: String,
    pub runs: u64,
    pub run_time: std::time::Duration,
}

/// Everything the metrics read from the kernel side, cumulative.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub stats: Stats,
    /// Failed packets by CAUSES slot.
    pub causes: Vec<u64>,
    pub flows_entries: u64,
    pub locals_entries: u64,
    pub programs: Vec<ProgramRuns>,
}

pub struct Probes {
    /// Declared before `ebpf`: unmapped before the map goes.
    cache: CacheView,
    ebpf: Ebpf,
    pub layout: KernelLayout,
    /// How the programs read conntrack entries, in words.
    pub reads: &'static str,
}

/// Slots of the `CACHE` map for `--max-flows` (see stalewatch-common's
/// `FlowCache`): one per flow, rounded up to a power of two, within bounds.
fn cache_slots(max_flows: u32) -> u32 {
    max_flows.clamp(64, CACHE_SLOTS_MAX).next_power_of_two()
}

/// The `CACHE` map, mapped read-only into this process: the failures of
/// a raised entry that the kernel has not yet added to its `FLOWS` value.
struct CacheView {
    slots: *const FlowCache,
    bytes: usize,
    mask: u32,
}

// SAFETY: a read-only shared mapping, only read (volatile) through `get`.
unsafe impl Send for CacheView {}
// SAFETY: as above.
unsafe impl Sync for CacheView {}

impl CacheView {
    fn map(ebpf: &Ebpf, slots: u32) -> Result<CacheView, Error> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = match ebpf.map(names::MAP_CACHE) {
            Some(aya::maps::Map::Array(data)) => data.fd().as_fd().as_raw_fd(),
            _ => return Err(missing_map(names::MAP_CACHE)),
        };
        let bytes = slots as usize * std::mem::size_of::<FlowCache>();
        // SAFETY: a shared read-only mapping of an mmapable array map of
        // `slots` values; the kernel checks the length against the map.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(kernel_error(
                "mapping the CACHE map",
                io::Error::last_os_error(),
            ));
        }
        Ok(CacheView {
            slots: addr.cast(),
            bytes,
            mask: slots - 1,
        })
    }

    /// The slot an entry holds, as it is now: of the two its address maps
    /// to, the one naming it (else the first, which `merge_cached` then
    /// ignores).
    fn get(&self, ct: u64) -> FlowCache {
        let index = cache_slot(ct, self.mask) as usize;
        // SAFETY: both indices are masked to the mapping's slots (at
        // least 64); the kernel writes the slots concurrently, so a copy
        // may be torn, which `merge_cached` tolerates (a count off by a
        // packet at worst).
        let read = |at: usize| unsafe { std::ptr::read_volatile(self.slots.add(at)) };
        let first = read(index);
        if first.ct == ct {
            return first;
        }
        let second = read(index ^ 1);
        if second.ct == ct { second } else { first }
    }
}

impl Drop for CacheView {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.slots.cast_mut().cast(), self.bytes) };
    }
}

/// Adds to an entry's `FLOWS` value what its `CACHE` slot holds for it and
/// the kernel has not added yet: what the kernel itself does on the
/// entry's next packet after the slot's time.
fn merge_cached(event: &mut FlowEvent, net: u64, slot: &FlowCache) {
    if slot.ct != event.ct || slot.net != net {
        return;
    }
    if slot.icmp_count != 0 {
        event.icmp_count = event.icmp_count.wrapping_add(slot.icmp_count);
        event.icmp_type = stalewatch_common::ICMP_DEST_UNREACH as u8;
        event.icmp_code = slot.icmp_code;
    }
    if slot.drop_count != 0 {
        event.drop_count = event.drop_count.wrapping_add(slot.drop_count);
        event.drop_reason = u32::from(slot.drop_reason);
    }
    if (slot.icmp_count | slot.drop_count) != 0 && slot.last_ns > event.last_ns {
        event.last_ns = slot.last_ns;
        event.status = slot.status;
        event.last_hook = slot.last_hook;
    }
}

/// Attaches the object's empty program to `skb:kfree_skb`, for as long as
/// the returned object lives. Only the benchmark uses it: what a program of
/// the kind stalewatch attaches costs there before doing anything.
pub fn attach_empty_kfree_skb(btf_file: &Path) -> Result<Ebpf, Error> {
    let btf = parse_btf(btf_file)?;
    let object = patch_casts(OBJECT, None)?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .load(&object)
        .map_err(|e| kernel_error("loading the eBPF object", e))?;
    let empty = Tracepoint {
        program: names::PROG_EMPTY_KFREE_SKB,
        ..KFREE_SKB
    };
    attach_program(&mut ebpf, &empty, &btf)?;
    Ok(ebpf)
}

fn parse_btf(path: &Path) -> Result<aya::Btf, Error> {
    aya::Btf::parse_file(path, aya::Endianness::default()).map_err(|e| Error::BadBtf {
        path: path.to_owned(),
        source: e.into(),
    })
}

/// Loads the object's BTF tracepoint program for `tracepoint` and attaches
/// it.
fn attach_program(ebpf: &mut Ebpf, tracepoint: &Tracepoint, btf: &aya::Btf) -> Result<(), Error> {
    let name = tracepoint.name;
    let program: &mut BtfTracePoint = ebpf
        .program_mut(tracepoint.program)
        .ok_or_else(|| Error::Object(format!("program {}", tracepoint.program)))?
        .try_into()
        .map_err(|e| kernel_error(name, e))?;
    program
        .load(tracepoint.function, btf)
        .map_err(|e| kernel_error(&format!("loading the {name} program"), e))?;
    program
        .attach()
        .map_err(|e| kernel_error(&format!("attaching to {name}"), e))?;
    Ok(())
}

impl Probes {
    /// Resolves the layout, loads the programs with it and attaches them.
    /// On error nothing stays attached: the links die with `Ebpf`.
    pub fn load(options: &Options) -> Result<Probes, Error> {
        let layout = KernelLayout::from_file(&options.btf)?;
        let btf = parse_btf(&options.btf)?;
        // Status loads through bpf_rdonly_cast where the kernel has it; if
        // its verifier refuses them, the helper reads that any kernel takes.
        // What kernels before 6.2 run, on demand: for tests.
        let cast = layout
            .rdonly_cast
            .filter(|_| std::env::var_os(HELPERS_ONLY).is_none());
        let (ebpf, cast) = match cast {
            Some(cast) => match Self::attach(options, &layout, &btf, Some(cast)) {
                Ok(ebpf) => (ebpf, true),
                Err(e) => {
                    log::info!("bpf_rdonly_cast not usable ({e}); reading with helper calls");
                    (Self::attach(options, &layout, &btf, None)?, false)
                }
            },
            None => (Self::attach(options, &layout, &btf, None)?, false),
        };
        let cache = CacheView::map(&ebpf, cache_slots(options.max_flows))?;
        Ok(Probes {
            cache,
            ebpf,
            layout,
            reads: if cast {
                "through bpf_rdonly_cast"
            } else {
                "with helper calls"
            },
        })
    }

    /// Loads the object for `layout`, with `bpf_rdonly_cast` or without,
    /// and attaches its programs.
    fn attach(
        options: &Options,
        layout: &KernelLayout,
        btf: &aya::Btf,
        cast: Option<RdonlyCast>,
    ) -> Result<Ebpf, Error> {
        let drop_reasons = layout.drop_reasons.failure_bitmap();
        let drop_reasons_v6 = layout.drop_reasons.failure_bitmap_v6();
        let dead_reasons = layout.drop_reasons.dead_bitmap();
        let (neigh_at, neigh_size) = layout.neigh_invalidate.unwrap_or((0, 0));
        let netns = options.netns.unwrap_or(0);
        let interval = options.emit_interval.as_nanos() as u64;
        let reported_interval = options.reported_interval.as_nanos() as u64;
        let grace = options.grace.as_nanos() as u64;
        let object = patch_casts(OBJECT, cast.map(|c| c.func))?;
        let cast_ct = u32::from(cast.is_some());
        let nf_conn = cast.map_or(0, |c| c.nf_conn);
        let cache_mask = cache_slots(options.max_flows) - 1;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(btf))
            .override_global(globals::OFF_SKB_NFCT, &layout.skb_nfct, true)
            .override_global(globals::OFF_CT_STATUS, &layout.ct_status, true)
            .override_global(globals::CAST_CT, &cast_ct, true)
            .override_global(globals::NF_CONN_BTF_ID, &nf_conn, true)
            .override_global(globals::OFF_CT_CHUNK, &layout.ct_chunk.start, true)
            .override_global(globals::CHUNK_ORIG, &layout.ct_chunk.orig, true)
            .override_global(globals::CHUNK_REPLY, &layout.ct_chunk.reply, true)
            .override_global(globals::CHUNK_NET, &layout.ct_chunk.net, true)
            .override_global(globals::MIN_FAILURES, &options.min_failures, true)
            .override_global(globals::GRACE_NS, &grace, true)
            .override_global(globals::OFF_NET_NS_INUM, &layout.net_ns_inum, true)
            .override_global(globals::NETNS_FILTER, &netns, true)
            .override_global(globals::EMIT_INTERVAL_NS, &interval, true)
            .override_global(globals::REPORTED_INTERVAL_NS, &reported_interval, true)
            .override_global(globals::DROP_REASONS, &drop_reasons, true)
            .override_global(globals::DROP_REASONS_V6, &drop_reasons_v6, true)
            .override_global(globals::DEAD_REASONS, &dead_reasons, true)
            .override_global(globals::NEIGH_INVALIDATE_AT, &neigh_at, true)
            .override_global(globals::NEIGH_INVALIDATE_SIZE, &neigh_size, true)
            .override_global(globals::OFF_SKB_PROTOCOL, &layout.skb_protocol, true)
            .override_global(globals::OFF_SKB_HEAD, &layout.skb_head, true)
            .override_global(
                globals::OFF_SKB_NETWORK_HEADER,
                &layout.skb_network_header,
                true,
            )
            .override_global(
                globals::OFF_SKB_TRANSPORT_HEADER,
                &layout.skb_transport_header,
                true,
            )
            .override_global(globals::OFF_SKB_DEV, &layout.skb_dev, true)
            .override_global(globals::OFF_DEV_NET, &layout.dev_net, true)
            .override_global(globals::CACHE_MASK, &cache_mask, true)
            .map_max_entries(names::MAP_FLOWS, options.max_flows)
            .map_max_entries(names::MAP_CACHE, cache_slots(options.max_flows))
            .load(&object)
            .map_err(|e| kernel_error("loading the eBPF object", e))?;

        for tracepoint in &TRACEPOINTS {
            attach_program(&mut ebpf, tracepoint, btf)?;
        }
        Ok(ebpf)
    }

    /// The ring buffer the programs report failing entries on.
    pub fn take_events(&mut self) -> Result<RingBuf<aya::maps::MapData>, Error> {
        let map = self
            .ebpf
            .take_map(names::MAP_EVENTS)
            .ok_or_else(|| missing_map(names::MAP_EVENTS))?;
        RingBuf::try_from(map).map_err(|e| kernel_error("EVENTS map", e))
    }

    pub fn stats(&self) -> Result<Stats, Error> {
        let map = self
            .ebpf
            .map(names::MAP_STATS)
            .ok_or_else(|| missing_map(names::MAP_STATS))?;
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|e| kernel_error("STATS map", e))?;
        let sum = |index: u32| -> Result<u64, Error> {
            let values = array
                .get(&index, 0)
                .map_err(|e| kernel_error("STATS map", e))?;
            Ok(values.iter().sum())
        };
        Ok(Stats {
            events_lost: sum(stat::EVENTS_LOST)?,
            events_sent: sum(stat::EVENTS_SENT)?,
            wakeups: sum(stat::WAKEUPS)?,
            failures: sum(stat::FAILURES)?,
            read_errors: sum(stat::READ_ERRORS)?,
            flows_inserted: sum(stat::FLOWS_INSERTED)?,
            locals_inserted: sum(stat::LOCALS_INSERTED)?,
        })
    }

    /// Every entry of the `FLOWS` map, read in batches of a few thousand
    /// per system call (`BPF_MAP_LOOKUP_BATCH`): how the watch loop brings
    /// many raised flows up to date at once. `f` gets each entry's report
    /// (its key, the `nf_conn` address, is the report's `ct`).
    pub fn each_flow(&self, mut f: impl FnMut(&FlowEvent)) -> Result<(), Error> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        const BATCH: usize = 4096;
        let fd = match self.ebpf.map(names::MAP_FLOWS) {
            Some(aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data)) => {
                data.fd().as_fd().as_raw_fd()
            }
            _ => return Err(missing_map(names::MAP_FLOWS)),
        };
        let mut keys = vec![0u64; BATCH];
        let mut values: Vec<std::mem::MaybeUninit<FlowState>> = Vec::with_capacity(BATCH);
        values.resize_with(BATCH, std::mem::MaybeUninit::uninit);
        // Hash maps take a bucket index as the batch token.
        let (mut token_in, mut token_out) = (0u32, 0u32);
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { &raw const token_in as u64 },
                out_batch: &raw mut token_out as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: BPF_MAP_LOOKUP_BATCH writes at most `count` keys and
            // values into the buffers, sized for BATCH of each, and one
            // u32 token; `attr` is the kernel's layout for this command.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    std::mem::size_of::<BatchAttr>() as u32,
                )
            };
            let done = ret < 0 && {
                let err = io::Error::last_os_error();
                // ENOENT: the last batch, and what it holds is valid.
                if err.raw_os_error() != Some(libc::ENOENT) {
                    return Err(kernel_error("reading FLOWS", err));
                }
                true
            };
            for value in &values[..(attr.count as usize).min(BATCH)] {
                // SAFETY: the kernel filled the first `count` values.
                let state = unsafe { value.assume_init_ref() };
                // FLOWS first, then the slot: a slot that the kernel adds
                // in between is missed once (a count behind), never added
                // twice.
                let mut event = state.event;
                let slot = self.cache.get(event.ct);
                merge_cached(&mut event, state.net, &slot);
                f(&event);
            }
            if done {
                return Ok(());
            }
            token_in = token_out;
            first = false;
        }
    }

    /// What the kernel holds now on the refused datagrams of one flow.
    pub fn local(&self, key: &LocalKey) -> Result<Option<LocalEvent>, Error> {
        let map = self
            .ebpf
            .map(names::MAP_LOCALS)
            .ok_or_else(|| missing_map(names::MAP_LOCALS))?;
        let locals: HashMap<&MapData, LocalKey, LocalState> =
            HashMap::try_from(map).map_err(|e| kernel_error("LOCALS", e))?;
        match locals.get(key, 0) {
            Ok(state) => Ok(Some(state.event)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(kernel_error("LOCALS", e)),
        }
    }

    /// The kernel's latest on a flow of refused datagrams (IPv4), from the
    /// `LOCALS` map: `None` when the kernel no longer holds it, or holds
    /// another flow under its key.
    pub fn refused_now(&self, netns: u32, orig: &Tuple, reply: &Tuple) -> Option<Observation> {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (orig.src, orig.dst) else {
            return None;
        };
        let key = LocalKey {
            netns,
            saddr: src.octets(),
            daddr: dst.octets(),
            sport: orig.sport.to_be_bytes(),
            dport: orig.dport.to_be_bytes(),
            proto: u32::from(orig.proto.0),
        };
        let event = self
            .local(&key)
            .map_err(|e| log::warn!("reading LOCALS: {}", crate::error::chain(&e)))
            .ok()??;
        let latest = decode::local(&event);
        (latest.netns == netns && latest.orig == *orig && latest.reply == *reply).then_some(latest)
    }

    /// The counters for the metrics. Counting map entries walks the maps'
    /// keys: done once per scrape interval, not per packet.
    pub fn counters(&self) -> Result<Counters, Error> {
        let map = |name: &str| self.ebpf.map(name).ok_or_else(|| missing_map(name));
        let causes: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(names::MAP_CAUSES)?)
            .map_err(|e| kernel_error("CAUSES", e))?;
        let causes = causes
            .iter()
            .map(|values| values.map(|v| v.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|e| kernel_error("CAUSES", e))?;
        let flows: HashMap<&MapData, u64, FlowState> =
            HashMap::try_from(map(names::MAP_FLOWS)?).map_err(|e| kernel_error("FLOWS", e))?;
        let locals: HashMap<&MapData, LocalKey, LocalState> =
            HashMap::try_from(map(names::MAP_LOCALS)?).map_err(|e| kernel_error("LOCALS", e))?;
        let programs = self
            .ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramRuns {
                    name: name.to_owned(),
                    runs: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect();
        Ok(Counters {
            stats: self.stats()?,
            causes,
            flows_entries: flows.keys().filter(Result::is_ok).count() as u64,
            locals_entries: locals.keys().filter(Result::is_ok).count() as u64,
            programs,
        })
    }
}

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr` for the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn missing_map(name: &str) -> Error {
    Error::Object(format!("{name} map"))
}

/// A kernel error: permission problems and verifier refusals get their own
/// message, everything else names the step and keeps the error as source.
fn kernel_error(step: &str, err: impl StdError + Send + Sync + 'static) -> Error {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(&err);
    while let Some(e) = cause {
        // The verifier refuses a program with EACCES too: say what it said,
        // not that we lack privileges.
        if let Some(aya::programs::ProgramError::LoadError { verifier_log, .. }) =
            e.downcast_ref::<aya::programs::ProgramError>()
        {
            let log = verifier_log.to_string();
            // Its last lines are statistics; the reason comes before.
            let said = log.lines().rev().find(|l| {
                let l = l.trim();
                !(l.is_empty()
                    || l.starts_with("processed ")
                    || l.starts_with("stack depth ")
                    || l.starts_with("verification time "))
            });
            if let Some(said) = said {
                return Error::Verifier {
                    step: step.to_owned(),
                    said: said.trim().to_owned(),
                };
            }
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.kind(), io::ErrorKind::PermissionDenied)
        {
            return Error::NotPermitted;
        }
        cause = e.source();
    }
    Error::Bpf {
        step: step.to_owned(),
        source: Box::new(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `call RDONLY_CAST_CALL`, as the BPF target compiles `rdonly_cast`.
    fn cast_call() -> [u8; 8] {
        let mut insn = [0x85, 0, 0, 0, 0, 0, 0, 0];
        insn[4..].copy_from_slice(&RDONLY_CAST_CALL.to_le_bytes());
        insn
    }

    fn object() -> Vec<u8> {
        let mut object = vec![0x7f, b'E', b'L', b'F', 0, 0, 0, 0];
        object.extend_from_slice(&[0xbf, 0x16, 0, 0, 0, 0, 0, 0]); // r6 = r1
        object.extend_from_slice(&cast_call());
        object.extend_from_slice(&[0x85, 0, 0, 0, 6, 0, 0, 0]); // call 6 (a helper)
        object.extend_from_slice(&cast_call());
        object
    }

    fn cached(ct: u64, net: u64, icmp: u32, drops: u32, last_ns: u64) -> FlowCache {
        FlowCache {
            ct,
            net,
            due_ns: 0,
            verify_ns: 0,
            digest: 0,
            last_ns,
            icmp_count: icmp,
            drop_count: drops,
            status: 0x1a8,
            drop_reason: 58,
            icmp_code: 1,
            last_hook: 2,
        }
    }

    fn event(ct: u64) -> FlowEvent {
        // SAFETY: FlowEvent is plain integers and bytes.
        let mut event: FlowEvent = unsafe { std::mem::zeroed() };
        event.ct = ct;
        event.drop_count = 10;
        event.drop_reason = 12;
        event.last_ns = 1_000;
        event.status = 0x188;
        event
    }

    #[test]
    fn a_slot_adds_its_counts_to_its_own_entry_only() {
        let mut own = event(0xffff_8880_0000_1000);
        let slot = cached(own.ct, 7, 3, 5, 2_000);
        merge_cached(&mut own, 7, &slot);
        assert_eq!((own.icmp_count, own.icmp_type, own.icmp_code), (3, 3, 1));
        assert_eq!((own.drop_count, own.drop_reason), (15, 58));
        assert_eq!((own.last_ns, own.status, own.last_hook), (2_000, 0x1a8, 2));

        // Another entry in the slot, or the same nf_conn in another
        // namespace: nothing of it.
        for slot in [
            cached(0x1, 7, 3, 5, 2_000),
            cached(0xffff_8880_0000_1000, 8, 3, 5, 2_000),
        ] {
            let mut other = event(0xffff_8880_0000_1000);
            merge_cached(&mut other, 7, &slot);
            assert_eq!(
                (other.drop_count, other.last_ns, other.icmp_count),
                (10, 1_000, 0)
            );
        }

        // An emptied slot leaves the entry's last failure as it is.
        let mut emptied = event(0x40);
        merge_cached(&mut emptied, 7, &cached(0x40, 7, 0, 0, 5_000));
        assert_eq!(
            (emptied.drop_count, emptied.last_ns, emptied.status),
            (10, 1_000, 0x188)
        );
    }

    #[test]
    fn cache_slots_are_a_power_of_two_within_bounds() {
        assert_eq!(cache_slots(1), 64);
        assert_eq!(cache_slots(1_000), 1_024);
        assert_eq!(cache_slots(3_000), 4_096);
        assert_eq!(cache_slots(65_536), CACHE_SLOTS_MAX);
        assert_eq!(cache_slots(u32::MAX), CACHE_SLOTS_MAX);
        let mask = cache_slots(1_000) - 1;
        let ct = 0xffff_8880_1234_5640;
        assert!(cache_slot(ct, mask) <= mask);
    }

    #[test]
    fn cast_calls_become_kfunc_calls_and_nothing_else_changes() {
        let object = object();
        let patched = patch_casts(&object, Some(0x1234)).unwrap();
        assert_eq!(patched.len(), object.len());
        for at in [16, 32] {
            // src_reg 2 (BPF_PSEUDO_KFUNC_CALL), imm the kfunc's BTF id.
            assert_eq!(patched[at..at + 8], [0x85, 0x20, 0, 0, 0x34, 0x12, 0, 0]);
        }
        assert_eq!(patched[..16], object[..16]);
        assert_eq!(patched[24..32], object[24..32], "a helper call stays");
    }

    #[test]
    fn without_the_kfunc_cast_calls_become_a_register_move() {
        let patched = patch_casts(&object(), None).unwrap();
        for at in [16, 32] {
            // r0 = r1: what the kernel inlines bpf_rdonly_cast into.
            assert_eq!(patched[at..at + 8], [0xbf, 0x10, 0, 0, 0, 0, 0, 0]);
        }
    }

    #[test]
    fn an_object_without_cast_calls_is_refused() {
        let mut object = object();
        object.truncate(16);
        assert!(patch_casts(&object, Some(1)).is_err());
    }

    #[test]
    fn the_real_object_has_cast_calls() {
        assert!(patch_casts(OBJECT, Some(1)).is_ok());
    }
}
