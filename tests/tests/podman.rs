//! End to end on the real Podman engine (Debian's podman 4.3, netavark
//! 1.4), which never deletes a conntrack entry when it sets up or tears
//! down a port forward (containers/netavark #1045):
//!
//! - pinned: the container publishing 8888/udp is replaced by one with a
//!   new address (same network with `--ip`, or a new network with
//!   podman-compose) while a producer streams from one source port; the
//!   stream's entry keeps its DNAT to the old address, refused by the
//!   bridge, while a new flow reaches the new container;
//! - the silent bypass: the stream's entry is gone while nothing publishes
//!   the port, so the next datagram makes an entry without NAT, which
//!   delivers the stream to conmon's socket on the host, never read;
//! - the quiet cases.
//!
//! stalewatch watches the root namespace, where netavark's DNAT lives; its
//! conntrack table is the machine's, so every assertion filters by the
//! test's own tuples. Without podman each test says it was skipped and why.

use std::{net::IpAddr, time::Duration};

use serde_json::Value;
use stalewatch_tests::{
    docker::{Deployment, check, entries_from, entry, first_host, free_subnets, is_flow},
    podman::{self, World},
    traffic::Producer,
    watcher::Watcher,
};

const EVERY: Duration = Duration::from_millis(100);
const SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;
/// How long a pinned flow may take to be raised: its packets fail once the
/// host's neighbour entry for the old address fails, which can take the
/// kernel's reachable time (15-45 s) where the old container was confirmed
/// reachable just before it went, then a probe (about 8 s).
const PINNED_WITHIN: Duration = Duration::from_secs(75);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn skipped(test: &str) -> bool {
    podman::skip(test)
}

/// The address `n` hosts into `subnet` (a /24).
fn host_in(subnet: &str, n: u8) -> IpAddr {
    let IpAddr::V4(first) = first_host(subnet) else {
        unreachable!("IPv4 subnets")
    };
    let [a, b, c, _] = first.octets();
    IpAddr::from([a, b, c, n])
}

/// A network of the test's (with its keeper) and the first container
/// publishing 8888/udp on it, at the subnet's .10: the network, its
/// subnet and the container.
fn deploy(w: &mut World) -> anyhow::Result<(String, String, podman::Container)> {
    let subnet = free_subnets(1)?.remove(0);
    let net = w.network("net", &subnet)?;
    let web = w.service(
        &format!("{}-web-a", w.name),
        &net,
        Some(host_in(&subnet, 10)),
    )?;
    Ok((net, subnet, web))
}

/// Deletes the root namespace's entries of the producer's flows from
/// `sport` (as an operator's `conntrack -D` would, or their timeout).
fn forget(sport: u16) {
    // Exit status 1 when there was none.
    let _ = stalewatch_tests::run(&[
        "conntrack",
        "-D",
        "-p",
        "udp",
        "--orig-src",
        &stalewatch_tests::docker::PRODUCER.to_string(),
        "--orig-port-src",
        &sport.to_string(),
    ]);
}

/// Entries as a test compares them before and after a fix: id and reply.
fn ids(v: &[stalewatch::domain::Entry]) -> Vec<(Option<u32>, stalewatch::domain::Tuple)> {
    v.iter().map(|e| (e.id, e.reply)).collect()
}

/// A bounded stream of the producer's from `sport` to the service.
fn stream(w: &World, sport: u16, max: u64, limit: Duration) -> anyhow::Result<Producer> {
    Producer::start(
        &w.link().ns,
        Deployment::producer(sport),
        Deployment::service(),
        EVERY,
        max,
        limit,
    )
}

/// Matches a record of `kind` in `state` (any state when empty) about the
/// producer's flow from `sport`.
fn ours(kind: &'static str, state: &'static str, sport: u16) -> impl Fn(&Value) -> bool {
    move |v: &Value| {
        v["type"] == kind
            && (state.is_empty() || v["state"] == state)
            && is_flow(v, sport, Deployment::service())
    }
}

