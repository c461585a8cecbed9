//! The Debian package (`cargo xtask dist`), as an operator meets it: installed
//! with `apt-get install ./stalewatch_*.deb` on a Debian system booted with
//! systemd as PID 1 (a container, as in `systemd_unit.rs`; its root
//! filesystem has no Rust toolchain and no package lists: apt resolves the
//! package's Depends from what is installed, offline). Installing leaves
//! the unit disabled and stopped; the man pages, completions and `--help`
//! are there; `systemctl enable --now stalewatch` raises a stale flow played
//! in namespaces on the host, at warning in the journal; `apt-get purge`
//! stops it and leaves no file behind that was not there before.
//!
//! The package is `STALEWATCH_DEB` (`cargo xtask test` builds it and sets
//! it), else `target/dist/stalewatch_<version>_*.deb`; without one the test
//! fails, saying how to build it. Needs a Docker engine; without one it
//! says so and passes (a failure where one is expected, see `docker::skip`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use stalewatch_tests::{
    docker, poll,
    story::{Rules, Story, Variant},
    systemd::Systemd,
    traffic::Receiver,
    watcher::is_stale_flow,
};

const STALE_SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;
const UNIT: &str = "stalewatch.service";
/// Where the package goes in the container: under a directory left out of
/// the comparison, readable by apt's sandbox user.
const DEB_IN_CONTAINER: &str = "/tmp/stalewatch.deb";

/// Left out of the before/after comparison: kernel and runtime file
/// systems, and what apt, dpkg and the journal keep of their own work.
const NOT_COMPARED: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/var/log",
    "/var/cache/apt",
    "/var/lib/apt",
    "/var/lib/dpkg",
];

/// The package to test.
fn package() -> PathBuf {
    if let Some(deb) = std::env::var_os("STALEWATCH_DEB") {
        let deb = PathBuf::from(deb);
        assert!(
            deb.is_file(),
            "STALEWATCH_DEB names {}, which is not a file",
            deb.display()
        );
        return deb;
    }
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist");
    let prefix = format!("stalewatch_{}_", env!("CARGO_PKG_VERSION"));
    std::fs::read_dir(&dist)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no Debian package to test: STALEWATCH_DEB is not set and {} holds no \
                 {prefix}*.deb; run `cargo xtask dist` (`cargo xtask test` builds it)",
                dist.display()
            )
        })
}

/// Every path in the container's file system outside [`NOT_COMPARED`].
fn files(system: &Systemd) -> anyhow::Result<BTreeSet<String>> {
    let mut args = vec!["find", "/", "("];
    for (i, dir) in NOT_COMPARED.iter().enumerate() {
        if i > 0 {
            args.push("-o");
        }
        args.extend(["-path", dir]);
    }
    args.extend([")", "-prune", "-o", "-print"]);
    Ok(system.exec(&args)?.lines().map(str::to_owned).collect())
}

fn apt(system: &Systemd, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y"];
    all.extend_from_slice(args);
    system.exec(&all)
}

