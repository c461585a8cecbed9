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
    domain::{Alert, AlertState, Containers, Hops, NetnsInfo, Verdict},
    error::chain,
    sink::{
        Format, Record, Reporter,
        metrics::Metrics,
        record::{Clock, DeadDestination, EntryDeleted, StaleFlow, StaleService, rfc3339},
        reminders::{ReminderGroup, Reminders},
    },
    source::conntrack,
};

/// The record of one flow's alert.
fn record_of(alert: &Alert, names: &Names, clock: &Clock) -> Record {
    let netns = names.netns.clone();
    if alert.verdict == Verdict::DeadDestination {
        let record = DeadDestination::new(alert, netns, &names.containers, &names.hops, clock);
        return Record::DeadDestination(Box::new(record));
    }
    Record::StaleFlow(Box::new(StaleFlow::new(
        alert,
        netns,
        &names.containers,
        clock,
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
            reporter: Reporter::new(format, out),
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
        self.fix
            && matches!(alert.verdict, Verdict::Stale | Verdict::Bypass)
            && alert.state != AlertState::Resolved
    }

    /// Prints the record of an alert that [`Output::count`] said is due.
    pub fn say(&mut self, alert: &Alert, names: &Names, clock: &Clock) -> io::Result<()> {
        self.reporter.write(&record_of(alert, names, clock))
    }

    /// Deletes the entry of an alert's flow, and prints the deletion.
    pub fn fix(&mut self, alert: &Alert, names: &Names) -> io::Result<()> {
        let flow = &alert.flow;
        let Some(path) = &names.path else {
            log::warn!("--fix: cannot enter network namespace {}", flow.netns);
            return Ok(());
        };
        match conntrack::delete(Some(path), &flow.orig) {
            Ok(true) => {
                let deleted = EntryDeleted::new(&flow.orig, &flow.reply, names.netns.clone());
                self.reporter
                    .write(&Record::EntryDeleted(Box::new(deleted)))
            }
            Ok(false) => Ok(()),
            Err(e) => {
                log::warn!("--fix: {}", chain(&e));
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
        let one = StaleFlow::new(&group.alert, names.netns.clone(), &names.containers, clock);
        let record = if group.flows == 1 {
            Record::StaleFlow(Box::new(one))
        } else {
            Record::StaleService(Box::new(StaleService::of(one, group, clock)))
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
