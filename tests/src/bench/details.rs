//! The report's per-run values: what the table's medians came from, run by
//! run, and the counts that explain them.

use std::fmt::Write as _;

use super::{
    measure::{RunResult, Series, Under},
    table::{self, Report},
    tools,
};

/// One line of per-run values: `<key> <what>: v1, v2, ...`.
pub fn detail(report: &mut Report, key: &str, what: &str, values: &[f64], fmt: fn(f64) -> String) {
    let text: Vec<String> = values.iter().map(|v| fmt(*v)).collect();
    report
        .details
        .push(format!("{key} {what}: {}", text.join(", ")));
}

/// Each tool's program runs, and bpftrace's own counts.
pub fn cost_details(report: &mut Report, key: &str, s: &Series) {
    for under in [
        Under::Stalewatch,
        Under::Bpftrace,
        Under::Floor,
        Under::Empty,
    ] {
        let mut line = String::new();
        for r in s.of(under) {
            for c in r.cost.iter().filter(|c| c.runs > 0) {
                let _ = write!(line, "{} {:.1} ns x {}; ", c.name, c.ns_per_run, c.runs);
            }
        }
        if !line.is_empty() {
            report.details.push(format!(
                "{key} program runs {}: {}",
                under.name(),
                line.trim_end()
            ));
        }
    }
    if let Some(r) = s.bpftrace.last() {
        let maps: Vec<String> = r
            .bpftrace_maps
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        report.details.push(format!(
            "{key} bpftrace's counts (last run): {}",
            maps.join(", ")
        ));
    }
}

/// Per run: the rate, the path's CPU per packet, and how much of a core
/// the sender got (below 100%: other work on the machine took the rest).
pub fn load_details(report: &mut Report, key: &str, what: &str, s: &Series) {
    let failed: Vec<&String> = s
        .stalewatch
        .iter()
        .filter_map(|r| r.exit_failure.as_ref())
        .collect();
    if let Some(first) = failed.first() {
        report.details.push(format!(
            "{key} stalewatch failed on its way out after SIGINT in {} of {} runs: {first}",
            failed.len(),
            s.stalewatch.len()
        ));
        report.notes.push(format!(
            "note: stalewatch exited with an error after SIGINT in {} runs of figure {key} (see per-run values)",
            failed.len()
        ));
    }
    for under in [
        Under::Without,
        Under::Stalewatch,
        Under::Bpftrace,
        Under::Floor,
        Under::Empty,
    ] {
        if s.of(under).is_empty() {
            continue;
        }
        let pps = s.values(under, |r| r.pps);
        let ns = s.values(under, |r| r.ns_per_packet);
        let share = s.values(under, |r| r.sender_share);
        let text: Vec<String> = (0..pps.len())
            .map(|i| {
                format!(
                    "{} ({:.0} ns/pkt, sender {:.0}%)",
                    table::pps(pps[i]),
                    ns[i],
                    share[i]
                )
            })
            .collect();
        report.details.push(format!(
            "{key} {what} pps {}: {}",
            under.name(),
            text.join(", ")
        ));
    }
    // The table's ratios are of medians; pairs taken side by side tell
    // whether slow drift rather than the tool moved them.
    let without = |f: fn(&RunResult) -> f64| s.values(Under::Without, f);
    for under in [
        Under::Stalewatch,
        Under::Bpftrace,
        Under::Floor,
        Under::Empty,
    ] {
        if s.of(under).is_empty() {
            continue;
        }
        let pps = table::paired_ratio(&without(|r| r.pps), &s.values(under, |r| r.pps));
        let cpu = table::paired_ratio(
            &s.values(under, |r| r.ns_per_packet),
            &without(|r| r.ns_per_packet),
        );
        let show = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        report.details.push(format!(
            "{key} median of per-run ratios, {} / without: pps {}, capacity {}",
            under.name(),
            show(pps),
            show(cpu)
        ));
    }
}

/// A stale flood's per-run values: the load's, the tools' CPU, then
/// stalewatch's memory, kernel counters and exits.
pub fn stale_details(report: &mut Report, key: &str, s: &Series) {
    load_details(report, key, "failing", s);
    for under in [Under::Stalewatch, Under::Bpftrace] {
        let steady = s.values(under, |r| r.cpu_steady);
        if steady.iter().any(|v| !v.is_nan()) {
            detail(
                report,
                key,
                &format!("CPU {} steady (schedstat)", under.name()),
                &steady,
                table::percent,
            );
        }
        let sched = s.values(under, |r| r.cpu_sched);
        let stat = s.values(under, |r| r.cpu_stat);
        if !sched.is_empty() {
            detail(
                report,
                key,
                &format!("CPU {} (schedstat)", under.name()),
                &sched,
                table::percent,
            );
            detail(
                report,
                key,
                &format!("CPU {} (stat utime+stime)", under.name()),
                &stat,
                table::percent,
            );
        }
    }
    let mem = |f: fn(&RunResult) -> f64| s.values(Under::Stalewatch, |r| f(r) * 1024.0);
    detail(
        report,
        key,
        "stalewatch VmRSS at start",
        &mem(|r| r.idle_rss_kib),
        table::mib,
    );
    detail(
        report,
        key,
        "stalewatch VmHWM at start",
        &mem(|r| r.idle_hwm_kib),
        table::mib,
    );
    detail(
        report,
        key,
        "stalewatch VmRSS at the end",
        &mem(|r| r.rss_kib),
        table::mib,
    );
    detail(
        report,
        key,
        "stalewatch VmHWM at the end",
        &mem(|r| r.hwm_kib),
        table::mib,
    );
    let total = |f: fn(&tools::KernelStats) -> u64| {
        s.values(Under::Stalewatch, move |r| {
            r.kernel_total.as_ref().map_or(f64::NAN, |k| f(k) as f64)
        })
    };
    detail(
        report,
        key,
        "kernel reports sent, since start (STATS)",
        &total(|k| k.events_sent),
        table::count,
    );
    detail(
        report,
        key,
        "kernel reports lost, since start (STATS)",
        &total(|k| k.events_lost),
        table::count,
    );
    detail(
        report,
        key,
        "failing packets seen in the kernel, since start (STATS)",
        &total(|k| k.failures),
        table::count,
    );
    let lost = s.values(Under::Stalewatch, |r| {
        r.alerts
            .as_ref()
            .map_or(f64::NAN, |a| a.lost_records as f64)
    });
    detail(
        report,
        key,
        "lost reports stalewatch printed (events_lost records)",
        &lost,
        table::count,
    );
    let summary: Vec<String> = s
        .stalewatch
        .iter()
        .map(|r| match (r.reports, r.lost) {
            (Some(sent), Some(lost)) => format!("{sent} reports, {lost} lost"),
            _ => "none (killed)".to_owned(),
        })
        .collect();
    report.details.push(format!(
        "{key} stalewatch exit summary: {}",
        summary.join("; ")
    ));
    let exits: Vec<String> = s
        .stalewatch
        .iter()
        .map(|r| {
            if r.killed {
                "still busy after 5 s, killed".to_owned()
            } else if let Some(failure) = &r.exit_failure {
                format!("failed: {failure}")
            } else {
                table::seconds(r.exit_secs)
            }
        })
        .collect();
    report.details.push(format!(
        "{key} stalewatch exit after SIGINT: {}",
        exits.join(", ")
    ));
    cost_details(report, key, s);
}
