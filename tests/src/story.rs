//! The story from DEVELOPERS.md, built in namespaces: a producer on the
//! LAN streams UDP to a router that DNATs port 8888 to a container, the
//! Docker way; then the container is redeployed on a new bridge with a new
//! address and the DNAT rule is replaced.
//!
//! ```text
//!  producer 192.0.2.2 ── lan ── 192.0.2.1 router ─┬─ br-old 172.17.0.1 ── old 172.17.0.2
//!                                                 └─ br-new 172.18.0.1 ── new 172.18.0.2
//! ```

use std::net::SocketAddr;

use crate::netns::{Netns, veth};

pub const SERVICE_PORT: u16 = 8888;
pub const ROUTER_LAN: [u8; 4] = [192, 0, 2, 1];
pub const PRODUCER: [u8; 4] = [192, 0, 2, 2];
pub const OLD_BACKEND: &str = "172.17.0.2";
pub const NEW_BACKEND: &str = "172.18.0.2";

/// Where a rule engine writes the DNAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// `iptables` (nft-backed on Debian), with Docker's chain layout.
    Iptables,
}

pub struct Story {
    pub producer: Netns,
    pub router: Netns,
    pub old: Option<Netns>,
    pub new: Netns,
    pub rules: Rules,
}

impl Story {
    /// Builds the topology with the service DNATed to the old container.
    pub fn build(rules: Rules) -> anyhow::Result<Story> {
        let producer = Netns::new("prod")?;
        let router = Netns::new("router")?;
        let old = Netns::new("old")?;
        let new = Netns::new("new")?;

        veth(&producer, "lan0", &router, "lan1")?;
        producer.ip(&["addr", "add", "192.0.2.2/24", "dev", "lan0"])?;
        router.ip(&["addr", "add", "192.0.2.1/24", "dev", "lan1"])?;
        router.sysctl("net.ipv4.ip_forward=1")?;

        for (bridge, gateway) in [("br-old", "172.17.0.1/16"), ("br-new", "172.18.0.1/24")] {
            router.ip(&["link", "add", bridge, "type", "bridge"])?;
            router.ip(&["addr", "add", gateway, "dev", bridge])?;
            router.ip(&["link", "set", bridge, "up"])?;
        }
        attach(
            &router,
            "br-old",
            &old,
            "vold",
            "172.17.0.2/16",
            "172.17.0.1",
        )?;
        attach(
            &router,
            "br-new",
            &new,
            "vnew",
            "172.18.0.2/24",
            "172.18.0.1",
        )?;

        let story = Story {
            producer,
            router,
            old: Some(old),
            new,
            rules,
        };
        story.dnat_to("br-old", OLD_BACKEND, true)?;
        Ok(story)
    }

    /// Docker's layout: PREROUTING jumps to DOCKER for local addresses, and
    /// DOCKER DNATs the published port unless the packet comes from the
    /// container's own bridge.
    fn dnat_to(&self, bridge: &str, backend: &str, first: bool) -> anyhow::Result<()> {
        let port = SERVICE_PORT.to_string();
        let to = format!("{backend}:{port}");
        let rule = [
            "!",
            "-i",
            bridge,
            "-p",
            "udp",
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ];
        match self.rules {
            Rules::Iptables => {
                let ipt = |args: &[&str]| {
                    let mut full = vec!["iptables", "-w"];
                    full.extend_from_slice(args);
                    self.router.exec(&full)
                };
                if first {
                    ipt(&["-t", "nat", "-N", "DOCKER"])?;
                    ipt(&[
                        "-t",
                        "nat",
                        "-A",
                        "PREROUTING",
                        "-m",
                        "addrtype",
                        "--dst-type",
                        "LOCAL",
                        "-j",
                        "DOCKER",
                    ])?;
                    let mut add = vec!["-t", "nat", "-A", "DOCKER"];
                    add.extend_from_slice(&rule);
                    ipt(&add)?;
                } else {
                    let mut replace = vec!["-t", "nat", "-R", "DOCKER", "1"];
                    replace.extend_from_slice(&rule);
                    ipt(&replace)?;
                }
            }
        }
        Ok(())
    }

    /// The redeploy: the old container goes away, and the published port
    /// now DNATs to the new one. Conntrack entries are left alone, as the
    /// engines that this bug bites leave them.
    pub fn redeploy(&mut self) -> anyhow::Result<()> {
        self.old = None;
        self.dnat_to("br-new", NEW_BACKEND, false)
    }

    pub fn service(&self) -> SocketAddr {
        SocketAddr::from((ROUTER_LAN, SERVICE_PORT))
    }

    pub fn producer_addr(&self, sport: u16) -> SocketAddr {
        SocketAddr::from((PRODUCER, sport))
    }
}

/// A container: a namespace linked to a bridge of the router.
fn attach(
    router: &Netns,
    bridge: &str,
    container: &Netns,
    host_if: &str,
    addr: &str,
    gateway: &str,
) -> anyhow::Result<()> {
    veth(router, host_if, container, "eth0")?;
    router.ip(&["link", "set", host_if, "master", bridge])?;
    container.ip(&["addr", "add", addr, "dev", "eth0"])?;
    container.ip(&["route", "add", "default", "via", gateway])?;
    Ok(())
}
