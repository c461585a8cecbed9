//! Fixes for a person: the `conntrack -D` commands records print, each
//! run in the flow's namespace.

use std::fmt::Write as _;

use crate::domain::{Backend, NetnsInfo, Tuple};

/// The `conntrack -D` invocation that deletes only this flow's entry, run
/// in the flow's namespace. A conntrack table holds one entry per original
/// tuple, so the full tuple selects exactly one.
pub fn fix_command(orig: &Tuple, netns: &NetnsInfo) -> String {
    let mut cmd = conntrack_delete(orig, netns);
    let _ = write!(cmd, " -s {} -d {}", orig.src, orig.dst);
    if orig.proto.has_ports() {
        let _ = write!(cmd, " --sport {} --dport {}", orig.sport, orig.dport);
    }
    cmd
}

/// The `conntrack -D` invocation that deletes every entry of the service
/// `orig` goes to that is pinned to `backend` (the reply comes from it),
/// and no other.
pub fn service_fix_command(orig: &Tuple, backend: Backend, netns: &NetnsInfo) -> String {
    let mut cmd = conntrack_delete(orig, netns);
    let _ = write!(cmd, " -d {} -r {}", orig.dst, backend.addr);
    if orig.proto.has_ports() {
        let _ = write!(
            cmd,
            " --dport {} --reply-port-src {}",
            orig.dport, backend.port
        );
    }
    cmd
}

/// `conntrack -D` for entries of `orig`'s family and protocol, run in
/// `netns`: the caller adds which.
fn conntrack_delete(orig: &Tuple, netns: &NetnsInfo) -> String {
    let mut cmd = netns_prefix(netns);
    let _ = write!(
        cmd,
        "conntrack -D -f {} -p {}",
        orig.family.name(),
        orig.proto.name()
    );
    cmd
}

/// The words that run a command in `netns` (none for our own).
fn netns_prefix(netns: &NetnsInfo) -> String {
    let mut cmd = String::new();
    if !netns.is_own {
        match (&netns.name, &netns.path, netns.pid) {
            (Some(_), Some(path), _) => {
                let _ = write!(cmd, "nsenter --net={} ", path.display());
            }
            (Some(name), None, _) => {
                let _ = write!(cmd, "ip netns exec {name} ");
            }
            (None, _, Some(pid)) => {
                let _ = write!(cmd, "nsenter --net=/proc/{pid}/ns/net ");
            }
            (None, _, None) => {
                let _ = write!(cmd, "nsenter --net=<netns inode {}> ", netns.inode);
            }
        }
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{domain::udp, sink::fixtures::named};

    #[test]
    fn fix_command_fits_where_the_namespace_is() {
        let orig = udp("2001:db8::2", 5353, "2001:db8::1", 53);
        let own = NetnsInfo {
            inode: 1,
            is_own: true,
            ..Default::default()
        };
        assert_eq!(
            fix_command(&orig, &own),
            "conntrack -D -f ipv6 -p udp -s 2001:db8::2 -d 2001:db8::1 --sport 5353 --dport 53"
        );
        let by_pid = NetnsInfo {
            inode: 7,
            pid: Some(4242),
            ..Default::default()
        };
        assert!(
            fix_command(&orig, &by_pid).starts_with("nsenter --net=/proc/4242/ns/net conntrack -D")
        );
        let docker = NetnsInfo {
            path: Some("/var/run/docker/netns/abc".into()),
            ..named("abc")
        };
        assert!(
            fix_command(&orig, &docker).starts_with("nsenter --net=/var/run/docker/netns/abc ")
        );
    }
}