/// The container object of a record's backend, checked against `c`.
fn assert_names(backend: &Value, c: &podman::Container, gone: bool, record: &Value) {
    assert_eq!(backend["addr"], c.ip.to_string(), "{record}");
    let named = &backend["container"];
    assert_eq!(named["name"], c.name.as_str(), "{record}");
    assert_eq!(named["id"], c.id.as_str(), "{record}");
    assert_eq!(named["engine"], "podman", "{record}");
    assert_eq!(named["gone"].as_bool().unwrap_or(false), gone, "{record}");
}

/// The old address is on a bridge of this host: its packets fail there
/// (ICMP host unreachable, the neighbour failed), and the kernel path
/// raises the flow with that evidence, naming where new flows go.
fn assert_failing_at_the_bridge(raised: &Value, new: &podman::Container) {
    assert_eq!(
        raised["failures"]["icmp"]["code"], 1,
        "host unreachable: {raised}"
    );
    assert_eq!(
        raised["failures"]["drop"]["reason"], "NEIGH_FAILED",
        "{raised}"
    );
    assert_eq!(
        raised["current_backend"]["addr"],
        new.ip.to_string(),
        "{raised}"
    );
}

/// `check`, then `check --fix` where the test's flow is the machine's only
/// fixable finding (the table is shared: nothing else may be changed): the
/// entry of `sport` is deleted, and the entries of `keep` are the very
/// same ones afterwards.
fn check_and_fix(verdict: &str, sport: u16, keep: &[u16]) -> anyhow::Result<()> {
    let (code, found) = check(&[])?;
    let mine: Vec<&Value> = found
        .iter()
        .filter(|v| is_flow(v, sport, Deployment::service()))
        .collect();
    assert_eq!(code, 1, "{found:?}");
    assert_eq!(mine.len(), 1, "{found:?}");
    assert_eq!(mine[0]["type"], "stale_entry");
    assert_eq!(mine[0]["verdict"], verdict, "{}", mine[0]);
    for other in keep {
        assert!(
            !found
                .iter()
                .any(|v| is_flow(v, *other, Deployment::service())),
            "the healthy flow from {other} is not listed: {found:?}"
        );
    }
    let fixable = found
        .iter()
        .filter(|v| v["verdict"] == "stale" || v["verdict"] == "bypass")
        .count();
    if fixable != 1 {
        eprintln!("check --fix not run: {fixable} fixable findings on this machine, not only ours");
        return Ok(());
    }
    let before: Vec<_> = keep
        .iter()
        .flat_map(|p| entries_from(Deployment::producer(*p)))
        .collect();
    let (code, fixed) = check(&["--fix"])?;
    assert_eq!(code, 0, "{fixed:?}");
    let deleted: Vec<&Value> = fixed
        .iter()
        .filter(|v| v["type"] == "entry_deleted")
        .collect();
    assert_eq!(deleted.len(), 1, "{fixed:?}");
    assert!(
        is_flow(deleted[0], sport, Deployment::service()),
        "{fixed:?}"
    );
    let after: Vec<_> = keep
        .iter()
        .flat_map(|p| entries_from(Deployment::producer(*p)))
        .collect();
    assert_eq!(
        ids(&before),
        ids(&after),
        "the other flows' entries untouched"
    );
    Ok(())
}

