//! The DNATs of a native nftables ruleset, from `nft -j list ruleset`
//! parsed with the `nftables` crate's types. Every NAT base chain of hook
//! prerouting or output is walked, through `jump`/`goto`, verdict maps
//! (kube-proxy's `ip daddr . meta l4proto . th dport vmap @service-ips`,
//! `numgen ... vmap`) and DNAT maps, gathering the matches on the way.
//! Rules of iptables-nft (their `xt` compat statements) are left to the
//! iptables reader.
//!
//! The ruleset read is kept: nf_tables' announcements of each change
//! ([`netlink`]) are applied to it, and the walk done again, so that a
//! ruleset of thousands of services is not listed again per change.

pub mod netlink;

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use foldhash::{HashMap, HashSet};
use indexmap::IndexMap;

use nftables::{
    expr::{Expression, Meta, MetaKey, NamedExpression, Payload, SetItem, Verdict},
    schema::{Chain, Rule},
    stmt::{Match, NAT, Operator, Statement},
    types::{NfChainType, NfFamily, NfHook},
};
use serde::Deserialize as _;
use serde_json::Value;
use smallvec::{SmallVec, smallvec};

use self::netlink::{Announcement, Ending, Narrow, SetShape};
use crate::domain::{
    AddrSpan, Cond, Conditions, DnatRule, Family, NatTarget, PortSpan, Proto, RuleEngine,
};

/// Chains followed from a base chain, at most: rulesets do not loop, but
/// a reader must not trust that.
const MAX_DEPTH: usize = 16;

/// A table's object: (family, table, name).
/// `family NUL table NUL name`: one string, looked up without making one
/// (names cannot hold a NUL).
type Key = String;

/// A set's or map's elements by their identity ([`identity`] of the key):
/// an element announced again or deleted is found without reading the
/// others (a kube-proxy map holds one per service).
type Elements = IndexMap<String, Expression<'static>, foldhash::fast::RandomState>;

/// A chain as the maps know it: a 128-bit digest of its [`Key`] under
/// the ruleset's own random seeds, compared in place. A key compared as
/// a string is a cache miss of its own for each of thousands of chains,
/// at every rule announced and every walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ChainId(u64, u64);

/// Makes [`ChainId`]s: two hashes with seeds of their own.
#[derive(Default)]
struct ChainIds([foldhash::fast::RandomState; 2]);

impl ChainIds {
    fn of(&self, key: &str) -> ChainId {
        use std::hash::BuildHasher as _;
        ChainId(self.0[0].hash_one(key), self.0[1].hash_one(key))
    }
}

/// A chain's rules, its key and its name as evidence says it.
struct Rules {
    key: Key,
    label: Arc<str>,
    /// Inline: most chains of a large ruleset hold one rule (a
    /// kube-proxy endpoint's DNAT), read with the chain at no second miss.
    rules: SmallVec<[Kept; 1]>,
}

/// A rule as kept: read into statements, read compact, or as announced,
/// to be read into statements when the rules are walked next (a storm of
/// changes replaces most rules before the walk: those are never read).
enum Kept {
    Read(Rule<'static>),
    /// Announced in the common shapes ([`netlink::compact`]) and read as
    /// it is: a kube-proxy endpoint's DNAT, without an `nftables` tree.
    Compact {
        handle: u32,
        /// Inline: most have one (an endpoint's `meta l4proto`), and a
        /// storm makes and frees ten thousand at every rewrite.
        matches: SmallVec<[Narrow; 1]>,
        end: Ending<ChainId>,
    },
    Announced {
        handle: u32,
        family: NfFamily,
        exprs: Box<[u8]>,
    },
}

impl Kept {
    fn handle(&self) -> Option<u32> {
        match self {
            Kept::Read(r) => r.handle,
            Kept::Compact { handle, .. } | Kept::Announced { handle, .. } => Some(*handle),
        }
    }

    /// A rule announced in the common shapes ([`netlink::compact`]), its
    /// jumps' chains named by `id`.
    fn compact(handle: u32, shape: netlink::Shape<'_>, id: impl FnMut(&str) -> ChainId) -> Kept {
        Kept::Compact {
            handle,
            matches: shape.matches,
            end: shape.end.map(id),
        }
    }
}

/// The chains' rules, kept in the order their chains were first read or
/// announced, found by id through a small index: a listing, a storm's
/// flushes and refills and a walk all go through a kube-proxy ruleset's
/// chains service by service, so their rules are read from memory in
/// the order they lie in, not at a cache miss each.
#[derive(Default)]
struct Chains {
    index: HashMap<ChainId, u32>,
    /// Each slot's chain (an emptied slot's last): the slots near the
    /// one found last are looked through before the index, itself a
    /// cache miss in a ruleset of thousands of chains.
    ids: Vec<ChainId>,
    slots: Vec<Option<Rules>>,
    /// Slots emptied, to fill again.
    free: Vec<u32>,
    /// The slot found last: the next chain asked for is most often a few
    /// after it (or, in a walk, just before it).
    last: std::cell::Cell<usize>,
}

/// Slots looked through before and after the one found last.
const NEAR: (usize, usize) = (4, 8);

impl Chains {
    /// The slot of chain `id`.
    fn find(&self, id: &ChainId) -> Option<usize> {
        let last = self.last.get();
        let lo = last.saturating_sub(NEAR.0);
        let hi = (last + NEAR.1 + 1).min(self.ids.len());
        let near = self.ids.get(lo..hi).and_then(|ids| {
            let at = lo + ids.iter().position(|i| i == id)?;
            self.slots[at].is_some().then_some(at)
        });
        let at = match near {
            Some(at) => at,
            None => *self.index.get(id)? as usize,
        };
        self.last.set(at);
        Some(at)
    }

    fn get(&self, id: &ChainId) -> Option<&Rules> {
        self.slots[self.find(id)?].as_ref()
    }

    fn get_mut(&mut self, id: &ChainId) -> Option<&mut Rules> {
        let at = self.find(id)?;
        self.slots[at].as_mut()
    }

    /// Chain `id`'s rules, made by `new` if it has none yet.
    fn get_or_insert_with(&mut self, id: ChainId, new: impl FnOnce() -> Rules) -> &mut Rules {
        let at = match self.find(&id) {
            Some(at) => at,
            None => {
                let at = match self.free.pop() {
                    Some(at) => {
                        let at = at as usize;
                        self.slots[at] = Some(new());
                        self.ids[at] = id;
                        at
                    }
                    None => {
                        self.slots.push(Some(new()));
                        self.ids.push(id);
                        self.slots.len() - 1
                    }
                };
                let slot = u32::try_from(at).expect("fewer than 2^32 chains");
                self.index.insert(id, slot);
                self.last.set(at);
                at
            }
        };
        self.slots[at].as_mut().expect("a slot found is filled")
    }

