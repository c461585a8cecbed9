//! The DNATs of an iptables `nat` table, from `iptables-save -t nat`
//! (either backend, either family). The chains are walked from PREROUTING
//! and OUTPUT through `-j`/`-g` jumps (kube-proxy's `KUBE-SERVICES` →
//! `KUBE-SVC-*` → `KUBE-SEP-*`), gathering the matches on the way;
//! `statistic` load balancing is a choice every endpoint may take.

use std::{collections::HashMap, net::IpAddr};

use crate::domain::{
    AddrSpan, Cond, Conditions, DnatRule, Family, NatTarget, PortSpan, Proto, RuleEngine,
};

const MAX_DEPTH: usize = 16;

/// The DNATs in `save` (the output of `iptables-save -t nat`), and whether
/// every one was understood.
pub fn parse(save: &str, engine: RuleEngine, family: Family) -> (Vec<DnatRule>, bool) {
    let mut chains: HashMap<&str, Vec<Vec<String>>> = HashMap::new();
    let mut in_nat = false;
    let mut complete = true;
    for line in save.lines() {
        let line = line.trim();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
        } else if let Some(rest) = line.strip_prefix("-A ").filter(|_| in_nat) {
            let Some((chain, args)) = rest.split_once(' ') else {
                continue;
            };
            match shlex::split(args) {
                Some(words) => chains.entry(chain).or_default().push(words),
                None => complete &= !args.contains("DNAT"),
            }
        }
    }
    let mut walk = Walk {
        chains: &chains,
        engine,
        out: Vec::new(),
        complete,
    };
    for base in ["PREROUTING", "OUTPUT"] {
        let when = Conditions {
            family: Some(family),
            ..Conditions::default()
        };
        walk.chain(base, &when, 0);
    }
    (walk.out, walk.complete)
}

struct Walk<'c> {
    chains: &'c HashMap<&'c str, Vec<Vec<String>>>,
    engine: RuleEngine,
    out: Vec<DnatRule>,
    complete: bool,
}

