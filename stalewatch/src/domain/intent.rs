//! A host's NAT intent: every way its current rules can DNAT a flow, read
//! from the rules themselves (nftables, iptables of both backends). What
//! an entry's backend is judged against when no packet of it fails here.

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use foldhash::HashMap;
use smallvec::SmallVec;

use super::flow::{Backend, Family, Proto, Service, Tuple};

/// The rule engine a DNAT rule was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleEngine {
    Nftables,
    IptablesNft,
    IptablesLegacy,
}

impl RuleEngine {
    pub fn name(self) -> &'static str {
        match self {
            RuleEngine::Nftables => "nftables",
            RuleEngine::IptablesNft => "iptables-nft",
            RuleEngine::IptablesLegacy => "iptables-legacy",
        }
    }
}

/// Addresses from `lo` to `hi`, both included (one address: `lo == hi`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrSpan {
    pub lo: IpAddr,
    pub hi: IpAddr,
}

impl AddrSpan {
    pub fn one(addr: IpAddr) -> AddrSpan {
        AddrSpan { lo: addr, hi: addr }
    }

    /// `addr/len`.
    pub fn prefix(addr: IpAddr, len: u8) -> AddrSpan {
        match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let host = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                AddrSpan {
                    lo: IpAddr::from((bits & !host).to_be_bytes()),
                    hi: IpAddr::from((bits | host).to_be_bytes()),
                }
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                AddrSpan {
                    lo: IpAddr::from((bits & !host).to_be_bytes()),
                    hi: IpAddr::from((bits | host).to_be_bytes()),
                }
            }
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.lo.is_ipv4() && self.lo <= addr && addr <= self.hi
    }

    /// Every address of a family: where a redirect sends a flow (one of
    /// the host's own addresses, which the rule does not name).
    pub fn all(family: Family) -> AddrSpan {
        match family {
            Family::Ipv4 => AddrSpan::prefix(IpAddr::from([0u8; 4]), 0),
            Family::Ipv6 => AddrSpan::prefix(IpAddr::from([0u8; 16]), 0),
        }
    }

    pub fn family(&self) -> Family {
        Family::of(self.lo)
    }
}

/// Ports from `lo` to `hi`, both included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSpan {
    pub lo: u16,
    pub hi: u16,
}

impl PortSpan {
    pub fn one(port: u16) -> PortSpan {
        PortSpan { lo: port, hi: port }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// One match of a rule: the value is one of `any_of` (or, negated, none).
/// Most matches name one value, and most fields have a match or two:
/// both kept inline, so that the walk of ten thousand rules does not
/// allocate for each (conditions are cloned at every branch).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cond<T> {
    pub any_of: SmallVec<[T; 1]>,
    pub negated: bool,
}

/// A field's matches.
pub type Conds<T> = SmallVec<[Cond<T>; 2]>;

/// The matches of a field that few paths to a DNAT match on (the source
/// address, the interface): on the heap when there are any, 24 bytes
/// when there are none, instead of 120 and 88 inline. Conditions are
/// cloned at every branch of a walk and kept with every rule.
pub type RareConds<T> = Vec<Cond<T>>;

impl<T> Cond<T> {
    pub fn new(any_of: impl IntoIterator<Item = T>, negated: bool) -> Self {
        Cond {
            any_of: any_of.into_iter().collect(),
            negated,
        }
    }

    pub fn is(any_of: impl IntoIterator<Item = T>) -> Self {
        Cond::new(any_of, false)
    }

    pub fn not(any_of: impl IntoIterator<Item = T>) -> Self {
        Cond::new(any_of, true)
    }

    fn holds(&self, hit: impl Fn(&T) -> bool) -> bool {
        self.any_of.iter().any(hit) != self.negated
    }
}

/// How sure a rule matches a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    No,
    /// A match stalewatch cannot evaluate (a mark, an unknown interface).
    Maybe,
    Yes,
}

