//! The readers on rulesets as the real tools print them (see testdata/).

use std::net::IpAddr;

use super::{iptables, nft};
use crate::domain::{
    Backend, EngineRead, Family, Fit, NatIntent, PortSpan, Proto, RuleEngine, Tuple, udp,
};

fn backend(s: &str, port: u16) -> Backend {
    Backend::new(s.parse().unwrap(), port)
}

/// `nft -j list ruleset` of testdata/nft-mixed.nft: a kube-proxy-style
/// table (a verdict map of services, numgen over endpoint chains) and a
/// table of plain DNATs (an interface limit, a range, a set, a DNAT map).
const MIXED: &str = include_str!("testdata/nft-mixed.json");

#[test]
fn kube_proxy_nftables_maps_lead_to_every_endpoint() {
    let nft::Parsed {
        rules, complete, ..
    } = nft::parse(MIXED).unwrap();
    assert!(complete);
    let dns = udp("192.0.2.2", 40000, "10.96.0.10", 53);
    let to: Vec<Backend> = rules
        .iter()
        .filter(|r| r.when.admits(&dns, Some("eth0"), |_| false) == Fit::Yes)
        .flat_map(|r| r.to.iter().filter_map(|t| t.backend(53)))
        .collect();
    assert_eq!(to, [backend("10.244.1.7", 53), backend("10.244.1.8", 53)]);
    assert!(rules.iter().all(|r| r.engine == RuleEngine::Nftables));
    // The masquerade mark's jump (ip saddr) is no DNAT of its own.
    let other = udp("192.0.2.2", 40000, "10.96.0.11", 53);
    assert!(
        rules
            .iter()
            .filter(|r| r.chain.contains("kube-proxy"))
            .all(|r| r.when.admits(&other, None, |_| false) == Fit::No)
    );
}

#[test]
fn plain_dnats_keep_interface_range_set_and_map() {
    let rules = nft::parse(MIXED).unwrap().rules;
    let admitted = |flow: &Tuple, iif: Option<&str>| -> Vec<String> {
        rules
            .iter()
            .filter(|r| r.when.admits(flow, iif, |_| false) != Fit::No)
            .map(|r| format!("{:?}", r.to))
            .collect()
    };
    // iifname "ext" udp dport 8888 dnat ip to 172.20.0.2:8888
    let published = udp("192.0.2.9", 1, "192.0.2.1", 8888);
    assert_eq!(admitted(&published, Some("ext")).len(), 1);
    assert!(admitted(&published, Some("int")).is_empty());
    // ip daddr 10.0.0.1 udp dport 1000-2000 dnat ip to 10.1.0.1-10.1.0.5:3000-4000
    let ranged = udp("192.0.2.9", 1, "10.0.0.1", 1500);
    let rule = rules
        .iter()
        .find(|r| r.when.admits(&ranged, None, |_| false) == Fit::Yes)
        .expect("the range rule");
    assert!(rule.to[0].reaches(1500, backend("10.1.0.4", 3999)));
    assert_eq!(rule.to[0].port, Some(PortSpan { lo: 3000, hi: 4000 }));
    // A set of addresses and ports, not from lo.
    let set = udp("192.0.2.9", 1, "10.0.0.4", 9);
    assert_eq!(admitted(&set, Some("eth0")).len(), 1);
    assert!(admitted(&set, Some("lo")).is_empty());
    // A DNAT map: dport 53 to 10.2.0.1:5353, in the output hook.
    let mapped = udp("192.0.2.9", 1, "10.0.0.2", 53);
    let rule = rules
        .iter()
        .find(|r| r.when.admits(&mapped, None, |_| false) == Fit::Yes)
        .expect("the map rule");
    assert!(rule.to[0].reaches(53, backend("10.2.0.1", 5353)));
    // tcp dport 80 dnat ip6 to [2001:db8::5]:8080, in an inet table.
    let web = Tuple {
        proto: Proto::TCP,
        ..udp("2001:db8::9", 1, "2001:db8::1", 80)
    };
    let rule = rules
        .iter()
        .find(|r| r.when.admits(&web, None, |_| false) == Fit::Yes)
        .expect("the ip6 rule");
    assert_eq!(rule.to[0].addr.lo, "2001:db8::5".parse::<IpAddr>().unwrap());
}

