//! `--fix` deletes exactly the stale entry or nothing, and no verdict is
//! given without the kernel's proof: end to end, with the table read back
//! after every deletion.

use std::{process::Command, time::Duration};

use serde_json::Value;
use stalewatch::source::conntrack::{self, Deletion};
use stalewatch_tests::{
    docker::check,
    poll,
    story::{DEAD_END_BACKEND, DeadEnd, Played, Rules, Story, Variant},
    traffic::{Producer, Receiver},
    watcher::{self, Watcher, is_stale_flow},
};

const EVERY: Duration = Duration::from_millis(100);
const STALE_SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;
const OTHER_SPORT: u16 = 40002;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Every router packet tracked in conntrack zone 7, set before conntrack
/// sees it.
fn zone_everything(story: &Story) -> anyhow::Result<()> {
    story.router.exec(&[
        "nft",
        "add table ip swzone; \
         add chain ip swzone raw { type filter hook prerouting priority raw; }; \
         add rule ip swzone raw ct zone set 7",
    ])?;
    Ok(())
}

/// The story up to the pinned stream (and streams pinned alike from each
/// of `others`), with a new flow that works.
fn pinned(
    rules: Rules,
    zoned: bool,
    others: &[u16],
) -> anyhow::Result<(Story, Played, Vec<Producer>)> {
    let mut story = Story::build(Variant::v4(rules))?;
    if zoned {
        zone_everything(&story)?;
    }
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    let mut producers = Vec::new();
    for &sport in others {
        let src = story.producer_addr(sport);
        producers.push(Producer::start(
            &story.producer,
            src,
            story.service(),
            EVERY,
            1500,
            secs(150),
        )?);
    }
    for &sport in others {
        let src = story.producer_addr(sport);
        assert!(
            old_service.wait_from(src, 3, secs(10)),
            "{sport} pinned before the redeploy"
        );
    }
    let played = story.play(old_service, STALE_SPORT, NEW_SPORT)?;
    Ok((story, played, producers))
}

fn deleted_of(records: &[Value], sport: u16) -> Vec<Value> {
    records
        .iter()
        .filter(|v| v["type"] == "entry_deleted" && v["orig"]["sport"] == sport)
        .cloned()
        .collect()
}

/// `watch --fix` on the `stale` verdict: the entry is deleted by its id in
/// its zone, the record names it, and the table read back holds neither it
/// nor any change to its siblings.
fn watch_fix(rules: Rules, zoned: bool) -> anyhow::Result<()> {
    let (story, played, _) = pinned(rules, zoned, &[])?;
    let Played {
        mut stream,
        mut fresh,
        new_service,
    } = played;
    let plan = story.plan;
    let watcher = Watcher::start(&["--netns", &story.router.name, "--fix"])?;
    let raised = watcher
        .wait_for(secs(20), |v| is_stale_flow(v, "raised", STALE_SPORT))
        .unwrap_or_else(|| panic!("not raised: {:?}", watcher.records()));
    assert_eq!(raised["verdict"], "stale", "{raised}");
    let fix = raised["fix"].as_str().expect("fix");
    assert_eq!(fix.contains(" --zone 7"), zoned, "{fix}");
    let deleted = watcher
        .wait_for(secs(10), |v| {
            v["type"] == "entry_deleted" && v["orig"]["sport"] == STALE_SPORT
        })
        .unwrap_or_else(|| panic!("nothing deleted: {:?}", watcher.records()));
    assert_eq!(
        deleted["stale_backend"]["addr"], plan.old_backend,
        "{deleted}"
    );
    assert_eq!(deleted["reply"]["src"], plan.old_backend, "{deleted}");
    assert!(deleted["id"].is_u64(), "{deleted}");
    if zoned {
        assert_eq!(deleted["zone"], 7, "{deleted}");
    } else {
        assert!(deleted.get("zone").is_none(), "{deleted}");
    }
    // The stream moves on to the new container, in a new entry.
    let src = story.producer_addr(STALE_SPORT);
    assert!(new_service.wait_from(src, 3, secs(10)), "healed");
    assert!(!story.has_entry(STALE_SPORT, plan.old_backend)?);
    assert!(story.has_entry(STALE_SPORT, plan.new_backend)?);
    assert!(
        story.has_entry(NEW_SPORT, plan.new_backend)?,
        "sibling intact"
    );
    // The service's entries are all in the zone the router tracks it in
    // (the router's own IGMP, sent from the host, is in zone 0).
    let table = story.router.conntrack()?;
    assert!(
        table
            .iter()
            .filter(|e| e.orig.dport == 8888)
            .all(|e| e.zone == if zoned { 7 } else { 0 }),
        "{table:?}"
    );
    fresh.stop();
    stream.stop();
    let records = watcher.records();
    assert_eq!(deleted_of(&records, STALE_SPORT).len(), 1, "{records:?}");
    assert!(deleted_of(&records, NEW_SPORT).is_empty(), "{records:?}");
    watcher.stop()?;
    Ok(())
}

