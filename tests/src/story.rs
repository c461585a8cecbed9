//! The story from DEVELOPERS.md, built in namespaces: a producer on the
//! LAN streams to a router that DNATs port 8888 to a container; then the
//! container is redeployed on a new bridge with a new address and the DNAT
//! rule is replaced. Variants cover the bug class: IPv4 or IPv6, and the
//! rule engine that writes the DNAT.
//!
//! ```text
//!  producer .2 ── lan ── .1 router ─┬─ br-old ── old container (+ a bystander, for late failure)
//!                                   └─ br-new ── new container
//! ```

use std::net::{IpAddr, SocketAddr};

use crate::netns::{Netns, veth};

pub const SERVICE_PORT: u16 = 8888;

/// Where the DNAT is written. Detection must not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// `iptables` (nft-backed on Debian), with Docker's chain layout.
    Iptables,
    /// `iptables-legacy`, the same layout on the legacy x_tables backend.
    IptablesLegacy,
    /// Native nftables, one table of our own.
    Nftables,
    /// kube-proxy's chains: KUBE-SERVICES → KUBE-SVC-… → KUBE-SEP-… DNAT,
    /// with the endpoint replaced on redeploy.
    KubeProxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Which member of the bug class to build.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub family: Family,
    pub rules: Rules,
    /// Docker's FORWARD policy DROP with one ACCEPT per published
    /// container: after the redeploy stale packets are dropped by netfilter,
    /// silently.
    pub forward_drop: bool,
    /// Another container stays on the old bridge, so it keeps its carrier
    /// and the old neighbour entry stays usable for a while: the first
    /// failure comes late.
    pub keep_old_carrier: bool,
}

impl Variant {
    pub const fn v4(rules: Rules) -> Variant {
        Variant {
            family: Family::V4,
            rules,
            forward_drop: false,
            keep_old_carrier: false,
        }
    }

    pub const fn v6(rules: Rules) -> Variant {
        Variant {
            family: Family::V6,
            ..Variant::v4(rules)
        }
    }
}

/// The addresses of one family.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub router_lan: &'static str,
    pub producer: &'static str,
    pub lan_prefix: u8,
    pub old_gw: &'static str,
    pub old_backend: &'static str,
    pub old_prefix: u8,
    pub bystander: &'static str,
    pub new_gw: &'static str,
    pub new_backend: &'static str,
    pub new_prefix: u8,
}

pub const V4: Plan = Plan {
    router_lan: "192.0.2.1",
    producer: "192.0.2.2",
    lan_prefix: 24,
    old_gw: "172.17.0.1",
    old_backend: "172.17.0.2",
    old_prefix: 16,
    bystander: "172.17.0.3",
    new_gw: "172.18.0.1",
    new_backend: "172.18.0.2",
    new_prefix: 24,
};

pub const V6: Plan = Plan {
    router_lan: "2001:db8:0:1::1",
    producer: "2001:db8:0:1::2",
    lan_prefix: 64,
    old_gw: "2001:db8:0:17::1",
    old_backend: "2001:db8:0:17::2",
    old_prefix: 64,
    bystander: "2001:db8:0:17::3",
    new_gw: "2001:db8:0:18::1",
    new_backend: "2001:db8:0:18::2",
    new_prefix: 64,
};

pub struct Story {
    pub producer: Netns,
    pub router: Netns,
    pub old: Option<Netns>,
    pub bystander: Option<Netns>,
    pub new: Netns,
    pub variant: Variant,
    pub plan: Plan,
}