    #[cfg(test)]
    fn insert(&mut self, id: ChainId, rules: Rules) {
        *self.get_or_insert_with(id, || Rules::new(String::new())) = rules;
    }

    fn remove(&mut self, id: &ChainId) {
        if let Some(at) = self.index.remove(id) {
            self.slots[at as usize] = None;
            self.free.push(at);
        }
    }

    /// Keeps the chains whose rules `keep` says to.
    fn retain(&mut self, mut keep: impl FnMut(&Rules) -> bool) {
        let (slots, free) = (&mut self.slots, &mut self.free);
        self.index.retain(|_, at| {
            let slot = &mut slots[*at as usize];
            if slot.as_ref().is_some_and(&mut keep) {
                return true;
            }
            *slot = None;
            free.push(*at);
            false
        });
    }
}

impl Rules {
    fn new(key: Key) -> Rules {
        let (family, table, name) = parts(&key);
        Rules {
            label: format!("{family} {table}/{name}").into(),
            key,
            rules: SmallVec::new(),
        }
    }
}

/// What a ruleset says of its DNATs.
pub struct Parsed {
    pub rules: Vec<DnatRule>,
    /// Every DNAT of nftables' own was understood.
    pub complete: bool,
    /// iptables-nft DNATs are on the way too (compat statements), for its
    /// own reader.
    pub iptables_dnat: bool,
}

/// The DNATs of a ruleset.
#[cfg(test)]
pub fn parse(json: &str) -> Result<Parsed, serde_json::Error> {
    Ok(Ruleset::from_json(json)?.walk())
}

/// A native nftables ruleset as far as its DNATs go: what `nft -j` listed,
/// changed since by what nf_tables announced.
#[derive(Default)]
pub struct Ruleset {
    /// NAT base chains at prerouting or output.
    bases: Vec<Key>,
    ids: ChainIds,
    chains: Chains,
    /// Elements of sets and maps: a set's are keys, a map's `[key, value]`.
    elements: HashMap<Key, Elements>,
    /// Named sets' shapes, to read the elements announced; a set of a
    /// type not read has none.
    shapes: HashMap<Key, SetShape>,
    /// Anonymous sets announced, with their elements, until the rule that
    /// holds them is.
    anonymous: HashMap<Key, (SetShape, Elements)>,
    /// False once a rule that DNATs could not be read.
    complete: bool,
    /// The chains of the rules kept as announced since the last settle
    /// (some more than once, some gone since): a settle visits these, not
    /// every chain; none, and there is nothing to read.
    unread: Vec<ChainId>,
    /// Where an announced rule's chain key is written to look it up, and
    /// its id: a flush and its refill announce one chain's rules one after
    /// the other.
    scratch: String,
    scratch_id: Option<ChainId>,
    /// The DNAT rules the last walk found.
    walked: usize,
    /// Room for the next walk's rules ([`Ruleset::recycle`]).
    spare: Vec<DnatRule>,
    /// Tables read by another tool (iptables-nft's `nat`): their
    /// changes make the rules read again whole.
    foreign: Vec<(String, String)>,
}

/// The tables of `nft -j list tables`: (family, name).
pub fn tables(json: &str) -> Vec<(String, String)> {
    let root: Value = serde_json::from_str(json).unwrap_or_default();
    root.get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let t = o.get("table")?;
            Some((
                t.get("family")?.as_str()?.to_owned(),
                t.get("name")?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// An announcement the ruleset kept cannot take: it must be listed again.
#[derive(Debug, thiserror::Error)]
#[error("nftables announced {0} that is not read from announcements")]
pub struct Unread(pub &'static str);

impl Ruleset {
    /// The ruleset `nft -j list ruleset` printed, read one object at a
    /// time: the listing of thousands of services is never one tree in
    /// memory (it would be ~100 MB, and leave the heap in pieces).
    #[cfg(test)]
    pub fn from_json(json: &str) -> Result<Ruleset, serde_json::Error> {
        let mut ruleset = Ruleset::new(Vec::new());
        ruleset.add_json(json)?;
        Ok(ruleset)
    }

    /// An empty ruleset, but for the tables of `foreign` (read by another
    /// tool).
    pub fn new(foreign: Vec<(String, String)>) -> Ruleset {
        Ruleset {
            complete: true,
            foreign,
            ..Ruleset::default()
        }
    }

    /// Adds what a listing printed (`nft -j list ruleset`, or `list
    /// table`).
    pub fn add_json(&mut self, json: &str) -> Result<(), serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(json);
        serde::de::DeserializeSeed::deserialize(Listing(self), &mut de)?;
        de.end()
    }

    /// Whether a change of this table is another tool's to read.
    fn is_foreign(&self, family: NfFamily, table: &str) -> bool {
        let family = family_name(family);
        self.foreign.iter().any(|(f, t)| f == family && t == table)
    }

    /// Reads the rules kept as announced: before a walk.
    pub fn settle(&mut self) -> Result<(), Unread> {
        if self.unread.is_empty() {
            return Ok(());
        }
        let mut unread = std::mem::take(&mut self.unread);
        unread.sort_unstable();
        unread.dedup();
        for id in &unread {
            let Some(chain) = self.chains.get_mut(id) else {
                continue;
            };
            for kept in &mut chain.rules {
                if let Kept::Announced {
                    handle,
                    family,
                    exprs,
                } = kept
                {
                    let sets = TableSets {
                        shapes: &self.shapes,
                        anonymous: &self.anonymous,
                        family: *family,
                        table: parts(&chain.key).1,
                    };
                    match read_rule(*family, *handle, exprs, &sets) {
                        Ok(rule) => *kept = Kept::Read(rule),
                        Err(e) => {
                            // Left to read, as before this settle.
                            self.unread = unread;
                            return Err(e);
                        }
                    }
                }
            }
        }
        // Its room, for the next storm's.
        unread.clear();
        self.unread = unread;
        Ok(())
    }

    /// The DNATs of the ruleset, walked from its NAT base chains (rules
    /// not read yet, see [`Ruleset::settle`], are left out).
    pub fn walk(&mut self) -> Parsed {
        // As many as last time, where they were if that room is back: ten
        // thousand rules grown by doubling are megabytes copied, and fresh
        // pages faulted in.
        let mut out = std::mem::take(&mut self.spare);
        out.reserve(self.walked);
        let mut walk = Walk {
            ruleset: self,
            out,
            complete: self.complete,
            iptables_dnat: false,
            entered: HashSet::default(),
            scratch: String::new(),
        };
        let mut bases: Vec<&str> = self.bases.iter().map(String::as_str).collect();
        bases.sort();
        bases.dedup();
        for key in bases {
            let family = match parts(key).0 {
                "ip" => Some(Family::Ipv4),
                "ip6" => Some(Family::Ipv6),
                _ => None,
            };
            let when = Conditions {
                family,
                ..Conditions::default()
            };
            let id = self.ids.of(key);
            if let Some(rules) = self.chains.get(&id) {
                walk.chain(key, id, rules, when, 0);
            }
        }
        let Walk {
            out,
            complete,
            iptables_dnat,
            ..
        } = walk;
        self.walked = out.len();
        Parsed {
            rules: out,
            complete,
            iptables_dnat,
        }
    }

    /// Room for the next walk's rules: the vector's capacity (its rules
    /// are dropped now).
    pub fn recycle(&mut self, mut rules: Vec<DnatRule>) {
        rules.clear();
        self.spare = rules;
    }

    /// Applies one announced change.
    pub fn apply(&mut self, a: Announcement<'_>) -> Result<(), Unread> {
        let table = match &a {
            Announcement::Table { family, name, .. } => Some((*family, *name)),
            Announcement::Chain { chain: o, .. }
            | Announcement::Rule { chain: o, .. }
            | Announcement::Set { set: o, .. }
            | Announcement::Elements { set: o, .. } => Some((o.family, o.table)),
            Announcement::Generation => None,
        };
        if let Some((family, name)) = table
            && self.is_foreign(family, name)
        {
            return Err(Unread("a change of iptables-nft's rules"));
        }
        match a {
            Announcement::Generation => {}
            Announcement::Table { gone: false, .. } => {}
            Announcement::Table { family, name, .. } => {
                let family = family_name(family);
                let of_table = |k: &Key| {
                    let (f, t, _) = parts(k);
                    f == family && t == name
                };
                self.bases.retain(|k| !of_table(k));
                self.chains.retain(|r| !of_table(&r.key));
                self.elements.retain(|k, _| !of_table(k));
                self.shapes.retain(|k, _| !of_table(k));
                self.anonymous.retain(|k, _| !of_table(k));
            }
            Announcement::Chain {
                chain,
                nat_base,
                gone,
            } => {
                let k = object_key(&chain);
                if gone {
                    self.bases.retain(|b| *b != k);
                    self.chains.remove(&self.ids.of(&k));
                } else if nat_base
                    && matches!(chain.family, NfFamily::IP | NfFamily::IP6 | NfFamily::INet)
                    && !self.bases.contains(&k)
                {
                    self.bases.push(k);
                }
            }
            Announcement::Rule {
                chain,
                handle,
                after,
                append,
                gone,
                exprs,
            } => {
                // The chain's key, written into a buffer kept for it: a
                // storm announces tens of thousands of rules.
                let id = match self.scratch_id {
                    Some(id) if key_is(&self.scratch, chain.family, chain.table, chain.name) => id,
                    _ => {
                        key_into(&mut self.scratch, chain.family, chain.table, chain.name);
                        *self.scratch_id.insert(self.ids.of(&self.scratch))
                    }
                };
                let handle = u32::try_from(handle).map_err(|_| Unread("a rule handle"))?;
                if gone {
                    if let Some(chain) = self.chains.get_mut(&id) {
                        chain.rules.retain(|r| r.handle() != Some(handle));
                    }
                    return Ok(());
                }
                let rule = if let Some(shape) = netlink::compact(chain.family, exprs) {
                    // Read now, while its chain is in the cache: a storm's
                    // endpoint rules, at a fraction of a microsecond each.
                    let (ids, key) = (&self.ids, &self.scratch);
                    let mut buf = String::new();
                    Kept::compact(handle, shape, |name| ids.of(sibling(&mut buf, key, name)))
                } else if netlink::looks_up(exprs) {
                    let sets = TableSets {
                        shapes: &self.shapes,
                        anonymous: &self.anonymous,
                        family: chain.family,
                        table: chain.table,
                    };
                    Kept::Read(read_rule(chain.family, handle, exprs, &sets)?)
                } else {
                    self.unread.push(id);
                    Kept::Announced {
                        handle,
                        family: chain.family,
                        exprs: exprs.into(),
                    }
                };
                let rules = &mut self
                    .chains
                    .get_or_insert_with(id, || Rules::new(self.scratch.clone()))
                    .rules;
                rules.retain(|r| r.handle() != Some(handle));
                let at = match after {
                    Some(h) => rules
                        .iter()
                        .position(|r| r.handle().map(u64::from) == Some(h))
                        .map_or(rules.len(), |i| i + 1),
                    None if append => rules.len(),
                    None => 0,
                };
                rules.insert(at, rule);
            }
            Announcement::Set { set, shape, gone } => {
                let k = object_key(&set);
                if gone {
                    self.anonymous.remove(&k);
                    self.shapes.remove(&k);
                    self.elements.remove(&k);
                } else if shape.anonymous {
                    self.anonymous.insert(k, (shape, Elements::default()));
                } else {
                    self.elements.entry(k.clone()).or_default();
                    self.shapes.insert(k, shape);
                }
            }
            Announcement::Elements {
                set,
                elements,
                gone,
            } => {
                let k = object_key(&set);
                let (shape, list) = if let Some((shape, list)) = self.anonymous.get_mut(&k) {
                    (&*shape, list)
                } else {
                    let shape = self.shapes.get(&k).ok_or(Unread("elements of a set"))?;
                    (shape, self.elements.entry(k).or_default())
                };
                if shape.interval {
                    return Err(Unread("elements of an interval set"));
                }
                for e in netlink::elements(elements) {
                    let e = netlink::element(shape, &e).ok_or(Unread("a set element"))?;
                    let id = identity(element_key(&e));
                    if gone {
                        list.shift_remove(&id);
                    } else {
                        list.insert(id, e);
                    }
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, object: Value) {
        let Value::Object(object) = object else {
            return;
        };
        let Some((kind, body)) = object.into_iter().next() else {
            return;
        };
        match kind.as_str() {
            "chain" => {
                if let Ok(chain) = serde_json::from_value::<Chain>(body)
                    && chain._type == Some(NfChainType::NAT)
                    && matches!(chain.hook, Some(NfHook::Prerouting | NfHook::Output))
                    && matches!(chain.family, NfFamily::IP | NfFamily::IP6 | NfFamily::INet)
                {
                    self.bases
                        .push(key(chain.family, &chain.table, &chain.name));
                }
            }
            "rule" => match Rule::<'static>::deserialize(&body) {
                Ok(rule) => {
                    let k = key(rule.family, &rule.table, &rule.chain);
                    self.chains
                        .get_or_insert_with(self.ids.of(&k), || Rules::new(k))
                        .rules
                        .push(Kept::Read(rule));
                }
                Err(e) => {
                    // A rule this reader cannot parse matters only if it
                    // could DNAT.
                    if body.to_string().contains("\"dnat\"") {
                        log::debug!("nftables: a DNAT rule not understood: {e}");
                        self.complete = false;
                    }
                }
            },
            "set" | "map" => {
                let field = |name: &str| body.get(name).and_then(Value::as_str).unwrap_or("");
                let names = |name: &str| -> Vec<&str> {
                    match body.get(name) {
                        Some(Value::String(s)) => vec![s.as_str()],
                        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                        _ => Vec::new(),
                    }
                };
                let interval = names("flags").contains(&"interval");
                let map = names("map");
                let shape = SetShape::from_names(
                    &names("type"),
                    (kind == "map").then_some(map.as_slice()),
                    interval,
                );
                let elements: Elements = body
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| Expression::deserialize(e).ok())
                    .map(|e| (identity(element_key(&e)), e))
                    .collect();
                let k = [field("family"), field("table"), field("name")].join("\0");
                if let Some(shape) = shape {
                    self.shapes.insert(k.clone(), shape);
                }
                self.elements.insert(k, elements);
            }
            _ => {}
        }
    }
}

/// `{"nftables": [object, ...]}`, each object added as it is read.
struct Listing<'r>(&'r mut Ruleset);

impl<'de> serde::de::DeserializeSeed<'de> for Listing<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Listing<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an nftables listing")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "nftables" {
                map.next_value_seed(Objects(&mut *self.0))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// The listing's array of objects.
struct Objects<'r>(&'r mut Ruleset);

impl<'de> serde::de::DeserializeSeed<'de> for Objects<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Objects<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of nftables objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(object) = seq.next_element::<Value>()? {
            self.0.add(object);
        }
        Ok(())
    }
}

fn key(family: NfFamily, table: &str, name: &str) -> Key {
    let mut k = String::with_capacity(family_name(family).len() + table.len() + name.len() + 2);
    key_into(&mut k, family, table, name);
    k
}

/// [`key`], written into `k`.
fn key_into(k: &mut String, family: NfFamily, table: &str, name: &str) {
    k.clear();
    for (i, part) in [family_name(family), table, name].into_iter().enumerate() {
        if i > 0 {
            k.push('\0');
        }
        k.push_str(part);
    }
}

/// Whether `k` is the [`key`] of these parts, without writing one.
fn key_is(k: &str, family: NfFamily, table: &str, name: &str) -> bool {
    let family = family_name(family);
    let k = k.as_bytes();
    let (f, t) = (family.len(), family.len() + 1 + table.len());
    k.len() == t + 1 + name.len()
        && &k[..f] == family.as_bytes()
        && k[f] == 0
        && &k[f + 1..t] == table.as_bytes()
        && k[t] == 0
        && &k[t + 1..] == name.as_bytes()
}

/// A key's family, table and name.
fn parts(k: &str) -> (&str, &str, &str) {
    let mut it = k.splitn(3, '\0');
    (
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    )
}

/// The key of `name` in the table of `k`, written into `buf`.
fn sibling<'b>(buf: &'b mut String, k: &str, name: &str) -> &'b str {
    let table_end = k.match_indices('\0').nth(1).map_or(k.len(), |(i, _)| i + 1);
    buf.clear();
    buf.push_str(&k[..table_end]);
    buf.push_str(name);
    buf
}