#[test]
fn watch_fix_deletes_exactly_the_stale_entry() -> anyhow::Result<()> {
    watch_fix(Rules::Iptables, false)
}

#[test]
fn watch_fix_deletes_a_zoned_entry_in_its_zone() -> anyhow::Result<()> {
    watch_fix(Rules::Nftables, true)
}

/// Forty streams pinned at once in zone 7, and the stale one: beyond the
/// first alerts of a second, their zones come from one dump of the table
/// (not a look-up each), and every fix names zone 7.
#[test]
fn many_zoned_flows_raised_at_once_each_name_their_zone() -> anyhow::Result<()> {
    const MANY: u16 = 40;
    let sports: Vec<u16> = (1..=MANY).map(|i| OTHER_SPORT + i).collect();
    let (story, played, others) = pinned(Rules::Nftables, true, &sports)?;
    let Played {
        mut stream,
        mut fresh,
        ..
    } = played;
    let mut cmd = Command::new(watcher::binary());
    cmd.args(["watch", "--format", "json", "--netns", &story.router.name])
        .env("RUST_LOG", "stalewatch=debug");
    let watcher = Watcher::start_command(cmd, false)?;
    let all: Vec<u16> = sports.iter().copied().chain([STALE_SPORT]).collect();
    let raised = poll(secs(30), || {
        let records = watcher.records();
        let raised: Vec<Value> = all
            .iter()
            .filter_map(|&sport| {
                records
                    .iter()
                    .find(|v| is_stale_flow(v, "raised", sport))
                    .cloned()
            })
            .collect();
        (raised.len() == all.len()).then_some(raised)
    })
    .unwrap_or_else(|| panic!("not all raised: {:?}", watcher.records()));
    for r in &raised {
        let fix = r["fix"].as_str().expect("fix");
        assert!(fix.contains(" --zone 7"), "{fix}");
    }
    assert!(
        watcher.stderr_text().contains("read in one dump"),
        "the zones were looked up one by one: {}",
        watcher.stderr_text()
    );
    for mut p in others {
        p.stop();
    }
    fresh.stop();
    stream.stop();
    watcher.stop()?;
    Ok(())
}

/// The entry judged is replaced (same original tuple, another backend)
/// before the deletion: nothing is deleted.
#[test]
fn a_replaced_entry_is_not_deleted() -> anyhow::Result<()> {
    let (story, played, _) = pinned(Rules::Iptables, false, &[])?;
    let Played {
        mut stream,
        mut fresh,
        new_service,
    } = played;
    let plan = story.plan;
    let src = story.producer_addr(STALE_SPORT);
    let path = story.router.path();
    let judged = story
        .router
        .conntrack()?
        .into_iter()
        .find(|e| e.orig.sport == STALE_SPORT)
        .expect("the stale entry");
    assert_eq!(judged.reply.src.to_string(), plan.old_backend);
    // Someone else deletes it; the stream makes a new one at once.
    story.router.exec(&[
        "conntrack",
        "-D",
        "-p",
        "udp",
        "--sport",
        &STALE_SPORT.to_string(),
    ])?;
    assert!(new_service.wait_from(src, 3, secs(10)));
    let replaced = poll(secs(5), || {
        story
            .router
            .conntrack()
            .ok()?
            .into_iter()
            .find(|e| e.orig == judged.orig)
    })
    .expect("the new entry");
    assert_eq!(replaced.reply.src.to_string(), plan.new_backend);
    assert!(matches!(
        conntrack::delete_judged(Some(&path), &judged.orig, &judged.reply)?,
        Deletion::Replaced(now) if now.len() == 1 && now[0].id == replaced.id
    ));
    assert!(!conntrack::delete_entry(Some(&path), &judged)?);
    // Not even with the new entry's id: the kernel finds an entry by the
    // judged reply tuple, and there is none.
    let mut with_new_id = judged.clone();
    with_new_id.id = replaced.id;
    assert!(!conntrack::delete_entry(Some(&path), &with_new_id)?);
    let still = story
        .router
        .conntrack()?
        .into_iter()
        .find(|e| e.orig == judged.orig);
    assert_eq!(
        still.map(|e| e.id),
        Some(replaced.id),
        "the new entry lives"
    );
    fresh.stop();
    stream.stop();
    Ok(())
}

