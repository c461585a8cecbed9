//! Which neighbours a namespace failed to resolve, and the routes it takes
//! (see [`route`]), as the kernel itself says over rtnetlink (IPv4 and IPv6
//! alike). A failed neighbour is a neighbour in NUD_FAILED,
//! or one in NUD_INCOMPLETE for longer than the kernel's own resolution
//! time on its device. A neighbour that is being resolved right now is not
//! failed.
//!
//! With a stream of packets to an address nobody answers, the kernel
//! cycles: INCOMPLETE while it probes (about 3 s by default), FAILED when
//! the probes run out (the queued packets are dropped), INCOMPLETE again
//! at the next packet. One look therefore mostly sees INCOMPLETE; a second
//! look ([`settle`]) tells an attempt that ended unresolved (a new attempt
//! began since, or FAILED) from one that resolved.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    neighbour_table::{NeighbourTableAttribute, NeighbourTableMessage, NeighbourTableParameter},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The kernel's neighbour cache times are in USER_HZ ticks (clock_t).
const USER_HZ_MS: u64 = 10;
/// A look-up takes time too: an attempt is only overdue past this margin.
const MARGIN: Duration = Duration::from_millis(500);
/// The kernel's defaults (1 s between probes, 3 multicast probes), for a
/// device whose settings cannot be read.
const DEFAULT_RESOLUTION: Duration = Duration::from_secs(3);

/// What one look at a neighbour shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    /// The kernel gave up on it: NUD_FAILED, or NUD_INCOMPLETE for longer
    /// than the kernel's own resolution time.
    Failed,
    /// Being resolved right now (NUD_INCOMPLETE), for `for_` so far.
    Resolving { for_: Duration },
    /// Anything else: resolved, or never asked for.
    Fine,
}

/// The decision for one neighbour: its state, the time since its state
/// last changed (cache info's `updated`), and how long the kernel may take
/// to resolve it on its device.
pub fn look(state: NeighbourState, updated: Duration, resolution: Duration) -> Look {
    match state {
        NeighbourState::Failed => Look::Failed,
        NeighbourState::Incomplete if updated > resolution + MARGIN => Look::Failed,
        NeighbourState::Incomplete => Look::Resolving { for_: updated },
        _ => Look::Fine,
    }
}

/// The decision for a neighbour that was resolving at a first look, from
/// a second look `waited` later. It failed when the
/// kernel says so now, or when it is resolving again in an attempt that
/// began after the first look: an attempt ends resolved (and a resolved
/// neighbour is not probed from scratch for many seconds) or failed.
/// `None`: still the same attempt, not decided.
pub fn second_look(waited: Duration, now: Look) -> Option<bool> {
    match now {
        Look::Failed => Some(true),
        Look::Fine => Some(false),
        Look::Resolving { for_ } if for_ < waited => Some(true),
        Look::Resolving { .. } => None,
    }
}

/// One neighbour as the kernel lists it.
#[derive(Clone, Copy, Debug)]
struct Neighbour {
    addr: IpAddr,
    ifindex: u32,
    family: Family,
    state: NeighbourState,
    updated: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

/// One look at the neighbour table of the calling thread's namespace.
pub fn read() -> io::Result<HashMap<IpAddr, Look>> {
    let sock = socket()?;
    let resolution = resolution_times(&sock)?;
    let neighbours = neighbours(&sock)?;
    Ok(neighbours
        .into_iter()
        .map(|n| {
            let time = resolution
                .get(&(n.family, n.ifindex))
                .or_else(|| resolution.get(&(n.family, 0)))
                .copied()
                .unwrap_or(DEFAULT_RESOLUTION);
            (n.addr, look(n.state, n.updated, time))
        })
        .collect())
}

/// The neighbours failed at one look.
pub fn failed_now(looks: &HashMap<IpAddr, Look>) -> HashSet<IpAddr> {
    looks
        .iter()
        .filter(|(_, l)| **l == Look::Failed)
        .map(|(a, _)| *a)
        .collect()
}

/// The neighbours failed, looking again at those being resolved at the
/// first look until each is decided or `max_wait` is over (those still in
/// their first attempt then are not failed). Runs in the calling thread's
/// namespace.
pub fn settle(first: HashMap<IpAddr, Look>, max_wait: Duration) -> io::Result<HashSet<IpAddr>> {
    let mut failed = failed_now(&first);
    let mut pending: HashSet<IpAddr> = first
        .into_iter()
        .filter_map(|(addr, l)| matches!(l, Look::Resolving { .. }).then_some(addr))
        .collect();
    let start = Instant::now();
    while !pending.is_empty() && start.elapsed() < max_wait {
        std::thread::sleep(Duration::from_millis(200));
        let waited = start.elapsed();
        let now = read()?;
        pending.retain(|addr| {
            // Gone from the table: the kernel dropped it, nothing to tell.
            let look = now.get(addr).copied().unwrap_or(Look::Fine);
            match second_look(waited, look) {
                Some(true) => {
                    failed.insert(*addr);
                    false
                }
                Some(false) => false,
                None => true,
            }
        });
    }
    for addr in &pending {
        log::info!("neighbour {addr} is still being resolved: not taken as failed");
    }
    Ok(failed)
}

pub(super) fn socket() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    Ok(sock)
}

