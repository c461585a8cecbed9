//! Issue #15's topology, built in namespaces: a DNAT gateway (node A, a
//! Kubernetes node running kube-proxy) sends a service's traffic to a pod
//! that lives on another host (node B, the router of the pod subnet).
//!
//! ```text
//!  client .2 ── 192.0.2.0/24 ── .1 nodeA .1 ── 198.51.100.0/24 ── .2 nodeB ── cbr0 10.244.1.1/24 ─┬─ pod .7
//!  (route to the VIPs via A)      (DNAT VIP → pod;                 (forwards; no NAT)                 └─ pod .8
//!                                  routes 10.244.1.0/24 via B)
//! ```
//!
//! IPv6 mirrors it: client 2001:db8:0:1::2, A–B link 2001:db8:0:2::/64,
//! pods 2001:db8:244:1::/64, VIPs 2001:db8:96::10 and ::11. The VIPs are
//! held by no interface: as with kube-proxy, A's PREROUTING DNAT rewrites
//! them before routing. Nobody has a default route out: the client routes
//! only the VIP range to A, A the pod subnet to B, B the client's subnet to
//! A; pods have a default route to B's bridge, which goes nowhere else.
//!
//! Node A's rules are written by one of four [`Engine`]s, each rewriting the
//! whole of its own rules from the builder's state on every change, as
//! kube-proxy does. Every engine keeps a masquerade rule that matches only
//! marked packets (kube-proxy's `0x4000`): it matches nothing here, but it
//! keeps conntrack on in A when no service has a DNAT rule left.
//!
//! B's neighbour timers on the pod bridge are shortened (reachable 1 s,
//! first probe after 1 s, probes every 0.5 s) so that a vanished pod's
//! neighbour entry fails within seconds instead of half a minute; the
//! kernel's path is the same.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, bail};
use stalewatch::{
    domain::{Entry, Proto},
    source::conntrack::{self, Filter},
};

pub use crate::story::Family;
use crate::{
    netns::{Netns, veth},
    story::{add_addr, attach},
    traffic::{Producer, Receiver, TcpProducer, TcpReceiver},
};

/// What writes node A's DNAT rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Native nftables, one table of plain `dnat` rules in a prerouting
    /// chain (a `numgen` map inside the `dnat` for several backends).
    NftPlain,
    /// kube-proxy's nftables mode: `services` chain with a verdict map on
    /// `daddr . l4proto . dport`, per-service chains with `numgen random
    /// mod N vmap`, per-endpoint chains with `dnat`.
    NftKube,
    /// kube-proxy's iptables mode through iptables-nft (`iptables-restore
    /// --noflush`): KUBE-SERVICES → KUBE-SVC-* (`statistic`) → KUBE-SEP-* DNAT.
    IptablesNftKube,
    /// The same on the legacy x_tables backend.
    IptablesLegacyKube,
}

impl Engine {
    pub const ALL: [Engine; 4] = [
        Engine::NftPlain,
        Engine::NftKube,
        Engine::IptablesNftKube,
        Engine::IptablesLegacyKube,
    ];

    /// A short name, as fixture files use it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::NftPlain => "nft-plain",
            Engine::NftKube => "nft-kube",
            Engine::IptablesNftKube => "iptables-nft-kube",
            Engine::IptablesLegacyKube => "iptables-legacy-kube",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Udp,
    Tcp,
}

impl L4 {
    pub fn name(self) -> &'static str {
        match self {
            L4::Udp => "udp",
            L4::Tcp => "tcp",
        }
    }

    fn proto(self) -> Proto {
        match self {
            L4::Udp => Proto::UDP,
            L4::Tcp => Proto::TCP,
        }
    }
}

/// A Kubernetes Service port as node A's rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// `namespace/name`.
    pub name: &'static str,
    /// The service port's name.
    pub port_name: &'static str,
    pub vip_v4: &'static str,
    pub vip_v6: &'static str,
    pub port: u16,
    /// The port the pods listen on.
    pub target_port: u16,
}

/// The service of issue #15.
pub const DNS: Service = Service {
    name: "kube-system/kube-dns",
    port_name: "dns",
    vip_v4: "10.96.0.10",
    vip_v6: "2001:db8:96::10",
    port: 53,
    target_port: 5353,
};

