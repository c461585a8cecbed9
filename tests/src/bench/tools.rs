//! The tools under test, run as a user runs them: `stalewatch watch`, and
//! the bpftrace one-liner a user would write instead. Plus the kernel's own
//! BPF run statistics for the programs each of them loaded.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read},
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use nix::{
    libc,
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::Deserialize;
use stalewatch_common::stat;

use super::procfs;

/// The two tracepoints stalewatch hooks, counted the way a user would.
pub const BPFTRACE_SCRIPT: &str = "tracepoint:skb:kfree_skb { @drop[args->reason] = count(); } \
     tracepoint:icmp:icmp_send { @icmp[args->type, args->code] = count(); }";

/// The hidden argument that makes the bench hold the empty program.
pub const HOLD_EMPTY_PROGRAM: &str = "--hold-empty-program";

/// Empty programs on the same tracepoints: what measuring a run costs by
/// itself (the floor under every ns-per-run figure on this machine).
pub const FLOOR_SCRIPT: &str = "tracepoint:skb:kfree_skb { } tracepoint:icmp:icmp_send { }";

/// stalewatch: `STALEWATCH_BIN`, or next to this executable.
pub fn stalewatch_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("STALEWATCH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let candidate = exe.with_file_name("stalewatch");
    if !candidate.is_file() {
        bail!(
            "no stalewatch binary next to {} (build it, or set STALEWATCH_BIN)",
            exe.display()
        );
    }
    Ok(candidate)
}

pub fn bpftrace_available() -> bool {
    Command::new("bpftrace")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running tool with its output collected.
pub struct Tool {
    pub name: &'static str,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout_lines: Arc<AtomicU64>,
}

/// What a tool left behind when stopped.
pub struct Stopped {
    pub status: ExitStatus,
    /// Still running 5 s after SIGINT, so killed.
    pub killed: bool,
    /// From SIGINT to its exit.
    pub exit_secs: f64,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// Reads a pipe to its end. With `keep` false (a soak), only lines about
/// lost events are kept, so hours of alerts do not pile up in memory.
fn collect(
    pipe: impl Read + Send + 'static,
    sink: Arc<Mutex<Vec<String>>>,
    lines: Arc<AtomicU64>,
    keep: bool,
) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.fetch_add(1, Ordering::Relaxed);
            if keep || line.contains("events_lost") {
                sink.lock().expect("lock").push(line);
            }
        }
    });
}

impl Tool {
    fn spawn(name: &'static str, cmd: &mut Command, keep: bool) -> anyhow::Result<Tool> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout_lines = Arc::new(AtomicU64::new(0));
        let stderr_lines = Arc::new(AtomicU64::new(0));
        collect(
            child.stdout.take().context("stdout")?,
            stdout.clone(),
            stdout_lines.clone(),
            keep,
        );
        collect(
            child.stderr.take().context("stderr")?,
            stderr.clone(),
            stderr_lines,
            true,
        );
        Ok(Tool {
            name,
            child,
            stdout,
            stderr,
            stdout_lines,
        })
    }

    /// `stalewatch watch --format json --netns ROUTER --max-flows N`, ready
    /// once it says it is attached. `keep`: keep every line it prints.
    pub fn stalewatch(
        bin: &Path,
        router: &str,
        max_flows: u32,
        keep: bool,
    ) -> anyhow::Result<Tool> {
        Tool::stalewatch_with(bin, router, max_flows, keep, None)
    }

    /// The same with `RUST_LOG` set to `log` (figure 4 counts the info
    /// lines of its intent readings).
    pub fn stalewatch_with(
        bin: &Path,
        router: &str,
        max_flows: u32,
        keep: bool,
        log: Option<&str>,
    ) -> anyhow::Result<Tool> {
        Tool::stalewatch_args(bin, router, max_flows, keep, log, &[])
    }

