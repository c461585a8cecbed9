//! Who holds a port on the host: the socket a flow without NAT is delivered
//! to, and the process that owns it. A bypassed stream lands on whatever
//! the host has bound to the published port, and what that is tells how it
//! is lost: Podman's `conmon` binds every published port to keep it
//! reserved and never reads it (the datagrams pile up in its receive queue,
//! silently); Docker's `docker-proxy` relays them to the container with the
//! host's address as source.
//!
//! Read from `/proc/thread-self/net/{udp,udp6,tcp,tcp6}` inside the
//! namespace, then the socket's inode among the processes' open files.
//! Only asked for a record of a bypass: walking every process's files is
//! not done per packet.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use super::netns;
use crate::domain::{PortHolder, Proto};

/// A socket bound to a local port, from one row of a `/proc/net` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bound {
    addr: IpAddr,
    port: u16,
    /// Bytes waiting in its receive queue.
    queued: u64,
    inode: u64,
}

/// The process that holds the socket `proto` flows to `addr:port` are
/// delivered to in the namespace at `path`: a socket bound to that address
/// or to every address (listening, for TCP). `None` where no socket is
/// bound there, its owner is not visible, or the namespace cannot be read.
pub fn holder(path: &Path, proto: Proto, addr: IpAddr, port: u16) -> Option<PortHolder> {
    let tables: &[&str] = match proto {
        Proto::UDP => &["udp", "udp6"],
        Proto::TCP => &["tcp", "tcp6"],
        _ => return None,
    };
    let tables: Vec<String> = tables.iter().map(|t| (*t).to_owned()).collect();
    let bound = netns::in_netns(path, move || {
        tables
            .iter()
            .filter_map(|t| fs::read_to_string(format!("/proc/thread-self/net/{t}")).ok())
            .flat_map(|text| parse_table(&text, proto == Proto::TCP))
            .collect::<Vec<Bound>>()
    })
    .map_err(|e| log::debug!("sockets of {}: {e}", path.display()))
    .ok()?;
    // As the kernel picks: the socket bound to the very address, then a
    // wildcard of the address's own family, then an IPv6 one.
    let rank = |b: &Bound| {
        if b.addr == addr {
            0
        } else if b.addr.is_ipv4() == addr.is_ipv4() {
            1
        } else {
            2
        }
    };
    let socket = bound
        .iter()
        .filter(|b| b.port == port && b.inode != 0 && serves(b.addr, addr))
        .min_by_key(|b| rank(b))?;
    let pid = owner(socket.inode)?;
    let program = fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()?
        .trim()
        .to_owned();
    Some(PortHolder {
        program,
        pid,
        queued_bytes: socket.queued,
    })
}

/// Whether a socket bound to `bound` takes traffic for `addr`: the same
/// address, or a wildcard of its family (`::` also takes IPv4 unless the
/// socket is IPv6-only, which /proc does not say; it is taken as dual).
fn serves(bound: IpAddr, addr: IpAddr) -> bool {
    match (bound, addr) {
        (a, b) if a == b => true,
        (IpAddr::V4(b), IpAddr::V4(_)) => b.is_unspecified(),
        (IpAddr::V6(b), _) => {
            b.is_unspecified() || b.to_ipv4_mapped().is_some_and(|m| IpAddr::V4(m) == addr)
        }
        _ => false,
    }
}

/// The rows of a `/proc/net/{udp,tcp}[6]` table; for TCP only listening
/// sockets (state 0A).
fn parse_table(text: &str, listening_only: bool) -> Vec<Bound> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || (listening_only && f[3] != "0A") {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            let queued = u64::from_str_radix(f[4].split_once(':')?.1, 16).ok()?;
            Some(Bound {
                addr: parse_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
                queued,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// An address as /proc writes it: each 32-bit word as the host holds it
/// in memory, printed in hex as a native integer.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// The process with socket `inode` among its open files.
fn owner(inode: u64) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    fs::read_link(fd.path())
                        .is_ok_and(|l| l.as_os_str().as_encoded_bytes() == target.as_bytes())
                })
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows as Linux 6.18 writes them: conmon's socket on 0.0.0.0:8888 with
    /// 25792 bytes queued, a DNS stub on 127.0.0.53:53.
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  134: 00000000:22B8 00000000:0000 07 00000000:000064C0 00:00000000 00000000     0        0 51234 2 0000000000000000 0
  201: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 777 2 0000000000000000 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F91 0000000000000000FFFF00000100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn rows_give_address_port_queue_and_inode() {
        let rows = parse_table(UDP, false);
        assert_eq!(
            rows,
            [
                Bound {
                    addr: "0.0.0.0".parse().unwrap(),
                    port: 8888,
                    queued: 25792,
                    inode: 51234
                },
                Bound {
                    addr: "127.0.0.53".parse().unwrap(),
                    port: 53,
                    queued: 0,
                    inode: 777
                }
            ]
        );
        // TCP: the listener only, not the established connection.
        let rows = parse_table(TCP6, true);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].addr, "::".parse::<IpAddr>().unwrap());
        assert_eq!(rows[0].port, 8080);
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100007F"),
            Some("::ffff:127.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn wildcards_serve_their_family_and_v6_serves_v4() {
        let host: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(serves("0.0.0.0".parse().unwrap(), host));
        assert!(serves(host, host));
        assert!(!serves("127.0.0.1".parse().unwrap(), host));
        assert!(serves("::".parse().unwrap(), host));
        assert!(serves("::ffff:198.51.100.1".parse().unwrap(), host));
        assert!(!serves(
            "0.0.0.0".parse().unwrap(),
            "2001:db8::1".parse().unwrap()
        ));
    }

    #[test]
    fn a_socket_of_this_process_is_found_with_its_owner() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let own = Path::new("/proc/self/ns/net");
        let found =
            holder(own, Proto::UDP, "127.0.0.1".parse().unwrap(), port).expect("our own socket");
        assert_eq!(found.pid, std::process::id());
        assert!(holder(own, Proto::TCP, "127.0.0.1".parse().unwrap(), port).is_none());
    }
}
