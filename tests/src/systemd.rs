//! A Debian system booted with systemd as PID 1, in a container: our
//! machines do not boot with systemd. Its root filesystem is made with
//! debootstrap from the Debian archive (no image registry is reached),
//! matching this host's release (the stalewatch binary links its libc), and
//! imported into the Docker engine; it holds no Rust toolchain. The
//! container shares the host's network, and sees its `/run/netns`, so that
//! a unit in it watches stories played on the host.
//!
//! Named `<name>-init` and `<name>:systemd`; both are removed on drop, also
//! when a test fails.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    docker::{Discard, propagates},
    poll, run,
};

pub const MIRROR: &str = "http://deb.debian.org/debian";

/// This host's Debian release.
pub fn codename() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map_or_else(|| "bookworm".to_owned(), |c| c.trim_matches('"').to_owned())
}

/// A running Debian with systemd as init.
pub struct Systemd {
    /// The container and the image, removed on drop.
    cleanup: Discard,
}

impl Systemd {
    /// Builds the image (debootstrap's minbase, systemd, and `include`, a
    /// list of further Debian packages; the root filesystem is made in
    /// `work`, and removed once imported) and boots it: returns once
    /// systemd says the system is up.
    pub fn boot(name: &str, include: &[&str], work: &Path) -> anyhow::Result<Systemd> {
        let cleanup = Discard {
            container: format!("{name}-init"),
            image: format!("{name}:systemd"),
        };
        let rootfs = work.join(format!("{name}-rootfs"));
        let built = build_image(&rootfs, &cleanup.image, include);
        let _ = std::fs::remove_dir_all(&rootfs);
        built?;
        let netns = if propagates("/run/netns") {
            "/run/netns:/run/netns:ro,rslave"
        } else {
            "/run/netns:/run/netns:ro"
        };
        // What systemd needs to run as a container's init: the capabilities
        // it hands the unit (and CAP_SYS_ADMIN for the sandbox's mounts), no
        // seccomp or AppArmor profile of the engine's (the unit brings its
        // own filter), a /run of its own, the cgroup tree. The engine's
        // other defaults stay (--privileged is refused by this engine
        // anyway).
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
        let system = Systemd { cleanup };
        let state = poll(Duration::from_secs(60), || {
            let out = system.output(&["systemctl", "is-system-running"]).ok()?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            matches!(state.as_str(), "running" | "degraded").then_some(state)
        });
        if state.is_none() {
            bail!(
                "systemd did not come up: {}",
                run(&["docker", "logs", &system.cleanup.container]).unwrap_or_default()
            );
        }
        Ok(system)
    }

    pub fn container(&self) -> &str {
        &self.cleanup.container
    }

    /// Runs a command in the container, failing with its output when it
    /// fails.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["docker", "exec", self.container()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Runs a command in the container, whatever its exit status.
    pub fn output(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new("docker")
            .args(["exec", self.container()])
            .args(args)
            .output()
            .context("docker exec")
    }

    /// Copies a host file into the container.
    pub fn copy_in(&self, from: &Path, to: &str) -> anyhow::Result<()> {
        run(&[
            "docker",
            "cp",
            &from.to_string_lossy(),
            &format!("{}:{to}", self.container()),
        ])
        .map(drop)
    }

    /// What the unit's own processes wrote to the journal, a line each.
    pub fn journal(&self, unit: &str) -> Vec<String> {
        self.exec(&[
            "journalctl",
            &format!("_SYSTEMD_UNIT={unit}"),
            "-o",
            "cat",
            "--no-pager",
        ])
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// The unit's journal lines at `priority` or more urgent.
    pub fn journal_at(&self, unit: &str, priority: &str) -> anyhow::Result<String> {
        self.exec(&[
            "journalctl",
            &format!("_SYSTEMD_UNIT={unit}"),
            "-p",
            priority,
            "-o",
            "cat",
            "--no-pager",
        ])
    }

    /// `systemctl <verb> <unit>`'s one-word answer (is-active, is-enabled),
    /// whatever its exit status.
    pub fn state(&self, verb: &str, unit: &str) -> String {
        self.output(&["systemctl", verb, unit])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    /// systemd's own lines about the unit (what it ignored of the sandbox
    /// on this host, say): not the unit's JSON records.
    pub fn systemd_lines(&self, unit: &str) -> String {
        self.exec(&["journalctl", "-u", unit, "-o", "cat", "--no-pager"])
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A Debian root filesystem with systemd as init, imported as `image`.
fn build_image(rootfs: &Path, image: &str, include: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    let suite = codename();
    let packages = ["systemd", "systemd-sysv"]
        .iter()
        .chain(include)
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    run(&[
        "debootstrap",
        "--variant=minbase",
        &format!("--include={packages}"),
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
        "{image}: Debian {suite} with {packages}, in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