#[test]
fn iptables_nft_rules_in_nft_listings_are_left_to_iptables() {
    // What `nft -j` shows of an iptables-nft DNAT: compat statements.
    let json = r#"{"nftables": [
      {"table": {"family": "ip", "name": "nat", "handle": 1}},
      {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
      {"rule": {"family": "ip", "table": "nat", "chain": "PREROUTING", "handle": 2, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.96.0.11"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}}, {"xt": {"type": "match", "name": "comment"}}, {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "DNAT"}}]}}
    ]}"#;
    let parsed = nft::parse(json).unwrap();
    assert!(parsed.rules.is_empty());
    assert!(parsed.complete);
    assert!(parsed.iptables_dnat, "for iptables-nft-save to read");
}

#[test]
fn a_dnat_that_cannot_be_read_makes_the_reading_incomplete() {
    let json = r#"{"nftables": [
      {"chain": {"family": "ip", "table": "t", "name": "pre", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
      {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 2, "expr": [{"dnat": {"addr": {"jhash": {"expr": {"payload": {"protocol": "ip", "field": "saddr"}}, "mod": 2}}}}]}}
    ]}"#;
    let parsed = nft::parse(json).unwrap();
    assert!(parsed.rules.is_empty());
    assert!(!parsed.complete);
    assert!(!parsed.iptables_dnat);
}

/// What node A's rules of one engine say, read as `read_here` reads them:
/// `nft -j` always, the engine's `*-save` where it has one.
fn intent_of(engine: &str, state: &str) -> NatIntent {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/source/intent/testdata");
    let file = |name: String| std::fs::read_to_string(format!("{dir}/{name}")).ok();
    let (mut rules, mut read) = (Vec::new(), Vec::new());
    let nft_json = file(format!("{engine}-{state}.json"))
        .or_else(|| file(format!("{engine}-{state}.nft.json")));
    if let Some(json) = nft_json {
        let parsed = nft::parse(&json).unwrap();
        rules.extend(parsed.rules);
        read.push(EngineRead {
            engine: RuleEngine::Nftables,
            complete: parsed.complete,
        });
    }
    let (tool, engine_read) = match engine {
        "iptables-nft-kube" => ("save", RuleEngine::IptablesNft),
        "iptables-legacy-kube" => ("save", RuleEngine::IptablesLegacy),
        _ => ("", RuleEngine::Nftables),
    };
    if !tool.is_empty() {
        let family = if state.contains("v6") {
            Family::Ipv6
        } else {
            Family::Ipv4
        };
        let save = file(format!("{engine}-{state}.txt")).expect("a save file");
        let (found, complete) = iptables::parse(&save, engine_read, family);
        rules.extend(found);
        read.push(EngineRead {
            engine: engine_read,
            complete,
        });
    }
    NatIntent::new(rules, read)
}

