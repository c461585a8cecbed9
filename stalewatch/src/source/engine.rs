//! The container engines, where they answer on their sockets with the
//! Docker Engine API: Docker's daemon, and Podman's API service (`podman
//! system service`, which speaks the same API, version 1.41). Which
//! container an address or a network namespace belongs to, and which ports
//! an engine publishes. Records name containers with what they tell
//! ([`Snapshot::containers`]); a host running both has each container
//! attributed to the engine that runs it, so a flow is named by the engine
//! whose network holds its address. Without an engine everything works as
//! before, with namespace inodes and names only.
//!
//! The Engine API client (bollard) is async; `watch` runs a current-thread
//! runtime and `check` none. So [`Engine`] owns a small runtime of its own
//! and drives it from a short-lived scoped thread: a runtime cannot be
//! blocked on from inside another one, and a fresh thread is inside none.
//! Lookups read a cached snapshot, fetched again at most every
//! [`REFRESH`], and only when something asks.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    domain::{
        Backend, ContainerRef, Containers, EngineKind, NetnsInfo, Proto, Publication, Service,
        Tuple,
    },
    error::chain,
};
use bollard::{
    Docker,
    models::{ContainerSummary, PortSummaryTypeEnum},
};

/// Where engines answer unless told otherwise: Docker's daemon, and
/// Podman's API service run as root (its `podman.socket` unit, or `podman
/// system service`). `DOCKER_HOST` (a `unix://` path) is asked first.
pub const SOCKETS: &[&str] = &["/var/run/docker.sock", "/run/podman/podman.sock"];
/// Podman's socket, for the hint given when Podman runs without it.
const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
/// Least time between two snapshots of the engine.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How long one exchange with the engine may take.
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a removed container is remembered: a stale entry is pinned to a
/// container that is gone, and its name is what tells a person which one.
const REMEMBER_GONE: Duration = Duration::from_secs(600);

/// The compose labels: docker-compose's, and podman-compose's own (it sets
/// both in its recent versions, only its own in older ones).
const COMPOSE_PROJECT: &[&str] = &["com.docker.compose.project", "io.podman.compose.project"];
const COMPOSE_SERVICE: &[&str] = &["com.docker.compose.service", "io.podman.compose.service"];

/// A port the engine publishes on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub proto: Proto,
    /// The host address it is bound to; `None` for every address.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
}

/// What the engine tells of one running container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub container: ContainerRef,
    /// Its addresses on every network it is attached to.
    pub ips: Vec<IpAddr>,
    /// The inode of its network namespace (from SandboxKey).
    pub netns: Option<u32>,
    pub published: Vec<Published>,
}

impl Container {
    /// From a `GET /containers/json` row and the container's SandboxKey
    /// (only `GET /containers/{id}/json` has that).
    pub fn from_summary(
        engine: EngineKind,
        summary: &ContainerSummary,
        netns: Option<u32>,
    ) -> Option<Container> {
        let id = summary.id.as_deref()?;
        let name = summary
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map_or(id, |n| n.trim_start_matches('/'));
        let label = |keys: &[&str]| {
            let labels = summary.labels.as_ref()?;
            keys.iter().find_map(|k| labels.get(*k)).cloned()
        };
        let mut ips: Vec<IpAddr> = summary
            .network_settings
            .iter()
            .flat_map(|n| n.networks.iter().flatten())
            .flat_map(|(_, ep)| [&ep.ip_address, &ep.global_ipv6_address])
            .filter_map(|ip| ip.as_deref()?.parse().ok())
            .collect();
        ips.sort();
        ips.dedup();
        let mut published: Vec<Published> = summary
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let proto = match p.typ? {
                    PortSummaryTypeEnum::TCP => Proto::TCP,
                    PortSummaryTypeEnum::UDP => Proto::UDP,
                    PortSummaryTypeEnum::SCTP => Proto::SCTP,
                    PortSummaryTypeEnum::EMPTY => return None,
                };
                let host_ip =
                    p.ip.as_deref()
                        .and_then(|ip| ip.parse::<IpAddr>().ok())
                        .filter(|ip| !ip.is_unspecified());
                Some(Published {
                    proto,
                    host_ip,
                    host_port: p.public_port?,
                    container_port: p.private_port,
                })
            })
            .collect();
        // The engine lists a port once per address family it binds.
        published.sort_by_key(|p| (p.proto, p.host_port, p.container_port, p.host_ip));
        published.dedup();
        Some(Container {
            container: ContainerRef {
                name: name.to_owned(),
                id: id.chars().take(12).collect(),
                compose_project: label(COMPOSE_PROJECT),
                compose_service: label(COMPOSE_SERVICE),
                engine: Some(engine),
                gone: false,
            },
            ips,
            netns,
            published,
        })
    }
}

