//! The audited namespace's NAT intent, kept current as its rules change:
//! the ruleset announcements of nf_tables are heard on a socket of that
//! namespace and applied to the rules read (native nftables changes, at
//! about a microsecond each), or make the rules read again whole (an
//! iptables-nft change, announcements lost); iptables-legacy (which
//! announces nothing) is read again at each audit.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    domain::{NatIntent, RuleEngine},
    error::chain,
    source::intent::{self, Changes, Reading},
};

/// The NAT intent is read again whole at least this often where its
/// changes are not heard...
const INTENT_TTL: Duration = Duration::from_secs(60);
/// ... and where they are, in case an announcement was missed unnoticed.
const HEARD_TTL: Duration = Duration::from_secs(30 * 60);
/// The share of one core that keeping the intent (reading the rules,
/// taking the announced changes, walking them) may take on average.
const READ_BUDGET: f64 = 0.005;
/// Announced changes are walked into the intent within this, whatever
/// the budget says: a storm of announcements (every endpoint of thousands
/// of services moved at once, again and again) costs more than the budget
/// to take, and detection must not wait for it to end (the audit that
/// follows the walk must raise a pinned entry within 10 s of the change).
const WALK_WITHIN: Duration = Duration::from_secs(5);
/// A report's question takes the intent as it is when the changes were
/// heard this recently (hearing is a system call).
const HEAR_EVERY: Duration = Duration::from_millis(250);
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
    /// How long the last whole reading took (the tools' time and the
    /// parsing).
    cost: Duration,
    /// How long making the intent of the rules took last (the walk).
    walk_cost: Duration,
    /// Reading time saved up (READ_BUDGET of the time since), as of
    /// `paid_at`, after paying for the last reading or walk.
    saved: Duration,
    paid_at: Instant,
    /// The namespace's inode.
    inode: u32,
    reading: Reading,
    intent: Arc<NatIntent>,
    /// When the rules were last read whole.
    read_at: Instant,
    /// Ruleset announcements of the namespace, where they can be heard,
    /// and when they last were.
    changes: Option<Changes>,
    heard_at: Instant,
    /// The rules must be read again whole (a change the reading cannot
    /// take was announced).
    dirty: bool,
    /// Changes applied to the reading since the intent was made from it,
    /// and when the first of them was.
    applied: usize,
    applied_since: Option<Instant>,
}

impl IntentCache {
    /// Whether spending `cost` now keeps reading within READ_BUDGET of a
    /// core on average: a ruleset of thousands of services takes the
    /// tools seconds, and however often it changes, detection then waits
    /// that much longer rather than spend more.
    fn affordable(&self, cost: Duration) -> bool {
        saved_by(self.saved, self.paid_at.elapsed(), self.cost) >= cost
    }

    /// Pays `cost` from what is saved up.
    fn pay(&mut self, cost: Duration) {
        self.saved = saved_by(self.saved, self.paid_at.elapsed(), self.cost).saturating_sub(cost);
        self.paid_at = Instant::now();
    }

    /// Hears what was announced: changes applied to the reading, or the
    /// rules marked for reading again whole.
    fn hear(&mut self) {
        self.heard_at = Instant::now();
        let Some(changes) = &mut self.changes else {
            return;
        };
        let started = Instant::now();
        let (reading, dirty, applied) = (&mut self.reading, &mut self.dirty, &mut self.applied);
        let before = *applied;
        let whole = changes.drain(|a| {
            if *dirty || matches!(a, intent::Announcement::Generation) {
                return;
            }
            match reading.apply(a) {
                Ok(()) => *applied += 1,
                Err(e) => {
                    log::debug!("{e}: the rules are read again");
                    *dirty = true;
                }
            }
        });
        if !whole {
            log::debug!("ruleset announcements lost: the rules are read again");
            self.dirty = true;
        }
        if self.applied != before {
            // Taking announcements is reading the rules too: the budget
            // pays for it, and a storm of them defers the walk (to
            // WALK_WITHIN at most).
            self.pay(started.elapsed());
            self.applied_since.get_or_insert(started);
        }
    }

