//! The text rendering of a record, for people: a headline with the flow
//! and its namespace, then a line each for where it is pinned, where new
//! flows go, the verdict, what the kernel saw, the cause and the fix.

use std::fmt::Write as _;

use super::record::{BackendRef, Failures, Pinned, Record};
use crate::{
    domain::{AlertState, NetnsInfo, Resolution, Verdict, addr_port},
    linux::icmp,
};

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
        Record::DeadDestination(d) => {
            let o = &d.orig;
            let state = match d.state {
                AlertState::Raised => "DEAD DESTINATION",
                AlertState::Reminder => "DEAD DESTINATION (still failing)",
                AlertState::Resolved => "RESOLVED",
            };
            let _ = writeln!(
                s,
                "{} {state}  {} {} -> {}  ({})",
                d.time,
                d.proto.name(),
                addr_port(o.src, o.sport),
                addr_port(o.dst, o.dport),
                netns_label(&d.netns),
            );
            let f = &d.failures;
            if d.state == AlertState::Resolved {
                let _ = writeln!(
                    s,
                    "  was sent to {}; failures stopped (last failure {}; {} packets lost)",
                    backend_label(&d.dead),
                    f.last,
                    f.packets
                );
                return s;
            }
            let on = d
                .interface
                .as_deref()
                .map_or(String::new(), |i| format!(" on {i}"));
            let _ = writeln!(
                s,
                "  dead       {}{on}: no neighbour answers",
                backend_label(&d.dead)
            );
            if let Some(hop) = d.previous_hop {
                let _ = writeln!(s, "  from       {hop} (the previous hop)");
            }
            let _ = writeln!(
                s,
                "  verdict    dead destination{}",
                colon_list(&d.evidence)
            );
            let _ = writeln!(
                s,
                "  kernel     {} packets failed in {:.1}s: {}",
                f.packets,
                f.duration_s,
                kernel_evidence(f).join(", ")
            );
            let _ = writeln!(s, "  cause      {}", d.cause);
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
                "  fix        {}  (the {} entries judged stale of the {} flows pinned to {})",
                a.fix,
                a.fix_entries,
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
            let evidence = kernel_evidence(f);
            // Raised by the periodic audit: no packet failed, the table
            // alone shows it.
            let audited = f.packets == 0 && f.icmp.is_none() && f.drop.is_none();
            if a.state == AlertState::Resolved {
                let why = match a.resolution {
                    Some(Resolution::EntryGone) => "its conntrack entry is gone",
                    _ => "failures stopped",
                };
                if audited {
                    let _ = writeln!(
                        s,
                        "  was pinned to {backend}; {why} (found by the audit of the conntrack \
                         table; no packet failed)"
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "  was pinned to {backend}; {why} (last failure {}; {} packets lost \
                         over {:.1}s)",
                        f.last, f.packets, f.duration_s
                    );
                }
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
            if audited {
                let why = match a.pin.verdict {
                    Verdict::Bypass => "something on this host takes them",
                    _ => {
                        "judged against the host's NAT rules: its packets fail, if at all, \
                          on another host"
                    }
                };
                let _ = writeln!(
                    s,
                    "  audit      found in the conntrack table at {}; no packet failed here \
                     ({why})",
                    f.last
                );
            } else {
                let _ = writeln!(
                    s,
                    "  kernel     {} packets failed in {:.1}s: {}",
                    f.packets,
                    f.duration_s,
                    evidence.join(", ")
                );
            }
            let _ = writeln!(s, "  cause      {}", a.cause);
            let _ = writeln!(s, "  fix        {}", a.fix);
        }
    }
    s
}

/// `addr:port`, with the container's name where one is known.
fn backend_label(b: &BackendRef) -> String {
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
        Verdict::DeadDestination => "dead destination",
    }
}

/// What the kernel saw of a flow's failures, in words.
fn kernel_evidence(f: &Failures) -> Vec<String> {
    let mut evidence = Vec::new();
    if let Some(icmp) = &f.icmp {
        evidence.push(format!(
            "ICMP {} (type {} code {}) sent x{}",
            icmp::meaning(icmp.code),
            icmp.icmp_type,
            icmp.code,
            icmp.count
        ));
    }
    if let Some(drop) = &f.drop {
        evidence.push(format!("dropped {} x{}", drop.reason, drop.count));
    }
    evidence
}

/// `": a; b"`, or nothing for no items.
fn colon_list(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(": {}", items.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{ContainerRef, Containers, udp},
        sink::{
            fixtures::{alert, clock, named},
            record::StaleFlow,
        },
    };

    #[test]
    fn text_names_flow_backend_evidence_and_fix() {
        let record = Record::StaleFlow(Box::new(StaleFlow::new(
            &alert(),
            named("sw-router"),
            &Containers::default(),
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
                "verdict    stale: newer flows to 192.0.2.1:8888/udp are DNATed to 172.18.0.2:8888"
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
    fn an_audited_record_shows_the_audit_not_an_empty_kernel_line() {
        let mut a = alert();
        a.verdict = Verdict::Bypass;
        a.flow.icmp = None;
        a.flow.drops = None;
        a.flow.first = a.flow.last;
        a.failing_for = std::time::Duration::ZERO;
        let record = Record::StaleFlow(Box::new(StaleFlow::new(
            &a,
            named("r"),
            &Containers::default(),
            &clock(),
        )));
        let t = text(&record);
        assert!(!t.contains("kernel "), "{t}");
        assert!(
            t.contains("audit      found in the conntrack table at 2026-09-21T14:13:18.500Z"),
            "{t}"
        );
        a.state = AlertState::Resolved;
        a.resolution = Some(Resolution::EntryGone);
        let record = Record::StaleFlow(Box::new(StaleFlow::new(
            &a,
            named("r"),
            &Containers::default(),
            &clock(),
        )));
        let t = text(&record);
        assert!(
            t.contains("found by the audit of the conntrack table"),
            "{t}"
        );
        assert!(!t.contains("0 packets lost"), "{t}");
    }

    #[test]
    fn containers_are_named_in_json_and_text() {
        let mut flow = StaleFlow::new(
            &alert(),
            named("sw-router"),
            &Containers::default(),
            &clock(),
        );
        let web = |gone| ContainerRef {
            name: "web-1".into(),
            id: "b147d4685a07".into(),
            compose_project: Some("shop".into()),
            compose_service: Some("web".into()),
            engine: None,
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
        let record = Record::StaleFlow(Box::new(StaleFlow::new(
            &a,
            named("r"),
            &Containers::default(),
            &clock(),
        )));
        assert!(text(&record).contains("[2001:db8::2]:5353 -> [2001:db8::1]:53"));
        let v = serde_json::to_value(&record).unwrap();
        assert_eq!(v["stale_backend"]["addr"], "2001:db8:1::10");
    }
}
