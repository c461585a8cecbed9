//! A copy of the conntrack entries a namespace's audit judges, kept up to
//! date from the kernel's conntrack events instead of a dump per audit:
//! the DNATed entries, and those without DNAT whose destination is one of
//! the namespace's own addresses (where a bypass lands).
//!
//! Judging every DNATed entry against the NAT intent every audit interval
//! by dumping the table costs what `conntrack -L` costs, per interval,
//! whatever changed; even a dump the kernel filters walks every entry. The
//! mirror pays per entry made and per entry gone instead: one reading when
//! it opens, then the `NEW` and `DESTROY` events of ctnetlink's multicast
//! groups, which a socket filter (classic BPF, run by the kernel before an
//! event is queued) narrows to the entries above, so that the host's
//! other connections never wake it.
//!
//! What events cannot tell, and how it is covered:
//! - With `net.netfilter.nf_conntrack_events = 2` (the default) the kernel
//!   gives an entry its event extension only if a listener existed when it
//!   was made: entries older than the mirror are never announced gone.
//!   They are kept as *unannounced*; a user of the mirror confirms such an
//!   entry with a look-up before acting on it ([`Mirror::forget`] drops one
//!   the look-up did not find), and while any remain the mirror reads the
//!   table again every [`RESYNC_EVERY`].
//! - A full socket buffer loses events (`ENOBUFS`): the mirror reads the
//!   table again, at most once per [`RESYNC_GAP`].
//! - The namespace's addresses change: the filter is made anew, and the
//!   table read again ([`Mirror::set_local`]).
//! - With `nf_conntrack_events = 0` nothing is announced: [`Mirror::open`]
//!   refuses, and the caller dumps per audit as before.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use netlink_packet_core::NetlinkBuffer;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::libc;
use stalewatch_common::ct_status;

use super::{
    CTA_IP_V4_DST, CTA_IP_V6_DST, CTA_STATUS, CTA_TUPLE_IP, CTA_TUPLE_ORIG, Conn, Error, Filter,
    IPCTNL_MSG_CT_NEW, NFNL_SUBSYS_CTNETLINK, malformed, parse_entry,
};
use crate::{
    domain::{Entry, Proto, Tuple, TuplesV4},
    source::netns,
};

/// `IPCTNL_MSG_CT_DELETE`: the message type of a `DESTROY` event.
const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// `NFNLGRP_CONNTRACK_NEW` (1) and `NFNLGRP_CONNTRACK_DESTROY` (3) as
/// bind(2)'s group bitmap (bit `group - 1`).
const GROUPS: u32 = 1 << 0 | 1 << 2;
/// Socket buffer for events between two reads (the watch reads ten times
/// a second): 50,000 entries made at 100,000 a second lost none (bench
/// figure 4b); a larger burst loses events, and the table is read again.
const EVENTS_RCVBUF: usize = 8 << 20;
/// Events read per [`Mirror::update`] at most: the rest wait for the next.
const EVENTS_PER_UPDATE: usize = 200_000;
/// While unannounced entries remain, the table is read again this often
/// (their end is announced to nobody).
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// The least time between two readings after lost events.
pub const RESYNC_GAP: Duration = Duration::from_secs(10);

/// Own addresses the socket filter compares, at most: beyond, it lets
/// every entry without DNAT through and the mirror sorts them itself.
const FILTERED_V4: usize = 100;
const FILTERED_V6: usize = 25;

/// One entry of the mirror, as [`Mirror::entries`] gives it.
#[derive(Clone, Debug)]
pub struct Mirrored {
    pub entry: Entry,
    /// Its making was announced, so its end will be (unless events are
    /// lost, which the mirror notices). An entry only a dump showed may be
    /// gone unannounced.
    pub announced: bool,
}

/// A [`Mirrored`] as the mirror keeps it. An IPv4 entry is packed into 32
/// bytes: the mirror holds every DNATed entry of the namespace, hundreds
/// of thousands on a busy node, and an [`Entry`] as the rest of
/// stalewatch uses it takes 104 (its addresses as `IpAddr`s). Others are
/// kept boxed, whole. Not kept: the entry's
/// timeout, which says only when its last event was, and its id, which is
/// its key in the map ([`Marks`] says whether the kernel sent one).
#[derive(Clone, Debug)]
enum Kept {
    V4(PackedV4),
    Other(Box<Mirrored>),
}

