//! The report's text: its header, and the table's rows from a load's runs.

use super::{
    measure::{Ctx, RunResult, Series, Settings, Under},
    table::{self, Report, Row, median, quantile},
    tools::{self, Alerts},
};
use crate::run;

/// The report's first lines (machine, build, command, settings), and notes
/// on what else on the machine may move the figures.
pub fn header(report: &mut Report, ctx: &Ctx) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let model = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let version = run(&[&ctx.bin.to_string_lossy(), "--version"]).unwrap_or_default();
    let commit = run(&[
        "git",
        "-C",
        env!("CARGO_MANIFEST_DIR"),
        "describe",
        "--always",
        "--dirty",
    ])
    .unwrap_or_default();
    let command = std::env::var("STALEWATCH_BENCH_COMMAND").unwrap_or_else(|_| {
        std::env::args()
            .map(|a| a.rsplit('/').next().unwrap_or(&a).to_owned())
            .collect::<Vec<_>>()
            .join(" ")
    });
    let s = &ctx.s;
    report.header = vec![
        "stalewatch benchmark: medians of runs taken alternately (without / with stalewatch / with bpftrace)".to_owned(),
        format!("machine  {cpus} CPUs, {model}, Linux {}", kernel.trim()),
        format!(
            "build    {} (source {})",
            version.trim(),
            if commit.trim().is_empty() { "unknown" } else { commit.trim() }
        ),
        format!("command  {command}"),
        format!(
            "runs     {} of figure 1, {} per figure 2, {} per figure 3; windows {:.1} s (figures 1-2), {:.1} s raising and {:.1} s steady (figure 3), {:.1} s of BPF run stats; stale floods {} pps",
            2 * s.runs,
            s.runs,
            s.stale_runs,
            s.window.as_secs_f64(),
            s.stale_window.as_secs_f64(),
            s.steady_window.as_secs_f64(),
            s.cost_window.as_secs_f64(),
            s.rate
        ),
    ];
    report.header.push(format!(
        "         figure 4: {} services, {:.0} s after the first reading, {} run(s) without and with rewrites; {} DNATed entries, {} runs",
        s.services,
        s.rules_window.as_secs_f64(),
        s.rules_runs,
        s.audit_entries,
        s.audit_runs
    ));
    report.header.push(format!(
        "load     1-minute load average at the start: {} (other work on the machine competes for the same CPUs)",
        load_average()
    ));
    let irq_time = run(&[
        "sh",
        "-c",
        "zcat /proc/config.gz 2>/dev/null | grep -c '^CONFIG_IRQ_TIME_ACCOUNTING=y'",
    ])
    .is_ok_and(|out| out.trim() != "0");
    if irq_time {
        report.notes.push(
            "note: this kernel has IRQ_TIME_ACCOUNTING: softirq time is not the sender's, so CPU per packet undercounts the path"
                .to_owned(),
        );
    }
    let others = other_programs()?;
    if others > 0 {
        report.notes.push(format!(
            "note: {others} BPF programs named kfree_skb/icmp_send from other processes were loaded when the bench started \
             (other users' tools on the same tracepoints); they run in every column alike"
        ));
    }
    Ok(())
}

/// The 1-minute load average, from /proc/loadavg.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Programs named like ours that other processes hold (shared machine).
fn other_programs() -> anyhow::Result<usize> {
    let out = run(&["bpftool", "prog", "show", "-j"])?;
    let all: serde_json::Value = serde_json::from_str(&out)?;
    Ok(all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| matches!(p["name"].as_str(), Some("kfree_skb" | "icmp_send")))
        .count())
}

/// A throughput row: medians, and the median of per-run ratios to the run
/// without a tool just before.
pub fn ratio_row(
    figure: &str,
    s: &Series,
    f: impl Fn(&RunResult) -> f64 + Copy,
    target: Option<f64>,
) -> Row {
    compare_row(figure, s, f, table::pps, false, target)
}

