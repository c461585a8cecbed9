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

#[derive(Default)]
pub struct Rules {
    cache: Option<IntentCache>,
}

struct IntentCache {
    /// The namespace's inode.
    inode: u32,
    intent: Arc<NatIntent>,
    read_at: Instant,
    /// Ruleset announcements of the namespace, where they can be heard.
    changes: Option<Changes>,
    /// Announced since the last reading.
    dirty: bool,
}

impl Rules {
    /// The inode of the namespace read, once read.
    pub fn inode(&self) -> Option<u32> {
        self.cache.as_ref().map(|c| c.inode)
    }

    /// Whether the audited namespace announced a ruleset change since the
    /// last look (without reading the rules).
    pub fn changed(&mut self) -> bool {
        let Some(cache) = &mut self.cache else {
            return false;
        };
        if let Some(changes) = &mut cache.changes
            && changes.any()
        {
            cache.dirty = true;
        }
        cache.dirty
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
            if !(cache.dirty || legacy || cache.read_at.elapsed() >= INTENT_TTL) {
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
        let intent = intent::read(path)
            .map_err(|e| log::warn!("NAT intent: {}", chain(&e)))
            .ok()
            .map(Arc::new)?;
        let inode = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
            .unwrap_or(0);
        self.cache = Some(IntentCache {
            inode,
            intent: intent.clone(),
            read_at: Instant::now(),
            changes,
            dirty: false,
        });
        Some(intent)
    }
}
