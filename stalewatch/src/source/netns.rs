//! Network namespaces by inode: their names (`ip netns` names under
//! /run/netns) and a process that lives in them, for the fix command; what
//! a namespace shows of itself (its addresses, its failed neighbours, read
//! in [`neighbours`]); and
//! the one way stalewatch enters a namespace ([`in_netns`]), which the
//! other sources use too.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

pub mod neighbours;

use crate::{
    domain::{Hops, KnownFacts, NetnsInfo},
    error::Error,
};

/// Where named namespaces are bind-mounted.
pub const NETNS_DIRS: &[&str] = &["/run/netns", "/var/run/docker/netns"];

/// Inode of the network namespace of this process.
pub fn own_inode() -> Option<u32> {
    fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| m.ino() as u32)
}

/// Looks a namespace up by inode. Cheap enough for an alert, not for a packet.
pub fn describe(inode: u32) -> NetnsInfo {
    let mut info = NetnsInfo {
        inode,
        is_own: own_inode() == Some(inode),
        ..Default::default()
    };
    'dirs: for dir in NETNS_DIRS {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.metadata().map(|m| m.ino() as u32).ok() == Some(inode) {
                info.name = Some(entry.file_name().to_string_lossy().into_owned());
                if *dir != NETNS_DIRS[0] {
                    info.path = Some(entry.path());
                }
                break 'dirs;
            }
        }
    }
    if !info.is_own {
        info.pid = pid_in(inode);
        info.container_id = info.pid.and_then(container_of);
    }
    info
}

/// A path that opens the namespace (for conntrack queries), where one is
/// known.
pub fn path_of(info: &NetnsInfo) -> Option<PathBuf> {
    if info.is_own {
        return Some(PathBuf::from("/proc/self/ns/net"));
    }
    match (&info.name, &info.path, info.pid) {
        (_, Some(path), _) => Some(path.clone()),
        (Some(name), None, _) => Some(Path::new(NETNS_DIRS[0]).join(name)),
        (None, None, Some(pid)) => Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
        (None, None, None) => None,
    }
}

/// The container id in a process's cgroup path (Docker, containerd and
/// CRI-O name the cgroup after the 64-hex id), if it has one.
fn container_of(pid: u32) -> Option<String> {
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    container_id_in(&cgroup)
}

fn container_id_in(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.rsplit(':').next()?;
        path.split(['/', '-', '.'])
            .find(|part| part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned)
    })
}

/// The first process found whose network namespace is `inode`.
fn pid_in(inode: u32) -> Option<u32> {
    let want = format!("net:[{inode}]");
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let link = fs::read_link(entry.path().join("ns/net")).ok()?;
        (link.to_str()? == want).then_some(pid)
    })
}

/// Resolves `--netns`: a name under /run/netns, a path to an nsfs file, or
/// an inode number.
pub fn resolve(spec: &str) -> Result<u32, Error> {
    if let Ok(inode) = spec.parse::<u32>() {
        return Ok(inode);
    }
    let candidates: Vec<PathBuf> = if spec.contains('/') {
        vec![PathBuf::from(spec)]
    } else {
        NETNS_DIRS.iter().map(|d| Path::new(d).join(spec)).collect()
    };
    let mut denied = None;
    for path in &candidates {
        match fs::metadata(path) {
            Ok(meta) => return Ok(meta.ino() as u32),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => denied = Some(e),
            Err(_) => {}
        }
    }
    Err(match denied {
        Some(source) => Error::NetnsDenied {
            spec: spec.to_owned(),
            source,
        },
        None => Error::NoNetns(spec.to_owned()),
    })
}

/// The namespace named by a `--netns` spec (or our own without one), with
/// a path to enter it.
pub fn target(spec: Option<&str>) -> Result<(NetnsInfo, PathBuf), Error> {
    let inode = match spec {
        Some(spec) => resolve(spec)?,
        None => own_inode().ok_or_else(|| Error::NoNetns("/proc/self/ns/net".into()))?,
    };
    let info = describe(inode);
    let path = match spec {
        Some(spec) if spec.contains('/') => spec.into(),
        _ => path_of(&info).ok_or_else(|| Error::NoNetns(inode.to_string()))?,
    };
    Ok((info, path))
}