/// What a packet must be for a DNAT rule to apply to it: every match on
/// the way from a NAT base chain to the rule, ANDed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Conditions {
    pub family: Option<Family>,
    pub proto: Conds<Proto>,
    pub daddr: Conds<AddrSpan>,
    pub saddr: RareConds<AddrSpan>,
    pub dport: Conds<PortSpan>,
    /// Interface names; a name ending in `*` (nftables) or `+` (iptables)
    /// is a prefix.
    pub iif: RareConds<String>,
    /// The destination must be one of the host's own addresses.
    pub dst_local: bool,
    /// A match stalewatch does not evaluate.
    pub opaque: bool,
}

impl Conditions {
    /// Says each condition once: a match on `udp dport` and
    /// one on the protocol that `nft` hides in it are one condition, read
    /// from a listing or from an announcement.
    pub fn normalize(&mut self) {
        /// Moves the first of each condition to the front, in order: how
        /// many there are.
        fn once<T: PartialEq>(v: &mut [Cond<T>]) -> usize {
            let mut kept = 0;
            for i in 0..v.len() {
                if !v[..kept].contains(&v[i]) {
                    v.swap(kept, i);
                    kept += 1;
                }
            }
            kept
        }
        macro_rules! once {
            ($($field:ident),*) => {$(
                let kept = once(&mut self.$field);
                self.$field.truncate(kept);
            )*};
        }
        once!(proto, daddr, saddr, dport, iif);
    }

    /// Whether a flow with original tuple `orig`, arriving on `iif` (where
    /// known), meets these conditions; `is_local` tells the host's own
    /// addresses.
    pub fn admits(
        &self,
        orig: &Tuple,
        iif: Option<&str>,
        is_local: impl Fn(IpAddr) -> bool,
    ) -> Fit {
        let definite = self.family.is_none_or(|f| f == orig.family)
            && self.proto.iter().all(|c| c.holds(|p| *p == orig.proto))
            && self.daddr.iter().all(|c| c.holds(|s| s.contains(orig.dst)))
            && self.saddr.iter().all(|c| c.holds(|s| s.contains(orig.src)))
            && (self.dport.is_empty()
                || (orig.proto.has_ports()
                    && self
                        .dport
                        .iter()
                        .all(|c| c.holds(|s| s.contains(orig.dport)))))
            && (!self.dst_local || is_local(orig.dst));
        if !definite {
            return Fit::No;
        }
        let iif_fits = match iif {
            _ if self.iif.is_empty() => Fit::Yes,
            None => Fit::Maybe,
            Some(name) => {
                if self.iif.iter().all(|c| c.holds(|n| name_matches(n, name))) {
                    Fit::Yes
                } else {
                    Fit::No
                }
            }
        };
        match iif_fits {
            Fit::Yes if self.opaque => Fit::Maybe,
            fit => fit,
        }
    }
}

impl Conditions {
    /// What the rules after a `return` (or a NAT chain's `accept`) in the
    /// same chain still see: `self` is the chain's conditions, `ret` the
    /// returning rule's (they extend `self`). A rule with no match of its
    /// own returns every packet: `None`, nothing after it is reached. One
    /// match of its own is negated for the rules after it (Docker's
    /// `-i br-X -j RETURN` before its `! -i br-Y ... -j DNAT`); with more,
    /// its negation is a disjunction these conditions cannot hold, so the
    /// rules after it are only a "maybe".
    pub fn after_return(&self, ret: &Conditions) -> Option<Conditions> {
        fn added<'m, T>(base: &[Cond<T>], more: &'m [Cond<T>]) -> &'m [Cond<T>] {
            more.get(base.len()..).unwrap_or_default()
        }
        let proto = added(&self.proto, &ret.proto);
        let daddr = added(&self.daddr, &ret.daddr);
        let saddr = added(&self.saddr, &ret.saddr);
        let dport = added(&self.dport, &ret.dport);
        let iif = added(&self.iif, &ret.iif);
        let extra = proto.len() + daddr.len() + saddr.len() + dport.len() + iif.len();
        let other = ret.opaque != self.opaque
            || ret.dst_local != self.dst_local
            || ret.family != self.family;
        let mut next = self.clone();
        fn flip<T: Clone>(conds: &[Cond<T>]) -> impl Iterator<Item = Cond<T>> {
            conds
                .iter()
                .map(|c| Cond::new(c.any_of.iter().cloned(), !c.negated))
        }
        match (extra, other) {
            (0, false) => return None,
            (1, false) => {
                next.proto.extend(flip(proto));
                next.daddr.extend(flip(daddr));
                next.saddr.extend(flip(saddr));
                next.dport.extend(flip(dport));
                next.iif.extend(flip(iif));
            }
            _ => next.opaque = true,
        }
        Some(next)
    }
}

fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix(['*', '+']) {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Where a DNAT rule sends a flow: an address (or a span, for a range),
/// and a port (or span); no port keeps the flow's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatTarget {
    pub addr: AddrSpan,
    pub port: Option<PortSpan>,
}

impl NatTarget {
    /// Whether this target can be `backend` for a flow sent to `dport`.
    pub fn reaches(&self, dport: u16, backend: Backend) -> bool {
        self.addr.contains(backend.addr)
            && match self.port {
                Some(span) => span.contains(backend.port),
                None => backend.port == dport,
            }
    }

    /// The one backend this target is, for a flow sent to `dport` (none
    /// for a range).
    pub fn backend(&self, dport: u16) -> Option<Backend> {
        let port = match self.port {
            Some(span) if span.lo == span.hi => span.lo,
            Some(_) => return None,
            None => dport,
        };
        (self.addr.lo == self.addr.hi).then(|| Backend::new(self.addr.lo, port))
    }
}

/// One way the rules can DNAT a flow.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DnatRule {
    pub engine: RuleEngine,
    /// Where the DNAT statement is (`table/chain` or the chain), for
    /// evidence.
    pub chain: Arc<str>,
    pub when: Conditions,
    /// Most DNAT to one target: kept inline (ten thousand rules walked
    /// again at every change would be ten thousand allocations).
    pub to: Targets,
}

/// The targets of one DNAT rule.
pub type Targets = SmallVec<[NatTarget; 1]>;

/// Rules by an address: most addresses have one or two.
type At = SmallVec<[usize; 2]>;

/// What one rule engine's rules said, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineRead {
    pub engine: RuleEngine,
    /// Every DNAT of it was understood: a flow no rule of it matches is
    /// DNATed by none.
    pub complete: bool,
}

/// The host's NAT intent: every DNAT its current rules can make, indexed
/// by destination (a ruleset of thousands of services is asked about
/// hundreds of thousands of entries).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatIntent {
    rules: Vec<DnatRule>,
    read: Vec<EngineRead>,
    /// Rules that name their destinations outright, by address.
    by_dst: HashMap<IpAddr, At>,
    /// The others (a prefix, a negation, the host's own addresses, none).
    wide: Vec<usize>,
    /// Rules by the single addresses they DNAT to.
    by_target: HashMap<IpAddr, At>,
}

/// A rule as duplicates are found: hashed with its chain's name's length,
/// not its text (another cache miss for each of ten thousand rules, where
/// the rest tells them apart), compared whole.
#[derive(PartialEq, Eq)]
struct Dedup<'r>(&'r DnatRule);

impl std::hash::Hash for Dedup<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let DnatRule {
            engine,
            chain,
            when,
            to,
        } = self.0;
        engine.hash(state);
        chain.len().hash(state);
        when.hash(state);
        to.hash(state);
    }
}

