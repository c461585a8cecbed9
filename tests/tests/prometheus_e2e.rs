//! End to end through a real Prometheus and a real Alertmanager (Debian's
//! `prometheus` and `prometheus-alertmanager`): two stalewatch instances,
//! each watching its own router namespace as a "host", are scraped by a
//! Prometheus server that loads the shipped rules file unchanged. The
//! stale story is played on host A only: `StaleConntrackFlows` fires in
//! Prometheus's API naming host A, its namespace, service, stale backend
//! and verdict, and never host B; Alertmanager delivers it to a webhook
//! receiver the test runs. After the fix (`stalewatch check --fix`) the
//! alert resolves in the API and the webhook gets the resolved
//! notification. Stopping host B's stalewatch makes `StalewatchDown`
//! pending for host B: the rules' `up` expression matches the job.
//!
//! Prometheus, Alertmanager and the metrics endpoints listen on loopback
//! ports of the root namespace (nothing there is configured); each server
//! has a data directory of its own and is killed by its PID on drop.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use stalewatch_tests::{
    poll,
    story::{Rules, Story, V4, Variant},
    traffic::{Producer, Receiver},
    watcher::{Watcher, binary, is_stale_flow},
};

const STALE_SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;
/// The story's service as the metrics label it: `V4.router_lan:8888/udp`.
const SERVICE: &str = "192.0.2.1:8888/udp";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The servers' commands, as Debian's packages name them.
const TOOLS: [&str; 2] = ["prometheus", "prometheus-alertmanager"];

/// `true` (after saying why) when Prometheus or Alertmanager is not
/// installed and the test does not run under `cargo xtask test`; there
/// (`STALEWATCH_EXPECT_ENGINES` is set) `cargo xtask setup` has installed
/// both, so a missing one is a failure.
fn skip(test: &str) -> bool {
    let missing: Vec<&str> = TOOLS
        .into_iter()
        .filter(|tool| Command::new(tool).arg("--version").output().is_err())
        .collect();
    if missing.is_empty() {
        return false;
    }
    if std::env::var_os("STALEWATCH_EXPECT_ENGINES").is_some() {
        panic!(
            "{test}: `cargo xtask setup` installs prometheus and \
             prometheus-alertmanager, yet missing here: {}",
            missing.join(", ")
        );
    }
    let line = format!(
        "{test}: not installed: {} (`cargo xtask setup` installs it)",
        missing.join(", ")
    );
    eprintln!("SKIPPED {line}");
    if let Some(file) = std::env::var_os("STALEWATCH_SKIPPED_FILE")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
    {
        let _ = writeln!(f, "{line}");
    }
    true
}