/// Runs `f` on a short-lived thread inside the namespace at `path`: setns
/// moves only the calling thread, and what `f` makes there (a socket) stays
/// in that namespace, while the caller's thread never moves. The error is
/// about entering the namespace; `f` returns its own.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let file = fs::File::open(path)?;
    let own = is_own(&file);
    std::thread::spawn(move || -> io::Result<T> {
        if !own {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("the thread entering the namespace panicked"))?
}

/// Whether an opened namespace file is stalewatch's own namespace: entering
/// that needs no setns, and so no CAP_SYS_ADMIN.
pub fn is_own(file: &fs::File) -> bool {
    file.metadata().map(|m| m.ino() as u32).ok() == own_inode()
}

/// What the audit needs to know of a namespace, at one look: its own
/// addresses, and the neighbours the kernel failed to resolve (see
/// [`neighbours`]: IPv4 and IPv6, read over rtnetlink). A neighbour being
/// resolved at that moment is not failed.
pub fn facts(path: &Path) -> io::Result<KnownFacts> {
    in_netns(path, || -> io::Result<KnownFacts> {
        let looks = neighbours::read()?;
        let local = local_addresses()?;
        Ok(KnownFacts {
            local,
            failed_neighbours: neighbours::failed_now(&looks),
            proxied_sources: Default::default(),
            arrives_on: HashMap::new(),
        })
    })?
}

/// As [`facts`], but a neighbour being resolved at the first look is
/// looked at again until the kernel settles it (resolved, or failed), for
/// at most `max_wait`: a backend that a stream keeps asking for is mostly
/// being resolved, between the moments the kernel gives up on it.
pub fn settled_facts(path: &Path, max_wait: Duration) -> io::Result<KnownFacts> {
    in_netns(path, move || -> io::Result<KnownFacts> {
        let looks = neighbours::read()?;
        let local = local_addresses()?;
        Ok(KnownFacts {
            local,
            failed_neighbours: neighbours::settle(looks, max_wait)?,
            proxied_sources: Default::default(),
            arrives_on: HashMap::new(),
        })
    })?
}

/// The addresses of the calling thread's namespace.
fn local_addresses() -> io::Result<HashSet<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// The interface the namespace at `path` routes each of `sources` out of:
/// the one their flows arrive on. A source without a route is left out.
pub fn arrival_interfaces(
    path: &Path,
    sources: Vec<IpAddr>,
) -> io::Result<HashMap<IpAddr, String>> {
    in_netns(path, move || {
        let sock = neighbours::socket()?;
        Ok(sources
            .into_iter()
            .filter_map(|src| Some((src, neighbours::route(&sock, src)?.0)))
            .collect())
    })?
}

/// The gateway the namespace at `path` routes each of `addrs` through,
/// for those it reaches through one (another host); an address on its own
/// links, or with no route, is left out.
pub fn gateways(path: &Path, addrs: Vec<IpAddr>) -> io::Result<HashMap<IpAddr, IpAddr>> {
    in_netns(path, move || {
        let sock = neighbours::socket()?;
        Ok(addrs
            .into_iter()
            .filter_map(|a| Some((a, neighbours::route(&sock, a)?.1?)))
            .collect())
    })?
}

/// Where the traffic of a flow to `dead` from `src` leaves and comes from,
/// by the routes of the namespace at `path`.
pub fn hops(path: &Path, dead: IpAddr, src: IpAddr) -> io::Result<Hops> {
    in_netns(path, move || {
        let sock = neighbours::socket()?;
        Ok(Hops {
            interface: neighbours::route(&sock, dead).map(|(dev, _)| dev),
            previous_hop: neighbours::route(&sock, src).map(|(_, via)| via.unwrap_or(src)),
        })
    })?
}

/// Sets the receive buffer of a netlink socket opened in a namespace
/// (events that come in bursts): SO_RCVBUFFORCE (root may exceed
/// net.core.rmem_max), else SO_RCVBUF.
pub fn set_rcvbuf(sock: &netlink_sys::Socket, bytes: usize) -> std::io::Result<()> {
    let value = nix::libc::c_int::try_from(bytes).unwrap_or(nix::libc::c_int::MAX);
    for option in [nix::libc::SO_RCVBUFFORCE, nix::libc::SO_RCVBUF] {
        // SAFETY: a plain int option on a socket we own.
        let rc = unsafe {
            nix::libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(sock),
                nix::libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    Err(std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_come_from_cgroup_paths() {
        let id = "4f1c2b7d9e0a4f1c2b7d9e0a4f1c2b7d9e0a4f1c2b7d9e0a4f1c2b7d9e0a1234";
        let v1 = format!("12:pids:/docker/{id}\n11:memory:/docker/{id}\n");
        assert_eq!(container_id_in(&v1).as_deref(), Some(id));
        let systemd = format!("0::/system.slice/docker-{id}.scope\n");
        assert_eq!(container_id_in(&systemd).as_deref(), Some(id));
        assert_eq!(container_id_in("0::/user.slice/session-2.scope\n"), None);
    }
}
