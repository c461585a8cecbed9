//! Figure 4's loads: what reading the NAT intent and auditing the
//! conntrack table against it cost. A kube-proxy-style nftables ruleset of
//! thousands of services in a namespace of its own, rewritten every few
//! seconds by a thread of the bench; the router's table filled with DNATed
//! entries; and the CPU of one-shot commands, their children's included.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    libc,
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{
    flood::{Flood, Spec},
    loads, procfs,
    tools::Tool,
    topo,
};
use crate::netns::Netns;

/// How often the rewriter changes the ruleset.
pub const REWRITE_EVERY: Duration = Duration::from_secs(3);

/// The most services a ruleset may have: addresses are 172.30.x.y and
/// 10.n.x.y, 256 x 256 of each.
pub const MAX_SERVICES: u32 = 65_536;

const TABLE: &str = "ip kube-proxy";

fn service_chain(i: u32) -> String {
    format!("service-{i:05}-bench/svc-{i}/tcp/http")
}

fn endpoint_chain(i: u32, k: u32) -> String {
    format!("endpoint-{i:05}-{k}-bench/svc-{i}/tcp/http")
}

/// Endpoint `k` (0 or 1) of service `i` in rewrite `generation`: the two
/// generations' endpoints are different pods.
fn endpoint_rule(i: u32, k: u32, generation: u32) -> String {
    format!(
        "add rule {TABLE} {} meta l4proto tcp dnat ip to 10.{}.{}.{}:8080\n",
        endpoint_chain(i, k),
        1 + 2 * (generation % 2) + k,
        i / 256,
        i % 256
    )
}

/// kube-proxy's nftables layout (`table ip kube-proxy`) with `services`
/// ClusterIPs: `services` maps `daddr . l4proto . dport` to one chain per
/// service, which picks one of two endpoint chains with `numgen random mod
/// 2`, each a `dnat`. One `nft -f` input that replaces the table whole.
pub fn ruleset(services: u32) -> String {
    let mut s = format!(
        "table {TABLE} {{\n\
         \tmap service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         \tchain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         \tchain nat-output {{ type nat hook output priority -100; policy accept; }}\n\
         \tchain services {{ }}\n\
         }}\n\
         delete table {TABLE}\n\
         table {TABLE} {{\n\
         \tmap service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         \tchain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         \tchain nat-output {{ type nat hook output priority -100; policy accept; }}\n\
         \tchain services {{ }}\n\
         }}\n\
         add rule {TABLE} nat-prerouting jump services\n\
         add rule {TABLE} nat-output jump services\n\
         add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n"
    );
    for i in 0..services {
        for k in 0..2 {
            let _ = writeln!(s, "add chain {TABLE} {}", endpoint_chain(i, k));
            s += &endpoint_rule(i, k, 0);
        }
        let svc = service_chain(i);
        let _ = writeln!(s, "add chain {TABLE} {svc}");
        let _ = writeln!(
            s,
            "add rule {TABLE} {svc} numgen random mod 2 vmap {{ 0 : goto {}, 1 : goto {} }}",
            endpoint_chain(i, 0),
            endpoint_chain(i, 1)
        );
        let _ = writeln!(
            s,
            "add element {TABLE} service-ips {{ 172.30.{}.{} . tcp . 80 : goto {svc} }}",
            i / 256,
            i % 256
        );
    }
    s
}

/// One rewrite, one transaction: the two endpoints of each service of
/// `block` move to the pods of `generation` (each endpoint chain flushed
/// and refilled); every service at once is a rollout of every deployment.
pub fn rewrite(block: std::ops::Range<u32>, generation: u32) -> String {
    let mut s = String::new();
    for i in block {
        for k in 0..2 {
            let _ = writeln!(s, "flush chain {TABLE} {}", endpoint_chain(i, k));
            s += &endpoint_rule(i, k, generation);
        }
    }
    s
}

