//! Evidence sources: each turns one part of the host into plain domain
//! facts. The kernel's probes report failing packets; conntrack over
//! netlink shows entries; namespaces are named and entered; a container
//! engine names containers and the ports it publishes. A source imports
//! the domain and no other layer; the others enter namespaces through
//! [`netns`].

pub mod conntrack;
pub mod engine;
pub mod intent;
pub mod kernel;
pub mod netns;
pub mod sockets;