/// Where node A's rules can send the client's DNS stream now.
fn dns_targets(intent: &NatIntent, v6: bool) -> Vec<String> {
    let flow = if v6 {
        udp("2001:db8:0:1::2", 40000, "2001:db8:96::10", 53)
    } else {
        udp("192.0.2.2", 40000, "10.96.0.10", 53)
    };
    let mut out: Vec<String> = intent
        .for_flow(&flow, Some("eth0"), |_| false)
        .into_iter()
        .flat_map(|(r, _)| r.to.iter().map(|t| format!("{t:?}")))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn pod(host: u8, port: u16) -> Backend {
    backend(&format!("10.244.1.{host}"), port)
}

fn reaches(intent: &NatIntent, to: Backend) -> bool {
    let flow = udp("192.0.2.2", 40000, "10.96.0.10", 53);
    intent
        .for_flow(&flow, Some("eth0"), |_| false)
        .iter()
        .any(|(r, _)| r.to.iter().any(|t| t.reaches(53, to)))
}

const ENGINES: [&str; 4] = [
    "nft-plain",
    "nft-kube",
    "iptables-nft-kube",
    "iptables-legacy-kube",
];

#[test]
fn every_engine_moves_the_service_from_seven_to_eight() {
    for engine in ENGINES {
        let before = intent_of(engine, "v4-before");
        assert!(before.complete(), "{engine}: {:?}", before.read());
        assert!(
            reaches(&before, pod(7, 5353)),
            "{engine} before: {:?}",
            dns_targets(&before, false)
        );
        assert!(!reaches(&before, pod(8, 5353)), "{engine} before");
        let after = intent_of(engine, "v4-after-move");
        assert!(
            reaches(&after, pod(8, 5353)),
            "{engine} after: {:?}",
            dns_targets(&after, false)
        );
        assert!(
            !reaches(&after, pod(7, 5353)),
            "{engine} after: {:?}",
            dns_targets(&after, false)
        );
        assert_eq!(dns_targets(&after, false).len(), 1, "{engine}");
    }
}

#[test]
fn every_engine_in_ipv6_too() {
    for engine in ENGINES {
        let after = intent_of(engine, "v6-after-move");
        let flow = udp("2001:db8:0:1::2", 40000, "2001:db8:96::10", 53);
        let to = |h: &str| backend(&format!("2001:db8:244:1::{h}"), 5353);
        let rules = after.for_flow(&flow, Some("eth0"), |_| false);
        assert!(
            rules
                .iter()
                .any(|(r, _)| r.to.iter().any(|t| t.reaches(53, to("8")))),
            "{engine}: {:?}",
            dns_targets(&after, true)
        );
        assert!(
            !rules
                .iter()
                .any(|(r, _)| r.to.iter().any(|t| t.reaches(53, to("7"))))
        );
    }
}

#[test]
fn scaled_to_zero_leaves_no_rule_for_the_service_and_says_so_completely() {
    for engine in ENGINES {
        let zero = intent_of(engine, "v4-scaled-to-zero");
        assert!(
            dns_targets(&zero, false).is_empty(),
            "{engine}: {:?}",
            dns_targets(&zero, false)
        );
        assert!(zero.complete(), "{engine}: {:?}", zero.read());
    }
}

#[test]
fn a_reused_address_is_another_services_backend() {
    for engine in ENGINES {
        let reused = intent_of(engine, "v4-address-reused");
        assert!(!reaches(&reused, pod(7, 5353)), "{engine}");
        let dns = udp("192.0.2.2", 1, "10.96.0.10", 53).service();
        let serves = reused.services_sending_to(pod(7, 5353), &dns);
        assert_eq!(
            serves.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["10.96.0.11:8080/udp"],
            "{engine}"
        );
    }
}

#[test]
fn load_balancing_ranges_port_ranges_and_maps_reach_their_backends() {
    for engine in ENGINES {
        let lb = intent_of(engine, "v4-load-balanced");
        assert!(
            reaches(&lb, pod(7, 5353)) && reaches(&lb, pod(8, 5353)),
            "{engine}"
        );
        let one_left = intent_of(engine, "v4-load-balanced-one-removed");
        assert!(
            !reaches(&one_left, pod(7, 5353)) && reaches(&one_left, pod(8, 5353)),
            "{engine}"
        );
        let range = intent_of(engine, "v4-range");
        assert!(
            reaches(&range, pod(7, 5353)) && reaches(&range, pod(8, 5353)),
            "{engine}: {:?}",
            dns_targets(&range, false)
        );
        let ports = intent_of(engine, "v4-port-range");
        assert!(
            reaches(&ports, pod(8, 5354)) && !reaches(&ports, pod(7, 5353)),
            "{engine}: {:?}",
            dns_targets(&ports, false)
        );
    }
    for engine in ["nft-plain", "nft-kube"] {
        let map = intent_of(engine, "v4-map");
        assert!(
            reaches(&map, pod(8, 5353)),
            "{engine}: {:?}",
            dns_targets(&map, false)
        );
        assert!(!reaches(&map, pod(7, 5353)), "{engine}");
    }
}

#[test]
fn tcp_services_are_told_from_udp_ones() {
    for engine in ["nft-kube", "iptables-nft-kube", "iptables-legacy-kube"] {
        let after = intent_of(engine, "v4-tcp-after-move");
        let tcp = Tuple {
            proto: Proto::TCP,
            ..udp("192.0.2.2", 40000, "10.96.0.10", 53)
        };
        let rules = after.for_flow(&tcp, Some("eth0"), |_| false);
        assert!(
            rules
                .iter()
                .any(|(r, _)| r.to.iter().any(|t| t.reaches(53, pod(8, 5353)))),
            "{engine}"
        );
        assert!(
            !reaches(&after, pod(8, 5353)),
            "{engine}: the UDP flow has no rule"
        );
    }
}

/// How long parsing a large ruleset takes: `STALEWATCH_BIG_RULESET=FILE`
/// (an `nft -j list ruleset`), run with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand"]
fn parse_a_large_ruleset() {
    let Some(file) = std::env::var_os("STALEWATCH_BIG_RULESET") else {
        return;
    };
    let json = std::fs::read_to_string(file).unwrap();
    let started = std::time::Instant::now();
    let parsed = nft::parse(&json).unwrap();
    let intent = NatIntent::new(parsed.rules, Vec::new());
    println!("{} rules in {:?}", intent.rules().len(), started.elapsed());
}

#[test]
fn an_nftables_redirect_sends_to_the_host_itself() {
    let json = r#"{"nftables": [
      {"chain": {"family": "inet", "table": "t", "name": "pre", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
      {"rule": {"family": "inet", "table": "t", "chain": "pre", "handle": 2, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"redirect": {"port": 3128}}]}}
    ]}"#;
    let parsed = nft::parse(json).unwrap();
    assert!(parsed.complete);
    let web = Tuple {
        proto: Proto::TCP,
        ..udp("192.0.2.9", 1, "192.0.2.1", 80)
    };
    let rule = &parsed.rules[0];
    assert_eq!(rule.when.admits(&web, None, |_| false), Fit::Yes);
    assert!(
        rule.to
            .iter()
            .any(|t| t.reaches(80, backend("192.0.2.1", 3128)))
    );
    assert!(
        rule.to
            .iter()
            .any(|t| t.reaches(80, backend("2001:db8::1", 3128)))
    );
}