/// What a one-shot command cost.
#[derive(Clone, Debug, Default)]
pub struct Cost {
    /// User + system CPU, seconds: the process's and its waited-for
    /// children's (wait4's rusage).
    pub cpu_s: f64,
    pub wall_s: f64,
    /// Its exit code; -N for signal N.
    pub code: i32,
    pub stderr: String,
}

/// Runs `args` to its end with `input` on stdin and stdout thrown away,
/// and returns its CPU from `wait4`. Bounded: killed (by PID) after
/// `limit`, or on Ctrl-C.
pub fn run_measured(args: &[&str], input: Option<String>, limit: Duration) -> anyhow::Result<Cost> {
    let (program, rest) = args.split_first().context("empty command")?;
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(rest)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.join(" ")))?;
    let writer = child.stdin.take().zip(input).map(|(mut pipe, text)| {
        thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        })
    });
    let mut pipe = child.stderr.take().context("stderr")?;
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: rusage is plain data; all-zero is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    loop {
        // SAFETY: wait4 on our own child, with valid out-pointers. The
        // child is reaped here, not by `Child::wait`, for its rusage.
        let rc = unsafe { libc::wait4(pid, &raw mut status, libc::WNOHANG, &raw mut usage) };
        if rc == pid {
            break;
        }
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err).context("wait4");
        }
        if !killed && (started.elapsed() > limit || super::interrupted()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed = true;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let wall_s = started.elapsed().as_secs_f64();
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stderr = reader.join().unwrap_or_default();
    if killed {
        if super::interrupted() {
            bail!("interrupted");
        }
        bail!(
            "`{}` still running after {} s, killed",
            args.join(" "),
            limit.as_secs()
        );
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Cost {
        cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
        wall_s,
        code: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -libc::WTERMSIG(status)
        },
        stderr,
    })
}

/// A thread of the bench that rewrites the ruleset of namespace `ns`
/// every [`REWRITE_EVERY`] (`ip netns exec NS nft -f -`), until stopped,
/// on Ctrl-C, or at its time limit.
pub struct Rewriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<Vec<Rewrite>>>>,
}

/// One rewrite: its `nft -f`, and when it was done.
pub struct Rewrite {
    pub cost: Cost,
    pub done: Instant,
}