impl Story {
    /// Builds the topology with the service DNATed to the old container.
    pub fn build(variant: Variant) -> anyhow::Result<Story> {
        let plan = match variant.family {
            Family::V4 => V4,
            Family::V6 => V6,
        };
        let producer = Netns::new("prod")?;
        let router = Netns::new("router")?;
        let old = Netns::new("old")?;
        let new = Netns::new("new")?;
        for ns in [&producer, &router, &old, &new] {
            // Addresses must be usable at once, not after IPv6 duplicate
            // address detection.
            ns.sysctl("net.ipv6.conf.all.accept_dad=0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad=0")?;
        }

        veth(&producer, "lan0", &router, "lan1")?;
        add_addr(&producer, "lan0", plan.producer, plan.lan_prefix)?;
        add_addr(&router, "lan1", plan.router_lan, plan.lan_prefix)?;
        router.sysctl("net.ipv4.ip_forward=1")?;
        router.sysctl("net.ipv6.conf.all.forwarding=1")?;

        for (bridge, gateway, prefix) in [
            ("br-old", plan.old_gw, plan.old_prefix),
            ("br-new", plan.new_gw, plan.new_prefix),
        ] {
            router.ip(&["link", "add", bridge, "type", "bridge"])?;
            router.ip(&["link", "set", bridge, "up"])?;
            add_addr(&router, bridge, gateway, prefix)?;
        }
        let old_net = (plan.old_backend, plan.old_prefix, plan.old_gw);
        let new_net = (plan.new_backend, plan.new_prefix, plan.new_gw);
        attach(&router, "br-old", &old, "vold", old_net)?;
        attach(&router, "br-new", &new, "vnew", new_net)?;
        let bystander = if variant.keep_old_carrier {
            let ns = Netns::new("bystander")?;
            ns.sysctl("net.ipv6.conf.all.accept_dad=0")?;
            let net = (plan.bystander, plan.old_prefix, plan.old_gw);
            attach(&router, "br-old", &ns, "vbys", net)?;
            Some(ns)
        } else {
            None
        };

        let story = Story {
            producer,
            router,
            old: Some(old),
            bystander,
            new,
            variant,
            plan,
        };
        story.publish_first()?;
        Ok(story)
    }

    fn family_flag(&self) -> &'static str {
        match self.variant.family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// `iptables`, `ip6tables` or their legacy twins, in the router, with
    /// a rule written as on the command line (no argument holds a space).
    fn ipt_line(&self, line: &str) -> anyhow::Result<String> {
        let bin = match (self.variant.rules, self.variant.family) {
            (Rules::IptablesLegacy, Family::V4) => "iptables-legacy",
            (Rules::IptablesLegacy, Family::V6) => "ip6tables-legacy",
            (_, Family::V4) => "iptables",
            (_, Family::V6) => "ip6tables",
        };
        let mut full = vec![bin, "-w"];
        full.extend(line.split_whitespace());
        self.router.exec(&full)
    }

    fn nft(&self, script: &str) -> anyhow::Result<String> {
        self.router.exec(&["nft", script])
    }

    /// `addr:port` as DNAT targets write it (`[addr]:port` for IPv6).
    fn target(&self, addr: &str) -> String {
        match self.variant.family {
            Family::V4 => format!("{addr}:{SERVICE_PORT}"),
            Family::V6 => format!("[{addr}]:{SERVICE_PORT}"),
        }
    }

    /// The first deployment: the port published to the old container.
    fn publish_first(&self) -> anyhow::Result<()> {
        let port = SERVICE_PORT.to_string();
        let to = self.target(self.plan.old_backend);
        match self.variant.rules {
            Rules::Iptables | Rules::IptablesLegacy => {
                self.ipt_line("-t nat -N DOCKER")?;
                self.ipt_line("-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER")?;
                // Docker masquerades what its networks send out. This rule
                // also keeps conntrack on in the namespace when no DNAT is
                // left (nft-backed NAT enables it only while a NAT rule
                // exists), as on every Docker host.
                for (net, bridge) in [(self.plan.old_gw, "br-old"), (self.plan.new_gw, "br-new")] {
                    let prefix = if net.contains(':') { 64 } else { 16 };
                    self.ipt_line(&format!(
                        "-t nat -A POSTROUTING -s {net}/{prefix} ! -o {bridge} -j MASQUERADE"
                    ))?;
                }
                for proto in ["udp", "tcp"] {
                    self.ipt_line(&format!(
                        "-t nat -A DOCKER ! -i br-old -p {proto} --dport {port} -j DNAT --to-destination {to}"
                    ))?;
                }
            }
            Rules::Nftables => {
                let family = match self.variant.family {
                    Family::V4 => "ip",
                    Family::V6 => "ip6",
                };
                self.nft(&format!(
                    "add table {family} stale; \
                     add chain {family} stale pre {{ type nat hook prerouting priority dstnat; }}; \
                     add rule {family} stale pre meta l4proto {{ udp, tcp }} th dport {port} dnat to {to}"
                ))?;
            }
            Rules::KubeProxy => {
                for chain in ["KUBE-SERVICES", "KUBE-SVC-STALEWATCH", "KUBE-SEP-OLD"] {
                    self.ipt_line(&format!("-t nat -N {chain}"))?;
                }
                self.ipt_line("-t nat -A PREROUTING -j KUBE-SERVICES")?;
                for proto in ["udp", "tcp"] {
                    self.ipt_line(&format!(
                        "-t nat -A KUBE-SERVICES -p {proto} --dport {port} -j KUBE-SVC-STALEWATCH"
                    ))?;
                    self.ipt_line(&format!(
                        "-t nat -A KUBE-SEP-OLD -p {proto} -j DNAT --to-destination {to}"
                    ))?;
                }
                self.ipt_line("-t nat -A KUBE-SVC-STALEWATCH -j KUBE-SEP-OLD")?;
            }
        }
        if self.variant.forward_drop {
            // Docker's filter layout: policy DROP, replies let through by
            // state, new flows only to a published container's port.
            self.ipt_line("-P FORWARD DROP")?;
            self.ipt_line("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")?;
            self.ipt_line(&accept_rule("-A", "br-old", self.plan.old_backend))?;
        }
        Ok(())
    }

