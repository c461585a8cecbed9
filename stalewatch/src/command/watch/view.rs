//! The watch's view of the host's namespaces and conntrack tables: what
//! the evidence for a report costs to gather, with the caches and sockets
//! that keep that cost down (a flood of failing flows must not become a
//! flood of conntrack dumps).

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use stalewatch_common::ct_status;

use super::rules::Rules;
use crate::{
    correlate::{RaisedFlow, audit},
    domain::{
        AlertState, Backend, Entry, Evidence, KnownFacts, NatIntent, NetnsInfo, Observation,
        PortHolder, Proto, Service, Siblings, Tuple,
    },
    error::chain,
    source::{
        conntrack::{self, Conn, Filter},
        netns, sockets,
    },
};

const NETNS_TTL: Duration = Duration::from_secs(10);
const HOLDER_TTL: Duration = Duration::from_secs(10);

/// A port in a namespace: the namespace's path, the protocol, the address
/// and the port.
type PortKey = (PathBuf, Proto, IpAddr, u16);
/// Entries' zones by their original and reply tuples.
type Zones = HashMap<(Tuple, Tuple), u16>;
const SIBLINGS_TTL: Duration = Duration::from_secs(2);
/// The audited namespace's addresses and failed neighbours, as a due
/// report's judgement takes them, are read at most this often: a flood of
/// 50,000 flows to one service asked for them once per flow.
const FACTS_TTL: Duration = Duration::from_secs(1);
/// The same for reminders: a service's siblings cost a conntrack dump that
/// walks the whole table and copies every entry of the service.
const REMINDER_SIBLINGS_TTL: Duration = Duration::from_secs(30);
/// Raised flows of one namespace checked one by one; beyond, one dump.
/// The same for the zones of alerts, per second.
const LOOKUPS_PER_NETNS: usize = 32;
/// How long the zones of one dump answer for: an alert names the zone of
/// its entry, and 50,000 flows raised in a second would otherwise cost a
/// conntrack look-up each.
const ZONES_TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct View {
    /// Namespaces by inode, looked up at most every NETNS_TTL: describing
    /// one scans /proc.
    namespaces: HashMap<u32, (NetnsInfo, Instant)>,
    /// Siblings by service, read at most every SIBLINGS_TTL: a flood of
    /// failing flows to one service costs one conntrack dump, not one each.
    siblings: HashMap<(u32, Service), (Option<Siblings>, Instant)>,
    /// Conntrack sockets by namespace, for one round of the loop (a batch
    /// of reports, a tick), then closed: a socket keeps a deleted
    /// namespace alive.
    conns: HashMap<PathBuf, Rc<Conn>>,
    /// Whether the namespace facts could not be read at the last audit:
    /// said once, not every interval.
    facts_failed: bool,
    /// The namespace facts last read, with where and when.
    recent_facts: Option<(PathBuf, Instant, KnownFacts)>,
    /// The audited namespace's NAT intent, as last read.
    rules: Rules,
    /// Who holds a port's socket, by namespace and port, looked up at most
    /// every HOLDER_TTL: the lookup walks every process's open files, and
    /// many flows may bypass one port.
    holders: HashMap<PortKey, (Option<PortHolder>, Instant)>,
    /// Zones of a namespace's entries by their tuples, from one dump, and
    /// when: read once alerts ask more than LOOKUPS_PER_NETNS a second.
    zones: Option<(u32, Instant, Zones)>,
    /// Zones asked this second: (namespace, since, how many).
    zones_asked: Option<(u32, Instant, usize)>,
}

impl View {
    /// The process holding the socket `proto` flows to `addr:port` land on
    /// in the namespace at `path` (see [`sockets::holder`]).
    pub fn holder(
        &mut self,
        path: &Path,
        proto: Proto,
        addr: IpAddr,
        port: u16,
    ) -> Option<PortHolder> {
        let key = (path.to_owned(), proto, addr, port);
        if let Some((holder, at)) = self.holders.get(&key)
            && at.elapsed() < HOLDER_TTL
        {
            return holder.clone();
        }
        self.holders.retain(|_, (_, at)| at.elapsed() < HOLDER_TTL);
        let holder = sockets::holder(path, proto, addr, port);
        self.holders.insert(key, (holder.clone(), Instant::now()));
        holder
    }

    /// Closes the sockets of the round.
    pub fn end_round(&mut self) {
        self.conns.clear();
        // A dump's zones are megabytes for a large table: not kept past
        // their use.
        if self
            .zones
            .as_ref()
            .is_some_and(|(_, at, _)| at.elapsed() >= ZONES_TTL)
        {
            self.zones = None;
        }
    }

