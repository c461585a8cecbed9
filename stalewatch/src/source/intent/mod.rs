//! The NAT intent reader: which backends a namespace's current rules can
//! DNAT each flow to, read from the rules themselves, for every rule
//! engine the namespace uses: native nftables (`nft -j list ruleset`),
//! iptables-nft and iptables-legacy (`iptables-save -t nat` of each, both
//! families). The tools run inside the namespace; one that is not
//! installed, or a backend with no `nat` table there, is skipped.
//!
//! Reading costs a few process runs: the watch reads again when the
//! ruleset changes (see [`Changes`]) or at its audit interval, never per
//! packet. A change nf_tables announces in full (a native nftables rule,
//! set or element) is applied to the [`Reading`] kept, without listing
//! the ruleset again.

mod iptables;
mod nft;

use std::{
    io,
    path::Path,
    process::{Command, Stdio},
};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::libc;
use std::os::fd::AsRawFd as _;

pub use self::nft::Unread;
use self::nft::netlink;
pub use self::nft::netlink::Announcement;
use super::netns;
use crate::domain::{DnatRule, EngineRead, Family, NatIntent, RuleEngine};

/// Why the intent could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot enter network namespace {0}")]
    Netns(String, #[source] io::Error),
}

/// Reads the NAT intent of the namespace at `path`. An engine whose tool
/// fails is left out, with a log line.
pub fn read(path: &Path) -> Result<Reading, Error> {
    netns::in_netns(path, read_here).map_err(|e| Error::Netns(path.display().to_string(), e))
}

/// A namespace's rules as read: native nftables kept whole (as far as its
/// DNATs go), to take the changes nf_tables announces; the DNATs of
/// iptables' engines, read again whole when they change.
pub struct Reading {
    nft: Option<nft::Ruleset>,
    iptables: Vec<DnatRule>,
    iptables_read: Vec<EngineRead>,
}

impl Reading {
    /// The NAT intent of the rules: native nftables walked again, once
    /// the rules announced since are read (one that cannot be asks for
    /// the rules to be read again whole).
    pub fn intent(&mut self) -> Result<NatIntent, Unread> {
        let (mut rules, mut read) = (Vec::new(), Vec::new());
        // iptables-nft DNATs that nft showed, to be read by iptables-nft-save.
        let mut iptables_nft_owed = false;
        if let Some(ruleset) = &mut self.nft {
            ruleset.settle()?;
            let parsed = ruleset.walk();
            // Taken, not copied: thousands of rules.
            rules = parsed.rules;
            rules.reserve(self.iptables.len());
            read.push(EngineRead {
                engine: RuleEngine::Nftables,
                complete: parsed.complete,
            });
            iptables_nft_owed = parsed.iptables_dnat;
        }
        rules.extend(self.iptables.iter().cloned());
        read.extend(self.iptables_read.iter().cloned());
        if iptables_nft_owed
            && !self
                .iptables_read
                .iter()
                .any(|r| r.engine == RuleEngine::IptablesNft)
        {
            // DNATs nft showed and no iptables-nft-save read: not a
            // reading that can say a flow has no rule.
            read.push(EngineRead {
                engine: RuleEngine::IptablesNft,
                complete: false,
            });
        }
        Ok(NatIntent::new(rules, read))
    }

    /// Gives the rules of an intent made before, no longer used, as room
    /// for the next: a walk of ten thousand rules into fresh memory
    /// faults megabytes of pages in.
    pub fn recycle(&mut self, rules: Vec<DnatRule>) {
        if let Some(ruleset) = &mut self.nft {
            ruleset.recycle(rules);
        }
    }

    /// Applies a change nf_tables announced; one it cannot take (an
    /// iptables-nft rule, an interval set's elements, an expression not
    /// read) asks for the rules to be read again whole.
    pub fn apply(&mut self, a: Announcement<'_>) -> Result<(), Unread> {
        match &mut self.nft {
            Some(ruleset) => ruleset.apply(a),
            None => Err(Unread("a change while nft could not be read")),
        }
    }
}

