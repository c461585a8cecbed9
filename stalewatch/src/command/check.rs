//! `stalewatch check`: a one-shot audit of a namespace's conntrack table,
//! without eBPF. Exit status 0 when nothing is stale (or `--fix` deleted
//! every stale entry), 1 when stale entries remain, 2 on error.
//!
//! Evidence first (the table, the namespace's addresses and neighbours, its
//! NAT rules, the engine's containers), then the audit's judgement, then
//! records.

use std::{io, process::ExitCode};

use anyhow::Context as _;

use crate::{
    correlate::audit,
    domain::Containers,
    sink::{
        Format, Record, Reporter,
        record::{EntryDeleted, StaleEntry},
    },
    source::{conntrack, engine::Engine, intent, netns},
};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Output format: text for people, json for one object per line.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,

    /// The namespace to audit: a name under /run/netns, a path to a
    /// namespace file, or an inode number. Default: stalewatch's own.
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,

    /// Delete exactly the stale entries found, and print each deletion.
    #[arg(long)]
    pub fix: bool,
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let (info, path) = netns::target(args.netns.as_deref())?;
    let entries = conntrack::read_table(&path)?;
    let mut facts = netns::facts(&path).context("reading the namespace's addresses")?;
    // Names containers where an engine answers; in the host's namespace it
    // also tells the flows that its own rules deliver to the host.
    let engine = Engine::connect();
    let snapshot = engine.as_ref().map(Engine::snapshot);
    if let Some(snapshot) = snapshot.as_ref().filter(|_| info.is_own) {
        facts.proxied_sources = snapshot.container_addresses();
    }
    let intent = intent::read(&path)
        .map_err(|e| log::warn!("NAT intent: {}", crate::error::chain(&e)))
        .ok();
    if intent.as_ref().is_some_and(|i| !i.read().is_empty()) {
        let sources = audit::bypass_sources(&entries, &facts);
        facts.arrives_on = netns::arrival_interfaces(&path, sources)
            .context("looking up the routes back to the sources")?;
    }
    let findings = audit::audit(&entries, &facts, intent.as_ref());
    let mut reporter = Reporter::new(args.format, io::stdout().lock());
    let mut left = 0;
    for finding in &findings {
        let e = &finding.entry;
        let containers = snapshot.as_ref().map_or_else(Containers::default, |s| {
            s.containers(
                &info,
                e.orig.service(),
                e.backend(),
                finding.current_backends.first().copied(),
            )
        });
        let entry = StaleEntry::new(finding, info.clone(), &containers);
        reporter.write(&Record::StaleEntry(Box::new(entry)))?;
        if !args.fix {
            left += 1;
            continue;
        }
        if conntrack::delete(Some(&path), &e.orig)? {
            let deleted = EntryDeleted::new(&e.orig, &e.reply, info.clone());
            reporter.write(&Record::EntryDeleted(Box::new(deleted)))?;
        } else {
            // Gone on its own between the dump and the delete.
            log::info!("entry already gone: {:?}", e.orig);
        }
    }
    reporter.flush()?;
    eprintln!(
        "stalewatch: {} conntrack entries checked, {} stale{}",
        entries.len(),
        findings.len(),
        if args.fix { ", deleted" } else { "" }
    );
    Ok(if left == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