fn object_key(o: &netlink::Object<'_>) -> Key {
    key(o.family, o.table, o.name)
}

fn family_name(family: NfFamily) -> &'static str {
    match family {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

/// A rule's statements read from its announced expressions.
fn read_rule(
    family: NfFamily,
    handle: u32,
    exprs: &[u8],
    sets: &dyn netlink::Sets,
) -> Result<Rule<'static>, Unread> {
    let expr = netlink::statements(family, exprs, sets).ok_or(Unread("a rule"))?;
    // The walk knows a rule by its chain's key: no names kept.
    Ok(Rule {
        family,
        table: Cow::Borrowed(""),
        chain: Cow::Borrowed(""),
        expr: Cow::Owned(expr),
        handle: Some(handle),
        ..Rule::default()
    })
}

/// The sets a rule of one table may look up.
struct TableSets<'r> {
    shapes: &'r HashMap<Key, SetShape>,
    anonymous: &'r HashMap<Key, (SetShape, Elements)>,
    family: NfFamily,
    table: &'r str,
}

impl TableSets<'_> {
    fn key(&self, name: &str) -> Key {
        key(self.family, self.table, name)
    }
}

impl netlink::Sets for TableSets<'_> {
    fn anonymous(&self, name: &str) -> Option<(&SetShape, Vec<Expression<'static>>)> {
        let (shape, elements) = self.anonymous.get(&self.key(name))?;
        Some((shape, elements.values().cloned().collect()))
    }

    fn named(&self, name: &str) -> Option<&SetShape> {
        self.shapes.get(&self.key(name))
    }
}

