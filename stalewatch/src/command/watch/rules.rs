//! The audited namespace's NAT intent, read when its rules change: the
//! ruleset announcements of nf_tables are heard on a socket of that
//! namespace, and iptables-legacy (which announces nothing) is read again
//! at each audit.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    domain::{NatIntent, RuleEngine},
    error::chain,
    source::intent::{self, Changes},
};

/// The NAT intent is read again at least this often, whatever announces
/// its changes.
const INTENT_TTL: Duration = Duration::from_secs(60);
/// The share of one core that reading the intent may take on average.
const READ_BUDGET: f64 = 0.01;

#[derive(Default)]
pub struct Rules {
    cache: Option<IntentCache>,
}

struct IntentCache {
    /// How long the last reading took (the tools' time and the parsing).
    cost: Duration,
    /// The namespace's inode.
    inode: u32,
    intent: Arc<NatIntent>,
    read_at: Instant,
    /// Ruleset announcements of the namespace, where they can be heard.
    changes: Option<Changes>,
    /// Announced since the last reading.
    dirty: bool,
}

impl IntentCache {
    /// Whether reading again now keeps reading within READ_BUDGET of a
    /// core: a ruleset of thousands of services takes the tools seconds,
    /// and however often it changes, detection then waits that much
    /// longer rather than spend more.
    fn affordable(&self) -> bool {
        self.read_at.elapsed() >= self.cost.mul_f64(1.0 / READ_BUDGET)
    }
}

impl Rules {
    /// The inode of the namespace read, once read.
    pub fn inode(&self) -> Option<u32> {
        self.cache.as_ref().map(|c| c.inode)
    }

    /// Whether the audited namespace announced a ruleset change since the
    /// last reading, and reading it again is due now (without reading).
    pub fn changed(&mut self) -> bool {
        let Some(cache) = &mut self.cache else {
            return false;
        };
        if let Some(changes) = &mut cache.changes
            && changes.any()
        {
            cache.dirty = true;
        }
        cache.dirty && cache.affordable()
    }

    /// The NAT intent of the namespace at `path`: read again when its
    /// ruleset changed, when iptables-legacy (which announces nothing)
    /// has rules there, or every INTENT_TTL. `None` when it cannot be
    /// read.
    pub fn read(&mut self, path: &Path) -> Option<Arc<NatIntent>> {
        self.changed();
        if let Some(cache) = &self.cache {
            let legacy = cache
                .intent
                .read()
                .iter()
                .any(|r| r.engine == RuleEngine::IptablesLegacy);
            let due = cache.dirty || legacy || cache.read_at.elapsed() >= INTENT_TTL;
            if !(due && cache.affordable()) {
                return Some(cache.intent.clone());
            }
        }
        // Listen before reading: a change made meanwhile is heard.
        let changes = match self.cache.take() {
            Some(IntentCache {
                changes: Some(c), ..
            }) => Some(c),
            _ => Changes::listen(path)
                .map_err(|e| log::debug!("ruleset announcements unheard: {e}"))
                .ok(),
        };
        let started = Instant::now();
        let intent = intent::read(path)
            .map_err(|e| log::warn!("NAT intent: {}", chain(&e)))
            .ok()
            .map(Arc::new)?;
        let cost = started.elapsed();
        log::info!(
            "NAT intent of {}: {} DNAT rules ({}), read in {cost:?}",
            path.display(),
            intent.rules().len(),
            intent.engines()
        );
        let inode = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
            .unwrap_or(0);
        self.cache = Some(IntentCache {
            inode,
            intent: intent.clone(),
            read_at: Instant::now(),
            cost,
            changes,
            dirty: false,
        });
        Some(intent)
    }
}