    /// The same with more arguments after the others.
    pub fn stalewatch_args(
        bin: &Path,
        router: &str,
        max_flows: u32,
        keep: bool,
        log: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Tool> {
        let mut cmd = Command::new(bin);
        cmd.args([
            "watch",
            "--format",
            "json",
            "--netns",
            router,
            "--max-flows",
            &max_flows.to_string(),
        ]);
        cmd.args(extra);
        if let Some(log) = log {
            cmd.env("RUST_LOG", log);
        }
        let mut tool = Tool::spawn("stalewatch", &mut cmd, keep)?;
        tool.wait_ready(|t| t.stderr_text().contains("attached"))?;
        Ok(tool)
    }

    /// Its stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("lock").clone()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// This bench again, holding an empty program of the kind stalewatch
    /// attaches (a BTF tracepoint program) on `skb:kfree_skb` until SIGINT.
    pub fn empty_program() -> anyhow::Result<Tool> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut tool = Tool::spawn(
            "empty program",
            Command::new(exe).arg(HOLD_EMPTY_PROGRAM),
            true,
        )?;
        tool.wait_ready(|t| t.stderr_text().contains("attached"))?;
        Ok(tool)
    }

    /// The bpftrace script counting both tracepoints. Classic tracepoints
    /// need tracefs: when the host has it unmounted, bpftrace runs in a
    /// private mount namespace with tracefs mounted there, so the host's
    /// mounts never change and nothing is left to unmount.
    pub fn bpftrace(script: &str) -> anyhow::Result<Tool> {
        let programs = script.matches("tracepoint:").count();
        let mut cmd = if Path::new("/sys/kernel/tracing/events").is_dir() {
            let mut c = Command::new("bpftrace");
            c.args(["-e", script]);
            c
        } else {
            let mut c = Command::new("unshare");
            // `exec`s keep one pid from unshare to bpftrace.
            c.args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                "mount -t tracefs nodev /sys/kernel/tracing && exec bpftrace -e \"$0\"",
                script,
            ]);
            c
        };
        let mut tool = Tool::spawn("bpftrace", &mut cmd, true)?;
        // Its "Attaching 2 probes..." may sit in a pipe buffer: ready is
        // when every program is loaded, plus a margin for the attach.
        tool.wait_ready(|t| procfs::bpf_ids(t.pid(), "prog_id").len() >= programs)?;
        super::sleep(Duration::from_millis(500))?;
        Ok(tool)
    }

    fn wait_ready(&mut self, ready: impl Fn(&Tool) -> bool) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if ready(self) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited {status} before it was ready: {}",
                    self.name,
                    one_line(&self.stderr_text())
                );
            }
            super::sleep(Duration::from_millis(20))?;
        }
        bail!("{} was not ready within 30 s", self.name)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lock").join("\n")
    }

    /// Lines printed on stdout so far, kept or not.
    pub fn stdout_lines(&self) -> u64 {
        self.stdout_lines.load(Ordering::Relaxed)
    }

    /// The kept stdout lines so far.
    pub fn stdout_kept(&self) -> Vec<String> {
        self.stdout.lock().expect("lock").clone()
    }

    /// SIGINT, as a user stops it; SIGKILL after 5 s.
    pub fn stop(mut self) -> anyhow::Result<Stopped> {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGINT);
        let signalled = Instant::now();
        let until = signalled + Duration::from_secs(5);
        let mut killed = false;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > until {
                let _ = kill(pid, Signal::SIGKILL);
                killed = true;
                break self.child.wait()?;
            }
            thread::sleep(Duration::from_millis(10));
        };
        let exit_secs = signalled.elapsed().as_secs_f64();
        // The readers end with the pipes; give them a moment to drain.
        thread::sleep(Duration::from_millis(100));
        Ok(Stopped {
            status,
            killed,
            exit_secs,
            stdout: std::mem::take(&mut *self.stdout.lock().expect("lock")),
            stderr: std::mem::take(&mut *self.stderr.lock().expect("lock")),
        })
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        // Only our own child, by PID.
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The kernel's BPF run statistics, on while this lives. `BPF_ENABLE_STATS`
/// hands out an fd that keeps them on until it is closed, also if the bench
/// dies: the `kernel.bpf_stats_enabled` sysctl is not touched at all. Only
/// on a kernel without it does the sysctl get set, and restored on drop.
pub enum BpfStats {
    Fd(#[allow(dead_code)] OwnedFd),
    Sysctl { previous: String },
}

const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> anyhow::Result<BpfStats> {
        // union bpf_attr { struct { __u32 type; } enable_stats; ... }
        let attr: [u32; 2] = [BPF_STATS_RUN_TIME, 0];
        // SAFETY: bpf(2) reads `size` bytes of attr, which live across the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr) as u32,
            )
        };
        if fd >= 0 {
            // SAFETY: a new fd the kernel just gave us.
            return Ok(BpfStats::Fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }));
        }
        let previous = std::fs::read_to_string(STATS_SYSCTL)
            .context("reading kernel.bpf_stats_enabled")?
            .trim()
            .to_owned();
        std::fs::write(STATS_SYSCTL, "1").context("setting kernel.bpf_stats_enabled=1")?;
        Ok(BpfStats::Sysctl { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let BpfStats::Sysctl { previous } = self {
            let _ = std::fs::write(STATS_SYSCTL, previous.as_bytes());
        }
    }
}