impl Walk<'_> {
    fn chain(&mut self, name: &str, when: &Conditions, depth: usize) {
        if depth > MAX_DEPTH {
            self.complete = false;
            return;
        }
        let Some(rules) = self.chains.get(name) else {
            return;
        };
        // What a rule that ends the chain for its packets (RETURN, ACCEPT,
        // DROP, a goto) leaves to the rules after it.
        let mut base = when.clone();
        for words in rules {
            if let Some(ended) = self.rule(name, words, base.clone(), depth) {
                match base.after_return(&ended) {
                    Some(next) => base = next,
                    None => return,
                }
            }
        }
    }

    /// One rule; the conditions under which it ends the chain, if it does.
    fn rule(
        &mut self,
        chain: &str,
        words: &[String],
        mut when: Conditions,
        depth: usize,
    ) -> Option<Conditions> {
        let mut negated = false;
        let mut i = 0;
        let next = |i: &mut usize| -> Option<&str> {
            *i += 1;
            words.get(*i).map(String::as_str)
        };
        while i < words.len() {
            let word = words[i].as_str();
            match word {
                "!" => {
                    negated = true;
                    i += 1;
                    continue;
                }
                "-s" | "--source" | "-d" | "--destination" => {
                    let spans = next(&mut i).map(addr_spans).unwrap_or_default();
                    let cond = if negated {
                        Cond::not(spans)
                    } else {
                        Cond::is(spans)
                    };
                    if word.starts_with("-s") || word == "--source" {
                        when.saddr.push(cond);
                    } else {
                        when.daddr.push(cond);
                    }
                }
                "-i" | "--in-interface" => {
                    let name = next(&mut i).unwrap_or_default().to_owned();
                    when.iif.push(if negated {
                        Cond::not(vec![name])
                    } else {
                        Cond::is(vec![name])
                    });
                }
                "-p" | "--protocol" => {
                    let p = next(&mut i).and_then(Proto::from_name);
                    match p {
                        Some(p) => when.proto.push(if negated {
                            Cond::not(vec![p])
                        } else {
                            Cond::is(vec![p])
                        }),
                        None => when.opaque = true,
                    }
                }
                "--dport" | "--destination-port" | "--dports" | "--destination-ports" => {
                    let spans = next(&mut i).map(port_spans).unwrap_or_default();
                    when.dport.push(if negated {
                        Cond::not(spans)
                    } else {
                        Cond::is(spans)
                    });
                }
                "--dst-type" => match next(&mut i) {
                    Some("LOCAL") if !negated => when.dst_local = true,
                    _ => when.opaque = true,
                },
                "-m" | "--match" => {
                    // The module's own options follow; those read here
                    // are read by name, the rest make the rule opaque
                    // unless the module is harmless.
                    let module = next(&mut i).unwrap_or_default();
                    if !matches!(
                        module,
                        "udp" | "tcp" | "sctp" | "multiport" | "addrtype" | "comment" | "statistic"
                    ) {
                        when.opaque = true;
                    }
                }
                // Options of the harmless modules.
                "--comment" | "--mode" | "--probability" | "--every" | "--packet" => {
                    i += 1;
                }
                "--limit-iface-in" | "--limit-iface-out" => {}
                "-j" | "--jump" | "-g" | "--goto" => {
                    let goto = word.starts_with("-g") || word == "--goto";
                    let target = next(&mut i).unwrap_or_default();
                    match target {
                        "DNAT" => self.dnat(chain, &words[i + 1..], when),
                        "REDIRECT" => self.redirect(chain, &words[i + 1..], when),
                        "ACCEPT" | "RETURN" | "DROP" => return Some(when),
                        "MARK" | "MASQUERADE" | "SNAT" | "LOG" | "CONNMARK" => {}
                        chain_name => {
                            self.chain(chain_name, &when, depth + 1);
                            if goto {
                                return Some(when);
                            }
                        }
                    }
                    return None;
                }
                _ if word.starts_with('-') => {
                    // An option stalewatch does not evaluate, and its value.
                    when.opaque = true;
                    if words.get(i + 1).is_some_and(|w| !w.starts_with('-')) {
                        i += 1;
                    }
                }
                _ => {}
            }
            negated = false;
            i += 1;
        }
        None
    }

    /// A redirect DNATs to the host itself (the address of the interface
    /// the packet came in on), to `--to-ports` or the same port.
    fn redirect(&mut self, chain: &str, options: &[String], when: Conditions) {
        let mut port = None;
        let mut words = options.iter();
        while let Some(word) = words.next() {
            if word == "--to-ports" {
                match words.next().and_then(|p| port_spans(p).first().copied()) {
                    Some(p) => port = Some(p),
                    None => {
                        self.complete = false;
                        return;
                    }
                }
            }
        }
        let family = when.family.unwrap_or(Family::Ipv4);
        self.out.push(DnatRule {
            engine: self.engine,
            chain: chain.into(),
            when,
            to: smallvec::smallvec![NatTarget {
                addr: AddrSpan::all(family),
                port,
            }],
        });
    }

    fn dnat(&mut self, chain: &str, options: &[String], when: Conditions) {
        let mut to = Vec::new();
        let mut words = options.iter();
        while let Some(word) = words.next() {
            if word == "--to-destination" || word == "--to" {
                match words.next().and_then(|v| target(v)) {
                    Some(t) => to.push(t),
                    None => {
                        self.complete = false;
                        return;
                    }
                }
            }
        }
        if to.is_empty() {
            self.complete = false;
            return;
        }
        self.out.push(DnatRule {
            engine: self.engine,
            chain: chain.into(),
            when,
            to: to.into(),
        });
    }
}

