//! End to end: a long-lived TCP connection pinned to a vanished backend.

use std::time::Duration;

use stalewatch_tests::{
    sh,
    story::{Rules, Story, Variant},
    traffic::{TcpProducer, TcpReceiver},
    watcher::{Watcher, is_stale_flow},
};

const SPORT: u16 = 45000;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `fin`: the old backend closes the connection cleanly before it goes,
/// and the client's own FIN is then retransmitted into the void; else the
/// backend vanishes silently and the client's connection stays ESTABLISHED
/// while its data is retransmitted into the void.
fn tcp_story(fin: bool) -> anyhow::Result<()> {
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let old_service = TcpReceiver::start(story.old.as_ref().expect("old"), 8888)?;
    let watcher = Watcher::start(&["--netns", &story.router.name, "--resolve-after", "5s"])?;
    let src = story.producer_addr(SPORT);
    let mut client = TcpProducer::start(
        &story.producer,
        src,
        story.service(),
        Duration::from_millis(100),
        secs(120),
    )?;
    assert!(
        old_service.wait_bytes_from(src, 50, secs(10)),
        "the connection reaches the old container"
    );

    if fin {
        // The client is idle when the backend says goodbye (data after the
        // FIN would draw a reset).
        client.pause();
        old_service.close_all();
        std::thread::sleep(Duration::from_millis(300));
    }
    // The container vanishes: its link goes, without a word on the wire.
    story.router.ip(&["link", "del", "vold"])?;
    story.redeploy()?;
    if fin {
        client.close();
    }

    let raised = watcher
        .wait_for(secs(25), |v| is_stale_flow(v, "raised", SPORT))
        .unwrap_or_else(|| panic!("no stale_flow raised; got {:?}", watcher.records()));
    assert_eq!(raised["netns"]["inode"], story.router.inode()?);
    assert_eq!(raised["proto"], "tcp");
    assert_eq!(
        raised["orig"],
        serde_json::json!({"src": "192.0.2.2", "sport": SPORT, "dst": "192.0.2.1", "dport": 8888})
    );
    assert_eq!(
        raised["stale_backend"],
        serde_json::json!({"addr": "172.17.0.2", "port": 8888})
    );
    assert_eq!(raised["failures"]["drop"]["reason"], "NEIGH_FAILED");
    assert_eq!(raised["verdict"], "stale", "{raised}");
    let fix = raised["fix"].as_str().expect("fix");
    assert_eq!(fix, story.expected_fix("tcp", SPORT));
    assert!(client.written() > 0);

    // Deleting the entry ends the pinning: the next segment is tracked
    // afresh and DNATed to the new container, which resets the unknown
    // connection, and the failures stop.
    sh(fix)?;
    let resolved = watcher
        .wait_for(secs(30), |v| is_stale_flow(v, "resolved", SPORT))
        .unwrap_or_else(|| panic!("not resolved: {:?}", watcher.records()));
    // Resolved because the fix deleted its entry, not because it went quiet.
    assert_eq!(resolved["resolution"], "entry_gone", "{resolved}");
    assert_eq!(resolved["proto"], "tcp", "{resolved}");
    assert_eq!(
        resolved["stale_backend"]["addr"], "172.17.0.2",
        "{resolved}"
    );
    client.stop();
    let (status, _) = watcher.stop()?;
    assert!(status.success());
    Ok(())
}

#[test]
fn tcp_backend_vanished_silently() -> anyhow::Result<()> {
    tcp_story(false)
}

#[test]
fn tcp_backend_closed_then_vanished() -> anyhow::Result<()> {
    tcp_story(true)
}