/// The rules of the namespace this thread is in.
fn read_here() -> Reading {
    let mut iptables = Vec::new();
    let mut iptables_read = Vec::new();
    // The tables nf_tables holds (native nftables' and iptables-nft's),
    // or None without nft: then iptables-nft is asked anyway.
    let tables: Option<Vec<(String, String)>> =
        run("nft", &["-j", "list", "tables"]).map(|json| nft::tables(&json));
    let has_nat = |family: &str| {
        tables
            .as_ref()
            .is_none_or(|t| t.iter().any(|(f, n)| f == family && n == "nat"))
    };
    // iptables-nft's `nat` tables: read by iptables-nft-save, and left out
    // of nft's listing unless they hold native rules too (nft lists
    // iptables-nft's rules slowly, and their DNATs as opaque compat
    // statements).
    let mut iptables_own = Vec::new();
    for (family_name, tool, family) in [
        ("ip", "iptables-nft-save", Family::Ipv4),
        ("ip6", "ip6tables-nft-save", Family::Ipv6),
    ] {
        if !has_nat(family_name) {
            continue;
        }
        let Some(save) = run(tool, &["-t", "nat"]) else {
            continue;
        };
        let (found, complete) = iptables::parse(&save, RuleEngine::IptablesNft, family);
        iptables.extend(found);
        iptables_read.push(EngineRead {
            engine: RuleEngine::IptablesNft,
            complete,
        });
        // "Table `nat' is incompatible" / "contains incompatible
        // base-chains": nft's own rules are there.
        if !save.contains("incompatible") {
            iptables_own.push((family_name.to_owned(), "nat".to_owned()));
        }
    }
    let ruleset = tables.map(|tables| {
        let mut ruleset = nft::Ruleset::new(iptables_own.clone());
        for (family, name) in &tables {
            if iptables_own.contains(&(family.clone(), name.clone())) {
                continue;
            }
            let Some(json) = run("nft", &["-j", "list", "table", family, name]) else {
                continue;
            };
            if let Err(e) = ruleset.add_json(&json) {
                log::warn!("nftables: cannot read `nft -j list table {family} {name}`: {e}");
            }
        }
        ruleset
    });
    let legacy = std::fs::read_to_string("/proc/thread-self/net/ip_tables_names")
        .is_ok_and(|names| names.lines().any(|l| l == "nat"));
    let legacy6 = std::fs::read_to_string("/proc/thread-self/net/ip6_tables_names")
        .is_ok_and(|names| names.lines().any(|l| l == "nat"));
    for (wanted, tool, engine, family) in [
        (
            legacy,
            "iptables-legacy-save",
            RuleEngine::IptablesLegacy,
            Family::Ipv4,
        ),
        (
            legacy6,
            "ip6tables-legacy-save",
            RuleEngine::IptablesLegacy,
            Family::Ipv6,
        ),
    ] {
        if !wanted {
            continue;
        }
        let Some(save) = run(tool, &["-t", "nat"]) else {
            continue;
        };
        let (found, complete) = iptables::parse(&save, engine, family);
        iptables.extend(found);
        iptables_read.push(EngineRead { engine, complete });
    }
    Reading {
        nft: ruleset,
        iptables,
        iptables_read,
    }
}

/// A tool's output, or `None` (with a log line unless it is not
/// installed).
fn run(tool: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("NAT intent: cannot run {tool}: {e}");
            }
        })
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        log::warn!(
            "NAT intent: {tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            err.lines().next().unwrap_or("")
        );
        return None;
    }
    String::from_utf8(out.stdout).ok()
}

/// Ruleset changes in one namespace, as nf_tables announces them (native
/// nftables and iptables-nft alike; iptables-legacy announces nothing and
/// is read again at the audit interval).
pub struct Changes {
    socket: Socket,
    /// Room for BATCH datagrams of DATAGRAM bytes.
    buf: Vec<u8>,
}

