//! The NAT intent kept from nf_tables' announcements against the intent
//! `nft -j list ruleset` gives, on node A of issue #15's topology (root):
//! after every rewrite of the services' rules, the rules the watch holds
//! without listing the ruleset again must be the rules a fresh listing
//! reads, rule for rule.

use std::collections::HashSet;

use stalewatch::{
    domain::DnatRule,
    source::intent::{self, Announcement, Changes, Reading},
};
use stalewatch_tests::{
    multihost::{Cluster, DNS, Dnat, Engine, Family, L4, METRICS},
    netns::Netns,
};

/// Named sets and maps, an interface match, ranges, an inet table with
/// both families' DNATs, a DNAT map of `addr . port`.
const MIXED: &str = include_str!("../../stalewatch/src/source/intent/testdata/nft-mixed.nft");

/// The rules of a reading, as a set (their order is the walk's).
fn rules(reading: &mut Reading) -> HashSet<DnatRule> {
    let intent = reading.intent().expect("the rules announced read");
    intent.rules().iter().cloned().collect()
}

struct Follower {
    changes: Changes,
    reading: Reading,
    applied: usize,
}

impl Follower {
    fn start(cluster: &Cluster) -> Follower {
        Follower::on(&cluster.node_a)
    }

    fn on(ns: &Netns) -> Follower {
        let path = ns.path();
        let changes = Changes::listen(&path).expect("listening to ruleset announcements");
        let reading = intent::read(&path).expect("reading node A's rules");
        Follower {
            changes,
            reading,
            applied: 0,
        }
    }

    /// Applies what was announced since, then checks the rules against a
    /// fresh listing.
    fn check(&mut self, cluster: &Cluster, step: &str) {
        self.check_in(&cluster.node_a, step);
    }

    fn check_in(&mut self, ns: &Netns, step: &str) {
        let mut changes = 0;
        let mut refused = None;
        let reading = &mut self.reading;
        let whole = self.changes.drain(|a| {
            if matches!(a, Announcement::Generation) || refused.is_some() {
                return;
            }
            changes += 1;
            if let Err(e) = reading.apply(a) {
                refused = Some(e.to_string());
            }
        });
        assert!(whole, "{step}: announcements lost");
        assert_eq!(refused, None, "{step}: an announcement refused");
        assert!(changes > 0, "{step}: nothing was announced");
        self.applied += changes;
        let kept = rules(&mut self.reading);
        let listed = rules(&mut intent::read(&ns.path()).expect("listing the rules"));
        let missing: Vec<_> = listed.difference(&kept).collect();
        let extra: Vec<_> = kept.difference(&listed).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{step}: the kept rules differ from a listing's\nmissing: {missing:#?}\nextra: {extra:#?}"
        );
        assert!(
            !listed.is_empty() || step.contains("zero"),
            "{step}: no rule"
        );
    }
}

/// A rewrite of the services' rules, named.
type Step = (
    &'static str,
    Box<dyn Fn(&mut Cluster) -> anyhow::Result<()>>,
);

fn follow(engine: Engine, family: Family, l4: L4) {
    let mut cluster = Cluster::build(engine, family, l4).expect("building the topology");
    let mut f = Follower::start(&cluster);
    let steps: Vec<Step> = vec![
        (
            "DNS to 7",
            Box::new(|c| c.set_service(&DNS, Dnat::Endpoints(vec![7]))),
        ),
        (
            "DNS moved to 8",
            Box::new(|c| c.set_service(&DNS, Dnat::Endpoints(vec![8]))),
        ),
        (
            "METRICS to 7",
            Box::new(|c| c.set_service(&METRICS, Dnat::Endpoints(vec![7]))),
        ),
        (
            "DNS load-balanced over 8, 9, 10",
            Box::new(|c| c.set_service(&DNS, Dnat::Endpoints(vec![8, 9, 10]))),
        ),
        (
            "DNS endpoint 9 removed",
            Box::new(|c| c.set_service(&DNS, Dnat::Endpoints(vec![8, 10]))),
        ),
        (
            "DNS to a range",
            Box::new(|c| c.set_service(&DNS, Dnat::Range(20, 23))),
        ),
        (
            "DNS to a port range",
            Box::new(|c| c.set_service(&DNS, Dnat::PortRange(11))),
        ),
        (
            "DNS through a DNAT map",
            Box::new(|c| c.set_service(&DNS, Dnat::Map(12))),
        ),
        (
            "METRICS scaled to zero",
            Box::new(|c| c.remove_service(&METRICS)),
        ),
        ("DNS scaled to zero", Box::new(|c| c.remove_service(&DNS))),
    ];
    for (step, change) in steps {
        change(&mut cluster).unwrap_or_else(|e| panic!("{step}: {e:#}"));
        f.check(&cluster, step);
    }
    assert!(f.applied > 10, "only {} changes announced", f.applied);
}

