//! The real Podman engine (Debian's podman 4.3 with netavark 1.4): a
//! locally built image (no registry), networks and containers named with
//! the test's prefix, podman-compose for a compose project, and the
//! producer's namespace linked to the host by one veth pair with
//! documentation addresses, as for Docker ([`docker::Link`]).
//!
//! What the shared doc asks of a Podman test, all removed on drop, also
//! when a test fails: in the root namespace, besides the veth, two FORWARD
//! rules matching only that veth: an ACCEPT to `podman+` interfaces
//! (dockerd's FORWARD policy is DROP and netavark accepts only established
//! traffic into its networks) and, below it, a DROP of everything else
//! forwarded from the veth, so that a flow pinned to a network whose bridge
//! is gone can never follow the default route out of the machine. Every
//! network keeps a keeper container while its flows may exist, so netavark
//! keeps its bridge. Every `podman run` carries the rlimits runc accepts
//! here. Podman's API service is started on its default socket when none
//! answers there, and stopped at the end.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    docker::{self, Link},
    poll, run,
};

/// Podman's API socket (rootful), where stalewatch looks for it.
pub const SOCKET: &str = "/run/podman/podman.sock";
/// The rlimits runc accepts on our machines, and the runtime itself (crun
/// refuses the machines' hybrid cgroups), for `podman run` and `build`.
const RUN_FLAGS: &[&str] = &[
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// Why the Podman tests cannot run here, or `None` when podman with
/// netavark works.
pub fn no_podman() -> Option<String> {
    match Command::new("podman")
        .args(["info", "--format", "{{.Host.NetworkBackend}}"])
        .output()
    {
        Err(e) => Some(format!("no podman command: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "`podman info` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(out) if String::from_utf8_lossy(&out.stdout).trim() != "netavark" => Some(format!(
            "podman's network backend is {}, not netavark",
            String::from_utf8_lossy(&out.stdout).trim()
        )),
        // podman-compose passes no runtime: the default must be one that
        // runs here (crun refuses the machines' hybrid cgroups).
        Ok(_) => match podman(&["info", "--format", "{{.Host.OCIRuntime.Name}}"]) {
            Ok(rt) if rt.trim() == "runc" => None,
            Ok(rt) => Some(format!(
                "podman's default OCI runtime is {}, not runc (remove crun)",
                rt.trim()
            )),
            Err(e) => Some(format!("{e:#}")),
        },
    }
}

/// `true` when `test` must be skipped for want of Podman (said on stderr
/// and in `STALEWATCH_SKIPPED_FILE`); panics where Podman is expected.
pub fn skip(test: &str) -> bool {
    docker::skip_without("podman", no_podman(), test)
}

/// `podman ARGS`, failing with its output.
pub fn podman(args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["podman"];
    full.extend_from_slice(args);
    run(&full)
}

/// A container as `podman inspect` shows it.
#[derive(Clone, Debug)]
pub struct Container {
    /// The short id, as records name it.
    pub id: String,
    pub name: String,
    pub ip: IpAddr,
}

/// One test's world on Podman. Dropped: the link first (no more traffic),
/// then compose projects, containers, networks, the image, the FORWARD
/// rules, the API service it started, and the machine-wide lock it shares
/// with the Docker tests (one host port, one veth subnet).
pub struct World {
    pub name: String,
    pub image: String,
    image_dir: PathBuf,
    link: Option<Link>,
    containers: Vec<String>,
    networks: Vec<String>,
    projects: Vec<(String, PathBuf)>,
    forward: Vec<Vec<String>>,
    service: Option<Child>,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl World {
    /// The image, the link, the FORWARD guard and the API service (when
    /// `with_service` and none answers); deploys nothing yet.
    pub fn new(with_service: bool) -> anyhow::Result<World> {
        let lock = docker::lock()?;
        let name = format!("swp{}x{}", std::process::id() % 100_000, docker::seq());
        let image_dir = std::env::temp_dir().join(format!("{name}-image"));
        let mut world = World {
            image: format!("localhost/{name}-udp:latest"),
            image_dir,
            link: None,
            containers: Vec::new(),
            networks: Vec::new(),
            projects: Vec::new(),
            forward: Vec::new(),
            service: None,
            name,
            _lock: lock,
        };
        docker::Image::stage(&world.image_dir)?;
        let dir = world.image_dir.to_str().context("path")?.to_owned();
        let mut build = vec!["build", "-q"];
        build.extend_from_slice(RUN_FLAGS);
        build.extend_from_slice(&["-t", &world.image, &dir]);
        podman(&build).context("podman build")?;
        let link = Link::new(&world.name)?;
        let host_if = link.host_if.clone();
        world.link = Some(link);
        // The DROP first, then the ACCEPT above it: never a moment when
        // the veth's traffic is forwarded anywhere but to podman.
        world.guard(&["-i", &host_if, "-j", "DROP"])?;
        world.guard(&["-i", &host_if, "-o", "podman+", "-j", "ACCEPT"])?;
        if with_service && !answers(SOCKET) {
            world.service = Some(start_service()?);
        }
        Ok(world)
    }

    pub fn link(&self) -> &Link {
        self.link.as_ref().expect("a link until dropped")
    }

    /// Inserts a FORWARD rule at the top, deleted on drop.
    fn guard(&mut self, rule: &[&str]) -> anyhow::Result<()> {
        let mut insert = vec!["iptables", "-I", "FORWARD", "1"];
        insert.extend_from_slice(rule);
        run(&insert)?;
        self.forward
            .push(rule.iter().map(|s| (*s).to_owned()).collect());
        Ok(())
    }

    /// A network of the test's with `subnet`, and a keeper container on it
    /// at its second address, so that netavark keeps its bridge while the
    /// test's flows may be pinned to it.
    pub fn network(&mut self, suffix: &str, subnet: &str) -> anyhow::Result<String> {
        let net = format!("{}-{suffix}", self.name);
        podman(&["network", "create", "--subnet", subnet, &net])?;
        self.networks.push(net.clone());
        let keeper = format!("{net}-keep");
        self.run_container(&keeper, &net, None, false, &["/bin/sleep", "3600"])?;
        Ok(net)
    }

    /// Runs the UDP receiver as container `name` on `net` (at `ip` when
    /// given), publishing 8888/udp when `publish`; or `cmd` instead.
    pub fn run_container(
        &mut self,
        name: &str,
        net: &str,
        ip: Option<IpAddr>,
        publish: bool,
        cmd: &[&str],
    ) -> anyhow::Result<Container> {
        let ip_flag = ip.map(|ip| ip.to_string());
        let mut args = vec!["run", "-d", "--name", name, "--network", net];
        args.extend_from_slice(RUN_FLAGS);
        if let Some(ip) = &ip_flag {
            args.extend_from_slice(&["--ip", ip]);
        }
        let publish_flag = format!("{}:{}/udp", docker::PORT, docker::PORT);
        if publish {
            args.extend_from_slice(&["-p", &publish_flag]);
        }
        args.push(&self.image);
        args.extend_from_slice(cmd);
        self.containers.push(name.to_owned());
        podman(&args).with_context(|| format!("podman run {name}"))?;
        container(name)
    }

    /// The UDP receiver publishing 8888/udp as `name` on `net`.
    pub fn service(
        &mut self,
        name: &str,
        net: &str,
        ip: Option<IpAddr>,
    ) -> anyhow::Result<Container> {
        self.run_container(name, net, ip, true, &[])
    }

    /// Removes a container at once (no grace), as a redeploy does.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        podman(&["rm", "-f", "-t", "0", name]).map(drop)
    }

    /// `podman-compose -p PROJECT up -d` with the service on network
    /// `net_suffix` of subnet `subnet` (a redeploy when the project runs:
    /// its containers are removed first, as `down` does, networks kept).
    /// A keeper joins each network the project makes. Returns the
    /// container of service `web`.
    pub fn compose_up(
        &mut self,
        project: &str,
        net_suffix: &str,
        subnet: &str,
    ) -> anyhow::Result<Container> {
        let dir = self.image_dir.join(format!("compose-{project}"));
        fs::create_dir_all(&dir)?;
        if !self.projects.iter().any(|(p, _)| p == project) {
            self.projects.push((project.to_owned(), dir.clone()));
        } else {
            compose(project, &dir, &["down"])?;
        }
        fs::write(
            dir.join("compose.yml"),
            compose_file(&self.image, net_suffix, subnet),
        )?;
        compose(project, &dir, &["up", "-d"])?;
        let net = format!("{project}_{net_suffix}");
        if !self.networks.contains(&net) {
            self.networks.push(net.clone());
            let keeper = format!("{net}-keep");
            self.run_container(&keeper, &net, None, false, &["/bin/sleep", "3600"])?;
        }
        container(&format!("{project}_web_1"))
    }

    /// The sources the UDP receiver in `c` logged, with counts.
    pub fn sources(&self, c: &Container) -> HashMap<SocketAddr, u64> {
        let mut seen = HashMap::new();
        let logs = podman(&["logs", &c.name]).unwrap_or_default();
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

    /// Waits until `c` has logged `n` datagrams from `from`.
    pub fn wait_from(&self, c: &Container, from: SocketAddr, n: u64, limit: Duration) -> bool {
        poll(limit, || {
            (self.sources(c).get(&from).copied().unwrap_or(0) >= n).then_some(())
        })
        .is_some()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // No more traffic first: the veth and the producer's namespace.
        drop(self.link.take());
        for (project, dir) in self.projects.iter().rev() {
            let _ = compose(project, dir, &["down"]);
        }
        for c in self.containers.iter().rev() {
            let _ = podman(&["rm", "-f", "-t", "0", c]);
        }
        for net in self.networks.iter().rev() {
            let _ = podman(&["network", "rm", "-f", net]);
        }
        let _ = podman(&["rmi", "-f", &self.image]);
        let _ = fs::remove_dir_all(&self.image_dir);
        for rule in self.forward.iter().rev() {
            let mut delete = vec!["iptables", "-D", "FORWARD"];
            delete.extend(rule.iter().map(String::as_str));
            let _ = run(&delete);
        }
        if let Some(mut service) = self.service.take() {
            let _ = service.kill();
            let _ = service.wait();
            let _ = fs::remove_file(SOCKET);
        }
    }
}

/// The compose file: service `web` (the UDP receiver) publishing 8888/udp
/// on network `net` with `subnet` (podman-compose 1.0 takes no variables in
/// keys, nor `ipv4_address`).
fn compose_file(image: &str, net: &str, subnet: &str) -> String {
    format!(
        "version: \"3\"
services:
  web:
    image: {image}
    ports: [\"8888:8888/udp\"]
    ulimits:
      nofile: {{soft: 1024, hard: 1024}}
      nproc: {{soft: 4096, hard: 4096}}
    networks: [{net}]
networks:
  {net}:
    ipam:
      config:
        - subnet: {subnet}
"
    )
}

fn compose(project: &str, dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("podman-compose")
        .args(["-p", project])
        .args(args)
        .current_dir(dir)
        .output()
        .context("running podman-compose (Debian's podman-compose)")?;
    if !out.status.success() {
        bail!(
            "podman-compose {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A container by name, from `podman inspect`.
pub fn container(name: &str) -> anyhow::Result<Container> {
    let inspect: serde_json::Value = serde_json::from_str(&podman(&["inspect", name])?)?;
    let c = &inspect[0];
    let ip = c["NetworkSettings"]["Networks"]
        .as_object()
        .and_then(|n| n.values().find_map(|ep| ep["IPAddress"].as_str()))
        .filter(|ip| !ip.is_empty())
        .context("the container has no address")?
        .parse()?;
    Ok(Container {
        id: c["Id"].as_str().unwrap_or_default()[..12].to_owned(),
        name: name.to_owned(),
        ip,
    })
}

/// Whether an engine answers on `socket`.
pub fn answers(socket: &str) -> bool {
    Path::new(socket).exists()
        && run(&[
            "curl",
            "-sf",
            "--max-time",
            "2",
            "--unix-socket",
            socket,
            "http://d/_ping",
        ])
        .is_ok()
}

/// `podman system service` on [`SOCKET`], once it answers.
fn start_service() -> anyhow::Result<Child> {
    fs::create_dir_all("/run/podman")?;
    let mut child = Command::new("podman")
        .args(["system", "service", "--time=0", &format!("unix://{SOCKET}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting podman system service")?;
    if poll(Duration::from_secs(10), || answers(SOCKET).then_some(())).is_none() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("podman system service did not answer on {SOCKET} within 10 s");
    }
    Ok(child)
}
