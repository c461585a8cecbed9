//! `watch` stops cleanly on SIGINT and SIGTERM, also when it inherited
//! SIGINT ignored: a shell without job control (a script, a CI step, an
//! init script) starts its background jobs that way.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use stalewatch_tests::watcher::binary;

/// Whether `signal` is in the SigIgn mask of `pid`.
fn ignores(pid: i32, signal: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .expect("SigIgn");
    mask & (1 << (signal as i32 - 1)) != 0
}

/// Starts `watch` as a background job of `sh -c` and stops it with
/// `signal`: it detaches and exits 0, and the shell's `wait` returns.
fn stops_on(signal: Signal) {
    let script = format!(
        "trap '' INT; '{}' watch --audit-every 0s & echo $!; wait $!; echo \"exit $?\"",
        binary().display()
    );
    let mut shell = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut out = BufReader::new(shell.stdout.take().expect("stdout"));
    let mut err = BufReader::new(shell.stderr.take().expect("stderr"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the PID");
    let pid: i32 = line.trim().parse().expect("a PID");
    line.clear();
    err.read_line(&mut line).expect("stderr");
    assert!(line.contains("attached"), "{line}");
    assert!(
        !ignores(pid, Signal::SIGINT),
        "stalewatch handles SIGINT though it inherited it ignored"
    );
    let sent = Instant::now();
    kill(Pid::from_raw(pid), signal).expect("kill");
    let mut rest = String::new();
    out.read_line(&mut rest).expect("the exit line");
    let took = sent.elapsed();
    let status = shell.wait().expect("sh");
    line.clear();
    err.read_line(&mut line).expect("stderr");
    assert_eq!(rest.trim(), "exit 0", "{signal}: {line}");
    assert!(line.contains("detached"), "{line}");
    assert!(status.success());
    assert!(took < Duration::from_secs(5), "{signal} took {took:?}");
}

#[test]
fn sigint_stops_a_background_watch_that_inherited_it_ignored() {
    // The shell does hand SIGINT ignored to its background jobs.
    let out = Command::new("sh")
        .args(["-c", "trap '' INT; sleep 10 & echo $!"])
        .output()
        .expect("sh");
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a PID");
    let inherited = ignores(pid, Signal::SIGINT);
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill our sleep");
    assert!(inherited, "sleep inherited SIGINT ignored");
    stops_on(Signal::SIGINT);
}

#[test]
fn sigterm_stops_a_background_watch() {
    stops_on(Signal::SIGTERM);
}
