//! End to end: the real eBPF programs in the real kernel, real iptables and
//! conntrack, real traffic, in namespaces of the test's own.

use std::{
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use stalewatch_tests::{
    sh,
    story::{DEAD_END_BACKEND, DeadEnd, Family, Played, Rules, Story, Variant},
    traffic::{Producer, Receiver},
    watcher::{self, Watcher, is_stale_flow},
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
    /// Whether the new flow's entry is still there to show the current
    /// backend when the alert comes (it expires 30 s after its last packet).
    current_known: bool,
}

const NEIGHBOUR_V4: Expect = Expect {
    icmp: Some((3, 1)),
    drop: "NEIGH_FAILED",
    raised_within: Duration::from_secs(20),
    current_known: true,
};

/// IPv6 neighbour discovery failures are dropped as NOT_SPECIFIED, and
/// there is no ICMPv6 tracepoint.
const NEIGHBOUR_V6: Expect = Expect {
    icmp: None,
    drop: "NOT_SPECIFIED",
    raised_within: Duration::from_secs(20),
    current_known: true,
};

/// The whole story for one variant: stream, redeploy, a new flow that
/// works, the raised alert with its evidence, the fix it names, the stream
/// reaching the new container, and the resolved alert.
fn story(variant: Variant, expect: Expect) -> anyhow::Result<()> {
    story_read(variant, expect, Read::AsTheKernelAllows)
}

/// How the programs read conntrack entries.
#[derive(PartialEq)]
enum Read {
    /// Through `bpf_rdonly_cast` on this kernel.
    AsTheKernelAllows,
    /// With helper calls, as on kernels before 6.2.
    WithHelpers,
}

fn story_read(variant: Variant, expect: Expect, read: Read) -> anyhow::Result<()> {
    let mut story = Story::build(variant)?;
    let router_inode = story.router.inode()?;
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    let mut cmd = std::process::Command::new(watcher::binary());
    cmd.args(["watch", "--format", "json", "--netns", &story.router.name])
        .args(["--resolve-after", "4s"]);
    if read == Read::WithHelpers {
        cmd.env("STALEWATCH_READ_WITH_HELPERS", "1");
    }
    let watcher = Watcher::start_command(cmd, false)?;
    let reads = match read {
        Read::AsTheKernelAllows => "read through bpf_rdonly_cast",
        Read::WithHelpers => "read with helper calls",
    };
    assert!(
        watcher.stderr_text().contains(reads),
        "{}",
        watcher.stderr_text()
    );

    let stale_src = story.producer_addr(STALE_SPORT);
    // The redeploy, and a new flow DNATed to the new container.
    let Played {
        mut stream,
        mut fresh,
        new_service,
    } = story.play(old_service, STALE_SPORT, NEW_SPORT)?;

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
    assert_eq!(raised["verdict"], "stale", "{raised}");
    if expect.current_known {
        assert_eq!(
            raised["current_backend"],
            serde_json::json!({"addr": plan.new_backend, "port": 8888}),
            "{raised}"
        );
    }
    let drop = &raised["failures"]["drop"];
    assert_eq!(drop["reason"], expect.drop, "{raised}");
    // Raised after its first failure, never before it.
    let delay = time(&raised["time"])
        .duration_since(time(&raised["failures"]["first"]))
        .map_err(|e| anyhow::anyhow!("raised {:?} before its first failure", e.duration()))?;
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
    assert_eq!(resolved["resolution"], "entry_gone", "{resolved}");

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

/// The path of kernels without `bpf_rdonly_cast` (before 6.2), forced.
#[test]
fn ipv4_iptables_read_with_helpers() -> anyhow::Result<()> {
    story_read(
        Variant::v4(Rules::Iptables),
        NEIGHBOUR_V4,
        Read::WithHelpers,
    )
}

#[test]
fn ipv6_ip6tables_read_with_helpers() -> anyhow::Result<()> {
    story_read(
        Variant::v6(Rules::Iptables),
        NEIGHBOUR_V6,
        Read::WithHelpers,
    )
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
            current_known: true,
        },
    )
}

/// The old bridge keeps its carrier, so the old neighbour entry stays
/// usable until it goes stale and its probes fail: 30-45 s or more. No
/// engine names the old backend gone, so the watch's audit leaves it to the
/// kernel path (the rules alone are no proof on this host's links).
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
            current_known: false,
            ..NEIGHBOUR_V4
        },
    )
}

