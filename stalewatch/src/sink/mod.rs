//! Sinks: what is said, and what is done about it. A judged flow becomes
//! one [`Record`] (rendered as a JSON line for programs or a text block for
//! people, from the same record, so they cannot disagree), a metric, and
//! with `--fix` a deletion; reminders are grouped per service first.

pub mod fix;
pub mod journal;
pub mod metrics;
pub mod record;
pub mod reminders;
pub mod text;

#[cfg(test)]
pub(crate) mod fixtures;

use std::io::{self, Write};

pub use record::Record;

/// A record's syslog priority: warning for a flow raised, notice for the
/// rest (reminders, resolutions, deletions, lost reports).
pub fn priority(record: &Record) -> u8 {
    const WARNING: u8 = 4;
    const NOTICE: u8 = 5;
    let raised = match record {
        Record::StaleFlow(f) => f.state == crate::domain::AlertState::Raised,
        Record::DeadDestination(d) => d.state == crate::domain::AlertState::Raised,
        Record::StaleEntry(_) => true,
        _ => false,
    };
    if raised { WARNING } else { NOTICE }
}

pub use stalewatch_cli::Format;

/// Writes records in the chosen format. The caller flushes once a round of
/// work (`watch`: a batch of reports, a tick), so that a pipeline sees each
/// alert as it happens without a write for each of thousands of lines.
pub struct Reporter<W: Write> {
    format: Format,
    out: W,
    /// Each line carries its syslog priority as a `<N>` prefix, which the
    /// journal takes off and keeps (see [`Reporter::for_journal`]).
    priorities: bool,
    /// journald's socket, where records go as entries with fields.
    journal: Option<journal::Journal>,
}

impl<W: Write> Reporter<W> {
    pub fn new(format: Format, out: W) -> Self {
        Reporter {
            format,
            out,
            priorities: false,
            journal: None,
        }
    }

    /// Writes to systemd's journal (stdout is its stream): each record
    /// gets its priority, so that `journalctl -p warning` shows exactly the
    /// raised flows, and resolutions and reminders come at notice; sent to
    /// journald's socket where it takes them, with the flow's facts as
    /// fields (see [`journal`]), else on stdout with a `<N>` prefix.
    pub fn for_journal(mut self, on: bool) -> Self {
        self.priorities = on;
        self.journal = if on {
            journal::Journal::connect()
        } else {
            None
        };
        self
    }

    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        let mut line = match self.format {
            Format::Json => {
                let mut line = serde_json::to_string(record)?;
                line.push('\n');
                line
            }
            Format::Text => text::text(record),
        };
        if let Some(journal) = &self.journal {
            match journal.send(record, &line) {
                Ok(()) => return Ok(()),
                Err(e) => log::debug!("journal socket: {e}; writing to stdout"),
            }
        }
        if self.priorities {
            let prefix = format!("<{}>", priority(record));
            line = line.lines().map(|l| format!("{prefix}{l}\n")).collect();
        }
        self.out.write_all(line.as_bytes())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{AlertState, Containers},
        sink::{
            fixtures::{alert, clock, named},
            record::StaleFlow,
        },
    };

    fn record(state: AlertState) -> Record {
        let mut a = alert();
        a.state = state;
        Record::StaleFlow(Box::new(StaleFlow::new(
            &a,
            named("r"),
            &Containers::default(),
            &clock(),
        )))
    }

    #[test]
    fn for_the_journal_raised_flows_are_warnings_and_the_rest_notices() {
        let mut out = Vec::new();
        let mut reporter = Reporter::new(Format::Text, &mut out).for_journal(true);
        // The prefixes: where journald's socket takes no entries (a real
        // journald on the test's machine would take them instead).
        reporter.journal = None;
        reporter.write(&record(AlertState::Raised)).unwrap();
        reporter.write(&record(AlertState::Resolved)).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() > 3);
        assert!(
            lines[0].starts_with("<4>") && lines[0].contains("STALE FLOW"),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with("<4>") || l.starts_with("<5>")),
            "{text}"
        );
        assert!(
            lines.last().unwrap().starts_with("<5>  was pinned"),
            "{text}"
        );
        let mut out = Vec::new();
        Reporter::new(Format::Json, &mut out)
            .write(&record(AlertState::Reminder))
            .unwrap();
        assert!(out.starts_with(b"{\"type\""), "no prefix off the journal");
    }
}
