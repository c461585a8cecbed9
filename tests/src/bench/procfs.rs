//! Counters the bench reads: interfaces of its namespaces, and the CPU time
//! and memory of the processes it measures. All from /proc, no helper
//! processes in the measured windows.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{Read as _, Seek as _, SeekFrom},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

/// Packet counters of one interface.
#[derive(Clone, Copy, Debug, Default)]
pub struct Link {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
}

/// A namespace's /proc/net/dev, opened from inside it: a seq file keeps the
/// namespace it was opened in, so re-reading it later from any thread
/// costs one read, not an `ip` process.
pub struct NetDev {
    file: File,
    ns: String,
}

impl NetDev {
    pub fn open(ns: &Netns) -> anyhow::Result<NetDev> {
        let file = ns.within(|| File::open("/proc/thread-self/net/dev"))?;
        Ok(NetDev {
            file,
            ns: ns.name.clone(),
        })
    }

    pub fn link(&mut self, dev: &str) -> anyhow::Result<Link> {
        let mut text = String::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_string(&mut text)?;
        for line in text.lines().skip(2) {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            if name.trim() != dev {
                continue;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            if v.len() < 16 {
                bail!("unexpected /proc/net/dev line: {line}");
            }
            return Ok(Link {
                rx_packets: v[1],
                rx_dropped: v[3],
                tx_packets: v[9],
            });
        }
        bail!("no interface {dev} in {}", self.ns)
    }
}

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ).
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU time a process used, two ways.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    pub at: Instant,
    /// utime + stime from /proc/<pid>/stat, seconds (10 ms resolution).
    pub stat_s: f64,
    /// Sum over threads of /proc/<pid>/task/*/schedstat run time, seconds
    /// (nanosecond resolution).
    pub sched_s: f64,
}

impl CpuSample {
    pub fn take(pid: u32) -> anyhow::Result<CpuSample> {
        let at = Instant::now();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("process {pid} is gone"))?;
        // Fields after the command name, which may contain spaces.
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15; `after` starts at field 3.
        let ticks: f64 = f
            .get(11..13)
            .context("short /proc/<pid>/stat")?
            .iter()
            .map(|v| v.parse::<f64>().unwrap_or(0.0))
            .sum();
        let mut sched_ns = 0u64;
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                if let Ok(s) = fs::read_to_string(task.path().join("schedstat")) {
                    sched_ns += s
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
        Ok(CpuSample {
            at,
            stat_s: ticks / ticks_per_sec(),
            sched_s: sched_ns as f64 / 1e9,
        })
    }

    /// CPU use between two samples, in % of one core: (schedstat, stat).
    pub fn percent_since(&self, earlier: &CpuSample) -> (f64, f64) {
        let wall = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        (
            100.0 * (self.sched_s - earlier.sched_s) / wall,
            100.0 * (self.stat_s - earlier.stat_s) / wall,
        )
    }
}

/// CPU time of a process and of the children it waited for, seconds:
/// utime + stime + cutime + cstime from /proc/<pid>/stat (10 ms
/// resolution). A child still running counts once it is reaped.
pub fn cpu_with_children_s(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14-17; `after` starts at field 3.
    let ticks: f64 = f
        .get(11..15)
        .context("short /proc/<pid>/stat")?
        .iter()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .sum();
    Ok(ticks / ticks_per_sec())
}

/// Resident memory of a process, KiB: (VmRSS, VmHWM).
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Anonymous resident memory of a process, KiB (`RssAnon`): the heap and
/// stacks, without the pages of the binary and libraries it ran, which
/// grow as more of its code runs but not with what it holds.
pub fn anon_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Ids of the BPF programs (`prog_id`) or maps (`map_id`) a process holds,
/// from its fds' fdinfo: exact, whatever else runs on the machine.
pub fn bpf_ids(pid: u32, key: &str) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    let prefix = format!("{key}:");
    for fd in fds.flatten() {
        if let Ok(info) = fs::read_to_string(fd.path()) {
            for line in info.lines() {
                if let Some(v) = line.strip_prefix(&prefix)
                    && let Ok(id) = v.trim().parse()
                {
                    ids.insert(id);
                }
            }
        }
    }
    ids
}
