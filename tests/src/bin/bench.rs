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

use anyhow::bail;
use clap::Parser;
use nix::sys::signal::{SigHandler, Signal, signal};
use stalewatch_tests::{
    bench::{
        self,
        figures::{figure_1, figure_2, figure_3a, figure_3bc, figure_4a, figure_4b, notes},
        intent,
        measure::{Ctx, Settings},
        render::{header, load_average},
        soak::soak,
        synthetic,
        table::Report,
        tools,
    },
    run,
};

/// Heap counting for the synthetic correlator figure.
#[global_allocator]
static ALLOC: synthetic::Counting = synthetic::Counting;

/// Real distinct flows the bench may create: the conntrack table is shared
/// by the whole machine (262,144 entries here), so stay well below it.
const MAX_REAL_FLOWS: u32 = 60_000;

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
    /// Services of figure 4a's kube-proxy-style nftables ruleset, at most
    /// 65,536 [default: 5,000; 500 with --quick]
    #[arg(long)]
    services: Option<u32>,
    /// Seconds of figure 4a measured after stalewatch's first reading of
    /// the intent [default: 60; 30 with --quick]
    #[arg(long)]
    rules_window: Option<f64>,
    /// Runs of figure 4a, each without and with rewrites [default: 1]
    #[arg(long, default_value_t = 1)]
    rules_runs: u32,
    /// DNATed conntrack entries of figure 4b, at most 60,000
    /// [default: 50,000; 5,000 with --quick]
    #[arg(long)]
    audit_entries: Option<u32>,
    /// Leave out the bpftrace column
    #[arg(long)]
    no_bpftrace: bool,
    /// Only these figures, comma-separated: 1, 2, 3a, 3b (with 3c), 4a,
    /// 4b, or 4 (4a and 4b) [default: all]
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
    /// 4a and 4b.
    #[value(name = "4")]
    Intent,
    #[value(name = "4a")]
    Rules,
    #[value(name = "4b")]
    Audit,
}

/// The settings the flags ask for, defaults resolved and checked.
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
        services: a.services.unwrap_or(if a.quick { 500 } else { 5_000 }),
        rules_window: secs(a.rules_window, 60.0, 30.0)?,
        rules_runs: a.rules_runs,
        audit_entries: a
            .audit_entries
            .unwrap_or(if a.quick { 5_000 } else { 50_000 }),
        audit_runs: if a.quick { 3 } else { 5 },
    };
    for (what, n) in [
        ("--runs", s.runs),
        ("--stale-runs", s.stale_runs),
        ("--rules-runs", s.rules_runs),
    ] {
        if n == 0 || n > 100 {
            bail!("{what} is 1 to 100, not {n}");
        }
    }
    if s.services == 0 || s.services > intent::MAX_SERVICES {
        bail!("--services is 1 to {}", intent::MAX_SERVICES);
    }
    for (what, n) in [
        ("--flows", s.flows),
        ("--cpu-flows", s.cpu_flows),
        ("--audit-entries", s.audit_entries),
    ] {
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

/// Ctrl-C and SIGTERM set [`bench::INTERRUPTED`], so the guards clean up.
fn catch_signals() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let _ = signal(Signal::SIGINT, SigHandler::Handler(on_signal));
        let _ = signal(Signal::SIGTERM, SigHandler::Handler(on_signal));
    }
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
    catch_signals();
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
    catch_signals();
    let btf = std::path::Path::new(stalewatch::source::kernel::DEFAULT_BTF);
    match stalewatch::source::kernel::attach_empty_kfree_skb(btf) {
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
    if want(Figure::Intent) || want(Figure::Rules) {
        figure_4a(ctx, report)?;
    }
    if want(Figure::Intent) || want(Figure::Audit) {
        figure_4b(ctx, report)?;
    }
    notes(report);
    Ok(())
}