impl NatIntent {
    /// From the rules read (duplicates dropped) and the engines that were
    /// read (an engine not installed, or with no NAT table, is not
    /// listed).
    pub fn new(rules: Vec<DnatRule>, read: Vec<EngineRead>) -> NatIntent {
        // In place: ten thousand rules are megabytes to move.
        let mut rules = rules;
        for r in &mut rules {
            r.when.normalize();
        }
        let keep: Vec<bool> = {
            let mut seen = HashSet::with_capacity_and_hasher(
                rules.len(),
                foldhash::fast::RandomState::default(),
            );
            rules.iter().map(|r| seen.insert(Dedup(r))).collect()
        };
        let mut keep = keep.into_iter();
        rules.retain(|_| keep.next().unwrap_or(true));
        let mut intent = NatIntent {
            read,
            by_dst: HashMap::with_capacity_and_hasher(rules.len(), Default::default()),
            by_target: HashMap::with_capacity_and_hasher(rules.len(), Default::default()),
            ..NatIntent::default()
        };
        for (at, rule) in rules.iter().enumerate() {
            match rule.named_destinations() {
                Some(addrs) => {
                    for addr in addrs {
                        intent.by_dst.entry(addr).or_default().push(at);
                    }
                }
                None => intent.wide.push(at),
            }
            for t in &rule.to {
                if t.addr.lo == t.addr.hi {
                    intent.by_target.entry(t.addr.lo).or_default().push(at);
                }
            }
        }
        intent.rules = rules;
        intent
    }

    pub fn rules(&self) -> &[DnatRule] {
        &self.rules
    }

    /// Its rules, taken back (their room serves the next intent's).
    pub fn into_rules(self) -> Vec<DnatRule> {
        self.rules
    }

    pub fn read(&self) -> &[EngineRead] {
        &self.read
    }

    /// Whether any engine was read, and every DNAT of every engine read
    /// was understood.
    pub fn complete(&self) -> bool {
        !self.read.is_empty() && self.read.iter().all(|r| r.complete)
    }

    /// The engines read, as evidence names them: `nftables, iptables-nft`.
    pub fn engines(&self) -> String {
        let mut names: Vec<&str> = self.read.iter().map(|r| r.engine.name()).collect();
        names.dedup();
        names.join(", ")
    }

    /// The rules that can DNAT a flow, with how sure each is.
    pub fn for_flow(
        &self,
        orig: &Tuple,
        iif: Option<&str>,
        is_local: impl Fn(IpAddr) -> bool + Copy,
    ) -> Vec<(&DnatRule, Fit)> {
        let named = self.by_dst.get(&orig.dst).into_iter().flatten();
        let mut at: Vec<usize> = named.chain(self.wide.iter()).copied().collect();
        at.sort_unstable();
        at.into_iter()
            .map(|i| &self.rules[i])
            .map(|r| (r, r.when.admits(orig, iif, is_local)))
            .filter(|(_, fit)| *fit != Fit::No)
            .collect()
    }

    /// The services whose rules can send a flow to `backend`, besides
    /// `but`: where an address reused by another service's pod now serves.
    pub fn services_sending_to(&self, backend: Backend, but: &Service) -> Vec<Service> {
        let mut out: Vec<Service> = Vec::new();
        for &at in self.by_target.get(&backend.addr).into_iter().flatten() {
            let rule = &self.rules[at];
            for service in rule.services() {
                if service != *but
                    && rule.to.iter().any(|t| t.reaches(service.port, backend))
                    && !out.contains(&service)
                {
                    out.push(service);
                }
            }
        }
        out
    }
}

impl DnatRule {
    /// The destination addresses the rule names outright, when every
    /// destination it admits is one of them.
    fn named_destinations(&self) -> Option<SmallVec<[IpAddr; 2]>> {
        let cond = self.when.daddr.iter().find(|c| {
            !c.negated && !c.any_of.is_empty() && c.any_of.iter().all(|s| s.lo == s.hi)
        })?;
        Some(cond.any_of.iter().map(|s| s.lo).collect())
    }

