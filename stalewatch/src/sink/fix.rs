//! Fixes for a person: the `conntrack -D` commands records print, each
//! run in the flow's namespace.

use std::fmt::Write as _;

use crate::domain::{NetnsInfo, Tuple};

/// One conntrack entry as a fix names it: both its tuples and its zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub orig: Tuple,
    pub reply: Tuple,
    pub zone: u16,
}

/// The `conntrack -D` invocation that deletes only this entry, run in the
/// flow's namespace: its whole original tuple, its whole reply tuple (an
/// entry that replaced it with the same original tuple but another
/// backend is not matched) and its zone when not the default one.
pub fn fix_command(target: &Target, netns: &NetnsInfo) -> String {
    let Target { orig, reply, zone } = target;
    let mut cmd = conntrack_delete(orig, netns);
    let _ = write!(
        cmd,
        " -s {} -d {} -r {} -q {}",
        orig.src, orig.dst, reply.src, reply.dst
    );
    match orig.proto.0 {
        ICMP | ICMPV6 => {
            let v6 = if orig.proto.0 == ICMPV6 { "v6" } else { "" };
            // The kernel keeps the echo id as the source port and type and
            // code as the destination port; conntrack's options match the
            // original direction.
            let _ = write!(
                cmd,
                " --icmp{v6}-type {} --icmp{v6}-code {} --icmp{v6}-id {}",
                orig.dport >> 8,
                orig.dport & 0xff,
                orig.sport
            );
        }
        _ if orig.proto.has_ports() => {
            let _ = write!(
                cmd,
                " --sport {} --dport {} --reply-port-src {} --reply-port-dst {}",
                orig.sport, orig.dport, reply.sport, reply.dport
            );
        }
        _ => {}
    }
    if *zone != 0 {
        let _ = write!(cmd, " --zone {zone}");
    }
    cmd
}

/// The commands that delete exactly the entries of `targets` and no other
/// (the flows of one service judged stale alike), one after the other in
/// one shell line. A filter on the service and the backend alone would
/// also match entries that were never judged: healthy flows of a backend
/// that still serves others.
pub fn fix_commands(targets: &[Target], netns: &NetnsInfo) -> String {
    targets
        .iter()
        .map(|t| fix_command(t, netns))
        .collect::<Vec<_>>()
        .join("; ")
}

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

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

