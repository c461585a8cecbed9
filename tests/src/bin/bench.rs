//! `cargo xtask bench`: what stalewatch costs a forwarding host, next to
//! what a bpftrace one-liner on the same tracepoints costs.
//!
//! A benchmark, not a test: it prints figures and never fails on timing.
//! Every figure comes from runs taken alternately in one invocation
//! (without, with stalewatch, with bpftrace; N times) and is reported as the
//! median, with the median of the per-pair ratios. Everything runs in
//! network namespaces named `swb<pid>-*`, removed at the end, also on
//! Ctrl-C.

use std::{
    process::ExitCode,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use nix::sys::signal::{SigHandler, Signal, signal};
use stalewatch_tests::{
    bench::{
        self,
        details::{cost_details, detail, load_details, stale_details},
        flood::{Flood, Spec},
        loads::{self, Load},
        measure::{Ctx, Settings, Under, series},
        procfs::{self, CpuSample},
        render::{cpu_row, empty_rows, header, load_average, ratio_row, stale_rows, value_row},
        synthetic,
        table::{self, Report, Row, median},
        tools::{self, Tool},
        topo,
    },
    run,
};

/// Heap counting for the synthetic correlator figure.
#[global_allocator]
static ALLOC: synthetic::Counting = synthetic::Counting;

/// Real distinct flows the bench may create: the conntrack table is shared
/// by the whole machine (262,144 entries here), so stay well below it.
const MAX_REAL_FLOWS: u32 = 60_000;
/// The conntrack table's size on the project's machines: the flow count the
/// memory figure is given for.
const CONNTRACK_MAX: u32 = 262_144;

#[derive(Parser, Debug)]
#[command(
    name = "stalewatch-bench",
    about = "Measures what stalewatch costs a forwarding host, next to a bpftrace one-liner (root)"
)]
struct Args {
    /// Runs of figures 1-2 (figure 1 takes twice as many); each is
    /// without, with stalewatch, with bpftrace [default: 5; 1 with --quick]
    #[arg(long)]
    runs: Option<u32>,
    /// Runs of figure 3 (longer each) [default: 3; 1 with --quick]
    #[arg(long)]
    stale_runs: Option<u32>,
    /// A short run: one run per figure, short windows, 5,000 stale flows
    #[arg(long)]
    quick: bool,
    /// Seconds measured per forwarding run, figures 1-2 [default: 1.5; 1 with --quick]
    #[arg(long)]
    window: Option<f64>,
    /// Seconds measured per stale-flood run, figure 3 [default: 3; 2.5 with --quick]
    #[arg(long)]
    stale_window: Option<f64>,
    /// Seconds of figure 3's steady window, after the flows are raised:
    /// long enough to hold stalewatch's periodic work, the audit every 10 s
    /// and a full refresh of the raised flows [default: 12; 2.5 with --quick]
    #[arg(long)]
    steady_window: Option<f64>,
    /// Distinct failing flows of the many-flows load, at most 60,000
    /// [default: 50,000; 5,000 with --quick; 10,000 for --soak]
    #[arg(long)]
    flows: Option<u32>,
    /// Failing packets per second of the stale floods [default: 100,000;
    /// 20,000 for --soak]
    #[arg(long)]
    rate: Option<u64>,
    /// Flows of the CPU load, figure 3a
    #[arg(long, default_value_t = 1_000)]
    cpu_flows: u32,
    /// Leave out the bpftrace column
    #[arg(long)]
    no_bpftrace: bool,
    /// Only these figures, comma-separated (3b includes 3c) [default: all]
    #[arg(long, value_enum, value_delimiter = ',')]
    figures: Vec<Figure>,
    /// Instead of the figures: steady stale flows for this many minutes,
    /// sampling stalewatch's memory and CPU every 10 s
    #[arg(long, value_name = "MINUTES")]
    soak: Option<f64>,
}

/// The figures, as `--figures` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Figure {
    #[value(name = "1")]
    Healthy,
    #[value(name = "2")]
    Unrelated,
    #[value(name = "3a")]
    FewStale,
    #[value(name = "3b")]
    ManyStale,
}

