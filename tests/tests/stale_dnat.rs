//! End to end: the real eBPF programs in the real kernel, real iptables and
//! conntrack, real traffic, in namespaces of the test's own.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, SystemTime},
};

use serde_json::Value;
use stalewatch_tests::{
    netns::{Netns, veth},
    sh,
    story::{Family, Rules, Story, Variant},
    traffic::{Producer, Receiver},
    watcher::{Watcher, is_stale_flow},
};

const EVERY: Duration = Duration::from_millis(100);
const STALE_SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().expect("a timestamp")).expect("RFC 3339")
}

/// What the kernel should show for a variant's stale packets.
struct Expect {
    /// ICMP type and code this host sends back, if any.
    icmp: Option<(u64, u64)>,
    drop: &'static str,
    /// How long after the redeploy the first alert may take.
    raised_within: Duration,
}

const NEIGHBOUR_V4: Expect = Expect {
    icmp: Some((3, 1)),
    drop: "NEIGH_FAILED",
    raised_within: Duration::from_secs(20),
};

/// IPv6 neighbour discovery failures are dropped as NOT_SPECIFIED, and
/// there is no ICMPv6 tracepoint.
const NEIGHBOUR_V6: Expect = Expect {
    icmp: None,
    drop: "NOT_SPECIFIED",
    raised_within: Duration::from_secs(20),
};

/// The whole story for one variant: stream, redeploy, a new flow that
/// works, the raised alert with its evidence, the fix it names, the stream
/// reaching the new container, and the resolved alert.
fn story(variant: Variant, expect: Expect) -> anyhow::Result<()> {
    let mut story = Story::build(variant)?;
    let router_inode = story.router.inode()?;
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    let watcher = Watcher::start(&["--netns", &story.router.name, "--resolve-after", "4s"])?;

    let stale_src = story.producer_addr(STALE_SPORT);
    let mut stream = Producer::start(
        &story.producer,
        stale_src,
        story.service(),
        EVERY,
        1500,
        secs(150),
    )?;
    assert!(
        old_service.wait_from(stale_src, 5, secs(10)),
        "the stream reaches the old container before the redeploy"
    );

    story.redeploy()?;
    drop(old_service);
    let new_service = Receiver::start(&story.new, 8888)?;

    // A new flow is DNATed to the new container by the new rule.
    let new_src = story.producer_addr(NEW_SPORT);
    let mut fresh = Producer::start(
        &story.producer,
        new_src,
        story.service(),
        EVERY,
        30,
        secs(10),
    )?;
    assert!(
        new_service.wait_from(new_src, 5, secs(10)),
        "a new flow reaches the new container"
    );

    let raised = watcher
        .wait_for(expect.raised_within, |v| {
            is_stale_flow(v, "raised", STALE_SPORT)
        })
        .unwrap_or_else(|| panic!("no stale_flow raised; got {:?}", watcher.records()));
    let plan = story.plan;
    assert_eq!(raised["netns"]["inode"], router_inode);
    assert_eq!(raised["netns"]["name"], story.router.name.as_str());
    let family = match variant.family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    assert_eq!(raised["family"], family);
    assert_eq!(raised["proto"], "udp");
    assert_eq!(
        raised["orig"],
        serde_json::json!({"src": plan.producer, "sport": STALE_SPORT, "dst": plan.router_lan, "dport": 8888})
    );
    assert_eq!(
        raised["stale_backend"],
        serde_json::json!({"addr": plan.old_backend, "port": 8888})
    );
    assert!(raised["failures"]["packets"].as_u64().unwrap() >= 3);
    match expect.icmp {
        Some((t, c)) => {
            assert_eq!(raised["failures"]["icmp"]["type"], t, "{raised}");
            assert_eq!(raised["failures"]["icmp"]["code"], c, "{raised}");
        }
        None => assert!(raised["failures"]["icmp"].is_null(), "{raised}"),
    }
    let drop = &raised["failures"]["drop"];
    assert_eq!(drop["reason"], expect.drop, "{raised}");
    let delay = time(&raised["time"])
        .duration_since(time(&raised["failures"]["first"]))
        .unwrap_or_default();
    assert!(delay <= secs(10), "alerted {delay:?} after first failure");
    let fix = raised["fix"].as_str().expect("fix command");
    assert_eq!(fix, story.expected_fix("udp", STALE_SPORT));
    assert_eq!(
        new_service.from(stale_src),
        0,
        "the stale stream does not reach the new container"
    );

    // The fix the alert names heals the flow: the stream reaches the new
    // container, and the alert resolves.
    sh(fix)?;
    assert!(
        new_service.wait_from(stale_src, 5, secs(10)),
        "after the fix the stream reaches the new container"
    );
    let resolved = watcher
        .wait_for(secs(15), |v| is_stale_flow(v, "resolved", STALE_SPORT))
        .unwrap_or_else(|| panic!("not resolved; got {:?}", watcher.records()));
    assert_eq!(resolved["stale_backend"]["addr"], plan.old_backend);

    fresh.stop();
    stream.stop();
    let records = watcher.records();
    assert!(
        !records.iter().any(|v| v["orig"]["sport"] == NEW_SPORT),
        "the healthy new flow is never alerted: {records:?}"
    );
    assert!(
        records.iter().all(|v| v["type"] != "not_json"),
        "stdout holds only JSON lines: {records:?}"
    );
    let (status, took) = watcher.stop()?;
    assert!(status.success(), "exit status {status}");
    assert!(took < secs(3), "took {took:?} to exit");
    Ok(())
}

