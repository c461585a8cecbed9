//! End to end, issue #15: the failures of a stale entry happen on another
//! host. Node A DNATs a service to a pod on node B; the pod moves, and the
//! client's stream stays pinned to the old address in A's table while A
//! forwards it without a failure of its own. stalewatch on A raises the
//! flow from A's NAT intent (its rules), on every rule engine; stalewatch on
//! B reports the dead destination; `check --fix` on A deletes exactly the
//! stale entry. Root only; everything in namespaces of the test's own.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalewatch_tests::{
    multihost::{Cluster, DNS, Dnat, Engine, Family, L4, METRICS},
    poll,
    watcher::{Watcher, binary, is_stale_flow},
};

const STALE_SPORT: u16 = 40053;
const NEW_SPORT: u16 = 40054;
const EVERY: Duration = Duration::from_millis(100);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A cluster with DNS served by pod .7 and the client streaming to it.
struct Pinned {
    c: Cluster,
    stream: stalewatch_tests::traffic::Producer,
}

fn pinned(engine: Engine, family: Family) -> Pinned {
    let mut c = Cluster::build(engine, family, L4::Udp).expect("build");
    c.deploy(&DNS, 7).expect("deploy on .7");
    let rx7 = c.udp_receiver(7, &DNS).expect("receiver .7");
    let stream = c
        .producer(&DNS, STALE_SPORT, EVERY, 900, secs(90))
        .expect("stream");
    assert!(
        rx7.wait_from(c.client_addr(STALE_SPORT), 3, secs(5)),
        "{engine:?}: the stream reaches pod .7"
    );
    Pinned { c, stream }
}

fn watch(ns: &str) -> Watcher {
    Watcher::start(&["--netns", ns]).expect("stalewatch watch")
}

/// Runs the fix an alert printed.
fn apply_fix(raised: &Value) {
    let fix = raised["fix"].as_str().expect("a fix");
    let out = Command::new("sh").args(["-c", fix]).output().expect("sh");
    assert!(out.status.success(), "{fix}: {out:?}");
}

/// The stale stream's alert resolves within 10 s (its entry is gone).
fn assert_resolved(watcher: &Watcher) {
    assert!(
        watcher
            .wait_for(secs(10), |v| is_stale_flow(v, "resolved", STALE_SPORT))
            .is_some(),
        "resolved once the entry is gone: {:?}",
        watcher.records()
    );
}

fn addr_of(v: &Value) -> String {
    v["addr"].as_str().unwrap_or_default().to_owned()
}

/// Node A raises the pinned stream within 10 s of the move: verdict
/// stale, A's namespace, stale backend .7, current backend .8, evidence
/// from the engine's rules, and a fix that heals the stream.
fn a_raises_the_moved_service(engine: Engine, family: Family) {
    let Pinned { mut c, mut stream } = pinned(engine, family);
    let a = c.node_a.name.clone();
    let mut cmd = Command::new(binary());
    cmd.args(["watch", "--format", "json", "--netns", &a])
        .env("RUST_LOG", "warn,stalewatch::command::watch::rules=info");
    let watcher = Watcher::start_command(cmd, false).expect("stalewatch watch");
    // Nothing is stale before the move.
    std::thread::sleep(secs(2));
    c.move_backend(&DNS, 7, 8).expect("move to .8");
    let moved = Instant::now();
    let rx8 = c.udp_receiver(8, &DNS).expect("receiver .8");
    let mut fresh = c
        .producer(&DNS, NEW_SPORT, EVERY, 200, secs(20))
        .expect("new flow");
    let raised = watcher
        .wait_for(secs(12), |v| is_stale_flow(v, "raised", STALE_SPORT))
        .unwrap_or_else(|| {
            panic!(
                "{engine:?} {family:?}: A raises the pinned stream: {:?}",
                watcher.records()
            )
        });
    let delay = moved.elapsed();
    assert!(
        delay <= secs(10),
        "{engine:?}: raised {delay:?} after the move"
    );
    assert_eq!(raised["verdict"], "stale", "{raised}");
    assert_eq!(raised["netns"]["name"], a.as_str(), "{raised}");
    assert_eq!(addr_of(&raised["stale_backend"]), c.pod_ip(7).to_string());
    assert_eq!(raised["stale_backend"]["port"], DNS.target_port);
    assert_eq!(addr_of(&raised["current_backend"]), c.pod_ip(8).to_string());
    assert_eq!(raised["current_backend"]["port"], DNS.target_port);
    let evidence = raised["evidence"].to_string();
    let by = match engine {
        Engine::NftPlain | Engine::NftKube => "nftables",
        Engine::IptablesNftKube => "iptables-nft",
        Engine::IptablesLegacyKube => "iptables-legacy",
    };
    assert!(
        evidence.contains(&format!("the current {by} rules DNAT")),
        "{engine:?}: {evidence}"
    );
    assert_eq!(raised["failures"]["packets"], 0, "nothing fails on A");
    if matches!(engine, Engine::NftPlain | Engine::NftKube) {
        // nftables announced the move and the watch took it as announced,
        // without listing the ruleset again.
        assert!(
            watcher
                .wait_stderr(secs(5), |l: &str| l.contains("announced changes taken"))
                .is_some(),
            "{engine:?}: the move taken from nftables' announcements: {}",
            watcher.stderr_text()
        );
    }
    // The healthy new flow is never raised.
    assert!(rx8.wait_from(c.client_addr(NEW_SPORT), 3, secs(5)));
    assert!(
        !watcher
            .records()
            .iter()
            .any(|v| v["orig"]["sport"] == NEW_SPORT),
        "the new flow is healthy"
    );
    // The printed fix deletes the entry: the stream reaches .8 then, and
    // the alert resolves.
    apply_fix(&raised);
    assert!(
        rx8.wait_from(c.client_addr(STALE_SPORT), 3, secs(5)),
        "{engine:?}: healed, the stream reaches .8"
    );
    assert_resolved(&watcher);
    fresh.stop();
    stream.stop();
    let records = watcher.records();
    assert_eq!(
        records
            .iter()
            .filter(|v| is_stale_flow(v, "raised", STALE_SPORT))
            .count(),
        1,
        "raised once: {records:?}"
    );
    watcher.stop().expect("stop");
}

