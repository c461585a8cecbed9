//! End to end: a stream whose conntrack entry was made while no DNAT rule
//! existed (during a redeploy) bypasses the new DNAT for good: refused by
//! the host (lossy), or served by a proxy on the host (silent).

use std::{process::Command, thread, time::Duration};

use serde_json::Value;
use stalewatch_tests::{
    story::{Rules, Story, Variant},
    traffic::{Producer, Receiver},
    watcher::{Watcher, binary, is_stale_flow},
};

const EVERY: Duration = Duration::from_millis(100);
const SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `stalewatch check --format json ARGS`: exit code and records.
fn check(args: &[&str]) -> (i32, Vec<Value>) {
    let out = Command::new(binary())
        .args(["check", "--format", "json"])
        .args(args)
        .output()
        .expect("run stalewatch check");
    let records = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    (out.status.code().unwrap_or(-1), records)
}

struct Bypass {
    story: Story,
    new_service: Receiver,
    stream: Producer,
    fresh: Producer,
    /// A socket on the host's port 8888, as docker-proxy has.
    proxy: Option<Receiver>,
}

/// The story with a gap in the redeploy, and a new flow that works.
fn bypass(proxied: bool) -> anyhow::Result<Bypass> {
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    let proxy = if proxied {
        Some(Receiver::start(&story.router, 8888)?)
    } else {
        None
    };
    let src = story.producer_addr(SPORT);
    let stream = Producer::start(
        &story.producer,
        src,
        story.service(),
        EVERY,
        1500,
        secs(150),
    )?;
    assert!(
        old_service.wait_from(src, 5, secs(10)),
        "reaches the old container first"
    );
    drop(old_service);
    story.redeploy_with_gap(Duration::from_millis(1500))?;
    let new_service = Receiver::start(&story.new, 8888)?;
    let fresh = Producer::start(
        &story.producer,
        story.producer_addr(NEW_SPORT),
        story.service(),
        EVERY,
        300,
        secs(30),
    )?;
    assert!(
        new_service.wait_from(story.producer_addr(NEW_SPORT), 5, secs(10)),
        "a new flow reaches the new container"
    );
    Ok(Bypass {
        story,
        new_service,
        stream,
        fresh,
        proxy,
    })
}

fn assert_bypass_alert(alert: &Value, b: &Bypass) {
    assert_eq!(alert["verdict"], "bypass", "{alert}");
    assert_eq!(alert["netns"]["inode"], b.story.router.inode().unwrap());
    assert_eq!(
        alert["orig"],
        serde_json::json!({"src": "192.0.2.2", "sport": SPORT, "dst": "192.0.2.1", "dport": 8888})
    );
    assert_eq!(
        alert["stale_backend"],
        serde_json::json!({"addr": "192.0.2.1", "port": 8888}),
        "delivered to the host itself"
    );
    assert_eq!(
        alert["current_backend"],
        serde_json::json!({"addr": "172.18.0.2", "port": 8888})
    );
    // Its entry delivers it to the router itself.
    let plan = b.story.plan;
    assert_eq!(
        alert["fix"],
        b.story.expected_fix_to("udp", SPORT, plan.router_lan)
    );
}

