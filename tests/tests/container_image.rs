//! The container image (packaging/container) run as the DaemonSet runs it
//! (packaging/kubernetes/daemonset.yaml): host network and PID namespace,
//! every capability dropped but the set, a read-only root, BTF and the
//! netns directories mounted read-only with host-to-container propagation.
//! Against a stale flow built in namespaces, the alert must come out of the
//! container's stdout. Needs a Docker engine; without one it says so and
//! passes. The manifests are checked offline by kubernetes-validate (from
//! PyPI), which ships the Kubernetes schemas.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use stalewatch_tests::{
    docker::{self, propagates},
    run,
    story::{Rules, Story, Variant},
    traffic::Receiver,
    watcher::{Watcher, binary, is_stale_flow},
};

const STALE_SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;
const VALIDATOR: &str = "kubernetes-validate==1.37.0";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn packaging(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(path)
}

/// The capabilities the DaemonSet adds, from its `add: [...]` line.
fn daemonset_caps() -> Vec<String> {
    let manifest = std::fs::read_to_string(packaging("kubernetes/daemonset.yaml")).expect("read");
    let line = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("add:"))
        .expect("the DaemonSet adds capabilities");
    line.trim()
        .trim_matches(['[', ']'])
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_owned())
        .collect()
}

/// `docker run` with the DaemonSet's settings, for `ARGS...` (after the
/// image, as the container's arguments).
fn docker_run(name: &str, image: &str, caps: &[String], args: &[&str]) -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(["run", "--rm", "--name", name])
        .args(["--network", "host", "--pid", "host", "--read-only"])
        .args(["--cap-drop", "ALL"]);
    for cap in caps {
        cmd.args(["--cap-add", cap]);
    }
    cmd.args(["-v", "/sys/kernel/btf:/sys/kernel/btf:ro"]);
    for dir in ["/run/netns", "/var/run/docker/netns"] {
        // HostToContainer is rslave, which the engine refuses where the
        // host's mount does not propagate (on a host whose PID 1 is not
        // systemd, / is private): there the mounts present at start only.
        let options = if propagates(dir) { "ro,rslave" } else { "ro" };
        cmd.args(["-v", &format!("{dir}:{dir}:{options}")]);
    }
    cmd.arg(image).args(args);
    cmd
}

#[test]
fn the_image_raises_a_stale_flow_with_the_daemonsets_settings() -> anyhow::Result<()> {
    if docker::skip("the container image test") {
        return Ok(());
    }
    let id = std::process::id();
    let cleanup = docker::Discard {
        container: format!("swimg{id}-run"),
        image: format!("swimg{id}:test"),
    };
    // The static build when given, else the usual one with its libraries.
    let bin = std::env::var_os("STALEWATCH_STATIC_BIN").map_or_else(binary, PathBuf::from);
    eprintln!("building {} from {}", cleanup.image, bin.display());
    let script = packaging("container/build.sh");
    run(&[
        "sh",
        &script.to_string_lossy(),
        &bin.to_string_lossy(),
        &cleanup.image,
    ])?;
    let caps = daemonset_caps();

    // The namespaces exist before the container starts: --netns resolves
    // inside it even where the mounts cannot propagate.
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let router = story.router.name.clone();
    // Without the capabilities it refuses at once, in one line.
    let out = docker_run(&cleanup.container, &cleanup.image, &[], &[]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "no capabilities: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    // Metrics as the DaemonSet serves them, on the host's loopback here
    // (the DaemonSet binds the node's address).
    let metrics = format!("127.0.0.1:{}", 30_000 + id % 10_000);
    let cmd = docker_run(
        &cleanup.container,
        &cleanup.image,
        &caps,
        &[
            "watch",
            "--format",
            "json",
            "--netns",
            &router,
            "--resolve-after",
            "4s",
            "--metrics",
            &metrics,
        ],
    );
    let watcher = Watcher::start_command(cmd, false)?;

    let _played = story.play(old_service, STALE_SPORT, NEW_SPORT)?;

    let raised = watcher
        .wait_for(secs(20), |v| is_stale_flow(v, "raised", STALE_SPORT))
        .unwrap_or_else(|| panic!("no stale_flow from the container: {:?}", watcher.records()));
    story.assert_raised(&raised, STALE_SPORT);
    let log = watcher.stderr_text();
    assert!(
        !log.contains("not permitted") && !log.contains("WARN"),
        "no permission problem inside the container: {log}"
    );
    // The DaemonSet's liveness probe and Prometheus read this.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://{metrics}/metrics"))
        .output()?;
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.ends_with("\n200") && body.contains("stalewatch_bpf_program_runs_total"),
        "metrics from the container: {body}"
    );
    // docker run passes SIGINT on: stalewatch detaches and exits 0.
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "clean stop in the container: {status}");
    drop(cleanup);
    Ok(())
}

/// The validator, in a virtualenv of the test's own (made once, kept in
/// the target directory). Debian's `virtualenv` (python3-virtualenv, which
/// `cargo xtask setup` installs) works with the system's Python as it is.
fn validator() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubernetes-validate-1.37.0");
    let bin = venv.join("bin/kubernetes-validate");
    if !bin.exists() {
        run(&["virtualenv", "-q", &venv.to_string_lossy()]).expect("virtualenv");
        let pip = venv.join("bin/pip");
        run(&[&pip.to_string_lossy(), "install", "-q", VALIDATOR])
            .expect("pip install kubernetes-validate");
    }
    bin
}

/// The DaemonSet against the schemas of the oldest and the newest
/// Kubernetes that the validator ships, rejecting unknown fields; and a
/// broken copy must fail, so the check is not a no-op.
#[test]
fn the_manifests_validate() -> anyhow::Result<()> {
    let kv = validator();
    let kv = kv.to_string_lossy();
    let manifest = packaging("kubernetes/daemonset.yaml");
    let manifest = manifest.to_string_lossy();
    for version in ["1.25.0", "1.37.0"] {
        run(&[&kv, "--strict", "--quiet", "-k", version, &manifest])?;
    }
    let text = std::fs::read_to_string(&*manifest)?;
    let broken = text.replace("mountPropagation:", "mountPropagaton:");
    assert_ne!(broken, text);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("daemonset-broken-{}.yaml", std::process::id()));
    std::fs::write(&path, broken)?;
    let result = Command::new(&*kv)
        .args(["--strict", "--quiet", &path.to_string_lossy()])
        .output();
    std::fs::remove_file(&path)?;
    let result = result?;
    // It reports on stdout.
    let report = String::from_utf8_lossy(&result.stdout);
    assert!(!result.status.success(), "a misspelt field fails: {report}");
    assert!(report.contains("mountPropagaton"), "{report}");

    // The DaemonSet grants what the systemd unit grants.
    let unit = std::fs::read_to_string(packaging("systemd/stalewatch.service"))?;
    let ambient: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants ambient capabilities")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(daemonset_caps(), ambient);
    Ok(())
}
