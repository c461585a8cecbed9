//! Measurement: a load's runs without a tool and with each tool, taken
//! alternately, and what one run collects.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::{
    flood::{Flood, Sink},
    loads::{CountAt, Load},
    procfs::{self, CpuSample, NetDev},
    tools::{self, Alerts, ProgCost, Tool},
    topo::{self, Topology},
};

/// The settings a run uses, defaults resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub runs: u32,
    pub stale_runs: u32,
    pub warmup: Duration,
    pub window: Duration,
    pub stale_window: Duration,
    pub steady_window: Duration,
    pub cost_window: Duration,
    pub flows: u32,
    pub rate: u64,
    pub cpu_flows: u32,
    pub bpftrace: bool,
    /// Figure 4a: services of the ruleset, seconds measured after the
    /// first reading, runs (each without and with rewrites).
    pub services: u32,
    pub rules_window: Duration,
    pub rules_runs: u32,
    /// Figure 4b: DNATed entries in the router's table, runs.
    pub audit_entries: u32,
    pub audit_runs: u32,
}

/// The topology and the counters, alive for the whole bench. Fields drop in
/// order: the sink and the counter files before the namespaces.
pub struct Ctx {
    pub sink: Sink,
    pub router_dev: NetDev,
    pub dest_dev: NetDev,
    pub topo: Topology,
    pub bin: PathBuf,
    pub s: Settings,
}

impl Ctx {
    pub fn new(bin: PathBuf, s: Settings) -> anyhow::Result<Ctx> {
        let topo = Topology::build()?;
        Ok(Ctx {
            sink: Sink::start(&topo.dest, (topo::DEST, topo::HEALTHY_PORT).into())?,
            router_dev: NetDev::open(&topo.router)?,
            dest_dev: NetDev::open(&topo.dest)?,
            topo,
            bin,
            s,
        })
    }
}

/// What runs next to the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Under {
    Without,
    Stalewatch,
    Bpftrace,
    /// Empty bpftrace programs on the same tracepoints: the floor.
    Floor,
    /// An empty program of stalewatch's kind on kfree_skb.
    Empty,
}