#[derive(Clone, Copy, Debug)]
struct PackedV4 {
    tuples: TuplesV4,
    status: u32,
    zone: u16,
    proto: u8,
    marks: Marks,
}

/// Whether an entry's making was announced, and whether the kernel sent
/// its id: an enum, not bits of a `u8`, so that its spare values tell
/// [`Kept`]'s other variant, with no tag beside it.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
enum Marks {
    Neither = 0,
    Announced = 1,
    Id = 2,
    Both = 3,
}

impl Marks {
    fn new(announced: bool, has_id: bool) -> Marks {
        match (announced, has_id) {
            (false, false) => Marks::Neither,
            (true, false) => Marks::Announced,
            (false, true) => Marks::Id,
            (true, true) => Marks::Both,
        }
    }

    fn announced(self) -> bool {
        self as u8 & 1 != 0
    }

    fn has_id(self) -> bool {
        self as u8 & 2 != 0
    }
}

impl Kept {
    fn new(entry: Entry, announced: bool) -> Kept {
        match TuplesV4::pack(&entry.orig, &entry.reply) {
            Some(tuples) => Kept::V4(PackedV4 {
                tuples,
                status: entry.status,
                zone: entry.zone,
                proto: entry.orig.proto.0,
                marks: Marks::new(announced, entry.id.is_some()),
            }),
            None => Kept::Other(Box::new(Mirrored { entry, announced })),
        }
    }

    fn announced(&self) -> bool {
        match self {
            Kept::V4(p) => p.marks.announced(),
            Kept::Other(m) => m.announced,
        }
    }

    /// Whether this, kept under `key`, is the entry with original tuple
    /// `orig`: a key may be an id the kernel gave another entry since, or
    /// a hash of tuples that another entry shares.
    fn is(&self, key: u32, orig: &Tuple) -> bool {
        self.entry(key).orig == *orig
    }

    /// The entry, kept under `key`.
    fn entry(&self, key: u32) -> Entry {
        match self {
            Kept::V4(p) => {
                let (orig, reply) = p.tuples.unpack(Proto(p.proto));
                Entry {
                    orig,
                    reply,
                    status: p.status,
                    timeout: None,
                    id: p.marks.has_id().then_some(key),
                    zone: p.zone,
                }
            }
            Kept::Other(m) => m.entry.clone(),
        }
    }
}

/// What [`Mirror::update`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub made: usize,
    pub gone: usize,
    /// Whether the table was read again (lost events, or unannounced
    /// entries due for a check).
    pub resynced: bool,
}

pub struct Mirror {
    path: PathBuf,
    sock: Socket,
    /// By CTA_ID (see `key_of`).
    entries: HashMap<u32, Kept, foldhash::fast::RandomState>,
    unannounced: usize,
    /// Events were lost: read the table again once RESYNC_GAP allows.
    lost: bool,
    synced_at: Instant,
    /// When the table was last read again for lost events.
    lost_synced_at: Option<Instant>,
    /// The namespace's own addresses, sorted: entries without DNAT to one
    /// of them are kept.
    local: Vec<IpAddr>,
    /// The addresses changed: read the table again at the next update.
    stale: bool,
    buf: Vec<u8>,
}

impl std::os::fd::AsRawFd for Mirror {
    /// The events' socket: readable when events wait.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

impl Mirror {
    /// Subscribes to the conntrack events of the namespace at `path`, then
    /// reads its entries: the DNATed ones, and those without NAT to one of
    /// its addresses `local` (see [`Mirror::set_local`]). Fails where the
    /// namespace announces no conntrack events (`nf_conntrack_events = 0`).
    pub fn open(path: &Path, local: &[IpAddr]) -> Result<Mirror, Error> {
        Mirror::with_buffer(path, local, EVENTS_RCVBUF)
    }

