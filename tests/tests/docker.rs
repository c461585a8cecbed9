//! End to end on the real Docker engine, driven with docker-compose: a
//! service publishing 8888/udp is redeployed from the default bridge onto a
//! network of its own while a producer streams to it from one source port.
//! Datagrams that arrive between the old container's stop and the new
//! mapping make an entry without NAT, and the stream bypasses the new DNAT
//! for as long as it goes on: through docker-proxy (the application sees
//! the gateway as the source) or, without the proxy, refused.
//!
//! stalewatch watches the root namespace (no --netns), where Docker's DNAT
//! lives; its conntrack table is the machine's, so every assertion filters
//! by the test's own tuple. Without an engine each test says it was skipped
//! and why.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use serde_json::Value;
use stalewatch_tests::{
    docker::{
        self, Container, Deployment, HOST, PORT, PRODUCER, check, entry, first_host, free_subnets,
        is_flow, reply_src, stop_proxies,
    },
    sh,
    traffic::Producer,
    watcher::Watcher,
};

const EVERY: Duration = Duration::from_millis(100);
const SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `true` (after saying so) when no engine answers and none is expected:
/// the one permitted skip (see [`docker::skip`]).
fn skipped(test: &str) -> bool {
    docker::skip(test)
}

/// A stream of the producer's, bounded in count and time.
fn stream(d: &Deployment, sport: u16, to: std::net::SocketAddr) -> anyhow::Result<Producer> {
    Producer::start(
        &d.link.ns,
        Deployment::producer(sport),
        to,
        EVERY,
        1200,
        secs(120),
    )
}

/// The story up to the redeploy: the service on the default bridge gets the
/// stream, then is redeployed onto its own network; a new flow reaches the
/// new container. Returns the old and the new container.
fn redeploy_under_a_stream(
    d: &mut Deployment,
) -> anyhow::Result<(Container, Container, Producer, Producer)> {
    d.project.up("compose-bridge.yml")?;
    let old = d.project.container("web")?;
    let producer = stream(d, SPORT, Deployment::service())?;
    assert!(
        d.project
            .wait_from(&old, Deployment::producer(SPORT), 5, secs(10)),
        "the stream reaches the container on the default bridge: {:?}",
        d.project.sources(&old)
    );
    let before = entry(SPORT, Deployment::service()).expect("the stream's entry");
    assert_eq!(reply_src(&before), Some(old.ip), "DNATed: {before:?}");

    let subnet = d.up_on_network()?;
    let new = d.project.container("web")?;
    assert_ne!(new.ip, old.ip);
    assert_eq!(new.gateway, first_host(&subnet));
    let fresh = stream(d, NEW_SPORT, Deployment::service())?;
    assert!(
        d.project
            .wait_from(&new, Deployment::producer(NEW_SPORT), 5, secs(10)),
        "a new flow reaches the new container with its own source: {:?}",
        d.project.sources(&new)
    );
    Ok((old, new, producer, fresh))
}

/// What the watcher said of the test's own flows, for failure messages (the
/// machine may be busy with others).
fn ours_of(watcher: &Watcher) -> String {
    let records = watcher.records();
    let ours: Vec<&Value> = records
        .iter()
        .filter(|v| v["orig"]["src"] == PRODUCER.to_string())
        .collect();
    format!(
        "{ours:?} (and {} records of other flows)",
        records.len() - ours.len()
    )
}

