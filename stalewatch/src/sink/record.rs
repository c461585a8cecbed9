//! Records: each alert, finding or deletion becomes one [`Record`], the
//! JSON contract of `--format json` and what the text rendering reads. A
//! record is made from a judged flow and the names gathered for it
//! (namespace, containers): making one asks no one.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{
    fix::{Target, fix_command, fix_commands},
    reminders::ReminderGroup,
};
use crate::{
    correlate::audit::Finding,
    domain::{
        Alert, AlertState, Backend, ContainerRef, Containers, DropEvidence, Entry, Family, Hops,
        IcmpEvidence, NetnsInfo, PortHolder, Proto, Resolution, Tuple, Verdict,
    },
};

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

/// A backend as records name it: where, and which container is there.
#[derive(Debug, Serialize, PartialEq)]
pub struct BackendRef {
    pub addr: IpAddr,
    pub port: u16,
    /// The container with this address, where an engine tells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
}

impl BackendRef {
    pub fn new(backend: Backend, container: Option<ContainerRef>) -> BackendRef {
        BackendRef {
            addr: backend.addr,
            port: backend.port,
            container,
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
    /// Traffic for an address no neighbour answers for.
    DeadDestination(Box<DeadDestination>),
    /// Events the kernel could not hand over (ring buffer full).
    EventsLost {
        time: String,
        count: u64,
        total: u64,
    },
}

/// What every record of a pinned flow or entry says, whatever else it
/// holds: the verdict, where (namespace, family, protocol), the backend the
/// conntrack entry pins it to, the service's backend now, and why, with
/// the containers an engine names.
#[derive(Debug, Serialize, PartialEq)]
pub struct Pinned {
    pub verdict: Verdict,
    pub netns: NetnsInfo,
    pub family: Family,
    pub proto: Proto,
    pub stale_backend: BackendRef,
    /// Where the service sends new flows now, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_backend: Option<BackendRef>,
    /// The facts behind the verdict.
    pub evidence: Vec<String>,
}

impl Pinned {
    /// With the containers gathered for it: a bypass also says which
    /// container publishes the port it bypasses.
    fn new(
        verdict: Verdict,
        mut netns: NetnsInfo,
        orig: &Tuple,
        reply: &Tuple,
        current: &[Backend],
        mut evidence: Vec<String>,
        containers: &Containers,
    ) -> Self {
        if containers.netns.is_some() {
            netns.container.clone_from(&containers.netns);
        }
        if verdict == Verdict::Bypass {
            for p in &containers.publishers {
                let at = p.at.map_or(String::new(), |b| format!(" at {b}"));
                let engine = p.container.engine.map_or("the engine", |e| e.name());
                evidence.push(format!(
                    "{engine} publishes {}/{} on this host for container {}{at}",
                    orig.proto.name(),
                    orig.dport,
                    p.container.name
                ));
            }
            if let Some(holder) = &containers.holder {
                evidence.push(holder_evidence(holder, &orig.proto.name(), orig.dport));
            }
        }
        Pinned {
            verdict,
            netns,
            family: orig.family,
            proto: orig.proto,
            stale_backend: BackendRef::new(reply.source(), containers.stale.clone()),
            current_backend: current
                .first()
                .map(|b| BackendRef::new(*b, containers.current.clone())),
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
    pub service: ServiceAddr,
    /// The flows reminded of in this record.
    pub flows: u32,
    pub failures: ServiceFailures,
    /// Why, in a sentence (of each flow).
    pub cause: String,
    /// Commands that delete exactly the entries judged, one by one.
    pub fix: String,
    /// How many entries `fix` names: the first few flows of the group
    /// whose entries are still the ones judged.
    pub fix_entries: usize,
}

/// The destination of a stale service's flows.
#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceAddr {
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
    /// `targets`: the entries of the group's flows still as judged, which
    /// its fix names.
    pub fn of(one: StaleFlow, group: &ReminderGroup, clock: &Clock, targets: &[Target]) -> Self {
        let orig = &group.alert.flow.orig;
        StaleService {
            state: one.state,
            time: one.time,
            fix: fix_commands(targets, &one.pin.netns),
            fix_entries: targets.len(),
            pin: one.pin,
            service: ServiceAddr {
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

/// One finding of `stalewatch check`, with the same names as a stale flow.
#[derive(Debug, Serialize, PartialEq)]
pub struct StaleEntry {
    #[serde(flatten)]
    pub pin: Pinned,
    pub orig: Endpoint,
    pub fix: String,
}

impl StaleEntry {
    pub fn new(finding: &Finding, netns: NetnsInfo, containers: &Containers) -> Self {
        let e = &finding.entry;
        StaleEntry {
            fix: fix_command(&Target::of(e), &netns),
            orig: Endpoint::of(&e.orig),
            pin: Pinned::new(
                finding.verdict,
                netns,
                &e.orig,
                &e.reply,
                &finding.current_backends,
                finding.evidence.clone(),
                containers,
            ),
        }
    }
}

/// A conntrack entry that `--fix` deleted: exactly this one.
#[derive(Debug, Serialize, PartialEq)]
pub struct EntryDeleted {
    pub time: String,
    pub netns: NetnsInfo,
    pub family: Family,
    pub proto: Proto,
    pub orig: Endpoint,
    pub stale_backend: BackendRef,
    /// The entry's reply direction (its source is the stale backend).
    pub reply: Endpoint,
    /// Its conntrack zone, when not the default one.
    #[serde(skip_serializing_if = "is_zero")]
    pub zone: u16,
    /// Its conntrack id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

fn is_zero(zone: &u16) -> bool {
    *zone == 0
}

impl EntryDeleted {
    pub fn new(entry: &Entry, netns: NetnsInfo) -> Self {
        EntryDeleted {
            time: rfc3339(SystemTime::now()),
            netns,
            family: entry.orig.family,
            proto: entry.orig.proto,
            orig: Endpoint::of(&entry.orig),
            stale_backend: BackendRef::new(entry.reply.source(), None),
            reply: Endpoint::of(&entry.reply),
            zone: entry.zone,
            id: entry.id,
        }
    }
}

impl Target {
    /// The entry as a dump listed it.
    pub fn of(entry: &Entry) -> Target {
        Target {
            orig: entry.orig,
            reply: entry.reply,
            zone: entry.zone,
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
    /// A flow whose entry is in the default zone (or whose zone is unknown).
    pub fn new(alert: &Alert, netns: NetnsInfo, containers: &Containers, clock: &Clock) -> Self {
        Self::in_zone(alert, netns, containers, clock, 0)
    }

    /// A flow whose entry is in conntrack zone `zone`, which its fix names.
    pub fn in_zone(
        alert: &Alert,
        netns: NetnsInfo,
        containers: &Containers,
        clock: &Clock,
        zone: u16,
    ) -> Self {
        let flow = &alert.flow;
        let o = &flow.orig;
        let backend = flow.backend();
        let cause = match alert.verdict {
            Verdict::Bypass => format!(
                "its conntrack entry was made while no DNAT existed: it delivers the flow to this \
                 host ({backend}) and NAT rules are not consulted again while the entry lives"
            ),
            Verdict::BackendDown => format!(
                "every flow to this service fails at {backend}: the backend is down, \
                 deleting the entry alone will not help"
            ),
            // No packet failed here: judged against the rules.
            Verdict::Stale if flow.failures() == 0 => format!(
                "its conntrack entry still sends it to {backend}, where the host's current NAT \
                 rules no longer send it; NAT rules are not consulted again while the entry lives"
            ),
            Verdict::Stale | Verdict::Unconfirmed | Verdict::DeadDestination => format!(
                "its conntrack entry still sends it to {backend}, which the host can no longer \
                 reach; NAT rules are not consulted again while the entry lives"
            ),
        };
        StaleFlow {
            state: alert.state,
            resolution: alert.resolution,
            time: rfc3339(clock.wall_of(alert.at)),
            fix: fix_command(
                &Target {
                    orig: *o,
                    reply: flow.reply,
                    zone,
                },
                &netns,
            ),
            pin: Pinned::new(
                alert.verdict,
                netns,
                o,
                &flow.reply,
                &alert.current_backends,
                alert.evidence.clone(),
                containers,
            ),
            orig: Endpoint::of(o),
            failures: Failures::of(alert, clock),
            cause,
        }
    }
}

impl Failures {
    fn of(alert: &Alert, clock: &Clock) -> Failures {
        let flow = &alert.flow;
        Failures {
            packets: flow.failures(),
            first: rfc3339(clock.wall_of(flow.first)),
            last: rfc3339(clock.wall_of(flow.last)),
            duration_s: (alert.failing_for.as_millis() as f64) / 1000.0,
            icmp: flow.icmp,
            drop: flow.drops.clone(),
        }
    }
}

/// Traffic this host keeps receiving, without NAT, for an address no
/// neighbour answers for: the far end of a stale entry on another host
/// (the previous hop), which pins the flow there.
#[derive(Debug, Serialize, PartialEq)]
pub struct DeadDestination {
    pub state: AlertState,
    pub time: String,
    pub netns: NetnsInfo,
    pub family: Family,
    pub proto: Proto,
    pub orig: Endpoint,
    /// The address nobody answers for, with the flow's port.
    pub dead: BackendRef,
    /// The interface the dead address is routed out of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The neighbour the traffic comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_hop: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    pub failures: Failures,
    pub evidence: Vec<String>,
    /// Why, in a sentence.
    pub cause: String,
}

impl DeadDestination {
    pub fn new(
        alert: &Alert,
        netns: NetnsInfo,
        containers: &Containers,
        hops: &Hops,
        clock: &Clock,
    ) -> Self {
        let o = &alert.flow.orig;
        let from = hops
            .previous_hop
            .map_or_else(|| "the host that sends it".to_owned(), |h| h.to_string());
        DeadDestination {
            state: alert.state,
            time: rfc3339(clock.wall_of(alert.at)),
            family: o.family,
            proto: o.proto,
            orig: Endpoint::of(o),
            dead: BackendRef::new(alert.flow.backend(), containers.stale.clone()),
            interface: hops.interface.clone(),
            previous_hop: hops.previous_hop,
            resolution: alert.resolution,
            failures: Failures::of(alert, clock),
            evidence: alert.evidence.clone(),
            cause: format!(
                "nothing holds {} any more, yet {from} keeps sending this flow here: a conntrack \
                 entry there likely still pins it (run `stalewatch check` on {from})",
                o.dst
            ),
            netns,
        }
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// What the holder of a bypassed port does with the stream, in a
/// sentence, for the `proto/port` it holds.
fn holder_evidence(holder: &PortHolder, proto: &str, port: u16) -> String {
    let who = format!(
        "the host's socket on {proto}/{port} belongs to {} (pid {})",
        holder.program, holder.pid
    );
    match holder.program.as_str() {
        "conmon" => format!(
            "{who}, podman's port holder, not to an application: it never reads it \
             ({} {}), so the stream is lost there without a trace",
            holder.queued_bytes,
            if proto == "udp" {
                "bytes queued"
            } else {
                "connections waiting"
            }
        ),
        "docker-proxy" => format!(
            "{who}, Docker's userland proxy: it relays the stream to the container with \
             the host's address as the source"
        ),
        _ => format!("{who}, not to the container that publishes it"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{
        fixtures::{alert, clock, named, reminder},
        reminders::Reminders,
        text::text,
    };

    #[test]
    fn json_keeps_the_contract() {
        let record = Record::StaleFlow(Box::new(StaleFlow::new(
            &alert(),
            named("sw-router"),
            &Containers::default(),
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
            "ip netns exec sw-router conntrack -D -f ipv4 -p udp -s 192.0.2.2 -d 192.0.2.1 \
             -r 172.17.0.2 -q 192.0.2.2 --sport 40000 --dport 8888 --reply-port-src 8888 \
             --reply-port-dst 40000"
        );
    }

    #[test]
    fn a_service_record_sums_its_flows_and_fixes_them_all_at_once() {
        let mut reminders = Reminders::default();
        for (i, sport) in [40000, 40001].into_iter().enumerate() {
            reminders.add(&reminder(sport, 10 + i as u32, 90 + i as u64, 98));
        }
        let group = reminders.take().pop().unwrap();
        let one = StaleFlow::new(
            &group.alert,
            named("sw-router"),
            &Containers::default(),
            &clock(),
        );
        let targets: Vec<Target> = group
            .members
            .iter()
            .map(|&(orig, reply)| Target {
                orig,
                reply,
                zone: 0,
            })
            .collect();
        let record =
            Record::StaleService(Box::new(StaleService::of(one, &group, &clock(), &targets)));
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
            "ip netns exec sw-router conntrack -D -f ipv4 -p udp -s 192.0.2.2 -d 192.0.2.1 \
             -r 172.17.0.2 -q 192.0.2.2 --sport 40000 --dport 8888 --reply-port-src 8888 \
             --reply-port-dst 40000; \
             ip netns exec sw-router conntrack -D -f ipv4 -p udp -s 192.0.2.2 -d 192.0.2.1 \
             -r 172.17.0.2 -q 192.0.2.2 --sport 40001 --dport 8888 --reply-port-src 8888 \
             --reply-port-dst 40001"
        );
        assert_eq!(v["fix_entries"], 2);
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
            t.contains("(the 2 entries judged stale of the 2 flows pinned to 172.17.0.2:8888)"),
            "{t}"
        );
    }

    #[test]
    fn a_bypass_names_the_container_that_publishes_its_port_and_who_holds_it() {
        let mut a = alert();
        a.verdict = Verdict::Bypass;
        a.flow.reply = crate::domain::udp("192.0.2.1", 8888, "192.0.2.2", 40000);
        let web = ContainerRef {
            name: "web-1".into(),
            id: "b147d4685a07".into(),
            compose_project: None,
            compose_service: None,
            engine: Some(crate::domain::EngineKind::Podman),
            gone: false,
        };
        let current = Backend::new("172.18.0.2".parse().unwrap(), 8888);
        let containers = Containers {
            current: Some(web.clone()),
            publishers: vec![crate::domain::Publication {
                container: web,
                at: Some(current),
            }],
            holder: Some(crate::domain::PortHolder {
                program: "conmon".into(),
                pid: 4242,
                queued_bytes: 25792,
            }),
            ..Containers::default()
        };
        let flow = StaleFlow::new(&a, named("sw-router"), &containers, &clock());
        assert!(flow.pin.stale_backend.container.is_none());
        assert_eq!(
            flow.pin
                .current_backend
                .as_ref()
                .unwrap()
                .container
                .as_ref()
                .unwrap()
                .name,
            "web-1"
        );
        assert_eq!(
            flow.pin.evidence[1],
            "Podman publishes udp/8888 on this host for container web-1 at 172.18.0.2:8888"
        );
        assert_eq!(
            flow.pin.evidence[2],
            "the host's socket on udp/8888 belongs to conmon (pid 4242), podman's port holder, \
             not to an application: it never reads it (25792 bytes queued), so the stream is \
             lost there without a trace"
        );
        assert_eq!(
            serde_json::to_value(&flow.pin.current_backend).unwrap()["container"]["engine"],
            "podman"
        );
        // Only a bypass says so.
        let stale = StaleFlow::new(&alert(), named("r"), &containers, &clock());
        assert_eq!(stale.pin.evidence.len(), 1);
    }
}
