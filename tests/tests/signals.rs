//! `watch` stops cleanly on SIGINT and SIGTERM, also when it inherited
//! SIGINT ignored: a shell without job control (a script, a CI step, an
//! init script) starts its background jobs that way.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
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

/// The lines of a pipe, read on a thread of their own, so that a test
/// waits for each at most a while instead of hanging.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Ends what the test started, by PID, when it fails midway.
struct Cleanup {
    pids: Vec<i32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

const LIMIT: Duration = Duration::from_secs(20);

fn next(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(LIMIT)
        .unwrap_or_else(|e| panic!("no {what} within {LIMIT:?}: {e}"))
}

/// Starts `watch` as a background job of `sh -c` and stops it with
/// `signal`: it detaches and exits 0, and the shell's `wait` returns.
/// Every wait is bounded.
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
    let mut cleanup = Cleanup {
        pids: vec![shell.id() as i32],
    };
    let out = lines_of(shell.stdout.take().expect("stdout"));
    let err = lines_of(shell.stderr.take().expect("stderr"));
    let pid: i32 = next(&out, "PID").trim().parse().expect("a PID");
    cleanup.pids.push(pid);
    // Lines before it say what start-up found (an engine without names).
    while !next(&err, "stderr line").contains("attached") {}
    assert!(
        !ignores(pid, Signal::SIGINT),
        "stalewatch handles SIGINT though it inherited it ignored"
    );
    let sent = Instant::now();
    kill(Pid::from_raw(pid), signal).expect("kill");
    let rest = next(&out, "exit line");
    let took = sent.elapsed();
    let status = stalewatch_tests::poll(LIMIT, || shell.try_wait().ok().flatten())
        .unwrap_or_else(|| panic!("the shell did not end within {LIMIT:?}"));
    let line = next(&err, "stderr line");
    assert_eq!(rest.trim(), "exit 0", "{signal}: {line}");
    assert!(line.contains("detached"), "{line}");
    assert!(status.success());
    assert!(took < Duration::from_secs(5), "{signal} took {took:?}");
    cleanup.pids.clear();
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
