//! Reporting: an alert becomes one [`Record`], rendered as a JSON line for
//! programs or as a short block of text for people. Both renderings come
//! from the same record, so they cannot disagree.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, Write},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    correlate::{Alert, AlertState, Resolution, Verdict},
    event::{DropEvidence, Family, IcmpEvidence, Proto, Tuple},
    netns::NetnsInfo,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Maps the kernel's CLOCK_MONOTONIC stamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub monotonic: Duration,
    pub wall: SystemTime,
}

impl Clock {
    pub fn wall_of(&self, monotonic: Duration) -> SystemTime {
        match monotonic.checked_sub(self.monotonic) {
            Some(ahead) => self.wall + ahead,
            None => self.wall - (self.monotonic - monotonic),
        }
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Endpoint {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// The container with this address, where a Docker engine tells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::docker::ContainerRef>,
}

impl Backend {
    pub fn at(addr: IpAddr, port: u16) -> Backend {
        Backend {
            addr,
            port,
            container: None,
        }
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Failures {
    /// Packets lost since the first failure.
    pub packets: u32,
    pub first: String,
    pub last: String,
    pub duration_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpEvidence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropEvidence>,
}

/// One line of `stalewatch watch --format json`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    StaleFlow(Box<StaleFlow>),
    /// Reminders of several flows of one service, pinned alike.
    StaleService(Box<StaleService>),
    /// A stale entry found by `stalewatch check`.
    StaleEntry(Box<StaleEntry>),
    /// A stale entry deleted by `--fix`.
    EntryDeleted(Box<EntryDeleted>),
    /// Events the kernel could not hand over (ring buffer full).
    EventsLost {
        time: String,
        count: u64,
        total: u64,
    },
}

/// What every record of a pinned flow or entry says, whatever else it
/// holds: the verdict, where (namespace, family, protocol), the backend the
/// conntrack entry pins it to, the service's backend now, and why. The
/// Docker engine names the containers in it.
#[derive(Debug, Serialize, PartialEq)]
pub struct Pinned {
    pub verdict: Verdict,
    pub netns: NetnsInfo,
    pub family: Family,
    pub proto: Proto,
    pub stale_backend: Backend,
    /// Where the service sends new flows now, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_backend: Option<Backend>,
    /// The facts behind the verdict.
    pub evidence: Vec<String>,
}

impl Pinned {
    fn new(
        verdict: Verdict,
        netns: NetnsInfo,
        orig: &Tuple,
        reply: &Tuple,
        current: &[crate::correlate::Backend],
        evidence: Vec<String>,
    ) -> Self {
        Pinned {
            verdict,
            netns,
            family: orig.family,
            proto: orig.proto,
            stale_backend: Backend::at(reply.src, reply.sport),
            current_backend: current.first().map(|&(addr, port)| Backend::at(addr, port)),
            evidence,
        }
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct StaleFlow {
    pub state: AlertState,
    pub time: String,
    #[serde(flatten)]
    pub pin: Pinned,
    pub orig: Endpoint,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    pub failures: Failures,
    /// Why, in a sentence.
    pub cause: String,
    /// The command that deletes exactly this entry.
    pub fix: String,
}

/// The reminders of several flows of one service that fail alike (same
/// namespace, verdict and stale backend), in one record: the thousands of
/// flows one redeploy can pin make one line a reminder interval, not
/// thousands. The fields are a stale flow's, but for the destination
/// (`service`), the count of `flows`, their summed failures, and a fix
/// that deletes every entry of the service pinned to the stale backend.
#[derive(Debug, Serialize, PartialEq)]
pub struct StaleService {
    pub state: AlertState,
    pub time: String,
    #[serde(flatten)]
    pub pin: Pinned,
    pub service: Service,
    /// The flows reminded of in this record.
    pub flows: u32,
    pub failures: ServiceFailures,
    /// Why, in a sentence (of each flow).
    pub cause: String,
    pub fix: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Service {
    pub dst: IpAddr,
    pub dport: u16,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceFailures {
    /// Packets lost by these flows since their first failures.
    pub packets: u64,
    /// The earliest first failure and the latest failure of any of them.
    pub first: String,
    pub last: String,
}

impl StaleService {
    /// The record of a group of reminders, from the record of one of its
    /// flows (named and annotated as any flow is).
    pub fn of(one: StaleFlow, group: &ReminderGroup, clock: &Clock) -> Self {
        let orig = &group.alert.flow.orig;
        StaleService {
            state: one.state,
            time: one.time,
            fix: service_fix_command(orig, &one.pin.stale_backend, &one.pin.netns),
            pin: one.pin,
            service: Service {
                dst: orig.dst,
                dport: orig.dport,
            },
            flows: group.flows,
            failures: ServiceFailures {
                packets: group.packets,
                first: rfc3339(clock.wall_of(group.first)),
                last: rfc3339(clock.wall_of(group.last)),
            },
            cause: one.cause,
        }
    }
}

/// Reminders gathered over one round of the watch loop, grouped by
/// namespace, service, verdict and stale backend.
#[derive(Debug, Default)]
pub struct Reminders {
    groups: HashMap<ReminderKey, ReminderGroup>,
}

type ReminderKey = (u32, Family, Proto, IpAddr, u16, Verdict, IpAddr, u16);

/// Reminders of flows that fail alike: the first one, and the sums.
#[derive(Debug)]
pub struct ReminderGroup {
    pub alert: Alert,
    pub flows: u32,
    pub packets: u64,
    /// The earliest first failure and the latest failure (monotonic).
    pub first: Duration,
    pub last: Duration,
}

impl Reminders {
    pub fn add(&mut self, alert: &Alert) {
        let f = &alert.flow;
        let (addr, port) = f.backend();
        let key = (
            f.netns,
            f.orig.family,
            f.orig.proto,
            f.orig.dst,
            f.orig.dport,
            alert.verdict,
            addr,
            port,
        );
        let packets = u64::from(f.failures());
        match self.groups.get_mut(&key) {
            Some(g) => {
                g.flows += 1;
                g.packets += packets;
                g.first = g.first.min(f.first);
                g.last = g.last.max(f.last);
            }
            None => {
                self.groups.insert(
                    key,
                    ReminderGroup {
                        alert: alert.clone(),
                        flows: 1,
                        packets,
                        first: f.first,
                        last: f.last,
                    },
                );
            }
        }
    }

    /// The groups gathered, in a stable order, leaving none.
    pub fn take(&mut self) -> Vec<ReminderGroup> {
        let mut groups: Vec<(ReminderKey, ReminderGroup)> = self.groups.drain().collect();
        groups.sort_by_key(|(key, _)| *key);
        groups.into_iter().map(|(_, g)| g).collect()
    }
}

/// One finding of `stalewatch check`, with the same names as a stale flow.
#[derive(Debug, Serialize, PartialEq)]
pub struct StaleEntry {
    #[serde(flatten)]
    pub pin: Pinned,
    pub orig: Endpoint,
    pub fix: String,
}

impl StaleEntry {
    pub fn new(finding: &crate::audit::Finding, netns: NetnsInfo) -> Self {
        let e = &finding.entry;
        StaleEntry {
            fix: fix_command(&e.orig, &netns),
            orig: Endpoint::of(&e.orig),
            pin: Pinned::new(
                finding.verdict,
                netns,
                &e.orig,
                &e.reply,
                &finding.current_backends,
                finding.evidence.clone(),
            ),
        }
    }
}

/// A conntrack entry that `--fix` deleted.
#[derive(Debug, Serialize, PartialEq)]
pub struct EntryDeleted {
    pub time: String,
    pub netns: NetnsInfo,
    pub family: Family,
    pub proto: Proto,
    pub orig: Endpoint,
    pub stale_backend: Backend,
}

impl EntryDeleted {
    pub fn new(orig: &Tuple, reply: &Tuple, netns: NetnsInfo) -> Self {
        EntryDeleted {
            time: rfc3339(SystemTime::now()),
            netns,
            family: orig.family,
            proto: orig.proto,
            orig: Endpoint::of(orig),
            stale_backend: Backend::at(reply.src, reply.sport),
        }
    }
}

impl Endpoint {
    fn of(t: &Tuple) -> Endpoint {
        Endpoint {
            src: t.src,
            sport: t.sport,
            dst: t.dst,
            dport: t.dport,
        }
    }
}

impl StaleFlow {
    pub fn new(alert: &Alert, netns: NetnsInfo, clock: &Clock) -> Self {
        let flow = &alert.flow;
        let (addr, port) = flow.backend();
        let o = &flow.orig;
        let backend = addr_port(addr, port);
        let cause = match alert.verdict {
            Verdict::Bypass => format!(
                "its conntrack entry was made while no DNAT existed: it delivers the flow to this \
                 host ({backend}) and NAT rules are not consulted again while the entry lives"
            ),
            Verdict::BackendDown => format!(
                "every flow to this service fails at {backend}: the backend is down, \
                 deleting the entry alone will not help"
            ),
            Verdict::Stale | Verdict::Unconfirmed => format!(
                "its conntrack entry still sends it to {backend}, which the host can no longer \
                 reach; NAT rules are not consulted again while the entry lives"
            ),
        };
        StaleFlow {
            state: alert.state,
            resolution: alert.resolution,
            time: rfc3339(clock.wall_of(alert.at)),
            fix: fix_command(o, &netns),
            pin: Pinned::new(
                alert.verdict,
                netns,
                o,
                &flow.reply,
                &alert.current_backends,
                alert.evidence.clone(),
            ),
            orig: Endpoint::of(o),
            failures: Failures {
                packets: flow.failures(),
                first: rfc3339(clock.wall_of(flow.first)),
                last: rfc3339(clock.wall_of(flow.last)),
                duration_s: (alert.failing_for.as_millis() as f64) / 1000.0,
                icmp: flow.icmp,
                drop: flow.drops.clone(),
            },
            cause,
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `[addr]:port` for IPv6, `addr:port` for IPv4.
pub fn addr_port(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

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
pub fn service_fix_command(orig: &Tuple, backend: &Backend, netns: &NetnsInfo) -> String {
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
    let mut cmd = in_netns(netns);
    let family = match orig.family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    };
    let _ = write!(cmd, "conntrack -D -f {family} -p {}", orig.proto.name());
    cmd
}

/// The words that run a command in `netns` (none for our own).
fn in_netns(netns: &NetnsInfo) -> String {
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

fn icmp_meaning(icmp: &IcmpEvidence) -> &'static str {
    match icmp.code {
        0 => "network unreachable",
        1 => "host unreachable",
        2 => "protocol unreachable",
        3 => "port unreachable",
        9 | 10 | 13 => "administratively prohibited",
        _ => "destination unreachable",
    }
}

/// `addr:port`, with the container's name where one is known.
fn backend_label(b: &Backend) -> String {
    let at = addr_port(b.addr, b.port);
    match &b.container {
        Some(c) if c.gone => format!("{at} (container {}, gone)", c.name),
        Some(c) => format!("{at} (container {})", c.name),
        None => at,
    }
}

fn netns_label(ns: &NetnsInfo) -> String {
    match &ns.name {
        Some(name) => format!("netns {name}, inode {}", ns.inode),
        None if ns.is_own => format!("host netns, inode {}", ns.inode),
        None => format!("netns inode {}", ns.inode),
    }
}

/// The line that says where new flows go, where known.
fn now_line(s: &mut String, pin: &Pinned) {
    if let Some(now) = &pin.current_backend {
        let _ = writeln!(s, "  now        {} for new flows", backend_label(now));
    }
}

fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Stale => "stale",
        Verdict::BackendDown => "backend down",
        Verdict::Unconfirmed => "unconfirmed",
        Verdict::Bypass => "bypass",
    }
}

/// `": a; b"`, or nothing for no items.
fn colon_list(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(": {}", items.join("; "))
    }
}

/// Writes records in the chosen format. The caller flushes once a round of
/// work (`watch`: a batch of reports, a tick), so that a pipeline sees each
/// alert as it happens without a write for each of thousands of lines.
pub struct Reporter<W: Write> {
    format: Format,
    out: W,
}

impl<W: Write> Reporter<W> {
    pub fn new(format: Format, out: W) -> Self {
        Reporter { format, out }
    }

    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, record)?;
                self.out.write_all(b"\n")?;
            }
            Format::Text => self.out.write_all(text(record).as_bytes())?,
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The text rendering, for people.
pub fn text(record: &Record) -> String {
    let mut s = String::new();
    match record {
        Record::StaleEntry(e) => {
            let o = &e.orig;
            let verdict = match e.pin.verdict {
                Verdict::Bypass => "STALE ENTRY (bypasses DNAT)",
                Verdict::BackendDown => "BACKEND DOWN",
                _ => "STALE ENTRY",
            };
            let _ = writeln!(
                s,
                "{verdict}  {} {} -> {}  ({})",
                e.pin.proto.name(),
                addr_port(o.src, o.sport),
                addr_port(o.dst, o.dport),
                netns_label(&e.pin.netns),
            );
            let _ = writeln!(s, "  pinned to  {}", backend_label(&e.pin.stale_backend));
            now_line(&mut s, &e.pin);
            let _ = writeln!(s, "  evidence   {}", e.pin.evidence.join("; "));
            let _ = writeln!(s, "  fix        {}", e.fix);
        }
        Record::EntryDeleted(d) => {
            let o = &d.orig;
            let _ = writeln!(
                s,
                "{} DELETED  {} {} -> {} pinned to {}  ({})",
                d.time,
                d.proto.name(),
                addr_port(o.src, o.sport),
                addr_port(o.dst, o.dport),
                addr_port(d.stale_backend.addr, d.stale_backend.port),
                netns_label(&d.netns),
            );
        }
        Record::EventsLost { time, count, total } => {
            let _ = writeln!(
                s,
                "{time} WARNING {count} kernel events lost ({total} in all): \
                 some failing flows may be reported late"
            );
        }
        Record::StaleService(a) => {
            let state = match a.pin.verdict {
                Verdict::BackendDown => "BACKEND DOWN (still failing)",
                Verdict::Bypass => "STALE FLOWS (bypass DNAT, still failing)",
                _ => "STALE FLOWS (still failing)",
            };
            let _ = writeln!(
                s,
                "{} {state}  {} {} flows -> {}  ({})",
                a.time,
                a.pin.proto.name(),
                a.flows,
                addr_port(a.service.dst, a.service.dport),
                netns_label(&a.pin.netns),
            );
            let _ = writeln!(
                s,
                "  pinned to  {} by their conntrack entries",
                backend_label(&a.pin.stale_backend)
            );
            now_line(&mut s, &a.pin);
            let _ = writeln!(
                s,
                "  verdict    {}{}",
                verdict_word(a.pin.verdict),
                colon_list(&a.pin.evidence)
            );
            let f = &a.failures;
            let _ = writeln!(
                s,
                "  kernel     {} packets failed since {} (latest {})",
                f.packets, f.first, f.last
            );
            let _ = writeln!(s, "  cause      of each, {}", a.cause);
            let _ = writeln!(
                s,
                "  fix        {}  (the {} entries pinned to {})",
                a.fix,
                a.flows,
                addr_port(a.pin.stale_backend.addr, a.pin.stale_backend.port)
            );
        }
        Record::StaleFlow(a) => {
            let o = &a.orig;
            let mut ns = netns_label(&a.pin.netns);
            if let Some(pid) = a.pin.netns.pid {
                let _ = write!(ns, ", pid {pid}");
            }
            match (&a.pin.netns.container, &a.pin.netns.container_id) {
                (Some(c), _) => {
                    let _ = write!(ns, ", container {}", c.name);
                }
                (None, Some(id)) => {
                    let _ = write!(ns, ", container {}", &id[..id.len().min(12)]);
                }
                (None, None) => {}
            }
            let state = match (a.state, a.pin.verdict) {
                (AlertState::Resolved, _) => "RESOLVED",
                (AlertState::Raised, Verdict::BackendDown) => "BACKEND DOWN",
                (AlertState::Raised, Verdict::Bypass) => "STALE FLOW (bypasses DNAT)",
                (AlertState::Reminder, Verdict::BackendDown) => "BACKEND DOWN (still failing)",
                (AlertState::Raised, _) => "STALE FLOW",
                (AlertState::Reminder, _) => "STALE FLOW (still failing)",
            };
            let _ = writeln!(
                s,
                "{} {state}  {} {} -> {}  ({ns})",
                a.time,
                a.pin.proto.name(),
                addr_port(o.src, o.sport),
                addr_port(o.dst, o.dport),
            );
            let backend = backend_label(&a.pin.stale_backend);
            let f = &a.failures;
            let mut evidence = Vec::new();
            if let Some(icmp) = &f.icmp {
                evidence.push(format!(
                    "ICMP {} (type {} code {}) sent x{}",
                    icmp_meaning(icmp),
                    icmp.icmp_type,
                    icmp.code,
                    icmp.count
                ));
            }
            if let Some(drop) = &f.drop {
                evidence.push(format!("dropped {} x{}", drop.reason, drop.count));
            }
            if a.state == AlertState::Resolved {
                let why = match a.resolution {
                    Some(Resolution::EntryGone) => "its conntrack entry is gone",
                    _ => "failures stopped",
                };
                let _ = writeln!(
                    s,
                    "  was pinned to {backend}; {why} (last failure {}; {} packets lost over {:.1}s)",
                    f.last, f.packets, f.duration_s
                );
                return s;
            }
            if a.pin.verdict == Verdict::Bypass {
                let _ = writeln!(
                    s,
                    "  pinned to  this host ({backend}) by its conntrack entry, without NAT"
                );
            } else {
                let _ = writeln!(s, "  pinned to  {backend} by its conntrack entry");
            }
            now_line(&mut s, &a.pin);
            let _ = writeln!(
                s,
                "  verdict    {}{}",
                verdict_word(a.pin.verdict),
                colon_list(&a.pin.evidence)
            );
            let _ = writeln!(
                s,
                "  kernel     {} packets failed in {:.1}s: {}",
                f.packets,
                f.duration_s,
                evidence.join(", ")
            );
            let _ = writeln!(s, "  cause      {}", a.cause);
            let _ = writeln!(s, "  fix        {}", a.fix);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use stalewatch_common::ct_status;

    use super::*;
    use crate::event::{Observation, udp};

    fn clock() -> Clock {
        Clock {
            monotonic: Duration::from_secs(100),
            wall: UNIX_EPOCH + Duration::from_secs(1_790_000_000),
        }
    }

    fn alert() -> Alert {
        Alert {
            state: AlertState::Raised,
            verdict: Verdict::Stale,
            current_backends: vec![("172.18.0.2".parse().unwrap(), 8888)],
            evidence: vec![
                "newer flows to 192.0.2.1:8888:udp are DNATed to 172.18.0.2:8888, not to 172.17.0.2:8888"
                    .into(),
            ],
            resolution: None,
            flow: Observation {
                local: false,
                ct: 1,
                netns: 4026532100,
                orig: udp("192.0.2.2", 40000, "192.0.2.1", 8888),
                reply: udp("172.17.0.2", 8888, "192.0.2.2", 40000),
                status: ct_status::DST_NAT,
                first: Duration::from_secs(95),
                last: Duration::from_millis(98_500),
                icmp: Some(IcmpEvidence {
                    icmp_type: 3,
                    code: 1,
                    count: 12,
                }),
                drops: Some(DropEvidence {
                    reason: "NEIGH_FAILED".into(),
                    count: 12,
                }),
            },
            at: Duration::from_secs(99),
            failing_for: Duration::from_millis(3500),
        }
    }

    fn named(name: &str) -> NetnsInfo {
        NetnsInfo {
            inode: 4026532100,
            name: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn json_keeps_the_contract() {
        let record = Record::StaleFlow(Box::new(StaleFlow::new(
            &alert(),
            named("sw-router"),
            &clock(),
        )));
        let v: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(v["type"], "stale_flow");
        assert_eq!(v["state"], "raised");
        assert_eq!(v["netns"]["inode"], 4026532100u32);
        assert_eq!(v["netns"]["name"], "sw-router");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["proto"], "udp");
        assert_eq!(
            v["orig"],
            serde_json::json!({"src":"192.0.2.2","sport":40000,"dst":"192.0.2.1","dport":8888})
        );
        assert_eq!(
            v["stale_backend"],
            serde_json::json!({"addr":"172.17.0.2","port":8888})
        );
        assert_eq!(v["verdict"], "stale");
        assert_eq!(
            v["current_backend"],
            serde_json::json!({"addr":"172.18.0.2","port":8888})
        );
        assert!(v["resolution"].is_null());
        assert_eq!(v["failures"]["packets"], 12);
        assert_eq!(v["failures"]["icmp"]["code"], 1);
        assert_eq!(v["failures"]["drop"]["reason"], "NEIGH_FAILED");
        assert_eq!(v["time"], "2026-09-21T14:13:19.000Z");
        assert_eq!(
            v["fix"],
            "ip netns exec sw-router conntrack -D -f ipv4 -p udp -s 192.0.2.2 -d 192.0.2.1 --sport 40000 --dport 8888"
        );
    }

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

    #[test]
    fn text_names_flow_backend_evidence_and_fix() {
        let record = Record::StaleFlow(Box::new(StaleFlow::new(
            &alert(),
            named("sw-router"),
            &clock(),
        )));
        let t = text(&record);
        assert!(t.contains("STALE FLOW  udp 192.0.2.2:40000 -> 192.0.2.1:8888  (netns sw-router, inode 4026532100)"), "{t}");
        assert!(t.contains("pinned to  172.17.0.2:8888"), "{t}");
        assert!(
            t.contains("now        172.18.0.2:8888 for new flows"),
            "{t}"
        );
        assert!(
            t.contains(
                "verdict    stale: newer flows to 192.0.2.1:8888:udp are DNATed to 172.18.0.2:8888"
            ),
            "{t}"
        );
        assert!(t.contains("12 packets failed in 3.5s: ICMP host unreachable (type 3 code 1) sent x12, dropped NEIGH_FAILED x12"), "{t}");
        assert!(
            t.contains("fix        ip netns exec sw-router conntrack -D"),
            "{t}"
        );
    }

    #[test]
    fn containers_are_named_in_json_and_text() {
        let mut flow = StaleFlow::new(&alert(), named("sw-router"), &clock());
        let web = |gone| crate::docker::ContainerRef {
            name: "web-1".into(),
            id: "b147d4685a07".into(),
            compose_project: Some("shop".into()),
            compose_service: Some("web".into()),
            gone,
        };
        flow.pin.stale_backend.container = Some(web(true));
        flow.pin.current_backend.as_mut().unwrap().container = Some(web(false));
        let record = Record::StaleFlow(Box::new(flow));
        let v = serde_json::to_value(&record).unwrap();
        assert_eq!(
            v["current_backend"],
            serde_json::json!({"addr": "172.18.0.2", "port": 8888, "container": {
                "name": "web-1", "id": "b147d4685a07", "compose_project": "shop", "compose_service": "web"}})
        );
        assert_eq!(v["stale_backend"]["container"]["gone"], true);
        let t = text(&record);
        assert!(
            t.contains("pinned to  172.17.0.2:8888 (container web-1, gone) by its conntrack entry"),
            "{t}"
        );
        assert!(
            t.contains("now        172.18.0.2:8888 (container web-1) for new flows"),
            "{t}"
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed_in_text_but_plain_in_json() {
        let mut a = alert();
        a.flow.orig = udp("2001:db8::2", 5353, "2001:db8::1", 53);
        a.flow.reply = udp("2001:db8:1::10", 53, "2001:db8::2", 5353);
        let record = Record::StaleFlow(Box::new(StaleFlow::new(&a, named("r"), &clock())));
        assert!(text(&record).contains("[2001:db8::2]:5353 -> [2001:db8::1]:53"));
        let v = serde_json::to_value(&record).unwrap();
        assert_eq!(v["stale_backend"]["addr"], "2001:db8:1::10");
    }

    /// A reminder of `alert()` from source port `sport`, failing `packets`
    /// packets from `first` to `last` seconds.
    fn reminder(sport: u16, packets: u32, first: u64, last: u64) -> Alert {
        let mut a = alert();
        a.state = AlertState::Reminder;
        a.flow.orig.sport = sport;
        a.flow.reply.dport = sport;
        a.flow.first = Duration::from_secs(first);
        a.flow.last = Duration::from_secs(last);
        a.flow.icmp = None;
        a.flow.drops = Some(DropEvidence {
            reason: "NEIGH_FAILED".into(),
            count: packets,
        });
        a
    }

    #[test]
    fn reminders_of_one_service_pinned_alike_make_one_group() {
        let mut reminders = Reminders::default();
        reminders.add(&reminder(40000, 10, 50, 98));
        reminders.add(&reminder(40001, 20, 40, 99));
        reminders.add(&reminder(40002, 30, 60, 97));
        // Pinned elsewhere, or judged otherwise: groups of their own.
        let mut elsewhere = reminder(40003, 5, 70, 90);
        elsewhere.flow.reply.src = "172.17.0.9".parse().unwrap();
        reminders.add(&elsewhere);
        let mut down = reminder(40004, 5, 70, 90);
        down.verdict = Verdict::BackendDown;
        reminders.add(&down);

        let groups = reminders.take();
        assert_eq!(groups.len(), 3);
        let three = groups.iter().find(|g| g.flows == 3).unwrap();
        assert_eq!(three.packets, 60);
        assert_eq!(three.first, Duration::from_secs(40));
        assert_eq!(three.last, Duration::from_secs(99));
        assert_eq!(three.alert.flow.orig.sport, 40000);
        assert!(groups.iter().filter(|g| g.flows == 1).count() == 2);
        assert!(reminders.take().is_empty(), "take leaves nothing behind");
    }

    #[test]
    fn a_service_record_sums_its_flows_and_fixes_them_all_at_once() {
        let mut reminders = Reminders::default();
        for (i, sport) in [40000, 40001].into_iter().enumerate() {
            reminders.add(&reminder(sport, 10 + i as u32, 90 + i as u64, 98));
        }
        let group = reminders.take().pop().unwrap();
        let one = StaleFlow::new(&group.alert, named("sw-router"), &clock());
        let record = Record::StaleService(Box::new(StaleService::of(one, &group, &clock())));
        let v = serde_json::to_value(&record).unwrap();
        assert_eq!(v["type"], "stale_service");
        assert_eq!(v["state"], "reminder");
        assert_eq!(v["verdict"], "stale");
        assert_eq!(v["flows"], 2);
        assert_eq!(
            v["service"],
            serde_json::json!({"dst": "192.0.2.1", "dport": 8888})
        );
        assert_eq!(v["stale_backend"]["addr"], "172.17.0.2");
        assert_eq!(v["current_backend"]["addr"], "172.18.0.2");
        assert_eq!(v["failures"]["packets"], 21);
        assert_eq!(v["failures"]["first"], "2026-09-21T14:13:10.000Z");
        assert_eq!(v["failures"]["last"], "2026-09-21T14:13:18.000Z");
        assert!(v.get("orig").is_none(), "no one flow's tuple: {v}");
        assert_eq!(
            v["fix"],
            "ip netns exec sw-router conntrack -D -f ipv4 -p udp -d 192.0.2.1 -r 172.17.0.2 \
             --dport 8888 --reply-port-src 8888"
        );
        let t = text(&record);
        assert!(
            t.contains("STALE FLOWS (still failing)  udp 2 flows -> 192.0.2.1:8888  (netns sw-router, inode 4026532100)"),
            "{t}"
        );
        assert!(
            t.contains("pinned to  172.17.0.2:8888 by their conntrack entries"),
            "{t}"
        );
        assert!(
            t.contains("21 packets failed since 2026-09-21T14:13:10.000Z"),
            "{t}"
        );
        assert!(
            t.contains("(the 2 entries pinned to 172.17.0.2:8888)"),
            "{t}"
        );
    }
}
