//! `cargo xtask demo`: the stale-conntrack story, live, in private network
//! namespaces, with stalewatch watching. Removes everything it created, also
//! on Ctrl-C.
//!
//! `cargo xtask demo --docker`: the story on the machine's Docker engine
//! with docker-compose (see `stalewatch_tests::docker`).

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
    let with_docker = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => false,
        [flag] if flag == "--docker" => true,
        _ => {
            eprintln!("usage: stalewatch-demo [--docker]");
            return ExitCode::from(2);
        }
    };
    if with_docker && let Some(why) = docker::no_engine() {
        eprintln!(
            "stalewatch-demo: --docker needs a Docker engine, and none answers here ({why}); \
             `cargo xtask demo` shows the story in private namespaces instead"
        );
        return ExitCode::from(2);
    }
    // SAFETY: the handler only stores to an atomic.
    let _ = unsafe { signal(Signal::SIGINT, SigHandler::Handler(on_interrupt)) };
    match if with_docker { demo_docker() } else { demo() } {
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
    let mut stream = Producer::start(
        &story.producer,
        stream_src,
        story.service(),
        Duration::from_millis(100),
        1200,
        Duration::from_secs(120),
    )?;
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
    let mut fresh = Producer::start(
        &story.producer,
        fresh_src,
        story.service(),
        Duration::from_millis(100),
        20,
        Duration::from_secs(5),
    )?;
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
    let (status, _) = watcher.stop()?;
    if !status.success() {
        bail!("stalewatch exited {status}");
    }
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
    let mut stream = Producer::start(
        &d.link.ns,
        stream_src,
        Deployment::service(),
        Duration::from_millis(100),
        1200,
        Duration::from_secs(120),
    )?;
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
    let mut fresh = Producer::start(
        &d.link.ns,
        fresh_src,
        Deployment::service(),
        Duration::from_millis(100),
        300,
        Duration::from_secs(30),
    )?;
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
    let (status, _) = watcher.stop()?;
    if !status.success() {
        bail!("stalewatch exited {status}");
    }
    step(&format!(
        "Removing the compose project {project}, its image, the veth and the namespace"
    ));
    Ok(())
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
    let line = poll_interruptible(Duration::from_secs(30), || {
        watcher.wait_line(Duration::from_millis(200), |l| {
            l.trim_start().starts_with("fix ") && l.contains(must_contain)
        })
    })?
    .context("stalewatch raised no alert within 30 s")?;
    Ok(line
        .trim_start()
        .trim_start_matches("fix")
        .trim()
        .to_owned())
}