fn settings(a: &Args, bpftrace: bool) -> anyhow::Result<Settings> {
    let secs = |v: Option<f64>, normal: f64, quick: f64| -> anyhow::Result<Duration> {
        let s = v.unwrap_or(if a.quick { quick } else { normal });
        if !(0.2..=600.0).contains(&s) {
            bail!("windows are 0.2 to 600 seconds, not {s}");
        }
        Ok(Duration::from_secs_f64(s))
    };
    let s = Settings {
        runs: a.runs.unwrap_or(if a.quick { 1 } else { 5 }),
        stale_runs: a.stale_runs.unwrap_or(if a.quick { 1 } else { 3 }),
        warmup: Duration::from_millis(250),
        window: secs(a.window, 1.5, 1.0)?,
        stale_window: secs(a.stale_window, 3.0, 2.5)?,
        steady_window: secs(a.steady_window, 12.0, 2.5)?,
        cost_window: if a.quick {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(1)
        },
        flows: a.flows.unwrap_or(match (a.soak, a.quick) {
            (Some(_), _) => 10_000,
            (None, true) => 5_000,
            (None, false) => 50_000,
        }),
        rate: a
            .rate
            .unwrap_or(if a.soak.is_some() { 20_000 } else { 100_000 }),
        cpu_flows: a.cpu_flows,
        bpftrace,
    };
    for (what, n) in [("--runs", s.runs), ("--stale-runs", s.stale_runs)] {
        if n == 0 || n > 100 {
            bail!("{what} is 1 to 100, not {n}");
        }
    }
    for (what, n) in [("--flows", s.flows), ("--cpu-flows", s.cpu_flows)] {
        if n == 0 || n > MAX_REAL_FLOWS {
            bail!(
                "{what} is 1 to {MAX_REAL_FLOWS}: the conntrack table is shared by the whole machine"
            );
        }
    }
    if !(1_000..=2_000_000).contains(&s.rate) {
        bail!("--rate is 1,000 to 2,000,000 packets per second");
    }
    Ok(s)
}

extern "C" fn on_signal(_: nix::libc::c_int) {
    bench::INTERRUPTED.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(tools::HOLD_EMPTY_PROGRAM) {
        return hold_empty_program();
    }
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "stalewatch-bench: must run as root (it builds network namespaces and loads eBPF)"
        );
        return ExitCode::from(2);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let _ = signal(Signal::SIGINT, SigHandler::Handler(on_signal));
        let _ = signal(Signal::SIGTERM, SigHandler::Handler(on_signal));
    }
    match main_inner(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}").replace('\n', " ");
            eprintln!("stalewatch-bench: {text}");
            if bench::interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The empty program's process (see `Tool::empty_program`): attached until