/// The assertions shared by both cases of the bypass alert.
fn assert_bypass(alert: &Value, new: &Container, project: &str) {
    assert_eq!(alert["type"], "stale_flow", "{alert}");
    assert_eq!(alert["verdict"], "bypass", "{alert}");
    assert!(is_flow(alert, SPORT, Deployment::service()), "{alert}");
    assert_eq!(
        alert["stale_backend"],
        serde_json::json!({"addr": HOST.to_string(), "port": PORT}),
        "delivered to the host itself: {alert}"
    );
    let current = &alert["current_backend"];
    assert_eq!(current["addr"], new.ip.to_string(), "{alert}");
    assert_eq!(current["port"], PORT, "{alert}");
    assert_eq!(current["container"]["name"], new.name.as_str(), "{alert}");
    assert_eq!(current["container"]["id"], new.id.as_str(), "{alert}");
    assert_eq!(current["container"]["compose_project"], project, "{alert}");
    assert_eq!(current["container"]["compose_service"], "web", "{alert}");
    let evidence = alert["evidence"].to_string();
    assert!(
        (evidence.contains("newer flows to 198.51.100.1:8888 are DNATed to")
            || evidence.contains("while a current rule DNATs flows to 198.51.100.1:8888 to"))
            && evidence.contains(&format!(
                "Docker publishes udp/8888 on this host for container {}",
                new.name
            )),
        "both sources of evidence: {alert}"
    );
    assert_eq!(
        alert["fix"],
        format!(
            "conntrack -D -f ipv4 -p udp -s {PRODUCER} -d {HOST} -r {HOST} -q {PRODUCER} \
             --sport {SPORT} --dport {PORT} --reply-port-src {PORT} --reply-port-dst {SPORT}"
        ),
        "{alert}"
    );
}