    pub fn netns_info(&mut self, inode: u32) -> NetnsInfo {
        match self.namespaces.get(&inode) {
            Some((info, at)) if at.elapsed() < NETNS_TTL => info.clone(),
            _ => {
                let info = netns::describe(inode);
                self.namespaces
                    .insert(inode, (info.clone(), Instant::now()));
                info
            }
        }
    }

    fn netns_path(&mut self, inode: u32) -> Option<PathBuf> {
        netns::path_of(&self.netns_info(inode))
    }

    /// A conntrack socket in the namespace at `path`, opened once per round.
    fn conn(&mut self, path: &Path) -> Option<Rc<Conn>> {
        if let Some(conn) = self.conns.get(path) {
            return Some(conn.clone());
        }
        let conn = Conn::open(Some(path))
            .map_err(|e| log::warn!("conntrack in {}: {}", path.display(), chain(&e)))
            .ok()?;
        let conn = Rc::new(conn);
        self.conns.insert(path.to_owned(), conn.clone());
        Some(conn)
    }

    /// What the correlator needs to judge a report due for an alert in
    /// `state`: does its entry still exist (unless the report is younger
    /// than `fresh`: the failing packet carried the entry), and where do
    /// its siblings go (unless the engine delivers it here by design).
    pub fn evidence(
        &mut self,
        flow: &Observation,
        state: AlertState,
        fresh: Duration,
        now: Duration,
        proxied: bool,
    ) -> Evidence {
        if now.saturating_sub(flow.last) >= fresh
            && self.entry_exists(flow.netns, &flow.orig, &flow.reply) == Some(false)
        {
            return Evidence {
                entry_exists: Some(false),
                siblings: None,
                dnat_now: None,
                rule_backends: None,
            };
        }
        // A reminder may take siblings read a while ago: thousands of
        // flows of one service are reminded of together.
        let max_age = match state {
            AlertState::Reminder => REMINDER_SIBLINGS_TTL,
            _ => SIBLINGS_TTL,
        };
        let siblings = if flow.local && proxied {
            None
        } else {
            self.siblings_of(flow, max_age)
        };
        // The rules' word where the siblings name no other backend: a
        // lone flow (asked per due report, so only when it helps).
        let lone = siblings
            .as_ref()
            .is_none_or(|s| s.dnat_backends.keys().all(|b| *b == flow.backend()));
        let rules = if flow.local {
            siblings.as_ref().and_then(|_| self.dnat_now(flow))
        } else if lone {
            self.rule_backends(flow).map(|b| (None, b))
        } else {
            None
        };
        Evidence {
            entry_exists: None,
            dnat_now: rules.as_ref().and_then(|(now, _)| *now),
            rule_backends: rules.map(|(_, b)| b),
            siblings,
        }
    }

    /// The audited namespace's NAT intent, where `flow` is in it and its
    /// rules could be read (and name a DNAT at all), with the path.
    fn intent_of(&mut self, flow: &Observation) -> Option<(PathBuf, Arc<NatIntent>)> {
        if self.rules.inode() != Some(flow.netns) {
            return None;
        }
        let info = self.netns_info(flow.netns);
        let path = netns::path_of(&info)?;
        // Asked per due report: the intent as last made (the loop's tick
        // hears the changes and the audit takes them).
        let intent = self.rules.current(&path)?;
        (!intent.read().is_empty()).then_some((path, intent))
    }

    /// Whether a current rule of the flow's namespace would DNAT a flow
    /// delivered to this host now, and where to; `None` where its rules
    /// cannot be read (the watch reads those of the audited namespace).
    fn dnat_now(&mut self, flow: &Observation) -> Option<(Option<bool>, Vec<Backend>)> {
        let (path, intent) = self.intent_of(flow)?;
        let mut facts = self.recent_facts(&path).clone();
        facts.arrives_on = netns::arrival_interfaces(&path, vec![flow.orig.src]).ok()?;
        let now = audit::dnat_now(&flow.orig, &intent, &facts);
        Some((
            Some(now.is_some()),
            now.map(|n| n.backends).unwrap_or_default(),
        ))
    }

    /// Where the current rules of the flow's namespace DNAT its service;
    /// `None` where they cannot be read.
    fn rule_backends(&mut self, flow: &Observation) -> Option<Vec<Backend>> {
        let (path, intent) = self.intent_of(flow)?;
        let facts = self.recent_facts(&path);
        Some(audit::rule_backends(&flow.orig, &intent, facts))
    }