/// Forwarded traffic that fails with no NAT at all is no stale flow: its
/// entry pins nothing here. What the router says of it is that its
/// destination is dead (the far end of another host's stale entry, see
/// multihost.rs). A DNAT flow failing beside it in the same router proves
/// that failures there are seen: only the NATed one is raised as stale.
#[test]
fn failing_flow_without_nat_is_not_raised() -> anyhow::Result<()> {
    let lan = DeadEnd::build(false)?;
    let watcher = Watcher::start(&["--netns", &lan.router.name])?;
    let mut plain = Producer::start(
        &lan.producer,
        lan.producer_addr(41000),
        "198.18.0.9:9999".parse()?,
        EVERY,
        300,
        secs(30),
    )?;
    // Give the un-NATed flow a head start, then fail a DNATed one.
    thread::sleep(secs(2));
    let mut natted = Producer::start(
        &lan.producer,
        lan.producer_addr(41001),
        lan.service(),
        EVERY,
        300,
        secs(30),
    )?;
    let raised = watcher
        .wait_for(secs(20), |v| is_stale_flow(v, "raised", 41001))
        .unwrap_or_else(|| panic!("the DNATed flow is raised: {:?}", watcher.records()));
    assert_eq!(
        raised["stale_backend"]["addr"], DEAD_END_BACKEND,
        "{raised}"
    );
    assert_eq!(raised["orig"]["dport"], 8888, "{raised}");
    assert_eq!(raised["verdict"], "stale", "{raised}");
    assert!(
        raised["failures"]["packets"].as_u64() >= Some(2),
        "{raised}"
    );
    assert!(
        stalewatch_tests::poll(secs(5), || (plain.errors() > 0).then_some(())).is_some(),
        "the un-NATed flow failed too (its sender saw ICMP errors)"
    );
    // What the router says of the flow without NAT: its dead destination
    // (raised on its own failures, not necessarily before the DNATed one's
    // on a busy machine).
    let dead = watcher
        .wait_for(secs(10), |v| v["orig"]["sport"] == 41000)
        .unwrap_or_else(|| panic!("a record of the dead destination: {:?}", watcher.records()));
    plain.stop();
    natted.stop();
    let records = watcher.records();
    assert!(
        !records
            .iter()
            .any(|v| v["type"] == "stale_flow" && v["orig"]["sport"] == 41000),
        "no stale flow for the flow without NAT: {records:?}"
    );
    assert_eq!(dead["type"], "dead_destination", "{dead}");
    assert_eq!(dead["dead"]["addr"], "198.18.0.9", "{dead}");
    let (status, _) = watcher.stop()?;
    assert!(status.success());
    Ok(())
}