/// The story on the engine: the proxied bypass found by the audit, the
/// lossy one (the test stops its own container's proxy) from the refused
/// datagrams, `check` and `check --fix`, the resolved alert, and the real
/// source address at the application after the fix.
#[test]
fn compose_redeploy_bypass_is_raised_proxied_and_lossy_then_fixed() -> anyhow::Result<()> {
    if skipped("compose_redeploy_bypass_is_raised_proxied_and_lossy_then_fixed") {
        return Ok(());
    }
    // The engine's shape: the stream's entry is made in the gap between the
    // old container's rule going and the new one's coming, without NAT. It
    // is a race in the engine (one run in seven here found the stream's
    // entry DNATed to the new container instead): deploy afresh, three
    // times at most, until the engine leaves that shape.
    let mut attempt = 0;
    let (d, new, mut producer, mut fresh, gap) = loop {
        attempt += 1;
        let mut d = Deployment::new()?;
        let (_old, new, producer, fresh) = redeploy_under_a_stream(&mut d)?;
        let gap = entry(SPORT, Deployment::service()).expect("the stream's entry");
        if reply_src(&gap) == Some(IpAddr::V4(HOST)) || attempt == 3 {
            break (d, new, producer, fresh, gap);
        }
        eprintln!("attempt {attempt}: no entry without NAT this time ({gap:?}); deploying afresh");
    };
    let project = d.project.name.clone();
    assert_eq!(
        reply_src(&gap),
        Some(IpAddr::V4(HOST)),
        "no NAT, delivered to the host: {gap:?}"
    );
    // Proxied: delivered, but the application sees the gateway.
    assert!(
        d.project.wait_from_ip(&new, new.gateway, 5, secs(10)),
        "docker-proxy delivers the stream from the gateway: {:?}",
        d.project.sources(&new)
    );
    assert_eq!(
        d.project
            .sources(&new)
            .get(&Deployment::producer(SPORT))
            .copied(),
        None,
        "the application never sees the producer's own address"
    );

    let watcher = Watcher::start(&["--audit-every", "2s"])?;
    let ours = |state: &'static str| {
        move |v: &Value| {
            v["type"] == "stale_flow"
                && v["state"] == state
                && is_flow(v, SPORT, Deployment::service())
        }
    };
    let raised = watcher
        .wait_for(secs(30), ours("raised"))
        .unwrap_or_else(|| panic!("no proxied bypass raised: {}", ours_of(&watcher)));
    eprintln!("proxied bypass alert: {raised}");
    assert_bypass(&raised, &new, &project);
    assert!(
        raised["failures"]["icmp"].is_null(),
        "no packet failed: {raised}"
    );
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "stalewatch exited {status}");

    // Lossy: without the proxy the host refuses every datagram.
    assert!(stop_proxies(new.ip, PORT)? >= 1, "the container's proxy");
    // No audit: the kernel's refused datagrams alone must raise it.
    let watcher = Watcher::start(&["--audit-every", "0s"])?;
    let raised = watcher
        .wait_for(secs(30), ours("raised"))
        .unwrap_or_else(|| panic!("no lossy bypass raised: {}", ours_of(&watcher)));
    eprintln!("lossy bypass alert: {raised}");
    assert_bypass(&raised, &new, &project);
    assert_eq!(
        raised["failures"]["icmp"]["code"], 3,
        "port unreachable: {raised}"
    );
    let delivered = d.project.from_ip(&new, new.gateway);
    thread::sleep(secs(1));
    assert_eq!(
        d.project.from_ip(&new, new.gateway),
        delivered,
        "nothing is delivered any more"
    );

    // check: the flow, then (only where ours is the machine's one stale
    // entry, to change nothing else) check --fix.
    let (code, found) = check(&[])?;
    let mine: Vec<&Value> = found
        .iter()
        .filter(|v| is_flow(v, SPORT, Deployment::service()))
        .collect();
    assert_eq!(code, 1, "{found:?}");
    assert_eq!(mine.len(), 1, "{found:?}");
    assert_eq!(mine[0]["type"], "stale_entry");
    assert_eq!(mine[0]["verdict"], "bypass");
    assert_eq!(mine[0]["current_backend"]["addr"], new.ip.to_string());
    assert_eq!(
        mine[0]["current_backend"]["container"]["name"],
        new.name.as_str()
    );
    if found.len() == 1 {
        let (code, fixed) = check(&["--fix"])?;
        assert_eq!(code, 0, "{fixed:?}");
        assert!(
            fixed
                .iter()
                .any(|v| v["type"] == "entry_deleted" && is_flow(v, SPORT, Deployment::service())),
            "{fixed:?}"
        );
        let (code, none) = check(&[])?;
        assert_eq!((code, none.len()), (0, 0), "{none:?}");
    } else {
        eprintln!("other stale entries on this machine: deleting only ours, with its fix command");
        sh(mine[0]["fix"].as_str().expect("fix"))?;
    }
    let (_, after) = check(&[])?;
    assert!(
        !after
            .iter()
            .any(|v| is_flow(v, SPORT, Deployment::service())),
        "{after:?}"
    );
    // Only that entry went: the new flow's DNATed entry is still there.
    let sibling = entry(NEW_SPORT, Deployment::service()).expect("the new flow's entry");
    assert_eq!(reply_src(&sibling), Some(new.ip), "{sibling:?}");

    let resolved = watcher
        .wait_for(secs(10), ours("resolved"))
        .unwrap_or_else(|| panic!("not resolved: {}", ours_of(&watcher)));
    assert_eq!(resolved["resolution"], "entry_gone", "{resolved}");
    assert!(
        d.project
            .wait_from(&new, Deployment::producer(SPORT), 5, secs(10)),
        "after the fix the application sees the producer's own address: {:?}",
        d.project.sources(&new)
    );
    let healed = entry(SPORT, Deployment::service()).expect("the stream's entry");
    assert_eq!(reply_src(&healed), Some(new.ip), "DNATed again: {healed:?}");
    assert!(
        !watcher
            .records()
            .iter()
            .any(|v| is_flow(v, NEW_SPORT, Deployment::service())),
        "the new flow is never alerted"
    );
    producer.stop();
    fresh.stop();
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "stalewatch exited {status}");
    Ok(())
}