/// `check` until it lists `n` findings, at most `limit`.
fn check_until(netns: &str, n: usize, limit: Duration) -> Vec<Value> {
    poll(limit, || {
        let (code, records) = check(&["--netns", netns]).ok()?;
        (code == 1 && records.len() >= n).then_some(records)
    })
    .unwrap_or_else(|| panic!("check never listed {n} findings"))
}

/// `check` then `check --fix` on two pinned streams: the printed fix (run
/// as printed, zone and all) deletes one; `--fix` deletes the other by id
/// in its zone, reads the table again and exits 0; the new flow is left.
#[test]
fn check_fix_deletes_the_stale_entries_and_reads_the_table_again() -> anyhow::Result<()> {
    let (story, played, mut others) = pinned(Rules::Nftables, true, &[OTHER_SPORT])?;
    let Played {
        mut stream,
        mut fresh,
        new_service,
    } = played;
    let plan = story.plan;
    let name = story.router.name.as_str();
    let findings = check_until(name, 2, secs(20));
    for f in &findings {
        assert_eq!(f["type"], "stale_entry", "{f}");
        assert_eq!(f["verdict"], "stale", "{f}");
        assert_eq!(f["stale_backend"]["addr"], plan.old_backend, "{f}");
        assert_eq!(f["current_backend"]["addr"], plan.new_backend, "{f}");
        assert!(f["fix"].as_str().unwrap().ends_with(" --zone 7"), "{f}");
    }
    let first = findings
        .iter()
        .find(|f| f["orig"]["sport"] == STALE_SPORT)
        .expect("the stream's finding");
    stalewatch_tests::sh(first["fix"].as_str().unwrap())?;
    assert!(!story.has_entry(STALE_SPORT, plan.old_backend)?);
    assert!(
        story.has_entry(OTHER_SPORT, plan.old_backend)?,
        "one at a time"
    );
    assert!(new_service.wait_from(story.producer_addr(STALE_SPORT), 3, secs(10)));

    let (code, records) = check(&["--netns", name, "--fix"])?;
    let deleted: Vec<&Value> = records
        .iter()
        .filter(|v| v["type"] == "entry_deleted")
        .collect();
    assert_eq!(deleted.len(), 1, "{records:?}");
    assert_eq!(deleted[0]["orig"]["sport"], OTHER_SPORT);
    assert_eq!(deleted[0]["zone"], 7);
    assert_eq!(code, 0, "none left: {records:?}");
    assert!(!story.has_entry(OTHER_SPORT, plan.old_backend)?);
    assert!(
        story.has_entry(NEW_SPORT, plan.new_backend)?,
        "sibling intact"
    );
    fresh.stop();
    stream.stop();
    for o in &mut others {
        o.stop();
    }
    Ok(())
}

/// Every flow fails at the service's one backend: `backend_down`, which
/// `check --fix` lists but never deletes.
#[test]
fn check_fix_leaves_backend_down_entries_alone() -> anyhow::Result<()> {
    let lan = DeadEnd::build(false)?;
    let name = lan.router.name.as_str();
    let mut flows = Vec::new();
    for sport in [43000, 43001] {
        flows.push(Producer::start(
            &lan.producer,
            lan.producer_addr(sport),
            lan.service(),
            EVERY,
            300,
            secs(30),
        )?);
    }
    let findings = check_until(name, 2, secs(20));
    assert!(
        findings.iter().all(|f| f["verdict"] == "backend_down"),
        "{findings:?}"
    );
    let (code, records) = check(&["--netns", name, "--fix"])?;
    assert!(
        records.iter().all(|v| v["type"] != "entry_deleted"),
        "{records:?}"
    );
    // None of the entries `--fix` deletes is left; what is down stays.
    assert_eq!(code, 0, "{records:?}");
    let backend: std::net::IpAddr = DEAD_END_BACKEND.parse()?;
    let table = lan.router.conntrack()?;
    for sport in [43000, 43001] {
        assert!(
            table
                .iter()
                .any(|e| e.orig.sport == sport && e.reply.src == backend),
            "{sport} kept: {table:?}"
        );
    }
    for f in &mut flows {
        f.stop();
    }
    Ok(())
}

/// The router is still resolving the backend (slow probes): the kernel has
/// not given up on it, so no verdict says it is gone.
#[test]
fn a_backend_being_resolved_is_not_failed() -> anyhow::Result<()> {
    let lan = DeadEnd::build(false)?;
    let name = lan.router.name.as_str();
    lan.router.ip(&[
        "ntable",
        "change",
        "name",
        "arp_cache",
        "dev",
        "br0",
        "retrans",
        "20000",
    ])?;
    let mut flow = Producer::start(
        &lan.producer,
        lan.producer_addr(43100),
        lan.service(),
        EVERY,
        30,
        secs(5),
    )?;
    let incomplete = || -> bool {
        lan.router
            .ip(&["neigh", "show", DEAD_END_BACKEND])
            .is_ok_and(|out| out.contains("INCOMPLETE"))
    };
    assert!(poll(secs(5), || incomplete().then_some(())).is_some());
    let (code, records) = check(&["--netns", name])?;
    assert!(records.is_empty(), "{records:?}");
    assert_eq!(code, 0);
    assert!(incomplete(), "still being resolved after the check");
    flow.stop();
    Ok(())
}