    /// The redeploy: the old container goes away, and the published port
    /// now DNATs to the new one. Conntrack entries are left alone, as the
    /// engines that this bug bites leave them.
    pub fn redeploy(&mut self) -> anyhow::Result<()> {
        self.old = None;
        let port = SERVICE_PORT.to_string();
        let to = self.target(self.plan.new_backend);
        match self.variant.rules {
            Rules::Iptables | Rules::IptablesLegacy => {
                for (n, proto) in [(1, "udp"), (2, "tcp")] {
                    self.ipt_line(&format!(
                        "-t nat -R DOCKER {n} ! -i br-new -p {proto} --dport {port} -j DNAT --to-destination {to}"
                    ))?;
                }
            }
            Rules::Nftables => {
                let family = match self.variant.family {
                    Family::V4 => "ip",
                    Family::V6 => "ip6",
                };
                self.nft(&format!(
                    "flush chain {family} stale pre; \
                     add rule {family} stale pre meta l4proto {{ udp, tcp }} th dport {port} dnat to {to}"
                ))?;
            }
            Rules::KubeProxy => {
                // kube-proxy writes the new endpoint, points the service at
                // it, then removes the old one.
                self.ipt_line("-t nat -N KUBE-SEP-NEW")?;
                for proto in ["udp", "tcp"] {
                    self.ipt_line(&format!(
                        "-t nat -A KUBE-SEP-NEW -p {proto} -j DNAT --to-destination {to}"
                    ))?;
                }
                self.ipt_line("-t nat -R KUBE-SVC-STALEWATCH 1 -j KUBE-SEP-NEW")?;
                self.ipt_line("-t nat -F KUBE-SEP-OLD")?;
                self.ipt_line("-t nat -X KUBE-SEP-OLD")?;
            }
        }
        if self.variant.forward_drop {
            self.ipt_line(&accept_rule("-D", "br-old", self.plan.old_backend))?;
            self.ipt_line(&accept_rule("-A", "br-new", self.plan.new_backend))?;
        }
        Ok(())
    }

    /// The redeploy as Docker does it: the old container's rules go and
    /// its conntrack entries are deleted by its address; for `gap` no rule
    /// publishes the port (a stream then makes an entry without NAT, to the
    /// host itself); then the new container's rule comes.
    pub fn redeploy_with_gap(&mut self, gap: std::time::Duration) -> anyhow::Result<()> {
        assert_eq!(self.variant.rules, Rules::Iptables, "Docker's layout only");
        self.ipt_line("-t nat -F DOCKER")?;
        self.router
            .exec(&["conntrack", "-D", "--reply-src", self.plan.old_backend])
            .or_else(|e| {
                // conntrack exits 1 when it deleted nothing.
                if e.to_string().contains("0 flow entries") {
                    Ok(String::new())
                } else {
                    Err(e)
                }
            })?;
        self.old = None;
        std::thread::sleep(gap);
        let to = self.target(self.plan.new_backend);
        for proto in ["udp", "tcp"] {
            self.ipt_line(&format!(
                "-t nat -A DOCKER ! -i br-new -p {proto} --dport {SERVICE_PORT} -j DNAT --to-destination {to}"
            ))?;
        }
        Ok(())
    }