/// Another service, whose new pod may be given DNS's old address. Its pods
/// listen on the same target port, so a stream still pinned to that address
/// is delivered to them.
pub const METRICS: Service = Service {
    name: "monitoring/metrics",
    port_name: "http",
    vip_v4: "10.96.0.11",
    vip_v6: "2001:db8:96::11",
    port: 8080,
    target_port: 5353,
};

/// How a service's traffic is DNATed. Pods are named by their host number
/// in the pod subnet (7 is 10.244.1.7 or 2001:db8:244:1::7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dnat {
    /// One rule per endpoint, load-balanced when there are several.
    Endpoints(Vec<u8>),
    /// One DNAT to an address range, `first-last`, all at the target port.
    Range(u8, u8),
    /// One DNAT to a pod and a port range `target_port-(target_port+1)`.
    PortRange(u8),
    /// nft only: `dnat to daddr . dport map { VIP . port : pod . target_port }`.
    Map(u8),
}

impl Dnat {
    fn hosts(&self) -> Vec<u8> {
        match self {
            Dnat::Endpoints(h) => h.clone(),
            Dnat::Range(a, b) => (*a..=*b).collect(),
            Dnat::PortRange(h) | Dnat::Map(h) => vec![*h],
        }
    }
}

/// The addresses of one family.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub client: &'static str,
    pub a_client_side: &'static str,
    pub client_prefix: u8,
    pub a_link: &'static str,
    pub b_link: &'static str,
    pub link_prefix: u8,
    pub pod_gw: &'static str,
    /// Pod addresses are this plus the host number.
    pub pod_base: &'static str,
    pub pod_prefix: u8,
    pub pod_subnet: &'static str,
    pub client_subnet: &'static str,
    /// The client routes this to A.
    pub vip_range: &'static str,
}

pub const V4: Plan = Plan {
    client: "192.0.2.2",
    a_client_side: "192.0.2.1",
    client_prefix: 24,
    a_link: "198.51.100.1",
    b_link: "198.51.100.2",
    link_prefix: 24,
    pod_gw: "10.244.1.1",
    pod_base: "10.244.1.",
    pod_prefix: 24,
    pod_subnet: "10.244.1.0/24",
    client_subnet: "192.0.2.0/24",
    vip_range: "10.96.0.0/16",
};

pub const V6: Plan = Plan {
    client: "2001:db8:0:1::2",
    a_client_side: "2001:db8:0:1::1",
    client_prefix: 64,
    a_link: "2001:db8:0:2::1",
    b_link: "2001:db8:0:2::2",
    link_prefix: 64,
    pod_gw: "2001:db8:244:1::1",
    pod_base: "2001:db8:244:1::",
    pod_prefix: 64,
    pod_subnet: "2001:db8:244:1::/64",
    client_subnet: "2001:db8:0:1::/64",
    vip_range: "2001:db8:96::/64",
};

/// The pod bridge on node B.
pub const POD_BRIDGE: &str = "cbr0";

/// The two nodes, the client and the pods; everything is removed on drop
/// (each namespace deletes itself, its links, rules and entries with it).
pub struct Cluster {
    pub engine: Engine,
    pub family: Family,
    pub l4: L4,
    pub plan: Plan,
    pub client: Netns,
    pub node_a: Netns,
    pub node_b: Netns,
    pods: BTreeMap<u8, Netns>,
    /// What A's rules currently say, by service name.
    services: BTreeMap<&'static str, (Service, Dnat)>,
    /// Chains of kube-proxy's layouts written last time, to delete those
    /// that are no longer needed.
    chains: BTreeSet<String>,
    /// Pods whose traffic B counts (a counter rule, kept when the pod goes).
    counted: BTreeSet<u8>,
}

