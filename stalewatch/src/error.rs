//! Errors a user can act on: each renders as one line that says what is
//! wrong and, where there is one, what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "kernel BTF not found at {0}: stalewatch needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf(PathBuf),
    #[error("cannot read kernel BTF from {0}: {1}")]
    BadBtf(PathBuf, String),
    #[error("tracepoint {0} is missing from this kernel's BTF: stalewatch cannot watch it")]
    NoTracepoint(String),
    #[error("unsupported kernel layout: {0}")]
    Layout(String),
    #[error(
        "permission denied loading eBPF programs: run stalewatch as root (it needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)"
    )]
    NotPermitted,
    #[error(
        "network namespace '{0}' not found (give a name under /run/netns, a path, or an inode)"
    )]
    NoNetns(String),
    #[error("{0}")]
    Kernel(String),
}
