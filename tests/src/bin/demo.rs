//! `cargo xtask demo`: the stale-conntrack story, live, in private network
//! namespaces, with stalewatch watching. Removes everything it created, also
//! on Ctrl-C.
//!
//! `cargo xtask demo --docker`: the story on the machine's Docker engine
//! with docker-compose (see `stalewatch_tests::docker`).
//!
//! `cargo xtask demo --podman`: both of Podman's shapes on the machine's
//! podman (netavark): a stream pinned to a replaced container, then the
//! silent bypass into conmon's socket (see `stalewatch_tests::podman`).
//!
//! `cargo xtask demo --nodes`: two nodes, in private namespaces: node A
//! DNATs a service to a pod on node B, the pod moves, and A's entry keeps
//! a client's stream pinned to the dead pod: A raises it from its rules
//! (nothing fails on A), B reports the dead destination (see
//! `stalewatch_tests::multihost`).

use std::{
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigHandler, Signal, signal};
use stalewatch_tests::{
    docker::{self, Deployment},
    multihost::{Cluster, DNS, Engine, Family, L4},
    podman::{self, World},
    sh,
    story::{Rules, Story, V4, Variant},
    traffic::{Producer, Receiver},
    watcher::Watcher,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

/// Sleeps, unless the person watching pressed Ctrl-C.
fn pause(d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "stalewatch-demo: must run as root (it builds network namespaces and loads eBPF)"
        );
        return ExitCode::from(2);
    }
    let engine = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => None,
        [flag] if ["--docker", "--podman", "--nodes"].contains(&flag.as_str()) => {
            Some(flag.clone())
        }
        _ => {
            eprintln!("usage: stalewatch-demo [--docker | --podman | --nodes]");
            return ExitCode::from(2);
        }
    };
    let missing = match engine.as_deref() {
        Some("--docker") => docker::no_engine().map(|why| ("a Docker engine", why)),
        Some("--podman") => podman::no_podman().map(|why| ("podman with netavark", why)),
        _ => None,
    };
    if let (Some(flag), Some((what, why))) = (&engine, missing) {
        eprintln!(
            "stalewatch-demo: {flag} needs {what}, and it cannot run here ({why}); \
             `cargo xtask demo` shows the story in private namespaces instead"
        );
        return ExitCode::from(2);
    }
    // SAFETY: the handler only stores to an atomic.
    let _ = unsafe { signal(Signal::SIGINT, SigHandler::Handler(on_interrupt)) };
    let played = match engine.as_deref() {
        Some("--docker") => demo_docker(),
        Some("--podman") => demo_podman(),
        Some(_) => demo_nodes(),
        None => demo(),
    };
    match played {
        Ok(()) => {
            step("Done: every namespace, link and rule the demo created is gone");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stalewatch-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> anyhow::Result<()> {
    step("Building the story in private network namespaces");
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    println!(
        "    producer {} (192.0.2.2)  ->  router {} (192.0.2.1, udp/8888 DNAT to {}:8888)",
        story.producer.name, story.router.name, V4.old_backend
    );
    let old_service = Receiver::start(story.old.as_ref().context("old container")?, 8888)?;

    step(&format!(
        "Starting stalewatch on the router: stalewatch watch --netns {}",
        story.router.name
    ));
    // The container's namespaces are ours; the processes in them are
    // threads of this demo, so stalewatch sees the router namespace by name.
    let watcher = Watcher::start_with(
        "text",
        &["--netns", &story.router.name, "--resolve-after", "5s"],
        true,
    )?;

    let stream_src = story.producer_addr(40000);
    let mut stream = produce(&story.producer, stream_src, story.service(), 1200)?;
    step("A producer streams 10 datagrams a second from 192.0.2.2:40000 to 192.0.2.1:8888");
    if !old_service.wait_from(stream_src, 10, Duration::from_secs(10)) {
        bail!("the stream did not reach the old container");
    }
    println!(
        "    old container {} received {} datagrams",
        V4.old_backend,
        old_service.from(stream_src)
    );

    step(&format!(
        "Redeploy: the old container is removed; the new one is {} on a new bridge; the DNAT rule now points there",
        V4.new_backend
    ));
    story.redeploy()?;
    drop(old_service);
    let new_service = Receiver::start(&story.new, 8888)?;
    let fresh_src = story.producer_addr(40001);
    let mut fresh = produce(&story.producer, fresh_src, story.service(), 20)?;
    pause(Duration::from_secs(3))?;
    println!(
        "    a NEW flow from port 40001 reaches the new container: {} datagrams. Every quick test passes...",
        new_service.from(fresh_src)
    );
    println!(
        "    ...but the old stream from port 40000 does not: {} datagrams at the new container",
        new_service.from(stream_src)
    );
    fresh.stop();

    step("Waiting for stalewatch (the kernel gives up on ARP for the old address after about 3 s)");
    let fix = fix_command(&watcher, "")?;

    step(&format!("Applying the fix stalewatch printed: {fix}"));
    sh(&fix)?;
    if !new_service.wait_from(stream_src, 10, Duration::from_secs(10)) {
        bail!("the stream did not reach the new container after the fix");
    }
    println!(
        "    the stream from port 40000 now reaches the new container: {} datagrams",
        new_service.from(stream_src)
    );

    step("Waiting for stalewatch to resolve the alert");
    poll_interruptible(Duration::from_secs(20), || {
        watcher.wait_line(Duration::from_millis(200), |l| l.contains("RESOLVED"))
    })?
    .context("the alert was not resolved")?;
    stream.stop();
    stop_watching(watcher)?;
    Ok(())
}

/// The story on the real engine: a compose service redeployed under a
/// stream, which then bypasses the new DNAT through docker-proxy.
fn demo_docker() -> anyhow::Result<()> {
    step(&format!(
        "Docker engine {}: building a local image (FROM scratch: busybox-static and a UDP receiver that logs each sender)",
        docker::engine_version()
    ));
    let mut d = Deployment::new()?;
    let project = d.project.name.clone();
    step(&format!(
        "docker-compose -p {project} up: service web publishes 8888/udp, on the default bridge"
    ));
    d.project.up("compose-bridge.yml")?;
    let old = d.project.container("web")?;
    println!("    container {} at {}", old.name, old.ip);

    step("Starting stalewatch on the host: stalewatch watch --audit-every 2s");
    let watcher = Watcher::start_with(
        "text",
        &["--audit-every", "2s", "--resolve-after", "5s"],
        true,
    )?;
    let stream_src = Deployment::producer(40000);
    let mut stream = produce(&d.link.ns, stream_src, Deployment::service(), 1200)?;
    step(&format!(
        "A producer in namespace {} streams 10 datagrams a second from {stream_src} to {} (one veth to the host)",
        d.link.ns.name,
        Deployment::service()
    ));
    if !d
        .project
        .wait_from(&old, stream_src, 10, Duration::from_secs(10))
    {
        bail!("the stream did not reach {}", old.name);
    }
    println!(
        "    {} logs {} datagrams from {stream_src}",
        old.name,
        d.project.from_ip(&old, stream_src.ip())
    );

    step("Redeploy: docker-compose up with the service on a network of its own");
    let subnet = d.up_on_network()?;
    let new = d.project.container("web")?;
    println!(
        "    container {} at {} (network {subnet})",
        new.name, new.ip
    );
    let fresh_src = Deployment::producer(40001);
    let mut fresh = produce(&d.link.ns, fresh_src, Deployment::service(), 300)?;
    pause(Duration::from_secs(3))?;
    println!(
        "    a NEW flow from port 40001 reaches {} with its own address: {} datagrams from {fresh_src}",
        new.name,
        d.project
            .sources(&new)
            .get(&fresh_src)
            .copied()
            .unwrap_or(0)
    );
    println!(
        "    the stream from port 40000 arrives too, but through docker-proxy: {} datagrams from the gateway {}, none from {stream_src}",
        d.project.from_ip(&new, new.gateway),
        new.gateway
    );

    step("Waiting for stalewatch (its conntrack audit runs every 2 s)");
    let fix = fix_command(&watcher, "--sport 40000")?;

    step(&format!("Applying the fix stalewatch printed: {fix}"));
    sh(&fix)?;
    if !d
        .project
        .wait_from(&new, stream_src, 10, Duration::from_secs(10))
    {
        bail!("the stream did not reach {} after the fix", new.name);
    }
    println!(
        "    {} now sees the producer's own address: {} datagrams from {stream_src}",
        new.name,
        d.project
            .sources(&new)
            .get(&stream_src)
            .copied()
            .unwrap_or(0)
    );

    step("Waiting for stalewatch to resolve the alert");
    poll_interruptible(Duration::from_secs(20), || {
        watcher.wait_line(Duration::from_millis(200), |l| {
            l.contains("RESOLVED") && l.contains(":40000 ->")
        })
    })?
    .context("the alert was not resolved")?;
    stream.stop();
    fresh.stop();
    stop_watching(watcher)?;
    step(&format!(
        "Removing the compose project {project}, its image, the veth and the namespace"
    ));
    Ok(())
}

/// Both of Podman's shapes: the container publishing 8888/udp is replaced
/// by one with a new address under a stream, which stays pinned to the old
/// one; then, its entry deleted while nothing publishes the port, the
/// stream bypasses the new DNAT into conmon's socket, silently.
fn demo_podman() -> anyhow::Result<()> {
    step(&format!(
        "podman {}: building a local image (FROM scratch: busybox-static and a UDP receiver \
         that logs each sender); starting podman's API service if it is not running",
        podman::podman(&["--version"])?
            .trim()
            .trim_start_matches("podman version ")
    ));
    let mut w = World::new(true)?;
    let subnet = docker::free_subnets(1)?.remove(0);
    let net = w.network("net", &subnet)?;
    let at = |n: u8| -> anyhow::Result<std::net::IpAddr> {
        let first = docker::first_host(&subnet).to_string();
        let prefix = first.rsplit_once('.').context("an IPv4 subnet")?.0;
        Ok(format!("{prefix}.{n}").parse()?)
    };
    let old = w.service(&format!("{}-web-a", w.name), &net, Some(at(10)?))?;
    step(&format!(
        "podman run {}: publishes 8888:8888/udp, on network {net} at {}",
        old.name, old.ip
    ));

    step("Starting stalewatch on the host: stalewatch watch --audit-every 2s");
    let watcher = Watcher::start_with(
        "text",
        &["--audit-every", "2s", "--resolve-after", "5s"],
        true,
    )?;
    let stream_src = Deployment::producer(40000);
    let mut stream = produce(&w.link().ns, stream_src, Deployment::service(), 1800)?;
    step(&format!(
        "A producer in namespace {} streams 10 datagrams a second from {stream_src} to {}",
        w.link().ns.name,
        Deployment::service()
    ));
    if !w.wait_from(&old, stream_src, 10, Duration::from_secs(10)) {
        bail!("the stream did not reach {}", old.name);
    }

    step("Redeploy: podman rm -f, then podman run with a new address on the same network");
    w.remove(&old.name)?;
    let new = w.service(&format!("{}-web-b", w.name), &net, Some(at(11)?))?;
    println!("    container {} at {}", new.name, new.ip);
    let fresh_src = Deployment::producer(40001);
    let mut fresh = produce(&w.link().ns, fresh_src, Deployment::service(), 300)?;
    pause(Duration::from_secs(2))?;
    println!(
        "    a NEW flow from port 40001 reaches {}: {} datagrams; the stream from port 40000: {}",
        new.name,
        w.sources(&new).get(&fresh_src).copied().unwrap_or(0),
        w.sources(&new).get(&stream_src).copied().unwrap_or(0)
    );
    step("Waiting for stalewatch (the old address fails at the bridge)");
    let fix = fix_command(&watcher, "--sport 40000")?;
    step(&format!("Applying the fix stalewatch printed: {fix}"));
    sh(&fix)?;
    if !w.wait_from(&new, stream_src, 10, Duration::from_secs(10)) {
        bail!("the stream did not reach {} after the fix", new.name);
    }
    println!("    {} now gets the stream", new.name);

    step(
        "The silent shape: the container is replaced again, and the stream's entry is deleted in the gap, while nothing publishes 8888",
    );
    w.remove(&new.name)?;
    sh(
        "conntrack -D -p udp --orig-src 198.51.100.2 --orig-port-src 40000 >/dev/null 2>&1 || true",
    )?;
    pause(Duration::from_secs(1))?;
    let third = w.service(&format!("{}-web-c", w.name), &net, Some(at(12)?))?;
    pause(Duration::from_secs(3))?;
    println!(
        "    {} at {} publishes 8888 now, and gets {} datagrams of the stream: its entry has no NAT, \
         and the host's socket on 8888 is conmon's, which never reads it",
        third.name,
        third.ip,
        w.sources(&third).get(&stream_src).copied().unwrap_or(0)
    );
    step("Waiting for stalewatch's audit (no packet fails: nothing else would tell)");
    // The bypass's fix names the host itself as the entry's reply source.
    let fix = fix_command(&watcher, "-r 198.51.100.1 -q 198.51.100.2 --sport 40000")?;
    step(&format!("Applying the fix stalewatch printed: {fix}"));
    sh(&fix)?;
    if !w.wait_from(&third, stream_src, 10, Duration::from_secs(10)) {
        bail!("the stream did not reach {} after the fix", third.name);
    }
    println!("    {} now gets the stream from {stream_src}", third.name);
    stream.stop();
    fresh.stop();
    stop_watching(watcher)?;
    step(&format!(
        "Removing the containers, network {net}, the image, the veth, the FORWARD rules and the namespace"
    ));
    Ok(())
}

/// Two nodes: A DNATs a service (kube-proxy's nftables layout) to a pod
/// on B; the pod moves; the client's stream stays pinned on A. A's watch
/// raises it from A's rules; B's reports the dead destination.
fn demo_nodes() -> anyhow::Result<()> {
    const STREAM: u16 = 40053;
    step("Building a client, node A and node B in private network namespaces");
    let mut c = Cluster::build(Engine::NftKube, Family::V4, L4::Udp)?;
    c.deploy(&DNS, 7)?;
    // B tracks connections, as kube-proxy's rules make every node do.
    c.node_b.exec_input(
        &["nft", "-f", "-"],
        "table inet sw_ct {\n chain forwarded {\n type filter hook forward priority 0;\n ct state new counter\n }\n}\n",
    )?;
    println!(
        "    client {} ({})  ->  node A {} (kube-proxy-style nftables: {} DNAT to pod {}:{})",
        c.client.name,
        c.client_addr(STREAM).ip(),
        c.node_a.name,
        c.vip(&DNS),
        c.pod_ip(7),
        DNS.target_port
    );
    println!(
        "    node A routes the pods' subnet to node B {}, whose pods sit on bridge cbr0",
        c.node_b.name
    );
    let rx7 = c.udp_receiver(7, &DNS)?;
    let src = c.client_addr(STREAM);
    let mut stream = c.producer(
        &DNS,
        STREAM,
        Duration::from_millis(100),
        1800,
        Duration::from_secs(180),
    )?;
    step(&format!(
        "The client streams 10 datagrams a second from {src} to {}",
        c.vip(&DNS)
    ));
    if !rx7.wait_from(src, 10, Duration::from_secs(10)) {
        bail!("the stream did not reach pod .7");
    }
    println!(
        "    pod {} received {} datagrams",
        c.pod_ip(7),
        rx7.from(src)
    );

    step(&format!(
        "Starting stalewatch on both nodes: stalewatch watch --netns {} (and --netns {})",
        c.node_a.name, c.node_b.name
    ));
    let args = |ns: &str| {
        [
            "--netns".to_owned(),
            ns.to_owned(),
            "--resolve-after".into(),
            "5s".into(),
        ]
    };
    let a_args = args(&c.node_a.name);
    let b_args = args(&c.node_b.name);
    let on_a = Watcher::start_with("text", &a_args.each_ref().map(String::as_str), true)?;
    let on_b = Watcher::start_with("text", &b_args.each_ref().map(String::as_str), true)?;

    step(&format!(
        "Redeploy: pod {} is deleted, the service moves to pod {} (A's rules rewritten)",
        c.pod_ip(7),
        c.pod_ip(8)
    ));
    c.move_backend(&DNS, 7, 8)?;
    drop(rx7);
    let rx8 = c.udp_receiver(8, &DNS)?;
    let fresh_src = c.client_addr(STREAM + 1);
    let mut fresh = c.producer(
        &DNS,
        STREAM + 1,
        Duration::from_millis(100),
        20,
        Duration::from_secs(5),
    )?;
    pause(Duration::from_secs(3))?;
    println!(
        "    a NEW flow from {fresh_src} reaches pod {}: {} datagrams...",
        c.pod_ip(8),
        rx8.from(fresh_src)
    );
    println!(
        "    ...but A's conntrack entry keeps the stream on {}: {} datagrams at pod {}, and A sees no failure",
        c.pod_ip(7),
        rx8.from(src),
        c.pod_ip(8)
    );
    fresh.stop();

    step("Waiting for node A: it judges its entries against its current rules");
    let fix = fix_command(&on_a, "")?;
    step("Waiting for node B: the stream keeps coming for an address no neighbour answers");
    poll_interruptible(Duration::from_secs(60), || {
        on_b.wait_line(Duration::from_millis(200), |l| {
            l.contains("DEAD DESTINATION")
        })
    })?
    .context("node B reported no dead destination within 60 s")?;

    step(&format!("Applying the fix node A's alert printed: {fix}"));
    sh(&fix)?;
    if !rx8.wait_from(src, 10, Duration::from_secs(10)) {
        bail!("the stream did not reach pod .8 after the fix");
    }
    println!(
        "    the stream now reaches pod {}: {} datagrams",
        c.pod_ip(8),
        rx8.from(src)
    );
    step("Waiting for both to resolve");
    for (node, watcher) in [("A", &on_a), ("B", &on_b)] {
        poll_interruptible(Duration::from_secs(30), || {
            watcher.wait_line(Duration::from_millis(200), |l| l.contains("RESOLVED"))
        })?
        .with_context(|| format!("node {node}'s alert was not resolved"))?;
    }
    stream.stop();
    stop_watching(on_a)?;
    stop_watching(on_b)?;
    Ok(())
}

/// Stops a watch; it must exit cleanly.
fn stop_watching(watcher: Watcher) -> anyhow::Result<()> {
    let (status, _) = watcher.stop()?;
    if !status.success() {
        bail!("stalewatch exited {status}");
    }
    Ok(())
}

/// A producer in `ns` sending `count` datagrams from `from` to `to`, ten
/// a second (bounded in time too).
fn produce(
    ns: &stalewatch_tests::netns::Netns,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    count: u64,
) -> anyhow::Result<Producer> {
    Producer::start(
        ns,
        from,
        to,
        Duration::from_millis(100),
        count,
        Duration::from_secs(count / 10 + 3),
    )
}

/// Polls `f` until it yields, the time is up, or Ctrl-C.
fn poll_interruptible<T>(
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<Option<T>> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if let Some(v) = f() {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Waits for stalewatch's text alert and returns the fix command it prints
/// (on a `fix` line that contains `must_contain`).
fn fix_command(watcher: &Watcher, must_contain: &str) -> anyhow::Result<String> {
    // A pinned flow fails once the old address's neighbour entry does: up to a
    // minute where the old container was confirmed reachable just before.
    let line = poll_interruptible(Duration::from_secs(75), || {
        watcher.wait_line(Duration::from_millis(200), |l| {
            l.trim_start().starts_with("fix ") && l.contains(must_contain)
        })
    })?
    .context("stalewatch raised no alert within 75 s")?;
    Ok(line
        .trim_start()
        .trim_start_matches("fix")
        .trim()
        .to_owned())
}
