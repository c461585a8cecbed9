//! End to end, issue #16: no `bypass` without proof. A router DNATs UDP
//! 8888 arriving on its external interface to a backend, and serves 8888
//! itself to its internal clients. An internal client's flow to the
//! router's external address is rightly left un-NATed by the rule (limited
//! to `-i ext`): it is no bypass, and neither `check --fix` nor
//! `watch --fix` may touch its entry. An external client's stream whose
//! entry was made before the rule existed does bypass it (the positive
//! control): it is raised and its entry, and only it, is deleted.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalewatch::{
    domain::{Entry, Proto},
    source::conntrack::{Filter, dump},
};
use stalewatch_tests::{
    netns::{Netns, veth},
    traffic::{Producer, Receiver},
    watcher::{Watcher, binary},
};

const PORT: u16 = 8888;
const INTERNAL: u16 = 40000;
const EARLY: u16 = 40100;
const DNATED: u16 = 40101;
const EVERY: Duration = Duration::from_millis(100);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("an address")
}

/// ext client .2 ── ext .1 router int .1 ── int client .2; router bk .1 ── backend .2
struct Router {
    router: Netns,
    ext: Netns,
    int: Netns,
    backend: Netns,
}

impl Router {
    fn build() -> anyhow::Result<Router> {
        let r = Router {
            router: Netns::new("proof-router")?,
            ext: Netns::new("proof-ext")?,
            int: Netns::new("proof-int")?,
            backend: Netns::new("proof-backend")?,
        };
        veth(&r.ext, "eth0", &r.router, "ext")?;
        veth(&r.int, "eth0", &r.router, "int")?;
        veth(&r.backend, "eth0", &r.router, "bk")?;
        for (ns, dev, a) in [
            (&r.ext, "eth0", "198.51.100.2/24"),
            (&r.router, "ext", "198.51.100.1/24"),
            (&r.int, "eth0", "10.0.0.2/24"),
            (&r.router, "int", "10.0.0.1/24"),
            (&r.backend, "eth0", "172.20.0.2/24"),
            (&r.router, "bk", "172.20.0.1/24"),
        ] {
            ns.ip(&["addr", "add", a, "dev", dev])?;
        }
        // The internal client reaches the router's external address through
        // its gateway; the backend answers through the router.
        r.int
            .ip(&["route", "add", "198.51.100.0/24", "via", "10.0.0.1"])?;
        r.backend
            .ip(&["route", "add", "198.51.100.0/24", "via", "172.20.0.1"])?;
        r.router.sysctl("net.ipv4.ip_forward=1")?;
        // A NAT rule keeps conntrack on before the DNAT exists (it matches
        // nothing: the backend sees the clients' own addresses).
        r.router.exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "203.0.113.0/24",
            "-j",
            "MASQUERADE",
        ])?;
        Ok(r)
    }

    fn publish(&self) -> anyhow::Result<()> {
        self.router.exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            "ext",
            "-p",
            "udp",
            "--dport",
            "8888",
            "-j",
            "DNAT",
            "--to-destination",
            "172.20.0.2:8888",
        ])?;
        Ok(())
    }

    fn entries(&self) -> Vec<Entry> {
        let filter = Filter {
            proto: Some(Proto::UDP),
            ..Filter::default()
        };
        dump(Some(&self.router.path()), &filter).expect("the router's table")
    }

    fn entry_from(&self, sport: u16) -> Option<Entry> {
        self.entries().into_iter().find(|e| e.orig.sport == sport)
    }
}

fn check(router: &Router, fix: bool) -> (Option<i32>, Vec<Value>) {
    let mut cmd = Command::new(binary());
    cmd.args(["check", "--format", "json", "--netns", &router.router.name]);
    if fix {
        cmd.arg("--fix");
    }
    let out = cmd.output().expect("check");
    let records = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    (out.status.code(), records)
}