/// Replaced on the same network with a new address (`--ip`): the stream
/// stays pinned to the old one; watch raises it naming both containers,
/// check finds it, check --fix deletes exactly it, and the stream reaches
/// the new container.
#[test]
fn pinned_on_the_same_network_with_a_new_address() -> anyhow::Result<()> {
    if skipped("pinned_on_the_same_network_with_a_new_address") {
        return Ok(());
    }
    let mut w = World::new(true)?;
    let (net, subnet, old) = deploy(&mut w)?;
    let watcher = Watcher::start(&["--audit-every", "2s"])?;
    let mut producer = stream(&w, SPORT, 1200, secs(120))?;
    assert!(
        w.wait_from(&old, Deployment::producer(SPORT), 5, secs(10)),
        "the stream reaches {}",
        old.name
    );

    w.remove(&old.name)?;
    let new = w.service(
        &format!("{}-web-b", w.name),
        &net,
        Some(host_in(&subnet, 11)),
    )?;
    let mut fresh = stream(&w, NEW_SPORT, 600, secs(60))?;
    assert!(
        w.wait_from(&new, Deployment::producer(NEW_SPORT), 3, secs(10)),
        "a new flow reaches {}",
        new.name
    );
    let pinned = entry(SPORT, Deployment::service()).expect("the stream's entry");
    assert_eq!(
        pinned.reply.src, old.ip,
        "netavark left it pinned: {pinned:?}"
    );

    let raised = watcher
        .wait_for(PINNED_WITHIN, ours("stale_flow", "raised", SPORT))
        .unwrap_or_else(|| panic!("no stale flow raised: {:?}", watcher.lines()));
    eprintln!("pinned alert: {raised}");
    assert_eq!(raised["verdict"], "stale", "{raised}");
    assert_names(&raised["stale_backend"], &old, true, &raised);
    assert_names(&raised["current_backend"], &new, false, &raised);
    assert_failing_at_the_bridge(&raised, &new);
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "stalewatch exited {status}");

    check_and_fix("stale", SPORT, &[NEW_SPORT])?;
    if entry(SPORT, Deployment::service()).is_none_or(|e| e.reply.src != old.ip) {
        assert!(
            w.wait_from(&new, Deployment::producer(SPORT), 5, secs(10)),
            "after the fix the stream reaches {}",
            new.name
        );
    }
    producer.stop();
    fresh.stop();
    Ok(())
}

/// A podman-compose project redeployed onto a new network: the old
/// network keeps its bridge (a keeper container), the stream stays pinned
/// to the old container's address; the alert names both containers with
/// the compose project and service.
#[test]
fn pinned_on_a_new_network_by_podman_compose() -> anyhow::Result<()> {
    if skipped("pinned_on_a_new_network_by_podman_compose") {
        return Ok(());
    }
    let mut w = World::new(true)?;
    let subnets = free_subnets(2)?;
    let project = w.name.clone();
    let old = w.compose_up(&project, "a", &subnets[0])?;
    let watcher = Watcher::start(&["--audit-every", "2s"])?;
    let mut producer = stream(&w, SPORT, 1200, secs(120))?;
    assert!(
        w.wait_from(&old, Deployment::producer(SPORT), 5, secs(10)),
        "the stream reaches {}",
        old.name
    );

    let new = w.compose_up(&project, "b", &subnets[1])?;
    assert_ne!(old.id, new.id);
    let mut fresh = stream(&w, NEW_SPORT, 600, secs(60))?;
    assert!(
        w.wait_from(&new, Deployment::producer(NEW_SPORT), 3, secs(10)),
        "a new flow reaches {} on the new network",
        new.name
    );
    let raised = watcher
        .wait_for(PINNED_WITHIN, ours("stale_flow", "raised", SPORT))
        .unwrap_or_else(|| {
            panic!(
                "no stale flow raised: {:?}; the stream's entry: {:?}; {}",
                watcher.lines(),
                entry(SPORT, Deployment::service()),
                podman::podman(&["ps", "-a", "--format", "{{.Names}} {{.Networks}}"])
                    .unwrap_or_default()
            )
        });
    eprintln!("compose alert: {raised}");
    assert_eq!(raised["verdict"], "stale", "{raised}");
    assert_names(&raised["stale_backend"], &old, true, &raised);
    assert_names(&raised["current_backend"], &new, false, &raised);
    assert_failing_at_the_bridge(&raised, &new);
    for backend in ["stale_backend", "current_backend"] {
        let c = &raised[backend]["container"];
        assert_eq!(c["compose_project"], project.as_str(), "{raised}");
        assert_eq!(c["compose_service"], "web", "{raised}");
    }
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "stalewatch exited {status}");

    // watch --fix: the stream's entry deleted, the new flow's untouched.
    let sibling = entries_from(Deployment::producer(NEW_SPORT));
    let fixer = Watcher::start(&["--audit-every", "2s", "--fix"])?;
    let deleted = fixer
        .wait_for(secs(60), ours("entry_deleted", "", SPORT))
        .unwrap_or_else(|| panic!("watch --fix deleted nothing: {:?}", fixer.lines()));
    eprintln!("watch --fix: {deleted}");
    let ours_deleted: Vec<Value> = fixer
        .records()
        .into_iter()
        .filter(|v| {
            v["type"] == "entry_deleted"
                && v["orig"]["src"] == stalewatch_tests::docker::PRODUCER.to_string()
        })
        .collect();
    assert_eq!(ours_deleted.len(), 1, "only the stream's: {ours_deleted:?}");
    let (status, _) = fixer.stop()?;
    assert!(status.success(), "stalewatch exited {status}");
    assert_eq!(
        ids(&sibling),
        ids(&entries_from(Deployment::producer(NEW_SPORT))),
        "the new flow's entry untouched"
    );
    assert!(
        w.wait_from(&new, Deployment::producer(SPORT), 5, secs(10)),
        "after the fix the stream reaches {} on the new network",
        new.name
    );
    producer.stop();
    fresh.stop();
    Ok(())
}

