//! The watch's periodic audit. Flows that bypass a DNAT while a proxy on
//! the host serves them fail no packet, and flows pinned to a backend on
//! another host fail none here: only the conntrack table, held against the
//! host's NAT intent, shows them. An entry judged stale against the rules
//! is raised only when a second look still finds it (an orchestrator that
//! deletes old entries right after changing its rules is doing it right).

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{monotonic, view::View};
use crate::{
    correlate::{Correlator, audit},
    domain::{Alert, Entry, Judgement, Observation, Siblings, Tuple, Verdict},
    error::chain,
    source::{
        conntrack::{self, Conn, Mirror},
        engine::Engine,
        netns,
    },
};

/// After the conntrack mirror could not be opened (or failed), the audit
/// dumps the table each time, and tries the mirror again this much later.
const MIRROR_RETRY: Duration = Duration::from_secs(300);

/// An entry the audit judges stale is raised when a look at least this
/// much later still does.
pub const CONFIRM_AFTER: Duration = Duration::from_millis(900);

pub struct Auditor {
    /// The namespace the audit reads.
    path: PathBuf,
    /// Entries judged stale against the NAT intent, with when they first
    /// were (monotonic): raised at a look at least CONFIRM_AFTER later that
    /// still judges so.
    pending: HashMap<(Tuple, Tuple), Duration>,
    /// The namespace's DNATed entries, kept from conntrack events once
    /// the audit judges them against the NAT intent: an audit then costs
    /// no dump of them.
    mirror: Option<Mirror>,
    /// When to try opening the mirror again after it failed.
    mirror_retry: Option<Instant>,
    /// Mirrors opened so far: tells one socket from the next.
    mirrors_opened: u64,
}

impl Auditor {
    pub fn new(path: PathBuf) -> Self {
        Auditor {
            path,
            pending: HashMap::new(),
            mirror: None,
            mirror_retry: None,
            mirrors_opened: 0,
        }
    }

    /// The mirror's events socket, and which mirror it is (a mirror
    /// dropped and opened again may get the same descriptor).
    pub fn mirror_fd(&self) -> Option<(u64, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd as _;
        self.mirror
            .as_ref()
            .map(|m| (self.mirrors_opened, m.as_raw_fd()))
    }

    fn drop_mirror(&mut self, e: &conntrack::Error) {
        log::warn!(
            "audit: conntrack events of {}: {} (reading the table at each audit instead)",
            self.path.display(),
            chain(e)
        );
        self.mirror = None;
        self.mirror_retry = Some(Instant::now() + MIRROR_RETRY);
    }

    /// Applies the conntrack events queued since the last call (the loop
    /// calls it a tenth of a second after events arrive, once a second
    /// for the mirror's own clocks, and each audit before it reads).
    pub fn update_mirror(&mut self) {
        let Some(mirror) = &mut self.mirror else {
            return;
        };
        let cpu = process_cpu();
        match mirror.update() {
            Ok(update) if update.made + update.gone > 0 || update.resynced => log::debug!(
                "conntrack events of {}: {} entries made, {} gone{}, {} held, in CPU {:?}",
                self.path.display(),
                update.made,
                update.gone,
                if update.resynced {
                    ", the table read again"
                } else {
                    ""
                },
                mirror.len(),
                process_cpu().saturating_sub(cpu)
            ),
            Ok(_) => {}
            Err(e) => self.drop_mirror(&e),
        }
    }

    /// The mirror, opened on first use, keeping the entries to the
    /// namespace's addresses `local` besides the DNATed ones.
    fn mirror(&mut self, local: &std::collections::HashSet<IpAddr>) -> Option<&mut Mirror> {
        if self.mirror.is_none() && self.mirror_retry.is_none_or(|at| Instant::now() >= at) {
            let local: Vec<IpAddr> = local.iter().copied().collect();
            match Mirror::open(&self.path, &local) {
                Ok(mirror) => {
                    self.mirror = Some(mirror);
                    self.mirrors_opened += 1;
                }
                Err(e) => {
                    log::info!(
                        "audit: reading the conntrack table at each audit: {}",
                        chain(&e)
                    );
                    self.mirror_retry = Some(Instant::now() + MIRROR_RETRY);
                }
            }
        }
        if let Some(mirror) = &mut self.mirror
            && let Err(e) = mirror.set_local(local.iter().copied())
        {
            self.drop_mirror(&e);
        }
        self.update_mirror();
        self.mirror.as_mut()
    }

