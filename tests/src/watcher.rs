//! The real stalewatch binary, run as a user would run it, with its JSON
//! lines collected for assertions.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::poll;
use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

/// Path of the binary under test: `STALEWATCH_BIN`, or the release build.
pub fn binary() -> PathBuf {
    std::env::var_os("STALEWATCH_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/stalewatch"
            ))
        },
        PathBuf::from,
    )
}

pub struct Watcher {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Watcher {
    /// Starts `stalewatch watch --format json ARGS` and waits until it says
    /// it is attached.
    /// With `STALEWATCH_ECHO=1` in the environment, what it prints is
    /// echoed (run the tests with `--nocapture` to see the alerts).
    pub fn start(args: &[&str]) -> anyhow::Result<Watcher> {
        let echo = std::env::var_os("STALEWATCH_ECHO").is_some_and(|v| v == "1");
        Watcher::start_with("json", args, echo)
    }

    /// Starts `stalewatch watch --format FORMAT ARGS`, echoing what it
    /// prints when `echo` (for the demo).
    pub fn start_with(format: &str, args: &[&str], echo: bool) -> anyhow::Result<Watcher> {
        let mut cmd = Command::new(binary());
        cmd.args(["watch", "--format", format]).args(args);
        Watcher::start_command(cmd, echo)
    }

    /// Starts a command that runs stalewatch watch in the foreground (in a
    /// container, say) and waits until it says it is attached.
    pub fn start_command(mut cmd: Command, echo: bool) -> anyhow::Result<Watcher> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        let sink = lines.clone();
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if echo {
                    println!("{line}");
                }
                sink.lock().expect("lock").push(line);
            }
        });
        let err = BufReader::new(child.stderr.take().context("stderr")?);
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                eprintln!("  [stalewatch] {line}");
                sink.lock().expect("lock").push(line);
            }
        });
        let mut watcher = Watcher {
            child,
            lines,
            stderr,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if watcher.stderr_text().contains("attached") {
                return Ok(watcher);
            }
            if let Some(status) = watcher.child.try_wait()? {
                bail!("stalewatch exited {status}: {}", watcher.stderr_text());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "stalewatch did not attach within 30 s: {}",
            watcher.stderr_text()
        )
    }

    /// The process id of the command started (stalewatch itself when the
    /// command execs it, as setpriv does).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lock").join("\n")
    }

    /// Every line printed on stdout so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    /// Every line printed so far, as JSON. A line that is not JSON breaks
    /// the contract: it shows as a `not_json` record for the assertions.
    pub fn records(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .map(|line| {
                serde_json::from_str(&line).unwrap_or_else(
                    |e| serde_json::json!({"type": "not_json", "line": line, "error": e.to_string()}),
                )
            })
            .collect()
    }

    /// Waits for a record that satisfies `pred`.
    pub fn wait_for(&self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        poll(limit, || self.records().into_iter().find(&pred))
    }

    /// Waits for a stdout line that satisfies `pred` (text format).
    pub fn wait_line(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        poll(limit, || self.lines().into_iter().find(|l| pred(l)))
    }

    /// The first line on stderr within `limit` for which `pred` holds.
    pub fn wait_stderr(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        poll(limit, || {
            let lines = self.stderr.lock().expect("lock");
            lines.iter().find(|l| pred(l)).cloned()
        })
    }

    /// Sends SIGINT and waits for the exit; returns the status and how long
    /// the exit took.
    pub fn stop(mut self) -> anyhow::Result<(ExitStatus, Duration)> {
        let started = Instant::now();
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT)?;
        let until = started + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if Instant::now() > until {
                bail!("stalewatch did not exit within 10 s of SIGINT");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Only our own child, by PID.
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Whether `v` is a stale_flow record in `state` for the flow from `sport`.
pub fn is_stale_flow(v: &Value, state: &str, sport: u16) -> bool {
    v["type"] == "stale_flow" && v["state"] == state && v["orig"]["sport"] == sport
}
