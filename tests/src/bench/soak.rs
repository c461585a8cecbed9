//! `--soak`: instead of the figures, one long stale flood, stalewatch's
//! memory and CPU sampled as it runs.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{
    flood::{Flood, Spec},
    loads,
    measure::Ctx,
    procfs::{self, CpuSample},
    table,
    tools::{self, Tool},
    topo,
};

/// `--soak`: steady stale flows for minutes; stalewatch's memory and CPU
/// sampled every 10 s, to show they stay flat.
pub fn soak(ctx: &mut Ctx, minutes: f64) -> anyhow::Result<()> {
    if !(0.1..=24.0 * 60.0).contains(&minutes) {
        bail!("--soak is 0.1 to 1440 minutes");
    }
    let s = ctx.s.clone();
    let total = Duration::from_secs_f64(minutes * 60.0);
    let max_flows = loads::max_flows(s.flows);
    println!(
        "soak: {} flows at {} failing pps for {minutes} min; stalewatch watch --netns {} --max-flows {max_flows}",
        s.flows, s.rate, ctx.topo.router.name,
    );
    let tool = Tool::stalewatch(&ctx.bin, &ctx.topo.router.name, max_flows, false)?;
    let pid = tool.pid();
    let limit = total + Duration::from_secs(5);
    let mut flood = Flood::start(
        &ctx.topo.sender,
        Spec {
            limit,
            max_packets: s.rate * (limit.as_secs() + 1),
            ..loads::stale_spec(s.flows, s.rate)
        },
    )
    .context("starting the flood")?;
    // Lost reports come from the kernel's own counters: a stalewatch that
    // falls behind may print its events_lost records late or never.
    println!(
        "{:>7}  {:>10}  {:>10}  {:>9}  {:>9}  {:>12}  {:>12}  {:>12}",
        "time", "VmRSS", "VmHWM", "CPU", "fail pps", "reports/s", "lost/s", "stdout lines"
    );
    println!("         (and kernel ns per run of each program over the last 2 s of each sample)");
    let started = Instant::now();
    let mut cpu = CpuSample::take(pid)?;
    let mut rx = ctx.router_dev.link(topo::ROUTER_IN)?.rx_packets;
    let mut kernel = tools::kernel_stats(pid)?;
    let mut rss_samples = Vec::new();
    while started.elapsed() < total {
        let left = Duration::from_secs(10).min(total.saturating_sub(started.elapsed()));
        let cost_window = Duration::from_secs(2).min(left / 2);
        super::sleep(left - cost_window)?;
        // The run statistics cost two clock reads per run: on only for the
        // end of each sample, and the CPU figure includes that window.
        let cost = tools::prog_cost(pid, cost_window)?;
        let now = CpuSample::take(pid)?;
        let (pct, _) = now.percent_since(&cpu);
        let wall = now.at.duration_since(cpu.at).as_secs_f64();
        let rx_now = ctx.router_dev.link(topo::ROUTER_IN)?.rx_packets;
        let (rss, hwm) = procfs::memory_kib(pid)?;
        let kernel_now = tools::kernel_stats(pid)?;
        let per_sec = |f: fn(&tools::KernelStats) -> u64| {
            format!(
                "{:.0}",
                f(&kernel_now).saturating_sub(f(&kernel)) as f64 / wall
            )
        };
        println!(
            "{:>6.0}s  {:>10}  {:>10}  {:>9}  {:>9}  {:>12}  {:>12}  {:>12}",
            started.elapsed().as_secs_f64(),
            table::mib(rss as f64 * 1024.0),
            table::mib(hwm as f64 * 1024.0),
            table::percent(pct),
            table::pps((rx_now - rx) as f64 / wall),
            per_sec(|k| k.events_sent),
            per_sec(|k| k.events_lost),
            tool.stdout_lines(),
        );
        let costs: Vec<String> = cost
            .iter()
            .map(|c| format!("{} {:.0} ns x {}", c.name, c.ns_per_run, c.runs))
            .collect();
        println!("{:>7}  {}", "", costs.join(", "));
        rss_samples.push(rss);
        (cpu, rx, kernel) = (now, rx_now, kernel_now);
        if flood.finished() {
            break;
        }
    }
    flood.stop()?;
    let stopped = tool.stop()?;
    if let (Some(first), Some(last)) = (rss_samples.first(), rss_samples.last()) {
        println!(
            "soak: VmRSS {} at the first sample, {} at the last; exit: {}",
            table::mib(*first as f64 * 1024.0),
            table::mib(*last as f64 * 1024.0),
            if stopped.killed {
                "still busy 5 s after SIGINT, killed"
            } else {
                stopped.stderr.last().map_or("", String::as_str)
            }
        );
    }
    Ok(())
}