/// One program's counters from `bpftool prog show -j`.
#[derive(Clone, Debug, Default)]
pub struct ProgStat {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

fn bpftool_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut full = vec!["bpftool"];
    full.extend_from_slice(args);
    full.push("-j");
    let out = crate::run(&full)?;
    serde_json::from_str(&out).context("bpftool output")
}

pub fn prog_stats(ids: &BTreeSet<u32>) -> anyhow::Result<BTreeMap<u32, ProgStat>> {
    let all = bpftool_json(&["prog", "show"])?;
    let mut found = BTreeMap::new();
    for p in all.as_array().into_iter().flatten() {
        let Some(id) = p["id"].as_u64().map(|v| v as u32) else {
            continue;
        };
        if ids.contains(&id) {
            found.insert(
                id,
                ProgStat {
                    name: p["name"].as_str().unwrap_or("?").to_owned(),
                    // bpftool leaves both out while they are zero.
                    run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                    run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                },
            );
        }
    }
    Ok(found)
}

/// Runs and mean nanoseconds per run of one program over a window.
#[derive(Clone, Debug)]
pub struct ProgCost {
    pub name: String,
    pub runs: u64,
    pub ns_per_run: f64,
}

/// Turns the kernel's run statistics on for `window`, while the load runs,
/// and returns each program's cost over it (programs of process `pid`).
pub fn prog_cost(pid: u32, window: Duration) -> anyhow::Result<Vec<ProgCost>> {
    let ids = procfs::bpf_ids(pid, "prog_id");
    if ids.is_empty() {
        bail!("process {pid} holds no BPF programs");
    }
    let stats = BpfStats::enable()?;
    let before = prog_stats(&ids)?;
    let slept = super::sleep(window);
    let after = prog_stats(&ids);
    drop(stats);
    slept?;
    let after = after?;
    Ok(after
        .iter()
        .map(|(id, a)| {
            let b = before.get(id).cloned().unwrap_or_default();
            let runs = a.run_cnt.saturating_sub(b.run_cnt);
            let ns = a.run_time_ns.saturating_sub(b.run_time_ns);
            ProgCost {
                name: a.name.clone(),
                runs,
                ns_per_run: if runs > 0 {
                    ns as f64 / runs as f64
                } else {
                    f64::NAN
                },
            }
        })
        .collect())
}

/// bpftool's descriptions of the maps process `pid` holds.
fn maps_of(pid: u32) -> anyhow::Result<Vec<serde_json::Value>> {
    let ids = procfs::bpf_ids(pid, "map_id");
    let all = bpftool_json(&["map", "show"])?;
    Ok(all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            m["id"]
                .as_u64()
                .is_some_and(|id| ids.contains(&(id as u32)))
        })
        .cloned()
        .collect())
}