/// The path's CPU cost per packet, and the capacity ratio it implies
/// (packets per CPU-second with the tool / without): unlike packets per
/// second, it holds when other work on the machine takes the CPU away.
pub fn cpu_row(figure: &str, s: &Series, target: Option<f64>) -> Row {
    compare_row(figure, s, |r| r.ns_per_packet, table::ns, true, target)
}

/// A figure of each column and the tool's ratio to "without", inverted
/// where lower is better (a cost), so that a ratio above 1 is always a gain.
fn compare_row(
    figure: &str,
    s: &Series,
    f: impl Fn(&RunResult) -> f64 + Copy,
    show: fn(f64) -> String,
    cost: bool,
    target: Option<f64>,
) -> Row {
    let without = s.values(Under::Without, f);
    let with = s.values(Under::Stalewatch, f);
    let bt = s.values(Under::Bpftrace, f);
    let ratio_of = |tool: &[f64]| {
        if cost {
            table::ratio(tool, &without)
        } else {
            table::ratio(&without, tool)
        }
    };
    let ratio = ratio_of(&with);
    Row {
        figure: figure.to_owned(),
        without: table::cell(&without, show),
        with: table::cell(&with, show),
        ratio,
        target: target.map_or_else(String::new, |t| format!("ratio >= {t}")),
        met: target.zip(ratio).map(|(t, r)| r >= t),
        bpftrace: table::cell(&bt, show),
        bpftrace_ratio: ratio_of(&bt),
    }
}

/// What an empty program of stalewatch's kind (a BTF tracepoint program)
/// on kfree_skb costs in place of stalewatch: the floor under any program
/// there. Its figures go in stalewatch's columns, on rows of their own.
pub fn empty_rows(s: &Series) -> Vec<Row> {
    let without = s.values(Under::Without, |r| r.ns_per_packet);
    let empty = s.values(Under::Empty, |r| r.ns_per_packet);
    if empty.is_empty() {
        return Vec::new();
    }
    let runs = s.values(Under::Empty, |r| r.ns("empty_kfree_skb"));
    vec![
        Row {
            figure: "  an empty BTF tracepoint program on kfree_skb instead: CPU per packet (capacity ratio)"
                .to_owned(),
            without: table::cell(&without, table::ns),
            with: table::cell(&empty, table::ns),
            ratio: table::ratio(&empty, &without),
            ..Row::default()
        },
        Row {
            figure: "  that empty program: ns per run (kernel stats)".to_owned(),
            with: table::cell(&runs, table::ns),
            ..Row::default()
        },
    ]
}

/// A row of the tools' own figures (no "without"), with an upper target.
pub fn value_row(
    figure: &str,
    s: &Series,
    f: impl Fn(&RunResult) -> f64 + Copy,
    fmt: fn(f64) -> String,
    at_most: Option<(f64, String)>,
    bpftrace: bool,
) -> Row {
    let with = s.values(Under::Stalewatch, f);
    let m = median(&with);
    Row {
        figure: figure.to_owned(),
        without: String::new(),
        with: m.map_or_else(|| "-".to_owned(), fmt),
        target: at_most
            .as_ref()
            .map_or_else(String::new, |(_, t)| t.clone()),
        met: at_most.as_ref().zip(m).map(|((limit, _), v)| v <= *limit),
        bpftrace: if bpftrace {
            table::cell(&s.values(Under::Bpftrace, f), fmt)
        } else {
            String::new()
        },
        ..Row::default()
    }
}

fn alert_values(s: &Series, f: impl Fn(&Alerts) -> Option<f64>) -> Vec<f64> {
    s.stalewatch
        .iter()
        .map(|r| r.alerts.as_ref().and_then(&f).unwrap_or(f64::NAN))
        .collect()
}