/// A loopback port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server the test started: killed by its PID on drop, its directory
/// (config, data, log) removed. Its log is printed when the test failed.
struct Server {
    name: &'static str,
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Server {
    /// Starts `program ARGS` with its output in `dir/log`, and waits until
    /// `url/-/ready` answers 200.
    fn start(name: &'static str, dir: PathBuf, port: u16, args: &[String]) -> anyhow::Result<Self> {
        let spawn = || -> anyhow::Result<Child> {
            let log = std::fs::File::create(dir.join("log"))?;
            Ok(Command::new(name)
                .args(args)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?)
        };
        let child = match spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.context(format!("starting {name}")));
            }
        };
        let mut server = Server {
            name,
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        let ready = format!("{}/-/ready", server.url);
        let until = Instant::now() + secs(30);
        loop {
            if http_get(&ready).is_ok_and(|(code, _)| code == 200) {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("{name} exited {status}: {}", server.log());
            }
            if Instant::now() > until {
                bail!("{name} not ready within 30 s: {}", server.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (code, body) = http_get(&format!("{}{path}", self.url))?;
        if code != 200 {
            bail!("{} {path}: HTTP {code}: {body}", self.name);
        }
        Ok(serde_json::from_str(&body)?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only our own child, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A directory of this test's own for one server.
fn server_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{}-{name}", stalewatch_tests::prefix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data"))?;
    Ok(dir)
}

/// `GET url` with curl: the status code and the body.
fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .context("curl")?;
    if !out.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status line")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// Alertmanager routing every alert, grouped per host and service, to the
/// webhook at `hook`, fast, resolutions included.
fn start_alertmanager(hook: SocketAddr) -> anyhow::Result<Server> {
    let dir = server_dir("alertmanager")?;
    let config = format!(
        "route:
  receiver: test
  group_by: [alertname, instance, netns, service, backend]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: test
    webhook_configs:
      - url: http://{hook}/hook
        send_resolved: true
"
    );
    std::fs::write(dir.join("alertmanager.yml"), config)?;
    let port = free_port()?;
    let args = [
        format!("--config.file={}", dir.join("alertmanager.yml").display()),
        format!("--storage.path={}", dir.join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
        // No cluster: nothing listens on another port or address.
        "--cluster.listen-address=".to_owned(),
    ];
    Server::start("prometheus-alertmanager", dir, port, &args)
}

/// Prometheus scraping each `(host, address)` every second in the job
/// "stalewatch" (the host as its `instance`, as a fleet names it), loading
/// the shipped rules file unchanged and alerting through `alertmanager`.
fn start_prometheus(
    rules: &Path,
    targets: &[(&str, &str)],
    alertmanager: &Server,
) -> anyhow::Result<Server> {
    let dir = server_dir("prometheus")?;
    let am = alertmanager.url.trim_start_matches("http://");
    let mut config = format!(
        "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {}
alerting:
  alertmanagers:
    - static_configs:
        - targets: ['{am}']
scrape_configs:
  - job_name: stalewatch
    static_configs:
",
        rules.display()
    );
    for (host, addr) in targets {
        config.push_str(&format!(
            "      - targets: ['{addr}']\n        labels:\n          instance: {host}\n"
        ));
    }
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let port = free_port()?;
    let args = [
        format!("--config.file={}", dir.join("prometheus.yml").display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
    ];
    Server::start("prometheus", dir, port, &args)
}

/// Prometheus's active (pending or firing) alerts.
fn alerts(prometheus: &Server) -> Vec<Value> {
    prometheus
        .get("/api/v1/alerts")
        .ok()
        .and_then(|v| v["data"]["alerts"].as_array().cloned())
        .unwrap_or_default()
}

/// The result vector of an instant query.
fn query(prometheus: &Server, q: &str) -> Vec<Value> {
    let url = format!(
        "/api/v1/query?query={}",
        q.replace('{', "%7B")
            .replace('}', "%7D")
            .replace('"', "%22")
            .replace(' ', "%20")
    );
    prometheus
        .get(&url)
        .ok()
        .and_then(|v| v["data"]["result"].as_array().cloned())
        .unwrap_or_default()
}

/// A webhook receiver on a loopback port: every POSTed body, as JSON.
struct Webhook {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Webhook {
    fn start() -> anyhow::Result<Webhook> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, done) = (bodies.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => match receive(stream) {
                        Ok(body) => sink.lock().expect("lock").push(body),
                        Err(e) => eprintln!("webhook: {e:#}"),
                    },
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Webhook {
            addr,
            bodies,
            stop,
            thread: Some(thread),
        })
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().expect("lock").clone()
    }

    /// Every alert of every notification, with the notification's status.
    fn alerts(&self) -> Vec<Value> {
        self.bodies()
            .iter()
            .flat_map(|b| b["alerts"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one HTTP request (its body by Content-Length), answers 200 and
/// closes the connection.
fn receive(mut stream: TcpStream) -> anyhow::Result<Value> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(secs(5)))?;
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let header_end = loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed before the headers ended");
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if data.len() > 1 << 20 {
            bail!("headers too long");
        }
    };
    let head = String::from_utf8_lossy(&data[..header_end]).into_owned();
    if !head.starts_with("POST /hook ") {
        bail!("unexpected request: {head}");
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("no Content-Length")?;
    while data.len() < header_end + length {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed inside the body");
        }
        data.extend_from_slice(&buf[..n]);
    }
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    Ok(serde_json::from_slice(
        &data[header_end..header_end + length],
    )?)
}

fn label<'a>(alert: &'a Value, name: &str) -> &'a str {
    alert["labels"][name].as_str().unwrap_or("")
}

/// Whether `alert` (from Prometheus or a webhook) is host A's stale flow.
fn is_host_a_stale(alert: &Value, netns: &str) -> bool {
    label(alert, "alertname") == "StaleConntrackFlows"
        && label(alert, "instance") == "host-a"
        && label(alert, "netns") == netns
        && label(alert, "service") == SERVICE
        && label(alert, "backend") == V4.old_backend
        && label(alert, "verdict") == "stale"
}

/// No alert about a flow names host B.
fn assert_quiet_on_b(alerts: &[Value], whence: &str) {
    for a in alerts {
        assert!(
            !(label(a, "instance") == "host-b"
                && ["StaleConntrackFlows", "DeadDestination"].contains(&label(a, "alertname"))),
            "{whence}: an alert names host B, where nothing is stale: {a}"
        );
    }
}

#[test]
fn prometheus_fires_for_the_stale_host_and_alertmanager_delivers() -> anyhow::Result<()> {
    if skip("prometheus_e2e") {
        return Ok(());
    }
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/prometheus/stalewatch-rules.yml")
        .canonicalize()?;

    // Two hosts: the same story's topology in namespaces of their own.
    let mut host_a = Story::build(Variant::v4(Rules::Iptables))?;
    let host_b = Story::build(Variant::v4(Rules::Iptables))?;
    assert_eq!(format!("{}/udp", host_a.service()), SERVICE);
    let old_a = Receiver::start(host_a.old.as_ref().expect("old"), 8888)?;
    let old_b = Receiver::start(host_b.old.as_ref().expect("old"), 8888)?;
    let metrics_a = format!("127.0.0.1:{}", free_port()?);
    let metrics_b = format!("127.0.0.1:{}", free_port()?);
    let watch_a = Watcher::start(&["--netns", &host_a.router.name, "--metrics", &metrics_a])?;
    let watch_b = Watcher::start(&["--netns", &host_b.router.name, "--metrics", &metrics_b])?;

    let hook = Webhook::start()?;
    let alertmanager = start_alertmanager(hook.addr)?;
    let prometheus = start_prometheus(
        &rules,
        &[("host-a", &metrics_a), ("host-b", &metrics_b)],
        &alertmanager,
    )?;
    // Both hosts scraped, with their metrics, before anything happens.
    poll(secs(20), || {
        let up = query(&prometheus, r#"up{job="stalewatch"} == 1"#);
        let raised = query(&prometheus, "stalewatch_flows_raised == 0");
        (up.len() == 2 && raised.len() == 2).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never scraped both hosts: {:?}",
            prometheus.get("/api/v1/targets")
        )
    });
    let rule_count = prometheus.get("/api/v1/rules")?["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(rule_count, 4, "the shipped rules are loaded");

    // Host B: a healthy stream to its service, nothing redeployed.
    let src = host_b.producer_addr(STALE_SPORT);
    let mut stream_b = Producer::start(
        &host_b.producer,
        src,
        host_b.service(),
        Duration::from_millis(100),
        1500,
        secs(150),
    )?;
    assert!(old_b.wait_from(src, 5, secs(10)), "host B's stream flows");

    // Host A: the stale story. The clock starts at the redeploy.
    let src = host_a.producer_addr(STALE_SPORT);
    let mut stream_a = Producer::start(
        &host_a.producer,
        src,
        host_a.service(),
        Duration::from_millis(100),
        1500,
        secs(150),
    )?;
    assert!(old_a.wait_from(src, 5, secs(10)), "host A's stream flows");
    let redeployed = Instant::now();
    host_a.redeploy()?;
    drop(old_a);
    // A new flow reaches the new container: the host's rules now send the
    // service there, which is what makes the old entry stale.
    let new_a = Receiver::start(&host_a.new, 8888)?;
    let new_src = host_a.producer_addr(NEW_SPORT);
    let mut fresh_a = Producer::start(
        &host_a.producer,
        new_src,
        host_a.service(),
        Duration::from_millis(100),
        300,
        secs(60),
    )?;
    assert!(
        new_a.wait_from(new_src, 5, secs(10)),
        "a new flow reaches host A's new container"
    );
    let netns_a = host_a.router.name.clone();

    let firing = poll(secs(30), || {
        alerts(&prometheus)
            .into_iter()
            .find(|a| is_host_a_stale(a, &netns_a) && a["state"] == "firing")
    })
    .unwrap_or_else(|| {
        panic!(
            "no firing StaleConntrackFlows for host A within 30 s of the redeploy: {:?}\n\
             stalewatch A printed {:?}",
            alerts(&prometheus),
            watch_a.records()
        )
    });
    let fired_after = redeployed.elapsed();
    assert_eq!(label(&firing, "severity"), "warning", "{firing}");
    assert_eq!(
        firing["annotations"]["summary"],
        format!(
            "host-a: 1 flow(s) to {SERVICE} pinned to {} (stale)",
            V4.old_backend
        ),
        "{firing}"
    );
    let description = firing["annotations"]["description"].as_str().unwrap_or("");
    assert!(
        description.contains(&format!("stalewatch check --netns {netns_a} --fix")),
        "{firing}"
    );
    assert!(
        watch_a
            .records()
            .iter()
            .any(|v| is_stale_flow(v, "raised", STALE_SPORT)),
        "stalewatch A raised the flow itself"
    );
    assert_quiet_on_b(&alerts(&prometheus), "Prometheus");
    eprintln!("firing in Prometheus {fired_after:.1?} after the redeploy");

    // Alertmanager delivers it to the webhook.
    let delivered = poll(secs(20), || {
        hook.bodies().into_iter().find(|b| {
            b["status"] == "firing"
                && b["alerts"].as_array().is_some_and(|alerts| {
                    alerts
                        .iter()
                        .any(|a| is_host_a_stale(a, &netns_a) && a["status"] == "firing")
                })
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "the webhook never received host A's firing alert: {:?}",
            hook.bodies()
        )
    });
    assert_eq!(delivered["receiver"], "test", "{delivered}");
    eprintln!(
        "delivered to the webhook {:.1?} after the redeploy",
        redeployed.elapsed()
    );

    // The fix: the stale entry deleted, as the alert's description says.
    let out = Command::new(binary())
        .args(["check", "--netns", &netns_a, "--fix", "--format", "json"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deleted: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "entry_deleted")
        .collect();
    assert_eq!(deleted.len(), 1, "{stdout}");
    assert_eq!(deleted[0]["orig"]["sport"], STALE_SPORT, "{stdout}");
    assert_eq!(out.status.code(), Some(0), "none left: {stdout}");
    assert!(
        !host_a.has_entry(STALE_SPORT, host_a.plan.old_backend)?,
        "the stale entry is gone"
    );
    let fixed = Instant::now();
    watch_a
        .wait_for(secs(30), |v| is_stale_flow(v, "resolved", STALE_SPORT))
        .unwrap_or_else(|| panic!("stalewatch A never resolved: {:?}", watch_a.records()));
    poll(secs(30), || {
        (!alerts(&prometheus)
            .iter()
            .any(|a| is_host_a_stale(a, &netns_a)))
        .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "host A's alert still active 30 s after the fix: {:?}",
            alerts(&prometheus)
        )
    });
    let resolved_after = fixed.elapsed();
    eprintln!("resolved in Prometheus {resolved_after:.1?} after the fix");
    poll(secs(30), || {
        hook.alerts()
            .into_iter()
            .find(|a| is_host_a_stale(a, &netns_a) && a["status"] == "resolved")
    })
    .unwrap_or_else(|| {
        panic!(
            "the webhook never received host A's resolution: {:?}",
            hook.bodies()
        )
    });
    eprintln!(
        "resolution delivered to the webhook {:.1?} after the fix",
        fixed.elapsed()
    );
    assert_quiet_on_b(&hook.alerts(), "the webhook");
    assert_quiet_on_b(&alerts(&prometheus), "Prometheus");

    // Host B's stalewatch stops answering: StalewatchDown (for: 2m) is
    // pending for host B in the job the rules read.
    stream_b.stop();
    let (status, _) = watch_b.stop()?;
    assert!(status.success());
    let down = poll(secs(15), || {
        alerts(&prometheus)
            .into_iter()
            .find(|a| label(a, "alertname") == "StalewatchDown" && label(a, "instance") == "host-b")
    })
    .unwrap_or_else(|| {
        panic!(
            "StalewatchDown never pending for host B: {:?}",
            alerts(&prometheus)
        )
    });
    assert_eq!(down["state"], "pending", "{down}");
    assert_eq!(label(&down, "job"), "stalewatch", "{down}");
    assert!(
        !alerts(&prometheus)
            .iter()
            .any(|a| label(a, "alertname") == "StalewatchDown" && label(a, "instance") == "host-a"),
        "host A still answers"
    );

    assert!(
        new_a.wait_from(src, 3, secs(10)),
        "after the fix host A's stream reaches the new container"
    );
    stream_a.stop();
    fresh_a.stop();
    let (status, _) = watch_a.stop()?;
    assert!(status.success());
    drop(prometheus);
    drop(alertmanager);
    Ok(())
}