impl Under {
    pub fn name(self) -> &'static str {
        match self {
            Under::Without => "without",
            Under::Stalewatch => "stalewatch",
            Under::Bpftrace => "bpftrace",
            Under::Floor => "empty programs",
            Under::Empty => "empty BTF tracepoint program",
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub pps: f64,
    pub dest_pps: f64,
    pub sink_pps: f64,
    pub cpu_sched: f64,
    pub cpu_stat: f64,
    /// The tool's CPU over the steady window (schedstat), if measured.
    pub cpu_steady: f64,
    pub rss_kib: f64,
    pub hwm_kib: f64,
    pub idle_rss_kib: f64,
    /// RssAnon at the end and at the start.
    pub anon_kib: f64,
    pub idle_anon_kib: f64,
    pub cost: Vec<ProgCost>,
    pub alerts: Option<Alerts>,
    pub reports: Option<u64>,
    pub lost: Option<u64>,
    pub bpftrace_maps: Vec<(String, u64)>,
    pub flows_map_bytes: Option<u64>,
    /// stalewatch's in-kernel counters: over the window (`kernel_secs`
    /// long), and at its end.
    pub kernel_window: Option<tools::KernelStats>,
    pub kernel_secs: f64,
    pub kernel_total: Option<tools::KernelStats>,
    pub idle_hwm_kib: f64,
    pub window_secs: f64,
    /// CPU time of the sending thread per counted packet, ns: the whole
    /// path's cost, softirq included; and how much of a core it got.
    pub ns_per_packet: f64,
    /// The same over the steady window.
    pub ns_per_packet_steady: f64,
    pub sender_share: f64,
    /// From SIGINT to the tool's exit; killed when still running at 5 s.
    pub exit_secs: f64,
    pub killed: bool,
    /// How it failed on its way out, if it did.
    pub exit_failure: Option<String>,
}

impl RunResult {
    pub fn ns(&self, prog: &str) -> f64 {
        self.cost
            .iter()
            .find(|c| c.name == prog)
            .map_or(f64::NAN, |c| c.ns_per_run)
    }
}

/// One run of `load` with `under` next to it.
fn measure(ctx: &mut Ctx, load: &Load, under: Under) -> anyhow::Result<RunResult> {
    let s = ctx.s.clone();
    let tool = match under {
        Under::Without => None,
        Under::Stalewatch => Some(Tool::stalewatch(
            &ctx.bin,
            &ctx.topo.router.name,
            load.max_flows,
            true,
        )?),
        Under::Bpftrace => Some(Tool::bpftrace(tools::BPFTRACE_SCRIPT)?),
        Under::Floor => Some(Tool::bpftrace(tools::FLOOR_SCRIPT)?),
        Under::Empty => Some(Tool::empty_program()?),
    };
    let pid = tool.as_ref().map(Tool::pid);
    let mut r = RunResult::default();
    if let Some(pid) = pid {
        let (rss, hwm) = procfs::memory_kib(pid)?;
        (r.idle_rss_kib, r.idle_hwm_kib) = (rss as f64, hwm as f64);
        r.idle_anon_kib = procfs::anon_kib(pid)? as f64;
    }
    let cost_window = if load.cost && pid.is_some() {
        s.cost_window
    } else {
        Duration::ZERO
    };
    let limit = s.warmup + load.window + load.steady + cost_window + Duration::from_secs(3);
    let mut spec = load.spec.clone();
    spec.limit = limit;
    // A count bound no run reaches unless something is wrong with time.
    spec.max_packets = spec.rate.unwrap_or(5_000_000) * (limit.as_secs() + 1) * 2;
    let mut flood = Flood::start(&ctx.topo.sender, spec)?;
    super::sleep(s.warmup)?;

    let read = |ctx: &mut Ctx| -> anyhow::Result<(u64, u64, u64, Instant)> {
        let router = ctx.router_dev.link(topo::ROUTER_IN)?.rx_packets;
        let dest = ctx.dest_dev.link(topo::DEST_IN)?.rx_packets;
        Ok((router, dest, ctx.sink.received(), Instant::now()))
    };
    // The packets the load counts, where it counts them.
    let counted = |p: &(u64, u64, u64, Instant)| match load.count_at {
        CountAt::Destination => p.1,
        CountAt::Router => p.0,
    };
    let kernel = |pid: Option<u32>| -> anyhow::Result<Option<tools::KernelStats>> {
        match pid {
            Some(pid) if under == Under::Stalewatch => Ok(Some(tools::kernel_stats(pid)?)),
            _ => Ok(None),
        }
    };
    let k0 = (kernel(pid)?, Instant::now());
    let sender0 = flood.cpu_ns();
    let a = read(ctx)?;
    let cpu0 = pid.map(CpuSample::take).transpose()?;
    super::sleep(load.window)?;
    let b = read(ctx)?;
    let sender1 = flood.cpu_ns();
    let cpu1 = pid.map(CpuSample::take).transpose()?;
    let k1 = (kernel(pid)?, Instant::now());
    r.kernel_secs = k1.1.duration_since(k0.1).as_secs_f64();
    if let (Some(k0), Some(k1)) = (k0.0, k1.0) {
        r.kernel_window = Some(tools::KernelStats {
            events_lost: k1.events_lost - k0.events_lost,
            failures: k1.failures - k0.failures,
            events_sent: k1.events_sent - k0.events_sent,
            wakeups: k1.wakeups - k0.wakeups,
        });
        r.kernel_total = Some(k1);
    }
    if flood.finished() {
        flood.stop()?;
        bail!("the flood stopped before the window ended");
    }
    let secs = b.3.duration_since(a.3).as_secs_f64();
    r.window_secs = secs;
    let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
    r.dest_pps = rate(a.1, b.1);
    r.sink_pps = rate(a.2, b.2);
    r.pps = rate(counted(&a), counted(&b));
    if let (Some(c0), Some(c1)) = (sender0, sender1) {
        let cpu = c1.saturating_sub(c0) as f64;
        r.sender_share = 100.0 * cpu / 1e9 / secs;
        r.ns_per_packet = if r.pps > 0.0 {
            cpu / (r.pps * secs)
        } else {
            f64::NAN
        };
    }
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        (r.cpu_sched, r.cpu_stat) = c1.percent_since(&c0);
    }
    r.cpu_steady = f64::NAN;
    r.ns_per_packet_steady = f64::NAN;
    if !load.steady.is_zero() {
        // The same path's cost once every flow is raised: what leaving the
        // tool running through a flood costs, with or without a tool.
        let c0 = pid.map(CpuSample::take).transpose()?;
        let (a, sender0) = (read(ctx)?, flood.cpu_ns());
        super::sleep(load.steady)?;
        let (b, sender1) = (read(ctx)?, flood.cpu_ns());
        if let Some((pid, c0)) = pid.zip(c0) {
            (r.cpu_steady, _) = CpuSample::take(pid)?.percent_since(&c0);
        }
        if let (Some(c0), Some(c1)) = (sender0, sender1) {
            let packets = counted(&b).saturating_sub(counted(&a)) as f64;
            if packets > 0.0 {
                r.ns_per_packet_steady = c1.saturating_sub(c0) as f64 / packets;
            }
        }
    }
    if let Some(pid) = pid {
        let (rss, hwm) = procfs::memory_kib(pid)?;
        (r.rss_kib, r.hwm_kib) = (rss as f64, hwm as f64);
        r.anon_kib = procfs::anon_kib(pid)? as f64;
        if cost_window > Duration::ZERO {
            r.cost = tools::prog_cost(pid, cost_window)?;
        }
        if under == Under::Stalewatch {
            r.flows_map_bytes = tools::map_memory(pid)?
                .into_iter()
                .find(|(name, _, _)| name == "FLOWS")
                .map(|(_, _, bytes)| bytes);
        }
    }
    flood.stop()?;
    if let Some(tool) = tool {
        let stopped = tool.stop()?;
        r.exit_secs = stopped.exit_secs;
        r.killed = stopped.killed;
        // A tool that is still busy 5 s after SIGINT, or that fails on its
        // way out, is a finding to report with the figures it gave while
        // it ran, not a reason to stop the bench.
        if !stopped.killed && !stopped.status.success() {
            let why = stopped
                .stderr
                .iter()
                .find(|l| l.contains("panicked at") || l.contains("error"))
                .or(stopped.stderr.last())
                .cloned()
                .unwrap_or_default();
            r.exit_failure = Some(format!("{} ({})", stopped.status, why.trim()));
        }
        match under {
            Under::Stalewatch => {
                r.alerts = Some(tools::parse_alerts(&stopped.stdout));
                if let Some((reports, lost)) = tools::parse_summary(&stopped.stderr) {
                    r.reports = Some(reports);
                    r.lost = Some(lost);
                }
            }
            Under::Bpftrace => r.bpftrace_maps = tools::parse_bpftrace_maps(&stopped.stdout),
            Under::Without | Under::Floor | Under::Empty => {}
        }
    }
    Ok(r)
}