#[test]
fn node_a_raises_a_flow_pinned_by_native_nftables() {
    a_raises_the_moved_service(Engine::NftPlain, Family::V4);
}

#[test]
fn node_a_raises_a_flow_pinned_by_kube_proxy_nftables_maps() {
    a_raises_the_moved_service(Engine::NftKube, Family::V4);
}

#[test]
fn node_a_raises_a_flow_pinned_by_kube_proxy_iptables_nft() {
    a_raises_the_moved_service(Engine::IptablesNftKube, Family::V4);
}

#[test]
fn node_a_raises_a_flow_pinned_by_kube_proxy_iptables_legacy() {
    a_raises_the_moved_service(Engine::IptablesLegacyKube, Family::V4);
}

#[test]
fn node_a_raises_an_ipv6_flow() {
    a_raises_the_moved_service(Engine::NftKube, Family::V6);
}

/// A TCP connection made while the watch runs: its entry reaches the
/// audit through its conntrack event (the audit's log says how many DNATed
/// entries it holds that way), not through a dump.
#[test]
fn node_a_raises_a_tcp_connection() {
    let mut c = Cluster::build(Engine::IptablesNftKube, Family::V4, L4::Tcp).expect("build");
    c.deploy(&DNS, 7).expect("deploy on .7");
    let rx7 = c.tcp_receiver(7, &DNS).expect("receiver .7");
    let mut cmd = Command::new(binary());
    cmd.args(["watch", "--format", "json", "--netns", &c.node_a.name])
        .args(["--audit-every", "2s"])
        .env("RUST_LOG", "warn,stalewatch::command::watch::audit=debug");
    let watcher = Watcher::start_command(cmd, false).expect("stalewatch watch");
    let from_events =
        |n: u32| move |line: &str| line.contains(&format!("({n} DNATed from conntrack events)"));
    assert!(
        watcher.wait_stderr(secs(10), from_events(0)).is_some(),
        "the audit follows A's conntrack events: {}",
        watcher.stderr_text()
    );
    let mut conn = c
        .tcp_producer(&DNS, STALE_SPORT, EVERY, secs(60))
        .expect("connection");
    assert!(rx7.wait_bytes_from(c.client_addr(STALE_SPORT), 20, secs(5)));
    assert!(
        watcher.wait_stderr(secs(10), from_events(1)).is_some(),
        "the connection's entry comes from its event: {}",
        watcher.stderr_text()
    );
    c.move_backend(&DNS, 7, 8).expect("move to .8");
    let raised = watcher
        .wait_for(secs(10), |v| is_stale_flow(v, "raised", STALE_SPORT))
        .unwrap_or_else(|| panic!("A raises the connection: {:?}", watcher.records()));
    assert_eq!(raised["verdict"], "stale");
    assert_eq!(raised["proto"], "tcp");
    assert_eq!(addr_of(&raised["stale_backend"]), c.pod_ip(7).to_string());
    assert_eq!(addr_of(&raised["current_backend"]), c.pod_ip(8).to_string());
    // Its fix deletes the entry, and the alert resolves.
    conn.stop();
    apply_fix(&raised);
    assert_resolved(&watcher);
    watcher.stop().expect("stop");
}