/// Several flows pinned by one redeploy: each is raised, then they are
/// reminded of in one record for the service, whose fix deletes exactly
/// their entries (a sibling to the new backend survives it).
#[test]
fn stale_flows_of_one_service_are_reminded_of_together_and_fixed_at_once() -> anyhow::Result<()> {
    const OTHER_SPORT: u16 = 40010;
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    let watcher = Watcher::start(&[
        "--netns",
        &story.router.name,
        "--remind-every",
        "3s",
        "--resolve-after",
        "20s",
    ])?;
    let other_src = story.producer_addr(OTHER_SPORT);
    let mut other = Producer::start(
        &story.producer,
        other_src,
        story.service(),
        EVERY,
        1500,
        secs(150),
    )?;
    let Played {
        mut stream,
        mut fresh,
        new_service,
    } = story.play(old_service, STALE_SPORT, NEW_SPORT)?;
    let plan = story.plan;
    for sport in [STALE_SPORT, OTHER_SPORT] {
        let raised = watcher
            .wait_for(secs(20), |v| is_stale_flow(v, "raised", sport))
            .unwrap_or_else(|| panic!("flow {sport} not raised: {:?}", watcher.records()));
        assert_eq!(raised["verdict"], "stale", "{raised}");
    }
    let reminder = watcher
        .wait_for(secs(15), |v| v["type"] == "stale_service")
        .unwrap_or_else(|| panic!("no stale_service reminder: {:?}", watcher.records()));
    assert_eq!(reminder["state"], "reminder", "{reminder}");
    assert_eq!(reminder["verdict"], "stale", "{reminder}");
    assert_eq!(reminder["flows"], 2, "{reminder}");
    assert_eq!(
        reminder["service"],
        serde_json::json!({"dst": plan.router_lan, "dport": 8888})
    );
    assert_eq!(
        reminder["stale_backend"],
        serde_json::json!({"addr": plan.old_backend, "port": 8888})
    );
    assert_eq!(reminder["current_backend"]["addr"], plan.new_backend);
    assert!(reminder["failures"]["packets"].as_u64().unwrap() >= 6);
    assert!(
        !watcher
            .records()
            .iter()
            .any(|v| v["type"] == "stale_flow" && v["state"] == "reminder"),
        "no reminder of either flow alone: {:?}",
        watcher.records()
    );

    // Its one fix heals both, and leaves the new flow's entry alone.
    sh(reminder["fix"].as_str().expect("fix command"))?;
    for src in [story.producer_addr(STALE_SPORT), other_src] {
        assert!(
            new_service.wait_from(src, 5, secs(10)),
            "after the fix {src} reaches the new container"
        );
    }
    for sport in [STALE_SPORT, OTHER_SPORT] {
        let resolved = watcher
            .wait_for(secs(15), |v| is_stale_flow(v, "resolved", sport))
            .unwrap_or_else(|| panic!("{sport} not resolved: {:?}", watcher.records()));
        assert_eq!(resolved["resolution"], "entry_gone", "{resolved}");
    }
    assert_eq!(reminder["fix_entries"], 2, "{reminder}");
    assert!(
        story.has_entry(NEW_SPORT, plan.new_backend)?,
        "the new flow's entry survives the fix: {:?}",
        story.router.conntrack()?
    );
    for sport in [STALE_SPORT, OTHER_SPORT] {
        assert!(!story.has_entry(sport, plan.old_backend)?, "{sport}");
    }
    fresh.stop();
    stream.stop();
    other.stop();
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

/// Every flow to the service fails at the same backend: that backend is
/// down, it is not a stale entry.
#[test]
fn backend_down_when_every_flow_fails_there() -> anyhow::Result<()> {
    let lan = DeadEnd::build(false)?;
    let watcher = Watcher::start(&["--netns", &lan.router.name])?;
    let mut flows = Vec::new();
    for sport in [43000, 43001] {
        flows.push(Producer::start(
            &lan.producer,
            lan.producer_addr(sport),
            lan.service(),
            EVERY,
            300,
            secs(30),
        )?);
    }
    for sport in [43000, 43001] {
        let raised = watcher
            .wait_for(secs(20), |v| {
                v["type"] == "stale_flow" && v["orig"]["sport"] == sport
            })
            .unwrap_or_else(|| panic!("flow {sport} not raised: {:?}", watcher.records()));
        assert_eq!(raised["state"], "raised");
        assert_eq!(raised["verdict"], "backend_down", "{raised}");
        assert_eq!(
            raised["current_backend"]["addr"], DEAD_END_BACKEND,
            "{raised}"
        );
    }
    drop(flows);
    watcher.stop()?;
    Ok(())
}

/// A live backend with nothing on the port answers ICMP port unreachable
/// itself: the router forwards it, generates nothing, and stays quiet.
#[test]
fn port_unreachable_from_a_live_backend_is_not_raised() -> anyhow::Result<()> {
    let lan = DeadEnd::build(true)?;
    let watcher = Watcher::start(&["--netns", &lan.router.name])?;
    let mut flow = Producer::start(
        &lan.producer,
        lan.producer_addr(44000),
        lan.service(),
        EVERY,
        80,
        secs(10),
    )?;
    thread::sleep(secs(8));
    assert!(
        flow.errors() > 0,
        "the sender saw the backend's port unreachable"
    );
    flow.stop();
    assert!(watcher.records().is_empty(), "{:?}", watcher.records());
    watcher.stop()?;
    Ok(())
}

/// A rolling restart handled correctly: a burst of packets fails, then the
/// orchestrator deletes the old entry, and the stream goes on to the new
/// backend. Nothing is stale.
#[test]
fn a_failure_cleaned_up_by_the_orchestrator_stays_quiet() -> anyhow::Result<()> {
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    let watcher = Watcher::start(&["--netns", &story.router.name])?;
    let src = story.producer_addr(STALE_SPORT);
    let mut stream = Producer::start(&story.producer, src, story.service(), EVERY, 300, secs(30))?;
    assert!(old_service.wait_from(src, 5, secs(10)));
    story.redeploy()?;
    drop(old_service);
    let new_service = Receiver::start(&story.new, 8888)?;
    // The first failure reaches the sender as host unreachable.
    let until = Instant::now() + secs(15);
    while stream.errors() == 0 && Instant::now() < until {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(stream.errors() > 0, "the stream failed after the redeploy");
    sh(&story.expected_fix("udp", STALE_SPORT))?;
    assert!(
        new_service.wait_from(src, 20, secs(10)),
        "the stream moved on"
    );
    thread::sleep(secs(3));
    stream.stop();
    assert!(watcher.records().is_empty(), "{:?}", watcher.records());
    watcher.stop()?;
    Ok(())
}

#[test]
fn only_the_watched_namespace_is_reported() -> anyhow::Result<()> {
    // Two routers with the same failing DNAT; stalewatch watches one.
    let lans = [DeadEnd::build(false)?, DeadEnd::build(false)?];
    let watched = lans[0].router.inode()?;
    let watcher = Watcher::start(&["--netns", &watched.to_string()])?;
    let mut streams = Vec::new();
    for lan in &lans {
        streams.push(Producer::start(
            &lan.producer,
            lan.producer_addr(42000),
            lan.service(),
            EVERY,
            200,
            secs(20),
        )?);
    }
    let raised = watcher
        .wait_for(secs(15), |v| is_stale_flow(v, "raised", 42000))
        .unwrap_or_else(|| panic!("not raised: {:?}", watcher.records()));
    assert_eq!(raised["netns"]["inode"], watched, "{raised}");
    assert_eq!(
        raised["stale_backend"]["addr"], DEAD_END_BACKEND,
        "{raised}"
    );
    // A lone flow at a backend the host cannot resolve: no sibling fails
    // there too, so stale, on the neighbour's failure.
    assert_eq!(raised["verdict"], "stale", "{raised}");
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