/// The engine's containers at one moment, with those seen earlier that are
/// gone since.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub running: Vec<Container>,
    /// Removed containers by address, with when they were last seen.
    pub gone: HashMap<IpAddr, (ContainerRef, Instant)>,
}

impl Snapshot {
    /// The next snapshot: `running` now, and whatever of `self` is gone.
    fn next(&self, running: Vec<Container>, now: Instant) -> Snapshot {
        let mut gone = self.gone.clone();
        for old in &self.running {
            if running.iter().all(|c| c.container.id != old.container.id) {
                let container = ContainerRef {
                    gone: true,
                    ..old.container.clone()
                };
                for ip in &old.ips {
                    gone.insert(*ip, (container.clone(), now));
                }
            }
        }
        gone.retain(|_, (_, seen)| now.duration_since(*seen) < REMEMBER_GONE);
        Snapshot { running, gone }
    }

    /// The container with address `ip`: a running one, else one that had it
    /// before it was removed.
    pub fn by_ip(&self, ip: IpAddr) -> Option<ContainerRef> {
        self.running
            .iter()
            .find(|c| c.ips.contains(&ip))
            .map(|c| c.container.clone())
            .or_else(|| self.gone.get(&ip).map(|(c, _)| c.clone()))
    }

    pub fn by_netns(&self, inode: u32) -> Option<ContainerRef> {
        self.running
            .iter()
            .find(|c| c.netns == Some(inode))
            .map(|c| c.container.clone())
    }

    /// Whether a running container has address `ip`.
    pub fn is_container(&self, ip: IpAddr) -> bool {
        self.running.iter().any(|c| c.ips.contains(&ip))
    }

    /// The running containers that publish `proto` port `port` on host
    /// address `addr`, with their port inside.
    pub fn publishers(&self, proto: Proto, addr: IpAddr, port: u16) -> Vec<(&Container, u16)> {
        self.running
            .iter()
            .filter_map(|c| {
                let p = c.published.iter().find(|p| {
                    p.proto == proto && p.host_port == port && p.host_ip.is_none_or(|ip| ip == addr)
                })?;
                Some((c, p.container_port))
            })
            .collect()
    }

    /// Whether the engine's own rules deliver `orig` to the host by design:
    /// it comes from a container, and Docker returns traffic that enters
    /// from its bridges to the userland proxy instead of DNATing it. Such a
    /// flow has no NAT however often its entry is deleted: it is no bypass.
    pub fn served_by_proxy(&self, orig: &Tuple) -> bool {
        self.proxied().any(|c| c.ips.contains(&orig.src))
    }

    /// Every address of a running Docker container: the sources whose
    /// flows the engine's rules deliver to the host by design (see
    /// [`Snapshot::served_by_proxy`]). Podman's netavark DNATs a
    /// container's traffic to a published port like anyone's.
    pub fn container_addresses(&self) -> HashSet<IpAddr> {
        self.proxied().flat_map(|c| c.ips.iter().copied()).collect()
    }

    /// The containers of engines that return their own containers' traffic
    /// to published ports to a userland proxy: Docker's.
    fn proxied(&self) -> impl Iterator<Item = &Container> {
        self.running
            .iter()
            .filter(|c| c.container.engine == Some(EngineKind::Docker))
    }