/// Every neighbour of both families.
fn neighbours(sock: &Socket) -> io::Result<Vec<Neighbour>> {
    let mut out = Vec::new();
    dump(
        sock,
        RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
        |m| {
            if let RouteNetlinkMessage::NewNeighbour(n) = m
                && let Some(n) = neighbour(&n)
            {
                out.push(n);
            }
        },
    )?;
    Ok(out)
}

fn neighbour(m: &NeighbourMessage) -> Option<Neighbour> {
    let mut addr = None;
    let mut updated = Duration::ZERO;
    for attr in &m.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some((*a).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                addr = Some((*a).into());
            }
            NeighbourAttribute::CacheInfo(c) => {
                updated = Duration::from_millis(u64::from(c.updated) * USER_HZ_MS);
            }
            _ => {}
        }
    }
    let family = match m.header.family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    Some(Neighbour {
        addr: addr?,
        ifindex: m.header.ifindex,
        family,
        state: m.header.state,
        updated,
    })
}

/// How long the kernel may take to resolve a neighbour, by family and
/// device (0: the table's default): its probes times the time between them.
fn resolution_times(sock: &Socket) -> io::Result<HashMap<(Family, u32), Duration>> {
    let mut out = HashMap::new();
    dump(
        sock,
        RouteNetlinkMessage::GetNeighbourTable(NeighbourTableMessage::default()),
        |m| {
            let RouteNetlinkMessage::NewNeighbourTable(t) = m else {
                return;
            };
            let family = match t.header.family {
                AddressFamily::Inet => Family::V4,
                AddressFamily::Inet6 => Family::V6,
                _ => return,
            };
            for attr in &t.attributes {
                if let NeighbourTableAttribute::Parms(parms) = attr
                    && let Some((ifindex, time)) = resolution_time(parms)
                {
                    out.insert((family, ifindex), time);
                }
            }
        },
    )?;
    Ok(out)
}

/// From one device's (or the default) neighbour settings: every probe the
/// kernel sends before it gives up (unicast, application and multicast),
/// each after the retransmission time.
pub fn resolution_time(parms: &[NeighbourTableParameter]) -> Option<(u32, Duration)> {
    let (mut ifindex, mut retrans, mut probes) = (0, None, 0u64);
    for p in parms {
        match p {
            NeighbourTableParameter::Ifindex(i) => ifindex = *i,
            NeighbourTableParameter::RetransTime(ms) => retrans = Some(*ms),
            NeighbourTableParameter::UcastProbes(n)
            | NeighbourTableParameter::AppProbes(n)
            | NeighbourTableParameter::McastProbes(n) => probes += u64::from(*n),
            _ => {}
        }
    }
    // The kernel waits at least 10 ms between probes.
    let retrans = Duration::from_millis(retrans?.max(10));
    Some((
        ifindex,
        retrans * u32::try_from(probes.max(1)).unwrap_or(u32::MAX),
    ))
}

/// One rtnetlink dump, each reply handed to `on_message`.
fn dump(
    sock: &Socket,
    request: RouteNetlinkMessage,
    on_message: impl FnMut(RouteNetlinkMessage),
) -> io::Result<()> {
    exchange(sock, request, NLM_F_REQUEST | NLM_F_DUMP, on_message)
}