/// Kernel memory of the maps a process holds: (name, max_entries, bytes).
pub fn map_memory(pid: u32) -> anyhow::Result<Vec<(String, u64, u64)>> {
    Ok(maps_of(pid)?
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("?").to_owned(),
                m["max_entries"].as_u64().unwrap_or(0),
                m["bytes_memlock"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// Counters of stalewatch's in-kernel `STATS` map, summed over CPUs, read
/// with bpftool: they hold whatever its userspace manages to do.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelStats {
    pub events_lost: u64,
    pub failures: u64,
    pub events_sent: u64,
    pub wakeups: u64,
}

/// A little-endian number from bpftool's `["0x01", "0x00", ...]`.
fn hex_bytes(v: &serde_json::Value) -> u64 {
    v.as_array()
        .into_iter()
        .flatten()
        .rev()
        .filter_map(|b| u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .fold(0, |acc, b| (acc << 8) | b)
}

pub fn kernel_stats(pid: u32) -> anyhow::Result<KernelStats> {
    let id = maps_of(pid)?
        .iter()
        .find(|m| m["name"] == "STATS")
        .and_then(|m| m["id"].as_u64())
        .context("stalewatch holds no STATS map")?;
    let dump = bpftool_json(&["map", "dump", "id", &id.to_string()])?;
    let mut stats = KernelStats::default();
    for entry in dump.as_array().into_iter().flatten() {
        let sum: u64 = entry["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| hex_bytes(&v["value"]))
            .sum();
        match hex_bytes(&entry["key"]) as u32 {
            stat::EVENTS_LOST => stats.events_lost = sum,
            stat::FAILURES => stats.failures = sum,
            stat::EVENTS_SENT => stats.events_sent = sum,
            stat::WAKEUPS => stats.wakeups = sum,
            _ => {}
        }
    }
    Ok(stats)
}

#[derive(Deserialize)]
struct Line {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    time: String,
    failures: Option<Failures>,
    #[serde(default)]
    count: u64,
}

#[derive(Deserialize)]
struct Failures {
    first: String,
    last: String,
}

/// What stalewatch printed during a run.
#[derive(Clone, Debug, Default)]
pub struct Alerts {
    pub raised: u64,
    pub other: u64,
    /// Seconds from the kernel's first failure of a flow to its alert.
    pub first_to_alert: Vec<f64>,
    /// Seconds from the kernel report that tipped a flow over the
    /// threshold (its `failures.last`) to the alert: the pipeline alone.
    pub report_to_alert: Vec<f64>,
    /// Sum of `events_lost` records' counts.
    pub lost_records: u64,
    pub not_json: u64,
}

fn seconds_between(from: &str, to: &str) -> Option<f64> {
    let a: SystemTime = humantime::parse_rfc3339(from).ok()?;
    let b: SystemTime = humantime::parse_rfc3339(to).ok()?;
    Some(match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    })
}

pub fn parse_alerts(lines: &[String]) -> Alerts {
    let mut a = Alerts::default();
    for line in lines {
        let Ok(rec) = serde_json::from_str::<Line>(line) else {
            a.not_json += 1;
            continue;
        };
        match (rec.kind.as_str(), rec.state.as_str()) {
            ("stale_flow", "raised") => {
                a.raised += 1;
                if let Some(f) = &rec.failures {
                    a.first_to_alert
                        .extend(seconds_between(&f.first, &rec.time));
                    a.report_to_alert
                        .extend(seconds_between(&f.last, &rec.time));
                }
            }
            ("events_lost", _) => a.lost_records += rec.count,
            _ => a.other += 1,
        }
    }
    a
}

/// stalewatch's exit summary: (kernel reports, lost).
pub fn parse_summary(stderr: &[String]) -> Option<(u64, u64)> {
    let line = stderr.iter().rev().find(|l| l.contains("detached;"))?;
    let number_before = |word: &str| -> Option<u64> {
        let at = line.find(word)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    Some((number_before(" kernel reports")?, number_before(" lost")?))
}

/// bpftrace's printed maps, summed: (key, count) per line like `@drop[12]: 345`.
pub fn parse_bpftrace_maps(stdout: &[String]) -> Vec<(String, u64)> {
    stdout
        .iter()
        .filter_map(|l| {
            let (key, count) = l.rsplit_once(": ")?;
            key.starts_with('@')
                .then(|| Some((key.to_owned(), count.trim().parse().ok()?)))?
        })
        .collect()
}