/// SIGINT or SIGTERM.
fn hold_empty_program() -> ExitCode {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let _ = signal(Signal::SIGINT, SigHandler::Handler(on_signal));
        let _ = signal(Signal::SIGTERM, SigHandler::Handler(on_signal));
    }
    let btf = std::path::Path::new(stalewatch::kernel::DEFAULT_BTF);
    match stalewatch::kernel::attach_empty_kfree_skb(btf) {
        Ok(program) => {
            eprintln!("empty program attached to kfree_skb");
            while !bench::interrupted() {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(program);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stalewatch-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main_inner(args: &Args) -> anyhow::Result<()> {
    let bin = tools::stalewatch_binary()?;
    for tool in ["ip", "iptables", "conntrack", "bpftool"] {
        if run(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            bail!("`{tool}` not found (cargo xtask setup installs it)");
        }
    }
    let bpftrace = !args.no_bpftrace && tools::bpftrace_available();
    let s = settings(args, bpftrace)?;
    let started = Instant::now();
    eprintln!(
        "stalewatch-bench: building the topology ({})",
        bench::prefix()
    );
    let mut ctx = Ctx::new(bin, s.clone())?;
    if let Some(minutes) = args.soak {
        return soak(&mut ctx, minutes);
    }
    let mut report = Report::default();
    header(&mut report, &ctx)?;
    if args.no_bpftrace {
        report
            .notes
            .push("bpftrace: left out (--no-bpftrace)".to_owned());
    } else if !bpftrace {
        report.notes.push(
            "bpftrace: not installed (apt-get install bpftrace, or run `cargo xtask bench`)"
                .to_owned(),
        );
    }
    figures(&mut ctx, &mut report, &args.figures)?;
    drop(ctx);
    report.notes.push(format!(
        "total time {:.0} s; 1-minute load average at the end: {}; every namespace the bench created is removed",
        started.elapsed().as_secs_f64(),
        load_average()
    ));
    println!("{}", report.render());
    Ok(())
}

/// The figures `--figures` names, in order, and the notes that explain them.
fn figures(ctx: &mut Ctx, report: &mut Report, only: &[Figure]) -> anyhow::Result<()> {
    let want = |f: Figure| only.is_empty() || only.contains(&f);
    if want(Figure::Healthy) {
        figure_1(ctx, report)?;
    }
    if want(Figure::Unrelated) {
        figure_2(ctx, report)?;
    }
    if want(Figure::FewStale) {
        figure_3a(ctx, report)?;
    }
    if want(Figure::ManyStale) {
        figure_3bc(ctx, report)?;
    }
    notes(report);
    Ok(())
}

fn figure_1(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
    let load = Load::healthy(&ctx.s);
    let one = series(ctx, &load)?;
    report.sections.push((
        format!("1  healthy path: {} flows DNATed to the destination's sink, nothing dropped, sender at full speed", load.spec.flows),
        vec![
            ratio_row("forwarded packets per second", &one, |r| r.pps, Some(0.995)),
            cpu_row("  CPU per forwarded packet (capacity ratio)", &one, Some(0.995)),
        ],
    ));
    load_details(report, "1", "forwarded", &one);
    let delivered: Vec<f64> = one
        .without
        .iter()
        .chain(&one.stalewatch)
        .chain(&one.bpftrace)
        .map(|r| {
            if r.dest_pps > 0.0 {
                100.0 * r.sink_pps / r.dest_pps
            } else {
                f64::NAN
            }
        })
        .collect();
    detail(
        report,
        "1",
        "share of arrivals the sink read (rest: socket buffer drops)",
        &delivered,
        table::percent,
    );

    Ok(())
}

fn figure_2(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.s.clone();
    // 2. Every packet dropped: the cost to traffic stalewatch is not about.
    let (two_a, two_b) = (Load::dropped(&s), Load::ttl_expired(&s));
    for (load, title, early) in [
        (
            &two_a,
            "2a every packet dropped by a FORWARD rule: NETFILTER_DROP is a failure reason, the entry is not DNATed (kfree_skb reads the conntrack entry, then exits)",
            false,
        ),
        (
            &two_b,
            "2b every packet dropped at forwarding for TTL 1: IP_INHDR is not a failure reason, ICMP type 11 is not unreachable (both exit on the tracepoint's arguments)",
            true,
        ),
    ] {
        let series = series(ctx, load)?;
        let mut rows = vec![
            ratio_row("dropped packets per second", &series, |r| r.pps, Some(0.97)),
            cpu_row(
                "  CPU per dropped packet (capacity ratio)",
                &series,
                Some(0.97),
            ),
        ];
        rows.push(value_row(
            "  kfree_skb: ns per program run (kernel stats)",
            &series,
            |r| r.ns("kfree_skb"),
            table::ns,
            None,
            s.bpftrace,
        ));
        rows.extend(empty_rows(&series));
        if early {
            rows.push(value_row(
                "  icmp_send: ns per run (few runs: ICMP is rate-limited before the tracepoint)",
                &series,
                |r| r.ns("icmp_send"),
                table::ns,
                None,
                s.bpftrace,
            ));
        }
        if !series.floor.is_empty() {
            // The kernel's run statistics cost two clock reads per run
            // themselves: an empty program shows that floor, and the
            // early exit's own cost is what lies above it.
            let floor = |prog: &'static str| median(&series.values(Under::Floor, |r| r.ns(prog)));
            let (kfree, icmp) = (floor("kfree_skb"), floor("icmp_send"));
            let show = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), table::ns);
            rows.push(Row {
                figure: "  floor: empty programs there (bpftrace '{ }'), kfree_skb / icmp_send ns per run".to_owned(),
                bpftrace: format!("{} / {}", show(kfree), show(icmp)),
                bpftrace_ratio: table::ratio(
                    &series.values(Under::Without, |r| r.pps),
                    &series.values(Under::Floor, |r| r.pps),
                ),
                ..Row::default()
            });
            let net = |under: Under, floor: Option<f64>| {
                median(&series.values(under, |r| r.ns("kfree_skb")))
                    .zip(floor)
                    .map(|(v, f)| v - f)
            };
            // Each tool against an empty program of its own kind: BTF
            // tracepoint programs for stalewatch, bpftrace's for bpftrace.
            let empty = median(&series.values(Under::Empty, |r| r.ns("empty_kfree_skb")));
            let with = net(Under::Stalewatch, empty.or(kfree));
            // Below the floor is noise: the early exit costs no more than an
            // empty program.
            let above = |v: Option<f64>| match v {
                Some(v) if v <= 0.0 => format!("0 (measured {v:.1} ns)"),
                v => show(v),
            };
            rows.push(Row {
                figure:
                    "  kfree_skb early exit above an empty program of the same kind, ns per run"
                        .to_owned(),
                with: above(with),
                target: "<= 30 ns".to_owned(),
                met: with.map(|v| v <= 30.0),
                bpftrace: above(net(Under::Bpftrace, kfree)),
                ..Row::default()
            });
        }
        report.sections.push((title.to_owned(), rows));
        load_details(report, load.key, "dropped", &series);
        let reached = series.values(Under::Without, |r| r.dest_pps);
        detail(
            report,
            load.key,
            "pps still reaching the destination (expected 0)",
            &reached,
            table::pps,
        );
        cost_details(report, load.key, &series);
    }

    Ok(())
}

fn figure_3a(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.s.clone();

    // 3. Stale floods: every packet fails, DNATed to an address nobody has.
    let three_a = Load::stale("3a", s.cpu_flows, true, &s);
    let a = series(ctx, &three_a)?;
    report.sections.push((
        format!(
            "3a stale flood: {} flows at {} failing pps, DNATed to {} on a bridge without ports (ARP fails: NEIGH_QUEUEFULL / NEIGH_FAILED, ICMP host unreachable)",
            s.cpu_flows,
            s.rate,
            topo::STALE_BACKEND
        ),
        stale_rows(&a, &s, true, s.cpu_flows),
    ));
    stale_details(report, "3a", &a);

    Ok(())
}

/// 3b, and 3c extrapolated from it.
fn figure_3bc(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.s.clone();
    let three_b = Load::stale("3b", s.flows, false, &s);
    let b = series(ctx, &three_b)?;
    let conntrack = ctx.topo.router_conntrack_count().unwrap_or(0);
    let mut rows = stale_rows(&b, &s, false, s.flows);
    rows.push(value_row(
        "  kernel FLOWS map (bytes_memlock)",
        &b,
        |r| r.flows_map_bytes.map_or(f64::NAN, |v| v as f64),
        table::mib,
        None,
        false,
    ));
    report.sections.push((
        format!(
            "3b stale flood: {} distinct flows at {} failing pps (router's conntrack entries at the end: {conntrack})",
            s.flows, s.rate
        ),
        rows,
    ));
    stale_details(report, "3b", &b);

    // 3c. Memory at the conntrack table's size, which the bench must not
    // fill: extrapolated from 3b, and the correlator measured in process.
    eprintln!("stalewatch-bench: 3c memory at {CONNTRACK_MAX} flows");
    let idle = median(&b.values(Under::Stalewatch, |r| r.idle_rss_kib)).unwrap_or(f64::NAN);
    let loaded = median(&b.values(Under::Stalewatch, |r| r.rss_kib)).unwrap_or(f64::NAN);
    let per_flow = (loaded - idle) / f64::from(s.flows);
    let extrapolated = idle + per_flow * f64::from(CONNTRACK_MAX);
    let big = {
        let tool = Tool::stalewatch(&ctx.bin, &ctx.topo.router.name, CONNTRACK_MAX, true)?;
        let maps = tools::map_memory(tool.pid())?;
        let _ = tool.stop()?;
        maps.into_iter()
            .find(|(name, _, _)| name == "FLOWS")
            .map_or(f64::NAN, |(_, _, bytes)| bytes as f64)
    };
    let plain = |figure: String, value: String| Row {
        figure,
        with: value,
        ..Row::default()
    };
    let mut rows = vec![
        plain(
            "stalewatch VmRSS, extrapolated linearly from 3b (measured)".to_owned(),
            table::mib(extrapolated * 1024.0),
        ),
        plain(
            format!(
                "  per flow, from 3b: (VmRSS at the end - at start) / {}",
                s.flows
            ),
            format!("{:.0} B", per_flow * 1024.0),
        ),
    ];
    let budget = if s.runs == 1 {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    for flows in [s.flows, CONNTRACK_MAX] {
        let c = synthetic::correlator(flows as usize, budget);
        let how = if c.raised < c.flows {
            format!(
                "synthetic; extrapolated from {} raised in {} s",
                c.raised,
                budget.as_secs()
            )
        } else {
            "synthetic, in process".to_owned()
        };
        rows.push(plain(
            format!("correlator heap, {flows} flows raised ({how})"),
            table::mib(c.raised_bytes),
        ));
        rows.push(plain(
            format!("  correlator time per report at {flows} flows: first / raising"),
            format!(
                "{} / {}",
                table::ns(c.ns_per_track),
                table::ns(c.ns_per_raise)
            ),
        ));
        report.details.push(format!(
            "3c correlator at {flows} flows: heap {} tracked, {} raised ({}); {:.0} ns per first report, {:.0} ns per raising report",
            table::mib(c.tracked_bytes as f64),
            table::mib(c.raised_bytes),
            how,
            c.ns_per_track,
            c.ns_per_raise
        ));
        bench::sleep(Duration::ZERO)?;
    }
    rows.push(plain(
        format!("kernel FLOWS map at --max-flows {CONNTRACK_MAX} (bytes_memlock, measured)"),
        table::mib(big),
    ));
    report.sections.push((
        format!("3c memory at {CONNTRACK_MAX} distinct failing flows (the conntrack table's size; not created for real, see notes)"),
        rows,
    ));
    Ok(())
}

fn notes(report: &mut Report) {
    report.notes.extend(
        [
            "how: a raw socket in the sender namespace sends UDP with sendmmsg (64 a batch) from 8 source addresses x consecutive ports;",
            "     forwarded pps = the destination interface's rx counter; dropped/failing pps = the router's ingress rx counter (all of them drop);",
            "     veth hands packets over inline, so the sender's thread does the router's and the destination's softirq work too, on one CPU;",
            "     the tools run on the other one.",
            "ratio: median with / median without (the per-run values also give the median of per-run ratios, run by run against the",
            "     run without a tool just before it, which cancels slow drift on a shared machine).",
            "CPU per packet: the sending thread's CPU time (/proc/self/task/<tid>/schedstat; softirq work included, as this kernel has no",
            "     IRQ_TIME_ACCOUNTING) per counted packet. Its ratio (without / with) is the capacity ratio: it holds when other work",
            "     on the machine takes the CPU away from the sender, which packets per second do not.",
            "ns per run: run_time_ns / run_cnt from `bpftool prog show -j` for the programs the tool's process holds (found by its fds),",
            "     over a separate window right after the throughput window, load still on; stats enabled with BPF_ENABLE_STATS (an fd,",
            "     released at once), so kernel.bpf_stats_enabled is never changed and the throughput windows run without stats.",
            "     The statistics cost two clock reads per run themselves: the floor row is an empty program on the same tracepoints.",
            "CPU: % of one core from /proc/<pid>/task/*/schedstat over the window (/proc/<pid>/stat utime+stime in the per-run values).",
            "latency: per raised flow, alert `time` - `failures.first` (first failure the kernel saw -> alert), and alert `time` - `failures.last`",
            "     (the kernel report that crossed --min-failures -> alert: stalewatch's own pipeline); both are CLOCK_MONOTONIC in the JSON.",
            "reports sent/lost: stalewatch's own in-kernel STATS map, read with bpftool (a stalewatch that falls behind cannot print them).",
            "3c: the bench never creates more than 60,000 real flows (the conntrack table is shared); the 262,144-flow memory is the 3b",
            "     figure extrapolated, and stalewatch's own Correlator fed synthetic reports in this process (heap by a counting allocator).",
        ]
        .map(String::from),
    );
}

/// `--soak`: steady stale flows for minutes; stalewatch's memory and CPU
/// sampled every 10 s, to show they stay flat.
fn soak(ctx: &mut Ctx, minutes: f64) -> anyhow::Result<()> {
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
        bench::sleep(left - cost_window)?;
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
