//! Issue #15's two-node topology works, without stalewatch: a new flow
//! reaches the backend through node A's DNAT; once the service moves from
//! pod .7 to pod .8, the client's long-lived stream stays pinned to .7 in
//! A's conntrack table while a new flow reaches .8, and node B drops the
//! stale stream (its neighbour entry for .7 fails). Root only.

use std::{net::IpAddr, time::Duration};

use stalewatch_tests::{
    multihost::{Cluster, DNS, Dnat, Engine, Family, L4, METRICS},
    poll,
};

const STALE_SPORT: u16 = 40053;
const NEW_SPORT: u16 = 40054;
const EVERY: Duration = Duration::from_millis(100);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Polls A's conntrack table until the flow from `sport` is pinned to a
/// backend, and returns it.
fn pinned(c: &Cluster, sport: u16) -> Option<IpAddr> {
    poll(secs(2), || c.pinned_backend(sport).ok().flatten())
}

/// B keeps forwarding the stale stream to .7 and its neighbour entry for
/// .7 fails: the packets are dropped there. `more` is how many packets B
/// must see after the move: a datagram stream sends ten a second, a TCP
/// connection only its retransmissions, which back off (0.2 s, 0.4 s, ...),
/// so the counter is polled rather than read once.
fn assert_b_drops_stale(c: &Cluster, before: u64, more: u64) {
    let failed = poll(secs(10), || {
        (c.neighbour_state(7).ok().flatten().as_deref() == Some("FAILED")).then_some(())
    });
    assert!(
        failed.is_some(),
        "B's neighbour entry for .7 fails; it is {:?}",
        c.neighbour_state(7)
    );
    let reached = poll(secs(10), || {
        let n = c.forwarded_to(7).ok()?;
        (n >= before + more).then_some(n)
    });
    assert!(
        reached.is_some(),
        "B still gets the stale stream for .7: {:?} packets, {before} before the move, {more} more expected",
        c.forwarded_to(7)
    );
}

fn udp_move(engine: Engine, family: Family) {
    let mut c = Cluster::build(engine, family, L4::Udp).expect("build");
    c.deploy(&DNS, 7).expect("deploy on .7");
    let rx7 = c.udp_receiver(7, &DNS).expect("receiver .7");
    let stale_src = c.client_addr(STALE_SPORT);
    let mut stream = c
        .producer(&DNS, STALE_SPORT, EVERY, 300, secs(30))
        .expect("stream");
    assert!(
        rx7.wait_from(stale_src, 3, secs(5)),
        "{engine:?}: the stream reaches pod .7 through A's DNAT"
    );
    assert_eq!(pinned(&c, STALE_SPORT), Some(c.pod_ip(7)));
    let entry = c.entry_from(STALE_SPORT).unwrap().unwrap();
    assert_eq!(entry.orig.dst, c.vip(&DNS).ip(), "{entry:?}");
    assert_eq!(entry.orig.dport, DNS.port, "{entry:?}");
    assert_eq!(entry.reply.sport, DNS.target_port, "{entry:?}");

    c.move_backend(&DNS, 7, 8).expect("move to .8");
    drop(rx7);
    let before = c.forwarded_to(7).expect("counter");
    let rx8 = c.udp_receiver(8, &DNS).expect("receiver .8");
    let new_src = c.client_addr(NEW_SPORT);
    let _fresh = c
        .producer(&DNS, NEW_SPORT, EVERY, 50, secs(10))
        .expect("new flow");
    assert!(
        rx8.wait_from(new_src, 3, secs(5)),
        "{engine:?}: a new flow reaches pod .8"
    );
    assert_eq!(pinned(&c, NEW_SPORT), Some(c.pod_ip(8)));

    assert_b_drops_stale(&c, before, 5);
    // Still pinned, and none of it reaches .8.
    assert_eq!(c.pinned_backend(STALE_SPORT).unwrap(), Some(c.pod_ip(7)));
    assert_eq!(rx8.from(stale_src), 0);
    if family == Family::V4 {
        // B's ICMP host unreachable, relayed back by A to the client.
        assert!(
            poll(secs(3), || (stream.errors() > 0).then_some(())).is_some(),
            "the client hears of the failure"
        );
    }
    stream.stop();
}

#[test]
fn nft_plain_v4_udp() {
    udp_move(Engine::NftPlain, Family::V4);
}

#[test]
fn nft_kube_v4_udp() {
    udp_move(Engine::NftKube, Family::V4);
}

#[test]
fn iptables_nft_kube_v4_udp() {
    udp_move(Engine::IptablesNftKube, Family::V4);
}

#[test]
fn iptables_legacy_kube_v4_udp() {
    udp_move(Engine::IptablesLegacyKube, Family::V4);
}

#[test]
fn nft_kube_v6_udp() {
    udp_move(Engine::NftKube, Family::V6);
}