/// A service load-balanced over two live backends; two flows at one of
/// them are dropped on the way and judged stale. The reminder's fix
/// deletes exactly those two entries: the healthy flows of the same
/// backend (which a fix by service and backend would delete too) and of
/// the other keep their entries.
#[test]
fn the_service_fix_on_a_load_balanced_service_spares_healthy_entries() -> anyhow::Result<()> {
    let story = Story::build(Variant::v4(Rules::Nftables))?;
    let plan = story.plan;
    story.router.exec(&[
        "nft",
        &format!(
            "flush chain ip stale pre; add rule ip stale pre meta l4proto udp th dport 8888 \
             dnat to numgen inc mod 2 map {{ 0 : {}, 1 : {} }}",
            plan.old_backend, plan.new_backend
        ),
    ])?;
    let _old = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    let _new = Receiver::start(&story.new, 8888)?;
    let watcher = Watcher::start(&[
        "--netns",
        &story.router.name,
        "--remind-every",
        "3s",
        "--resolve-after",
        "30s",
    ])?;
    let sports: Vec<u16> = (41000..41006).collect();
    let mut flows = Vec::new();
    for &sport in &sports {
        flows.push(Producer::start(
            &story.producer,
            story.producer_addr(sport),
            story.service(),
            EVERY,
            600,
            secs(60),
        )?);
        std::thread::sleep(Duration::from_millis(100));
    }
    let new: std::net::IpAddr = plan.new_backend.parse()?;
    let table = poll(secs(5), || {
        let t = story.router.conntrack().ok()?;
        let ours: Vec<_> = t
            .into_iter()
            .filter(|e| e.orig.dport == 8888 && sports.contains(&e.orig.sport))
            .collect();
        (ours.len() == sports.len()).then_some(ours)
    })
    .expect("an entry per flow");
    let at_new: Vec<_> = table.iter().filter(|e| e.reply.src == new).collect();
    assert!(at_new.len() >= 3, "round robin: {table:?}");
    let (judged, healthy_new) = at_new.split_at(2);
    let dropped: Vec<u16> = judged.iter().map(|e| e.orig.sport).collect();
    story.router.exec(&[
        "nft",
        &format!(
            "add table ip swdrop; \
             add chain ip swdrop fw {{ type filter hook forward priority 0; }}; \
             add rule ip swdrop fw ip daddr {} udp sport {{ {}, {} }} drop",
            plan.new_backend, dropped[0], dropped[1]
        ),
    ])?;
    let reminder = watcher
        .wait_for(secs(30), |v| v["type"] == "stale_service")
        .unwrap_or_else(|| panic!("no stale_service: {:?}", watcher.records()));
    assert_eq!(reminder["verdict"], "stale", "{reminder}");
    assert_eq!(reminder["flows"], 2, "{reminder}");
    assert_eq!(reminder["fix_entries"], 2, "{reminder}");
    assert_eq!(
        reminder["stale_backend"]["addr"], plan.new_backend,
        "{reminder}"
    );
    assert_eq!(
        reminder["current_backend"]["addr"], plan.old_backend,
        "{reminder}"
    );
    // The judged flows stop first, so that no new entry of theirs can be
    // taken for the old one (a new entry of the same original tuple may
    // even get the same id: the kernel's id hashes the entry's address and
    // original tuple only, and the freed slot is reused).
    for &sport in &dropped {
        flows[usize::from(sport - sports[0])].stop();
    }
    stalewatch_tests::sh(reminder["fix"].as_str().expect("fix"))?;

    let after = story.router.conntrack()?;
    let same = |a: &stalewatch::domain::Entry| {
        after
            .iter()
            .any(|b| (b.orig, b.reply, b.id) == (a.orig, a.reply, a.id))
    };
    for e in judged {
        assert!(!same(e), "judged {} deleted: {after:?}", e.orig.sport);
    }
    for e in healthy_new
        .iter()
        .copied()
        .chain(table.iter().filter(|e| e.reply.src != new))
    {
        assert!(same(e), "healthy {} kept: {after:?}", e.orig.sport);
    }
    for f in &mut flows {
        f.stop();
    }
    watcher.stop()?;
    Ok(())
}