/// `A[-B][:P[-Q]]`, with IPv6 addresses in brackets: `[A]-[B]:P`.
fn target(value: &str) -> Option<NatTarget> {
    let (addrs, port) = if value.starts_with('[') {
        // IPv6: the port follows the last bracket.
        let end = value.rfind(']')?;
        let port = value[end + 1..].strip_prefix(':');
        (&value[..=end], port)
    } else if value.matches(':').count() > 1 {
        // IPv6 without brackets: no port.
        (value, None)
    } else {
        match value.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (value, None),
        }
    };
    let unbracket = |s: &str| {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    };
    let addr = match addrs.split_once("-") {
        Some((lo, hi)) if !addrs.starts_with('[') || lo.ends_with(']') => AddrSpan {
            lo: unbracket(lo)?,
            hi: unbracket(hi)?,
        },
        _ => AddrSpan::one(unbracket(addrs)?),
    };
    let port = match port {
        Some(p) => Some(*port_spans(p).first()?),
        None => None,
    };
    Some(NatTarget { addr, port })
}

/// `ADDR`, `ADDR/LEN` or `ADDR/MASK`, comma-separated.
fn addr_spans(value: &str) -> Vec<AddrSpan> {
    value
        .split(',')
        .filter_map(|one| match one.split_once('/') {
            Some((a, len)) => {
                let a: IpAddr = a.parse().ok()?;
                let len = len.parse::<u8>().ok().or_else(|| {
                    len.parse::<std::net::Ipv4Addr>()
                        .ok()
                        .map(|m| u32::from(m).leading_ones() as u8)
                })?;
                Some(AddrSpan::prefix(a, len))
            }
            None => one.parse().ok().map(AddrSpan::one),
        })
        .collect()
}

