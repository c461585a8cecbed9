//! stalewatch: finds flows that a Linux host forwards to the wrong place
//! because of a stale conntrack entry.
//!
//! The data path, stage by stage:
//! kernel hooks (`stalewatch-ebpf`) → event ABI (`stalewatch-common`) →
//! [`kernel`] (load, attach, BTF layout) → [`event`] (decoding) →
//! [`correlate`] (pure detection) → [`report`] (text and JSON).
//! [`watch`] wires them together; [`netns`] names namespaces.

pub mod audit;
pub mod check;
pub mod cli;
pub mod conntrack;
pub mod correlate;
pub mod docker;
pub mod error;
pub mod event;
pub mod kernel;
pub mod metrics;
pub mod netns;
pub mod report;
pub mod watch;