/// A set element's key: a map's `[key, value]` gives its key.
fn element_key<'e>(e: &'e Expression<'static>) -> &'e Expression<'static> {
    match e {
        Expression::List(kv) if kv.len() == 2 => unwrap_elem(&kv[0]),
        other => unwrap_elem(other),
    }
}

/// A key's identity, however it was read: `nft -j` names protocols
/// (`tcp`) where announcements give their numbers.
fn identity(e: &Expression<'_>) -> String {
    match e {
        Expression::String(s) => match s.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => match Proto::from_name(s) {
                Some(p) => p.0.to_string(),
                None => s.to_string(),
            },
        },
        Expression::Number(n) => n.to_string(),
        Expression::Named(NamedExpression::Concat(parts)) => {
            parts.iter().map(identity).collect::<Vec<_>>().join(" . ")
        }
        Expression::Named(NamedExpression::Elem(e)) => identity(&e.val),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

struct Walk<'r> {
    ruleset: &'r Ruleset,
    out: Vec<DnatRule>,
    complete: bool,
    /// An iptables-nft DNAT (a compat target) is on the way.
    iptables_dnat: bool,
    /// Chains a base chain jumped to, with the conditions of the jump:
    /// kube-proxy's prerouting and output chains both jump to its
    /// `services`, which is walked once.
    entered: HashSet<(ChainId, Conditions)>,
    /// Where the key of the next chain is written to look it up.
    scratch: String,
}

impl<'r> Walk<'r> {
    /// Walks into chain `name` of the table of `table` (see
    /// [`Walk::chain`]).
    fn jump(&mut self, table: &'r str, name: &str, when: Conditions, depth: usize) {
        let id = self.ruleset.ids.of(sibling(&mut self.scratch, table, name));
        self.enter(table, id, when, depth);
    }