#[test]
fn ipv4_iptables() -> anyhow::Result<()> {
    story(Variant::v4(Rules::Iptables), NEIGHBOUR_V4)
}

#[test]
fn ipv4_iptables_legacy() -> anyhow::Result<()> {
    story(Variant::v4(Rules::IptablesLegacy), NEIGHBOUR_V4)
}

#[test]
fn ipv4_nftables() -> anyhow::Result<()> {
    story(Variant::v4(Rules::Nftables), NEIGHBOUR_V4)
}

#[test]
fn ipv4_kube_proxy_endpoint_replaced() -> anyhow::Result<()> {
    story(Variant::v4(Rules::KubeProxy), NEIGHBOUR_V4)
}

#[test]
fn ipv6_ip6tables() -> anyhow::Result<()> {
    story(Variant::v6(Rules::Iptables), NEIGHBOUR_V6)
}

#[test]
fn ipv6_nftables() -> anyhow::Result<()> {
    story(Variant::v6(Rules::Nftables), NEIGHBOUR_V6)
}

/// Docker's FORWARD policy DROP: after the redeploy the old container's
/// ACCEPT is gone, so stale packets die in netfilter and no ICMP is sent.
#[test]
fn silent_netfilter_drop() -> anyhow::Result<()> {
    let variant = Variant {
        forward_drop: true,
        ..Variant::v4(Rules::Iptables)
    };
    story(
        variant,
        Expect {
            icmp: None,
            drop: "NETFILTER_DROP",
            raised_within: secs(20),
        },
    )
}

/// The old bridge keeps its carrier, so the old neighbour entry stays
/// usable until it goes stale and its probes fail: 30-45 s or more.
#[test]
fn late_failure() -> anyhow::Result<()> {
    let variant = Variant {
        keep_old_carrier: true,
        ..Variant::v4(Rules::Iptables)
    };
    story(
        variant,
        Expect {
            raised_within: secs(90),
            ..NEIGHBOUR_V4
        },
    )
}

