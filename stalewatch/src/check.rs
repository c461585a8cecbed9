//! `stalewatch check`: a one-shot audit of a namespace's conntrack table,
//! without eBPF. Exit status 0 when nothing is stale (or `--fix` deleted
//! every stale entry), 1 when stale entries remain, 2 on error.

use std::{io, process::ExitCode};

use anyhow::Context as _;

use crate::{
    audit, conntrack,
    netns::{self, NetnsInfo},
    report::{EntryDeleted, Record, Reporter, StaleEntry},
};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Output format: text for people, json for one object per line.
    #[arg(long, value_enum, default_value = "text")]
    pub format: crate::report::Format,

    /// The namespace to audit: a name under /run/netns, a path to a
    /// namespace file, or an inode number. Default: stalewatch's own.
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,

    /// Delete exactly the stale entries found, and print each deletion.
    #[arg(long)]
    pub fix: bool,
}

/// The namespace named by `--netns` (or our own), with a path to enter it.
pub fn target(spec: Option<&str>) -> anyhow::Result<(NetnsInfo, std::path::PathBuf)> {
    let inode = match spec {
        Some(spec) => netns::resolve(spec)?,
        None => netns::own_inode().context("cannot read /proc/self/ns/net")?,
    };
    let info = netns::describe(inode);
    let path = match spec {
        Some(spec) if spec.contains('/') => spec.into(),
        _ => netns::path_of(&info).ok_or(crate::error::Error::NoNetns(inode.to_string()))?,
    };
    Ok((info, path))
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let (info, path) = target(args.netns.as_deref())?;
    let entries = audit::read_table(&path)?;
    let facts = netns::facts(&path).context("reading the namespace's addresses")?;
    let mut findings = audit::audit(&entries, &facts);
    // Names containers where an engine answers; in the host's namespace it
    // also tells the flows that Docker's own rules deliver to the host.
    let engine = crate::docker::Engine::connect();
    if let Some(engine) = engine.as_ref().filter(|_| info.is_own) {
        engine.retain_stale(&mut findings);
    }
    let mut reporter = Reporter::new(args.format, io::stdout().lock());
    let mut left = 0;
    for finding in &findings {
        let mut entry = StaleEntry::new(finding, info.clone());
        if let Some(engine) = &engine {
            engine.annotate(&mut entry.pin, &finding.entry.orig);
        }
        reporter.write(&Record::StaleEntry(Box::new(entry)))?;
        if !args.fix {
            left += 1;
            continue;
        }
        let e = &finding.entry;
        if conntrack::delete(Some(&path), &e.orig)? {
            reporter.write(&Record::EntryDeleted(Box::new(EntryDeleted::new(
                &e.orig,
                &e.reply,
                info.clone(),
            ))))?;
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