/// A container on another Docker network streams to its own gateway's
/// published port: Docker's rules return it to the proxy, without NAT, by
/// design, while the producer's flow to the same address is DNATed. No
/// alert, no finding.
#[test]
fn container_to_its_gateways_published_port_is_quiet() -> anyhow::Result<()> {
    if skipped("container_to_its_gateways_published_port_is_quiet") {
        return Ok(());
    }
    const CLIENT_SPORT: u16 = 40100;
    let mut d = Deployment::new()?;
    let subnets = free_subnets(2)?;
    let gateway = first_host(&subnets[1]);
    d.project.set("SWD_SUBNET", &subnets[0]);
    d.project.set("SWD_CLIENT_SUBNET", &subnets[1]);
    d.project.set("SWD_CLIENT_GATEWAY", &gateway.to_string());
    d.project.set("SWD_CLIENT_SPORT", &CLIENT_SPORT.to_string());
    let watcher = Watcher::start(&["--audit-every", "1s"])?;
    d.project.up("compose-client.yml")?;
    let web = d.project.container("web")?;
    let client = d.project.container("client")?;
    // The producer's flow to the same destination, DNATed: the sibling
    // that would make the client's flow look like a bypass.
    d.link.route(&subnets[1])?;
    let to = std::net::SocketAddr::new(gateway, PORT);
    let mut producer = stream(&d, SPORT, to)?;
    assert!(
        d.project
            .wait_from(&web, Deployment::producer(SPORT), 5, secs(10)),
        "the producer's flow to the client network's gateway is DNATed to the service: {:?}",
        d.project.sources(&web)
    );
    assert!(
        d.project.wait_from_ip(&web, web.gateway, 5, secs(10)),
        "the client's datagrams come through docker-proxy: {:?}",
        d.project.sources(&web)
    );
    let sibling = entry(SPORT, to).expect("the producer's entry");
    assert_eq!(reply_src(&sibling), Some(web.ip), "{sibling:?}");
    let client_entries: Vec<_> = docker::entries_from(SocketAddr::new(client.ip, CLIENT_SPORT))
        .into_iter()
        .filter(|e| e.orig.dst == gateway)
        .collect();
    assert_eq!(client_entries.len(), 1, "{client_entries:?}");
    assert_eq!(
        reply_src(&client_entries[0]),
        Some(gateway),
        "the client's entry has no NAT: {client_entries:?}"
    );

    // Three audits and then some.
    thread::sleep(secs(5));
    let from_client = |v: &Value| v["orig"]["src"] == client.ip.to_string();
    let alerted: Vec<Value> = watcher.records().into_iter().filter(from_client).collect();
    assert!(alerted.is_empty(), "{alerted:?}");
    // check runs the same audit at once, whatever backlog a busy machine
    // leaves the watcher with.
    let (_, found) = check(&[])?;
    let found: Vec<&Value> = found.iter().filter(|v| from_client(v)).collect();
    assert!(found.is_empty(), "{found:?}");
    assert!(
        !watcher.records().iter().any(|v| is_flow(v, SPORT, to)),
        "the DNATed flow is healthy"
    );
    producer.stop();
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "stalewatch exited {status}");
    Ok(())
}

/// A redeploy while the stream pauses: Docker deletes the old entry when it
/// stops the old container, the stream resumes from the same source port
/// once the new mapping exists and is DNATed to the new container. Nothing
/// is stale.
#[test]
fn redeploy_with_the_stream_paused_is_quiet() -> anyhow::Result<()> {
    if skipped("redeploy_with_the_stream_paused_is_quiet") {
        return Ok(());
    }
    let mut d = Deployment::new()?;
    d.project.up("compose-bridge.yml")?;
    let old = d.project.container("web")?;
    let watcher = Watcher::start(&["--audit-every", "1s"])?;
    let mut producer = stream(&d, SPORT, Deployment::service())?;
    assert!(
        d.project
            .wait_from(&old, Deployment::producer(SPORT), 5, secs(10))
    );
    producer.stop();
    d.up_on_network()?;
    let new = d.project.container("web")?;
    // This engine deletes the entries of a container's address on stop.
    assert_eq!(entry(SPORT, Deployment::service()), None);

    let mut producer = stream(&d, SPORT, Deployment::service())?;
    assert!(
        d.project
            .wait_from(&new, Deployment::producer(SPORT), 5, secs(10)),
        "the resumed stream reaches the new container: {:?}",
        d.project.sources(&new)
    );
    let resumed = entry(SPORT, Deployment::service()).expect("the stream's entry");
    assert_eq!(reply_src(&resumed), Some(new.ip), "{resumed:?}");
    thread::sleep(secs(4));
    let ours = |v: &Value| is_flow(v, SPORT, Deployment::service());
    assert!(!watcher.records().iter().any(ours), "{}", ours_of(&watcher));
    let (_, found) = check(&[])?;
    let found: Vec<&Value> = found.iter().filter(|v| ours(v)).collect();
    assert!(found.is_empty(), "{found:?}");
    producer.stop();
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "stalewatch exited {status}");
    Ok(())
}
