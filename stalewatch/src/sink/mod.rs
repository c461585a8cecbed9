//! Sinks: what is said, and what is done about it. A judged flow becomes
//! one [`Record`] (rendered as a JSON line for programs or a text block for
//! people, from the same record, so they cannot disagree), a metric, and
//! with `--fix` a deletion; reminders are grouped per service first.

pub mod fix;
pub mod metrics;
pub mod record;
pub mod reminders;
pub mod text;

#[cfg(test)]
pub(crate) mod fixtures;

use std::io::{self, Write};

pub use record::Record;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Writes records in the chosen format. The caller flushes once a round of
/// work (`watch`: a batch of reports, a tick), so that a pipeline sees each
/// alert as it happens without a write for each of thousands of lines.
pub struct Reporter<W: Write> {
    format: Format,
    out: W,
}

impl<W: Write> Reporter<W> {
    pub fn new(format: Format, out: W) -> Self {
        Reporter { format, out }
    }

    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, record)?;
                self.out.write_all(b"\n")?;
            }
            Format::Text => self.out.write_all(text::text(record).as_bytes())?,
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
