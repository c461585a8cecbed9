//! Bad input gets one clear line on stderr, a non-zero exit, and leaves
//! nothing attached to the kernel.

use std::{
    io::Write as _,
    process::{Command, Output},
};

use stalewatch_tests::{run, watcher::binary};

/// eBPF programs named like ours that are loaded right now.
fn our_programs() -> usize {
    let out = run(&["bpftool", "prog", "show"]).expect("bpftool prog show");
    out.lines()
        .filter(|l| l.contains("name icmp_send") || l.contains("name kfree_skb"))
        .count()
}

fn stalewatch(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run stalewatch")
}

/// Runs stalewatch expecting failure; returns its one line of stderr.
fn fails_with_one_line(cmd: &mut Command) -> String {
    let before = our_programs();
    let out = cmd.output().expect("run stalewatch");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "exit status; stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("stalewatch: "), "{stderr}");
    assert_eq!(our_programs(), before, "nothing left attached");
    stderr
}

fn watch(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.arg("watch").args(args);
    cmd
}

#[test]
fn bad_flags() {
    let e = fails_with_one_line(&mut watch(&["--format", "xml"]));
    assert!(e.contains("'xml'") && e.contains("text, json"), "{e}");
    let e = fails_with_one_line(&mut watch(&["--min-failures", "0"]));
    assert!(e.contains("--min-failures"), "{e}");
    let e = fails_with_one_line(&mut watch(&["--resolve-after", "soon"]));
    assert!(e.contains("--resolve-after"), "{e}");
    let e = fails_with_one_line(&mut watch(&["--grace", "1 fortnight"]));
    assert!(e.contains("--grace"), "{e}");
    let e = fails_with_one_line(&mut watch(&["--frobnicate"]));
    assert!(e.contains("--frobnicate"), "{e}");
    let e = fails_with_one_line(&mut Command::new(binary()));
    assert!(e.contains("stalewatch watch"), "{e}");
}

#[test]
fn help_and_version_succeed() {
    let out = stalewatch(&["watch", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--netns"));
    assert!(stalewatch(&["--version"]).status.success());
}

#[test]
fn netns_that_does_not_exist() {
    let e = fails_with_one_line(&mut watch(&["--netns", "sw-no-such-namespace"]));
    assert!(
        e.contains("network namespace 'sw-no-such-namespace' not found"),
        "{e}"
    );
}

#[test]
fn missing_btf() {
    let e = fails_with_one_line(&mut watch(&["--btf", "/nonexistent/vmlinux"]));
    assert!(
        e.contains("kernel BTF not found at /nonexistent/vmlinux"),
        "{e}"
    );
}

#[test]
fn missing_tracepoint() {
    // A valid BTF blob that describes no types at all: the first thing
    // stalewatch looks for in it is its tracepoints.
    let mut file = tempfile();
    let header: [u8; 25] = [
        0x9f, 0xeb, 1, 0, // magic, version 1, flags
        24, 0, 0, 0, // header length
        0, 0, 0, 0, 0, 0, 0, 0, // types: offset 0, length 0
        0, 0, 0, 0, 1, 0, 0, 0, // strings: offset 0, length 1
        0, // the empty string
    ];
    file.1.write_all(&header).expect("write BTF");
    let e = fails_with_one_line(&mut watch(&["--btf", &file.0]));
    assert!(e.contains("tracepoint icmp:icmp_send is missing"), "{e}");
    let _ = std::fs::remove_file(&file.0);
}

#[test]
fn not_root() {
    // setpriv from util-linux: run as nobody, without capabilities.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(binary())
    .arg("watch");
    let e = fails_with_one_line(&mut cmd);
    assert!(e.contains("run stalewatch as root"), "{e}");
}

fn tempfile() -> (String, std::fs::File) {
    let path = format!("/tmp/{}-empty-{}.btf", stalewatch_tests::prefix(), line!());
    let file = std::fs::File::create(&path).expect("create temp file");
    (path, file)
}