/// `P`, `P:Q`, comma-separated (multiport).
fn port_spans(value: &str) -> Vec<PortSpan> {
    value
        .split(',')
        .filter_map(|one| match one.split_once([':', '-']) {
            Some((lo, hi)) => Some(PortSpan {
                lo: lo.parse().ok()?,
                hi: hi.parse().ok()?,
            }),
            None => one.parse().ok().map(PortSpan::one),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Backend, Fit, udp};

    const KUBE: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-DNS - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SEP-B - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-DNS
-A KUBE-SVC-DNS -m comment --comment "kube-system/kube-dns:dns -> 10.244.1.8:53" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-A
-A KUBE-SVC-DNS -m comment --comment "kube-system/kube-dns:dns -> 10.244.1.9:53" -j KUBE-SEP-B
-A KUBE-SEP-A -s 10.244.1.8/32 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ
-A KUBE-SEP-A -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.1.8:53
-A KUBE-SEP-B -p udp -m udp -j DNAT --to-destination 10.244.1.9:53
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
COMMIT
"#;

    fn backend(s: &str, port: u16) -> Backend {
        Backend::new(s.parse().unwrap(), port)
    }

    #[test]
    fn kube_proxy_chains_give_every_endpoint_of_the_service() {
        let (rules, complete) = parse(KUBE, RuleEngine::IptablesNft, Family::Ipv4);
        assert!(complete);
        // Once through PREROUTING, once through OUTPUT.
        assert_eq!(rules.len(), 4, "{rules:#?}");
        assert_eq!(rules[..2], rules[2..]);
        let rules = &rules[..2];
        let flow = udp("192.0.2.2", 40000, "10.96.0.10", 53);
        for (rule, to) in rules.iter().zip(["10.244.1.8", "10.244.1.9"]) {
            assert_eq!(rule.when.admits(&flow, None, |_| false), Fit::Yes);
            assert!(rule.to[0].reaches(53, backend(to, 53)));
            assert_eq!(rule.engine, RuleEngine::IptablesNft);
        }
        assert_eq!(&*rules[0].chain, "KUBE-SEP-A");
        let elsewhere = udp("192.0.2.2", 40000, "10.96.0.11", 53);
        assert!(
            rules
                .iter()
                .all(|r| r.when.admits(&elsewhere, None, |_| false) == Fit::No)
        );
    }

    #[test]
    fn docker_style_rules_carry_their_interface_and_local_limits() {
        let save = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER -i br-1 -j RETURN
-A DOCKER ! -i br-1 -p udp -m udp --dport 8888 -j DNAT --to-destination 172.18.0.2:8888
COMMIT
";
        let (rules, complete) = parse(save, RuleEngine::IptablesLegacy, Family::Ipv4);
        assert!(complete);
        assert_eq!(rules.len(), 2, "one per base chain");
        // The RETURN of the bridge's own traffic comes before the DNAT.
        assert!(
            rules[0]
                .when
                .iif
                .contains(&Cond::not(vec!["br-1".to_owned()]))
        );
        let flow = udp("198.51.100.2", 40000, "198.51.100.1", 8888);
        let local = |a: IpAddr| a == "198.51.100.1".parse::<IpAddr>().unwrap();
        assert_eq!(rules[0].when.admits(&flow, Some("veth0"), local), Fit::Yes);
        assert_eq!(rules[0].when.admits(&flow, Some("br-1"), local), Fit::No);
        assert_eq!(rules[0].when.admits(&flow, None, local), Fit::Maybe);
        assert_eq!(
            rules[0].when.admits(&flow, Some("veth0"), |_| false),
            Fit::No
        );
    }

    #[test]
    fn traffic_another_bridge_returns_is_no_traffic_the_dnat_takes() {
        // Docker: containers of another network send to a published port
        // through their gateway; their bridge RETURNs before the DNAT,
        // which excludes only the published container's bridge.
        let save = "*nat
:PREROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER -i br-client -j RETURN
-A DOCKER -i br-web -j RETURN
-A DOCKER ! -i br-web -p udp -m udp --dport 8888 -j DNAT --to-destination 172.18.240.2:8888
COMMIT
";
        let (rules, _) = parse(save, RuleEngine::IptablesNft, Family::Ipv4);
        let from_client = udp("172.18.200.2", 40100, "172.18.200.1", 8888);
        let local = |_| true;
        assert_eq!(
            rules[0].when.admits(&from_client, Some("br-client"), local),
            Fit::No
        );
        assert_eq!(
            rules[0].when.admits(&from_client, Some("eth0"), local),
            Fit::Yes
        );
    }

    #[test]
    fn targets_read_ranges_ports_and_ipv6() {
        let t = target("10.1.0.1-10.1.0.5:3000-4000").unwrap();
        assert_eq!(t.addr.hi, "10.1.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(t.port, Some(PortSpan { lo: 3000, hi: 4000 }));
        let t = target("[2001:db8::5]:8080").unwrap();
        assert_eq!(t.addr, AddrSpan::one("2001:db8::5".parse().unwrap()));
        assert_eq!(t.port, Some(PortSpan::one(8080)));
        let t = target("2001:db8::5").unwrap();
        assert_eq!(t.port, None);
        assert_eq!(target("10.0.0.1").unwrap().port, None);
        assert_eq!(
            addr_spans("10.0.0.0/255.255.255.0")[0].hi,
            "10.0.0.255".parse::<IpAddr>().unwrap()
        );
        assert_eq!(port_spans("53,1000:2000").len(), 2);
    }

    #[test]
    fn a_redirect_sends_to_the_host_itself() {
        let save = "*nat
-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 3128
COMMIT
";
        let (rules, complete) = parse(save, RuleEngine::IptablesNft, Family::Ipv4);
        assert!(complete);
        let proxy = backend("192.0.2.1", 3128);
        assert!(rules[0].to[0].reaches(80, proxy));
        assert!(!rules[0].to[0].reaches(80, backend("192.0.2.1", 80)));
    }

    #[test]
    fn an_option_not_evaluated_makes_a_rule_a_maybe() {
        let save = "*nat
-A PREROUTING -p udp -m udp --dport 53 -m mark --mark 0x1 -j DNAT --to-destination 10.0.0.1
COMMIT
";
        let (rules, complete) = parse(save, RuleEngine::IptablesNft, Family::Ipv4);
        assert!(complete);
        let flow = udp("192.0.2.2", 1, "192.0.2.1", 53);
        assert_eq!(rules[0].when.admits(&flow, None, |_| false), Fit::Maybe);
    }
}