    /// What the audit judges: the entries without NAT that deliver here,
    /// and the DNATed ones: from the mirror, where it works and
    /// `every_dnat`; else from dumps. Also how many DNATed ones the mirror
    /// gave.
    fn candidates(
        &mut self,
        facts: &crate::domain::KnownFacts,
        every_dnat: bool,
    ) -> Result<(Vec<Entry>, Option<usize>), conntrack::Error> {
        let path = self.path.clone();
        if every_dnat && let Some(mirror) = self.mirror(&facts.local) {
            let entries: Vec<Entry> = mirror.entries().map(|m| m.entry).collect();
            let dnat = entries.iter().filter(|e| e.is_dnat()).count();
            return Ok((entries, Some(dnat)));
        }
        Ok((
            conntrack::read_audit_candidates(&path, facts, every_dnat)?,
            None,
        ))
    }

    /// Whether an entry the audit is about to raise still exists: the
    /// mirror's entries that no event vouches for are looked up (their end
    /// is announced to nobody). A gone one leaves the mirror.
    fn still_there(&mut self, entry: &Entry, conn: &mut Option<Conn>) -> bool {
        let Some(mirror) = &mut self.mirror else {
            return true;
        };
        if mirror.announced(entry) {
            return true;
        }
        if conn.is_none() {
            *conn = Conn::open(Some(&self.path)).ok();
        }
        let Some(c) = conn.as_ref() else {
            return true;
        };
        let found = c.find(&entry.orig).map(|found| {
            found
                .iter()
                .any(|e| e.reply == entry.reply && e.zone == entry.zone)
        });
        if matches!(found, Ok(false)) {
            mirror.forget(entry);
            return false;
        }
        true
    }