/// A stale flood's rows, figure 3; `cost`: with its programs' ns per run.
pub fn stale_rows(s: &Series, st: &Settings, cost: bool, flows: u32) -> Vec<Row> {
    let mut rows = vec![
        ratio_row("failing packets per second", s, |r| r.pps, None),
        cpu_row(
            "  CPU per failing packet while raising (capacity ratio)",
            s,
            None,
        ),
        compare_row(
            "  CPU per failing packet, steady (capacity ratio)",
            s,
            |r| r.ns_per_packet_steady,
            table::ns,
            true,
            None,
        ),
    ];
    rows.push(value_row(
        "  userspace CPU, % of one core, steady (every flow raised)",
        s,
        |r| r.cpu_steady,
        table::percent,
        Some((1.0, "< 1%".to_owned())),
        st.bpftrace,
    ));
    rows.push(value_row(
        &format!("  userspace CPU, % of one core, while raising {flows} flows"),
        s,
        |r| r.cpu_sched,
        table::percent,
        None,
        st.bpftrace,
    ));
    let rss = |under: Under| -> String {
        let start = median(&s.values(under, |r| r.idle_rss_kib * 1024.0));
        let end = median(&s.values(under, |r| r.rss_kib * 1024.0));
        match (start, end) {
            (Some(a), Some(b)) => format!("{} -> {}", table::mib(a), table::mib(b)),
            _ => String::new(),
        }
    };
    rows.push(Row {
        figure: "  VmRSS at start -> at the end of the window".to_owned(),
        with: rss(Under::Stalewatch),
        bpftrace: rss(Under::Bpftrace),
        ..Row::default()
    });
    if cost {
        for prog in ["kfree_skb", "icmp_send"] {
            rows.push(value_row(
                &format!("  {prog}: ns per program run (kernel stats)"),
                s,
                move |r| r.ns(prog),
                table::ns,
                None,
                st.bpftrace,
            ));
        }
    }
    let kernel = |f: fn(&tools::KernelStats) -> u64| {
        move |r: &RunResult| {
            r.kernel_window
                .as_ref()
                .map_or(f64::NAN, |k| f(k) as f64 / r.kernel_secs)
        }
    };
    rows.push(value_row(
        "  kernel reports sent per second (STATS map)",
        s,
        kernel(|k| k.events_sent),
        table::count,
        None,
        false,
    ));
    rows.push(value_row(
        "  of which woke stalewatch, per second",
        s,
        kernel(|k| k.wakeups),
        table::count,
        None,
        false,
    ));
    rows.push(value_row(
        "  kernel reports lost per second (ring buffer full)",
        s,
        kernel(|k| k.events_lost),
        table::count,
        None,
        false,
    ));
    rows.push(value_row(
        "  flows raised during the run",
        s,
        |r| r.alerts.as_ref().map_or(f64::NAN, |a| a.raised as f64),
        table::count,
        Some((f64::INFINITY, format!("of {flows} flows"))),
        false,
    ));
    if let Some(row) = rows.last_mut() {
        row.met = None;
    }
    for (label, q, target) in [
        ("  first failure -> alert, median over flows", 0.5, true),
        ("  first failure -> alert, p95 over flows", 0.95, false),
        ("  first failure -> alert, max over flows", 1.0, false),
        ("  kernel report -> alert (pipeline), median", 0.5, false),
        ("  kernel report -> alert (pipeline), max", 1.0, false),
    ] {
        let pipeline = label.contains("pipeline");
        let v = alert_values(s, |a| {
            let values = if pipeline {
                &a.report_to_alert
            } else {
                &a.first_to_alert
            };
            quantile(values, q)
        });
        let m = median(&v);
        rows.push(Row {
            figure: label.to_owned(),
            with: m.map_or_else(|| "-".to_owned(), table::seconds),
            target: if target {
                "<= 1 s".to_owned()
            } else {
                String::new()
            },
            met: if target { m.map(|v| v <= 1.0) } else { None },
            ..Row::default()
        });
    }
    let killed = s.stalewatch.iter().filter(|r| r.killed).count();
    rows.push(Row {
        figure: "  exit after SIGINT, median".to_owned(),
        with: if killed * 2 > s.stalewatch.len() {
            format!("> 5 s ({killed} of {} killed)", s.stalewatch.len())
        } else {
            table::cell(
                &s.values(Under::Stalewatch, |r| r.exit_secs),
                table::seconds,
            )
        },
        ..Row::default()
    });
    rows
}
