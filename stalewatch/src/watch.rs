//! `stalewatch watch`: load the probes, stream kernel reports through the
//! correlator, audit the conntrack table now and then for what no packet
//! failure shows, print alerts, and detach cleanly on SIGINT or SIGTERM.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    rc::Rc,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use nix::time::{ClockId, clock_gettime};
use stalewatch_common::{LocalKey, WAKE_GAP_NS, ct_status};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    audit,
    cli::WatchArgs,
    conntrack,
    correlate::{self, Alert, AlertState, Correlator, RaisedFlow, Siblings, Verdict},
    event::{Family, Observation, Proto, Tuple},
    kernel::btf::DropReasons,
    kernel::{self, Probes},
    metrics::Metrics,
    netns::{self, NetnsInfo},
    report::{Clock, EntryDeleted, Record, Reminders, Reporter, StaleFlow, StaleService},
};

pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let netns_filter = args.netns.as_deref().map(netns::resolve).transpose()?;
    // The namespace the audit reads: the watched one, or our own.
    let (_, audit_path) = crate::check::target(args.netns.as_deref())?;
    let options = kernel::Options {
        btf: args.btf.clone(),
        netns: netns_filter,
        emit_interval: args.report_interval,
        // Reports of entries already reported at --min-failures bring back
        // only those not raised (raised ones are read from the map): a flow
        // whose raising report was lost, or resolved when it paused. As
        // often as a reminder.
        reported_interval: args.report_interval.max(args.remind_every),
        min_failures: args.min_failures,
        grace: args.grace,
        max_flows: args.max_flows,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // Handlers first: a signal that comes while we load must not kill us
    // with the programs attached half-way.
    let signals = {
        let _guard = runtime.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    // Bad input first: nothing gets attached if the address is taken.
    let listener = match args.metrics {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            listener.set_nonblocking(true)?;
            let _guard = runtime.enter();
            Some((addr, tokio::net::TcpListener::from_std(listener)?))
        }
        None => None,
    };

    let mut probes = Probes::load(&options)?;
    // The audit needs the conntrack table (CAP_NET_ADMIN, and CAP_SYS_ADMIN
    // to enter another namespace): say so now, not every audit interval (the
    // programs detach as `probes` drops).
    if !args.audit_every.is_zero() {
        audit::read_table(&audit_path).with_context(|| {
            format!(
                "cannot audit {} (--audit-every 0s skips the audit)",
                audit_path.display()
            )
        })?;
    }
    let events = probes.take_events()?;
    // Parsing the kernel's BTF (twice: offsets, then the loader) peaks at
    // tens of MiB, all freed by now.
    release_free_memory();
    let scope = match (&args.netns, netns_filter) {
        (Some(name), Some(inode)) => format!("network namespace {name} (inode {inode})"),
        _ => "every network namespace".to_owned(),
    };

    let metrics = match listener {
        Some((addr, listener)) => {
            // Run counts and times of our programs: kept while this fd lives.
            let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .map_err(|e| log::warn!("BPF run-time statistics unavailable: {e}"))
                .ok();
            let metrics = Arc::new(Mutex::new(Metrics::new()));
            runtime.spawn(crate::metrics::serve(listener, metrics.clone()));
            eprintln!("stalewatch: metrics at http://{addr}/metrics");
            Some((metrics, stats))
        }
        None => None,
    };
    let session = Session {
        correlator: Correlator::new(correlate::Config {
            min_failures: args.min_failures,
            grace: args.grace,
            remind_every: args.remind_every,
            resolve_after: args.resolve_after,
        }),
        // Flushed once a round of the loop (see `end_round`).
        reporter: Reporter::new(
            args.format,
            io::BufWriter::with_capacity(1 << 16, io::stdout().lock()),
        ),
        reminders: Reminders::default(),
        fix: args.fix,
        resolve_after: args.resolve_after,
        audit_path,
        engine: crate::docker::Engine::connect(),
        metrics: metrics.as_ref().map(|(m, _)| m.clone()),
        layout_reasons: probes.layout.drop_reasons.clone(),
        namespaces: HashMap::new(),
        siblings: HashMap::new(),
        conns: HashMap::new(),
    };
    // Said last, once SIGINT and SIGTERM are handled: whoever waits for
    // this line may stop us at once.
    eprintln!(
        "stalewatch: attached to icmp:icmp_send and skb:kfree_skb (conntrack entries read {}); watching {scope}",
        probes.reads
    );
    runtime.block_on(session.run(probes, events, signals, args.audit_every))?;
    Ok(ExitCode::SUCCESS)
}