/// One rtnetlink request with `flags`, each reply handed to `on_message`,
/// until the kernel's done (a dump) or its acknowledgement (NLM_F_ACK).
fn exchange(
    sock: &Socket,
    request: RouteNetlinkMessage,
    flags: u16,
    mut on_message: impl FnMut(RouteNetlinkMessage),
) -> io::Result<()> {
    /// Each request its own number: a reply left over from an exchange
    /// that ended early on a reused socket is told apart and skipped.
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(request));
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    sock.send(&bytes, 0)?;
    let mut buf = Vec::with_capacity(1 << 16);
    loop {
        buf.clear();
        let len = sock.recv(&mut buf, 0)?;
        let mut rest = &buf[..len];
        while !rest.is_empty() {
            let msg = NetlinkBuffer::new_checked(rest).map_err(io::Error::other)?;
            let mlen = msg.length() as usize;
            if msg.sequence_number() != seq {
                rest = &rest[mlen.next_multiple_of(4).min(rest.len())..];
                continue;
            }
            match msg.message_type() {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..mlen])
                        .map_err(io::Error::other)?;
                    if let NetlinkPayload::Error(e) = parsed.payload
                        && let Some(code) = e.code
                    {
                        return Err(io::Error::from_raw_os_error(-code.get()));
                    }
                    return Ok(());
                }
                _ => {
                    // A message of a kind this crate cannot parse is skipped.
                    if let Ok(parsed) =
                        NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..mlen])
                        && let NetlinkPayload::InnerMessage(m) = parsed.payload
                    {
                        on_message(m);
                    }
                }
            }
            rest = &rest[mlen.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// The route the calling thread's namespace takes to `addr` (as `ip route
/// get` asks the kernel): the interface it leaves by, and the gateway, if
/// any. `None` without a route.
pub fn route(sock: &Socket, addr: IpAddr) -> Option<(String, Option<IpAddr>)> {
    use netlink_packet_core::NLM_F_ACK;
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
    let mut request = RouteMessage::default();
    request.header.address_family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    request.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
    request
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    let (mut oif, mut via) = (None, None);
    exchange(
        sock,
        RouteNetlinkMessage::GetRoute(request),
        NLM_F_REQUEST | NLM_F_ACK,
        |m| {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                return;
            };
            for attr in &r.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some((*g).into()),
                    RouteAttribute::Gateway(RouteAddress::Inet6(g)) => via = Some((*g).into()),
                    _ => {}
                }
            }
        },
    )
    .ok()?;
    Some((
        nix::net::if_::if_indextoname(oif?)
            .ok()?
            .into_string()
            .ok()?,
        via,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_route_to_a_local_address_leaves_by_loopback() {
        let sock = socket().expect("an rtnetlink socket");
        assert_eq!(
            route(&sock, "127.0.0.1".parse().unwrap()),
            Some(("lo".to_owned(), None))
        );
    }

    #[test]
    fn only_the_kernel_giving_up_is_failed() {
        assert_eq!(look(NeighbourState::Failed, S(0), S(3)), Look::Failed);
        // Being resolved right now: not failed.
        assert_eq!(
            look(NeighbourState::Incomplete, MS(800), S(3)),
            Look::Resolving { for_: MS(800) }
        );
        // Incomplete for longer than the kernel ever takes.
        assert_eq!(look(NeighbourState::Incomplete, S(4), S(3)), Look::Failed);
        for fine in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
            NeighbourState::Noarp,
        ] {
            assert_eq!(look(fine, S(100), S(3)), Look::Fine);
        }
    }

    #[test]
    fn a_second_look_tells_a_failed_attempt_from_one_in_progress() {
        // Failed since, or resolved since.
        assert_eq!(second_look(S(1), Look::Failed), Some(true));
        assert_eq!(second_look(S(1), Look::Fine), Some(false));
        // A new attempt began after the first look: the first one failed.
        assert_eq!(
            second_look(S(1), Look::Resolving { for_: MS(400) }),
            Some(true)
        );
        // The same attempt (200 ms old at the first look), still within
        // its time.
        assert_eq!(second_look(S(1), Look::Resolving { for_: MS(1200) }), None);
    }

    #[test]
    fn the_resolution_time_counts_every_probe() {
        let parms = [
            NeighbourTableParameter::Ifindex(4),
            NeighbourTableParameter::RetransTime(1000),
            NeighbourTableParameter::UcastProbes(3),
            NeighbourTableParameter::McastProbes(3),
            NeighbourTableParameter::AppProbes(0),
        ];
        assert_eq!(resolution_time(&parms), Some((4, S(6))));
        assert_eq!(
            resolution_time(&[NeighbourTableParameter::UcastProbes(3)]),
            None
        );
    }
}