impl Rewriter {
    /// Each rewrite moves the endpoints of `moved` services, the next
    /// block of them each time, round the ruleset's `services`.
    pub fn start(ns: &str, services: u32, moved: u32, limit: Duration) -> anyhow::Result<Rewriter> {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, ns) = (stop.clone(), ns.to_owned());
        let moved = moved.clamp(1, services.max(1));
        let blocks = services.div_ceil(moved);
        // The k-th rewrite's input: block k % blocks, moved to the pods
        // of generation 1 + k / blocks (the ruleset starts at 0).
        let input = move |k: u32| {
            let first = (k % blocks) * moved;
            rewrite(first..(first + moved).min(services), 1 + k / blocks)
        };
        // Every service at once: the two generations' inputs, made once.
        let whole = (blocks == 1).then(|| [input(1), input(0)]);
        let thread = thread::Builder::new()
            .name("rewriter".into())
            .spawn(move || {
                let started = Instant::now();
                let most = (limit.as_secs_f64() / REWRITE_EVERY.as_secs_f64()).ceil() as u32 + 1;
                let mut costs = Vec::new();
                let mut next = started + REWRITE_EVERY;
                while !s.load(Ordering::Relaxed)
                    && !super::interrupted()
                    && started.elapsed() < limit
                    && (costs.len() as u32) < most
                {
                    if Instant::now() < next {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let k = costs.len() as u32;
                    let text = match &whole {
                        Some(inputs) => inputs[(k % 2) as usize].clone(),
                        None => input(k),
                    };
                    let cost = run_measured(
                        &["ip", "netns", "exec", &ns, "nft", "-f", "-"],
                        Some(text),
                        Duration::from_secs(60),
                    )?;
                    if cost.code != 0 {
                        bail!("nft -f failed ({}): {}", cost.code, cost.stderr.trim());
                    }
                    costs.push(Rewrite {
                        cost,
                        done: Instant::now(),
                    });
                    // On the grid: a rewrite that took longer than the
                    // period is followed by the next one at once.
                    while next <= Instant::now() {
                        next += REWRITE_EVERY;
                    }
                }
                Ok(costs)
            })?;
        Ok(Rewriter {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the rewriter; each rewrite.
    pub fn stop(mut self) -> anyhow::Result<Vec<Rewrite>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the rewriter thread panicked"),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for Rewriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The fill of figure 4b: `flows` flows through the router's healthy DNAT,
/// each sent twice (a packet lost on the way leaves a flow without an
/// entry), at a rate the sink keeps up with. UDP entries of flows that
/// got no reply live 30 s after their last packet.
pub fn fill_spec(flows: u32) -> Spec {
    const RATE: u64 = 100_000;
    let packets = 2 * u64::from(flows);
    Spec {
        dst: topo::ROUTER_LAN,
        dport: topo::HEALTHY_PORT,
        flows,
        first_sport: 30_000,
        ttl: 64,
        rate: Some(RATE),
        limit: Duration::from_secs(packets / RATE + 5),
        max_packets: packets,
    }
}

/// One run of figure 4a: `stalewatch watch` in the rules namespace, with
/// the ruleset rewritten or left alone.
#[derive(Clone, Debug, Default)]
pub struct RulesRun {
    /// stalewatch's CPU and its children's over the window after its first
    /// reading, % of one core (/proc/<pid>/stat, children once reaped).
    pub cpu: f64,
    pub window_s: f64,
    /// Readings logged within the window: whole readings and walks of
    /// announced changes.
    pub readings_in_window: u64,
    /// Of those, walks of announced changes.
    pub walks_in_window: u64,
    /// For each rewrite, how long after its `nft -f` the intent took it
    /// (the next walk or reading logged), seconds; rewrites not taken
    /// before the window ended are counted apart.
    pub taken_after_s: Vec<f64>,
    pub untaken: u64,
    /// Every reading's duration as stalewatch logged it, the first included.
    pub durations: Vec<f64>,
    /// The first reading: stalewatch's CPU and its children's from
    /// "attached" to the reading's log line, seconds.
    pub first_cpu_s: f64,
    /// DNAT rules the last reading found.
    pub rules: Option<u64>,
    /// Each rewrite's `nft -f`, when rewritten.
    pub rewrites: Vec<Cost>,
    /// Services moved per rewrite (0: not rewritten).
    pub moved: u32,
    /// How stalewatch failed on its way out, if it did.
    pub exit_failure: Option<String>,
}

/// Readings logged so far.
fn logged(tool: &Tool) -> u64 {
    tool.stderr_lines()
        .iter()
        .filter(|l| l.contains("NAT intent of "))
        .count() as u64
}

/// Walks of announced changes logged so far.
fn walked(tool: &Tool) -> u64 {
    tool.stderr_lines()
        .iter()
        .filter(|l| l.contains("announced changes taken"))
        .count() as u64
}

/// One run of figure 4a in namespace `ns` holding `services` services,
/// `moved` of them moved every [`REWRITE_EVERY`] (none: not rewritten).
pub fn rules_run(
    bin: &Path,
    ns: &str,
    services: u32,
    moved: Option<u32>,
    window: Duration,
) -> anyhow::Result<RulesRun> {
    let mut tool = Tool::stalewatch_with(bin, ns, loads::max_flows(0), true, Some("info"))?;
    let pid = tool.pid();
    let attached = procfs::cpu_with_children_s(pid)?;
    // The first reading comes with the first audit, right after attaching:
    // thousands of services take the tools seconds (more on a busy machine).
    let until = Instant::now() + Duration::from_secs(300);
    while logged(&tool) == 0 {
        if !tool.running() {
            bail!(
                "stalewatch exited before reading the intent: {}",
                tool.stderr_text().replace('\n', "; ")
            );
        }
        if Instant::now() > until {
            bail!("stalewatch read no NAT intent within 300 s");
        }
        super::sleep(Duration::from_millis(20))?;
    }
    let mut r = RulesRun::default();
    let cpu0 = procfs::cpu_with_children_s(pid)?;
    r.first_cpu_s = cpu0 - attached;
    let (count0, walks0, at0) = (logged(&tool), walked(&tool), Instant::now());
    let rewriter = match moved {
        Some(moved) => Some(Rewriter::start(
            ns,
            services,
            moved,
            window + Duration::from_secs(2),
        )?),
        None => None,
    };
    // When each reading or walk was logged, seen every 20 ms.
    let mut taken_at = Vec::new();
    let mut seen = count0;
    let mut slept = Ok(());
    while at0.elapsed() < window {
        if let Err(e) = super::sleep(Duration::from_millis(20)) {
            slept = Err(e);
            break;
        }
        let n = logged(&tool);
        if n > seen {
            taken_at.push(Instant::now());
            seen = n;
        }
    }
    let cpu1 = procfs::cpu_with_children_s(pid);
    let (count1, walks1, at1) = (logged(&tool), walked(&tool), Instant::now());
    let rewrites = rewriter.map(Rewriter::stop).transpose();
    slept?;
    let rewrites = rewrites?.unwrap_or_default();
    // The last rewrites are taken after the window: watched for 12 s
    // more, their CPU left out.
    if let Some(last) = rewrites.last().map(|w| w.done) {
        while last.elapsed() < Duration::from_secs(12) && taken_at.last().is_none_or(|t| *t < last)
        {
            super::sleep(Duration::from_millis(20))?;
            let n = logged(&tool);
            if n > seen {
                taken_at.push(Instant::now());
                seen = n;
            }
        }
    }
    for w in &rewrites {
        match taken_at.iter().find(|t| **t >= w.done) {
            Some(t) => r.taken_after_s.push(t.duration_since(w.done).as_secs_f64()),
            None => r.untaken += 1,
        }
    }
    r.rewrites = rewrites.into_iter().map(|w| w.cost).collect();
    r.moved = moved.unwrap_or(0);
    r.window_s = at1.duration_since(at0).as_secs_f64();
    r.cpu = 100.0 * (cpu1? - cpu0) / r.window_s;
    r.readings_in_window = count1 - count0;
    r.walks_in_window = walks1 - walks0;
    let stopped = tool.stop()?;
    if !stopped.killed && !stopped.status.success() {
        let why = stopped.stderr.last().cloned().unwrap_or_default();
        r.exit_failure = Some(format!("{} ({})", stopped.status, why.trim()));
    }
    r.durations = readings(&stopped.stderr);
    r.rules = rules_read(&stopped.stderr);
    Ok(r)
}

/// One run of figure 4b: `stalewatch check` and `conntrack -L` on the
/// router's table, one after the other.
#[derive(Clone, Debug, Default)]
pub struct AuditRun {
    /// Entries in the router's table before and after the two.
    pub entries_before: u64,
    pub entries_after: u64,
    pub check: Cost,
    pub list: Cost,
    /// The same two on the emptied table just before: their fixed cost
    /// (starting, the namespace's facts, the intent).
    pub empty_check: Cost,
    pub empty_list: Cost,
    /// What check said: entries checked, stale found.
    pub checked: Option<u64>,
    pub stale: Option<u64>,
    /// Whether check ran first.
    pub check_first: bool,
    /// `stalewatch watch` on the router, auditing every 2 s while the
    /// table fills: its audits' CPU (as it logs them) once its mirror of
    /// the DNATed entries holds the table...
    pub watch_audits: Vec<f64>,
    /// ... and on the emptied table before the fill (its fixed cost).
    pub watch_empty_audit: f64,
    /// DNATed entries its mirror held at those audits (median).
    pub watch_mirrored: Option<u64>,
    /// Its CPU while the table filled and the events came (schedstat),
    /// without the audits it logged meanwhile.
    pub watch_fill_cpu_s: f64,
    /// Its VmRSS before the fill and after, KiB.
    pub watch_rss_kib: (u64, u64),
    /// Times it read the table again while the table filled (lost events).
    pub watch_rereads: u64,
    /// The CPU of its readings of the events while the table filled, as
    /// it logs them, seconds; and the entries they said were made.
    pub watch_events_cpu_s: f64,
    pub watch_events_made: u64,
}

/// The watch's lines for its readings of conntrack events: `conntrack
/// events of PATH: M entries made, G gone..., in CPU D`: (M, D seconds).
pub fn events_line(line: &str) -> Option<(u64, f64)> {
    let (_, after) = line.split_once("conntrack events of ")?;
    let made = after
        .split_once(" entries made")?
        .0
        .rsplit_once(": ")?
        .1
        .parse()
        .ok()?;
    let cpu = debug_duration(after.rsplit_once("in CPU ")?.1.trim())?;
    Some((made, cpu))
}

fn events_read(tool: &Tool) -> Vec<(u64, f64)> {
    tool.stderr_lines()
        .iter()
        .filter_map(|l| events_line(l))
        .collect()
}

/// How many times the watch read its conntrack table (its mirror's log).
fn rereads(tool: &Tool) -> u64 {
    tool.stderr_lines()
        .iter()
        .filter(|l| l.contains("conntrack mirror of ") && l.contains(" entries read"))
        .count() as u64
}

/// Log filter of the watch in figure 4b: its audit lines.
const AUDIT_LOG: &str =
    "warn,stalewatch::command::watch::audit=debug,stalewatch::source::conntrack=debug";

/// One of the watch's audit lines: `audit of PATH: N entries judged (M
/// DNATed from conntrack events), K findings, in WALL (CPU CPU)`: M (None
/// when it read the table instead) and CPU in seconds.
pub fn audit_line(line: &str) -> Option<(Option<u64>, f64)> {
    let (_, after) = line.split_once("audit of ")?;
    let cpu = debug_duration(after.rsplit_once("(CPU ")?.1.trim_end().strip_suffix(')')?)?;
    let mirrored = after
        .split_once(" DNATed from conntrack events")
        .and_then(|(before, _)| before.rsplit_once('(')?.1.parse().ok());
    Some((mirrored, cpu))
}

fn audits(tool: &Tool) -> Vec<(Option<u64>, f64)> {
    tool.stderr_lines()
        .iter()
        .filter_map(|l| audit_line(l))
        .collect()
}

/// Waits until the watch has logged more than `after` audits and the last
/// satisfies `ok`; None after `limit`.
fn wait_audit(
    tool: &mut Tool,
    after: usize,
    limit: Duration,
    ok: impl Fn(&(Option<u64>, f64)) -> bool,
) -> anyhow::Result<Option<usize>> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let seen = audits(tool);
        if seen.len() > after && seen.last().is_some_and(&ok) {
            return Ok(Some(seen.len()));
        }
        if !tool.running() {
            bail!(
                "stalewatch watch exited: {}",
                tool.stderr_text().replace('\n', "; ")
            );
        }
        super::sleep(Duration::from_millis(50))?;
    }
    Ok(None)
}

/// Empties the router's table (figure 3's entries would be audited too)
/// and measures check and `conntrack -L` on it; then fills it with
/// `entries` DNATed flows (sent twice each; their entries live 30 s) and
/// measures them again. Each time in the order `check_first` says.
pub fn audit_run(
    bin: &Path,
    sender: &Netns,
    router: &Netns,
    entries: u32,
    check_first: bool,
) -> anyhow::Result<AuditRun> {
    let limit = Duration::from_secs(120);
    let bin = bin.to_string_lossy();
    let check = || {
        run_measured(
            &[&bin, "check", "--netns", &router.name, "--format", "json"],
            None,
            limit,
        )
    };
    let list = || {
        run_measured(
            &["ip", "netns", "exec", &router.name, "conntrack", "-L"],
            None,
            limit,
        )
    };
    let both = || -> anyhow::Result<(Cost, Cost)> {
        Ok(if check_first {
            let c = check()?;
            (c, list()?)
        } else {
            let l = list()?;
            (check()?, l)
        })
    };
    router.exec(&["conntrack", "-F"])?;
    let (empty_check, empty_list) = both()?;
    // The watch audits every 2 s; its mirror opens at its first audit.
    let mut watch = Tool::stalewatch_args(
        Path::new(&*bin),
        &router.name,
        loads::max_flows(0),
        true,
        Some(AUDIT_LOG),
        &["--audit-every", "2s"],
    )?;
    let pid = watch.pid();
    let mirrored = |a: &(Option<u64>, f64)| a.0.is_some();
    let Some(before_fill) = wait_audit(&mut watch, 0, Duration::from_secs(60), mirrored)? else {
        bail!(
            "stalewatch watch logged no audit from its conntrack mirror within 60 s: {}",
            watch.stderr_text().replace('\n', "; ")
        );
    };
    let watch_empty_audit = audits(&watch)[before_fill - 1].1;
    let rss0 = procfs::memory_kib(pid)?.0;
    let cpu0 = procfs::CpuSample::take(pid)?;
    let reads0 = rereads(&watch);
    let events0 = events_read(&watch).len();
    let spec = fill_spec(entries);
    let until = Instant::now() + spec.limit + Duration::from_secs(2);
    let mut flood = Flood::start(sender, spec)?;
    while !flood.finished() && Instant::now() < until {
        super::sleep(Duration::from_millis(20))?;
    }
    flood.stop()?;
    // The watch reads the events once a second.
    super::sleep(Duration::from_millis(1500))?;
    let cpu1 = procfs::CpuSample::take(pid)?;
    let watch_rereads = rereads(&watch) - reads0;
    let events = events_read(&watch);
    let events = &events[events0.min(events.len())..];
    let watch_events_cpu_s = events.iter().map(|e| e.1).sum();
    let watch_events_made = events.iter().map(|e| e.0).sum();
    let during = audits(&watch);
    let audited_meanwhile: f64 = during[before_fill.min(during.len())..]
        .iter()
        .map(|a| a.1)
        .sum();
    let watch_fill_cpu_s = cpu1.sched_s - cpu0.sched_s - audited_meanwhile;
    // Three audits of the whole table, from the mirror.
    let full = |a: &(Option<u64>, f64)| a.0.is_some_and(|n| n as f64 >= 0.9 * f64::from(entries));
    let mut watch_audits = Vec::new();
    let mut watch_mirrored = Vec::new();
    let mut seen = during.len();
    for _ in 0..3 {
        match wait_audit(&mut watch, seen, Duration::from_secs(10), full)? {
            Some(n) => {
                let last = audits(&watch)[n - 1];
                watch_audits.push(last.1);
                watch_mirrored.push(last.0.unwrap_or(0) as f64);
                seen = n;
            }
            None => break,
        }
    }
    let rss1 = procfs::memory_kib(pid)?.0;
    watch.stop()?;
    let count =
        || -> anyhow::Result<u64> { Ok(router.exec(&["conntrack", "-C"])?.trim().parse()?) };
    let entries_before = count()?;
    let (check, list) = both()?;
    let mut r = AuditRun {
        entries_before,
        entries_after: count()?,
        check,
        list,
        empty_check,
        empty_list,
        check_first,
        watch_audits,
        watch_empty_audit,
        watch_mirrored: super::table::median(&watch_mirrored).map(|m| m as u64),
        watch_fill_cpu_s,
        watch_rss_kib: (rss0, rss1),
        watch_rereads,
        watch_events_cpu_s,
        watch_events_made,
        ..AuditRun::default()
    };
    // "stalewatch: N conntrack entries checked, M stale"
    let said = r
        .check
        .stderr
        .lines()
        .rev()
        .find(|l| l.contains(" conntrack entries checked"))
        .unwrap_or("");
    let number_before = |word: &str| -> Option<u64> {
        let at = said.find(word)?;
        said[..at].split_whitespace().last()?.parse().ok()
    };
    r.checked = number_before(" conntrack entries checked");
    r.stale = number_before(" stale");
    if r.check.code > 1 || r.empty_check.code > 1 {
        bail!(
            "stalewatch check failed ({}): {}",
            r.check.code,
            r.check.stderr.trim()
        );
    }
    if r.list.code != 0 || r.empty_list.code != 0 {
        bail!(
            "conntrack -L failed ({}): {}",
            r.list.code,
            r.list.stderr.trim()
        );
    }
    Ok(r)
}

/// The durations of stalewatch's intent readings, from its info log lines
/// `NAT intent of PATH: N DNAT rules (ENGINES), read in DURATION`, in
/// seconds; the duration as Rust's `Debug` prints it (`2.5s`, `31.2ms`).
pub fn readings(stderr: &[String]) -> Vec<f64> {
    stderr
        .iter()
        .filter(|l| l.contains("NAT intent of "))
        .filter_map(|l| debug_duration(l.rsplit_once(", read in ")?.1.trim()))
        .collect()
}

/// The number of DNAT rules the last reading found.
pub fn rules_read(stderr: &[String]) -> Option<u64> {
    let line = stderr.iter().rev().find(|l| l.contains("NAT intent of "))?;
    let (_, after) = line.split_once("NAT intent of ")?;
    let (_, after) = after.split_once(": ")?;
    after.split_whitespace().next()?.parse().ok()
}

fn debug_duration(text: &str) -> Option<f64> {
    for (unit, scale) in [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)] {
        if let Some(v) = text.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines() {
        let lines = [
            "[2026-12-01T10:00:00Z INFO  stalewatch::command::watch::rules] NAT intent of /run/netns/swb1-rules: 10000 DNAT rules (nftables), read in 2.51234s",
            "[2026-12-01T10:05:03Z INFO  stalewatch::command::watch::rules] NAT intent of /run/netns/swb1-rules: 10000 DNAT rules (nftables), read in 312.5ms",
            "stalewatch: attached",
        ]
        .map(String::from);
        assert_eq!(readings(&lines), vec![2.51234, 0.3125]);
        assert_eq!(rules_read(&lines), Some(10_000));
        let micros = debug_duration("12.5µs").expect("parsed");
        let audit = "[DEBUG stalewatch::command::watch::audit] audit of /run/netns/swb1-rtr: 50100 entries judged (50000 DNATed from conntrack events), 0 findings, in 31.2ms (CPU 29.5ms)";
        let (mirrored, cpu) = audit_line(audit).expect("parsed");
        assert_eq!(mirrored, Some(50_000));
        assert!((cpu - 0.0295).abs() < 1e-9, "{cpu}");
        let events = "[DEBUG stalewatch::command::watch::audit] conntrack events of /run/netns/x: 5082 entries made, 0 gone, 5083 held, in CPU 5.248633ms";
        let (made, cpu) = events_line(events).expect("parsed");
        assert_eq!(made, 5082);
        assert!((cpu - 0.005248633).abs() < 1e-12, "{cpu}");
        let dumped = "[DEBUG stalewatch::command::watch::audit] audit of /run/netns/x: 3 entries judged (read from the table), 0 findings, in 1.5ms (CPU 1.2ms)";
        let (mirrored, cpu) = audit_line(dumped).expect("parsed");
        assert_eq!(mirrored, None);
        assert!((cpu - 0.0012).abs() < 1e-9, "{cpu}");
        assert!((micros - 12.5e-6).abs() < 1e-12);
    }

    #[test]
    fn rulesets() {
        let r = ruleset(3);
        assert!(r.contains("add element ip kube-proxy service-ips { 172.30.0.2 . tcp . 80 : goto service-00002-bench/svc-2/tcp/http }"));
        assert!(r.contains("dnat ip to 10.2.0.1:8080"));
        let w = rewrite(0..3, 1);
        assert!(w.contains("flush chain ip kube-proxy endpoint-00001-0-bench/svc-1/tcp/http"));
        assert!(w.contains("dnat ip to 10.3.0.1:8080"));
        assert_eq!(w.lines().count(), 12);
    }
}
