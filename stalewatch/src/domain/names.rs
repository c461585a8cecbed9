//! What names a flow for a person: its network namespace and the
//! containers behind its addresses.

use std::{net::IpAddr, path::PathBuf};

use super::flow::Backend;

/// A container, as records name it (the `container` object).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ContainerRef {
    pub name: String,
    /// The short id (12 hex digits), as `docker ps` shows it.
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compose_project: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compose_service: Option<String>,
    /// The engine that runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
    /// The container no longer runs: it was seen earlier by this process.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

/// A container engine that names containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Docker,
    Podman,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Docker => "Docker",
            EngineKind::Podman => "Podman",
        }
    }
}

/// What is known of a network namespace, by inode.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetnsInfo {
    pub inode: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A process that lives in the namespace, where one is visible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The container that process belongs to, from its cgroup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The container whose namespace this is, where an engine tells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
    /// The namespace stalewatch itself runs in (usually the host's).
    #[serde(skip)]
    pub is_own: bool,
    /// Where `name` lives, when it is not under /run/netns (Docker's).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// A container that publishes a service's port on the host, with the
/// address and port new flows reach it at, where known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    pub container: ContainerRef,
    pub at: Option<Backend>,
}

/// The containers an engine names for one record: gathered before it is
/// written, so that writing it asks no one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Containers {
    /// The container whose network namespace the flow is in.
    pub netns: Option<ContainerRef>,
    /// The container that has (or had) the stale backend's address.
    pub stale: Option<ContainerRef>,
    /// The container that has the current backend's address.
    pub current: Option<ContainerRef>,
    /// The containers that publish the flow's destination port on this
    /// host (for a bypass).
    pub publishers: Vec<Publication>,
    /// The process holding the host's socket that a bypassed flow is
    /// delivered to (for a bypass), where one is bound.
    pub holder: Option<PortHolder>,
}

/// The process that owns the socket a port's traffic is delivered to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortHolder {
    /// Its command name (`/proc/PID/comm`).
    pub program: String,
    pub pid: u32,
    /// Bytes waiting in the socket's receive queue (for a TCP listener,
    /// connections waiting to be accepted).
    pub queued_bytes: u64,
}

/// Where a dead destination's traffic leaves and comes from, by the
/// namespace's routes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hops {
    /// The interface the dead address is routed out of.
    pub interface: Option<String>,
    /// The neighbour the traffic comes from: the gateway of the route back
    /// to its source (the source itself on a link of this host).
    pub previous_hop: Option<IpAddr>,
}