/// The walk of a large ruleset, timed (`STALEWATCH_RULESET=<nft -j
/// output> cargo test --release -- --ignored walk_timing --nocapture`).
#[test]
#[ignore]
fn walk_timing() {
    let Ok(path) = std::env::var("STALEWATCH_RULESET") else {
        return;
    };
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap()
            .to_owned()
    };
    let json = std::fs::read_to_string(path).unwrap();
    eprintln!(
        "before: {}; Statement {} B, Expression {} B, Rule {} B",
        rss(),
        size_of::<nftables::stmt::Statement>(),
        size_of::<nftables::expr::Expression>(),
        size_of::<nftables::schema::Rule>()
    );
    let mut ruleset = nft::Ruleset::from_json(&json).unwrap();
    drop(json);
    // SAFETY: releases free memory only.
    unsafe { nix::libc::malloc_trim(0) };
    eprintln!("ruleset kept: {}", rss());
    let rounds: usize = std::env::var("STALEWATCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        let parsed = ruleset.walk();
        let walked = t.elapsed();
        let n = parsed.rules.len();
        let intent = NatIntent::new(parsed.rules, Vec::new());
        eprintln!(
            "{n} rules: walk {walked:?}, intent {:?}",
            t.elapsed() - walked
        );
        assert_eq!(intent.rules().len(), n);
        eprintln!("with the intent: {}", rss());
    }
}

/// The cost of a storm of announced changes, without the kernel: with
/// STALEWATCH_STORM_NETNS (a namespace holding a ruleset) and
/// STALEWATCH_STORM_INPUTS (`nft -f` inputs, comma-separated), the
/// inputs are applied in turn STALEWATCH_ROUNDS times in all and their
/// announcements captured, then replayed in order, each rewrite's: taking
/// them, then the intent made.
/// `cargo test --release -p stalewatch --lib storm_timing -- --ignored --nocapture`
#[test]
#[ignore = "needs root, a namespace and nft: a measurement, not a check"]
fn storm_timing() {
    use std::time::{Duration, Instant};
    let (Ok(ns), Ok(inputs)) = (
        std::env::var("STALEWATCH_STORM_NETNS"),
        std::env::var("STALEWATCH_STORM_INPUTS"),
    ) else {
        eprintln!("STALEWATCH_STORM_NETNS and STALEWATCH_STORM_INPUTS unset: nothing measured");
        return;
    };
    let path = std::path::PathBuf::from(format!("/run/netns/{ns}"));
    let mut changes = super::Changes::listen(&path).unwrap();
    let mut reading = super::read(&path).unwrap();
    changes.drain(|_| {});
    let rounds: usize = std::env::var("STALEWATCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let mut captured: Vec<Vec<Vec<u8>>> = Vec::new();
    for input in inputs.split(',').cycle().take(rounds) {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", input])
            .status()
            .unwrap();
        assert!(status.success());
        let mut bufs = Vec::new();
        let quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(300) {
            changes.drain_raw(|b| bufs.push(b.to_vec()));
        }
        captured.push(bufs);
    }
    let (mut taking, mut making) = (Duration::ZERO, Duration::ZERO);
    for rewrite in &captured {
        let t = Instant::now();
        let mut n = 0;
        for buf in rewrite {
            super::netlink::decode(buf, |a| {
                n += 1;
                reading.apply(a).unwrap();
            });
        }
        let took = t.elapsed();
        let ruleset = reading.nft.as_mut().unwrap();
        ruleset.settle().unwrap();
        let settled = t.elapsed() - took;
        let parsed = ruleset.walk();
        let walked = t.elapsed() - took - settled;
        let intent = NatIntent::new(parsed.rules, Vec::new());
        let made = t.elapsed() - took;
        eprintln!(
            "{n} announcements ({} receives) taken in {took:?}; the intent ({} rules) made in {made:?}: settle {settled:?}, walk {walked:?}, NatIntent::new {:?}",
            rewrite.len(),
            intent.rules().len(),
            made - settled - walked
        );
        drop(intent);
        taking += took;
        making += made;
    }
    eprintln!(
        "per round: taking {:?}, making {:?}",
        taking / rounds as u32,
        making / rounds as u32
    );
}
