//! The figures: each measures its loads and adds its rows and per-run
//! values to the report.

use std::time::Duration;

use super::{
    details::{cost_details, detail, load_details, stale_details},
    loads::Load,
    measure::{Ctx, Under, series},
    render::{cpu_row, empty_rows, ratio_row, stale_rows, value_row},
    synthetic,
    table::{self, Report, Row, median},
    tools::{self, Tool},
    topo,
};

/// The conntrack table's size on the project's machines: the flow count the
/// memory figure is given for.
const CONNTRACK_MAX: u32 = 262_144;

/// Figure 1: the healthy path.
pub fn figure_1(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
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

/// Figure 2: packets dropped for reasons stalewatch is not about (2a, 2b).
pub fn figure_2(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
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

/// Figure 3a: the CPU load, a stale flood of `--cpu-flows` flows.
pub fn figure_3a(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
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
pub fn figure_3bc(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
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
        super::sleep(Duration::ZERO)?;
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

/// How the figures are measured, under the table.
pub fn notes(report: &mut Report) {
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