    /// Walks into chain `id` of the table of `table`, if there is one.
    fn enter(&mut self, table: &'r str, id: ChainId, when: Conditions, depth: usize) {
        let ruleset: &'r Ruleset = self.ruleset;
        if let Some(rules) = ruleset.chains.get(&id) {
            self.chain(table, id, rules, when, depth);
        }
    }

    /// Walks chain `id` of the table of `table` (the key of any chain of
    /// that table: the walk passes its base chain's down, which stays in
    /// the cache; sets, maps and jumps are named within the table),
    /// whose rules are `rules` (looked up once).
    fn chain(
        &mut self,
        table: &'r str,
        id: ChainId,
        rules: &'r Rules,
        when: Conditions,
        depth: usize,
    ) {
        if depth > MAX_DEPTH {
            self.complete = false;
            return;
        }
        let Rules { label, rules, .. } = rules;
        if depth == 1 && !self.entered.insert((id, when.clone())) {
            return;
        }
        // What a rule that ends the chain for its packets (return,
        // accept, drop, a goto) leaves to the rules after it.
        let mut base = when;
        for (i, rule) in rules.iter().enumerate() {
            match rule {
                Kept::Read(rule) if rule.expr.iter().any(|s| matches!(s, Statement::XT(_))) => {
                    // iptables-nft's: read from iptables-nft-save.
                    self.iptables_dnat |= rule.expr.iter().any(|s| {
                        matches!(s, Statement::XT(Some(xt))
                            if xt.get("type").and_then(Value::as_str) == Some("target")
                                && xt.get("name").and_then(Value::as_str) == Some("DNAT"))
                    });
                    continue;
                }
                Kept::Announced { .. } => {
                    self.complete = false;
                    continue;
                }
                Kept::Read(_) | Kept::Compact { .. } => {}
            }
            // The last rule takes the conditions: nothing comes after it.
            let last = i + 1 == rules.len();
            let when = if last {
                std::mem::take(&mut base)
            } else {
                base.clone()
            };
            let ended = match rule {
                Kept::Read(rule) => self.rule(table, label, &rule.expr, when, depth),
                Kept::Compact { matches, end, .. } => {
                    self.compact(table, label, matches, end, when, depth)
                }
                Kept::Announced { .. } => None,
            };
            if let Some(ended) = ended {
                if last {
                    return;
                }
                match base.after_return(&ended) {
                    Some(next) => base = next,
                    None => return,
                }
            }
        }
    }

    /// One rule's statements in order: matches narrow `when`, the first
    /// verdict or NAT statement ends it. Returns the conditions under which
    /// it ends the chain, if it does.
    fn rule(
        &mut self,
        table: &'r str,
        label: &Arc<str>,
        statements: &'r [Statement<'static>],
        mut when: Conditions,
        depth: usize,
    ) -> Option<Conditions> {
        for statement in statements {
            match statement {
                Statement::Match(m) => self.narrow(table, &mut when, m),
                Statement::Jump(t) => {
                    self.jump(table, &t.target, when, depth + 1);
                    return None;
                }
                Statement::Goto(t) => {
                    self.jump(table, &t.target, when.clone(), depth + 1);
                    return Some(when);
                }
                Statement::VerdictMap(vmap) => {
                    for (k, v) in self.pairs(table, &vmap.data) {
                        let mut branch = when.clone();
                        bind(&mut branch, &vmap.key, k);
                        if let Expression::Verdict(Verdict::Jump(t) | Verdict::Goto(t)) = v {
                            self.jump(table, &t.target, branch, depth + 1);
                        }
                    }
                    return None;
                }
                Statement::DNAT(Some(nat)) => {
                    self.dnat(table, label, nat, when);
                    return None;
                }
                Statement::Redirect(nat) => {
                    self.redirect(label, nat.as_ref(), when);
                    return None;
                }
                Statement::DNAT(None) => {
                    self.complete = false;
                    return None;
                }
                Statement::Accept(_)
                | Statement::Drop(_)
                | Statement::Return(_)
                | Statement::Reject(_) => return Some(when),
                _ => {}
            }
        }
        None
    }

    /// A compact rule: as [`Walk::rule`] on the statements it stands for.
    fn compact(
        &mut self,
        table: &'r str,
        label: &Arc<str>,
        matches: &[Narrow],
        end: &Ending<ChainId>,
        mut when: Conditions,
        depth: usize,
    ) -> Option<Conditions> {
        for m in matches {
            m.apply(&mut when);
        }
        match end {
            Ending::Next => None,
            Ending::Stop => Some(when),
            Ending::Jump(id) => {
                self.enter(table, *id, when, depth + 1);
                None
            }
            Ending::Goto(id) => {
                self.enter(table, *id, when.clone(), depth + 1);
                Some(when)
            }
            Ending::Dnat(t) => {
                self.out.push(DnatRule {
                    engine: RuleEngine::Nftables,
                    chain: label.clone(),
                    when,
                    to: smallvec![*t],
                });
                None
            }
        }
    }

    /// Narrows `when` by a match; one it cannot read makes it opaque.
    fn narrow(&self, table: &str, when: &mut Conditions, m: &'r Match<'static>) {
        let negated = match m.op {
            Operator::EQ | Operator::IN => false,
            Operator::NEQ => true,
            _ => {
                when.opaque = true;
                return;
            }
        };
        let right = self.values(table, &m.right);
        if !constrain(when, &m.left, &right, negated) {
            when.opaque = true;
        }
    }

    /// The values an expression on the right of a match stands for, a
    /// named set's elements included.
    fn values(
        &self,
        table: &str,
        right: &'r Expression<'static>,
    ) -> SmallVec<[&'r Expression<'static>; 2]> {
        let ruleset: &'r Ruleset = self.ruleset;
        match right {
            Expression::String(s) if s.starts_with('@') => {
                let set = sibling(&mut String::new(), table, &s[1..]).to_owned();
                ruleset
                    .elements
                    .get(&set)
                    .map(|e| e.values().map(unwrap_elem).collect())
                    .unwrap_or_default()
            }
            Expression::Named(NamedExpression::Set(items)) => items
                .iter()
                .filter_map(|i| match i {
                    SetItem::Element(e) => Some(unwrap_elem(e)),
                    _ => None,
                })
                .collect(),
            other => smallvec![other],
        }
    }

    /// The `[key, value]` pairs of a map: named (`@name`) or literal.
    fn pairs(
        &self,
        table: &str,
        data: &'r Expression<'static>,
    ) -> SmallVec<[(&'r Expression<'static>, &'r Expression<'static>); 4]> {
        let ruleset: &'r Ruleset = self.ruleset;
        let pair = |e: &'r Expression<'static>| match e {
            Expression::List(kv) if kv.len() == 2 => Some((unwrap_elem(&kv[0]), &kv[1])),
            _ => None,
        };
        match data {
            Expression::String(s) if s.starts_with('@') => {
                let map = sibling(&mut String::new(), table, &s[1..]).to_owned();
                ruleset
                    .elements
                    .get(&map)
                    .map(|e| e.values().filter_map(pair).collect())
                    .unwrap_or_default()
            }
            Expression::Named(NamedExpression::Set(items)) => items
                .iter()
                .filter_map(|i| match i {
                    SetItem::Element(e) => pair(e),
                    SetItem::Mapping(k, v) => Some((unwrap_elem(k), v)),
                    SetItem::MappingStatement(..) => None,
                })
                .collect(),
            _ => SmallVec::new(),
        }
    }

    /// A redirect DNATs to the host itself (the address of the interface
    /// the packet came in on), to its port or the same one.
    fn redirect(&mut self, label: &Arc<str>, nat: Option<&'r NAT<'static>>, when: Conditions) {
        let port = match nat.and_then(|n| n.port.as_ref()) {
            Some(p) => match port_span(p) {
                Some(p) => Some(p),
                None => {
                    self.complete = false;
                    return;
                }
            },
            None => None,
        };
        let families = match when.family {
            Some(f) => vec![f],
            None => vec![Family::Ipv4, Family::Ipv6],
        };
        self.out.push(DnatRule {
            engine: RuleEngine::Nftables,
            chain: label.clone(),
            when,
            to: families
                .into_iter()
                .map(|f| NatTarget {
                    addr: AddrSpan::all(f),
                    port,
                })
                .collect(),
        });
    }

    fn dnat(&mut self, table: &str, label: &Arc<str>, nat: &'r NAT<'static>, when: Conditions) {
        let Some(addr) = &nat.addr else {
            self.complete = false;
            return;
        };
        let port = nat.port.as_ref().map(port_span);
        if let Some(None) = port {
            // A port from a map or an expression: not read.
            self.complete = false;
            return;
        }
        let port = port.flatten();
        if let Expression::Named(NamedExpression::Map(map)) = addr {
            for (k, v) in self.pairs(table, &map.data) {
                let mut branch = when.clone();
                bind(&mut branch, &map.key, k);
                match target(v, port) {
                    Some(t) => self.out.push(DnatRule {
                        engine: RuleEngine::Nftables,
                        chain: label.clone(),
                        when: branch,
                        to: smallvec![t],
                    }),
                    None => self.complete = false,
                }
            }
            return;
        }
        match target(addr, port) {
            Some(t) => self.out.push(DnatRule {
                engine: RuleEngine::Nftables,
                chain: label.clone(),
                when,
                to: smallvec![t],
            }),
            None => self.complete = false,
        }
    }
}