/// Scaled to zero: no rule DNATs the service any more; raised with no
/// current backend. Then .7 goes to another service's pod: the stream is
/// delivered there, silently, and the evidence names that service.
#[test]
fn scaled_to_zero_and_an_address_given_to_another_service() {
    let Pinned { mut c, mut stream } = pinned(Engine::NftKube, Family::V4);
    let watcher = watch(&c.node_a.name.clone());
    c.scale_to_zero(&DNS).expect("scale to zero");
    let raised = watcher
        .wait_for(secs(10), |v| is_stale_flow(v, "raised", STALE_SPORT))
        .unwrap_or_else(|| panic!("raised: {:?}", watcher.records()));
    assert_eq!(raised["verdict"], "stale");
    assert!(raised.get("current_backend").is_none(), "{raised}");
    assert!(
        raised["evidence"][0]
            .as_str()
            .unwrap()
            .starts_with("no current rule (nftables) DNATs 10.96.0.10:53/udp any more"),
        "{raised}"
    );
    watcher.stop().expect("stop");
    stream.stop();

    // Afresh: DNS moves to .8 and .7 goes to a pod of METRICS.
    let Pinned { mut c, mut stream } = pinned(Engine::IptablesNftKube, Family::V4);
    let watcher = watch(&c.node_a.name.clone());
    c.move_backend(&DNS, 7, 8).expect("move");
    c.reuse_address(7, &METRICS).expect("reuse .7");
    let wrong = c.udp_receiver(7, &METRICS).expect("the other pod");
    assert!(
        wrong.wait_from(c.client_addr(STALE_SPORT), 3, secs(10)),
        "delivered to the wrong pod"
    );
    let raised = watcher
        .wait_for(secs(10), |v| is_stale_flow(v, "raised", STALE_SPORT))
        .unwrap_or_else(|| panic!("raised: {:?}", watcher.records()));
    let evidence = raised["evidence"].to_string();
    assert!(
        evidence.contains("10.244.1.7:5353 is now a backend of 10.96.0.11:8080/udp only"),
        "{evidence}"
    );
    stream.stop();
    watcher.stop().expect("stop");
}

/// Node B receives the stream for an address nobody holds: a
/// dead_destination record with the interface and the previous hop (A).
#[test]
fn node_b_reports_the_dead_destination() {
    b_reports_the_dead_destination(Family::V4);
}

/// The same over IPv6, whose neighbour failures the kernel drops with no
/// specific reason: told by where it drops them.
#[test]
fn node_b_reports_an_ipv6_dead_destination() {
    b_reports_the_dead_destination(Family::V6);
}

fn b_reports_the_dead_destination(family: Family) {
    let Pinned { mut c, mut stream } = pinned(Engine::NftPlain, family);
    // B tracks connections, as every Kubernetes node does (kube-proxy's
    // rules turn conntrack on); the topology alone has no reason to.
    c.node_b
        .exec_input(
            &["nft", "-f", "-"],
            "table inet sw_ct {\n chain forwarded {\n type filter hook forward priority 0;\n ct state new counter\n }\n}\n",
        )
        .expect("conntrack on B");
    let b = c.node_b.name.clone();
    let watcher = watch(&b);
    c.move_backend(&DNS, 7, 8).expect("move");
    let dead = watcher
        .wait_for(secs(40), |v| {
            v["type"] == "dead_destination" && v["state"] == "raised"
        })
        .unwrap_or_else(|| panic!("{family:?}: B reports it: {:?}", watcher.records()));
    assert_eq!(dead["netns"]["name"], b.as_str());
    assert_eq!(addr_of(&dead["dead"]), c.pod_ip(7).to_string());
    assert_eq!(dead["dead"]["port"], DNS.target_port);
    assert_eq!(dead["orig"]["sport"], STALE_SPORT);
    assert_eq!(dead["interface"], "cbr0");
    assert_eq!(dead["previous_hop"], c.plan.a_link, "{dead}");
    assert!(dead["failures"]["packets"].as_u64().unwrap() >= 2, "{dead}");
    stream.stop();
    watcher.stop().expect("stop");
}

