//! The Prometheus alerting rules that ship in packaging/prometheus/ are
//! valid, and fire (and resolve) as their unit tests say, with the labels
//! stalewatch's metrics carry (tests/tests/metrics.rs checks those on a
//! live scrape). promtool comes with Debian's prometheus package, which
//! `cargo xtask setup` installs.

use std::{path::PathBuf, process::Command};

fn packaging() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus")
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(packaging())
        .output()
        .expect("promtool (cargo xtask setup installs Debian's prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_rules_are_valid() {
    let (ok, out) = promtool(&["check", "rules", "stalewatch-rules.yml"]);
    assert!(ok, "{out}");
    assert!(out.contains("4 rules found"), "{out}");
}

#[test]
fn the_rules_fire_and_resolve_as_their_tests_say() {
    let (ok, out) = promtool(&["test", "rules", "stalewatch-rules.test.yml"]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}