    pub fn service(&self) -> SocketAddr {
        SocketAddr::new(parse(self.plan.router_lan), SERVICE_PORT)
    }

    pub fn producer_addr(&self, sport: u16) -> SocketAddr {
        SocketAddr::new(parse(self.plan.producer), sport)
    }

    /// The `conntrack -D` stalewatch should print for a flow from `sport`
    /// pinned to the old backend: its whole original and reply tuples.
    pub fn expected_fix(&self, proto: &str, sport: u16) -> String {
        self.expected_fix_to(proto, sport, self.plan.old_backend)
    }

    /// The same for a flow whose entry sends it to `backend` (the router's
    /// own address for a bypass).
    pub fn expected_fix_to(&self, proto: &str, sport: u16, backend: &str) -> String {
        format!(
            "ip netns exec {} conntrack -D -f {} -p {proto} -s {} -d {} -r {} -q {} \
             --sport {sport} --dport {SERVICE_PORT} --reply-port-src {SERVICE_PORT} \
             --reply-port-dst {sport}",
            self.router.name,
            self.family_flag(),
            self.plan.producer,
            self.plan.router_lan,
            backend,
            self.plan.producer,
        )
    }

    /// Whether the router's table holds an entry from `sport` to the
    /// service pinned to `backend`.
    pub fn has_entry(&self, sport: u16, backend: &str) -> anyhow::Result<bool> {
        let backend = parse(backend);
        Ok(self.router.conntrack()?.iter().any(|e| {
            e.orig.src == parse(self.plan.producer)
                && e.orig.sport == sport
                && e.orig.dport == SERVICE_PORT
                && e.reply.src == backend
        }))
    }
}

/// Docker's per-container ACCEPT in FORWARD, added (`-A`) or deleted (`-D`).
fn accept_rule(op: &str, bridge: &str, backend: &str) -> String {
    format!(
        "{op} FORWARD -d {backend} ! -i {bridge} -o {bridge} -p udp --dport {SERVICE_PORT} -j ACCEPT"
    )
}

fn parse(addr: &str) -> IpAddr {
    addr.parse().expect("the plan's addresses are valid")
}

pub(crate) fn add_addr(ns: &Netns, dev: &str, addr: &str, prefix: u8) -> anyhow::Result<()> {
    let with_prefix = format!("{addr}/{prefix}");
    let mut args = vec!["addr", "add", with_prefix.as_str(), "dev", dev];
    if addr.contains(':') {
        args.push("nodad");
    }
    ns.ip(&args).map(drop)
}

/// A container: a namespace linked to a bridge of the router.
pub(crate) fn attach(
    router: &Netns,
    bridge: &str,
    container: &Netns,
    host_if: &str,
    (addr, prefix, gateway): (&str, u8, &str),
) -> anyhow::Result<()> {
    veth(router, host_if, container, "eth0")?;
    router.ip(&["link", "set", host_if, "master", bridge])?;
    add_addr(container, "eth0", addr, prefix)?;
    container.ip(&["route", "add", "default", "via", gateway])?;
    Ok(())
}

/// A smaller topology for the quiet cases: a router whose UDP port 8888 is
/// DNATed to 198.18.0.77 on a bridge, where a backend lives only when asked
/// for, and which also routes 198.18.0.0/24 to the producer without NAT.
pub struct DeadEnd {
    pub producer: Netns,
    pub router: Netns,
    pub backend: Option<Netns>,
}

pub const DEAD_END_BACKEND: &str = "198.18.0.77";