    /// Whether a change is waiting and may be taken now.
    fn due(&self) -> bool {
        if self.dirty {
            self.affordable(self.cost)
        } else {
            self.applied > 0
                && (self.affordable(self.walk_cost)
                    || self
                        .applied_since
                        .is_some_and(|t| t.elapsed() >= WALK_WITHIN))
        }
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
    /// intent was made, and taking it is due now (without taking it).
    pub fn changed(&mut self) -> bool {
        let Some(cache) = &mut self.cache else {
            return false;
        };
        cache.hear();
        cache.due()
    }

    /// The NAT intent of the namespace at `path` as last made, where its
    /// changes were heard within HEAR_EVERY (else [`Rules::read`]): what
    /// a report asks, thousands of times a second in a flood.
    pub fn current(&mut self, path: &Path) -> Option<Arc<NatIntent>> {
        match &self.cache {
            Some(c) if c.heard_at.elapsed() < HEAR_EVERY => Some(c.intent.clone()),
            _ => self.read(path),
        }
    }

    /// The NAT intent of the namespace at `path`: changes announced
    /// applied, or the rules read again whole when a change cannot be
    /// applied, when iptables-legacy (which announces nothing) has rules
    /// there, or every INTENT_TTL. `None` when it cannot be read.
    pub fn read(&mut self, path: &Path) -> Option<Arc<NatIntent>> {
        if let Some(cache) = &mut self.cache {
            cache.hear();
            let legacy = cache
                .intent
                .read()
                .iter()
                .any(|r| r.engine == RuleEngine::IptablesLegacy);
            let ttl = if cache.changes.is_some() {
                HEARD_TTL
            } else {
                INTENT_TTL
            };
            if (legacy || cache.read_at.elapsed() >= ttl) && !cache.dirty {
                cache.dirty = true;
            }
            if !cache.due() {
                return Some(cache.intent.clone());
            }
            if !cache.dirty {
                // The announced changes, applied: the intent made again.
                let started = Instant::now();
                match cache.reading.intent() {
                    Ok(intent) => {
                        let intent = Arc::new(intent);
                        let cost = started.elapsed();
                        log::info!(
                            "NAT intent of {}: {} DNAT rules ({}), {} announced changes taken in {cost:?}",
                            path.display(),
                            intent.rules().len(),
                            intent.engines(),
                            cache.applied
                        );
                        cache.walk_cost = cost;
                        cache.pay(cost);
                        cache.applied = 0;
                        cache.applied_since = None;
                        let old = std::mem::replace(&mut cache.intent, intent.clone());
                        if let Ok(old) = Arc::try_unwrap(old) {
                            cache.reading.recycle(old.into_rules());
                        }
                        return Some(intent);
                    }
                    Err(e) => {
                        // A rule announced that cannot be read.
                        log::debug!("{e}: the rules are read again");
                        cache.dirty = true;
                        if !cache.due() {
                            return Some(cache.intent.clone());
                        }
                    }
                }
            }
        }
        // Listen before reading: a change made meanwhile is heard, and
        // what was announced before is in the reading.
        let (mut changes, saved, paid_at) = match self.cache.take() {
            Some(c) => (c.changes, c.saved, c.paid_at),
            None => (None, SAVED_READING, Instant::now()),
        };
        if changes.is_none() {
            changes = Changes::listen(path)
                .map_err(|e| log::debug!("ruleset announcements unheard: {e}"))
                .ok();
        }
        if let Some(c) = &mut changes {
            c.drain(|_| {});
        }
        let started = Instant::now();
        let mut reading = intent::read(path)
            .map_err(|e| log::warn!("NAT intent: {}", chain(&e)))
            .ok()?;
        let read_cost = started.elapsed();
        let intent = Arc::new(
            reading
                .intent()
                .map_err(|e| log::warn!("NAT intent: {e}"))
                .ok()?,
        );
        let cost = started.elapsed();
        log::debug!(
            "NAT intent of {}: the rules read in {read_cost:?}, walked in {:?}",
            path.display(),
            cost - read_cost
        );
        log::info!(
            "NAT intent of {}: {} DNAT rules ({}), read in {cost:?}",
            path.display(),
            intent.rules().len(),
            intent.engines()
        );
        let inode = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
            .unwrap_or(0);
        let mut cache = IntentCache {
            cost,
            walk_cost: cost.saturating_sub(read_cost),
            saved,
            paid_at,
            inode,
            reading,
            intent: intent.clone(),
            read_at: Instant::now(),
            changes,
            heard_at: Instant::now(),
            dirty: false,
            applied: 0,
            applied_since: None,
        };
        cache.pay(cost);
        self.cache = Some(cache);
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
        // ... with nothing saved, after 4 s (0.5% of it pays 20 ms).
        assert!(saved_by(ms(0), ms(3_900), ms(20)) < ms(20));
        assert!(saved_by(ms(0), ms(4_000), ms(20)) >= ms(20));
        // Saving stops at SAVED_READING.
        assert_eq!(
            saved_by(ms(0), Duration::from_secs(3_600), ms(20)),
            SAVED_READING
        );
        // A 3 s reading waits 600 s, however long saved for.
        assert!(saved_by(ms(0), Duration::from_secs(599), ms(3_000)) < ms(3_000));
        assert_eq!(
            saved_by(ms(0), Duration::from_secs(3_600), ms(3_000)),
            ms(3_000)
        );
    }
}