/// A set element may come wrapped with its timeout or comment.
fn unwrap_elem<'e, 'a>(e: &'e Expression<'a>) -> &'e Expression<'a> {
    match e {
        Expression::Named(NamedExpression::Elem(elem)) => &elem.val,
        other => other,
    }
}

/// A DNAT target: `addr`, `addr-addr`, or `addr . port` from a map.
fn target(value: &Expression<'_>, port: Option<PortSpan>) -> Option<NatTarget> {
    if let Expression::Named(NamedExpression::Concat(parts)) = value
        && let [addr, p] = parts.as_slice()
    {
        return Some(NatTarget {
            addr: addr_span(addr)?,
            port: Some(port_span(p)?),
        });
    }
    Some(NatTarget {
        addr: addr_span(value)?,
        port,
    })
}

/// Adds the condition `left == right` (a vmap's or a map's key bound to
/// one element).
fn bind(when: &mut Conditions, left: &Expression<'_>, right: &Expression<'_>) {
    if !constrain(when, left, &[right], false) {
        when.opaque = true;
    }
}

/// Adds the condition that `left` is one of `right` (or none of them);
/// false when `left` is not something stalewatch evaluates.
fn constrain(
    when: &mut Conditions,
    left: &Expression<'_>,
    right: &[&Expression<'_>],
    negated: bool,
) -> bool {
    match left {
        Expression::Named(NamedExpression::Concat(parts)) => {
            // Element by element: `a . b . c` against `x . y . z`.
            if negated {
                return false;
            }
            // One element (a map's key bound): column by column as it is.
            if let [Expression::Named(NamedExpression::Concat(vs))] = right {
                return vs.len() == parts.len()
                    && parts
                        .iter()
                        .zip(vs.iter())
                        .all(|(part, v)| constrain(when, part, &[v], false));
            }
            let mut columns: Vec<Vec<&Expression<'_>>> = vec![Vec::new(); parts.len()];
            for value in right {
                let Expression::Named(NamedExpression::Concat(vs)) = value else {
                    return false;
                };
                if vs.len() != parts.len() {
                    return false;
                }
                for (column, v) in columns.iter_mut().zip(vs.iter()) {
                    column.push(v);
                }
            }
            // One element pins every column; several only when one column
            // varies would be exact: otherwise a superset, which is fine
            // for "which backends can the rules send it to".
            parts
                .iter()
                .zip(columns.iter())
                .all(|(part, column)| constrain(when, part, column, false))
        }
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(field))) => {
            // A match on an IP header field is of that family (nft's
            // hidden `meta nfproto` in an inet table).
            match field.protocol.as_ref() {
                "ip" => when.family = Some(Family::Ipv4),
                "ip6" => when.family = Some(Family::Ipv6),
                _ => {}
            }
            match (field.protocol.as_ref(), field.field.as_ref()) {
                ("ip" | "ip6", "daddr") => {
                    when.daddr.push(Cond::new(
                        right.iter().filter_map(|v| addr_span(v)),
                        negated,
                    ));
                    true
                }
                ("ip" | "ip6", "saddr") => {
                    when.saddr.push(Cond::new(
                        right.iter().filter_map(|v| addr_span(v)),
                        negated,
                    ));
                    true
                }
                ("ip", "protocol") | ("ip6", "nexthdr") => {
                    when.proto
                        .push(Cond::new(right.iter().filter_map(|v| proto(v)), negated));
                    true
                }
                (l4 @ ("udp" | "tcp" | "sctp" | "udplite" | "th"), "dport") => {
                    if let Some(p) = proto(&Expression::String(Cow::Borrowed(l4))) {
                        when.proto.push(Cond::is(vec![p]));
                    }
                    when.dport.push(Cond::new(
                        right.iter().filter_map(|v| port_span(v)),
                        negated,
                    ));
                    true
                }
                _ => false,
            }
        }
        Expression::Named(NamedExpression::Meta(Meta { key })) => match key {
            MetaKey::L4proto => {
                when.proto
                    .push(Cond::new(right.iter().filter_map(|v| proto(v)), negated));
                true
            }
            MetaKey::Iifname | MetaKey::Iif => {
                let names = right.iter().filter_map(|v| match v {
                    Expression::String(s) => Some(s.to_string()),
                    _ => None,
                });
                when.iif.push(Cond::new(names, negated));
                true
            }
            MetaKey::Nfproto if !negated => {
                match right.first() {
                    Some(Expression::String(s)) if s == "ipv4" => when.family = Some(Family::Ipv4),
                    Some(Expression::String(s)) if s == "ipv6" => when.family = Some(Family::Ipv6),
                    _ => return false,
                }
                true
            }
            _ => false,
        },
        Expression::Named(NamedExpression::Fib(fib))
            if !negated
                && right
                    .iter()
                    .all(|v| matches!(v, Expression::String(s) if s == "local")) =>
        {
            let daddr_type = matches!(fib.result, nftables::expr::FibResult::Type)
                && fib.flags.contains(&nftables::expr::FibFlag::Daddr);
            when.dst_local |= daddr_type;
            daddr_type
        }
        // `numgen`, `jhash`: load balancing, which every element may take.
        Expression::Named(NamedExpression::Numgen(_) | NamedExpression::JHash(_)) => true,
        _ => false,
    }
}