/// `check` on A finds the pinned entry; `check --fix` deletes it and no
/// other: the new flow's entry and another client flow stay.
#[test]
fn check_fix_on_node_a_deletes_exactly_the_stale_entry() {
    let Pinned { mut c, mut stream } = pinned(Engine::IptablesLegacyKube, Family::V4);
    c.move_backend(&DNS, 7, 8).expect("move");
    let _rx8 = c.udp_receiver(8, &DNS).expect("receiver .8");
    let mut fresh = c
        .producer(&DNS, NEW_SPORT, EVERY, 200, secs(20))
        .expect("new flow");
    assert!(
        poll(secs(5), || c.entry_from(NEW_SPORT).ok().flatten()).is_some(),
        "the new flow has its entry"
    );
    let check = |fix: bool| {
        let mut cmd = Command::new(binary());
        cmd.args(["check", "--format", "json", "--netns", &c.node_a.name]);
        if fix {
            cmd.arg("--fix");
        }
        let out = cmd.output().expect("check");
        let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        (out.status.code(), records)
    };
    let (code, found) = check(false);
    assert_eq!(code, Some(1), "{found:?}");
    let stale: Vec<&Value> = found
        .iter()
        .filter(|v| v["type"] == "stale_entry")
        .collect();
    assert_eq!(stale.len(), 1, "{found:?}");
    assert_eq!(stale[0]["orig"]["sport"], STALE_SPORT);
    assert_eq!(stale[0]["verdict"], "stale");
    assert_eq!(
        addr_of(&stale[0]["current_backend"]),
        c.pod_ip(8).to_string()
    );
    let before = c.conntrack().expect("A's table").len();

    fresh.stop();
    stream.stop();
    let (_, done) = check(true);
    assert!(
        done.iter()
            .any(|v| v["type"] == "entry_deleted" && v["orig"]["sport"] == STALE_SPORT),
        "{done:?}"
    );
    let after = c.conntrack().expect("A's table");
    assert!(
        !after
            .iter()
            .any(|e| e.orig.sport == STALE_SPORT && e.reply.src == c.pod_ip(7)),
        "the stale entry is gone: {after:?}"
    );
    assert!(
        after.iter().any(|e| e.orig.sport == NEW_SPORT),
        "the new flow's entry stays: {after:?}"
    );
    assert_eq!(after.len(), before - 1, "only one entry went: {after:?}");
}

/// Quiet: a stream whose service is load-balanced over .7 and .8 and keeps
/// both; and one pinned to .7 under a rule that DNATs to the range .7-.8.
#[test]
fn load_balancing_and_ranges_stay_quiet() {
    for dnat in [Dnat::Endpoints(vec![7, 8]), Dnat::Range(7, 8)] {
        let Pinned { mut c, mut stream } = pinned(Engine::NftPlain, Family::V4);
        let watcher = watch(&c.node_a.name.clone());
        c.start_pod(8).expect("pod .8");
        c.set_service(&DNS, dnat.clone()).expect("rules");
        std::thread::sleep(secs(12));
        assert_eq!(
            c.pinned_backend(STALE_SPORT).unwrap(),
            Some(c.pod_ip(7)),
            "still on .7"
        );
        let records = watcher.records();
        assert!(
            !records.iter().any(|v| v["type"] == "stale_flow"),
            "{dnat:?}: quiet: {records:?}"
        );
        // The positive control: .7 left out of the rules, the same
        // stream is raised.
        c.set_service(&DNS, Dnat::Endpoints(vec![8]))
            .expect("rules");
        assert!(
            watcher
                .wait_for(secs(10), |v| is_stale_flow(v, "raised", STALE_SPORT))
                .is_some(),
            "{dnat:?}: raised once .7 is out: {:?}",
            watcher.records()
        );
        stream.stop();
        watcher.stop().expect("stop");
    }
}

/// Quiet: an orchestrator that deletes the old entries right after
/// rewriting its rules (kube-proxy does for UDP) leaves nothing stale, even
/// if an audit looked between the two steps. The positive control: the
/// next move, with the entry left alone, is raised.
#[test]
fn a_redeploy_that_deletes_old_entries_at_once_stays_quiet() {
    let Pinned { mut c, mut stream } = pinned(Engine::NftKube, Family::V4);
    let watcher = watch(&c.node_a.name.clone());
    c.move_backend(&DNS, 7, 8).expect("move to .8");
    let old = c.pod_ip(7).to_string();
    c.node_a
        .exec(&["conntrack", "-D", "-p", "udp", "-r", &old])
        .expect("delete the old entries");
    let rx8 = c.udp_receiver(8, &DNS).expect("receiver .8");
    assert!(
        rx8.wait_from(c.client_addr(STALE_SPORT), 3, secs(5)),
        "the stream's new entry reaches .8"
    );
    std::thread::sleep(secs(12));
    let records = watcher.records();
    assert!(
        !records.iter().any(|v| v["type"] == "stale_flow"),
        "quiet: {records:?}"
    );
    // The positive control: moved again, the entry left alone.
    c.move_backend(&DNS, 8, 9).expect("move to .9");
    let raised = watcher
        .wait_for(secs(10), |v| is_stale_flow(v, "raised", STALE_SPORT))
        .unwrap_or_else(|| panic!("raised: {:?}", watcher.records()));
    assert_eq!(addr_of(&raised["stale_backend"]), c.pod_ip(8).to_string());
    stream.stop();
    watcher.stop().expect("stop");
}