/// Hands free heap memory back to the system: big transient buffers (BTF
/// parsing, conntrack dumps of large tables) would otherwise stay resident
/// for good in glibc's arenas. A no-op with other C libraries.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no preconditions; it only releases free heap memory.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

fn monotonic() -> Duration {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

fn clock() -> Clock {
    Clock {
        monotonic: monotonic(),
        wall: SystemTime::now(),
    }
}

struct Session<W: io::Write> {
    correlator: Correlator,
    reporter: Reporter<W>,
    /// Reminders since the last tick, printed on it, grouped by service.
    reminders: Reminders,
    fix: bool,
    resolve_after: Duration,
    audit_path: PathBuf,
    /// The Docker engine, where one answers: names containers in alerts.
    engine: Option<crate::docker::Engine>,
    metrics: Option<Arc<Mutex<Metrics>>>,
    /// Drop reason names, for the metrics' cause labels.
    layout_reasons: DropReasons,
    /// Namespaces by inode, looked up at most every NETNS_TTL: describing
    /// one scans /proc.
    namespaces: HashMap<u32, (NetnsInfo, Instant)>,
    /// Siblings by service, read at most every SIBLINGS_TTL: a flood of
    /// failing flows to one service costs one conntrack dump, not one each.
    siblings: HashMap<ServiceKey, (Option<Siblings>, Instant)>,
    /// Conntrack sockets by namespace, for one round of the loop (a batch
    /// of reports, a tick), then closed: a socket keeps a deleted
    /// namespace alive.
    conns: HashMap<PathBuf, Rc<conntrack::Conn>>,
}

type ServiceKey = (u32, Family, Proto, IpAddr, u16);

const NETNS_TTL: Duration = Duration::from_secs(10);
const SIBLINGS_TTL: Duration = Duration::from_secs(2);
/// The same for reminders: a service's siblings cost a conntrack dump that
/// walks the whole table and copies every entry of the service.
const REMINDER_SIBLINGS_TTL: Duration = Duration::from_secs(30);
/// How long after a wakeup the loop reads the ring buffer again: a little
/// more than the kernel's gap between wakeups (see `WAKE_GAP_NS`).
const LOOK_AGAIN: Duration = Duration::from_nanos(WAKE_GAP_NS + 1_000_000);
/// Reports handled before the loop looks at signals and timers again.
const DRAIN_BATCH: usize = 256;
/// Reports read on each tick, at most: more than the ring buffer holds
/// (2 MiB of records of 48 bytes or more), so all that waited.
const TICK_DRAIN: usize = 65_536;
/// A raised flow is looked up in conntrack only once it has failed no
/// packet for this long (the kernel's map shows its failures).
const QUIET_BEFORE_LOOKUP: Duration = Duration::from_millis(1500);
/// Raised flows refreshed from the kernel per second, at most: beyond, each
/// is refreshed less often (every 15 s at 50,000 with the default
/// --resolve-after), so that their cost does not grow with their number.
/// A refresh is what tells that a raised flow still fails, so at least
/// twice per --resolve-after; and a flow whose entry was deleted is
/// resolved at the first refresh that finds it quiet.
const REFRESHED_PER_SECOND: usize = 3_000;

/// Every how many ticks raised flows are refreshed from the kernel's map.
fn refresh_every(raised: usize, resolve_after: Duration) -> u64 {
    let by_count = (raised / REFRESHED_PER_SECOND) as u64;
    by_count.min(resolve_after.as_secs() / 2).max(1)
}

/// A report younger than this is taken as proof that its entry exists.
const FRESH_REPORT: Duration = Duration::from_millis(250);
/// Raised flows of one namespace checked one by one; beyond, one dump.
const LOOKUPS_PER_NETNS: usize = 32;

impl<W: io::Write> Session<W> {
    async fn run(
        mut self,
        probes: Probes,
        events: RingBuf<MapData>,
        (mut sigint, mut sigterm): (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
        audit_every: Duration,
    ) -> anyhow::Result<()> {
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged until the AsyncFd (and with it the RingBuf) is dropped.
        let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        // An interval of zero disables the audit.
        let mut auditor = tokio::time::interval(audit_every.max(Duration::from_millis(100)));
        let mut lost_reported = 0;
        let mut ticks = 0u64;
        let layout = probes.layout.clone();
        // A second look after each wakeup: the kernel wakes this loop at
        // most once per WAKE_GAP_NS, so urgent reports sent in the gap
        // after a wakeup wait for this look, not for the next tick.
        let mut look_again: Option<tokio::time::Instant> = None;

        loop {
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard?;
                    let handled = self.drain(guard.get_inner_mut(), &layout, DRAIN_BATCH)?;
                    // A full batch may have left reports behind: stay ready
                    // so the loop comes back after a look at the signals.
                    if handled < DRAIN_BATCH {
                        guard.clear_ready();
                    }
                    // From the latest wakeup: reports suppressed after it
                    // come within the gap that follows it.
                    look_again = Some(tokio::time::Instant::now() + LOOK_AGAIN);
                }
                _ = tokio::time::sleep_until(look_again.unwrap_or_else(tokio::time::Instant::now)), if look_again.is_some() => {
                    look_again = None;
                    self.drain(events.get_mut(), &layout, TICK_DRAIN)?;
                }
                _ = ticker.tick() => {
                    // Most reports wake no one (see the kernel's `due`):
                    // they are read here, all of them, once a second.
                    self.drain(events.get_mut(), &layout, TICK_DRAIN)?;
                    self.tick(&probes, ticks)?;
                    self.print_reminders()?;
                    ticks += 1;
                    // Counting map entries walks the maps: every 5 s only.
                    if ticks % 5 == 1 {
                        self.refresh_metrics(&probes)?;
                        // Raising many flows at once leaves big buffers
                        // (conntrack dumps) freed behind.
                        release_free_memory();
                    }
                    let stats = probes.stats()?;
                    if stats.events_lost > lost_reported {
                        self.reporter.write(&Record::EventsLost {
                            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                            count: stats.events_lost - lost_reported,
                            total: stats.events_lost,
                        })?;
                        lost_reported = stats.events_lost;
                    }
                }
                _ = auditor.tick(), if !audit_every.is_zero() => {
                    self.audit()?;
                    // The audit's dump was the largest buffer of the round.
                    release_free_memory();
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
            self.end_round()?;
        }
        self.print_reminders()?;
        self.end_round()?;
        let stats = probes.stats()?;
        drop(probes);
        eprintln!(
            "stalewatch: detached; {} failing packets of DNATed flows seen, {} kernel reports, {} lost",
            stats.failures, stats.events_sent, stats.events_lost
        );
        Ok(())
    }

    /// Handles up to `max` reports from the ring buffer; returns how many.
    fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        layout: &kernel::btf::KernelLayout,
        max: usize,
    ) -> anyhow::Result<usize> {
        let mut handled = 0;
        while handled < max {
            let Some(item) = ring.next() else { break };
            handled += 1;
            let flow = match kernel::read_event(&item) {
                // A raised flow's report only updates its counters, unless
                // its reminder is due.
                Some(kernel::Record::Flow(raw)) => {
                    Observation::decode(&raw, &layout.tuple, &layout.drop_reasons)
                        .filter(|f| self.correlator.refresh(f, monotonic()) != Some(false))
                }
                Some(kernel::Record::Local(raw)) => Some(Observation::decode_local(&raw)),
                None => None,
            };
            drop(item);
            if let Some(flow) = flow {
                self.observe(flow, FRESH_REPORT)?;
            }
        }
        Ok(handled)
    }

    /// One kernel report. Only flows about to be alerted cost conntrack
    /// queries: is the entry still there (an orchestrator may have cleaned
    /// it up already), and where do its siblings go? A report whose latest
    /// failure is younger than `fresh` is taken as proof that the entry
    /// exists (the failing packet carried it).
    fn observe(&mut self, flow: Observation, fresh: Duration) -> anyhow::Result<()> {
        let now = monotonic();
        // The kernel reused a tracked entry's address: that entry is gone.
        if let Some(alert) = self.correlator.displaced(&flow, now) {
            self.emit(&alert)?;
        }
        let mut siblings = None;
        if let Some(state) = self.correlator.alert_due(&flow, now) {
            if now.saturating_sub(flow.last) >= fresh
                && self.entry_exists(flow.netns, &flow.orig, &flow.reply) == Some(false)
            {
                if let Some(alert) = self
                    .correlator
                    .entry_gone(flow.netns, flow.ct, &flow.orig, now)
                {
                    self.emit(&alert)?;
                }
                return Ok(());
            }
            // A reminder may take siblings read a while ago: thousands of
            // flows of one service are reminded of together.
            let max_age = match state {
                AlertState::Reminder => REMINDER_SIBLINGS_TTL,
                _ => SIBLINGS_TTL,
            };
            // Refused by design: no DNATed sibling makes it a bypass.
            siblings = self
                .siblings_of(&flow, max_age)
                .filter(|_| !(flow.local && self.by_design(flow.netns, &flow.orig)));
        }
        if let Some(alert) = self.correlator.observe(flow, siblings.as_ref(), now) {
            self.emit(&alert)?;
        }
        Ok(())
    }

    fn refresh_metrics(&mut self, probes: &Probes) -> anyhow::Result<()> {
        let Some(metrics) = &self.metrics else {
            return Ok(());
        };
        let counters = probes.counters()?;
        if let Ok(mut m) = metrics.lock() {
            m.refresh(&counters, &self.layout_reasons);
            m.flows(self.correlator.tracked(), self.correlator.raised());
        }
        Ok(())
    }

    fn netns_info(&mut self, inode: u32) -> NetnsInfo {
        match self.namespaces.get(&inode) {
            Some((info, at)) if at.elapsed() < NETNS_TTL => info.clone(),
            _ => {
                let info = netns::describe(inode);
                self.namespaces
                    .insert(inode, (info.clone(), Instant::now()));
                info
            }
        }
    }

    fn netns_path(&mut self, inode: u32) -> Option<PathBuf> {
        netns::path_of(&self.netns_info(inode))
    }

    /// A conntrack socket in the namespace at `path`, opened once per round.
    fn conn(&mut self, path: &std::path::Path) -> Option<Rc<conntrack::Conn>> {
        if let Some(conn) = self.conns.get(path) {
            return Some(conn.clone());
        }
        let conn = conntrack::Conn::open(Some(path))
            .map_err(|e| log::warn!("conntrack in {}: {e}", path.display()))
            .ok()?;
        let conn = Rc::new(conn);
        self.conns.insert(path.to_owned(), conn.clone());
        Some(conn)
    }

    /// Whether the conntrack entry of a flow still exists (see the free
    /// function); `None` when that cannot be told.
    fn entry_exists(&mut self, netns: u32, orig: &Tuple, reply: &Tuple) -> Option<bool> {
        let path = self.netns_path(netns)?;
        entry_exists(&*self.conn(&path)?, orig, reply)
    }

    /// What the conntrack table of the flow's namespace shows of its
    /// siblings: the DNATed entries to the same destination (the flow's own
    /// entry, if DNATed, goes to the stale backend, which the verdict sets
    /// apart). `None` when the table cannot be read.
    fn siblings_of(&mut self, flow: &Observation, max_age: Duration) -> Option<Siblings> {
        let o = &flow.orig;
        let key = (flow.netns, o.family, o.proto, o.dst, o.dport);
        if let Some((siblings, at)) = self.siblings.get(&key)
            && at.elapsed() < max_age
        {
            return siblings.clone();
        }
        let path = self.netns_path(flow.netns);
        let filter = conntrack::Filter {
            family: Some(o.family),
            proto: Some(o.proto),
            status: Some((ct_status::DST_NAT, ct_status::DST_NAT)),
            orig_dst: Some((o.dst, o.dport)),
        };
        let siblings = path.and_then(|path| {
            let entries = self
                .conn(&path)?
                .dump(&filter)
                .map_err(|e| log::warn!("reading conntrack for siblings: {e}"))
                .ok()?;
            let mut siblings = Siblings::default();
            for entry in &entries {
                *siblings
                    .dnat_backends
                    .entry((entry.reply.src, entry.reply.sport))
                    .or_default() += 1;
            }
            Some(siblings)
        });
        self.siblings
            .retain(|_, (_, at)| at.elapsed() < REMINDER_SIBLINGS_TTL);
        self.siblings
            .insert(key, (siblings.clone(), Instant::now()));
        siblings
    }

    /// Once a second: bring raised flows up to date from the kernel's
    /// maps (a flow whose entry failed a packet since the last look still
    /// has that entry: no conntrack query), resolve those whose entries are
    /// gone, and those that stopped failing.
    fn tick(&mut self, probes: &Probes, ticks: u64) -> anyhow::Result<()> {
        let raised = self.correlator.raised();
        let every = refresh_every(raised, self.resolve_after);
        // What the rest looks at changes mostly with a refresh: with many
        // raised flows (refreshed every few seconds) the walks over every
        // flow below wait for one.
        if !ticks.is_multiple_of(every) {
            return Ok(());
        }
        if raised > 0 {
            // Each failed a packet since the previous pass, `every` s ago at
            // most: its entry existed then (a deleted one is resolved by the
            // quiet flows' lookups below).
            let fresh = FRESH_REPORT + Duration::from_secs(every);
            for report in self.refresh_from_kernel(probes) {
                self.observe(report, fresh)?;
            }
        }
        let mut stalled: HashMap<u32, Vec<RaisedFlow>> = HashMap::new();
        // Those that failed a packet a moment before their last refresh had
        // their entry then.
        let quiet = QUIET_BEFORE_LOOKUP + Duration::from_secs(every - 1);
        for flow in self.correlator.quiet_raised(monotonic(), quiet) {
            // Refused datagrams are few: looked up one by one.
            match fresh_local(probes, &flow) {
                Some(report) if report.last > flow.last => self.observe(report, FRESH_REPORT)?,
                _ => stalled.entry(flow.netns).or_default().push(flow),
            }
        }
        for (netns, flows) in stalled {
            let conn = self.netns_path(netns).and_then(|p| self.conn(&p));
            let Some(gone) = conn.and_then(|c| missing_entries(&c, &flows)) else {
                continue;
            };
            for flow in gone {
                let alert = self
                    .correlator
                    .entry_gone(netns, flow.ct, &flow.orig, monotonic());
                if let Some(alert) = alert {
                    self.emit(&alert)?;
                }
            }
        }
        for alert in self.correlator.tick(monotonic()) {
            self.emit(&alert)?;
        }
        Ok(())
    }

    /// Brings raised flows up to date from one pass over the kernel's
    /// `FLOWS` map. Returns the full reports of the flows whose reminder is
    /// due.
    fn refresh_from_kernel(&mut self, probes: &Probes) -> Vec<Observation> {
        let mut due = Vec::new();
        let layout = &probes.layout;
        let now = monotonic();
        let correlator = &mut self.correlator;
        let read = probes.each_flow(|event| {
            if let Some(report) = Observation::decode(event, &layout.tuple, &layout.drop_reasons)
                && correlator.refresh(&report, now) == Some(true)
            {
                due.push(report);
            }
        });
        if let Err(e) = read {
            log::warn!("{e}");
        }
        due
    }

    /// Flows that bypass a DNAT while a proxy on the host serves them fail
    /// no packet: only the conntrack table shows them.
    fn audit(&mut self) -> anyhow::Result<()> {
        let path = self.audit_path.clone();
        let facts = netns::facts(&path).unwrap_or_default();
        let entries = match audit::read_bypass_candidates(&path, &facts) {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("audit: {e}");
                return Ok(());
            }
        };
        let Ok(inode) = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        else {
            return Ok(());
        };
        let now = monotonic();
        for finding in audit::audit(&entries, &facts) {
            if finding.verdict != Verdict::Bypass {
                // Pinned entries fail packets: the kernel path has them.
                continue;
            }
            let e = &finding.entry;
            if self.by_design(inode as u32, &e.orig) {
                continue;
            }
            let flow = Observation {
                local: true,
                ct: 0,
                netns: inode as u32,
                orig: e.orig,
                reply: e.reply,
                status: e.status,
                first: now,
                last: now,
                icmp: None,
                drops: None,
            };
            let siblings = Siblings {
                dnat_backends: finding.current_backends.iter().map(|b| (*b, 1)).collect(),
            };
            if let Some(alert) = self.correlator.observe_audited(flow, &siblings, now) {
                self.emit(&alert)?;
            }
        }
        Ok(())
    }

    /// Whether Docker's own rules deliver `orig` to this host (a container
    /// sending to a published port through a host address: its proxy serves
    /// it), so that its entry without NAT is no bypass.
    fn by_design(&self, netns: u32, orig: &Tuple) -> bool {
        netns::own_inode() == Some(netns)
            && self
                .engine
                .as_ref()
                .is_some_and(|e| e.served_by_proxy(orig))
    }

    /// Prints an alert (a reminder waits for the next tick: see
    /// `print_reminders`), and with `--fix` deletes the entry of a flow raised
    /// as stale or bypassing (never one whose backend is down).
    fn emit(&mut self, alert: &Alert) -> anyhow::Result<()> {
        if let Some(metrics) = &self.metrics
            && let Ok(m) = metrics.lock()
        {
            m.alert(alert.state, alert.verdict);
        }
        if alert.state == AlertState::Reminder {
            self.reminders.add(alert);
        } else {
            let info = self.netns_info(alert.flow.netns);
            let record = self.flow_record(alert, info);
            self.reporter.write(&Record::StaleFlow(Box::new(record)))?;
        }
        let fixable = matches!(alert.verdict, Verdict::Stale | Verdict::Bypass)
            && alert.state != AlertState::Resolved;
        if self.fix && fixable {
            let info = self.netns_info(alert.flow.netns);
            let flow = &alert.flow;
            let Some(path) = netns::path_of(&info) else {
                log::warn!("--fix: cannot enter network namespace {}", flow.netns);
                return Ok(());
            };
            let Some(conn) = self.conn(&path) else {
                return Ok(());
            };
            if conn.delete(&flow.orig)? {
                self.reporter
                    .write(&Record::EntryDeleted(Box::new(EntryDeleted::new(
                        &flow.orig,
                        &flow.reply,
                        info,
                    ))))?;
            }
        }
        Ok(())
    }

    /// The record of one flow's alert, its containers named.
    fn flow_record(&self, alert: &Alert, info: NetnsInfo) -> StaleFlow {
        let mut record = StaleFlow::new(alert, info, &clock());
        if let Some(engine) = &self.engine {
            engine.annotate(&mut record.pin, &alert.flow.orig);
        }
        record
    }

    /// Ends a round of the loop: flushes what was written, and closes the
    /// conntrack sockets.
    fn end_round(&mut self) -> anyhow::Result<()> {
        self.reporter.flush()?;
        self.conns.clear();
        Ok(())
    }

    /// Prints the reminders gathered since the last tick (once a second):
    /// one record for the flows of a service that fail alike (a redeploy
    /// can pin thousands).
    fn print_reminders(&mut self) -> anyhow::Result<()> {
        for group in self.reminders.take() {
            let alert = &group.alert;
            let info = self.netns_info(alert.flow.netns);
            let one = self.flow_record(alert, info);
            let record = if group.flows == 1 {
                Record::StaleFlow(Box::new(one))
            } else {
                Record::StaleService(Box::new(StaleService::of(one, &group, &clock())))
            };
            self.reporter.write(&record)?;
        }
        Ok(())
    }
}

