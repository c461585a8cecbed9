//! End to end, issue #14: every command stalewatch prints for a person is
//! safe to paste. In a namespace whose name holds spaces, quotes and a
//! command substitution, `check` finds a stale entry; its printed fix, run
//! through a shell, deletes exactly that entry and runs nothing else.

use std::{net::UdpSocket, process::Command};

use serde_json::Value;
use stalewatch::{
    domain::{Entry, Proto},
    source::conntrack::{Filter, dump},
};
use stalewatch_tests::{netns::Netns, watcher::binary};

fn entries(ns: &Netns) -> Vec<Entry> {
    let filter = Filter {
        proto: Some(Proto::UDP),
        ..Filter::default()
    };
    dump(Some(&ns.path()), &filter).expect("the namespace's table")
}

/// One datagram from `sport` to 127.0.0.1:9999 inside `ns`.
fn send(ns: &Netns, sport: u16) {
    ns.within(move || {
        let socket = UdpSocket::bind(("127.0.0.1", sport))?;
        socket.send_to(b"x", "127.0.0.1:9999")?;
        Ok(())
    })
    .expect("a datagram");
}

#[test]
fn a_printed_fix_deletes_exactly_its_entry_in_a_namespace_with_any_name() {
    // The harness adds its prefix; the role carries the metacharacters.
    let ns = Netns::new("q a;b$(touch pwned)'c`id`").expect("namespace");
    assert!(
        ns.name.contains(' ') && ns.name.contains('$'),
        "{}",
        ns.name
    );
    let rules = |to: &str| {
        format!(
            "table ip swq {{\n chain out {{\n type nat hook output priority -100;\n \
             udp dport 9999 dnat to {to}:9999\n }}\n}}\n"
        )
    };
    ns.exec_input(&["nft", "-f", "-"], &rules("127.0.0.2"))
        .expect("rules");
    send(&ns, 41000);
    send(&ns, 41001);
    // The service moves: both entries still send to .2, which no rule
    // names any more.
    ns.exec(&["nft", "delete", "table", "ip", "swq"])
        .expect("old rules");
    ns.exec_input(&["nft", "-f", "-"], &rules("127.0.0.3"))
        .expect("new rules");
    send(&ns, 41002);
    let before = entries(&ns);
    assert_eq!(before.len(), 3, "{before:?}");

    let out = Command::new(binary())
        .args(["check", "--format", "json", "--netns", &ns.name])
        .output()
        .expect("check");
    let found: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let stale = found
        .iter()
        .find(|v| v["orig"]["sport"] == 41000)
        .unwrap_or_else(|| panic!("the stale entry is found: {found:?}"));
    let fix = stale["fix"].as_str().expect("a fix");

    // Run as a person would paste it, in a directory of its own.
    let dir = std::env::temp_dir().join(format!("swq-quoting-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let run = Command::new("sh")
        .args(["-c", fix])
        .current_dir(&dir)
        .output()
        .expect("sh");
    let ran = std::fs::read_dir(&dir).expect("the directory").count();
    std::fs::remove_dir_all(&dir).ok();
    assert!(run.status.success(), "{fix}: {run:?}");
    assert_eq!(ran, 0, "the fix ran nothing else: {fix}");
    let after = entries(&ns);
    assert!(
        !after.iter().any(|e| e.orig.sport == 41000),
        "{fix} deletes its entry: {after:?}"
    );
    assert_eq!(after.len(), 2, "and no other: {after:?}");
}