/// Runs of one load: without, stalewatch, bpftrace; `runs` times.
#[derive(Default)]
pub struct Series {
    pub without: Vec<RunResult>,
    pub stalewatch: Vec<RunResult>,
    pub bpftrace: Vec<RunResult>,
    pub floor: Vec<RunResult>,
    pub empty: Vec<RunResult>,
}

impl Series {
    pub fn of(&self, under: Under) -> &[RunResult] {
        match under {
            Under::Without => &self.without,
            Under::Stalewatch => &self.stalewatch,
            Under::Bpftrace => &self.bpftrace,
            Under::Floor => &self.floor,
            Under::Empty => &self.empty,
        }
    }

    pub fn values(&self, under: Under, f: impl Fn(&RunResult) -> f64) -> Vec<f64> {
        self.of(under).iter().map(f).collect()
    }
}

/// `load.runs` rounds of a run under each of what `load` and the settings
/// ask for, alternately, so that slow drift hits every column alike.
pub fn series(ctx: &mut Ctx, load: &Load) -> anyhow::Result<Series> {
    let mut out = Series::default();
    let mut unders = vec![Under::Without, Under::Stalewatch];
    if load.empty {
        unders.push(Under::Empty);
    }
    if ctx.s.bpftrace {
        unders.push(Under::Bpftrace);
        if load.floor {
            unders.push(Under::Floor);
        }
    }
    for i in 1..=load.runs {
        for &under in &unders {
            eprintln!(
                "stalewatch-bench: {} run {i}/{}: {}",
                load.key,
                load.runs,
                under.name()
            );
            let r = measure(ctx, load, under)?;
            match under {
                Under::Without => out.without.push(r),
                Under::Stalewatch => out.stalewatch.push(r),
                Under::Bpftrace => out.bpftrace.push(r),
                Under::Floor => out.floor.push(r),
                Under::Empty => out.empty.push(r),
            }
        }
    }
    Ok(out)
}
