//! The watch's pipeline: for each kernel report, ask the correlator
//! whether it is due for an alert, gather the evidence it needs (one pass
//! over the view), hand both to the correlator once, then gather the names
//! of what it says and give it to the output. The same for the tick's
//! refreshes and resolutions, and for the periodic audit.

use std::{collections::HashMap, io, path::PathBuf, time::Duration};

use super::{
    audit::Auditor,
    clock, monotonic,
    output::{Names, Output},
    view::View,
};
use crate::{
    correlate::{Correlator, RaisedFlow},
    domain::{Alert, AlertState, Containers, Evidence, Hops, Observation, Verdict},
    error::chain,
    sink::{fix::Target, record::Clock},
    source::{
        engine::Engine,
        kernel::{Probes, decode},
        netns,
    },
};

/// A report younger than this is taken as proof that its entry exists.
pub const FRESH_REPORT: Duration = Duration::from_millis(250);
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

pub struct Pipeline<W: io::Write> {
    pub correlator: Correlator,
    pub output: Output<W>,
    view: View,
    /// The container engine, where one answers: names containers, and
    /// tells the flows its own rules deliver to the host.
    engine: Option<Engine>,
    resolve_after: Duration,
    auditor: Auditor,
}

impl<W: io::Write> Pipeline<W> {
    pub fn new(
        correlator: Correlator,
        output: Output<W>,
        engine: Option<Engine>,
        resolve_after: Duration,
        audit_path: PathBuf,
    ) -> Self {
        Pipeline {
            correlator,
            output,
            view: View::default(),
            engine,
            resolve_after,
            auditor: Auditor::new(audit_path),
        }
    }

    /// One kernel report, from the ring buffer or the kernel's maps. A raised
    /// flow's report only updates its counters, unless its reminder is due.
    pub fn report(&mut self, flow: Observation) -> io::Result<()> {
        if !flow.local && self.correlator.refresh(&flow, monotonic()) == Some(false) {
            return Ok(());
        }
        self.observe(flow, FRESH_REPORT)
    }

    /// One kernel report that may be due for an alert. Only those cost
    /// conntrack queries (see [`View::evidence`]); a report whose latest
    /// failure is younger than `fresh` proves that its entry exists.
    fn observe(&mut self, flow: Observation, fresh: Duration) -> io::Result<()> {
        let now = monotonic();
        let evidence = match self.correlator.due(&flow, now) {
            Some(state) => {
                let proxied = flow.local && self.proxied(flow.netns, &flow);
                self.view.evidence(&flow, state, fresh, now, proxied)
            }
            None => Evidence::default(),
        };
        for alert in self.correlator.observe(flow, evidence, now) {
            self.emit(&alert)?;
        }
        Ok(())
    }

    /// Whether the engine's own rules deliver the flow to this host (a
    /// container sending to a published port through a host address: its
    /// proxy serves it), so that its entry without NAT is no bypass.
    fn proxied(&self, netns: u32, flow: &Observation) -> bool {
        netns::own_inode() == Some(netns)
            && self
                .engine
                .as_ref()
                .is_some_and(|e| e.served_by_proxy(&flow.orig))
    }

    /// Once a second: bring raised flows up to date from the kernel's
    /// maps (a flow whose entry failed a packet since the last look still
    /// has that entry: no conntrack query), resolve those whose entries are
    /// gone, and those that stopped failing; then the reminders due.
    pub fn tick(&mut self, probes: &Probes, ticks: u64) -> io::Result<()> {
        let raised = self.correlator.raised_count();
        let every = refresh_every(raised, self.resolve_after);
        // What the rest looks at changes mostly with a refresh: with many
        // raised flows (refreshed every few seconds) the walks over every
        // flow below wait for one.
        if ticks.is_multiple_of(every) {
            self.refresh(probes, raised, every)?;
        }
        self.remind()
    }

