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
/// The reading time that may be saved up, at least: a host whose small
/// ruleset changes in bursts (a redeploy) reads each change at once, not
/// one per 100 readings' time. A ruleset whose reading takes longer saves
/// up one reading.
const SAVED_READING: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Rules {
    cache: Option<IntentCache>,
}

struct IntentCache {
    /// How long the last reading took (the tools' time and the parsing).
    cost: Duration,
    /// Reading time saved up (READ_BUDGET of the time since), as of
    /// `read_at`, after paying for that reading.
    saved: Duration,
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
    /// core on average: a ruleset of thousands of services takes the
    /// tools seconds, and however often it changes, detection then waits
    /// that much longer rather than spend more.
    fn affordable(&self) -> bool {
        saved_by(self.saved, self.read_at.elapsed(), self.cost) >= self.cost
    }
}

/// The reading time saved up `since` after a reading of duration `cost`
/// that left `saved`: READ_BUDGET of the time passed, up to
/// SAVED_READING or one reading.
fn saved_by(saved: Duration, since: Duration, cost: Duration) -> Duration {
    (saved + since.mul_f64(READ_BUDGET)).min(SAVED_READING.max(cost))
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
        // What is saved up pays for this reading.
        let saved_before = self.cache.as_ref().map_or(SAVED_READING, |c| {
            saved_by(c.saved, c.read_at.elapsed(), c.cost)
        });
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
            saved: saved_before.saturating_sub(cost),
            changes,
            dirty: false,
        });
        Some(intent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_small_ruleset_is_read_again_at_once_and_a_large_one_waits() {
        // 20 ms a reading, 500 ms saved: read again at once...
        assert!(saved_by(ms(500), ms(0), ms(20)) >= ms(20));
        // ... with nothing saved, after 2 s (1% of it pays 20 ms).
        assert!(saved_by(ms(0), ms(1_900), ms(20)) < ms(20));
        assert!(saved_by(ms(0), ms(2_000), ms(20)) >= ms(20));
        // Saving stops at SAVED_READING.
        assert_eq!(
            saved_by(ms(0), Duration::from_secs(3_600), ms(20)),
            SAVED_READING
        );
        // A 3 s reading waits 300 s, however long saved for.
        assert!(saved_by(ms(0), Duration::from_secs(299), ms(3_000)) < ms(3_000));
        assert_eq!(
            saved_by(ms(0), Duration::from_secs(3_600), ms(3_000)),
            ms(3_000)
        );
    }
}