/// The words that run a command in `netns` (none for our own), quoted
/// for a shell: a namespace's name may hold spaces and any shell
/// metacharacter, and the command a person pastes must enter exactly that
/// namespace and run nothing else.
fn netns_prefix(netns: &NetnsInfo) -> String {
    let mut cmd = String::new();
    if !netns.is_own {
        match (&netns.name, &netns.path, netns.pid) {
            (Some(_), Some(path), _) => {
                let path = path.to_string_lossy();
                let _ = write!(cmd, "nsenter --net={} ", quoted(&path));
            }
            // `ip netns exec` would take it for an option.
            (Some(name), None, _) if name.starts_with('-') => {
                let path = format!("/run/netns/{name}");
                let _ = write!(cmd, "nsenter --net={} ", quoted(&path));
            }
            (Some(name), None, _) => {
                let _ = write!(cmd, "ip netns exec {} ", quoted(name));
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

/// `s` as one shell word.
fn quoted(s: &str) -> String {
    // Only a NUL byte cannot be quoted, and no path or name holds one.
    shlex::try_quote(s).map_or_else(|_| s.replace('\0', ""), |q| q.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{domain::udp, sink::fixtures::named};

    #[test]
    fn a_namespace_name_is_one_shell_word() {
        let orig = udp("192.0.2.2", 40000, "192.0.2.1", 8888);
        let reply = udp("172.17.0.2", 8888, "192.0.2.2", 40000);
        let t = target(orig, reply, 0);
        let weird = named("lab a;b$(touch x)'c");
        let cmd = fix_command(&t, &weird);
        let words = shlex::split(&cmd).expect("a shell line");
        assert_eq!(
            words[..4],
            ["ip", "netns", "exec", "lab a;b$(touch x)'c"],
            "{cmd}"
        );
        assert_eq!(words[4..7], ["conntrack", "-D", "-f"], "{cmd}");
        let dash = named("-n");
        assert!(fix_command(&t, &dash).starts_with("nsenter --net=/run/netns/-n conntrack"));
    }

    fn target(orig: Tuple, reply: Tuple, zone: u16) -> Target {
        Target { orig, reply, zone }
    }

    #[test]
    fn fix_command_fits_where_the_namespace_is() {
        let orig = udp("2001:db8::2", 5353, "2001:db8::1", 53);
        let reply = udp("2001:db8:1::10", 53, "2001:db8::2", 5353);
        let t = target(orig, reply, 0);
        let own = NetnsInfo {
            inode: 1,
            is_own: true,
            ..Default::default()
        };
        assert_eq!(
            fix_command(&t, &own),
            "conntrack -D -f ipv6 -p udp -s 2001:db8::2 -d 2001:db8::1 -r 2001:db8:1::10 \
             -q 2001:db8::2 --sport 5353 --dport 53 --reply-port-src 53 --reply-port-dst 5353"
        );
        let by_pid = NetnsInfo {
            inode: 7,
            pid: Some(4242),
            ..Default::default()
        };
        assert!(
            fix_command(&t, &by_pid).starts_with("nsenter --net=/proc/4242/ns/net conntrack -D")
        );
        let docker = NetnsInfo {
            path: Some("/var/run/docker/netns/abc".into()),
            ..named("abc")
        };
        assert!(fix_command(&t, &docker).starts_with("nsenter --net=/var/run/docker/netns/abc "));
    }

    #[test]
    fn a_fix_names_the_zone_and_icmp_fields() {
        let own = NetnsInfo {
            is_own: true,
            ..Default::default()
        };
        let orig = udp("192.0.2.2", 40000, "192.0.2.1", 8888);
        let reply = udp("172.17.0.2", 8888, "192.0.2.2", 40000);
        assert!(fix_command(&target(orig, reply, 5), &own).ends_with(
            "-r 172.17.0.2 -q 192.0.2.2 --sport 40000 --dport 8888 --reply-port-src 8888 \
             --reply-port-dst 40000 --zone 5"
        ));
        let icmp = Tuple {
            proto: crate::domain::Proto(ICMP),
            ..udp("192.0.2.2", 0x1234, "192.0.2.1", 8 << 8)
        };
        let icmp_reply = Tuple {
            proto: crate::domain::Proto(ICMP),
            ..udp("172.17.0.2", 0x1234, "192.0.2.2", 0)
        };
        assert_eq!(
            fix_command(&target(icmp, icmp_reply, 0), &own),
            "conntrack -D -f ipv4 -p icmp -s 192.0.2.2 -d 192.0.2.1 -r 172.17.0.2 -q 192.0.2.2 \
             --icmp-type 8 --icmp-code 0 --icmp-id 4660"
        );
    }

    #[test]
    fn a_service_fix_names_each_judged_entry_and_no_other() {
        let own = NetnsInfo {
            is_own: true,
            ..Default::default()
        };
        let targets: Vec<Target> = [40000, 40001]
            .into_iter()
            .map(|sport| {
                target(
                    udp("192.0.2.2", sport, "192.0.2.1", 8888),
                    udp("172.17.0.2", 8888, "192.0.2.2", sport),
                    0,
                )
            })
            .collect();
        let line = fix_commands(&targets, &own);
        let commands: Vec<&str> = line.split("; ").collect();
        assert_eq!(commands.len(), 2);
        assert!(commands[0].contains("--sport 40000 --dport 8888"), "{line}");
        assert!(commands[1].contains("--sport 40001 --dport 8888"), "{line}");
        assert!(commands.iter().all(|c| c.contains("-s 192.0.2.2")));
    }
}
