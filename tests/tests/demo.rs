//! The demos a newcomer runs first play to their end: `cargo xtask demo`
//! (one host) and `cargo xtask demo --nodes` (two nodes) each exit 0
//! having shown the alert, applied the fix it printed and seen the alert
//! resolve. Root only, like the demos.

use std::process::Command;

fn demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stalewatch-demo"))
        .args(args)
        .output()
        .expect("stalewatch-demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stalewatch-demo {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// How many lines of `text` contain `word`.
fn count(text: &str, word: &str) -> usize {
    text.lines().filter(|l| l.contains(word)).count()
}

#[test]
fn the_built_in_demo_raises_fixes_and_resolves() {
    let out = demo(&[]);
    assert_eq!(count(&out, "STALE FLOW"), 1, "{out}");
    assert!(
        out.contains("Applying the fix stalewatch printed: ip netns exec"),
        "{out}"
    );
    assert_eq!(count(&out, "RESOLVED"), 1, "{out}");
    assert!(out.contains("Done: every namespace"), "{out}");
}

#[test]
fn the_two_node_demo_raises_on_a_reports_on_b_and_resolves_both() {
    let out = demo(&["--nodes"]);
    let stale = out
        .lines()
        .find(|l| l.contains("STALE FLOW"))
        .unwrap_or_else(|| panic!("no alert on A: {out}"));
    assert!(stale.contains("nodeA"), "{stale}");
    assert!(
        out.contains("verdict    stale: the current nftables rules DNAT"),
        "{out}"
    );
    let dead = out
        .lines()
        .find(|l| l.contains("DEAD DESTINATION"))
        .unwrap_or_else(|| panic!("no record on B: {out}"));
    assert!(dead.contains("nodeB"), "{dead}");
    assert_eq!(count(&out, "RESOLVED"), 2, "{out}");
    assert!(out.contains("Done: every namespace"), "{out}");
}