impl DeadEnd {
    pub fn build(live_backend: bool) -> anyhow::Result<DeadEnd> {
        let producer = Netns::new("prod")?;
        let router = Netns::new("router")?;
        veth(&producer, "lan0", &router, "lan1")?;
        add_addr(&producer, "lan0", V4.producer, 24)?;
        producer.ip(&["route", "add", "198.18.0.0/24", "via", V4.router_lan])?;
        add_addr(&router, "lan1", V4.router_lan, 24)?;
        router.sysctl("net.ipv4.ip_forward=1")?;
        router.ip(&["link", "add", "br0", "type", "bridge"])?;
        router.ip(&["link", "set", "br0", "up"])?;
        add_addr(&router, "br0", "198.18.0.1", 24)?;
        let dnat = format!(
            "-t nat -A PREROUTING -p udp --dport {SERVICE_PORT} -j DNAT --to-destination {DEAD_END_BACKEND}:{SERVICE_PORT}"
        );
        let mut ipt = vec!["iptables", "-w"];
        ipt.extend(dnat.split_whitespace());
        router.exec(&ipt)?;
        let backend = if live_backend {
            let ns = Netns::new("backend")?;
            attach(
                &router,
                "br0",
                &ns,
                "vback",
                (DEAD_END_BACKEND, 24, "198.18.0.1"),
            )?;
            Some(ns)
        } else {
            None
        };
        Ok(DeadEnd {
            producer,
            router,
            backend,
        })
    }

    pub fn service(&self) -> SocketAddr {
        SocketAddr::new(parse(V4.router_lan), SERVICE_PORT)
    }

    pub fn producer_addr(&self, sport: u16) -> SocketAddr {
        SocketAddr::new(parse(V4.producer), sport)
    }
}

/// The story played out to the point where the bug shows: what keeps
/// running, for the caller to assert on and stop.
pub struct Played {
    /// The never-pausing stream, now pinned by its stale entry.
    pub stream: crate::traffic::Producer,
    /// A new flow, DNATed to the new container.
    pub fresh: crate::traffic::Producer,
    pub new_service: crate::traffic::Receiver,
}

impl Story {
    /// Streams UDP every 100 ms from `stale_sport` until it reaches
    /// `old_service`, redeploys, and starts a new flow from `new_sport` that
    /// reaches the new container. Panics, like a failed assertion, when the
    /// traffic does not get through.
    pub fn play(
        &mut self,
        old_service: crate::traffic::Receiver,
        stale_sport: u16,
        new_sport: u16,
    ) -> anyhow::Result<Played> {
        use std::time::Duration;

        use crate::traffic::{Producer, Receiver};
        let every = Duration::from_millis(100);
        let stale_src = self.producer_addr(stale_sport);
        let stream = Producer::start(
            &self.producer,
            stale_src,
            self.service(),
            every,
            1500,
            Duration::from_secs(150),
        )?;
        assert!(
            old_service.wait_from(stale_src, 5, Duration::from_secs(10)),
            "the stream reaches the old container before the redeploy"
        );
        self.redeploy()?;
        drop(old_service);
        let new_service = Receiver::start(&self.new, SERVICE_PORT)?;
        let new_src = self.producer_addr(new_sport);
        let fresh = Producer::start(
            &self.producer,
            new_src,
            self.service(),
            every,
            30,
            Duration::from_secs(10),
        )?;
        assert!(
            new_service.wait_from(new_src, 5, Duration::from_secs(10)),
            "a new flow reaches the new container"
        );
        Ok(Played {
            stream,
            fresh,
            new_service,
        })
    }
}

impl Story {
    /// Asserts what every raised alert of this story says: the router's
    /// namespace, the old backend it is pinned to, the new one, the fix.
    pub fn assert_raised(&self, raised: &serde_json::Value, stale_sport: u16) {
        assert_eq!(
            raised["netns"]["name"],
            self.router.name.as_str(),
            "{raised}"
        );
        let inode = self.router.inode().expect("router inode");
        assert_eq!(raised["netns"]["inode"], inode, "{raised}");
        assert_eq!(
            raised["stale_backend"]["addr"], self.plan.old_backend,
            "{raised}"
        );
        assert_eq!(
            raised["current_backend"]["addr"], self.plan.new_backend,
            "{raised}"
        );
        assert_eq!(
            raised["fix"],
            self.expected_fix("udp", stale_sport),
            "{raised}"
        );
    }
}
