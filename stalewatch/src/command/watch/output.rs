//! What the watch says and does about an alert, once it is judged and its
//! names are gathered: a record on stdout (reminders wait for the tick and
//! go out grouped by service), a metric, and with `--fix` the deletion of
//! the entry of a flow raised as stale or bypassing.

use std::{
    io,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use crate::{
    domain::{Alert, AlertState, Containers, Hops, NetnsInfo, Verdict, addr_port},
    error::chain,
    sink::{
        Format, Record, Reporter,
        fix::Target,
        metrics::Metrics,
        record::{Clock, DeadDestination, EntryDeleted, StaleFlow, StaleService, rfc3339},
        reminders::{ReminderGroup, Reminders},
    },
    source::conntrack::{self, Deletion},
};

/// Whether stdout is systemd's journal: systemd says so in JOURNAL_STREAM
/// (the stream's `device:inode`), which a child may inherit with another
/// stdout, so it is held against stdout itself.
fn stdout_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stdout) = std::fs::metadata("/proc/self/fd/1") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", stdout.dev(), stdout.ino())
}

/// The record of one flow's alert.
fn record_of(alert: &Alert, names: &Names, clock: &Clock) -> Record {
    let netns = names.netns.clone();
    if alert.verdict == Verdict::DeadDestination {
        let record = DeadDestination::new(alert, netns, &names.containers, &names.hops, clock);
        return Record::DeadDestination(Box::new(record));
    }
    Record::StaleFlow(Box::new(StaleFlow::in_zone(
        alert,
        netns,
        &names.containers,
        clock,
        names.zone,
    )))
}

/// The names of one alert's flow, gathered before it is said: its
/// namespace (and a path to enter it, for `--fix`) and its containers.
pub struct Names {
    pub netns: NetnsInfo,
    pub path: Option<PathBuf>,
    pub containers: Containers,
    /// For a dead destination: where its traffic leaves and comes from.
    pub hops: Hops,
    /// The conntrack zone of the flow's entry, where it was looked up.
    pub zone: u16,
    /// For a group of reminders: the entries of its listed flows that are
    /// still the ones judged, which its fix names.
    pub targets: Vec<Target>,
}

pub struct Output<W: io::Write> {
    reporter: Reporter<W>,
    /// Reminders since the last tick, printed on it, grouped by service.
    reminders: Reminders,
    metrics: Option<Arc<Mutex<Metrics>>>,
    fix: bool,
}

impl<W: io::Write> Output<W> {
    pub fn new(format: Format, out: W, metrics: Option<Arc<Mutex<Metrics>>>, fix: bool) -> Self {
        Output {
            reporter: Reporter::new(format, out).for_journal(stdout_is_journal()),
            reminders: Reminders::default(),
            metrics,
            fix,
        }
    }

    /// Counts an alert, and tells whether its record is due now (a
    /// reminder waits for the tick, in its group).
    pub fn count(&mut self, alert: &Alert, netns: &str) -> bool {
        if let Some(metrics) = &self.metrics
            && let Ok(m) = metrics.lock()
        {
            m.alert(alert.state, alert.verdict);
            m.flow(alert, netns);
        }
        if alert.state == AlertState::Reminder {
            self.reminders.add(alert);
            return false;
        }
        true
    }

    /// Whether `--fix` deletes the entry of this alert's flow: one raised
    /// (or reminded of) as stale or bypassing, never one whose backend is
    /// down.
    pub fn fixes(&self, alert: &Alert) -> bool {
        self.fix && alert.verdict.deleted_by_fix() && alert.state != AlertState::Resolved
    }

    /// Prints the record of an alert that [`Output::count`] said is due.
    pub fn say(&mut self, alert: &Alert, names: &Names, clock: &Clock) -> io::Result<()> {
        self.reporter.write(&record_of(alert, names, clock))
    }