#[test]
fn an_interface_limited_dnat_proves_no_bypass_for_internal_clients() {
    let r = Router::build().expect("topology");
    let local = Receiver::start(&r.router, PORT).expect("the router's own service");
    let backend = Receiver::start(&r.backend, PORT).expect("the backend");
    let service = addr("198.51.100.1:8888");
    // Before the DNAT exists: an external stream reaches the router's own
    // service, and its entry is made without NAT.
    let mut early = Producer::start(
        &r.ext,
        addr(&format!("198.51.100.2:{EARLY}")),
        service,
        EVERY,
        900,
        secs(90),
    )
    .expect("early stream");
    assert!(local.wait_from(addr(&format!("198.51.100.2:{EARLY}")), 3, secs(5)));
    r.publish().expect("the DNAT rule");
    let mut dnated = Producer::start(
        &r.ext,
        addr(&format!("198.51.100.2:{DNATED}")),
        service,
        EVERY,
        900,
        secs(90),
    )
    .expect("a DNATed stream");
    assert!(
        backend.wait_from(addr(&format!("198.51.100.2:{DNATED}")), 3, secs(5)),
        "the rule DNATs new external flows: {:?}",
        r.entries()
    );
    let mut internal = Producer::start(
        &r.int,
        addr(&format!("10.0.0.2:{INTERNAL}")),
        service,
        EVERY,
        900,
        secs(90),
    )
    .expect("the internal client");
    assert!(
        local.wait_from(addr(&format!("10.0.0.2:{INTERNAL}")), 3, secs(5)),
        "the internal client is served by the router itself"
    );
    let internal_entry = r.entry_from(INTERNAL).expect("its entry");
    assert_eq!(
        internal_entry.reply.src,
        service.ip(),
        "no NAT: {internal_entry:?}"
    );

    // check: the early stream bypasses, the internal client does not.
    let (code, found) = check(&r, false);
    assert_eq!(code, Some(1), "{found:?}");
    let bypass: Vec<&Value> = found.iter().filter(|v| v["verdict"] == "bypass").collect();
    assert_eq!(bypass.len(), 1, "{found:?}");
    assert_eq!(bypass[0]["orig"]["sport"], EARLY);
    assert!(
        bypass[0]["evidence"]
            .to_string()
            .contains("DNATs this very flow now, arriving on ext"),
        "{}",
        bypass[0]
    );
    assert!(
        !found.iter().any(|v| v["orig"]["sport"] == INTERNAL),
        "the internal client is no finding: {found:?}"
    );

    // watch --fix: the same judgement, and it deletes the early stream's
    // entry alone.
    let watcher = Watcher::start(&["--netns", &r.router.name, "--fix"]).expect("watch");
    let started = Instant::now();
    let deleted = watcher
        .wait_for(secs(15), |v| v["type"] == "entry_deleted")
        .unwrap_or_else(|| panic!("a deletion: {:?}", watcher.records()));
    assert_eq!(deleted["orig"]["sport"], EARLY, "{deleted}");
    // Long enough for another audit (every 10 s).
    std::thread::sleep(secs(12).saturating_sub(started.elapsed()));
    let records = watcher.records();
    assert!(
        !records.iter().any(|v| v["orig"]["sport"] == INTERNAL),
        "nothing about the internal client: {records:?}"
    );
    assert_eq!(
        records
            .iter()
            .filter(|v| v["type"] == "entry_deleted")
            .count(),
        1,
        "{records:?}"
    );
    watcher.stop().expect("stop");
    let after = r
        .entry_from(INTERNAL)
        .expect("the internal client's entry stays");
    assert_eq!(after.reply, internal_entry.reply);
    assert!(
        r.entry_from(DNATED).is_some(),
        "the DNATed flow's entry stays"
    );
    // Healed: the early stream's new entry is DNATed to the backend.
    assert!(
        backend.wait_from(addr(&format!("198.51.100.2:{EARLY}")), 1, secs(5)),
        "the early stream reaches the backend"
    );

    // check --fix now finds nothing, and changes nothing.
    let before = r.entries().len();
    let (code, found) = check(&r, true);
    assert_eq!(code, Some(0), "{found:?}");
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(r.entries().len(), before);
    assert!(local.wait_from(addr(&format!("10.0.0.2:{INTERNAL}")), 3, secs(5)));
    internal.stop();
    dnated.stop();
    early.stop();
}