#[test]
fn the_package_installs_runs_under_systemd_and_purges_clean() -> anyhow::Result<()> {
    let deb = package();
    if docker::skip("the Debian package test") {
        return Ok(());
    }
    // The namespaces exist before the container starts: their names show
    // inside it even where the mounts cannot propagate. The system has the
    // package's Recommends, so that apt needs no archive.
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let system = Systemd::boot(
        &format!("swpkg{}", std::process::id()),
        &["conntrack", "iproute2"],
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )?;
    assert!(
        system
            .output(&["sh", "-c", "command -v cargo rustc"])?
            .stdout
            .is_empty(),
        "the system has no Rust toolchain"
    );
    let before = files(&system)?;

    system.copy_in(&deb, DEB_IN_CONTAINER)?;
    system.exec(&["chmod", "0644", DEB_IN_CONTAINER])?;
    let installed = apt(&system, &["install", DEB_IN_CONTAINER])?;
    assert!(
        installed.contains("Setting up stalewatch"),
        "apt-get install: {installed}"
    );
    assert!(
        system
            .exec(&["dpkg-query", "-W", "-f=${Status}", "stalewatch"])?
            .starts_with("install ok installed"),
        "installed"
    );

    // Installed, not enabled, not started: the operator decides.
    assert_eq!(system.state("is-enabled", UNIT), "disabled", "not enabled");
    assert_eq!(system.state("is-active", UNIT), "inactive", "not started");

    // The binary, its man pages and completions.
    let help = system.exec(&["stalewatch", "--help"])?;
    assert!(
        help.contains("watch") && help.contains("check"),
        "stalewatch --help: {help}"
    );
    let version = system.exec(&["stalewatch", "--version"])?;
    assert_eq!(
        version.trim(),
        format!("stalewatch {}", env!("CARGO_PKG_VERSION"))
    );
    for (page, option) in [
        ("stalewatch", "watch"),
        ("stalewatch-watch", "min\\-failures"),
        ("stalewatch-check", "fix"),
    ] {
        let roff = system.exec(&["zcat", &format!("/usr/share/man/man1/{page}.1.gz")])?;
        assert!(
            roff.contains(&format!(".TH {page} 1")) && roff.contains(option),
            "man page {page}: {roff}"
        );
    }
    let bash = system.exec(&[
        "bash",
        "-c",
        ". /usr/share/bash-completion/completions/stalewatch && complete -p stalewatch",
    ])?;
    assert!(bash.contains("stalewatch"), "bash completion: {bash}");
    for file in [
        "/usr/share/zsh/vendor-completions/_stalewatch",
        "/usr/share/fish/vendor_completions.d/stalewatch.fish",
        "/usr/share/doc/stalewatch/README.md",
        "/usr/share/doc/stalewatch/copyright",
        "/usr/share/stalewatch/prometheus/stalewatch-rules.yml",
    ] {
        system.exec(&["test", "-s", file])?;
    }

    // The operator enables it.
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    system.exec(&["systemctl", "enable", "--now", "stalewatch"])?;
    assert_eq!(system.state("is-enabled", UNIT), "enabled");
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
    let enabled = files(&system)?;
    for path in [
        "/usr/bin/stalewatch",
        "/usr/lib/systemd/system/stalewatch.service",
        "/etc/systemd/system/multi-user.target.wants/stalewatch.service",
    ] {
        assert!(enabled.contains(path), "{path} is there once enabled");
    }

    let _played = story.play(old_service, STALE_SPORT, NEW_SPORT)?;
    let inode = story.router.inode()?;
    let warning = || {
        system
            .exec(&[
                "journalctl",
                "-u",
                "stalewatch",
                "-p",
                "warning",
                "-o",
                "cat",
                "--no-pager",
            ])
            .unwrap_or_default()
    };
    let raised: Option<Value> = poll(Duration::from_secs(30), || {
        warning()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| is_stale_flow(v, "raised", STALE_SPORT) && v["netns"]["inode"] == inode)
    });
    let raised = raised.unwrap_or_else(|| {
        panic!(
            "no raised stale_flow in `journalctl -u stalewatch -p warning`: {}\nall: {:?}",
            warning(),
            system.journal(UNIT)
        )
    });
    story.assert_raised(&raised, STALE_SPORT);

    // Purged: stopped first, then nothing left.
    apt(&system, &["purge", "stalewatch"])?;
    let lines = system.journal(UNIT);
    assert!(
        lines.iter().any(|l| l.starts_with("stalewatch: detached")),
        "the purge stopped the unit: {lines:?}"
    );
    assert_eq!(system.state("is-active", UNIT), "inactive");
    let listed = system.output(&["dpkg", "-l", "stalewatch"])?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !listed
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("stalewatch")),
        "dpkg -l still knows the package: {listed}"
    );
    let unit = system.output(&["systemctl", "cat", "stalewatch"])?;
    assert!(!unit.status.success(), "no unit left");
    let after = files(&system)?;
    let left: Vec<&String> = after.difference(&before).collect();
    let gone: Vec<&String> = before.difference(&after).collect();
    assert!(
        left.is_empty() && gone.is_empty(),
        "the purge left {left:?} behind and took {gone:?} away"
    );
    eprintln!("{}", system.systemd_lines("stalewatch"));
    drop(system);
    Ok(())
}
