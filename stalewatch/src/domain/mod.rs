//! The plain types every layer speaks: flows and their services, the
//! evidence gathered about them, verdicts and alerts, and the names that
//! tell a person which namespace and container. A leaf: it imports nothing
//! of the crate, so that every source, the correlator and every sink can
//! share it without importing each other.

mod alert;
mod evidence;
mod flow;
mod intent;
mod names;

pub use alert::{Alert, AlertState, Judgement, Resolution, Verdict};
pub use evidence::{
    DropEvidence, Entry, Evidence, IcmpEvidence, KnownFacts, Observation, Siblings,
};
#[doc(hidden)]
pub use flow::udp;
pub use flow::{Backend, Family, Proto, Service, Tuple, TuplesV4, addr_port};
pub use intent::{
    AddrSpan, Cond, Conditions, DnatRule, EngineRead, Fit, NatIntent, NatTarget, PortSpan,
    RuleEngine,
};
pub use names::{ContainerRef, Containers, EngineKind, Hops, NetnsInfo, PortHolder, Publication};
