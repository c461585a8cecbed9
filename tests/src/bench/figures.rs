//! The figures: each measures its loads and adds its rows and per-run
//! values to the report.

use std::time::Duration;

use super::{
    details::{cost_details, detail, load_details, stale_details},
    intent,
    loads::Load,
    measure::{self, Ctx, Under, series},
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
    // What grows with the flows is anonymous memory (the heap): the pages
    // of the binary that more of its code running brings in are counted
    // once, at their number at 3b's end.
    let med = |f: fn(&measure::RunResult) -> f64| {
        median(&b.values(Under::Stalewatch, f)).unwrap_or(f64::NAN)
    };
    let (idle, loaded) = (med(|r| r.idle_rss_kib), med(|r| r.rss_kib));
    let (idle_anon, loaded_anon) = (med(|r| r.idle_anon_kib), med(|r| r.anon_kib));
    let per_flow = (loaded_anon - idle_anon) / f64::from(s.flows);
    let extrapolated = loaded + per_flow * f64::from(CONNTRACK_MAX - s.flows);
    let whole_per_flow = (loaded - idle) / f64::from(s.flows);
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
            "stalewatch VmRSS, extrapolated from 3b: VmRSS at its end + its heap per flow x the flows beyond"
                .to_owned(),
            table::mib(extrapolated * 1024.0),
        ),
        plain(
            format!(
                "  heap per flow, from 3b: (RssAnon at the end - at start) / {}",
                s.flows
            ),
            format!("{:.0} B", per_flow * 1024.0),
        ),
        plain(
            "  at 3b's end: VmRSS / of which RssAnon (the rest: pages of the binary and libraries)"
                .to_owned(),
            format!(
                "{} / {}",
                table::mib(loaded * 1024.0),
                table::mib(loaded_anon * 1024.0)
            ),
        ),
        plain(
            "  the former extrapolation: VmRSS growth per flow x every flow".to_owned(),
            format!(
                "{} ({:.0} B a flow)",
                table::mib((idle + whole_per_flow * f64::from(CONNTRACK_MAX)) * 1024.0),
                whole_per_flow * 1024.0
            ),
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

/// Figure 4a: reading the NAT intent of a ruleset of thousands of
/// services while it is rewritten every few seconds, next to the same
/// window without rewrites.
pub fn figure_4a(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.s.clone();
    let ns = topo::netns("rules")?;
    eprintln!(
        "stalewatch-bench: 4a loading {} services into {}",
        s.services, ns.name
    );
    let load = intent::run_measured(
        &["ip", "netns", "exec", &ns.name, "nft", "-f", "-"],
        Some(intent::ruleset(s.services)),
        Duration::from_secs(300),
    )?;
    if load.code != 0 {
        anyhow::bail!("nft -f failed ({}): {}", load.code, load.stderr.trim());
    }
    // Rewritten whole (every endpoint moved at once, a storm of 4 x
    // services announcements: each endpoint chain's rule deleted and
    // made) or as a busy kube-proxy does (the endpoints of 2% of the
    // services moved at each sync).
    let busy = (s.services / 50).max(1);
    let (mut without, mut whole, mut partly) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=s.rules_runs {
        for moved in [None, Some(s.services), Some(busy)] {
            eprintln!(
                "stalewatch-bench: 4a run {i}/{}: {}",
                s.rules_runs,
                match moved {
                    Some(m) => format!("{m} services moved every 3 s"),
                    None => "not rewritten".to_owned(),
                }
            );
            let r = intent::rules_run(&ctx.bin, &ns.name, s.services, moved, s.rules_window)?;
            match moved {
                None => without.push(r),
                Some(m) if m == s.services => whole.push(r),
                Some(_) => partly.push(r),
            }
        }
    }
    drop(ns);
    let rules = whole
        .iter()
        .chain(&without)
        .find_map(|r| r.rules)
        .map_or_else(|| "?".to_owned(), |n| n.to_string());
    for (with, what) in [
        (
            &whole,
            format!("every endpoint moved ({} services)", s.services),
        ),
        (
            &partly,
            format!("the endpoints of {busy} services moved (a busy kube-proxy's sync)"),
        ),
    ] {
        report.sections.push((
            format!(
                "4a rules that change: kube-proxy-style nftables ruleset of {} services ({rules} DNAT rules read) in a namespace of its own; \
                 without: not rewritten; stalewatch: {what} in one nft -f every {} s",
                s.services,
                intent::REWRITE_EVERY.as_secs()
            ),
            rules_rows(&without, with, s.rules_window),
        ));
    }
    report.details.push(format!(
        "4a loading the ruleset (nft -f): {} CPU, {} wall",
        table::seconds(load.cpu_s),
        table::seconds(load.wall_s)
    ));
    for (name, runs) in [
        ("not rewritten", &without),
        ("rewritten whole", &whole),
        ("rewritten in part", &partly),
    ] {
        for f in [
            (
                "CPU % (stat, children included)",
                (|r: &intent::RulesRun| r.cpu) as fn(&intent::RulesRun) -> f64,
                table::percent as fn(f64) -> String,
            ),
            (
                "readings and walks in the window",
                |r| r.readings_in_window as f64,
                table::count,
            ),
            ("first reading's CPU", |r| r.first_cpu_s, table::seconds),
        ] {
            detail(
                report,
                "4a",
                &format!("{name}, {}", f.0),
                &runs.iter().map(f.1).collect::<Vec<_>>(),
                f.2,
            );
        }
        let delays: Vec<String> = runs
            .iter()
            .map(|r| {
                r.taken_after_s
                    .iter()
                    .map(|d| table::seconds(*d))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        report.details.push(format!(
            "4a {name}, each rewrite taken into the intent after: {}",
            delays.join("; ")
        ));
        for r in runs.iter() {
            if let Some(failure) = &r.exit_failure {
                report.details.push(format!(
                    "4a {name}: stalewatch failed on its way out: {failure}"
                ));
            }
            let each: Vec<String> = r
                .rewrites
                .iter()
                .map(|c| {
                    format!(
                        "{} cpu {} wall",
                        table::seconds(c.cpu_s),
                        table::seconds(c.wall_s)
                    )
                })
                .collect();
            if !each.is_empty() {
                report.details.push(format!(
                    "4a {name}, rewrites (nft -f, {} services each): {}",
                    r.moved,
                    each.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Figure 4a's rows: the runs `with` a rewrite load against those
/// `without`.
fn rules_rows(
    without: &[intent::RulesRun],
    with: &[intent::RulesRun],
    window: Duration,
) -> Vec<Row> {
    let values = |runs: &[intent::RulesRun], f: &dyn Fn(&intent::RulesRun) -> f64| -> Vec<f64> {
        runs.iter().map(f).collect()
    };
    let pair = |figure: String,
                f: &dyn Fn(&intent::RulesRun) -> f64,
                show: fn(f64) -> String,
                ratio: bool,
                target: Option<(f64, &str)>| {
        let (a, b) = (values(without, f), values(with, f));
        let m = median(&b);
        Row {
            figure,
            without: table::cell(&a, show),
            with: table::cell(&b, show),
            ratio: if ratio { table::ratio(&a, &b) } else { None },
            target: target.map_or_else(String::new, |(_, t)| t.to_owned()),
            met: target.zip(m).map(|((limit, _), v)| v < limit),
            ..Row::default()
        }
    };
    let delays: Vec<f64> = with.iter().flat_map(|r| r.taken_after_s.clone()).collect();
    let untaken: u64 = with.iter().map(|r| r.untaken).sum();
    let slowest = delays.iter().copied().fold(f64::NAN, f64::max);
    let rewrite_cpu: Vec<f64> = with
        .iter()
        .flat_map(|r| r.rewrites.iter().map(|c| c.cpu_s))
        .collect();
    let rewrite_share: Vec<f64> = with
        .iter()
        .map(|r| 100.0 * r.rewrites.iter().map(|c| c.cpu_s).sum::<f64>() / r.window_s.max(1e-9))
        .collect();
    let window = window.as_secs_f64();
    vec![
        pair(
            format!(
                "stalewatch + its nft/iptables-save: CPU, % of one core, {window:.0} s after its first reading"
            ),
            &|r| r.cpu,
            table::percent,
            true,
            Some((1.0, "< 1%")),
        ),
        Row {
            // The watch's other work (the audit, the namespace's facts)
            // is the column without: what is left is keeping the intent.
            figure: "  of which keeping the intent: with rewrites - without, medians".to_owned(),
            with: match (
                median(&values(with, &|r| r.cpu)),
                median(&values(without, &|r| r.cpu)),
            ) {
                (Some(a), Some(b)) => table::percent(a - b),
                _ => "-".to_owned(),
            },
            ..Row::default()
        },
        Row {
            figure: "  a rewrite taken into the intent: after its nft -f, median / slowest"
                .to_owned(),
            with: format!(
                "{} / {}{}",
                median(&delays).map_or_else(|| "-".to_owned(), table::seconds),
                table::seconds(slowest),
                if untaken > 0 {
                    format!(" ({untaken} not taken)")
                } else {
                    String::new()
                }
            ),
            target: "< 10 s".to_owned(),
            met: Some(untaken == 0 && slowest < 10.0),
            ..Row::default()
        },
        pair(
            "  walks of announced changes in the window (info log lines)".to_owned(),
            &|r| r.walks_in_window as f64,
            table::count,
            false,
            None,
        ),
        pair(
            "  whole readings in the window (info log lines)".to_owned(),
            &|r| (r.readings_in_window - r.walks_in_window) as f64,
            table::count,
            false,
            None,
        ),
        pair(
            "  the first reading, whole: its duration (its log line)".to_owned(),
            &|r| r.durations.first().copied().unwrap_or(f64::NAN),
            table::seconds,
            false,
            None,
        ),
        pair(
            "  the first reading's CPU (stalewatch + tools, attached -> its log line)".to_owned(),
            &|r| r.first_cpu_s,
            table::seconds,
            false,
            None,
        ),
        Row {
            figure: format!(
                "rewriter (nft -f, {} services' endpoint chains flushed and refilled): CPU per rewrite / % of one core",
                with.first().map_or(0, |r| r.moved)
            ),
            with: format!(
                "{} / {}",
                table::cell(&rewrite_cpu, table::seconds),
                table::cell(&rewrite_share, table::percent)
            ),
            ..Row::default()
        },
    ]
}

/// Figure 4b: one `stalewatch check` (reading the intent, auditing every
/// entry) against one `conntrack -L` on a table of DNATed entries.
pub fn figure_4b(ctx: &mut Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.s.clone();
    let mut runs = Vec::new();
    for i in 1..=s.audit_runs {
        eprintln!(
            "stalewatch-bench: 4b run {i}/{}: {} entries, check and conntrack -L",
            s.audit_runs, s.audit_entries
        );
        runs.push(intent::audit_run(
            &ctx.bin,
            &ctx.topo.sender,
            &ctx.topo.router,
            s.audit_entries,
            i % 2 == 1,
        )?);
    }
    let v = |f: fn(&intent::AuditRun) -> f64| -> Vec<f64> { runs.iter().map(f).collect() };
    let (list_cpu, check_cpu) = (v(|r| r.list.cpu_s), v(|r| r.check.cpu_s));
    let ratio = table::ratio(&list_cpu, &check_cpu);
    let list_above = v(|r| r.list.cpu_s - r.empty_list.cpu_s);
    let check_above = v(|r| r.check.cpu_s - r.empty_check.cpu_s);
    let entries = median(&v(|r| r.entries_before as f64)).unwrap_or(f64::NAN);
    // The watch's audits of the full table, every run's, and conntrack -L
    // of each run repeated once per audit of that run (ratio of medians).
    let watch_audits: Vec<f64> = runs.iter().flat_map(|r| r.watch_audits.clone()).collect();
    let audit_ratio = table::ratio(&list_cpu, &watch_audits);
    let fill = v(|r| r.watch_fill_cpu_s);
    let fill_per_entry: Vec<f64> = runs
        .iter()
        .map(|r| 1e9 * r.watch_fill_cpu_s / (r.entries_before.max(1) as f64))
        .collect();
    let rows = vec![
        Row {
            figure: "the watch's audit: CPU of one audit, its mirror holding the table (its log; 3 per run)".to_owned(),
            without: table::cell(&list_cpu, table::seconds),
            with: table::cell(&watch_audits, table::seconds),
            ratio: audit_ratio,
            target: "ratio <= 0.2".to_owned(),
            met: audit_ratio.map(|r| r <= 0.2),
            ..Row::default()
        },
        Row {
            figure: "  the same on the emptied table (the namespace's facts, routes, the intent)".to_owned(),
            without: table::cell(&v(|r| r.empty_list.cpu_s), table::seconds),
            with: table::cell(&v(|r| r.watch_empty_audit), table::seconds),
            ..Row::default()
        },
        Row {
            figure: "  DNATed entries in its mirror at those audits, median".to_owned(),
            with: table::cell(
                &v(|r| r.watch_mirrored.map_or(f64::NAN, |n| n as f64)),
                table::count,
            ),
            ..Row::default()
        },
        Row {
            figure: "  keeping the mirror: the watch's CPU while the table filled, audits left out".to_owned(),
            with: table::cell(&fill, table::seconds),
            ..Row::default()
        },
        Row {
            figure: "    per entry made (its conntrack event; the table filled at 100,000 entries a second)".to_owned(),
            with: table::cell(&fill_per_entry, table::ns),
            ..Row::default()
        },
        Row {
            figure: "    of which: reading the events (its log), per entry made".to_owned(),
            with: table::cell(
                &runs
                    .iter()
                    .map(|r| 1e9 * r.watch_events_cpu_s / (r.watch_events_made.max(1) as f64))
                    .collect::<Vec<_>>(),
                table::ns,
            ),
            ..Row::default()
        },
        Row {
            figure: "    of which: times it read the table again (events lost), median".to_owned(),
            with: table::cell(&v(|r| r.watch_rereads as f64), table::count),
            ..Row::default()
        },
        Row {
            figure: "  the watch's VmRSS before the fill -> with the table mirrored".to_owned(),
            with: format!(
                "{} -> {}",
                table::cell(&v(|r| r.watch_rss_kib.0 as f64 / 1024.0), |m| format!("{m:.1} MiB")),
                table::cell(&v(|r| r.watch_rss_kib.1 as f64 / 1024.0), |m| format!("{m:.1} MiB"))
            ),
            ..Row::default()
        },
        Row {
            figure: "stalewatch check (one-shot, dumps the table): CPU of one run, user+sys with its children (wait4)".to_owned(),
            without: table::cell(&list_cpu, table::seconds),
            with: table::cell(&check_cpu, table::seconds),
            ratio,
            ..Row::default()
        },
        Row {
            figure: "  the same on the emptied table (starting, namespace facts, the intent)"
                .to_owned(),
            without: table::cell(&v(|r| r.empty_list.cpu_s), table::seconds),
            with: table::cell(&v(|r| r.empty_check.cpu_s), table::seconds),
            ratio: table::ratio(&v(|r| r.empty_list.cpu_s), &v(|r| r.empty_check.cpu_s)),
            ..Row::default()
        },
        Row {
            figure: "  above the emptied table: the entries' own CPU (per run, then median)"
                .to_owned(),
            without: table::cell(&list_above, table::seconds),
            with: table::cell(&check_above, table::seconds),
            ratio: table::ratio(&list_above, &check_above),
            ..Row::default()
        },
        Row {
            figure: "  wall time of one run".to_owned(),
            without: table::cell(&v(|r| r.list.wall_s), table::seconds),
            with: table::cell(&v(|r| r.check.wall_s), table::seconds),
            ratio: table::ratio(&v(|r| r.list.wall_s), &v(|r| r.check.wall_s)),
            ..Row::default()
        },
        Row {
            figure: "  CPU per entry, above the emptied table".to_owned(),
            without: table::ns(1e9 * median(&list_above).unwrap_or(f64::NAN) / entries),
            with: table::ns(1e9 * median(&check_above).unwrap_or(f64::NAN) / entries),
            ..Row::default()
        },
        Row {
            figure: "  entries check read / found stale, median".to_owned(),
            with: format!(
                "{} / {}",
                table::cell(
                    &v(|r| r.checked.map_or(f64::NAN, |n| n as f64)),
                    table::count
                ),
                table::cell(&v(|r| r.stale.map_or(f64::NAN, |n| n as f64)), table::count)
            ),
            ..Row::default()
        },
    ];
    report.sections.push((
        format!(
            "4b the audit over {entries:.0} DNATed conntrack entries in the router (the issue asks 200,000: the table is shared by the whole machine, \
             the bench stays below 60,000); without: conntrack -L; stalewatch: the watch's audit, then stalewatch check (alternately with conntrack -L)"
        ),
        rows,
    ));
    detail(
        report,
        "4b",
        "entries before each run",
        &v(|r| r.entries_before as f64),
        table::count,
    );
    detail(
        report,
        "4b",
        "entries after each run",
        &v(|r| r.entries_after as f64),
        table::count,
    );
    detail(report, "4b", "conntrack -L CPU", &list_cpu, table::seconds);
    detail(
        report,
        "4b",
        "stalewatch check CPU",
        &check_cpu,
        table::seconds,
    );
    detail(
        report,
        "4b",
        "conntrack -L CPU on the emptied table",
        &v(|r| r.empty_list.cpu_s),
        table::seconds,
    );
    detail(
        report,
        "4b",
        "stalewatch check CPU on the emptied table",
        &v(|r| r.empty_check.cpu_s),
        table::seconds,
    );
    detail(
        report,
        "4b",
        "the watch's audits of the full table, CPU",
        &watch_audits,
        table::seconds,
    );
    detail(
        report,
        "4b",
        "the watch's CPU while the table filled, audits left out",
        &fill,
        table::seconds,
    );
    let ratios: Vec<f64> = runs
        .iter()
        .map(|r| r.check.cpu_s / r.list.cpu_s.max(1e-9))
        .collect();
    detail(
        report,
        "4b",
        "check / conntrack -L CPU, run by run",
        &ratios,
        |r| format!("{r:.3}"),
    );
    let order: Vec<&str> = runs
        .iter()
        .map(|r| {
            if r.check_first {
                "check first"
            } else {
                "conntrack -L first"
            }
        })
        .collect();
    report
        .details
        .push(format!("4b order: {}", order.join(", ")));
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
            "4a: stalewatch watch --netns <rules namespace> with RUST_LOG=info; CPU = /proc/<pid>/stat utime+stime+cutime+cstime (the nft and",
            "     iptables-save it runs count once reaped) over the window after its first reading; readings = its `NAT intent of` lines.",
            "     The changes nftables announces are applied to the rules kept and walked into the intent (`announced changes taken`",
            "     lines); a rewrite is taken at the first such line (polled every 20 ms) after its nft -f returned. Rewritten whole:",
            "     every endpoint moved each time; in part: the next block of 2% of the services each time.",
            "4b: the router's table filled by flows through its DNAT (each sent twice; unreplied UDP entries live 30 s), flushed first;",
            "     CPU = user+sys from wait4 of `stalewatch check --netns <router> --format json` and of `ip netns exec <router> conntrack -L`",
            "     (stdout to /dev/null), their children included; one of each per run, in alternating order.",
            "     Before the fill, `stalewatch watch --netns <router> --audit-every 2s` starts; its audit lines (debug log) give each audit's",
            "     CPU (getrusage RUSAGE_SELF around the audit: its namespace threads included) and the DNATed entries its mirror (conntrack events) held;",
            "     the three audits after the fill with >= 90% of the entries mirrored are the figure. It stops before check and conntrack -L.",
        ]
        .map(String::from),
    );
}
