//! `stalewatch check`: a one-shot audit of a namespace's conntrack table,
//! without eBPF. Exit status 0 when nothing is stale, 1 when something is,
//! 2 on error. With `--fix` it deletes exactly the `stale` and `bypass`
//! entries it lists (by id, in their zone; never a `backend_down` one),
//! reads the table again, and exits 0 only when none of them is left.
//!
//! Evidence first (the table, the namespace's addresses and neighbours, its
//! NAT rules, the engine's containers), then the audit's judgement, then
//! records.

use std::{collections::HashSet, io, process::ExitCode, time::Duration};

use anyhow::Context as _;

use crate::{
    correlate::audit,
    domain::{Containers, Entry, Tuple, Verdict, addr_port},
    sink::{
        Record, Reporter,
        record::{EntryDeleted, StaleEntry},
    },
    source::{conntrack, engine::Engine, intent, netns, sockets},
};

/// How long `check` waits, at most, for the kernel to settle neighbours that
/// are being resolved (its own default resolution time is 3 s).
const SETTLE: Duration = Duration::from_secs(5);

pub use stalewatch_cli::CheckArgs;

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let (info, path) = netns::target(args.netns.as_deref())?;
    let entries = conntrack::read_table(&path)?;
    // A backend being resolved right now is looked at again until the
    // kernel settles it: no verdict on a neighbour without its word.
    let mut facts = netns::settled_facts(&path, SETTLE)
        .context("reading the namespace's addresses and neighbours")?;
    // Names containers where an engine answers; in the host's namespace it
    // also tells the flows that its own rules deliver to the host.
    let engine = Engine::connect(&args.engine_socket);
    let snapshot = engine.as_ref().map(Engine::snapshot);
    if let Some(snapshot) = snapshot.as_ref().filter(|_| info.is_own) {
        facts.proxied_sources = snapshot.container_addresses();
    }
    let intent = intent::read(&path)
        .map_err(|e| log::warn!("NAT intent: {}", crate::error::chain(&e)))
        .ok()
        .and_then(|mut r| r.intent().map_err(|e| log::warn!("NAT intent: {e}")).ok());
    if intent.as_ref().is_some_and(|i| !i.read().is_empty()) {
        let sources = audit::bypass_sources(&entries, &facts);
        facts.arrives_on = netns::arrival_interfaces(&path, sources)
            .context("looking up the routes back to the sources")?;
    }
    let findings = audit::audit(&entries, &facts, intent.as_ref());
    let mut reporter = Reporter::new(args.format, io::stdout().lock());
    let mut deleted = 0;
    for finding in &findings {
        let e = &finding.entry;
        let mut containers = snapshot.as_ref().map_or_else(Containers::default, |s| {
            s.containers(
                &info,
                e.orig.service(),
                e.backend(),
                finding.current_backends.first().copied(),
            )
        });
        if finding.verdict == Verdict::Bypass {
            containers.holder = sockets::holder(&path, e.orig.proto, e.orig.dst, e.orig.dport);
        }
        let entry = StaleEntry::new(finding, info.clone(), &containers);
        reporter.write(&Record::StaleEntry(Box::new(entry)))?;
        if !(args.fix && finding.verdict.deleted_by_fix()) {
            continue;
        }
        // By id, in its zone: an entry that replaced it is left alone.
        if conntrack::delete_entry(Some(&path), e)? {
            deleted += 1;
            let record = EntryDeleted::new(e, info.clone());
            reporter.write(&Record::EntryDeleted(Box::new(record)))?;
        } else {
            log::warn!(
                "nothing deleted: the entry of {} {} -> {} pinned to {} is gone or no longer \
                 the one judged",
                e.orig.proto.name(),
                addr_port(e.orig.src, e.orig.sport),
                addr_port(e.orig.dst, e.orig.dport),
                e.backend()
            );
        }
    }
    reporter.flush()?;
    let fixable: Vec<&Entry> = findings
        .iter()
        .filter(|f| f.verdict.deleted_by_fix())
        .map(|f| &f.entry)
        .collect();
    if !args.fix {
        eprintln!(
            "stalewatch: {} conntrack entries checked, {} stale",
            entries.len(),
            findings.len()
        );
        return Ok(exit(findings.is_empty()));
    }
    // The proof: the table read again, and none of the entries judged in it.
    let after = conntrack::read_table(&path)?;
    let left = left_behind(&fixable, &after);
    let down = findings.len() - fixable.len();
    eprintln!(
        "stalewatch: {} conntrack entries checked, {} stale, {deleted} deleted, {left} still \
         in the table{}",
        entries.len(),
        fixable.len(),
        if down > 0 {
            format!(" ({down} at a backend that is down, never deleted)")
        } else {
            String::new()
        }
    );
    Ok(exit(left == 0))
}

/// How many of `judged` are still in `table`: the same tuples in the same
/// zone (an entry that replaced one with another reply is not it).
fn left_behind(judged: &[&Entry], table: &[Entry]) -> usize {
    let present: HashSet<(Tuple, Tuple, u16)> =
        table.iter().map(|e| (e.orig, e.reply, e.zone)).collect();
    judged
        .iter()
        .filter(|e| present.contains(&(e.orig, e.reply, e.zone)))
        .count()
}

fn exit(clean: bool) -> ExitCode {
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Verdict, udp};

    #[test]
    fn only_stale_and_bypassing_entries_are_deleted() {
        assert!(Verdict::Stale.deleted_by_fix());
        assert!(Verdict::Bypass.deleted_by_fix());
        assert!(!Verdict::BackendDown.deleted_by_fix());
        assert!(!Verdict::Unconfirmed.deleted_by_fix());
    }

    #[test]
    fn an_entry_is_left_only_with_its_tuples_in_its_zone() {
        let stale = Entry {
            orig: udp("192.0.2.2", 40000, "192.0.2.1", 8888),
            reply: udp("172.17.0.2", 8888, "192.0.2.2", 40000),
            status: 0,
            timeout: None,
            id: Some(1),
            zone: 0,
        };
        let mut renewed = stale.clone();
        renewed.reply.src = "172.18.0.2".parse().unwrap();
        renewed.id = Some(2);
        assert_eq!(left_behind(&[&stale], &[renewed.clone()]), 0);
        let mut other_zone = stale.clone();
        other_zone.zone = 3;
        assert_eq!(left_behind(&[&stale], &[renewed, other_zone]), 0);
        assert_eq!(left_behind(&[&stale], std::slice::from_ref(&stale)), 1);
    }
}
