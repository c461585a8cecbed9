//! The commands, on top of every layer: `watch` streams kernel reports
//! through the correlator; `check` audits a conntrack table once.

pub mod check;
pub mod cli;
pub mod watch;