/// The kernel's latest on a raised flow of refused datagrams, from the
/// `LOCALS` map: `None` when the kernel no longer holds it.
fn fresh_local(probes: &Probes, flow: &RaisedFlow) -> Option<Observation> {
    if !flow.local {
        return None;
    }
    let event = probes
        .local(&local_key(flow)?)
        .map_err(|e| log::warn!("reading LOCALS: {e}"))
        .ok()??;
    let fresh = Observation::decode_local(&event);
    (fresh.netns == flow.netns && fresh.orig == flow.orig && fresh.reply == flow.reply)
        .then_some(fresh)
}

/// The `LOCALS` key of a flow seen as refused datagrams (IPv4 only).
fn local_key(flow: &RaisedFlow) -> Option<LocalKey> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (flow.orig.src, flow.orig.dst) else {
        return None;
    };
    Some(LocalKey {
        netns: flow.netns,
        saddr: src.octets(),
        daddr: dst.octets(),
        sport: flow.orig.sport.to_be_bytes(),
        dport: flow.orig.dport.to_be_bytes(),
        proto: u32::from(flow.orig.proto.0),
    })
}

/// Which of `flows` (original and reply tuples) no longer have their
/// conntrack entry in the namespace of `conn`; `None` when the table
/// cannot be read.
fn missing_entries(conn: &conntrack::Conn, flows: &[RaisedFlow]) -> Option<Vec<RaisedFlow>> {
    if flows.len() <= LOOKUPS_PER_NETNS {
        return Some(
            flows
                .iter()
                .filter(|f| entry_exists(conn, &f.orig, &f.reply) == Some(false))
                .copied()
                .collect(),
        );
    }
    // Many: one dump of the table beats a lookup each.
    let table = conn
        .dump(&conntrack::Filter::default())
        .map_err(|e| log::warn!("reading conntrack: {e}"))
        .ok()?;
    let present: HashSet<(Tuple, Tuple)> = table.into_iter().map(|e| (e.orig, e.reply)).collect();
    Some(
        flows
            .iter()
            .filter(|f| !present.contains(&(f.orig, f.reply)))
            .copied()
            .collect(),
    )
}

/// Whether the conntrack entry `orig`/`reply` still exists in the namespace
/// at `path`; `None` when that cannot be told. A live flow gets a new entry
/// with the same original tuple at once when its entry is deleted: that one
/// differs in its reply (the backend), and is not the stale entry.
fn entry_exists(conn: &conntrack::Conn, orig: &Tuple, reply: &Tuple) -> Option<bool> {
    conn.get(orig)
        .map(|entry| entry.is_some_and(|e| e.reply == *reply))
        .map_err(|e| log::warn!("looking up a conntrack entry: {e}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raised_flows_are_refreshed_less_often_as_they_grow() {
        let default = Duration::from_secs(30);
        assert_eq!(refresh_every(0, default), 1);
        assert_eq!(refresh_every(1_000, default), 1);
        assert_eq!(refresh_every(5_999, default), 1);
        assert_eq!(refresh_every(20_000, default), 6);
        assert_eq!(refresh_every(50_000, default), 15);
        // Never so rarely that a flow failing on looks silent.
        assert_eq!(refresh_every(262_144, default), 15);
        assert_eq!(refresh_every(262_144, Duration::from_secs(4)), 2);
        assert_eq!(refresh_every(262_144, Duration::from_secs(2)), 1);
    }
}