/// Forwarded traffic that fails with no NAT at all is no stale flow. A DNAT
/// flow failing beside it in the same router proves that failures there are
/// seen: only the NATed one is raised.
#[test]
fn failing_flow_without_nat_is_not_raised() -> anyhow::Result<()> {
    let producer = Netns::new("prod")?;
    let router = Netns::new("router")?;
    veth(&producer, "lan0", &router, "lan1")?;
    producer.ip(&["addr", "add", "192.0.2.2/24", "dev", "lan0"])?;
    producer.ip(&["route", "add", "198.18.0.0/24", "via", "192.0.2.1"])?;
    router.ip(&["addr", "add", "192.0.2.1/24", "dev", "lan1"])?;
    router.sysctl("net.ipv4.ip_forward=1")?;
    // An empty bridge: nothing answers ARP there.
    router.ip(&["link", "add", "br0", "type", "bridge"])?;
    router.ip(&["addr", "add", "198.18.0.1/24", "dev", "br0"])?;
    router.ip(&["link", "set", "br0", "up"])?;
    router.exec(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "udp",
        "--dport",
        "8888",
        "-j",
        "DNAT",
        "--to-destination",
        "198.18.0.77:8888",
    ])?;
    let watcher = Watcher::start(&["--netns", &router.name])?;

    let plain_src: SocketAddr = "192.0.2.2:41000".parse()?;
    let mut plain = Producer::start(
        &producer,
        plain_src,
        "198.18.0.9:9999".parse()?,
        EVERY,
        300,
        secs(30),
    )?;
    // Give the un-NATed flow a head start, then fail a DNATed one.
    thread::sleep(secs(2));
    let mut natted = Producer::start(
        &producer,
        "192.0.2.2:41001".parse()?,
        "192.0.2.1:8888".parse()?,
        EVERY,
        300,
        secs(30),
    )?;
    let raised = watcher.wait_for(secs(20), |v| is_stale_flow(v, "raised", 41001));
    assert!(
        raised.is_some(),
        "the DNATed flow is raised: {:?}",
        watcher.records()
    );
    thread::sleep(secs(2));
    assert!(
        plain.errors() > 0,
        "the un-NATed flow failed too (ICMP errors seen by its sender)"
    );
    plain.stop();
    natted.stop();
    let records = watcher.records();
    assert!(
        !records.iter().any(|v| v["orig"]["sport"] == 41000),
        "no alert for the flow without NAT: {records:?}"
    );
    assert_eq!(raised.unwrap()["stale_backend"]["addr"], "198.18.0.77");
    let (status, _) = watcher.stop()?;
    assert!(status.success());
    Ok(())
}

#[test]
fn only_the_watched_namespace_is_reported() -> anyhow::Result<()> {
    // Two routers with the same failing DNAT; stalewatch watches one.
    let mut routers = Vec::new();
    for _ in 0..2 {
        let producer = Netns::new("prod")?;
        let router = Netns::new("router")?;
        veth(&producer, "lan0", &router, "lan1")?;
        producer.ip(&["addr", "add", "192.0.2.2/24", "dev", "lan0"])?;
        router.ip(&["addr", "add", "192.0.2.1/24", "dev", "lan1"])?;
        router.sysctl("net.ipv4.ip_forward=1")?;
        router.ip(&["link", "add", "br0", "type", "bridge"])?;
        router.ip(&["addr", "add", "198.18.0.1/24", "dev", "br0"])?;
        router.ip(&["link", "set", "br0", "up"])?;
        router.exec(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            "8888",
            "-j",
            "DNAT",
            "--to-destination",
            "198.18.0.77:8888",
        ])?;
        routers.push((producer, router));
    }
    let watched = routers[0].1.inode()?;
    let watcher = Watcher::start(&["--netns", &watched.to_string()])?;
    let mut streams = Vec::new();
    for (producer, _) in &routers {
        streams.push(Producer::start(
            producer,
            "192.0.2.2:42000".parse()?,
            "192.0.2.1:8888".parse()?,
            EVERY,
            200,
            secs(20),
        )?);
    }
    let raised = watcher.wait_for(secs(15), |v| is_stale_flow(v, "raised", 42000));
    assert!(raised.is_some(), "{:?}", watcher.records());
    thread::sleep(secs(3));
    for s in &mut streams {
        s.stop();
    }
    let records = watcher.records();
    assert!(
        records.iter().all(|v| v["netns"]["inode"] == watched),
        "only the watched namespace: {records:?}"
    );
    watcher.stop()?;
    Ok(())
}