    /// One snapshot of several engines' containers.
    fn merge<'a>(all: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
        let mut merged = Snapshot::default();
        for s in all {
            merged.running.extend(s.running.iter().cloned());
            merged
                .gone
                .extend(s.gone.iter().map(|(ip, g)| (*ip, g.clone())));
        }
        merged
    }

    /// The containers behind one record: its namespace's, where its entry
    /// sends it (`stale`), where new flows go (`current`), and those that
    /// publish its destination port on this host. Addresses are the
    /// engine's only in the host's namespace, where its bridges are.
    pub fn containers(
        &self,
        netns: &NetnsInfo,
        service: Service,
        stale: Backend,
        current: Option<Backend>,
    ) -> Containers {
        if !netns.is_own {
            return Containers {
                netns: self.by_netns(netns.inode),
                ..Containers::default()
            };
        }
        let publishers = self
            .publishers(service.proto, service.addr, service.port)
            .into_iter()
            .map(|(c, port)| {
                // The address new flows go to, where it is this container's.
                let ip = current
                    .map(|b| b.addr)
                    .filter(|ip| c.ips.contains(ip))
                    .or_else(|| {
                        c.ips
                            .iter()
                            .copied()
                            .find(|ip| ip.is_ipv4() == service.addr.is_ipv4())
                    });
                Publication {
                    container: c.container.clone(),
                    at: ip.map(|ip| Backend::new(ip, port)),
                }
            })
            .collect();
        Containers {
            netns: None,
            stale: self.by_ip(stale.addr),
            current: current.and_then(|b| self.by_ip(b.addr)),
            publishers,
            holder: None,
        }
    }
}

/// One connected engine, with its latest snapshot.
struct Client {
    kind: EngineKind,
    socket: String,
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    docker: Docker,
    cache: Mutex<(Instant, Arc<Snapshot>)>,
}

impl Client {
    /// Connects to the engine on `socket`; `None`, with one log line,
    /// where none answers.
    fn connect(socket: &str) -> Option<Client> {
        if !Path::new(socket).exists() {
            log::debug!("no container engine: {socket} does not exist");
            return None;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| log::info!("no container engine: {}", chain(&Error::Runtime(e))))
            .ok()?;
        let (docker, kind) = on_runtime(&runtime, async {
            let docker =
                Docker::connect_with_unix(socket, TIMEOUT.as_secs(), bollard::API_DEFAULT_VERSION)?;
            // Settles on the engine's own API version (1.41 for 20.10 and
            // for Podman 4).
            let docker = docker.negotiate_version().await?;
            let version = docker.version().await?;
            let podman = version
                .components
                .iter()
                .flatten()
                .any(|c| c.name.starts_with("Podman"));
            let kind = if podman {
                EngineKind::Podman
            } else {
                EngineKind::Docker
            };
            Ok((docker, kind))
        })
        .map_err(|e| log::info!("no container engine on {socket}: {}", chain(&e)))
        .ok()?;
        let running = on_runtime(&runtime, fetch(&docker, kind))
            .map_err(|e| log::info!("no {} engine on {socket}: {}", kind.name(), chain(&e)))
            .ok()?;
        log::info!(
            "{} engine on {socket}: {} running containers",
            kind.name(),
            running.len()
        );
        let snapshot = Snapshot::default().next(running, Instant::now());
        Some(Client {
            kind,
            socket: socket.to_owned(),
            runtime: Some(runtime),
            docker,
            cache: Mutex::new((Instant::now(), Arc::new(snapshot))),
        })
    }

    /// The latest snapshot, fetched again when older than [`REFRESH`]. An
    /// engine that stops answering leaves the previous one in place.
    fn snapshot(&self) -> Arc<Snapshot> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.elapsed() >= REFRESH {
            let runtime = self.runtime.as_ref().expect("a runtime until dropped");
            match on_runtime(runtime, fetch(&self.docker, self.kind)) {
                Ok(running) => cache.1 = Arc::new(cache.1.next(running, Instant::now())),
                Err(e) => log::debug!(
                    "{} engine on {}: {}",
                    self.kind.name(),
                    self.socket,
                    chain(&e)
                ),
            }
            cache.0 = Instant::now();
        }
        cache.1.clone()
    }
}

/// The host's container engines that answer: one or several.
pub struct Engine {
    clients: Vec<Client>,
}