    /// Whether the conntrack entry of a flow still exists (see the free
    /// function); `None` when that cannot be told.
    fn entry_exists(&mut self, netns: u32, orig: &Tuple, reply: &Tuple) -> Option<bool> {
        let path = self.netns_path(netns)?;
        entry_exists(&*self.conn(&path)?, orig, reply)
    }

    /// The zone of the conntrack entry `orig`/`reply` (0 when it cannot be
    /// told): looked up alone, or, when alerts ask many a second, from one
    /// dump of the namespace's table.
    pub fn zone_of(&mut self, netns: u32, orig: &Tuple, reply: &Tuple) -> u16 {
        let key = (*orig, *reply);
        let dumped = self
            .zones
            .as_ref()
            .filter(|(n, at, _)| *n == netns && at.elapsed() < ZONES_TTL);
        if let Some((_, _, zones)) = dumped {
            if let Some(zone) = zones.get(&key) {
                return *zone;
            }
        } else {
            let asked = match self.zones_asked {
                Some((n, since, count))
                    if n == netns && since.elapsed() < Duration::from_secs(1) =>
                {
                    (n, since, count + 1)
                }
                _ => (netns, Instant::now(), 1),
            };
            self.zones_asked = Some(asked);
            if asked.2 > LOOKUPS_PER_NETNS
                && let Some(zones) = self.dump_zones(netns)
            {
                let zone = zones.get(&key).copied();
                self.zones = Some((netns, Instant::now(), zones));
                if let Some(zone) = zone {
                    return zone;
                }
            }
        }
        self.locate(netns, orig, reply).map_or(0, |e| e.zone)
    }

    /// The zones of every entry of a namespace, by their tuples (one dump
    /// of its table).
    fn dump_zones(&mut self, netns: u32) -> Option<Zones> {
        let path = self.netns_path(netns)?;
        let table = self
            .conn(&path)?
            .dump(&Filter::default())
            .map_err(|e| log::warn!("reading conntrack: {}", chain(&e)))
            .ok()?;
        log::debug!(
            "the zones of {} entries of {} read in one dump",
            table.len(),
            path.display()
        );
        let mut zones = HashMap::with_capacity(table.len());
        for e in table {
            // In several zones alike: ambiguous, as `locate` says.
            zones
                .entry((e.orig, e.reply))
                .and_modify(|z| {
                    if *z != e.zone {
                        *z = 0;
                    }
                })
                .or_insert(e.zone);
        }
        Some(zones)
    }

    /// The conntrack entry of a flow as judged (its tuples), with its zone
    /// and id: `None` when it is gone, was replaced, is found in several
    /// zones alike, or cannot be read.
    pub fn locate(&mut self, netns: u32, orig: &Tuple, reply: &Tuple) -> Option<Entry> {
        let path = self.netns_path(netns)?;
        match locate(&*self.conn(&path)?, orig, reply) {
            Some(Located::Found(entry)) => Some(entry),
            _ => None,
        }
    }

    /// What the conntrack table of the flow's namespace shows of its
    /// siblings: the DNATed entries to the same service (the flow's own
    /// entry, if DNATed, goes to the stale backend, which the verdict sets
    /// apart). `None` when the table cannot be read.
    fn siblings_of(&mut self, flow: &Observation, max_age: Duration) -> Option<Siblings> {
        let service = flow.orig.service();
        let key = (flow.netns, service);
        if let Some((siblings, at)) = self.siblings.get(&key)
            && at.elapsed() < max_age
        {
            return siblings.clone();
        }
        let path = self.netns_path(flow.netns);
        let filter = Filter {
            family: Some(service.family()),
            proto: Some(service.proto),
            status: Some((ct_status::DST_NAT, ct_status::DST_NAT)),
            orig_dst: Some((service.addr, service.port)),
            orig_src: None,
        };
        let siblings = path.and_then(|path| {
            let entries = self
                .conn(&path)?
                .dump(&filter)
                .map_err(|e| log::warn!("reading conntrack for siblings: {}", chain(&e)))
                .ok()?;
            let mut siblings = Siblings::default();
            for entry in &entries {
                *siblings.dnat_backends.entry(entry.backend()).or_default() += 1;
            }
            Some(siblings)
        });
        self.siblings
            .retain(|_, (_, at)| at.elapsed() < REMINDER_SIBLINGS_TTL);
        self.siblings
            .insert(key, (siblings.clone(), Instant::now()));
        siblings
    }

