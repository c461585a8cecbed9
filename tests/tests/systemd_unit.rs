//! The systemd unit (packaging/systemd/stalewatch.service), started by a
//! real systemd as PID 1: our machines do not boot with systemd, so it runs
//! in a container whose root filesystem is Debian's, made here with
//! debootstrap from the Debian archive (no image registry is reached) and
//! imported into the Docker engine. The unit is the shipped file, unchanged:
//! its dynamic user, its three capabilities and its whole sandbox. Against a
//! stale flow built in namespaces on the host, the alert must come out in
//! the unit's journal, and `systemctl stop` must end it cleanly. Needs a
//! Docker engine; without one it says so and passes.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use stalewatch_tests::{
    docker::{self, propagates},
    poll, run,
    story::{Rules, Story, Variant},
    traffic::Receiver,
    watcher::{binary, is_stale_flow},
};

const STALE_SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;
const MIRROR: &str = "http://deb.debian.org/debian";

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/stalewatch.service")
}

/// This host's Debian release (the root filesystem matches its libc, which
/// the stalewatch binary links against).
fn codename() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map_or_else(|| "bookworm".to_owned(), |c| c.trim_matches('"').to_owned())
}

/// A Debian root filesystem with systemd as init, imported as `image`.
fn build_image(rootfs: &Path, image: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let suite = codename();
    run(&[
        "debootstrap",
        "--variant=minbase",
        "--include=systemd,systemd-sysv",
        &suite,
        &rootfs.to_string_lossy(),
        MIRROR,
    ])
    .context("debootstrap (cargo xtask setup installs it)")?;
    let mut tar = Command::new("tar")
        .args(["-C", &rootfs.to_string_lossy(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let import = Command::new("docker")
        .args(["import", "-c", "ENV container=docker"])
        .args(["-c", r#"CMD ["/lib/systemd/systemd"]"#, "-", image])
        .stdin(tar.stdout.take().context("tar's stdout")?)
        .output()?;
    let tarred = tar.wait()?;
    if !tarred.success() || !import.status.success() {
        bail!(
            "importing the root filesystem: tar {tarred}, docker import {}: {}",
            import.status,
            String::from_utf8_lossy(&import.stderr).trim()
        );
    }
    eprintln!(
        "{image}: Debian {suite} with systemd, in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn exec(container: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["docker", "exec", container];
    all.extend_from_slice(args);
    run(&all)
}

/// What the unit's own processes wrote to the journal, a line each.
fn journal(container: &str) -> Vec<String> {
    exec(
        container,
        &[
            "journalctl",
            "_SYSTEMD_UNIT=stalewatch.service",
            "-o",
            "cat",
            "--no-pager",
        ],
    )
    .unwrap_or_default()
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The capabilities the unit grants, as the kernel's bit mask.
fn unit_caps_mask() -> u64 {
    let unit = std::fs::read_to_string(unit_file()).expect("read the unit");
    unit.lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants ambient capabilities")
        .split_whitespace()
        .map(|cap| match cap {
            "CAP_NET_ADMIN" => 1u64 << 12,
            "CAP_SYS_PTRACE" => 1 << 19,
            "CAP_SYS_ADMIN" => 1 << 21,
            other => panic!("a capability this test does not know: {other}"),
        })
        .fold(0, |mask, bit| mask | bit)
}

/// A field of /proc/PID/status: its first value.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_unit_runs_under_systemd_and_raises_a_stale_flow() -> anyhow::Result<()> {
    if docker::skip("the systemd unit test") {
        return Ok(());
    }
    let id = std::process::id();
    let cleanup = docker::Discard {
        container: format!("swsd{id}-init"),
        image: format!("swsd{id}:systemd"),
    };
    let rootfs = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("swsd{id}-rootfs"));
    let built = build_image(&rootfs, &cleanup.image);
    let _ = std::fs::remove_dir_all(&rootfs);
    built?;

    // The namespaces exist before the container starts: their names show
    // inside it even where the mounts cannot propagate.
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let netns = if propagates("/run/netns") {
        "/run/netns:/run/netns:ro,rslave"
    } else {
        "/run/netns:/run/netns:ro"
    };
    // What systemd needs to run as a container's init: the capabilities it
    // hands the unit (and CAP_SYS_ADMIN for the sandbox's mounts), no
    // seccomp or AppArmor profile of the engine's (the unit brings its own
    // filter), a /run of its own, the cgroup tree. The engine's other
    // defaults stay (--privileged is refused by this engine anyway).
    run(&[
        "docker",
        "run",
        "-d",
        "--name",
        &cleanup.container,
        "--network",
        "host",
        "--cap-add",
        "SYS_ADMIN",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "SYS_PTRACE",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/run/lock",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup:ro",
        "-v",
        netns,
        &cleanup.image,
    ])?;
    let state = poll(Duration::from_secs(60), || {
        let out = Command::new("docker")
            .args(["exec", &cleanup.container, "systemctl", "is-system-running"])
            .output()
            .ok()?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        matches!(state.as_str(), "running" | "degraded").then_some(state)
    });
    assert!(
        state.is_some(),
        "systemd did not come up: {}",
        run(&["docker", "logs", &cleanup.container]).unwrap_or_default()
    );

    let bin = binary();
    run(&[
        "docker",
        "cp",
        &bin.to_string_lossy(),
        &format!("{}:/usr/bin/stalewatch", cleanup.container),
    ])?;
    run(&[
        "docker",
        "cp",
        &unit_file().to_string_lossy(),
        &format!(
            "{}:/etc/systemd/system/stalewatch.service",
            cleanup.container
        ),
    ])?;
    exec(&cleanup.container, &["systemctl", "daemon-reload"])?;
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    exec(&cleanup.container, &["systemctl", "start", "stalewatch"])?;
    let attached = poll(Duration::from_secs(30), || {
        journal(&cleanup.container)
            .into_iter()
            .find(|l| l.contains("attached"))
    });
    assert!(
        attached.is_some(),
        "the unit did not attach: {:?}\n{}",
        journal(&cleanup.container),
        exec(
            &cleanup.container,
            &["systemctl", "status", "--no-pager", "stalewatch"]
        )
        .unwrap_or_default()
    );

    // A user of its own, and exactly the unit's capabilities.
    let pid = exec(
        &cleanup.container,
        &[
            "systemctl",
            "show",
            "-p",
            "MainPID",
            "--value",
            "stalewatch",
        ],
    )?;
    let status = exec(
        &cleanup.container,
        &["cat", &format!("/proc/{}/status", pid.trim())],
    )?;
    let uid = status_field(&status, "Uid");
    assert!(!uid.is_empty() && uid != "0", "a dynamic user: {status}");
    let mask = format!("{:016x}", unit_caps_mask());
    for set in ["CapEff", "CapAmb", "CapBnd"] {
        assert_eq!(status_field(&status, set), mask, "{set}: {status}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");

    let _played = story.play(old_service, STALE_SPORT, NEW_SPORT)?;
    // The unit watches every namespace: other work on the machine may show
    // too, so the flow is picked by its namespace.
    let inode = story.router.inode()?;
    let raised: Option<Value> = poll(Duration::from_secs(30), || {
        journal(&cleanup.container)
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| is_stale_flow(v, "raised", STALE_SPORT) && v["netns"]["inode"] == inode)
    });
    let raised = raised.unwrap_or_else(|| {
        panic!(
            "no stale_flow in the unit's journal: {:?}",
            journal(&cleanup.container)
        )
    });
    story.assert_raised(&raised, STALE_SPORT);
    // Priorities: `journalctl -p warning` shows exactly the raised flows
    // (reminders and resolutions come at notice, logs at info).
    let warnings = exec(
        &cleanup.container,
        &[
            "journalctl",
            "_SYSTEMD_UNIT=stalewatch.service",
            "-p",
            "warning",
            "-o",
            "cat",
            "--no-pager",
        ],
    )?;
    let records: Vec<Value> = warnings
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {warnings}")))
        .collect();
    assert!(
        records
            .iter()
            .any(|v| is_stale_flow(v, "raised", STALE_SPORT) && v["netns"]["inode"] == inode),
        "the raised flow is a warning: {warnings}"
    );
    assert!(
        records
            .iter()
            .all(|v| v["state"] == "raised" && v["type"] != "events_lost"),
        "only raised flows are warnings: {warnings}"
    );
    let notices = exec(
        &cleanup.container,
        &[
            "journalctl",
            "_SYSTEMD_UNIT=stalewatch.service",
            "-p",
            "notice",
            "-o",
            "json",
            "--no-pager",
        ],
    )?;
    assert!(
        notices.contains("\"PRIORITY\":\"4\""),
        "the journal keeps the priority: {notices}"
    );
    let lines = journal(&cleanup.container).join("\n");
    assert!(
        !lines.contains("not permitted") && !lines.contains("WARN"),
        "no permission problem under the unit's sandbox: {lines}"
    );

    // systemctl stop sends SIGTERM: stalewatch detaches and the unit ends
    // inactive, not failed.
    exec(&cleanup.container, &["systemctl", "stop", "stalewatch"])?;
    let state = Command::new("docker")
        .args([
            "exec",
            &cleanup.container,
            "systemctl",
            "is-active",
            "stalewatch",
        ])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "inactive",
        "stopped cleanly"
    );
    let lines = journal(&cleanup.container);
    assert!(
        lines.iter().any(|l| l.starts_with("stalewatch: detached")),
        "{lines:?}"
    );
    // systemd's own lines about the unit (what it ignored of the sandbox on
    // this host, say), for whoever reads the test's output.
    eprintln!(
        "{}",
        exec(
            &cleanup.container,
            &["journalctl", "-u", "stalewatch", "-o", "cat", "--no-pager"]
        )
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('{'))
        .collect::<Vec<_>>()
        .join("\n")
    );
    drop(cleanup);
    Ok(())
}