    /// Deletes the entry of an alert's flow, exactly the one judged (see
    /// [`conntrack::delete_judged`]), and prints the deletion; anything
    /// else deletes nothing and says why in one log line.
    pub fn fix(&mut self, alert: &Alert, names: &Names) -> io::Result<()> {
        let flow = &alert.flow;
        let Some(path) = &names.path else {
            log::warn!("--fix: cannot enter network namespace {}", flow.netns);
            return Ok(());
        };
        let what = format!(
            "{} {} -> {} pinned to {}",
            flow.orig.proto.name(),
            addr_port(flow.orig.src, flow.orig.sport),
            addr_port(flow.orig.dst, flow.orig.dport),
            flow.backend()
        );
        match conntrack::delete_judged(Some(path), &flow.orig, &flow.reply) {
            Ok(Deletion::Deleted(entry)) => {
                let deleted = EntryDeleted::new(&entry, names.netns.clone());
                self.reporter
                    .write(&Record::EntryDeleted(Box::new(deleted)))
            }
            Ok(Deletion::Gone) => {
                log::warn!("--fix: nothing deleted: the entry of {what} is already gone");
                Ok(())
            }
            Ok(Deletion::Replaced(now)) => {
                let to: Vec<String> = now.iter().map(|e| e.backend().to_string()).collect();
                log::warn!(
                    "--fix: nothing deleted: the entry of {what} is no longer the one judged \
                     (now to {})",
                    to.join(", ")
                );
                Ok(())
            }
            Ok(Deletion::Ambiguous(found)) => {
                let zones: Vec<String> = found.iter().map(|e| e.zone.to_string()).collect();
                log::warn!(
                    "--fix: nothing deleted: {what} has an entry in each of conntrack zones {} \
                     and the kernel's report does not tell which one failed",
                    zones.join(", ")
                );
                Ok(())
            }
            Err(e) => {
                log::warn!("--fix: nothing deleted for {what}: {}", chain(&e));
                Ok(())
            }
        }
    }

    /// The reminders gathered since the last tick, leaving none.
    pub fn take_reminders(&mut self) -> Vec<ReminderGroup> {
        self.reminders.take()
    }

    /// Prints a group of reminders: one record for the flows of a service
    /// that fail alike.
    pub fn remind(
        &mut self,
        group: &ReminderGroup,
        names: &Names,
        clock: &Clock,
    ) -> io::Result<()> {
        let record = if group.flows == 1 || group.alert.verdict == Verdict::DeadDestination {
            record_of(&group.alert, names, clock)
        } else {
            let one = StaleFlow::new(&group.alert, names.netns.clone(), &names.containers, clock);
            Record::StaleService(Box::new(StaleService::of(
                one,
                group,
                clock,
                &names.targets,
            )))
        };
        self.reporter.write(&record)
    }

    /// Kernel reports that could not be handed over.
    pub fn events_lost(&mut self, count: u64, total: u64) -> io::Result<()> {
        self.reporter.write(&Record::EventsLost {
            time: rfc3339(SystemTime::now()),
            count,
            total,
        })
    }

    /// Flushes what the round wrote.
    pub fn flush(&mut self) -> io::Result<()> {
        self.reporter.flush()
    }

    pub fn metrics(&self) -> Option<&Arc<Mutex<Metrics>>> {
        self.metrics.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{domain::Verdict, sink::fixtures::alert};

    #[test]
    fn fix_deletes_only_stale_and_bypassing_flows_still_failing() {
        let fixing = Output::new(Format::Json, Vec::new(), None, true);
        let mut a = alert();
        for (verdict, deleted) in [
            (Verdict::Stale, true),
            (Verdict::Bypass, true),
            (Verdict::BackendDown, false),
            (Verdict::Unconfirmed, false),
        ] {
            a.verdict = verdict;
            for state in [AlertState::Raised, AlertState::Reminder] {
                a.state = state;
                assert_eq!(fixing.fixes(&a), deleted, "{verdict:?} {state:?}");
            }
            a.state = AlertState::Resolved;
            assert!(!fixing.fixes(&a), "{verdict:?} resolved");
        }
        let watching = Output::new(Format::Json, Vec::new(), None, false);
        a.verdict = Verdict::Stale;
        a.state = AlertState::Raised;
        assert!(!watching.fixes(&a), "never without --fix");
    }
}
