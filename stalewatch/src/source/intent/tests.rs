//! The readers on rulesets as the real tools print them (see testdata/).

use std::net::IpAddr;

use super::nft;
use crate::domain::{Backend, Fit, PortSpan, Proto, RuleEngine, Tuple, udp};

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