impl Engine {
    /// Connects to every engine that answers: on `sockets` when given
    /// (paths, or `unix://` addresses), else on `DOCKER_HOST` where it is a
    /// `unix://` one and on [`SOCKETS`]. A socket reached twice (Podman's
    /// `podman-docker` links Docker's path to its own) is asked once.
    /// `None` where none answers; where Podman is installed without its
    /// API service, the log says once how to have its containers named.
    pub fn connect(sockets: &[String]) -> Option<Engine> {
        let wanted: Vec<String> = if sockets.is_empty() {
            let from_env = std::env::var("DOCKER_HOST")
                .ok()
                .filter(|h| h.starts_with("unix://"));
            from_env
                .into_iter()
                .chain(SOCKETS.iter().map(|s| (*s).to_owned()))
                .collect()
        } else {
            sockets.to_vec()
        };
        let mut seen = HashSet::new();
        let mut clients = Vec::new();
        for socket in wanted
            .iter()
            .map(|s| s.strip_prefix("unix://").unwrap_or(s))
            .filter(|s| seen.insert(std::fs::canonicalize(s).unwrap_or_else(|_| s.into())))
        {
            match Client::connect(socket) {
                Some(client) => clients.push(client),
                // Asked for by name: say so whatever the log level.
                None if !sockets.is_empty() => log::warn!(
                    "--engine-socket {socket}: no container engine answers there (a unix \
                     socket path is expected)"
                ),
                None => {}
            }
        }
        if sockets.is_empty()
            && !clients.iter().any(|c| c.kind == EngineKind::Podman)
            && podman_installed()
        {
            // Said whatever the log level: a hint, not a fault.
            eprintln!(
                "stalewatch: Podman is installed, but its API service does not answer on \
                 {PODMAN_SOCKET}: \
                 its containers are named by their network namespaces only. To name them, run \
                 `systemctl enable --now podman.socket` (or `podman system service --time=0 \
                 unix://{PODMAN_SOCKET} &`)"
            );
        }
        (!clients.is_empty()).then_some(Engine { clients })
    }

    /// The engines' containers now (see [`Client::snapshot`]), as one.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.clients.as_slice() {
            [one] => one.snapshot(),
            all => {
                let snapshots: Vec<Arc<Snapshot>> = all.iter().map(Client::snapshot).collect();
                Arc::new(Snapshot::merge(snapshots.iter().map(|s| &**s)))
            }
        }
    }

    /// See [`Snapshot::served_by_proxy`].
    pub fn served_by_proxy(&self, orig: &Tuple) -> bool {
        self.snapshot().served_by_proxy(orig)
    }
}

/// Whether Podman is installed on this host (rootful): its binary, or its
/// storage.
fn podman_installed() -> bool {
    ["/usr/bin/podman", "/var/lib/containers/storage"]
        .iter()
        .any(|p| Path::new(p).exists())
}

