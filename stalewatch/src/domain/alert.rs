//! What the correlator concludes about a flow, and when.

use std::time::Duration;

use super::{evidence::Observation, flow::Backend};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Raised,
    Reminder,
    Resolved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Stale,
    BackendDown,
    Unconfirmed,
    Bypass,
    /// Traffic without NAT for an address no neighbour answers for: this
    /// host receives what another host's stale entry still sends.
    DeadDestination,
}

impl Verdict {
    /// Whether `--fix` deletes the entry of a flow judged so: a stale or
    /// bypassing entry; never one whose backend is down (deleting it will
    /// not help) nor one not proven stale.
    pub fn deleted_by_fix(self) -> bool {
        matches!(self, Verdict::Stale | Verdict::Bypass)
    }

    /// As metrics label it.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Stale => "stale",
            Verdict::BackendDown => "backend_down",
            Verdict::Unconfirmed => "unconfirmed",
            Verdict::Bypass => "bypass",
            Verdict::DeadDestination => "dead_destination",
        }
    }
}

impl AlertState {
    /// As metrics label it.
    pub fn label(self) -> &'static str {
        match self {
            AlertState::Raised => "raised",
            AlertState::Reminder => "reminder",
            AlertState::Resolved => "resolved",
        }
    }
}

/// Why a raised flow was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Its conntrack entry was deleted or expired.
    EntryGone,
    /// No failure for `resolve_after`.
    FailuresStopped,
}

/// A verdict, where the service sends new flows now, and the facts behind
/// the verdict in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub current: Vec<Backend>,
    pub evidence: Vec<String>,
}

impl Judgement {
    /// Nothing can be told yet.
    pub fn unconfirmed() -> Judgement {
        Judgement {
            verdict: Verdict::Unconfirmed,
            current: Vec::new(),
            evidence: Vec::new(),
        }
    }
}

/// What the correlator concluded about one flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub state: AlertState,
    pub verdict: Verdict,
    /// Where the service sends new flows now, where known.
    pub current_backends: Vec<Backend>,
    /// The facts behind the verdict, in words.
    pub evidence: Vec<String>,
    pub resolution: Option<Resolution>,
    /// The latest kernel report on the flow.
    pub flow: Observation,
    /// When the correlator said it (monotonic).
    pub at: Duration,
    /// How long the flow has failed so far: from its first failure to its
    /// latest one.
    pub failing_for: Duration,
}