/// Without a proxy the host refuses every datagram: ICMP port unreachable.
/// `check` finds the entry, `check --fix` deletes exactly it, the stream
/// reaches the new container and the alert resolves.
#[test]
fn lossy_bypass_is_raised_checked_and_fixed() -> anyhow::Result<()> {
    let mut b = bypass(false)?;
    let router = b.story.router.name.clone();
    // No audit: the kernel's refused datagrams alone must raise it.
    let watcher = Watcher::start(&["--netns", &router, "--audit-every", "0s"])?;
    let raised = watcher
        .wait_for(secs(15), |v| is_stale_flow(v, "raised", SPORT))
        .unwrap_or_else(|| panic!("no bypass raised: {:?}", watcher.records()));
    assert_bypass_alert(&raised, &b);
    assert_eq!(
        raised["failures"]["icmp"]["code"], 3,
        "port unreachable: {raised}"
    );
    assert_eq!(b.new_service.from(b.story.producer_addr(SPORT)), 0);

    let (code, found) = check(&["--netns", &router]);
    assert_eq!(code, 1, "{found:?}");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["type"], "stale_entry");
    assert_eq!(found[0]["verdict"], "bypass");
    assert_eq!(found[0]["orig"]["sport"], SPORT);
    assert_eq!(found[0]["current_backend"]["addr"], "172.18.0.2");

    let (code, fixed) = check(&["--netns", &router, "--fix"]);
    assert_eq!(code, 0, "{fixed:?}");
    assert_eq!(fixed[1]["type"], "entry_deleted", "{fixed:?}");
    assert_eq!(fixed[1]["orig"]["sport"], SPORT);
    // Only that entry went: the new flow's DNATed entry is still there.
    assert_eq!(fixed[1]["stale_backend"]["addr"], "192.0.2.1", "{fixed:?}");
    assert!(
        b.story.has_entry(NEW_SPORT, "172.18.0.2")?,
        "{:?}",
        b.story.router.conntrack()?
    );
    assert!(!b.story.has_entry(SPORT, "192.0.2.1")?);

    assert!(
        b.new_service
            .wait_from(b.story.producer_addr(SPORT), 5, secs(10))
    );
    let (code, none) = check(&["--netns", &router]);
    assert_eq!((code, none.len()), (0, 0), "{none:?}");
    let resolved = watcher.wait_for(secs(10), |v| is_stale_flow(v, "resolved", SPORT));
    assert_eq!(resolved.expect("resolved")["resolution"], "entry_gone");
    assert!(
        !watcher
            .records()
            .iter()
            .any(|v| v["orig"]["sport"] == NEW_SPORT),
        "the new flow is never alerted"
    );
    b.stream.stop();
    b.fresh.stop();
    watcher.stop()?;
    Ok(())
}

/// With a proxy on the host the stream is delivered, to the wrong place and
/// with the wrong source: no packet fails, and the audit finds it. With
/// `watch --fix` stalewatch deletes the entry itself.
#[test]
fn proxied_bypass_is_found_by_the_audit_and_fixed_by_watch() -> anyhow::Result<()> {
    let mut b = bypass(true)?;
    let router = b.story.router.name.clone();
    let watcher = Watcher::start(&["--netns", &router, "--audit-every", "2s", "--fix"])?;
    let raised = watcher
        .wait_for(secs(10), |v| is_stale_flow(v, "raised", SPORT))
        .unwrap_or_else(|| panic!("no bypass raised: {:?}", watcher.records()));
    assert_bypass_alert(&raised, &b);
    assert!(
        raised["failures"]["icmp"].is_null(),
        "nothing failed: {raised}"
    );
    let proxy = b.proxy.as_ref().expect("proxy");
    assert!(
        proxy.from(b.story.producer_addr(SPORT)) > 0,
        "the proxy got the stream"
    );

    let deleted = watcher.wait_for(secs(5), |v| v["type"] == "entry_deleted");
    let deleted = deleted.unwrap_or_else(|| panic!("no deletion: {:?}", watcher.records()));
    assert_eq!(deleted["orig"]["sport"], SPORT);
    assert!(
        b.new_service
            .wait_from(b.story.producer_addr(SPORT), 5, secs(10)),
        "after the fix the stream reaches the new container"
    );
    thread::sleep(secs(1));
    b.stream.stop();
    b.fresh.stop();
    let records = watcher.records();
    assert_eq!(
        records
            .iter()
            .filter(|v| v["type"] == "entry_deleted")
            .count(),
        1,
        "only the stale entry is deleted: {records:?}"
    );
    watcher.stop()?;
    Ok(())
}

/// A datagram stream to a host port that nothing publishes and nothing
/// listens on is refused, and is no stale flow.
#[test]
fn refused_stream_to_an_unpublished_port_is_quiet() -> anyhow::Result<()> {
    let story = Story::build(Variant::v4(Rules::Iptables))?;
    let watcher = Watcher::start(&["--netns", &story.router.name, "--audit-every", "1s"])?;
    let to: std::net::SocketAddr = "192.0.2.1:7777".parse()?;
    let mut stream = Producer::start(
        &story.producer,
        story.producer_addr(SPORT),
        to,
        EVERY,
        80,
        secs(10),
    )?;
    thread::sleep(secs(8));
    assert!(stream.errors() > 0, "the host refused the stream");
    stream.stop();
    assert!(watcher.records().is_empty(), "{:?}", watcher.records());
    let (code, found) = check(&["--netns", &story.router.name]);
    assert_eq!((code, found.len()), (0, 0));
    watcher.stop()?;
    Ok(())
}