/// The entry is gone while nothing publishes the port; the next datagram
/// makes one without NAT, and once the new container publishes the port
/// the stream goes, unread, to conmon's socket: no ICMP, no drop. The
/// watch's audit raises it as a bypass naming the container that publishes
/// the port and conmon as the socket's holder; check --fix deletes exactly
/// it and the stream reaches the container.
#[test]
fn silent_bypass_into_conmons_socket() -> anyhow::Result<()> {
    if skipped("silent_bypass_into_conmons_socket") {
        return Ok(());
    }
    let mut w = World::new(true)?;
    let (net, subnet, old) = deploy(&mut w)?;
    let mut producer = stream(&w, SPORT, 1200, secs(120))?;
    assert!(w.wait_from(&old, Deployment::producer(SPORT), 5, secs(10)));

    // The redeploy's gap: no container publishes 8888, and the stream's
    // entry is gone (an operator's conntrack -D, or its timeout).
    w.remove(&old.name)?;
    forget(SPORT);
    let gap = stalewatch_tests::poll(secs(5), || {
        entry(SPORT, Deployment::service()).filter(|e| e.reply.src == e.orig.dst)
    })
    .expect("an entry without NAT made in the gap");
    let new = w.service(
        &format!("{}-web-b", w.name),
        &net,
        Some(host_in(&subnet, 11)),
    )?;
    std::thread::sleep(secs(2));
    assert_eq!(
        entry(SPORT, Deployment::service()).map(|e| (e.id, e.reply)),
        Some((gap.id, gap.reply)),
        "the stream keeps its entry without NAT"
    );
    assert_eq!(
        w.sources(&new).get(&Deployment::producer(SPORT)),
        None,
        "the container never gets the stream"
    );

    // Started after the gap: what it finds, its audit finds (no packet
    // of the stream fails any more).
    let watcher = Watcher::start(&["--audit-every", "2s"])?;
    let raised = watcher
        .wait_for(secs(30), ours("stale_flow", "raised", SPORT))
        .unwrap_or_else(|| panic!("no bypass raised: {:?}", watcher.lines()));
    eprintln!("silent bypass alert: {raised}");
    assert_eq!(raised["verdict"], "bypass", "{raised}");
    assert_eq!(raised["stale_backend"]["addr"], "198.51.100.1", "{raised}");
    assert_names(&raised["current_backend"], &new, false, &raised);
    assert_eq!(raised["failures"]["packets"], 0, "silent: {raised}");
    let evidence = raised["evidence"].to_string();
    assert!(
        evidence.contains(&format!(
            "Podman publishes udp/8888 on this host for container {}",
            new.name
        )) && evidence.contains("belongs to conmon (pid ")
            && evidence.contains("podman's port holder"),
        "the engine's port and conmon's socket: {raised}"
    );
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "stalewatch exited {status}");

    check_and_fix("bypass", SPORT, &[])?;
    if entry(SPORT, Deployment::service()).is_none_or(|e| e.reply.src != e.orig.dst) {
        assert!(
            w.wait_from(&new, Deployment::producer(SPORT), 5, secs(10)),
            "after the fix the stream reaches {} with the producer's own address",
            new.name
        );
    }
    producer.stop();
    Ok(())
}