impl Cluster {
    /// Builds the namespaces, links, routes, A's base rules (no service
    /// yet) and B's per-pod counters; no pod runs yet.
    pub fn build(engine: Engine, family: Family, l4: L4) -> anyhow::Result<Cluster> {
        let plan = match family {
            Family::V4 => V4,
            Family::V6 => V6,
        };
        let client = Netns::new("client")?;
        let node_a = Netns::new("nodeA")?;
        let node_b = Netns::new("nodeB")?;
        for ns in [&client, &node_a, &node_b] {
            ns.sysctl("net.ipv6.conf.all.accept_dad=0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad=0")?;
        }
        for ns in [&node_a, &node_b] {
            ns.sysctl("net.ipv4.ip_forward=1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding=1")?;
        }
        veth(&client, "eth0", &node_a, "eth-client")?;
        add_addr(&client, "eth0", plan.client, plan.client_prefix)?;
        add_addr(
            &node_a,
            "eth-client",
            plan.a_client_side,
            plan.client_prefix,
        )?;
        client.ip(&["route", "add", plan.vip_range, "via", plan.a_client_side])?;

        veth(&node_a, "eth-b", &node_b, "eth-a")?;
        add_addr(&node_a, "eth-b", plan.a_link, plan.link_prefix)?;
        add_addr(&node_b, "eth-a", plan.b_link, plan.link_prefix)?;
        node_a.ip(&["route", "add", plan.pod_subnet, "via", plan.b_link])?;
        node_b.ip(&["route", "add", plan.client_subnet, "via", plan.a_link])?;

        node_b.ip(&["link", "add", POD_BRIDGE, "type", "bridge"])?;
        node_b.ip(&["link", "set", POD_BRIDGE, "up"])?;
        add_addr(&node_b, POD_BRIDGE, plan.pod_gw, plan.pod_prefix)?;
        for fam in ["ipv4", "ipv6"] {
            for (key, value) in [
                ("base_reachable_time_ms", "1000"),
                ("delay_first_probe_time", "1"),
                ("retrans_time_ms", "500"),
            ] {
                node_b.sysctl(&format!("net.{fam}.neigh.{POD_BRIDGE}.{key}={value}"))?;
            }
        }
        let t = match family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        };
        node_b.exec(&[
            "nft",
            &format!(
                "add table {t} podcount; add chain {t} podcount forward {{ type filter hook forward priority 0; policy accept; }}"
            ),
        ])?;