    /// As [`Mirror::open`], with a socket buffer of `rcvbuf` bytes (tests
    /// make it small to lose events).
    pub fn with_buffer(path: &Path, local: &[IpAddr], rcvbuf: usize) -> Result<Mirror, Error> {
        let owned = path.to_path_buf();
        let (sock, events) = netns::in_netns(path, move || subscribe(rcvbuf))
            .map_err(|e| Error::Netns(owned.clone(), e))?;
        let sock = sock.map_err(Error::Socket)?;
        if events == Some(0) {
            return Err(Error::NoEvents(path.to_path_buf()));
        }
        let mut mirror = Mirror {
            path: path.to_path_buf(),
            sock,
            entries: HashMap::default(),
            unannounced: 0,
            lost: false,
            synced_at: Instant::now(),
            lost_synced_at: None,
            local: Vec::new(),
            stale: false,
            buf: Vec::with_capacity(64 << 10),
        };
        mirror.set_local(local.iter().copied())?;
        // Subscribed first: an entry made during the dump is announced.
        mirror.resync()?;
        Ok(mirror)
    }

    /// The namespace's own addresses, whose entries without DNAT the
    /// mirror keeps too: where they changed, the socket's filter is made
    /// anew and the table read again at the next update.
    pub fn set_local(&mut self, local: impl IntoIterator<Item = IpAddr>) -> Result<(), Error> {
        let mut local: Vec<IpAddr> = local.into_iter().collect();
        local.sort_unstable();
        local.dedup();
        if local == self.local {
            return Ok(());
        }
        attach_filter(&self.sock, &local).map_err(Error::Socket)?;
        self.local = local;
        self.stale = true;
        Ok(())
    }

    /// Whether the mirror keeps `entry`: DNATed, or delivered without NAT
    /// to one of the namespace's own addresses.
    fn keeps(&self, entry: &Entry) -> bool {
        entry.is_dnat()
            || (entry.reply.src == entry.orig.dst
                && self.local.binary_search(&entry.orig.dst).is_ok())
    }

    /// Applies the events queued since the last update; reads the table
    /// again where events were lost (at most once per RESYNC_GAP) or
    /// unannounced entries are due for a check (every RESYNC_EVERY).
    pub fn update(&mut self) -> Result<Update, Error> {
        let mut done = self.drain()?;
        let lost = self.lost
            && self
                .lost_synced_at
                .is_none_or(|at| at.elapsed() >= RESYNC_GAP);
        let unannounced = self.unannounced > 0 && self.synced_at.elapsed() >= RESYNC_EVERY;
        if lost || unannounced || self.stale {
            if lost {
                self.lost_synced_at = Some(Instant::now());
            }
            self.resync()?;
            // What happened during the dump.
            let after = self.drain()?;
            done.made += after.made;
            done.gone += after.gone;
            done.resynced = true;
        }
        Ok(done)
    }