/// Nothing to say: a rolling replacement whose stream's entry is gone
/// before the stream resumes (DNATed to the new container), a port nothing
/// publishes (refused by the host, no rule would DNAT it), and a container
/// on the same podman network sending to the published port (netavark
/// DNATs it like anyone's).
#[test]
fn quiet_cases_stay_quiet() -> anyhow::Result<()> {
    if skipped("quiet_cases_stay_quiet") {
        return Ok(());
    }
    const ROLLING: u16 = 40010;
    const UNPUBLISHED: u16 = 40011;
    const NEIGHBOUR: u16 = 41000;
    let mut w = World::new(true)?;
    let (net, subnet, old) = deploy(&mut w)?;
    let watcher = Watcher::start(&["--audit-every", "2s"])?;

    // Rolling: the stream pauses, its entry goes, the container is
    // replaced, the stream resumes from the same port.
    let mut first = stream(&w, ROLLING, 30, secs(5))?;
    assert!(w.wait_from(&old, Deployment::producer(ROLLING), 5, secs(10)));
    first.stop();
    w.remove(&old.name)?;
    forget(ROLLING);
    let new = w.service(
        &format!("{}-web-b", w.name),
        &net,
        Some(host_in(&subnet, 11)),
    )?;
    let mut resumed = stream(&w, ROLLING, 150, secs(20))?;
    assert!(
        w.wait_from(&new, Deployment::producer(ROLLING), 5, secs(10)),
        "the resumed stream reaches {}",
        new.name
    );

    // Unpublished: 8889, refused by the host.
    let mut unpublished = Producer::start(
        &w.link().ns,
        Deployment::producer(UNPUBLISHED),
        std::net::SocketAddr::from((stalewatch_tests::docker::HOST, 8889)),
        EVERY,
        150,
        secs(20),
    )?;
    // A neighbour on the network sends to the host's published port.
    let neighbour = format!("{}-client", w.name);
    w.run_container(
        &neighbour,
        &net,
        None,
        false,
        &[
            "/bin/udp",
            "send",
            "198.51.100.1",
            "8888",
            &NEIGHBOUR.to_string(),
            "150",
            "100",
        ],
    )?;
    let client = podman::container(&neighbour)?;
    assert!(
        stalewatch_tests::poll(secs(10), || {
            w.sources(&new)
                .keys()
                .any(|a| a.port() == NEIGHBOUR)
                .then_some(())
        })
        .is_some(),
        "the neighbour's datagrams reach {} through netavark's DNAT",
        new.name
    );

    // Three audits and more than --min-failures refused datagrams later.
    std::thread::sleep(secs(8));
    let said: Vec<Value> = watcher
        .records()
        .into_iter()
        .filter(|v| {
            let sport = v["orig"]["sport"].as_u64().unwrap_or(0) as u16;
            (is_flow(v, ROLLING, Deployment::service()) || sport == UNPUBLISHED)
                || (v["orig"]["src"] == client.ip.to_string())
        })
        .collect();
    assert!(said.is_empty(), "nothing said of the quiet flows: {said:?}");
    let (_, found) = check(&[])?;
    let listed: Vec<&Value> = found
        .iter()
        .filter(|v| {
            is_flow(v, ROLLING, Deployment::service())
                || v["orig"]["sport"] == UNPUBLISHED
                || v["orig"]["src"] == client.ip.to_string()
        })
        .collect();
    assert!(listed.is_empty(), "check lists none of them: {listed:?}");
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "stalewatch exited {status}");
    resumed.stop();
    unpublished.stop();
    Ok(())
}

/// Without Podman's API service, `check` works (namespace names only) and
/// its log says once how to have containers named.
#[test]
fn without_the_api_service_the_log_says_once_how_to_name_containers() -> anyhow::Result<()> {
    if skipped("without_the_api_service_the_log_says_once_how_to_name_containers") {
        return Ok(());
    }
    if podman::answers(podman::SOCKET) {
        // Not ours to stop: the machine runs the service.
        eprintln!("podman's API service runs on this machine: the hint is not given here");
        return Ok(());
    }
    let out = std::process::Command::new(stalewatch_tests::watcher::binary())
        .args(["check", "--format", "json"])
        .env_remove("DOCKER_HOST")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "check runs without the service: {stderr}"
    );
    assert_eq!(
        stderr
            .matches("systemctl enable --now podman.socket")
            .count(),
        1,
        "said once: {stderr}"
    );
    Ok(())
}
