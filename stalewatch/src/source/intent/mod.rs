//! The NAT intent reader: which backends a namespace's current rules can
//! DNAT each flow to, read from the rules themselves, for every rule
//! engine the namespace uses: native nftables (`nft -j list ruleset`),
//! iptables-nft and iptables-legacy (`iptables-save -t nat` of each, both
//! families). The tools run inside the namespace; one that is not
//! installed, or a backend with no `nat` table there, is skipped.
//!
//! Reading costs a few process runs: the watch reads again when the
//! ruleset changes (see [`Changes`]) or at its audit interval, never per
//! packet.

mod iptables;
mod nft;

use std::{
    io,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::netns;
use crate::domain::{EngineRead, Family, NatIntent, RuleEngine};

/// Why the intent could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot enter network namespace {0}")]
    Netns(String, #[source] io::Error),
}

/// Reads the NAT intent of the namespace at `path`. An engine whose tool
/// fails is left out, with a log line.
pub fn read(path: &Path) -> Result<NatIntent, Error> {
    netns::in_netns(path, read_here).map_err(|e| Error::Netns(path.display().to_string(), e))
}

/// The intent of the namespace this thread is in.
fn read_here() -> NatIntent {
    let (mut rules, mut read) = (Vec::new(), Vec::new());
    // iptables-nft's tables show in nft's listing as `nat` tables of rules
    // with compat statements; without nft, ask iptables-nft anyway.
    let mut nft_nat_tables: Option<(bool, bool)> = None;
    // iptables-nft DNATs that nft showed, to be read by iptables-nft-save.
    let mut iptables_nft_owed = false;
    if let Some(json) = run("nft", &["-j", "list", "ruleset"]) {
        match nft::parse(&json) {
            Ok(parsed) => {
                rules.extend(parsed.rules);
                read.push(EngineRead {
                    engine: RuleEngine::Nftables,
                    complete: parsed.complete,
                });
                iptables_nft_owed = parsed.iptables_dnat;
            }
            Err(e) => log::warn!("nftables: cannot read `nft -j list ruleset`: {e}"),
        }
        nft_nat_tables = Some((
            json.contains(r#""family": "ip", "name": "nat""#),
            json.contains(r#""family": "ip6", "name": "nat""#),
        ));
    }
    let (v4_nft, v6_nft) = nft_nat_tables.unwrap_or((true, true));
    let legacy = std::fs::read_to_string("/proc/thread-self/net/ip_tables_names")
        .is_ok_and(|names| names.lines().any(|l| l == "nat"));
    let legacy6 = std::fs::read_to_string("/proc/thread-self/net/ip6_tables_names")
        .is_ok_and(|names| names.lines().any(|l| l == "nat"));
    for (wanted, tool, engine, family) in [
        (
            v4_nft,
            "iptables-nft-save",
            RuleEngine::IptablesNft,
            Family::Ipv4,
        ),
        (
            v6_nft,
            "ip6tables-nft-save",
            RuleEngine::IptablesNft,
            Family::Ipv6,
        ),
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
        rules.extend(found);
        read.push(EngineRead { engine, complete });
        iptables_nft_owed &= engine != RuleEngine::IptablesNft;
    }
    if iptables_nft_owed {
        // DNATs nft showed and no iptables-nft-save read: not a reading
        // that can say a flow has no rule.
        read.push(EngineRead {
            engine: RuleEngine::IptablesNft,
            complete: false,
        });
    }
    NatIntent::new(rules, read)
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
}

/// `NFNLGRP_NFTABLES` (include/uapi/linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;

impl Changes {
    /// Listens in the namespace at `path`.
    pub fn listen(path: &Path) -> io::Result<Changes> {
        let socket = netns::in_netns(path, || -> io::Result<Socket> {
            let mut socket = Socket::new(NETLINK_NETFILTER)?;
            socket.bind(&SocketAddr::new(0, 0))?;
            socket.add_membership(NFNLGRP_NFTABLES)?;
            socket.set_non_blocking(true)?;
            Ok(socket)
        })??;
        Ok(Changes { socket })
    }

    /// Whether anything changed since the last call: reads every pending
    /// announcement without blocking. A full receive queue (a storm of
    /// changes) counts as a change.
    pub fn any(&mut self) -> bool {
        let mut changed = false;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.socket.recv(&mut &mut buf[..], 0) {
                Ok(0) => return changed,
                Ok(_) => changed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return changed,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => changed = true,
                Err(e) => {
                    log::debug!("ruleset announcements: {e}");
                    return true;
                }
            }
        }
    }

    /// The socket's descriptor, to wait on.
    pub fn fd(&self) -> i32 {
        self.socket.as_raw_fd()
    }
}

#[cfg(test)]
mod tests;