    /// The entries kept, as last updated.
    pub fn entries(&self) -> impl Iterator<Item = Mirrored> + '_ {
        self.entries.iter().map(|(key, kept)| Mirrored {
            entry: kept.entry(*key),
            announced: kept.announced(),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the mirror holds `entry` as announced: then it exists, as
    /// of the last update. An unannounced one may be gone.
    pub fn announced(&self, entry: &Entry) -> bool {
        let key = key_of(entry);
        self.entries
            .get(&key)
            .is_some_and(|m| m.announced() && m.is(key, &entry.orig))
    }

    /// Entries whose end would not be announced.
    pub fn unannounced(&self) -> usize {
        self.unannounced
    }

    /// Drops an entry that a look-up no longer finds (its end was not
    /// announced).
    pub fn forget(&mut self, entry: &Entry) {
        let key = key_of(entry);
        if self.entries.get(&key).is_some_and(|m| {
            let kept = m.entry(key);
            kept.orig == entry.orig && kept.reply == entry.reply
        }) && let Some(gone) = self.entries.remove(&key)
        {
            self.unannounced -= usize::from(!gone.announced());
        }
    }

    /// Reads the table's DNATed entries again: those events announced stay
    /// announced; any other is unannounced.
    fn resync(&mut self) -> Result<(), Error> {
        let conn = Conn::open(Some(&self.path))?;
        // Events queued before the dump are applied after it: a `NEW` of an
        // entry the dump shows marks it announced, a `DESTROY` removes it.
        self.lost = false;
        self.stale = false;
        self.synced_at = Instant::now();
        let status = |value| Filter {
            status: Some((value, ct_status::DST_NAT)),
            ..Filter::default()
        };
        let mut dumped = conn.dump(&status(ct_status::DST_NAT))?;
        if !self.local.is_empty() {
            // The kernel skips the DNATed entries: no message for them.
            let plain = conn.dump(&status(0))?;
            dumped.extend(plain.into_iter().filter(|e| self.keeps(e)));
        }
        let mut entries: HashMap<u32, Kept, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(dumped.len(), Default::default());
        let mut unannounced = 0;
        for entry in dumped {
            let key = key_of(&entry);
            let announced = self
                .entries
                .get(&key)
                .is_some_and(|m| m.announced() && m.is(key, &entry.orig));
            unannounced += usize::from(!announced);
            entries.insert(key, Kept::new(entry, announced));
        }
        self.entries = entries;
        self.unannounced = unannounced;
        log::debug!(
            "conntrack mirror of {}: {} entries read, {} unannounced",
            self.path.display(),
            self.entries.len(),
            unannounced
        );
        Ok(())
    }

    /// Reads the queued events without waiting.
    fn drain(&mut self) -> Result<Update, Error> {
        let mut done = Update::default();
        for _ in 0..EVENTS_PER_UPDATE {
            self.buf.clear();
            match self
                .sock
                .recv(&mut self.buf, libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            {
                Ok(len) if len > self.buf.capacity() => {
                    // Truncated: that event is lost.
                    self.lost = true;
                }
                Ok(len) => {
                    let datagram = std::mem::take(&mut self.buf);
                    let applied = self.apply(&datagram[..len]);
                    self.buf = datagram;
                    let (made, gone) = applied?;
                    done.made += made;
                    done.gone += gone;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    log::debug!(
                        "conntrack mirror of {}: events lost, the table is read again",
                        self.path.display()
                    );
                    self.lost = true;
                }
                Err(e) => return Err(Error::Socket(e)),
            }
        }
        Ok(done)
    }

    /// The events of one datagram: entries made, entries gone.
    fn apply(&mut self, mut rest: &[u8]) -> Result<(usize, usize), Error> {
        let (mut made, mut gone) = (0, 0);
        while !rest.is_empty() {
            let msg = NetlinkBuffer::new_checked(rest).map_err(malformed)?;
            let len = msg.length() as usize;
            let kind = msg.message_type();
            if kind >> 8 == NFNL_SUBSYS_CTNETLINK
                && let Some(entry) = parse_entry(msg.payload())?
            {
                match kind & 0xff {
                    IPCTNL_MSG_CT_NEW if self.keeps(&entry) => {
                        made += 1;
                        self.insert(entry);
                    }
                    IPCTNL_MSG_CT_DELETE => {
                        gone += usize::from(self.remove(&entry));
                    }
                    _ => {}
                }
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        Ok((made, gone))
    }

    fn insert(&mut self, entry: Entry) {
        let key = key_of(&entry);
        let old = self.entries.insert(key, Kept::new(entry, true));
        if old.is_some_and(|m| !m.announced()) {
            self.unannounced -= 1;
        }
    }

    /// Whether it held the entry.
    fn remove(&mut self, entry: &Entry) -> bool {
        let key = key_of(entry);
        if self
            .entries
            .get(&key)
            .is_some_and(|m| m.is(key, &entry.orig))
            && let Some(old) = self.entries.remove(&key)
        {
            self.unannounced -= usize::from(!old.announced());
            return true;
        }
        false
    }
}

/// An entry's key: its CTA_ID, or where the kernel sent none, a hash of
/// its tuples and zone.
fn key_of(entry: &Entry) -> u32 {
    entry.id.unwrap_or_else(|| {
        use std::hash::BuildHasher as _;
        foldhash::quality::FixedState::default().hash_one((entry.orig, entry.reply, entry.zone))
            as u32
    })
}

/// A ctnetlink socket of this thread's namespace subscribed to the events
/// of entries made and gone, DNATed ones only (until
/// [`Mirror::set_local`]), with `rcvbuf` bytes of
/// buffer; and the namespace's `nf_conntrack_events`, where readable.
fn subscribe(rcvbuf: usize) -> (io::Result<Socket>, Option<u32>) {
    let events = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_events")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let sock = (|| {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        netns::set_rcvbuf(&sock, rcvbuf)?;
        attach_filter(&sock, &[])?;
        sock.bind(&SocketAddr::new(0, GROUPS))?;
        Ok(sock)
    })();
    (sock, events)
}

/// The classic BPF program [`attach_filter`] attaches: keep the event of
/// an entry whose top-level CTA_STATUS has IPS_DST_NAT (or that has none:
/// never drop what cannot be read), or whose original destination is one
/// of `local`. Every jump is short and forward (cBPF jumps reach 255
/// instructions): each match returns on the spot.
fn event_filter(local: &[IpAddr]) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_AND, BPF_IMM, BPF_IND, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_LDX,
        BPF_MEM, BPF_MISC, BPF_RET, BPF_ST, BPF_TAX, BPF_W,
    };
    const SKF_AD_OFF: u32 = (-0x1000i32) as u32;
    const SKF_AD_NLATTR: u32 = 12;
    const SKF_AD_NLATTR_NEST: u32 = 16;
    /// nlmsghdr (16 bytes) and nfgenmsg (4): where the attributes start.
    const ATTRS_AT: u32 = 20;
    const KEEP: u32 = u32::MAX;
    const DROP: u32 = 0;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let imm = |k: u32| op(BPF_LD | BPF_IMM, 0, 0, k);
    // A = the offset of attribute `attr` (in the attributes from A, or
    // nested in the attribute at A), 0 if none.
    let find = |attr: u16, ad: u32| {
        [
            op(BPF_LDX | BPF_IMM, 0, 0, u32::from(attr)),
            op(BPF_LD | BPF_W | BPF_ABS, 0, 0, SKF_AD_OFF + ad),
        ]
    };
    let ret = |k: u32| op(BPF_RET | BPF_K, 0, 0, k);
    // `if A == value { return k }`.
    let if_eq_return = |value: u32, k: u32| [op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, value), ret(k)];
    let v4: Vec<u32> = local
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(u32::from(*a)),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<[u8; 16]> = local
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        })
        .collect();
    let mut p = vec![imm(ATTRS_AT)];
    p.extend(find(CTA_STATUS, SKF_AD_NLATTR));
    p.extend(if_eq_return(0, KEEP));
    p.push(op(BPF_MISC | BPF_TAX, 0, 0, 0));
    p.push(op(BPF_LD | BPF_W | BPF_IND, 0, 0, 4));
    p.push(op(BPF_ALU | BPF_AND | BPF_K, 0, 0, ct_status::DST_NAT));
    // DNATed: kept.
    p.push(op(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, 0));
    p.push(ret(KEEP));
    if local.is_empty() {
        p.push(ret(DROP));
        return p;
    }
    if v4.len() > FILTERED_V4 || v6.len() > FILTERED_V6 {
        p.push(ret(KEEP));
        return p;
    }
    // The original tuple's address attributes, kept in M[0].
    p.push(imm(ATTRS_AT));
    p.extend(find(CTA_TUPLE_ORIG, SKF_AD_NLATTR));
    p.extend(if_eq_return(0, DROP));
    p.extend(find(CTA_TUPLE_IP, SKF_AD_NLATTR_NEST));
    p.extend(if_eq_return(0, DROP));
    p.push(op(BPF_ST, 0, 0, 0));
    // IPv4: its destination against each address; no IPv4 destination
    // jumps over this block to IPv6's.
    p.extend(find(CTA_IP_V4_DST, SKF_AD_NLATTR_NEST));
    let v4_block = 2 + 2 * v4.len() + 1;
    p.push(op(BPF_JMP | BPF_JEQ | BPF_K, v4_block as u8, 0, 0));
    p.push(op(BPF_MISC | BPF_TAX, 0, 0, 0));
    p.push(op(BPF_LD | BPF_W | BPF_IND, 0, 0, 4));
    for addr in &v4 {
        p.extend(if_eq_return(*addr, KEEP));
    }
    p.push(ret(DROP));
    // IPv6: four words each; a mismatch skips to the next address.
    p.push(op(BPF_LD | BPF_MEM, 0, 0, 0));
    p.extend(find(CTA_IP_V6_DST, SKF_AD_NLATTR_NEST));
    p.extend(if_eq_return(0, DROP));
    p.push(op(BPF_MISC | BPF_TAX, 0, 0, 0));
    for o in &v6 {
        for i in 0..4 {
            let word = u32::from_be_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            p.push(op(BPF_LD | BPF_W | BPF_IND, 0, 0, 4 + 4 * i as u32));
            p.push(op(BPF_JMP | BPF_JEQ | BPF_K, 0, (7 - 2 * i) as u8, word));
        }
        p.push(ret(KEEP));
    }
    p.push(ret(DROP));
    p
}