impl Drop for Client {
    fn drop(&mut self) {
        // `watch` drops the engine inside its own runtime, where a blocking
        // shutdown panics; nothing of ours is left running to wait for.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Why the engine could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start a runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the engine said no")]
    Api(#[source] bollard::errors::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the thread asking the engine panicked")]
    Panicked,
}

/// Runs `fut` to completion on `runtime`, from a thread of its own (the
/// caller may be inside another runtime), within [`TIMEOUT`].
fn on_runtime<T: Send>(
    runtime: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, bollard::errors::Error>> + Send,
) -> Result<T, Error> {
    std::thread::scope(|s| {
        s.spawn(|| {
            runtime.block_on(async {
                match tokio::time::timeout(TIMEOUT, fut).await {
                    Ok(result) => result.map_err(Error::Api),
                    Err(_) => Err(Error::Timeout(TIMEOUT)),
                }
            })
        })
        .join()
        .unwrap_or(Err(Error::Panicked))
    })
}

/// The running containers, with their network namespaces.
async fn fetch(
    docker: &Docker,
    kind: EngineKind,
) -> Result<Vec<Container>, bollard::errors::Error> {
    let mut containers = Vec::new();
    for summary in docker.list_containers(None).await? {
        let Some(id) = summary.id.as_deref() else {
            continue;
        };
        // A container may go away between the list and the inspect.
        let sandbox = match docker.inspect_container(id, None).await {
            Ok(inspect) => inspect.network_settings.and_then(|n| n.sandbox_key),
            Err(e) => {
                log::debug!("Docker engine: inspecting {id}: {e}");
                None
            }
        };
        let netns = sandbox
            .filter(|key| !key.is_empty())
            .and_then(|key| std::fs::metadata(key).ok())
            .map(|m| m.ino() as u32);
        containers.extend(Container::from_summary(kind, &summary, netns));
    }
    Ok(containers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::udp;

    /// A row of `GET /containers/json` as engine 20.10 (API 1.41) sends it.
    fn summary() -> ContainerSummary {
        serde_json::from_value(serde_json::json!({
            "Id": "b147d4685a07e1c3f0a2b4c6d8e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8",
            "Names": ["/swd1_web_1"],
            "Image": "swd1-udp",
            "Labels": {
                "com.docker.compose.project": "swd1",
                "com.docker.compose.service": "web"
            },
            "State": "running",
            "Ports": [
                {"IP": "0.0.0.0", "PrivatePort": 8888, "PublicPort": 8888, "Type": "udp"},
                {"IP": "::", "PrivatePort": 8888, "PublicPort": 8888, "Type": "udp"},
                {"PrivatePort": 9000, "Type": "tcp"}
            ],
            "NetworkSettings": {"Networks": {
                "swd1_svc": {"IPAddress": "172.18.0.2", "Gateway": "172.18.0.1", "GlobalIPv6Address": ""}
            }}
        }))
        .expect("a container summary")
    }

    #[test]
    fn a_summary_gives_name_short_id_compose_labels_addresses_and_ports() {
        let c = Container::from_summary(EngineKind::Docker, &summary(), Some(4026532999)).unwrap();
        assert_eq!(c.container.name, "swd1_web_1");
        assert_eq!(c.container.id, "b147d4685a07");
        assert_eq!(c.container.compose_project.as_deref(), Some("swd1"));
        assert_eq!(c.container.compose_service.as_deref(), Some("web"));
        assert_eq!(c.ips, ["172.18.0.2".parse::<IpAddr>().unwrap()]);
        // Listed once per address family, published once; the unpublished
        // port is not published.
        assert_eq!(
            c.published,
            [Published {
                proto: Proto::UDP,
                host_ip: None,
                host_port: 8888,
                container_port: 8888
            }]
        );
        let json = serde_json::to_value(&c.container).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "swd1_web_1", "id": "b147d4685a07",
                               "compose_project": "swd1", "compose_service": "web",
                               "engine": "docker"})
        );
    }

    #[test]
    fn lookups_by_address_namespace_and_published_port() {
        let c = Container::from_summary(EngineKind::Docker, &summary(), Some(4026532999)).unwrap();
        let t0 = Instant::now();
        let snap = Snapshot::default().next(vec![c], t0);
        let ip = "172.18.0.2".parse().unwrap();
        assert_eq!(snap.by_ip(ip).unwrap().name, "swd1_web_1");
        assert_eq!(snap.by_netns(4026532999).unwrap().id, "b147d4685a07");
        assert!(snap.by_netns(1).is_none());
        let host = "198.51.100.1".parse().unwrap();
        assert_eq!(snap.publishers(Proto::UDP, host, 8888).len(), 1);
        assert!(snap.publishers(Proto::TCP, host, 8888).is_empty());
        assert!(snap.publishers(Proto::UDP, host, 8889).is_empty());
        // From a container (Docker returns it to the proxy) or from outside.
        assert!(snap.served_by_proxy(&udp("172.18.0.2", 40000, "172.19.0.1", 8888)));
        assert!(!snap.served_by_proxy(&udp("198.51.100.2", 40000, "198.51.100.1", 8888)));

        // Removed: still named, as gone, for the entries pinned to it.
        let later = snap.next(Vec::new(), t0);
        let gone = later.by_ip(ip).unwrap();
        assert!(gone.gone);
        assert_eq!(serde_json::to_value(&gone).unwrap()["gone"], true);
        assert!(!later.is_container(ip));
        assert!(later.by_netns(4026532999).is_none());
    }

