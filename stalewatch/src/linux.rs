//! What stalewatch knows of the Linux kernel, in one place: the tracepoints
//! and the programs attached to them, which drop reasons mean that a host
//! could not deliver a packet, and what ICMP destination-unreachable codes
//! mean. Numbers that change from kernel to kernel (drop reasons) are not
//! here: they are read from the running kernel's BTF, by these names.
//!
//! A leaf, like the domain: every layer may ask it, it asks no one.

use stalewatch_common::names;

/// A BTF tracepoint stalewatch attaches a program to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracepoint {
    /// `subsystem:event`, as people and tracefs name it.
    pub name: &'static str,
    /// The kernel's BTF name for it (`btf_trace_<function>`).
    pub function: &'static str,
    /// The program in stalewatch's eBPF object.
    pub program: &'static str,
}

/// The tracepoints stalewatch attaches to.
pub const TRACEPOINTS: [Tracepoint; 2] = [
    Tracepoint {
        name: "icmp:icmp_send",
        function: "icmp_send",
        program: names::PROG_ICMP_SEND,
    },
    KFREE_SKB,
];

/// The drop path.
pub const KFREE_SKB: Tracepoint = Tracepoint {
    name: "skb:kfree_skb",
    function: "kfree_skb",
    program: names::PROG_KFREE_SKB,
};

/// Drop reasons: `enum skb_drop_reason`, named without its prefix.
pub mod drop_reason {
    /// The prefix of every name in the kernel's enum.
    pub const PREFIX: &str = "SKB_DROP_REASON_";

    /// Reasons that mean "the host could not deliver this packet": no
    /// neighbour, no route, or a netfilter verdict. A kernel that lacks one
    /// simply has fewer.
    pub const FAILURES: &[&str] = &[
        "NEIGH_FAILED",
        "NEIGH_CREATEFAIL",
        "NEIGH_DEAD",
        "NEIGH_QUEUEFULL",
        "IP_NOROUTE",
        "IP_INNOROUTES",
        "IP_OUTNOROUTES",
        "IP_INADDRERRORS",
        "IPV6_NOROUTE",
        "IP_RPFILTER",
        "NETFILTER_DROP",
    ];

    /// Reasons that mean a delivery failure only for IPv6: a failed
    /// neighbour discovery drops the queued packets as NOT_SPECIFIED.
    pub const FAILURES_V6: &[&str] = &["NOT_SPECIFIED"];

    /// Whether a drop for `reason` means that the host could not resolve
    /// the destination among its neighbours: it has left the link.
    pub fn is_neighbour_failure(reason: &str, ipv6: bool) -> bool {
        reason.starts_with("NEIGH_") || (ipv6 && FAILURES_V6.contains(&reason))
    }
}

/// ICMP destination unreachable (type 3) and its codes.
pub mod icmp {
    /// ICMP type "destination unreachable".
    pub const DEST_UNREACH: u8 = stalewatch_common::ICMP_DEST_UNREACH as u8;
    /// The code a router sends when neighbour resolution failed.
    pub const HOST_UNREACH: u8 = 1;

    /// What a destination-unreachable code means, in words.
    pub fn meaning(code: u8) -> &'static str {
        match code {
            0 => "network unreachable",
            HOST_UNREACH => "host unreachable",
            2 => "protocol unreachable",
            3 => "port unreachable",
            9 | 10 | 13 => "administratively prohibited",
            _ => "destination unreachable",
        }
    }

    /// The same as a metrics label: `icmp_host_unreachable`.
    pub fn label(code: u8) -> String {
        match code {
            0 => "icmp_net_unreachable".into(),
            HOST_UNREACH => "icmp_host_unreachable".into(),
            3 => "icmp_port_unreachable".into(),
            9 | 10 | 13 => "icmp_admin_prohibited".into(),
            _ => format!("icmp_unreachable_code_{code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_codes_read_in_words_and_as_labels() {
        assert_eq!(icmp::meaning(1), "host unreachable");
        assert_eq!(icmp::label(0), "icmp_net_unreachable");
        assert_eq!(icmp::label(1), "icmp_host_unreachable");
        assert_eq!(icmp::label(3), "icmp_port_unreachable");
        assert_eq!(icmp::label(13), "icmp_admin_prohibited");
        assert_eq!(icmp::label(2), "icmp_unreachable_code_2");
    }

    #[test]
    fn a_neighbour_failure_is_any_neigh_reason_and_ipv6_unspecified() {
        assert!(drop_reason::is_neighbour_failure("NEIGH_FAILED", false));
        assert!(!drop_reason::is_neighbour_failure("NOT_SPECIFIED", false));
        assert!(drop_reason::is_neighbour_failure("NOT_SPECIFIED", true));
        assert!(!drop_reason::is_neighbour_failure("NETFILTER_DROP", true));
    }
}