#[test]
fn plain_nftables_v4_udp() {
    follow(Engine::NftPlain, Family::V4, L4::Udp);
}

#[test]
fn plain_nftables_v6_tcp() {
    follow(Engine::NftPlain, Family::V6, L4::Tcp);
}

#[test]
fn kube_proxy_nftables_v4_tcp() {
    follow(Engine::NftKube, Family::V4, L4::Tcp);
}

#[test]
fn kube_proxy_nftables_v6_udp() {
    follow(Engine::NftKube, Family::V6, L4::Udp);
}

/// iptables-nft's rules are announced too, but as compat expressions the
/// reading cannot take: the watch reads the rules again whole.
#[test]
fn iptables_nft_changes_ask_for_a_whole_reading() {
    let mut cluster =
        Cluster::build(Engine::IptablesNftKube, Family::V4, L4::Udp).expect("building");
    let mut f = Follower::start(&cluster);
    cluster
        .set_service(&DNS, Dnat::Endpoints(vec![7]))
        .expect("writing the rules");
    let mut refused = false;
    let reading = &mut f.reading;
    f.changes.drain(|a| {
        if !matches!(a, Announcement::Generation) {
            refused |= reading.apply(a).is_err();
        }
    });
    assert!(
        refused,
        "an iptables-nft rule was taken from its announcement"
    );
}

/// Every construct of the readers' fixture, then edits in place: a named
/// map's element replaced, a set element added, a rule inserted before
/// another, one deleted by handle, a chain flushed.
#[test]
fn named_sets_maps_and_edits_in_place() {
    let ns = Netns::new("intent").expect("a namespace");
    let mut f = Follower::on(&ns);
    let nft = |script: &str| {
        ns.exec_input(&["nft", "-f", "-"], script)
            .unwrap_or_else(|e| panic!("{script}: {e:#}"));
    };
    nft(MIXED);
    f.check_in(&ns, "the fixture loaded");
    nft(
        "delete element ip kube-proxy service-ips { 10.96.0.10 . udp . 53 }\n\
         add element ip kube-proxy service-ips { 10.96.0.10 . udp . 53 : goto endpoint-b, 10.96.0.12 . tcp . 80 : jump endpoint-a }",
    );
    f.check_in(&ns, "a verdict map's element replaced and one added");
    nft(
        "delete element inet plain ports { 53 }\nadd element inet plain ports { 54 : 10.2.0.9 . 5454 }",
    );
    f.check_in(&ns, "a DNAT map's element replaced");
    nft("insert rule inet plain pre ip daddr 10.0.0.7 udp dport 7 dnat ip to 10.7.0.7:7");
    f.check_in(&ns, "a rule inserted first");
    let handle = ns
        .exec(&["nft", "-a", "list", "chain", "inet", "plain", "pre"])
        .expect("listing handles")
        .lines()
        .find(|l| l.contains("10.1.0.1-10.1.0.5"))
        .and_then(|l| {
            l.rsplit("# handle ")
                .next()
                .map(str::trim)
                .map(str::to_owned)
        })
        .expect("the range rule's handle");
    nft(&format!(
        "add rule inet plain pre position {handle} ip daddr 10.0.0.8 dnat ip to 10.8.0.8\n\
         delete rule inet plain pre handle {handle}"
    ));
    f.check_in(&ns, "a rule added after another, which is deleted");
    nft(
        "flush chain ip kube-proxy endpoint-a\nadd rule ip kube-proxy endpoint-a meta l4proto udp dnat ip to 10.244.1.9:53",
    );
    f.check_in(&ns, "an endpoint chain flushed and refilled");
    nft("delete table inet plain");
    f.check_in(&ns, "a table deleted");
}
