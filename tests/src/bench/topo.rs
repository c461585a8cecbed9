//! The bench topology: a sender, a router that DNATs UDP floods, and a
//! destination, each in a namespace of its own. Addresses are from the
//! benchmarking range (198.18.0.0/15, RFC 2544); nothing routes outside.
//!
//! ```text
//!  sender ── lan ── router ─── dst ─── destination 198.19.0.2 (sink on :8888)
//!  198.18.0.2       198.18.0.1  198.19.0.1
//!  198.18.1.1-8     └─ br-stale 198.19.99.1, no ports: 198.19.99.2 never answers ARP
//!
//!  router, nat PREROUTING:  udp 198.18.0.1:8888 -> DNAT 198.19.0.2:8888   (healthy)
//!                           udp 198.18.0.1:7777 -> DNAT 198.19.99.2:7777  (stale backend)
//!  router, filter FORWARD:  udp dport 9999 -> DROP                          (routed, not DNATed)
//! ```

use std::net::Ipv4Addr;

use crate::{netns::Netns, run};

pub const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const DEST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
/// The address the stale DNAT points at: on a bridge with no ports.
pub const STALE_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 19, 99, 2);
pub const HEALTHY_PORT: u16 = 8888;
pub const STALE_PORT: u16 = 7777;
pub const DROPPED_PORT: u16 = 9999;
/// Source addresses on the sender's interface; flows vary these and ports.
pub const SOURCES: u8 = 8;

/// Interfaces whose counters the bench reads.
pub const ROUTER_IN: &str = "lan1";
pub const DEST_IN: &str = "eth0";

pub fn source(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 1 + i % SOURCES)
}

pub struct Topology {
    pub sender: Netns,
    pub router: Netns,
    pub dest: Netns,
}

/// Creates `<prefix>-<role>`; deleted on drop like any [`Netns`].
pub fn netns(role: &str) -> anyhow::Result<Netns> {
    let name = format!("{}-{role}", super::prefix());
    run(&["ip", "netns", "add", &name])?;
    let ns = Netns { name };
    ns.ip(&["link", "set", "lo", "up"])?;
    Ok(ns)
}

impl Topology {
    pub fn build() -> anyhow::Result<Topology> {
        // Fields drop in declaration order: a failure half-way still
        // deletes what exists.
        let topo = Topology {
            sender: netns("snd")?,
            router: netns("rtr")?,
            dest: netns("dst")?,
        };
        let (s, r, d) = (&topo.sender, &topo.router, &topo.dest);
        crate::netns::veth(s, "lan0", r, ROUTER_IN)?;
        crate::netns::veth(r, "dst0", d, DEST_IN)?;

        s.ip(&["addr", "add", "198.18.0.2/16", "dev", "lan0"])?;
        for i in 0..SOURCES {
            let addr = format!("{}/16", source(i));
            s.ip(&["addr", "add", &addr, "dev", "lan0"])?;
        }
        s.ip(&["route", "add", "default", "via", "198.18.0.1"])?;

        r.ip(&["addr", "add", "198.18.0.1/16", "dev", ROUTER_IN])?;
        r.ip(&["addr", "add", "198.19.0.1/24", "dev", "dst0"])?;
        r.ip(&["link", "add", "br-stale", "type", "bridge"])?;
        r.ip(&["addr", "add", "198.19.99.1/24", "dev", "br-stale"])?;
        r.ip(&["link", "set", "br-stale", "up"])?;
        r.sysctl("net.ipv4.ip_forward=1")?;
        // New namespaces inherit the host's rp_filter; the flood's many
        // source addresses are all on-link, but say so explicitly.
        r.sysctl("net.ipv4.conf.all.rp_filter=0")?;
        r.sysctl(&format!("net.ipv4.conf.{ROUTER_IN}.rp_filter=0"))?;

        d.ip(&["addr", "add", "198.19.0.2/24", "dev", DEST_IN])?;
        d.ip(&["route", "add", "default", "via", "198.19.0.1"])?;

        let ipt = |args: &[&str]| {
            let mut full = vec!["iptables", "-w"];
            full.extend_from_slice(args);
            r.exec(&full)
        };
        for (port, to) in [
            (HEALTHY_PORT, format!("{DEST}:{HEALTHY_PORT}")),
            (STALE_PORT, format!("{STALE_BACKEND}:{STALE_PORT}")),
        ] {
            ipt(&[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                &ROUTER_LAN.to_string(),
                "-p",
                "udp",
                "--dport",
                &port.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ])?;
        }
        ipt(&[
            "-A",
            "FORWARD",
            "-p",
            "udp",
            "--dport",
            &DROPPED_PORT.to_string(),
            "-j",
            "DROP",
        ])?;
        Ok(topo)
    }

    /// Conntrack entries in the router (kept well below the shared limit).
    pub fn router_conntrack_count(&self) -> anyhow::Result<u64> {
        let out = self.router.exec(&["conntrack", "-C"])?;
        Ok(out.trim().parse()?)
    }
}
