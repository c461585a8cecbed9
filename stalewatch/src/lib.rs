//! stalewatch: finds flows that a Linux host forwards to the wrong place
//! because of a stale conntrack entry.
//!
//! The layers, each importing only those below it:
//!
//! 1. [`domain`] (plain types) and [`linux`] (what the kernel's names and
//!    numbers mean), with [`error`]: leaves.
//! 2. [`source`]: evidence. The kernel's probes and their reports, the
//!    conntrack table, namespaces, container engines.
//! 3. [`correlate`]: judgement, pure. Reports and gathered evidence in,
//!    alerts out; the table audit.
//! 4. [`sink`]: what is said and done. Records and their renderings,
//!    reminders, metrics, fixes.
//! 5. [`command`]: `watch` and `check`, which gather evidence from the
//!    sources, hand it to the correlator, and give what it says to the
//!    sinks.
//!
//! The kernel side (`stalewatch-ebpf`) and the event ABI shared with it
//! (`stalewatch-common`) sit under the kernel source.

pub mod command;
pub mod correlate;
pub mod domain;
pub mod error;
pub mod linux;
pub mod sink;
pub mod source;
