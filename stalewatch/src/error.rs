//! Errors a user can act on: each renders as one line that says what is
//! wrong and, where there is one, what to do about it. Variants keep the
//! error that caused them as their source; [`chain`] (or anyhow's `{:#}`)
//! writes the whole line.

use std::{error::Error as StdError, io, path::PathBuf};

/// Any error, as a source.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "kernel BTF not found at {0}: stalewatch needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf(PathBuf),
    #[error("cannot read kernel BTF from {path}")]
    BadBtf {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("tracepoint {0} is missing from this kernel's BTF: stalewatch cannot watch it")]
    NoTracepoint(String),
    #[error("unsupported kernel layout: {0}")]
    Layout(String),
    #[error(
        "permission denied loading eBPF programs: run stalewatch as root (it needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)"
    )]
    NotPermitted,
    #[error("{step}: the kernel's verifier refused it: {said}")]
    Verifier { step: String, said: String },
    /// A step of loading, attaching or reading the eBPF programs failed.
    #[error("{step}")]
    Bpf {
        step: String,
        #[source]
        source: BoxError,
    },
    /// The eBPF object built into stalewatch lacks something it must have.
    #[error("the eBPF object has no {0}")]
    Object(String),
    #[error(
        "network namespace '{0}' not found (give a name under /run/netns, a path, or an inode)"
    )]
    NoNetns(String),
    #[error(
        "permission denied reading network namespace '{spec}' (another process's namespace needs CAP_SYS_PTRACE)"
    )]
    NetnsDenied {
        spec: String,
        #[source]
        source: io::Error,
    },
}

/// An error and its sources in one line: `outer: inner: innermost`.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_every_cause_once() {
        let err = Error::BadBtf {
            path: "/x".into(),
            source: Box::new(io::Error::other("truncated")),
        };
        assert_eq!(chain(&err), "cannot read kernel BTF from /x: truncated");
        assert_eq!(chain(&Error::NoNetns("n".into())).matches("n'").count(), 1);
    }
}