    fn refresh(&mut self, probes: &Probes, raised: usize, every: u64) -> io::Result<()> {
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
            let latest = flow
                .local
                .then(|| probes.refused_now(flow.netns, &flow.orig, &flow.reply))
                .flatten();
            match latest {
                Some(report) if report.last > flow.last => self.observe(report, FRESH_REPORT)?,
                _ => stalled.entry(flow.netns).or_default().push(flow),
            }
        }
        for (netns, flows) in stalled {
            let Some(gone) = self.view.missing_entries(netns, &flows) else {
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
            if let Some(report) = decode::flow(event, &layout.tuple, &layout.drop_reasons)
                && correlator.refresh(&report, now) == Some(true)
            {
                due.push(report);
            }
        });
        if let Err(e) = read {
            log::warn!("{}", chain(&e));
        }
        due
    }

    /// The periodic audit (see [`Auditor`]); says what it raises.
    /// Returns whether a follow-up audit is due soon.
    pub fn audit(&mut self) -> io::Result<bool> {
        let engine = self.engine.as_ref();
        let (alerts, follow_up) = self
            .auditor
            .run(&mut self.view, engine, &mut self.correlator);
        for alert in alerts {
            self.emit(&alert)?;
        }
        Ok(follow_up)
    }

    /// The audit's conntrack events socket, and which mirror it is.
    pub fn mirror_fd(&self) -> Option<(u64, std::os::fd::RawFd)> {
        self.auditor.mirror_fd()
    }

    /// Applies the audit's queued conntrack events.
    pub fn update_mirror(&mut self) {
        self.auditor.update_mirror();
    }

    /// Whether the audited namespace's rules changed since the last look:
    /// then an audit is due (the flows they no longer send where their
    /// entries do are stale now).
    pub fn rules_changed(&mut self) -> bool {
        self.view.intent_changed()
    }

    /// Says an alert: its names gathered first, then the output's record
    /// and, with `--fix`, the deletion.
    fn emit(&mut self, alert: &Alert) -> io::Result<()> {
        let netns = self.view.netns_info(alert.flow.netns);
        let label = netns
            .name
            .clone()
            .unwrap_or_else(|| netns.inode.to_string());
        let due = self.output.count(alert, &label);
        let fixes = self.output.fixes(alert);
        if !(due || fixes) {
            return Ok(());
        }
        let names = self.names(alert);
        if due {
            self.output.say(alert, &names, &clock())?;
        }
        if fixes {
            self.output.fix(alert, &names)?;
        }
        Ok(())
    }

    /// Prints the reminders gathered since the last tick (once a second):
    /// one record for the flows of a service that fail alike (a redeploy
    /// can pin thousands).
    pub fn remind(&mut self) -> io::Result<()> {
        let clock: Clock = clock();
        for group in self.output.take_reminders() {
            let mut names = self.names(&group.alert);
            if group.flows > 1 {
                let netns = group.alert.flow.netns;
                names.targets = group
                    .members
                    .iter()
                    .filter_map(|(orig, reply)| self.view.locate(netns, orig, reply))
                    .map(|entry| Target::of(&entry))
                    .collect();
            }
            self.output.remind(&group, &names, &clock)?;
        }
        Ok(())
    }

    /// The names of an alert's flow: its namespace and containers.
    fn names(&mut self, alert: &Alert) -> Names {
        let netns = self.view.netns_info(alert.flow.netns);
        let mut containers = self.engine.as_ref().map_or_else(Containers::default, |e| {
            e.snapshot().containers(
                &netns,
                alert.flow.orig.service(),
                alert.flow.backend(),
                alert.current_backends.first().copied(),
            )
        });
        let path = netns::path_of(&netns);
        let orig = &alert.flow.orig;
        if let (Some(path), Verdict::Bypass, false) =
            (&path, alert.verdict, alert.state == AlertState::Resolved)
        {
            containers.holder = self.view.holder(path, orig.proto, orig.dst, orig.dport);
        }
        let hops = match (&path, alert.verdict) {
            (Some(path), Verdict::DeadDestination) => {
                netns::hops(path, alert.flow.orig.dst, alert.flow.orig.src).unwrap_or_default()
            }
            _ => Hops::default(),
        };
        // The zone its fix names: looked up for what is still failing.
        let zone = match alert.state {
            AlertState::Resolved => 0,
            _ => self
                .view
                .zone_of(alert.flow.netns, &alert.flow.orig, &alert.flow.reply),
        };
        Names {
            path,
            netns,
            containers,
            hops,
            zone,
            targets: Vec::new(),
        }
    }

    /// Ends a round of the loop: flushes what was written, and closes the
    /// conntrack sockets.
    pub fn end_round(&mut self) -> io::Result<()> {
        self.view.end_round();
        self.output.flush()
    }
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