/// The addresses an expression names: one, a prefix or a range.
fn addr_span(value: &Expression<'_>) -> Option<AddrSpan> {
    let parse = |s: &str| s.parse::<IpAddr>().ok();
    match value {
        Expression::String(s) => parse(s).map(AddrSpan::one),
        Expression::Named(NamedExpression::Prefix(p)) => match p.addr.as_ref() {
            Expression::String(s) => parse(s).map(|a| AddrSpan::prefix(a, p.len.min(128) as u8)),
            _ => None,
        },
        Expression::Range(r) => match (&r.range[0], &r.range[1]) {
            (Expression::String(lo), Expression::String(hi)) => Some(AddrSpan {
                lo: parse(lo)?,
                hi: parse(hi)?,
            }),
            _ => None,
        },
        Expression::Named(NamedExpression::Elem(e)) => addr_span(&e.val),
        _ => None,
    }
}

/// The ports an expression names: one or a range.
fn port_span(value: &Expression<'_>) -> Option<PortSpan> {
    let number = |e: &Expression<'_>| match e {
        Expression::Number(n) => u16::try_from(*n).ok(),
        Expression::String(s) => s.parse().ok(),
        _ => None,
    };
    match value {
        Expression::Range(r) => Some(PortSpan {
            lo: number(&r.range[0])?,
            hi: number(&r.range[1])?,
        }),
        Expression::Named(NamedExpression::Elem(e)) => port_span(&e.val),
        other => number(other).map(PortSpan::one),
    }
}

