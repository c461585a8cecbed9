//! The DNATs of a native nftables ruleset, from `nft -j list ruleset`
//! parsed with the `nftables` crate's types. Every NAT base chain of hook
//! prerouting or output is walked, through `jump`/`goto`, verdict maps
//! (kube-proxy's `ip daddr . meta l4proto . th dport vmap @service-ips`,
//! `numgen ... vmap`) and DNAT maps, gathering the matches on the way.
//! Rules of iptables-nft (their `xt` compat statements) are left to the
//! iptables reader.

use std::{borrow::Cow, collections::HashMap, net::IpAddr};

use nftables::{
    expr::{Expression, Meta, MetaKey, NamedExpression, Payload, SetItem, Verdict},
    schema::{Chain, Rule},
    stmt::{Match, NAT, Operator, Statement},
    types::{NfChainType, NfFamily, NfHook},
};
use serde::Deserialize as _;
use serde_json::Value;

use crate::domain::{
    AddrSpan, Cond, Conditions, DnatRule, Family, NatTarget, PortSpan, Proto, RuleEngine,
};

/// Chains followed from a base chain, at most: rulesets do not loop, but
/// a reader must not trust that.
const MAX_DEPTH: usize = 16;

/// A table's object: (family, table, name).
type Key = (String, String, String);

/// What a ruleset says of its DNATs.
pub struct Parsed {
    pub rules: Vec<DnatRule>,
    /// Every DNAT of nftables' own was understood.
    pub complete: bool,
    /// iptables-nft DNATs are there too (compat statements), for its own
    /// reader.
    pub iptables_dnat: bool,
}

/// The DNATs of a ruleset.
pub fn parse(json: &str) -> Result<Parsed, serde_json::Error> {
    let root: Value = serde_json::from_str(json)?;
    let objects = root
        .get("nftables")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut ruleset = Ruleset {
        complete: true,
        ..Ruleset::default()
    };
    for object in objects {
        ruleset.add(object);
    }
    let iptables_dnat = ruleset.rules.values().flatten().any(|r| {
        r.expr.iter().any(|s| {
            matches!(s, Statement::XT(Some(xt))
                if xt.get("type").and_then(Value::as_str) == Some("target")
                    && xt.get("name").and_then(Value::as_str) == Some("DNAT"))
        })
    });
    let mut walk = Walk {
        ruleset: &ruleset,
        out: Vec::new(),
        complete: ruleset.complete,
    };
    let mut bases: Vec<&Key> = ruleset.bases.iter().collect();
    bases.sort();
    for key in bases {
        let family = match key.0.as_str() {
            "ip" => Some(Family::Ipv4),
            "ip6" => Some(Family::Ipv6),
            _ => None,
        };
        let when = Conditions {
            family,
            ..Conditions::default()
        };
        walk.chain(key, when, 0);
    }
    Ok(Parsed {
        rules: walk.out,
        complete: walk.complete,
        iptables_dnat,
    })
}

#[derive(Default)]
struct Ruleset {
    /// NAT base chains at prerouting or output.
    bases: Vec<Key>,
    rules: HashMap<Key, Vec<Rule<'static>>>,
    /// Elements of sets and maps: a set's are keys, a map's `[key, value]`.
    elements: HashMap<Key, Vec<Expression<'static>>>,
    /// False once a rule that DNATs could not be read.
    complete: bool,
}

impl Ruleset {
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
                    self.rules.entry(k).or_default().push(rule);
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
                let elements: Vec<Expression<'static>> = body
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| Expression::deserialize(e).ok())
                    .collect();
                self.elements.insert(
                    (
                        field("family").to_owned(),
                        field("table").to_owned(),
                        field("name").to_owned(),
                    ),
                    elements,
                );
            }
            _ => {}
        }
    }
}

fn key(family: NfFamily, table: &str, name: &str) -> Key {
    let family = match family {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    };
    (family.to_owned(), table.to_owned(), name.to_owned())
}

struct Walk<'r> {
    ruleset: &'r Ruleset,
    out: Vec<DnatRule>,
    complete: bool,
}