    /// The services a rule names outright (one destination address, a
    /// protocol and one port each), for evidence.
    pub fn services(&self) -> Vec<Service> {
        let one = |v: &[Cond<AddrSpan>]| -> Vec<IpAddr> {
            v.iter()
                .filter(|c| !c.negated)
                .flat_map(|c| c.any_of.iter())
                .filter(|s| s.lo == s.hi)
                .map(|s| s.lo)
                .collect()
        };
        let ports: Vec<u16> = self
            .when
            .dport
            .iter()
            .filter(|c| !c.negated)
            .flat_map(|c| c.any_of.iter())
            .filter(|s| s.lo == s.hi)
            .map(|s| s.lo)
            .collect();
        let protos: Vec<Proto> = self
            .when
            .proto
            .iter()
            .filter(|c| !c.negated)
            .flat_map(|c| c.any_of.iter().copied())
            .collect();
        let mut out = Vec::new();
        for addr in one(&self.when.daddr) {
            for port in &ports {
                for proto in &protos {
                    out.push(Service {
                        proto: *proto,
                        addr,
                        port: *port,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::udp;

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn kube_dns(to: &str) -> DnatRule {
        DnatRule {
            engine: RuleEngine::IptablesNft,
            chain: "KUBE-SEP-X".into(),
            when: Conditions {
                proto: smallvec::smallvec![Cond::is(vec![Proto::UDP])],
                daddr: smallvec::smallvec![Cond::is(vec![AddrSpan::prefix(
                    addr("10.96.0.10"),
                    32
                )])],
                dport: smallvec::smallvec![Cond::is(vec![PortSpan::one(53)])],
                ..Conditions::default()
            },
            to: smallvec::smallvec![NatTarget {
                addr: AddrSpan::one(addr(to)),
                port: Some(PortSpan::one(53)),
            }],
        }
    }

    #[test]
    fn a_rule_admits_the_flows_it_names_and_no_others() {
        let rule = kube_dns("10.244.1.8");
        let flow = udp("192.0.2.2", 40000, "10.96.0.10", 53);
        assert_eq!(rule.when.admits(&flow, None, |_| false), Fit::Yes);
        let other = udp("192.0.2.2", 40000, "10.96.0.11", 53);
        assert_eq!(rule.when.admits(&other, None, |_| false), Fit::No);
        let tcp = Tuple {
            proto: Proto::TCP,
            ..flow
        };
        assert_eq!(rule.when.admits(&tcp, None, |_| false), Fit::No);
        assert!(rule.to[0].reaches(53, Backend::new(addr("10.244.1.8"), 53)));
        assert!(!rule.to[0].reaches(53, Backend::new(addr("10.244.1.7"), 53)));
        assert_eq!(
            rule.services(),
            [Service {
                proto: Proto::UDP,
                addr: addr("10.96.0.10"),
                port: 53
            }]
        );
    }

    #[test]
    fn conditions_are_small_enough_to_clone_at_every_branch() {
        // 480 with every field's matches inline.
        assert_eq!(size_of::<Conditions>(), 320);
        let mut when = Conditions::default();
        for _ in 0..2 {
            when.proto.push(Cond::is([Proto::TCP]));
            when.saddr
                .push(Cond::not([AddrSpan::one(addr("192.0.2.1"))]));
        }
        when.iif.push(Cond::is(["eth0".to_owned()]));
        when.normalize();
        assert_eq!(when.proto.len(), 1);
        assert_eq!(when.saddr.len(), 1);
        assert_eq!(when.iif.len(), 1);
    }

    #[test]
    fn an_interface_limit_needs_the_interface_and_negations_invert() {
        let mut rule = kube_dns("10.244.1.8");
        rule.when.iif = vec![Cond::is(vec!["ext+".to_owned()])];
        let flow = udp("192.0.2.2", 40000, "10.96.0.10", 53);
        assert_eq!(rule.when.admits(&flow, None, |_| false), Fit::Maybe);
        assert_eq!(rule.when.admits(&flow, Some("ext0"), |_| false), Fit::Yes);
        assert_eq!(rule.when.admits(&flow, Some("int0"), |_| false), Fit::No);
        rule.when.iif = vec![Cond::not(vec!["lo".to_owned()])];
        assert_eq!(rule.when.admits(&flow, Some("lo"), |_| false), Fit::No);
        rule.when.iif.clear();
        rule.when.saddr = vec![Cond::not(vec![AddrSpan::prefix(addr("192.0.2.0"), 24)])];
        assert_eq!(rule.when.admits(&flow, None, |_| false), Fit::No);
        rule.when.saddr.clear();
        rule.when.dst_local = true;
        assert_eq!(rule.when.admits(&flow, None, |_| false), Fit::No);
        assert_eq!(rule.when.admits(&flow, None, |_| true), Fit::Yes);
    }

    #[test]
    fn a_return_negates_its_one_match_for_the_rules_after_it() {
        let chain = Conditions {
            dst_local: true,
            ..Conditions::default()
        };
        let mut ret = chain.clone();
        ret.iif.push(Cond::is(vec!["br-client".to_owned()]));
        let after = chain.after_return(&ret).expect("reached");
        assert_eq!(after.iif[..], [Cond::not(vec!["br-client".to_owned()])]);
        assert!(!after.opaque);
        let mut two = ret.clone();
        two.proto.push(Cond::is(vec![Proto::UDP]));
        assert!(chain.after_return(&two).unwrap().opaque);
        assert_eq!(chain.after_return(&chain), None, "an unconditional return");
    }

    #[test]
    fn ranges_and_kept_ports_reach_their_backends() {
        let range = NatTarget {
            addr: AddrSpan {
                lo: addr("10.1.0.1"),
                hi: addr("10.1.0.5"),
            },
            port: Some(PortSpan { lo: 3000, hi: 4000 }),
        };
        assert!(range.reaches(1500, Backend::new(addr("10.1.0.3"), 3500)));
        assert!(!range.reaches(1500, Backend::new(addr("10.1.0.6"), 3500)));
        assert_eq!(range.backend(1500), None);
        let kept = NatTarget {
            addr: AddrSpan::one(addr("10.3.0.1")),
            port: None,
        };
        assert!(kept.reaches(7, Backend::new(addr("10.3.0.1"), 7)));
        assert!(!kept.reaches(7, Backend::new(addr("10.3.0.1"), 9)));
        assert_eq!(kept.backend(9), Some(Backend::new(addr("10.3.0.1"), 9)));
        assert_eq!(
            AddrSpan::prefix(addr("2001:db8::1"), 64).hi,
            addr("2001:db8::ffff:ffff:ffff:ffff")
        );
    }

    #[test]
    fn duplicates_are_the_same_rule_in_the_same_chain() {
        let in_chain = |chain: &str| DnatRule {
            chain: chain.into(),
            ..kube_dns("10.244.1.7")
        };
        // Names of one length hash alike: told apart by their text.
        let intent = NatIntent::new(
            vec![
                in_chain("KUBE-SEP-X"),
                in_chain("KUBE-SEP-Y"),
                in_chain("KUBE-SEP-X"),
            ],
            Vec::new(),
        );
        let chains: Vec<&str> = intent.rules().iter().map(|r| &*r.chain).collect();
        assert_eq!(chains, ["KUBE-SEP-X", "KUBE-SEP-Y"]);
    }

    #[test]
    fn another_services_rules_tell_where_a_reused_address_serves() {
        let mut other = kube_dns("10.244.1.7");
        other.when.daddr = smallvec::smallvec![Cond::is(vec![AddrSpan::one(addr("10.96.0.11"))])];
        let intent = NatIntent::new(
            vec![kube_dns("10.244.1.8"), other.clone(), other],
            vec![EngineRead {
                engine: RuleEngine::IptablesNft,
                complete: true,
            }],
        );
        assert_eq!(intent.rules().len(), 2, "duplicates dropped");
        let flow = udp("192.0.2.2", 40000, "10.96.0.10", 53);
        let found = intent.for_flow(&flow, None, |_| false);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1, Fit::Yes);
        let dns = udp("192.0.2.2", 1, "10.96.0.10", 53).service();
        let serves = intent.services_sending_to(Backend::new(addr("10.244.1.7"), 53), &dns);
        assert_eq!(serves.len(), 1);
        assert_eq!(serves[0].addr, addr("10.96.0.11"));
        assert!(intent.complete());
        assert_eq!(intent.engines(), "iptables-nft");
    }
}