    #[test]
    fn a_record_in_the_host_names_its_containers_and_the_published_port() {
        let c = Container::from_summary(EngineKind::Docker, &summary(), Some(4026532999)).unwrap();
        let snap = Snapshot::default().next(vec![c], Instant::now());
        let orig = udp("198.51.100.2", 40000, "198.51.100.1", 8888);
        let host = NetnsInfo {
            inode: 1,
            is_own: true,
            ..Default::default()
        };
        let current = Backend::new("172.18.0.2".parse().unwrap(), 8888);
        let named = snap.containers(
            &host,
            orig.service(),
            Backend::new(orig.dst, 8888),
            Some(current),
        );
        assert!(named.stale.is_none(), "the host is no container");
        assert_eq!(named.current.unwrap().name, "swd1_web_1");
        assert_eq!(named.publishers.len(), 1);
        assert_eq!(named.publishers[0].container.name, "swd1_web_1");
        assert_eq!(named.publishers[0].at, Some(current));
        // In a container's namespace: only which container it is.
        let inside = NetnsInfo {
            inode: 4026532999,
            ..Default::default()
        };
        let named = snap.containers(&inside, orig.service(), current, None);
        assert_eq!(named.netns.unwrap().name, "swd1_web_1");
        assert!(named.stale.is_none() && named.publishers.is_empty());
        assert_eq!(
            snap.container_addresses(),
            ["172.18.0.2".parse().unwrap()].into()
        );
    }

    /// A row of Podman 4.3's compatible `GET /containers/json`, for a
    /// podman-compose service (older podman-compose sets only its own
    /// labels).
    fn podman_summary() -> ContainerSummary {
        serde_json::from_value(serde_json::json!({
            "Id": "a2d18d79c54a37100a6c025fd5f45e94f449130a073deb3c65237f830f1a1c3b",
            "Names": ["/shop_web_1"],
            "Labels": {
                "io.podman.compose.project": "shop",
                "io.podman.compose.service": "web"
            },
            "State": "running",
            "Ports": [{"PrivatePort": 8888, "PublicPort": 8888, "Type": "udp"}],
            "NetworkSettings": {"Networks": {
                "shop_default": {"IPAddress": "10.89.77.13", "Gateway": "10.89.77.1",
                                 "GlobalIPv6Address": ""}
            }}
        }))
        .expect("a container summary")
    }

    #[test]
    fn a_host_with_both_engines_names_each_container_by_its_engine() {
        let docker = Container::from_summary(EngineKind::Docker, &summary(), Some(1)).unwrap();
        let podman =
            Container::from_summary(EngineKind::Podman, &podman_summary(), Some(2)).unwrap();
        assert_eq!(podman.container.compose_project.as_deref(), Some("shop"));
        assert_eq!(podman.container.compose_service.as_deref(), Some("web"));
        let t0 = Instant::now();
        let both = Snapshot::merge([
            &Snapshot::default().next(vec![docker], t0),
            &Snapshot::default().next(vec![podman], t0),
        ]);
        let of = |ip: &str| both.by_ip(ip.parse().unwrap()).unwrap();
        assert_eq!(of("172.18.0.2").engine, Some(EngineKind::Docker));
        assert_eq!(of("10.89.77.13").engine, Some(EngineKind::Podman));
        assert_eq!(of("10.89.77.13").name, "shop_web_1");
        let json = serde_json::to_value(of("10.89.77.13")).unwrap();
        assert_eq!(json["engine"], "podman");
        // Only Docker hands its own containers' traffic to a proxy; netavark
        // DNATs a podman container's like anyone's.
        assert!(both.served_by_proxy(&udp("172.18.0.2", 40000, "198.51.100.1", 8888)));
        assert!(!both.served_by_proxy(&udp("10.89.77.13", 40000, "198.51.100.1", 8888)));
        assert_eq!(
            both.container_addresses(),
            ["172.18.0.2".parse().unwrap()].into()
        );
        // The one publishing the port, whichever engine runs it.
        let host = "198.51.100.1".parse().unwrap();
        assert_eq!(both.publishers(Proto::UDP, host, 8888).len(), 2);
    }
}