        let mut cluster = Cluster {
            engine,
            family,
            l4,
            plan,
            client,
            node_a,
            node_b,
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            chains: BTreeSet::new(),
            counted: BTreeSet::new(),
        };
        cluster.write_base_rules()?;
        cluster.write_rules()?;
        Ok(cluster)
    }

    // ---- addresses ----

    fn ip_family(&self) -> &'static str {
        match self.family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    pub fn pod_ip(&self, host: u8) -> IpAddr {
        format!("{}{host}", self.plan.pod_base)
            .parse()
            .expect("pod address")
    }

    pub fn vip_ip(&self, svc: &Service) -> IpAddr {
        match self.family {
            Family::V4 => svc.vip_v4,
            Family::V6 => svc.vip_v6,
        }
        .parse()
        .expect("VIP")
    }

    /// Where the client sends: the service's VIP and port.
    pub fn vip(&self, svc: &Service) -> SocketAddr {
        SocketAddr::new(self.vip_ip(svc), svc.port)
    }

    pub fn client_addr(&self, sport: u16) -> SocketAddr {
        SocketAddr::new(self.plan.client.parse().expect("client"), sport)
    }

    /// `addr` or `[addr]`, as DNAT targets write it.
    fn bracket(&self, addr: IpAddr) -> String {
        match addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        }
    }

    fn host_prefix(&self) -> u8 {
        match self.family {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    // ---- pods ----

    /// Starts a pod: a namespace on B's bridge holding `10.244.1.<host>`.
    pub fn start_pod(&mut self, host: u8) -> anyhow::Result<&Netns> {
        if !self.pods.contains_key(&host) {
            let ns = Netns::new(&format!("pod{host}"))?;
            ns.sysctl("net.ipv6.conf.all.accept_dad=0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad=0")?;
            let addr = self.pod_ip(host).to_string();
            attach(
                &self.node_b,
                POD_BRIDGE,
                &ns,
                &format!("veth{host}"),
                (&addr, self.plan.pod_prefix, self.plan.pod_gw),
            )?;
            self.pods.insert(host, ns);
        }
        if self.counted.insert(host) {
            let t = self.ip_family();
            let addr = self.pod_ip(host);
            self.node_b.exec(&[
                "nft",
                &format!(
                    "add rule {t} podcount forward {t} daddr {addr} counter comment \"pod-{host}\""
                ),
            ])?;
        }
        Ok(&self.pods[&host])
    }

    /// The pod's namespace; panics when it does not run.
    pub fn pod(&self, host: u8) -> &Netns {
        self.pods
            .get(&host)
            .unwrap_or_else(|| panic!("no pod {host}"))
    }

    /// Deletes the pod: its link on B's bridge goes at once (a socket still
    /// open in the pod's namespace would keep the namespace, and the link
    /// with it, alive), then the namespace. Its address is then held by
    /// nobody.
    pub fn stop_pod(&mut self, host: u8) {
        if self.pods.remove(&host).is_some() {
            let _ = self.node_b.ip(&["link", "del", &format!("veth{host}")]);
        }
    }

    /// A UDP receiver on the pod's target port.
    pub fn udp_receiver(&self, host: u8, svc: &Service) -> anyhow::Result<Receiver> {
        Receiver::start(self.pod(host), svc.target_port)
    }

    pub fn tcp_receiver(&self, host: u8, svc: &Service) -> anyhow::Result<TcpReceiver> {
        TcpReceiver::start(self.pod(host), svc.target_port)
    }

    // ---- traffic ----

    /// The client streams UDP to the service's VIP from one source port.
    pub fn producer(
        &self,
        svc: &Service,
        sport: u16,
        every: Duration,
        max: u64,
        limit: Duration,
    ) -> anyhow::Result<Producer> {
        Producer::start(
            &self.client,
            self.client_addr(sport),
            self.vip(svc),
            every,
            max,
            limit,
        )
    }

    /// The client holds one TCP connection to the VIP from `sport`.
    pub fn tcp_producer(
        &self,
        svc: &Service,
        sport: u16,
        every: Duration,
        limit: Duration,
    ) -> anyhow::Result<TcpProducer> {
        TcpProducer::start(
            &self.client,
            self.client_addr(sport),
            self.vip(svc),
            every,
            limit,
        )
    }

    // ---- the services' lifecycle ----

    /// Writes (or rewrites) the service's rules.
    pub fn set_service(&mut self, svc: &Service, dnat: Dnat) -> anyhow::Result<()> {
        if matches!(dnat, Dnat::Map(_))
            && matches!(
                self.engine,
                Engine::IptablesNftKube | Engine::IptablesLegacyKube
            )
        {
            bail!("iptables has no DNAT maps");
        }
        self.services.insert(svc.name, (*svc, dnat));
        self.write_rules()
    }

    /// Removes every rule of the service (scaled to zero, or deleted).
    pub fn remove_service(&mut self, svc: &Service) -> anyhow::Result<()> {
        self.services.remove(svc.name);
        self.write_rules()
    }

    /// Starts pod `host` and points the service at it alone.
    pub fn deploy(&mut self, svc: &Service, host: u8) -> anyhow::Result<()> {
        self.start_pod(host)?;
        self.set_service(svc, Dnat::Endpoints(vec![host]))
    }

    /// The pod is replaced: `to` starts, the rules now DNAT to it, and pod
    /// `from` is deleted. Conntrack entries are left alone, as kube-proxy
    /// leaves UDP entries of a service whose endpoint is replaced.
    pub fn move_backend(&mut self, svc: &Service, from: u8, to: u8) -> anyhow::Result<()> {
        self.start_pod(to)?;
        self.set_service(svc, Dnat::Endpoints(vec![to]))?;
        self.stop_pod(from);
        Ok(())
    }

    /// No endpoint is left: the service's rules go and so do its pods.
    pub fn scale_to_zero(&mut self, svc: &Service) -> anyhow::Result<()> {
        let hosts = self
            .services
            .get(svc.name)
            .map(|(_, d)| d.hosts())
            .unwrap_or_default();
        self.remove_service(svc)?;
        for h in hosts {
            if !self.serves_elsewhere(svc, h) {
                self.stop_pod(h);
            }
        }
        Ok(())
    }

    /// The (now free) address of `host` goes to a new pod of `other`,
    /// which gets rules of its own.
    pub fn reuse_address(&mut self, host: u8, other: &Service) -> anyhow::Result<()> {
        self.start_pod(host)?;
        self.set_service(other, Dnat::Endpoints(vec![host]))
    }

    /// Removes one endpoint of a load-balanced service and deletes its pod.
    pub fn remove_endpoint(&mut self, svc: &Service, host: u8) -> anyhow::Result<()> {
        let (_, dnat) = self
            .services
            .get(svc.name)
            .context("no such service")?
            .clone();
        let rest: Vec<u8> = dnat.hosts().into_iter().filter(|h| *h != host).collect();
        self.set_service(svc, Dnat::Endpoints(rest))?;
        self.stop_pod(host);
        Ok(())
    }

    fn serves_elsewhere(&self, svc: &Service, host: u8) -> bool {
        self.services
            .values()
            .any(|(s, d)| s.name != svc.name && d.hosts().contains(&host))
    }

    // ---- what the nodes show ----

    /// Node A's conntrack entries of this cluster's family and protocol.
    pub fn conntrack(&self) -> anyhow::Result<Vec<Entry>> {
        let filter = Filter {
            family: Some(match self.family {
                Family::V4 => stalewatch::domain::Family::Ipv4,
                Family::V6 => stalewatch::domain::Family::Ipv6,
            }),
            proto: Some(self.l4.proto()),
            ..Filter::default()
        };
        Ok(conntrack::dump(Some(&self.node_a.path()), &filter)?)
    }

    /// A's entry of the client's flow from `sport`.
    pub fn entry_from(&self, sport: u16) -> anyhow::Result<Option<Entry>> {
        let client = self.client_addr(sport);
        Ok(self
            .conntrack()?
            .into_iter()
            .find(|e| e.orig.src == client.ip() && e.orig.sport == sport))
    }

    /// The backend A's entry of the flow from `sport` is pinned to: the
    /// reply direction's source.
    pub fn pinned_backend(&self, sport: u16) -> anyhow::Result<Option<IpAddr>> {
        Ok(self.entry_from(sport)?.map(|e| e.reply.src))
    }

    /// Packets B has forwarded towards pod `host` (counted from the first
    /// time the pod started, also after it is gone).
    pub fn forwarded_to(&self, host: u8) -> anyhow::Result<u64> {
        let out = self.node_b.exec(&[
            "nft",
            "-j",
            "list",
            "chain",
            self.ip_family(),
            "podcount",
            "forward",
        ])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        let want = format!("pod-{host}");
        let rules = json["nftables"].as_array().context("nftables")?;
        for rule in rules.iter().filter_map(|o| o.get("rule")) {
            if rule["comment"] == want.as_str() {
                let exprs = rule["expr"].as_array().context("expr")?;
                for e in exprs {
                    if let Some(n) = e["counter"]["packets"].as_u64() {
                        return Ok(n);
                    }
                }
            }
        }
        Ok(0)
    }

    /// The state of B's neighbour entry for pod `host` (`REACHABLE`,
    /// `FAILED`, ...), if there is one.
    pub fn neighbour_state(&self, host: u8) -> anyhow::Result<Option<String>> {
        let addr = self.pod_ip(host).to_string();
        let out = self
            .node_b
            .ip(&["-j", "neigh", "show", &addr, "dev", POD_BRIDGE])?;
        let json: serde_json::Value =
            serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?;
        Ok(json
            .as_array()
            .and_then(|a| a.first())
            .and_then(|n| n["state"].as_array())
            .and_then(|s| s.first())
            .and_then(|s| s.as_str())
            .map(str::to_owned))
    }

    /// Node A's rules, as the tools print them.
    pub fn capture(&self) -> anyhow::Result<Capture> {
        let a = &self.node_a;
        let (nft_save, legacy_save) = match self.family {
            Family::V4 => ("iptables-nft-save", "iptables-legacy-save"),
            Family::V6 => ("ip6tables-nft-save", "ip6tables-legacy-save"),
        };
        Ok(Capture {
            nft_json: a.exec(&["nft", "-j", "list", "ruleset"])?,
            iptables_nft_save: a.exec(&[nft_save, "-t", "nat"])?,
            iptables_legacy_save: a.exec(&[legacy_save, "-t", "nat"])?,
        })
    }
}

/// What node A's tools print, for the intent reader's fixtures.
#[derive(Debug)]
pub struct Capture {
    /// `nft -j list ruleset`.
    pub nft_json: String,
    /// `iptables-nft-save -t nat` (`ip6tables-nft-save` for IPv6).
    pub iptables_nft_save: String,
    /// `iptables-legacy-save -t nat` (`ip6tables-legacy-save` for IPv6).
    pub iptables_legacy_save: String,
}

// ---- rule writing ----

impl Cluster {
    fn ipt_bins(&self) -> (&'static str, &'static str) {
        match (self.engine, self.family) {
            (Engine::IptablesLegacyKube, Family::V4) => {
                ("iptables-legacy", "iptables-legacy-restore")
            }
            (Engine::IptablesLegacyKube, Family::V6) => {
                ("ip6tables-legacy", "ip6tables-legacy-restore")
            }
            (_, Family::V4) => ("iptables-nft", "iptables-nft-restore"),
            (_, Family::V6) => ("ip6tables-nft", "ip6tables-nft-restore"),
        }
    }

    /// What exists once: kube-proxy's jumps from the built-in chains (for
    /// the iptables engines; the nft engines write their base chains with
    /// every rewrite).
    fn write_base_rules(&self) -> anyhow::Result<()> {
        if let Engine::IptablesNftKube | Engine::IptablesLegacyKube = self.engine {
            let (_, restore) = self.ipt_bins();
            let input = "*nat\n\
                :KUBE-SERVICES - [0:0]\n\
                :KUBE-POSTROUTING - [0:0]\n\
                -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
                COMMIT\n";
            self.node_a
                .exec_input(&[restore, "-w", "--noflush"], input)?;
        }
        Ok(())
    }

    /// Rewrites all of A's service rules from `self.services`, in one
    /// transaction.
    fn write_rules(&mut self) -> anyhow::Result<()> {
        match self.engine {
            Engine::NftPlain => {
                let script = self.nft_plain();
                self.node_a.exec_input(&["nft", "-f", "-"], &script)?;
            }
            Engine::NftKube => {
                let (script, chains) = self.nft_kube();
                self.node_a.exec_input(&["nft", "-f", "-"], &script)?;
                self.chains = chains;
            }
            Engine::IptablesNftKube | Engine::IptablesLegacyKube => {
                let (input, chains) = self.iptables_kube();
                let (_, restore) = self.ipt_bins();
                self.node_a
                    .exec_input(&[restore, "-w", "--noflush"], &input)?;
                self.chains = chains;
            }
        }
        Ok(())
    }

    /// The DNAT statement's target for nft (`to ...`, or a map).
    fn nft_dnat(&self, svc: &Service, dnat: &Dnat) -> String {
        let t = self.ip_family();
        let port = svc.target_port;
        match dnat {
            Dnat::Endpoints(hosts) if hosts.len() == 1 => {
                format!("dnat {t} to {}:{port}", self.bracket(self.pod_ip(hosts[0])))
            }
            Dnat::Endpoints(hosts) => {
                let elements: Vec<String> = hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| format!("{i} : {}", self.pod_ip(*h)))
                    .collect();
                format!(
                    "dnat {t} to numgen random mod {} map {{ {} }} : {port}",
                    hosts.len(),
                    elements.join(", ")
                )
            }
            Dnat::Range(a, b) => format!(
                "dnat {t} to {}-{}:{port}",
                self.bracket(self.pod_ip(*a)),
                self.bracket(self.pod_ip(*b))
            ),
            Dnat::PortRange(h) => format!(
                "dnat {t} to {}:{port}-{}",
                self.bracket(self.pod_ip(*h)),
                port + 1
            ),
            Dnat::Map(h) => format!(
                "dnat {t} to {t} daddr . {l4} dport map {{ {vip} . {} : {} . {port} }}",
                svc.port,
                self.pod_ip(*h),
                l4 = self.l4.name(),
                vip = self.vip_ip(svc),
            ),
        }
    }

    /// Native nftables: `table ip|ip6 stalewatch-nat`, one rule per
    /// service in prerouting.
    fn nft_plain(&self) -> String {
        let t = self.ip_family();
        let l4 = self.l4.name();
        let mut s = format!(
            "table {t} stalewatch-nat {{\n\
             \tchain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             }}\n\
             flush table {t} stalewatch-nat\n\
             add rule {t} stalewatch-nat postrouting meta mark & 0x4000 == 0x4000 masquerade\n"
        );
        for (svc, dnat) in self.services.values() {
            if dnat.hosts().is_empty() {
                continue;
            }
            s += &format!(
                "add rule {t} stalewatch-nat prerouting {t} daddr {} {l4} dport {} {}\n",
                self.vip_ip(svc),
                svc.port,
                self.nft_dnat(svc, dnat)
            );
        }
        s
    }

    /// kube-proxy's nftables layout (`table ip|ip6 kube-proxy`).
    fn nft_kube(&self) -> (String, BTreeSet<String>) {
        let t = self.ip_family();
        let l4 = self.l4.name();
        let addr_type = match self.family {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        };
        let mut s = format!(
            "table {t} kube-proxy {{\n\
             \tcomment \"rules for kube-proxy\"\n\
             \tmap service-ips {{ type {addr_type} . inet_proto . inet_service : verdict; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"; }}\n\
             \tchain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             \tchain nat-output {{ type nat hook output priority -100; policy accept; }}\n\
             \tchain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             \tchain masquerading {{ }}\n\
             \tchain mark-for-masquerade {{ }}\n\
             \tchain services {{ }}\n\
             }}\n\
             flush table {t} kube-proxy\n\
             flush map {t} kube-proxy service-ips\n"
        );
        // Every rule is gone now, so the chains of the last write can go.
        for chain in &self.chains {
            s += &format!("delete chain {t} kube-proxy {chain}\n");
        }
        let rule = |chain: &str, body: &str| format!("add rule {t} kube-proxy {chain} {body}\n");
        s += &rule("nat-prerouting", "jump services");
        s += &rule("nat-output", "jump services");
        s += &rule("nat-postrouting", "jump masquerading");
        s += &rule("masquerading", "meta mark & 0x00004000 == 0 return");
        s += &rule("masquerading", "meta mark set meta mark ^ 0x00004000");
        s += &rule("masquerading", "masquerade fully-random");
        s += &rule(
            "mark-for-masquerade",
            "meta mark set meta mark | 0x00004000",
        );
        s += &rule(
            "services",
            &format!("{t} daddr . meta l4proto . th dport vmap @service-ips"),
        );
        let mut chains = BTreeSet::new();
        for (svc, dnat) in self.services.values() {
            let hosts = dnat.hosts();
            if hosts.is_empty() {
                continue;
            }
            let port_name = format!("{}/{l4}/{}", svc.name, svc.port_name);
            let svc_chain = format!("service-{}-{port_name}", &kube_hash(&port_name)[..8]);
            // One endpoint chain per endpoint; a range, port range or map
            // is one endpoint chain holding that DNAT.
            let endpoints: Vec<(String, Dnat)> = match dnat {
                Dnat::Endpoints(hosts) => hosts
                    .iter()
                    .map(|h| {
                        (
                            format!("{}/{}", self.pod_ip(*h), svc.target_port),
                            Dnat::Endpoints(vec![*h]),
                        )
                    })
                    .collect(),
                other => vec![(
                    format!("{}/{}", self.pod_ip(hosts[0]), svc.target_port),
                    other.clone(),
                )],
            };
            s += &format!("add chain {t} kube-proxy {svc_chain}\n");
            chains.insert(svc_chain.clone());
            let mut vmap = Vec::new();
            for (i, (endpoint, dnat)) in endpoints.iter().enumerate() {
                let base = format!("{port_name}__{endpoint}");
                // nft chain names take no ':'.
                let chain = format!("endpoint-{}-{base}", &kube_hash(&base)[..8]).replace(':', ".");
                s += &format!("add chain {t} kube-proxy {chain}\n");
                let first = self.pod_ip(dnat.hosts()[0]);
                s += &rule(
                    &chain,
                    &format!("{t} saddr {first} jump mark-for-masquerade"),
                );
                s += &rule(
                    &chain,
                    &format!("meta l4proto {l4} {}", self.nft_dnat(svc, dnat)),
                );
                vmap.push(format!("{i} : goto {chain}"));
                chains.insert(chain);
            }
            // kube-proxy adds `daddr . dport saddr != <cluster CIDR> jump
            // mark-for-masquerade` here only with a cluster CIDR configured;
            // without it the client's address reaches the pods, as here.
            s += &rule(
                &svc_chain,
                &format!(
                    "numgen random mod {} vmap {{ {} }}",
                    vmap.len(),
                    vmap.join(", ")
                ),
            );
            s += &format!(
                "add element {t} kube-proxy service-ips {{ {} . {l4} . {} : goto {svc_chain} }}\n",
                self.vip_ip(svc),
                svc.port
            );
        }
        (s, chains)
    }

    /// kube-proxy's iptables layout, as one `iptables-restore --noflush`
    /// input: every chain it owns is declared (which flushes it) and
    /// refilled; chains of the last write that are gone are deleted.
    fn iptables_kube(&self) -> (String, BTreeSet<String>) {
        let l4 = self.l4.name();
        let hp = self.host_prefix();
        let mut chains = BTreeSet::new();
        let mut rules = Vec::new();
        for (svc, dnat) in self.services.values() {
            let hosts = dnat.hosts();
            if hosts.is_empty() {
                continue;
            }
            let port_name = format!("{}:{}", svc.name, svc.port_name);
            let svc_chain = format!("KUBE-SVC-{}", kube_hash(&format!("{port_name}{l4}")));
            chains.insert(svc_chain.clone());
            rules.push(format!(
                "-A KUBE-SERVICES -d {vip}/{hp} -p {l4} -m comment --comment \"{port_name} cluster IP\" -m {l4} --dport {port} -j {svc_chain}",
                vip = self.vip_ip(svc),
                port = svc.port,
            ));
            let port = svc.target_port;
            let endpoints: Vec<(u8, String)> = match dnat {
                Dnat::Endpoints(hosts) => hosts
                    .iter()
                    .map(|h| (*h, format!("{}:{port}", self.bracket(self.pod_ip(*h)))))
                    .collect(),
                Dnat::Range(a, b) => vec![(
                    *a,
                    format!(
                        "{}-{}:{port}",
                        self.bracket(self.pod_ip(*a)),
                        self.bracket(self.pod_ip(*b))
                    ),
                )],
                Dnat::PortRange(h) => vec![(
                    *h,
                    format!("{}:{port}-{}", self.bracket(self.pod_ip(*h)), port + 1),
                )],
                Dnat::Map(_) => unreachable!("refused by set_service"),
            };
            let n = endpoints.len();
            for (i, (host, to)) in endpoints.iter().enumerate() {
                let sep = format!("KUBE-SEP-{}", kube_hash(&format!("{port_name}{l4}{to}")));
                chains.insert(sep.clone());
                // kube-proxy's probabilities: 1/(n-i) for all but the last.
                let statistic = if i + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {:.11}",
                        1.0 / (n - i) as f64
                    )
                } else {
                    String::new()
                };
                rules.push(format!(
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {to}\"{statistic} -j {sep}"
                ));
                rules.push(format!(
                    "-A {sep} -s {}/{hp} -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ",
                    self.pod_ip(*host)
                ));
                rules.push(format!(
                    "-A {sep} -p {l4} -m comment --comment \"{port_name}\" -m {l4} -j DNAT --to-destination {to}"
                ));
            }
        }
        let gone: Vec<&String> = self.chains.difference(&chains).collect();
        let mut s = String::from("*nat\n");
        // Chains to be deleted are declared too, which flushes them: a
        // chain must be empty to go (kube-proxy does the same).
        for chain in ["KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"]
            .into_iter()
            .map(str::to_owned)
            .chain(chains.iter().cloned())
            .chain(gone.iter().map(|c| c.to_string()))
        {
            s += &format!(":{chain} - [0:0]\n");
        }
        s += "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n";
        s += "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n";
        s += "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n";
        s += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
        for r in rules {
            s += &r;
            s.push('\n');
        }
        for chain in gone {
            s += &format!("-X {chain}\n");
        }
        s += "COMMIT\n";
        (s, chains)
    }
}

/// A stand-in for kube-proxy's chain-name hash (sha256, base32, 16
/// characters): stable, 16 characters of base32.
fn kube_hash(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        s.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x8422_2325_cbf2_9ce4));
    (0..16)
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}