impl<'r> Walk<'r> {
    fn chain(&mut self, chain: &Key, when: Conditions, depth: usize) {
        if depth > MAX_DEPTH {
            self.complete = false;
            return;
        }
        let ruleset: &'r Ruleset = self.ruleset;
        let Some(rules) = ruleset.rules.get(chain) else {
            return;
        };
        // What a rule that ends the chain for its packets (return,
        // accept, drop, a goto) leaves to the rules after it.
        let mut base = when;
        for rule in rules {
            if rule.expr.iter().any(|s| matches!(s, Statement::XT(_))) {
                // iptables-nft's: read from iptables-nft-save.
                continue;
            }
            if let Some(ended) = self.rule(chain, &rule.expr, base.clone(), depth) {
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
        chain: &Key,
        statements: &'r [Statement<'static>],
        mut when: Conditions,
        depth: usize,
    ) -> Option<Conditions> {
        for statement in statements {
            match statement {
                Statement::Match(m) => self.narrow(chain, &mut when, m),
                Statement::Jump(t) => {
                    let next = (chain.0.clone(), chain.1.clone(), t.target.to_string());
                    self.chain(&next, when, depth + 1);
                    return None;
                }
                Statement::Goto(t) => {
                    let next = (chain.0.clone(), chain.1.clone(), t.target.to_string());
                    self.chain(&next, when.clone(), depth + 1);
                    return Some(when);
                }
                Statement::VerdictMap(vmap) => {
                    for (k, v) in self.pairs(chain, &vmap.data) {
                        let mut branch = when.clone();
                        bind(&mut branch, &vmap.key, k);
                        if let Expression::Verdict(Verdict::Jump(t) | Verdict::Goto(t)) = v {
                            let next = (chain.0.clone(), chain.1.clone(), t.target.to_string());
                            self.chain(&next, branch, depth + 1);
                        }
                    }
                    return None;
                }
                Statement::DNAT(Some(nat)) => {
                    self.dnat(chain, nat, when);
                    return None;
                }
                Statement::Redirect(nat) => {
                    self.redirect(chain, nat.as_ref(), when);
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

    /// Narrows `when` by a match; one it cannot read makes it opaque.
    fn narrow(&self, chain: &Key, when: &mut Conditions, m: &'r Match<'static>) {
        let negated = match m.op {
            Operator::EQ | Operator::IN => false,
            Operator::NEQ => true,
            _ => {
                when.opaque = true;
                return;
            }
        };
        let right = self.values(chain, &m.right);
        if !constrain(when, &m.left, &right, negated) {
            when.opaque = true;
        }
    }

    /// The values an expression on the right of a match stands for, a
    /// named set's elements included.
    fn values(&self, chain: &Key, right: &'r Expression<'static>) -> Vec<&'r Expression<'static>> {
        let ruleset: &'r Ruleset = self.ruleset;
        match right {
            Expression::String(s) if s.starts_with('@') => {
                let set = (chain.0.clone(), chain.1.clone(), s[1..].to_owned());
                ruleset
                    .elements
                    .get(&set)
                    .map(|e| e.iter().map(unwrap_elem).collect())
                    .unwrap_or_default()
            }
            Expression::Named(NamedExpression::Set(items)) => items
                .iter()
                .filter_map(|i| match i {
                    SetItem::Element(e) => Some(unwrap_elem(e)),
                    _ => None,
                })
                .collect(),
            other => vec![other],
        }
    }

    /// The `[key, value]` pairs of a map: named (`@name`) or literal.
    fn pairs(
        &self,
        chain: &Key,
        data: &'r Expression<'static>,
    ) -> Vec<(&'r Expression<'static>, &'r Expression<'static>)> {
        let ruleset: &'r Ruleset = self.ruleset;
        let pair = |e: &'r Expression<'static>| match e {
            Expression::List(kv) if kv.len() == 2 => Some((unwrap_elem(&kv[0]), &kv[1])),
            _ => None,
        };
        match data {
            Expression::String(s) if s.starts_with('@') => {
                let map = (chain.0.clone(), chain.1.clone(), s[1..].to_owned());
                ruleset
                    .elements
                    .get(&map)
                    .map(|e| e.iter().filter_map(pair).collect())
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
            _ => Vec::new(),
        }
    }

    /// A redirect DNATs to the host itself (the address of the interface
    /// the packet came in on), to its port or the same one.
    fn redirect(&mut self, chain: &Key, nat: Option<&'r NAT<'static>>, when: Conditions) {
        let port = match nat.and_then(|n| n.port.as_ref()) {
            Some(p) => match port_spans(p).first() {
                Some(p) => Some(*p),
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
            chain: format!("{} {}/{}", chain.0, chain.1, chain.2),
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

    fn dnat(&mut self, chain: &Key, nat: &'r NAT<'static>, when: Conditions) {
        let where_ = format!("{} {}/{}", chain.0, chain.1, chain.2);
        let Some(addr) = &nat.addr else {
            self.complete = false;
            return;
        };
        let port = nat.port.as_ref().map(|p| port_spans(p).into_iter().next());
        if let Some(None) = port {
            // A port from a map or an expression: not read.
            self.complete = false;
            return;
        }
        let port = port.flatten();
        if let Expression::Named(NamedExpression::Map(map)) = addr {
            for (k, v) in self.pairs(chain, &map.data) {
                let mut branch = when.clone();
                bind(&mut branch, &map.key, k);
                match target(v, port) {
                    Some(t) => self.out.push(DnatRule {
                        engine: RuleEngine::Nftables,
                        chain: where_.clone(),
                        when: branch,
                        to: vec![t],
                    }),
                    None => self.complete = false,
                }
            }
            return;
        }
        match target(addr, port) {
            Some(t) => self.out.push(DnatRule {
                engine: RuleEngine::Nftables,
                chain: where_,
                when,
                to: vec![t],
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
            addr: *addr_spans(addr).first()?,
            port: Some(*port_spans(p).first()?),
        });
    }
    Some(NatTarget {
        addr: *addr_spans(value).first()?,
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
            match (field.protocol.as_ref(), field.field.as_ref()) {
                ("ip" | "ip6", "daddr") => {
                    when.daddr.push(Cond::new(
                        right.iter().flat_map(|v| addr_spans(v)).collect(),
                        negated,
                    ));
                    true
                }
                ("ip" | "ip6", "saddr") => {
                    when.saddr.push(Cond::new(
                        right.iter().flat_map(|v| addr_spans(v)).collect(),
                        negated,
                    ));
                    true
                }
                ("ip", "protocol") | ("ip6", "nexthdr") => {
                    when.proto.push(Cond::new(
                        right.iter().filter_map(|v| proto(v)).collect(),
                        negated,
                    ));
                    true
                }
                (l4 @ ("udp" | "tcp" | "sctp" | "udplite" | "th"), "dport") => {
                    if let Some(p) = proto(&Expression::String(Cow::Borrowed(l4))) {
                        when.proto.push(Cond::is(vec![p]));
                    }
                    when.dport.push(Cond::new(
                        right.iter().flat_map(|v| port_spans(v)).collect(),
                        negated,
                    ));
                    true
                }
                _ => false,
            }
        }
        Expression::Named(NamedExpression::Meta(Meta { key })) => match key {
            MetaKey::L4proto => {
                when.proto.push(Cond::new(
                    right.iter().filter_map(|v| proto(v)).collect(),
                    negated,
                ));
                true
            }
            MetaKey::Iifname | MetaKey::Iif => {
                let names = right
                    .iter()
                    .filter_map(|v| match v {
                        Expression::String(s) => Some(s.to_string()),
                        _ => None,
                    })
                    .collect();
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

fn addr_spans(value: &Expression<'_>) -> Vec<AddrSpan> {
    let parse = |s: &str| s.parse::<IpAddr>().ok();
    match value {
        Expression::String(s) => parse(s).map(AddrSpan::one).into_iter().collect(),
        Expression::Named(NamedExpression::Prefix(p)) => match p.addr.as_ref() {
            Expression::String(s) => parse(s)
                .map(|a| AddrSpan::prefix(a, p.len.min(128) as u8))
                .into_iter()
                .collect(),
            _ => Vec::new(),
        },
        Expression::Range(r) => match (&r.range[0], &r.range[1]) {
            (Expression::String(lo), Expression::String(hi)) => match (parse(lo), parse(hi)) {
                (Some(lo), Some(hi)) => vec![AddrSpan { lo, hi }],
                _ => Vec::new(),
            },
            _ => Vec::new(),
        },
        Expression::Named(NamedExpression::Elem(e)) => addr_spans(&e.val),
        _ => Vec::new(),
    }
}

fn port_spans(value: &Expression<'_>) -> Vec<PortSpan> {
    let number = |e: &Expression<'_>| match e {
        Expression::Number(n) => u16::try_from(*n).ok(),
        Expression::String(s) => s.parse().ok(),
        _ => None,
    };
    match value {
        Expression::Range(r) => match (number(&r.range[0]), number(&r.range[1])) {
            (Some(lo), Some(hi)) => vec![PortSpan { lo, hi }],
            _ => Vec::new(),
        },
        Expression::Named(NamedExpression::Elem(e)) => port_spans(&e.val),
        other => number(other).map(PortSpan::one).into_iter().collect(),
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