    /// Which of `flows` (all of namespace `netns`) no longer have their
    /// conntrack entry; `None` when the table cannot be read.
    pub fn missing_entries(&mut self, netns: u32, flows: &[RaisedFlow]) -> Option<Vec<RaisedFlow>> {
        let path = self.netns_path(netns)?;
        let conn = self.conn(&path)?;
        if flows.len() <= LOOKUPS_PER_NETNS {
            return Some(
                flows
                    .iter()
                    .filter(|f| entry_exists(&conn, &f.orig, &f.reply) == Some(false))
                    .copied()
                    .collect(),
            );
        }
        // Many: one dump of the table beats a lookup each.
        let present = self.dump_zones(netns)?;
        Some(
            flows
                .iter()
                .filter(|f| !present.contains_key(&(f.orig, f.reply)))
                .copied()
                .collect(),
        )
    }

    /// Whether the audited namespace announced a ruleset change since the
    /// last look (without reading the rules).
    pub fn intent_changed(&mut self) -> bool {
        self.rules.changed()
    }

    /// The NAT intent of the namespace at `path` (see [`Rules::read`]).
    pub fn intent(&mut self, path: &Path) -> Option<Arc<NatIntent>> {
        self.rules.read(path)
    }

    /// What the audit needs of the namespace at `path`: its addresses and
    /// failed neighbours. When they cannot be read the audit runs without
    /// them (finding nothing), and the log says so once.
    pub fn facts(&mut self, path: &Path) -> KnownFacts {
        match netns::facts(path) {
            Ok(facts) => {
                if std::mem::take(&mut self.facts_failed) {
                    log::warn!("audit: the namespace's addresses can be read again");
                }
                self.recent_facts = Some((path.to_owned(), Instant::now(), facts.clone()));
                facts
            }
            Err(e) => {
                if !std::mem::replace(&mut self.facts_failed, true) {
                    log::warn!(
                        "audit: cannot read the addresses of {} ({e}): bypasses are not \
                         looked for until they can be",
                        path.display()
                    );
                }
                KnownFacts::default()
            }
        }
    }
}

impl View {
    /// The facts of the namespace at `path`, read again when older than
    /// FACTS_TTL (see [`View::facts`]).
    fn recent_facts(&mut self, path: &Path) -> &KnownFacts {
        let fresh = self
            .recent_facts
            .as_ref()
            .is_some_and(|(p, at, _)| p == path && at.elapsed() < FACTS_TTL);
        if !fresh {
            let facts = self.facts(path);
            self.recent_facts = Some((path.to_owned(), Instant::now(), facts));
        }
        let (_, _, facts) = self
            .recent_facts
            .get_or_insert_with(|| (path.to_owned(), Instant::now(), KnownFacts::default()));
        facts
    }
}

/// Whether the conntrack entry `orig`/`reply` still exists in the namespace
/// of `conn`, in any zone; `None` when that cannot be told. A live flow gets
/// a new entry with the same original tuple at once when its entry is
/// deleted: that one differs in its reply (the backend), and is not the
/// stale entry.
fn entry_exists(conn: &Conn, orig: &Tuple, reply: &Tuple) -> Option<bool> {
    locate(conn, orig, reply).map(|l| !matches!(l, Located::Missing))
}

/// Where a judged entry is now.
enum Located {
    Found(Entry),
    /// Entries of several zones have its tuples.
    Ambiguous,
    Missing,
}

/// Finds the entry `orig`/`reply`: first in the default zone (one hash
/// look-up), then, when it is not there, in every zone (a dump filtered to
/// the original tuple, which walks the table: zoned flows cost more).
fn locate(conn: &Conn, orig: &Tuple, reply: &Tuple) -> Option<Located> {
    let warn = |e: conntrack::Error| log::warn!("looking up a conntrack entry: {}", chain(&e));
    if let Some(entry) = conn.get(orig).map_err(warn).ok()?
        && entry.reply == *reply
    {
        return Some(Located::Found(entry));
    }
    let mut found: Vec<Entry> = conn
        .find(orig)
        .map_err(warn)
        .ok()?
        .into_iter()
        .filter(|e| e.reply == *reply)
        .collect();
    Some(match found.len() {
        0 => Located::Missing,
        1 => Located::Found(found.remove(0)),
        _ => Located::Ambiguous,
    })
}
