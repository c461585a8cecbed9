//! The commands, on top of every layer: `watch` streams kernel reports
//! through the correlator; `check` audits a conntrack table once.

pub mod check;
/// The command line, defined in its own crate (`stalewatch-cli`).
pub use stalewatch_cli as cli;
pub mod watch;