fn attach_filter(sock: &Socket, local: &[IpAddr]) -> io::Result<()> {
    let mut program = event_filter(local);
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the kernel copies the program during the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Family, udp};

    /// An entry comes out of the mirror as it went in, but for its
    /// timeout (not kept) and its id (its key).
    #[test]
    fn kept_entries_come_back_whole() {
        let v4 = Entry {
            orig: udp("192.0.2.2", 40000, "10.96.0.10", 53),
            reply: udp("10.244.1.7", 53, "192.0.2.2", 40000),
            status: ct_status::CONFIRMED | ct_status::DST_NAT,
            timeout: None,
            id: Some(7),
            zone: 3,
        };
        let icmp = Entry {
            orig: Tuple {
                proto: Proto(1),
                dport: 8 << 8,
                ..udp("192.0.2.2", 9, "10.96.0.10", 0)
            },
            reply: Tuple {
                proto: Proto(1),
                ..udp("10.244.1.7", 9, "192.0.2.2", 0)
            },
            id: None,
            zone: 0,
            ..v4.clone()
        };
        let v6 = Entry {
            orig: udp("2001:db8::2", 40000, "fd00:96::10", 53),
            reply: udp("fd00:244::7", 53, "2001:db8::2", 40000),
            ..v4.clone()
        };
        for (entry, key, announced) in [(&v4, 7, true), (&icmp, 99, false), (&v6, 7, true)] {
            let kept = Kept::new(entry.clone(), announced);
            assert_eq!(
                matches!(kept, Kept::V4(_)),
                entry.orig.family == Family::Ipv4
            );
            assert_eq!(kept.announced(), announced);
            assert_eq!(&kept.entry(key), entry);
        }
        let timed = Entry {
            timeout: Some(29),
            ..v4.clone()
        };
        assert_eq!(Kept::new(timed, true).entry(7), v4);
        // What the packing is for: a slot of the map (key and value) takes
        // 40 bytes, not 112.
        assert_eq!(size_of::<(u32, Kept)>(), 40);
    }

    /// The kernel's checker takes the filter for every shape of address
    /// list (making a netlink socket and filtering it needs no privilege).
    #[test]
    fn the_kernel_accepts_every_filter() {
        let v4 = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let v6 = |i: u16| IpAddr::from(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i));
        let lists: Vec<Vec<IpAddr>> = vec![
            vec![],
            vec![v4(1)],
            vec![v6(1)],
            vec![v4(1), v6(1)],
            (0..FILTERED_V4 as u32)
                .map(v4)
                .chain((0..FILTERED_V6 as u16).map(v6))
                .collect(),
            (0..FILTERED_V4 as u32 + 1).map(v4).collect(),
        ];
        for local in lists {
            let sock = Socket::new(NETLINK_NETFILTER).expect("socket");
            let attached = attach_filter(&sock, &local);
            assert!(attached.is_ok(), "{local:?}: {attached:?}");
        }
    }
}