    /// One audit: the table's candidates judged, what the correlator
    /// raises from them, and whether a follow-up audit is due soon.
    pub fn run(
        &mut self,
        view: &mut View,
        engine: Option<&Engine>,
        correlator: &mut Correlator,
    ) -> (Vec<Alert>, bool) {
        let cpu = process_cpu();
        let started = Instant::now();
        let path = self.path.clone();
        let Ok(inode) = std::fs::metadata(&path).map(|m| m.ino() as u32) else {
            return (Vec::new(), false);
        };
        let mut facts = view.facts(&path);
        if netns::own_inode() == Some(inode)
            && let Some(engine) = engine
        {
            facts.proxied_sources = engine.snapshot().container_addresses();
        }
        let intent = view.intent(&path);
        let judge_dnat = intent.as_ref().is_some_and(|i| !i.read().is_empty());
        let (entries, mirrored) = match self.candidates(&facts, judge_dnat) {
            Ok(read) => read,
            Err(e) => {
                log::warn!("audit: {}", chain(&e));
                return (Vec::new(), false);
            }
        };
        if judge_dnat {
            let sources = audit::bypass_sources(&entries, &facts);
            match netns::arrival_interfaces(&path, sources) {
                Ok(routes) => facts.arrives_on = routes,
                Err(e) => log::warn!("audit: routes back to the sources: {e}"),
            }
        }
        let now = monotonic();
        let mut seen = HashMap::new();
        let mut follow_up = false;
        let mut alerts = Vec::new();
        let mut conn = None;
        let findings = audit::audit(&entries, &facts, intent.as_deref());
        let found = findings.len();
        // The DNATed entries of each service, for the bypasses' siblings
        // (a walk over every entry: only when there are bypasses).
        let mut siblings_of: HashMap<crate::domain::Service, Siblings> = HashMap::new();
        if findings.iter().any(|f| f.verdict == Verdict::Bypass) {
            for other in entries.iter().filter(|o| o.is_dnat()) {
                *siblings_of
                    .entry(other.orig.service())
                    .or_default()
                    .dnat_backends
                    .entry(other.backend())
                    .or_default() += 1;
            }
        }
        // Judged against the rules only where the packets leave for another
        // host: on this host's links, or with no route at all, they fail
        // here, where the kernel path sees them (with their evidence).
        let mut backends: Vec<IpAddr> = findings
            .iter()
            .filter(|f| f.verdict != Verdict::Bypass && f.entry.is_dnat())
            .map(|f| f.entry.backend().addr)
            .collect();
        backends.sort_unstable();
        backends.dedup();
        let remote = netns::gateways(&path, backends)
            .map_err(|e| log::warn!("audit: routes to the backends: {e}"))
            .unwrap_or_default();
        for finding in findings {
            let e = &finding.entry;
            let mut flow = Observation {
                local: true,
                ct: 0,
                netns: inode,
                orig: e.orig,
                reply: e.reply,
                status: e.status,
                first: now,
                last: now,
                icmp: None,
                drops: None,
            };
            let alert = if finding.verdict == Verdict::Bypass {
                // Its DNATed siblings, and the rule that would DNAT it.
                let siblings = siblings_of
                    .get(&e.orig.service())
                    .cloned()
                    .unwrap_or_default();
                // With the rules read, the audit judged it a bypass only
                // on a rule's proof, whose backends are the current ones.
                let rules = (judge_dnat || siblings.dnat_backends.is_empty())
                    .then(|| finding.current_backends.clone());
                if !self.still_there(e, &mut conn) {
                    continue;
                }
                correlator.observe_audited(flow, &siblings, rules, now)
            } else if !e.is_dnat() || facts.neighbour_failed(e.backend().addr) {
                // Failing here: the kernel path raises it, with evidence.
                continue;
            } else if !remote.contains_key(&e.backend().addr) {
                // On this host's links, or with no route at all, its packets
                // fail here once its neighbour does: the kernel path raises
                // it then, with evidence. The rules alone are no proof
                // here (a draining pod still serves after its rule went).
                continue;
            } else {
                let first = *self.pending.get(&(e.orig, e.reply)).unwrap_or(&now);
                seen.insert((e.orig, e.reply), first);
                if now.saturating_sub(first) < CONFIRM_AFTER {
                    follow_up = true;
                    continue;
                }
                if !self.still_there(e, &mut conn) {
                    seen.remove(&(e.orig, e.reply));
                    continue;
                }
                flow.local = false;
                flow.first = first;
                let judgement = Judgement {
                    verdict: finding.verdict,
                    current: finding.current_backends.clone(),
                    evidence: finding.evidence.clone(),
                };
                correlator.observe_judged(flow, judgement, now)
            };
            alerts.extend(alert);
        }
        // An entry no longer judged stale starts afresh if it is again.
        self.pending = seen;
        // The bench reads these lines (figure 4b).
        log::debug!(
            "audit of {}: {} entries judged ({}), {found} findings, in {:?} (CPU {:?})",
            path.display(),
            entries.len(),
            match mirrored {
                Some(n) => format!("{n} DNATed from conntrack events"),
                None => "read from the table".to_owned(),
            },
            started.elapsed(),
            process_cpu().saturating_sub(cpu),
        );
        (alerts, follow_up)
    }
}

/// The process's CPU time (user and system, every thread's, those ended
/// included): the audit runs on the watch's one thread and enters
/// namespaces on short-lived ones, and the rest of the watch waits
/// meanwhile, so the difference around it is the audit's own.
fn process_cpu() -> Duration {
    use nix::libc;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return Duration::ZERO;
    }
    // SAFETY: filled above.
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