/// `NFNLGRP_NFTABLES` (include/uapi/linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;
/// The announcements' receive buffer: a transaction that rewrites 10,000
/// chains announces 20,000 rules (each old one deleted, each new one made)
/// at once, some 6 MB.
const CHANGES_RCVBUF: usize = 16 << 20;
/// Datagrams taken per system call: nf_tables sends such a transaction's
/// announcements as some 1,800 datagrams, a system call each one by one.
const BATCH: usize = 16;
/// Room for each: nf_tables fills a datagram up to NLMSG_GOODSIZE (a page,
/// or two, less the kernel's overhead); a longer one would be truncated,
/// and taken as announcements lost.
const DATAGRAM: usize = 16 * 1024;

impl Changes {
    /// Listens in the namespace at `path`.
    pub fn listen(path: &Path) -> io::Result<Changes> {
        let socket = netns::in_netns(path, || -> io::Result<Socket> {
            let mut socket = Socket::new(NETLINK_NETFILTER)?;
            socket.bind(&SocketAddr::new(0, 0))?;
            socket.add_membership(NFNLGRP_NFTABLES)?;
            socket.set_non_blocking(true)?;
            netns::set_rcvbuf(&socket, CHANGES_RCVBUF)?;
            Ok(socket)
        })??;
        Ok(Changes {
            socket,
            buf: vec![0u8; BATCH * DATAGRAM],
        })
    }

    /// Everything announced since the last call, read without blocking,
    /// each given to `each` in order. Returns false when announcements
    /// were lost (the receive queue overflowed): only a reading of the
    /// whole ruleset is right again.
    pub fn drain(&mut self, mut each: impl FnMut(Announcement<'_>)) -> bool {
        let mut whole = true;
        self.drain_datagrams(|datagram| match datagram {
            Some(d) => netlink::decode(d, &mut each),
            None => whole = false,
        }) && whole
    }

    /// Each datagram received, until none is waiting; None for one lost
    /// or truncated. False when the socket failed.
    fn drain_datagrams(&mut self, mut each: impl FnMut(Option<&[u8]>)) -> bool {
        loop {
            let mut got = [(0, false); BATCH];
            match self.receive(&mut got) {
                Ok(0) => return true,
                Ok(n) => {
                    for (at, &(len, truncated)) in got[..n].iter().enumerate() {
                        let start = at * DATAGRAM;
                        each((!truncated).then(|| &self.buf[start..start + len]));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => each(None),
                Err(e) => {
                    log::debug!("ruleset announcements: {e}");
                    return false;
                }
            }
        }
    }

    /// Up to BATCH datagrams waiting, received in one system call: how
    /// many, with each one's length and whether it was truncated.
    fn receive(&mut self, got: &mut [(usize, bool); BATCH]) -> io::Result<usize> {
        let base = self.buf.as_mut_ptr();
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|at| libc::iovec {
            iov_base: base.wrapping_add(at * DATAGRAM).cast(),
            iov_len: DATAGRAM,
        });
        let mut headers: [libc::mmsghdr; BATCH] = std::array::from_fn(|at| {
            // SAFETY: all zeroes is a valid mmsghdr (null pointers, no
            // name, no control data).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = &raw mut iovecs[at];
            h.msg_hdr.msg_iovlen = 1;
            h
        });
        // SAFETY: each header names one iovec, each iovec DATAGRAM bytes of
        // its own in `buf` (BATCH * DATAGRAM long); all outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        for (slot, h) in got.iter_mut().zip(&headers[..n]) {
            *slot = (
                h.msg_len as usize,
                h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            );
        }
        Ok(n)
    }
}

#[cfg(test)]
impl Changes {
    /// What [`Changes::drain`] reads, as received.
    fn drain_raw(&mut self, mut each: impl FnMut(&[u8])) {
        self.drain_datagrams(|d| each(d.expect("no announcement lost")));
    }
}

#[cfg(test)]
mod tests;