#[test]
fn iptables_nft_kube_v4_tcp() {
    let mut c = Cluster::build(Engine::IptablesNftKube, Family::V4, L4::Tcp).expect("build");
    c.deploy(&DNS, 7).expect("deploy on .7");
    let rx7 = c.tcp_receiver(7, &DNS).expect("receiver .7");
    let stale_src = c.client_addr(STALE_SPORT);
    let mut conn = c
        .tcp_producer(&DNS, STALE_SPORT, EVERY, secs(30))
        .expect("connection");
    assert!(
        rx7.wait_bytes_from(stale_src, 20, secs(5)),
        "the connection reaches pod .7"
    );
    assert_eq!(pinned(&c, STALE_SPORT), Some(c.pod_ip(7)));

    c.move_backend(&DNS, 7, 8).expect("move to .8");
    drop(rx7);
    let before = c.forwarded_to(7).expect("counter");
    let rx8 = c.tcp_receiver(8, &DNS).expect("receiver .8");
    let new_src = c.client_addr(NEW_SPORT);
    let mut fresh = c
        .tcp_producer(&DNS, NEW_SPORT, EVERY, secs(10))
        .expect("new connection");
    assert!(
        rx8.wait_bytes_from(new_src, 20, secs(5)),
        "a new connection reaches pod .8"
    );
    assert_eq!(pinned(&c, NEW_SPORT), Some(c.pod_ip(8)));
    // The old connection's retransmissions go on to .7 and die at B.
    assert_b_drops_stale(&c, before, 3);
    assert_eq!(c.pinned_backend(STALE_SPORT).unwrap(), Some(c.pod_ip(7)));
    assert_eq!(rx8.bytes_from(stale_src), 0);
    fresh.stop();
    conn.stop();
}

/// The other endings of issue #15: scaled to zero (no DNAT for the VIP
/// any more, the stream still pinned to .7 and dropped at B), then .7 given
/// to a pod of another service, which silently receives the stream.
#[test]
fn scaled_to_zero_then_address_reused() {
    let mut c = Cluster::build(Engine::NftKube, Family::V4, L4::Udp).expect("build");
    c.deploy(&DNS, 7).expect("deploy on .7");
    let rx7 = c.udp_receiver(7, &DNS).expect("receiver .7");
    let stale_src = c.client_addr(STALE_SPORT);
    let mut stream = c
        .producer(&DNS, STALE_SPORT, EVERY, 300, secs(30))
        .expect("stream");
    assert!(rx7.wait_from(stale_src, 3, secs(5)));
    c.scale_to_zero(&DNS).expect("scale to zero");
    drop(rx7);
    let before = c.forwarded_to(7).expect("counter");
    let rules = c.capture().expect("capture").nft_json;
    assert!(!rules.contains("\"dnat\""), "no DNAT left: {rules}");
    assert_b_drops_stale(&c, before, 5);
    assert_eq!(c.pinned_backend(STALE_SPORT).unwrap(), Some(c.pod_ip(7)));

    // A pod of another service gets .7: the stream is delivered to it.
    c.reuse_address(7, &METRICS).expect("reuse .7");
    let wrong = c
        .udp_receiver(7, &METRICS)
        .expect("receiver of the other pod");
    assert!(
        wrong.wait_from(stale_src, 3, secs(10)),
        "the stale stream reaches the other service's pod"
    );
    assert_eq!(c.pinned_backend(STALE_SPORT).unwrap(), Some(c.pod_ip(7)));
    stream.stop();
}

/// Load-balanced over .7 and .8: flows are spread over both; removing .7
/// leaves the flows pinned to it pinned. Also the quiet cases' rules load
/// and DNAT as written: a range and a port range.
#[test]
fn load_balanced_then_one_removed_and_quiet_cases() {
    let mut c = Cluster::build(Engine::IptablesLegacyKube, Family::V4, L4::Udp).expect("build");
    c.start_pod(7).expect("pod .7");
    c.start_pod(8).expect("pod .8");
    c.set_service(&DNS, Dnat::Endpoints(vec![7, 8]))
        .expect("load-balanced");
    let rx7 = c.udp_receiver(7, &DNS).unwrap();
    let _rx8 = c.udp_receiver(8, &DNS).unwrap();
    let sports: Vec<u16> = (41000..41016).collect();
    let streams: Vec<_> = sports
        .iter()
        .map(|p| c.producer(&DNS, *p, EVERY, 100, secs(20)).expect("stream"))
        .collect();
    let spread = poll(secs(3), || {
        let got: Vec<_> = sports
            .iter()
            .filter_map(|p| c.pinned_backend(*p).ok().flatten())
            .collect();
        (got.len() == sports.len()).then_some(got)
    })
    .expect("every stream has an entry");
    assert!(
        spread.contains(&c.pod_ip(7)) && spread.contains(&c.pod_ip(8)),
        "16 flows spread over both: {spread:?}"
    );
    c.remove_endpoint(&DNS, 7).expect("remove .7");
    drop(rx7);
    for (p, backend) in sports.iter().zip(&spread) {
        assert_eq!(c.pinned_backend(*p).unwrap().as_ref(), Some(backend));
    }
    drop(streams);

    for (dnat, ok) in [
        (Dnat::Range(7, 8), [7, 8].as_slice()),
        (Dnat::PortRange(8), [8].as_slice()),
    ] {
        c.start_pod(7).expect("pod .7");
        c.set_service(&DNS, dnat.clone()).expect("rules");
        let sport = 42000 + ok.len() as u16;
        let _s = c.producer(&DNS, sport, EVERY, 20, secs(5)).unwrap();
        let to = pinned(&c, sport).expect("entry");
        assert!(
            ok.iter().any(|h| c.pod_ip(*h) == to),
            "{dnat:?} DNATs to {to}"
        );
    }
    // iptables has no DNAT maps.
    assert!(c.set_service(&DNS, Dnat::Map(8)).is_err());
}
