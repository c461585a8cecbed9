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
    time::Duration,
};

use serde_json::Value;
use stalewatch_tests::{
    docker, poll,
    story::{Rules, Story, Variant},
    systemd::Systemd,
    traffic::Receiver,
    watcher::{binary, is_stale_flow},
};

const STALE_SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;
const UNIT: &str = "stalewatch.service";

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/stalewatch.service")
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
    // The namespaces exist before the container starts: their names show
    // inside it even where the mounts cannot propagate.
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let system = Systemd::boot(
        &format!("swsd{}", std::process::id()),
        &[],
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )?;
    system.copy_in(&binary(), "/usr/bin/stalewatch")?;
    system.copy_in(&unit_file(), "/etc/systemd/system/stalewatch.service")?;
    system.exec(&["systemctl", "daemon-reload"])?;
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    system.exec(&["systemctl", "start", "stalewatch"])?;
    let attached = poll(Duration::from_secs(30), || {
        system
            .journal(UNIT)
            .into_iter()
            .find(|l| l.contains("attached"))
    });
    assert!(
        attached.is_some(),
        "the unit did not attach: {:?}\n{}",
        system.journal(UNIT),
        system
            .exec(&["systemctl", "status", "--no-pager", "stalewatch"])
            .unwrap_or_default()
    );

    // A user of its own, and exactly the unit's capabilities.
    let pid = system.exec(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "stalewatch",
    ])?;
    let status = system.exec(&["cat", &format!("/proc/{}/status", pid.trim())])?;
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
        system
            .journal(UNIT)
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| is_stale_flow(v, "raised", STALE_SPORT) && v["netns"]["inode"] == inode)
    });
    let raised = raised.unwrap_or_else(|| {
        panic!(
            "no stale_flow in the unit's journal: {:?}",
            system.journal(UNIT)
        )
    });
    story.assert_raised(&raised, STALE_SPORT);
    // Priorities: `journalctl -p warning` shows exactly the raised flows
    // (reminders and resolutions come at notice, logs at info).
    let warnings = system.journal_at(UNIT, "warning")?;
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
    // The flow's facts are fields of the entry: searchable by verdict,
    // source and service.
    let source = format!(
        "{}:{}",
        raised["orig"]["src"].as_str().unwrap_or_default(),
        raised["orig"]["sport"]
    );
    let entries = system.exec(&[
        "journalctl",
        "_SYSTEMD_UNIT=stalewatch.service",
        "STALEWATCH_VERDICT=stale",
        "STALEWATCH_STATE=raised",
        &format!("STALEWATCH_SOURCE={source}"),
        "-o",
        "json",
        "--no-pager",
    ])?;
    let entry: Value = entries
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .next()
        .unwrap_or_else(|| panic!("no entry with the flow's fields: {entries}"));
    let service = format!(
        "{}:{}/udp",
        raised["orig"]["dst"].as_str().unwrap_or_default(),
        raised["orig"]["dport"]
    );
    let stale = format!(
        "{}:{}",
        raised["stale_backend"]["addr"].as_str().unwrap_or_default(),
        raised["stale_backend"]["port"]
    );
    assert_eq!(entry["STALEWATCH_SERVICE"], service.as_str(), "{entry}");
    assert_eq!(entry["STALEWATCH_STALE_BACKEND"], stale.as_str(), "{entry}");
    assert_eq!(entry["PRIORITY"], "4", "{entry}");
    assert_eq!(entry["STALEWATCH_FIX"], raised["fix"], "{entry}");
    let notices = system.exec(&[
        "journalctl",
        "_SYSTEMD_UNIT=stalewatch.service",
        "-p",
        "notice",
        "-o",
        "json",
        "--no-pager",
    ])?;
    assert!(
        notices.contains("\"PRIORITY\":\"4\""),
        "the journal keeps the priority: {notices}"
    );
    let lines = system.journal(UNIT).join("\n");
    assert!(
        !lines.contains("not permitted") && !lines.contains("WARN"),
        "no permission problem under the unit's sandbox: {lines}"
    );

    // systemctl stop sends SIGTERM: stalewatch detaches and the unit ends
    // inactive, not failed.
    system.exec(&["systemctl", "stop", "stalewatch"])?;
    assert_eq!(
        system.state("is-active", "stalewatch"),
        "inactive",
        "stopped cleanly"
    );
    let lines = system.journal(UNIT);
    assert!(
        lines.iter().any(|l| l.starts_with("stalewatch: detached")),
        "{lines:?}"
    );
    // systemd's own lines about the unit (what it ignored of the sandbox on
    // this host, say), for whoever reads the test's output.
    eprintln!("{}", system.systemd_lines("stalewatch"));
    drop(system);
    Ok(())
}
