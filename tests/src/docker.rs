//! The real Docker engine, driven with `docker-compose`: a locally built
//! image (no registry), a compose project named with the test's prefix, and
//! a producer in a namespace of the test's own, linked to the host by one
//! veth pair with documentation addresses. That veth is the only change
//! made in the root namespace; the engine's own rules and conntrack table
//! are the machine's, shared with whatever else runs on it.
//!
//! Everything is named `swd<pid>…` and removed on drop, also when a test
//! fails: the compose project (containers, networks), the image, the veth
//! and the namespace. One [`Deployment`] at a time on the machine (a file
//! lock), since they all publish the same host port.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{netns::Netns, poll, run, watcher::binary};

/// The host's end of the producer's link, and the producer.
pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const PRODUCER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The published port, on the host and in the container.
pub const PORT: u16 = 8888;
/// The compose files, the Dockerfile and the UDP tool's source.
const SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker");
/// Serialises deployments across processes: one host port, one veth subnet.
const LOCK: &str = "/run/lock/stalewatch-docker-tests.lock";

/// Why the Docker tests cannot run here, or `None` when an engine answers.
pub fn no_engine() -> Option<String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Err(e) => Some(format!("no docker command: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "`docker info` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// The engines this machine is expected to have working, from
/// `STALEWATCH_EXPECT_ENGINES` (comma-separated, set by `cargo xtask test`).
pub fn expected_engines() -> Vec<String> {
    std::env::var("STALEWATCH_EXPECT_ENGINES")
        .unwrap_or_default()
        .split(',')
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect()
}

/// `true` when `test` must be skipped for want of a Docker engine, after
/// saying so on stderr and in `STALEWATCH_SKIPPED_FILE` (which `cargo xtask
/// test` sums up). Panics instead when Docker is expected on this machine:
/// a broken engine there is a failure, never a silent pass.
pub fn skip(test: &str) -> bool {
    skip_without("docker", no_engine(), test)
}

/// `true` when `test` must be skipped because `engine` cannot run here
/// (`why`), after saying so; panics where `engine` is expected.
pub fn skip_without(engine: &str, why: Option<String>, test: &str) -> bool {
    let Some(why) = why else {
        return false;
    };
    if expected_engines().iter().any(|e| e == engine) {
        panic!("{test}: this machine should have a working {engine} engine, but {why}");
    }
    let line = format!("{test}: no {engine} engine here ({why})");
    eprintln!("SKIPPED {line}");
    if let Some(file) = std::env::var_os("STALEWATCH_SKIPPED_FILE") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    true
}

/// The engine's version, for messages.
pub fn engine_version() -> String {
    run(&["docker", "info", "--format", "{{.ServerVersion}}"])
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// This process's prefix for everything it names on the engine and host.
pub fn prefix() -> String {
    format!("swd{}", std::process::id() % 100_000)
}

/// A per-process counter, so that two deployments of one test binary never
/// share a name.
pub fn seq() -> u32 {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The image: Debian's busybox-static and the UDP tool, `FROM scratch`.
pub struct Image {
    pub tag: String,
    dir: PathBuf,
}

impl Image {
    pub fn build(name: &str) -> anyhow::Result<Image> {
        let dir = std::env::temp_dir().join(format!("{name}-image"));
        let image = Image {
            tag: format!("{name}-udp:latest"),
            dir,
        };
        Image::stage(&image.dir)?;
        let out = Command::new("docker")
            .args(["build", "-q", "-t", &image.tag])
            .arg(&image.dir)
            .env("DOCKER_BUILDKIT", "0")
            .output()?;
        if !out.status.success() {
            bail!(
                "docker build failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(image)
    }

    /// Fills `dir` with what the image is built from: Debian's static
    /// busybox, the Dockerfile and the UDP tool (gcc -static).
    pub fn stage(dir: &Path) -> anyhow::Result<()> {
        let busybox = Path::new("/bin/busybox");
        let bytes = fs::read(busybox)
            .context("no /bin/busybox: install Debian's busybox-static (cargo xtask setup)")?;
        // A dynamic busybox cannot run in an empty image.
        if bytes.windows(11).any(|w| w == b"/lib64/ld-l") {
            bail!("/bin/busybox is dynamically linked: install Debian's busybox-static");
        }
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        fs::copy(busybox, dir.join("busybox"))?;
        fs::copy(
            Path::new(SOURCES).join("Dockerfile"),
            dir.join("Dockerfile"),
        )?;
        let udp = dir.join("udp");
        run(&[
            "gcc",
            "-static",
            "-O2",
            "-o",
            udp.to_str().context("path")?,
            &format!("{SOURCES}/udp.c"),
        ])
        .context("compiling the UDP tool (gcc -static needs gcc and libc6-dev)")?;
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = run(&["docker", "rmi", "-f", &self.tag]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The producer's namespace and its one veth pair to the host:
/// 198.51.100.1 on the host, 198.51.100.2 inside.
pub struct Link {
    pub host_if: String,
    pub ns: Netns,
}

impl Link {
    pub fn new(name: &str) -> anyhow::Result<Link> {
        let ns_name = format!("{name}-prod");
        run(&["ip", "netns", "add", &ns_name])?;
        // From here on, dropping `ns` deletes the namespace.
        let ns = Netns { name: ns_name };
        let host_if = format!("{name}h");
        let peer = format!("{name}p");
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer, "netns", &ns.name,
        ])?;
        let link = Link { host_if, ns };
        run(&["ip", "addr", "add", "198.51.100.1/24", "dev", &link.host_if])?;
        run(&["ip", "link", "set", &link.host_if, "up"])?;
        link.ns.ip(&["link", "set", "lo", "up"])?;
        link.ns
            .ip(&["addr", "add", "198.51.100.2/24", "dev", &peer])?;
        link.ns.ip(&["link", "set", &peer, "up"])?;
        forget_producer();
        Ok(link)
    }

    /// Lets the producer reach a subnet of the host's (a Docker network's
    /// gateway), through the host's end of the link.
    pub fn route(&self, subnet: &str) -> anyhow::Result<()> {
        self.ns
            .ip(&["route", "add", subnet, "via", "198.51.100.1"])
            .map(drop)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; the namespace goes with `ns`.
        let _ = run(&["ip", "link", "del", &self.host_if]);
        forget_producer();
    }
}

/// Deletes the root namespace's conntrack entries of the producer's
/// address, which only a deployment (under the lock) uses: a stream of the
/// previous test from the same source port would otherwise follow the
/// entry that test left, for up to 30 s.
fn forget_producer() {
    // Exit status 1 when there was none.
    let _ = run(&["conntrack", "-D", "--orig-src", &PRODUCER.to_string()]);
}

/// A container of the project, as `docker inspect` shows it.
#[derive(Clone, Debug)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub ip: IpAddr,
    pub gateway: IpAddr,
}

/// A compose project named with the test's prefix.
pub struct Project {
    pub name: String,
    env: Vec<(String, String)>,
    /// The compose file of the latest deployment (what `down` reads).
    file: Option<&'static str>,
}

impl Project {
    pub fn new(name: &str, image: &Image) -> Project {
        Project {
            name: name.to_owned(),
            env: vec![("SWD_IMAGE".into(), image.tag.clone())],
            file: None,
        }
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    fn compose(&self, file: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("docker-compose")
            .args(["-p", &self.name, "-f", &format!("{SOURCES}/{file}")])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .context("running docker-compose")?;
        if !out.status.success() {
            bail!(
                "docker-compose {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `docker-compose up -d` with `file`: the first deployment, or a
    /// redeploy (compose recreates what changed).
    pub fn up(&mut self, file: &'static str) -> anyhow::Result<()> {
        self.file = Some(file);
        self.compose(file, &["up", "-d"]).map(drop)
    }

    /// The running container of `service`.
    pub fn container(&self, service: &str) -> anyhow::Result<Container> {
        let file = self.file.context("not deployed")?;
        let id = self.compose(file, &["ps", "-q", service])?;
        let id = id.trim();
        if id.is_empty() {
            bail!("no container for service {service}");
        }
        let inspect: Value = serde_json::from_str(&run(&["docker", "inspect", id])?)?;
        let c = &inspect[0];
        let (_, net) = c["NetworkSettings"]["Networks"]
            .as_object()
            .and_then(|n| n.iter().next())
            .context("the container is on no network")?;
        let addr = |key: &str| -> anyhow::Result<IpAddr> {
            net[key]
                .as_str()
                .context(key.to_owned())?
                .parse()
                .with_context(|| format!("{key} of {id}"))
        };
        Ok(Container {
            id: id[..12].to_owned(),
            name: c["Name"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            ip: addr("IPAddress")?,
            gateway: addr("Gateway")?,
        })
    }

    /// The sources that the UDP tool in `container` logged ("from IP:PORT"
    /// per datagram), with how many datagrams came from each.
    pub fn sources(&self, container: &Container) -> HashMap<SocketAddr, u64> {
        let mut seen = HashMap::new();
        let logs = run(&["docker", "logs", &container.id]).unwrap_or_default();
        for line in logs.lines() {
            if let Some(addr) = line
                .strip_prefix("from ")
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                *seen.entry(addr).or_default() += 1;
            }
        }
        seen
    }

    /// Datagrams `container` got from address `ip` (any port).
    pub fn from_ip(&self, container: &Container, ip: IpAddr) -> u64 {
        self.sources(container)
            .iter()
            .filter(|(a, _)| a.ip() == ip)
            .map(|(_, n)| n)
            .sum()
    }

    /// Waits until `container` logged at least `n` datagrams from `from`.
    pub fn wait_from(
        &self,
        container: &Container,
        from: SocketAddr,
        n: u64,
        limit: Duration,
    ) -> bool {
        poll(limit, || {
            (self.sources(container).get(&from).copied().unwrap_or(0) >= n).then_some(())
        })
        .is_some()
    }

    /// Waits until `container` logged at least `n` datagrams from `ip`.
    pub fn wait_from_ip(&self, container: &Container, ip: IpAddr, n: u64, limit: Duration) -> bool {
        poll(limit, || (self.from_ip(container, ip) >= n).then_some(())).is_some()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if let Some(file) = self.file {
            let _ = self.compose(file, &["down", "--remove-orphans", "-t", "1"]);
        }
        // Whatever `down` left (a failed up, another compose file).
        let label = format!("label=com.docker.compose.project={}", self.name);
        if let Ok(ids) = run(&["docker", "ps", "-aq", "--filter", &label]) {
            for id in ids.split_whitespace() {
                let _ = run(&["docker", "rm", "-f", id]);
            }
        }
        if let Ok(ids) = run(&["docker", "network", "ls", "-q", "--filter", &label]) {
            for id in ids.split_whitespace() {
                let _ = run(&["docker", "network", "rm", id]);
            }
        }
    }
}

/// The userland proxies that the engine runs for `container_ip`'s host port
/// `port` (one per address family), by PID.
pub fn proxies(container_ip: IpAddr, port: u16) -> Vec<i32> {
    let (ip, port) = (container_ip.to_string(), port.to_string());
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let after = |flag: &str| {
                args.windows(2)
                    .any(|w| w[0] == flag.as_bytes() && w[1] == port.as_bytes())
            };
            let is_ours = args.first()?.ends_with(b"docker-proxy")
                && after("-host-port")
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-container-ip" && w[1] == ip.as_bytes());
            is_ours.then_some(pid)
        })
        .collect()
}

/// Stops the engine's userland proxies for the test's own container, by
/// PID (never the daemon, never anyone else's): the lossy case, as with
/// `"userland-proxy": false`. Returns how many were stopped.
pub fn stop_proxies(container_ip: IpAddr, port: u16) -> anyhow::Result<usize> {
    let pids = proxies(container_ip, port);
    for pid in &pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGTERM,
        )?;
    }
    let gone = poll(Duration::from_secs(5), || {
        proxies(container_ip, port).is_empty().then_some(())
    });
    if gone.is_none() {
        bail!("the proxies {pids:?} did not stop");
    }
    Ok(pids.len())
}

/// IPv4 subnets in use on the machine: the engine's networks and the root
/// namespace's routes.
fn used_subnets() -> Vec<(u32, u32)> {
    let mut used = Vec::new();
    let mut add = |cidr: &str| {
        if let Some(net) = parse_cidr(cidr) {
            used.push(net);
        }
    };
    if let Ok(ids) = run(&["docker", "network", "ls", "-q"]) {
        for id in ids.split_whitespace() {
            let subnets = run(&[
                "docker",
                "network",
                "inspect",
                "-f",
                "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
                id,
            ])
            .unwrap_or_default();
            subnets.split_whitespace().for_each(&mut add);
        }
    }
    if let Ok(routes) = run(&["ip", "-4", "route", "show", "table", "all"]) {
        for route in routes.lines() {
            if let Some(dst) = route.split_whitespace().next() {
                add(dst);
            }
        }
    }
    used
}

/// `a.b.c.d/n` (or a bare address, /32) as (network, mask).
fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((u32::from(addr) & mask, mask))
}

/// `n` private /24 subnets that no Docker network and no route of the
/// machine uses: other work may run on the same engine.
pub fn free_subnets(n: usize) -> anyhow::Result<Vec<String>> {
    let used = used_subnets();
    let overlaps = |(net, mask): (u32, u32)| {
        used.iter()
            .any(|&(u, m)| (net & m) == (u & m) || (u & mask) == (net & mask))
    };
    let mut free = Vec::new();
    // Inside Docker's own default pools, /24s far from where it starts.
    for b in 18..=31u8 {
        for c in [240u8, 200, 160, 120] {
            let cidr = format!("172.{b}.{c}.0/24");
            if free.len() < n && !overlaps(parse_cidr(&cidr).expect("cidr")) {
                free.push(cidr);
            }
        }
    }
    if free.len() < n {
        bail!("fewer than {n} free private /24 subnets on this machine");
    }
    Ok(free)
}

/// The gateway Docker gives a subnet by default: its first address.
pub fn first_host(cidr: &str) -> IpAddr {
    let (net, _) = parse_cidr(cidr).expect("cidr");
    IpAddr::V4(Ipv4Addr::from(net + 1))
}

/// One test's world: the machine-wide lock, the image, the producer's link
/// and the compose project. Dropped in reverse: project, link, image, lock.
pub struct Deployment {
    pub project: Project,
    pub link: Link,
    pub image: Image,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl Deployment {
    /// Builds the image and the link; deploys nothing yet.
    pub fn new() -> anyhow::Result<Deployment> {
        let lock = lock()?;
        let name = format!("{}x{}", prefix(), seq());
        let image = Image::build(&name)?;
        let link = Link::new(&name)?;
        Ok(Deployment {
            project: Project::new(&name, &image),
            link,
            image,
            _lock: lock,
        })
    }

    /// Deploys (or redeploys) `web` onto a dedicated network of its own,
    /// with a subnet that is free now.
    pub fn up_on_network(&mut self) -> anyhow::Result<String> {
        let subnet = free_subnets(1)?.remove(0);
        self.project.set("SWD_SUBNET", &subnet);
        self.project.up("compose-network.yml")?;
        Ok(subnet)
    }

    /// The producer's address from source port `sport`.
    pub fn producer(sport: u16) -> SocketAddr {
        SocketAddr::from((PRODUCER, sport))
    }

    /// The service as the producer addresses it.
    pub fn service() -> SocketAddr {
        SocketAddr::from((HOST, PORT))
    }
}

/// Takes the machine-wide lock, waiting for another deployment to finish.
pub fn lock() -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let until = Instant::now() + Duration::from_secs(600);
    loop {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < until => {
                thread::sleep(Duration::from_millis(200));
            }
            Err((_, e)) => bail!("locking {LOCK}: {e}"),
        }
    }
}

/// The conntrack entry of the root namespace (any zone) whose original
/// tuple is the producer's flow from `sport` to `to`, parsed.
pub fn entry(sport: u16, to: SocketAddr) -> Option<stalewatch::domain::Entry> {
    use stalewatch::domain::{Family, Proto, Tuple};
    let orig = Tuple {
        family: Family::Ipv4,
        proto: Proto::UDP,
        src: IpAddr::V4(PRODUCER),
        sport,
        dst: to.ip(),
        dport: to.port(),
    };
    stalewatch::source::conntrack::find(None, &orig)
        .ok()?
        .into_iter()
        .next()
}

/// The entries of the root namespace whose original source is `src`.
pub fn entries_from(src: SocketAddr) -> Vec<stalewatch::domain::Entry> {
    use stalewatch::source::conntrack::{Filter, dump};
    let filter = Filter {
        orig_src: Some((src.ip(), src.port())),
        ..Filter::default()
    };
    dump(None, &filter).unwrap_or_default()
}

/// The reply source of that entry: the backend of a DNATed flow, or the
/// host itself for a flow without NAT.
pub fn reply_src(entry: &stalewatch::domain::Entry) -> Option<IpAddr> {
    Some(entry.reply.src)
}

/// `stalewatch check --format json ARGS`: exit code and records.
pub fn check(args: &[&str]) -> anyhow::Result<(i32, Vec<Value>)> {
    let out = Command::new(binary())
        .args(["check", "--format", "json"])
        .args(args)
        .output()
        .context("running stalewatch check")?;
    let records = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("check printed a line that is not JSON")?;
    Ok((out.status.code().unwrap_or(-1), records))
}

/// Whether record `v` is about the producer's flow from `sport` to `to`.
pub fn is_flow(v: &Value, sport: u16, to: SocketAddr) -> bool {
    v["orig"]
        == serde_json::json!({
            "src": PRODUCER.to_string(), "sport": sport,
            "dst": to.ip().to_string(), "dport": to.port(),
        })
}

/// Removes a test's container and image on drop, also when the test fails.
pub struct Discard {
    pub container: String,
    pub image: String,
}

impl Drop for Discard {
    fn drop(&mut self) {
        let _ = run(&["docker", "rm", "-f", &self.container]);
        let _ = run(&["docker", "rmi", "-f", &self.image]);
    }
}

/// Whether the mount that holds `path` is shared or a slave on this host.
pub fn propagates(path: &str) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let point = Path::new(fields.get(4)?);
            path.starts_with(point).then(|| {
                let optional = fields[6..].iter().take_while(|f| **f != "-");
                let propagates = optional
                    .clone()
                    .any(|f| f.starts_with("shared:") || f.starts_with("master:"));
                (point.as_os_str().len(), propagates)
            })
        })
        // The last of the longest: a later mount on the same point hides
        // the earlier ones.
        .max_by_key(|(len, _)| *len)
        .is_some_and(|(_, propagates)| propagates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_overlap_by_prefix() {
        assert_eq!(
            parse_cidr("172.17.0.0/16"),
            Some((0xac11_0000, 0xffff_0000))
        );
        assert_eq!(parse_cidr("10.0.0.7"), Some((0x0a00_0007, u32::MAX)));
        assert_eq!(parse_cidr("default"), None);
        assert_eq!(first_host("172.18.240.0/24").to_string(), "172.18.240.1");
    }
}