fn proto(value: &Expression<'_>) -> Option<Proto> {
    match value {
        Expression::Number(n) => u8::try_from(*n).ok().map(Proto),
        // `th dport`: any transport with ports.
        Expression::String(s) if s == "th" => None,
        Expression::String(s) => Proto::from_name(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{
        netlink::tests::{NoSets, expr, u32be, value, verdict},
        *,
    };

    #[test]
    fn chains_are_found_by_id_and_their_slots_filled_again() {
        let ids = ChainIds::default();
        let key = |name: &str| key(NfFamily::IP, "nat", name);
        let mut chains = Chains::default();
        for name in ["a", "b", "c"] {
            chains.get_or_insert_with(ids.of(&key(name)), || Rules::new(key(name)));
        }
        // Found again, not made again.
        chains
            .get_or_insert_with(ids.of(&key("b")), || unreachable!())
            .rules
            .push(Kept::Announced {
                handle: 7,
                family: NfFamily::IP,
                exprs: Box::new([]),
            });
        assert_eq!(chains.get(&ids.of(&key("b"))).unwrap().rules.len(), 1);
        chains.remove(&ids.of(&key("a")));
        assert!(chains.get(&ids.of(&key("a"))).is_none());
        assert!(chains.get_mut(&ids.of(&key("a"))).is_none());
        // The emptied slot is filled by the next chain made.
        chains.get_or_insert_with(ids.of(&key("d")), || Rules::new(key("d")));
        assert_eq!(chains.slots.len(), 3);
        assert_eq!(chains.get(&ids.of(&key("d"))).unwrap().key, key("d"));
        chains.retain(|r| r.key != key("c"));
        assert!(chains.get(&ids.of(&key("c"))).is_none());
        assert_eq!(chains.free.len(), 1);
        for name in ["b", "d"] {
            assert_eq!(chains.get(&ids.of(&key(name))).unwrap().key, key(name));
        }
        assert_eq!(chains.index.len(), 2);
        // A chain made again in another slot is found there, not in the
        // emptied slot near the last found that still names it.
        chains.remove(&ids.of(&key("b")));
        chains.remove(&ids.of(&key("d")));
        let b = ids.of(&key("b"));
        chains.get_or_insert_with(b, || Rules::new(key("b")));
        assert_eq!(chains.ids.iter().filter(|i| **i == b).count(), 2);
        chains.last.set(1);
        assert_eq!(chains.get(&b).unwrap().key, key("b"));
        assert!(chains.get(&ids.of(&key("d"))).is_none());
    }

    /// `payload` of `len` bytes at `offset` of header `base` (1: network,
    /// 2: transport) into register 1.
    fn load(base: u32, offset: u32, len: u32) -> Vec<u8> {
        expr(
            "payload",
            &[u32be(1, 1), u32be(2, base), u32be(3, offset), u32be(4, len)],
        )
    }

    /// `cmp` of register 1: 0 `==`, 1 `!=`, 5 `>=`.
    fn cmp(op: u32, bytes: &[u8]) -> Vec<u8> {
        expr("cmp", &[u32be(1, 1), u32be(2, op), value(3, bytes)])
    }

    fn l4proto(p: u8) -> Vec<u8> {
        [expr("meta", &[u32be(2, 16), u32be(1, 1)]), cmp(0, &[p])].concat()
    }

    /// `dnat` to the literals in registers 1 (address, or 1-2 for a
    /// range) and 3 (port, or 3-4).
    fn dnat(v6: bool, addr: &[&[u8]], port: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut attrs = vec![u32be(1, 1), u32be(2, if v6 { 10 } else { 2 })];
        for (i, a) in addr.iter().enumerate() {
            out.push(expr("immediate", &[u32be(1, 1 + i as u32), value(2, a)]));
            attrs.push(u32be(3 + i as u16, 1 + i as u32));
        }
        for (i, p) in port.iter().enumerate() {
            out.push(expr(
                "immediate",
                &[u32be(1, 3 + i as u32), value(2, &p.to_be_bytes())],
            ));
            attrs.push(u32be(5 + i as u16, 3 + i as u32));
        }
        out.push(expr("nat", &attrs));
        out.concat()
    }

    /// The DNATs of chains of announced rules (`(chain, [rule])`, the
    /// first the NAT base chain), each rule read as a compact rule where
    /// it has the shape of one and `compact` is set, else into statements;
    /// and how many were read compact.
    fn walk_announced(
        family: NfFamily,
        chains: &[(&str, &[Vec<u8>])],
        compact: bool,
    ) -> (Vec<DnatRule>, bool, usize) {
        let mut ruleset = Ruleset::new(Vec::new());
        ruleset.bases.push(key(family, "t", chains[0].0));
        let mut read = 0;
        for (name, rules) in chains {
            let k = key(family, "t", name);
            let mut kept = Rules::new(k.clone());
            for (handle, exprs) in (1..).zip(rules.iter()) {
                let rule = match netlink::compact(family, exprs) {
                    Some(shape) if compact => Kept::compact(handle, shape, |name| {
                        ruleset.ids.of(sibling(&mut String::new(), &k, name))
                    }),
                    _ => Kept::Read(read_rule(family, handle, exprs, &NoSets).expect("read")),
                };
                read += usize::from(matches!(rule, Kept::Compact { .. }));
                kept.rules.push(rule);
            }
            ruleset.chains.insert(ruleset.ids.of(&k), kept);
        }
        let parsed = ruleset.walk();
        (parsed.rules, parsed.complete, read)
    }

    /// The compact form is a shortcut, not a second reader: every shape
    /// it takes walks to the DNATs the statements of the same expressions
    /// walk to, and what it does not take is left to them.
    #[test]
    fn compact_rules_walk_as_their_statements() {
        let v4 = |a: [u8; 4]| a.to_vec();
        let pod = v4([10, 244, 1, 7]);
        let endpoint = [l4proto(17), dnat(false, &[&pod], &[53])].concat();
        // ip daddr 10.96.0.0/16 ip protocol udp th dport 53 jump svc
        let to_service = [
            load(1, 16, 4),
            expr(
                "bitwise",
                &[
                    u32be(1, 1),
                    u32be(2, 1),
                    u32be(3, 4),
                    value(4, &[255, 255, 0, 0]),
                    value(5, &[0; 4]),
                ],
            ),
            cmp(0, &[10, 96, 0, 0]),
            load(1, 9, 1),
            cmp(0, &[17]),
            load(2, 2, 2),
            cmp(0, &53u16.to_be_bytes()),
            expr("counter", &[]),
            verdict(-3, Some("svc")),
        ]
        .concat();
        // ip saddr != 10.0.0.9 goto svc; ip saddr 10.0.0.9 accept; then a
        // range of addresses and ports.
        let not_nine = [
            load(1, 12, 4),
            cmp(1, &[10, 0, 0, 9]),
            verdict(-4, Some("svc")),
        ]
        .concat();
        let nine = [load(1, 12, 4), cmp(0, &[10, 0, 0, 9]), verdict(1, None)].concat();
        let ranged = dnat(false, &[&[10, 1, 0, 1], &[10, 1, 0, 5]], &[3000, 4000]);
        // In an inet table: meta nfproto ipv6 ip6 daddr 2001:db8::1
        // dnat ip6 to [2001:db8::5]:8080.
        let mut v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let six = [
            expr("meta", &[u32be(2, 15), u32be(1, 1)]),
            cmp(0, &[10]),
            load(1, 24, 16),
            cmp(0, &v6),
        ]
        .concat();
        v6[15] = 5;
        let six = [six, dnat(true, &[&v6], &[8080])].concat();
        // Not compact: a port range (>=, <=), and a match on an interface.
        let port_range = [
            load(2, 2, 2),
            cmp(5, &1000u16.to_be_bytes()),
            expr(
                "cmp",
                &[u32be(1, 1), u32be(2, 3), value(3, &2000u16.to_be_bytes())],
            ),
            dnat(false, &[&pod], &[]),
        ]
        .concat();
        let iifname = [
            expr("meta", &[u32be(2, 6), u32be(1, 1)]),
            cmp(0, b"ext\0"),
            dnat(false, &[&pod], &[]),
        ]
        .concat();
        for (family, chains, compact) in [
            (
                NfFamily::IP,
                vec![
                    ("pre", vec![to_service.clone(), not_nine, nine, ranged]),
                    ("svc", vec![endpoint.clone()]),
                ],
                5,
            ),
            (NfFamily::INet, vec![("pre", vec![six])], 1),
            (
                NfFamily::IP,
                vec![
                    ("pre", vec![port_range, iifname, to_service]),
                    ("svc", vec![endpoint]),
                ],
                2,
            ),
        ] {
            let chains: Vec<(&str, &[Vec<u8>])> =
                chains.iter().map(|(n, r)| (*n, r.as_slice())).collect();
            let (fast, fast_complete, read) = walk_announced(family, &chains, true);
            let (slow, slow_complete, _) = walk_announced(family, &chains, false);
            assert_eq!(read, compact, "rules read compact");
            assert!(!slow.is_empty());
            assert_eq!(fast, slow);
            assert_eq!(fast_complete, slow_complete);
        }
    }

    #[test]
    fn chain_ids_are_two_hashes_of_their_own() {
        let ids = ChainIds::default();
        let k = key(
            NfFamily::IP,
            "kube-proxy",
            "endpoint-00001-0-bench/svc-1/tcp/http",
        );
        let id = ids.of(&k);
        assert_eq!(id, ids.of(&k.clone()));
        assert!(key_is(
            &k,
            NfFamily::IP,
            "kube-proxy",
            "endpoint-00001-0-bench/svc-1/tcp/http"
        ));
        for (family, table, name) in [
            (
                NfFamily::IP6,
                "kube-proxy",
                "endpoint-00001-0-bench/svc-1/tcp/http",
            ),
            (
                NfFamily::IP,
                "kube-proxy",
                "endpoint-00001-0-bench/svc-1/tcp/htt",
            ),
            (
                NfFamily::IP,
                "kube-prox",
                "yendpoint-00001-0-bench/svc-1/tcp/http",
            ),
        ] {
            assert!(!key_is(&k, family, table, name));
        }
        // Two seeds, not one hash twice.
        assert_ne!(id.0, id.1);
        assert_ne!(
            id,
            ids.of(&key(
                NfFamily::IP,
                "kube-proxy",
                "endpoint-00001-1-bench/svc-1/tcp/http"
            ))
        );
        assert_ne!(
            id,
            ids.of(&key(
                NfFamily::IP6,
                "kube-proxy",
                "endpoint-00001-0-bench/svc-1/tcp/http"
            ))
        );
    }
}
