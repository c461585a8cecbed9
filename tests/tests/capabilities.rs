//! The capability set that packaging/ grants stalewatch (the systemd unit
//! and the DaemonSet), proven on the real binary: run as an unprivileged
//! user (nobody) under `setpriv` with exactly that set as ambient
//! capabilities and no-new-privs, it attaches, raises a stale flow and
//! audits another namespace's conntrack table; with any one capability
//! fewer, the part that needs it fails with exit code 2 and one line.
//!
//! Keep CAPS in step with packaging/systemd/stalewatch.service,
//! packaging/kubernetes/daemonset.yaml and packaging/README.md.

use std::{
    io::Read,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalewatch_tests::{
    netns::Netns,
    story::{Rules, Story, Variant},
    traffic::Receiver,
    watcher::{Watcher, binary, is_stale_flow},
};

/// The set, by setpriv's names, with each capability's number (for
/// checking the process's own view in /proc/PID/status).
const CAPS: [(&str, u32); 3] = [
    // setns() into the namespace whose conntrack table is read. The kernel
    // also takes it in place of CAP_BPF and CAP_PERFMON (see
    // `bpf_and_perfmon_load_but_enter_no_namespace`).
    ("sys_admin", 21),
    // ctnetlink: dump, get and delete conntrack entries.
    ("net_admin", 12),
    // Open /proc/PID/ns/net of other users' processes: namespaces without
    // a name under /run/netns (and the PID and container in an alert).
    ("sys_ptrace", 19),
];

/// nobody: no file of its own, no privilege but the capabilities given.
const UID: &str = "65534";
const STALE_SPORT: u16 = 40000;
const NEW_SPORT: u16 = 40001;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The binary under test, copied where nobody can run it: the checkout
/// may sit under a directory that other users cannot enter (/root), and
/// the test must fail for capabilities, never for that.
struct NobodysBinary {
    dir: PathBuf,
    path: PathBuf,
}

impl NobodysBinary {
    fn new() -> NobodysBinary {
        let dir = std::env::temp_dir().join(format!("swcaps{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.join("stalewatch");
        std::fs::copy(binary(), &path)
            .unwrap_or_else(|e| panic!("copying {}: {e}", binary().display()));
        NobodysBinary { dir, path }
    }

    /// `setpriv ... stalewatch ARGS`, as nobody with exactly `caps`:
    /// inheritable, ambient and bounding sets alike, supplementary groups
    /// cleared, no-new-privs set (as NoNewPrivileges= in the unit).
    fn command(&self, caps: &[&str], args: &[&str]) -> Command {
        let list: String = caps.iter().map(|c| format!(",+{c}")).collect();
        let set = format!("-all{list}");
        let mut cmd = Command::new("setpriv");
        cmd.args([
            format!("--reuid={UID}"),
            format!("--regid={UID}"),
            "--clear-groups".into(),
            "--no-new-privs".into(),
            format!("--inh-caps={set}"),
            format!("--ambient-caps={set}"),
            format!("--bounding-set={set}"),
        ])
        .arg(&self.path)
        .args(args);
        cmd
    }

    /// `stalewatch watch --format json ARGS` with `caps`, once attached.
    fn watch(&self, caps: &[&str], args: &[&str]) -> anyhow::Result<Watcher> {
        let mut cmd = self.command(caps, &["watch", "--format", "json"]);
        cmd.args(args);
        Watcher::start_command(cmd, false)
    }

    /// Runs stalewatch ARGS with `caps` to its end, at most `limit`;
    /// returns the exit code (-1 when killed at the limit), stdout and the
    /// lines of stderr.
    fn run(&self, caps: &[&str], args: &[&str], limit: Duration) -> (i32, String, Vec<String>) {
        let mut child = self
            .command(caps, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("setpriv runs");
        // Read both pipes while waiting, so a full pipe cannot stall it.
        let drain = |mut pipe: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut text = String::new();
                pipe.read_to_string(&mut text).ok();
                text
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("stdout")));
        let err = drain(Box::new(child.stderr.take().expect("stderr")));
        let until = Instant::now() + limit;
        let code = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                kill_own(&mut child);
                break -1;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let out = out.join().expect("stdout reader");
        let err = err.join().expect("stderr reader");
        (code, out, err.lines().map(str::to_owned).collect())
    }
}

impl Drop for NobodysBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn all_caps() -> Vec<&'static str> {
    CAPS.iter().map(|(name, _)| *name).collect()
}

/// Ends a child of this test, by its PID only.
fn kill_own(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A process that lives in `ns`, so that the namespace has a
/// /proc/PID/ns/net path owned by root (as a container's has).
struct Resident(Child);

impl Resident {
    fn start(ns: &Netns) -> Resident {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sleep", "120"])
            .stdin(Stdio::null())
            .spawn()
            .expect("ip netns exec sleep");
        let resident = Resident(child);
        // `ip netns exec` execs sleep after entering: wait for that.
        let link = format!("/proc/{}/ns/net", resident.0.id());
        let want = format!("net:[{}]", ns.inode().expect("inode"));
        let until = Instant::now() + secs(5);
        let inside =
            || std::fs::read_link(&link).is_ok_and(|l| l.to_string_lossy() == want.as_str());
        while !inside() {
            assert!(
                Instant::now() < until,
                "the resident never entered {}",
                ns.name
            );
            thread::sleep(Duration::from_millis(20));
        }
        resident
    }

    fn netns_path(&self) -> String {
        format!("/proc/{}/ns/net", self.0.id())
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        kill_own(&mut self.0);
    }
}

/// The process's uid and effective capabilities, from /proc/PID/status.
fn uid_and_caps(pid: u32) -> (String, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .expect("field")
            .split_whitespace()
            .next()
            .expect("value")
            .to_owned()
    };
    let caps = u64::from_str_radix(&field("CapEff:"), 16).expect("hex");
    (field("Uid:"), caps)
}

fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// With exactly the set, as nobody: attached, the stale flow raised with
/// its current backend (a conntrack query inside the router's namespace),
/// no permission warning from the periodic audit, a clean stop; then
/// `check` audits the router's table by name and by /proc/PID/ns/net.
#[test]
fn the_set_is_enough_as_nobody() -> anyhow::Result<()> {
    let bin = NobodysBinary::new();
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let router = story.router.name.clone();
    let old_service = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    let watcher = bin.watch(&all_caps(), &["--netns", &router, "--audit-every", "1s"])?;
    let (uid, caps) = uid_and_caps(watcher.pid());
    assert_eq!(uid, UID, "runs as nobody");
    let want: u64 = CAPS.iter().map(|(_, bit)| 1u64 << bit).sum();
    assert_eq!(caps, want, "effective capabilities are exactly the set");

    let _played = story.play(old_service, STALE_SPORT, NEW_SPORT)?;

    let raised = watcher
        .wait_for(secs(20), |v| is_stale_flow(v, "raised", STALE_SPORT))
        .unwrap_or_else(|| panic!("no stale_flow raised as nobody: {:?}", watcher.records()));
    // Its current backend: only a conntrack dump in the router's namespace
    // (setns + ctnetlink) knows where new flows go.
    story.assert_raised(&raised, STALE_SPORT);
    let log = watcher.stderr_text();
    assert!(
        !log.contains("not permitted") && !log.contains("denied") && !log.contains("WARN"),
        "no permission problem in the log: {log}"
    );
    // The set is enough for the fast path too, not only for the helpers'.
    assert!(
        log.contains("conntrack entries read through bpf_rdonly_cast"),
        "{log}"
    );
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "clean stop: {status}");

    let resident = Resident::start(&story.router);
    for netns in [router.clone(), resident.netns_path()] {
        let (code, out, err) = bin.run(
            &all_caps(),
            &["check", "--format", "json", "--netns", &netns],
            secs(20),
        );
        // 1: stale entries found (0 would mean an empty or unread table).
        assert_eq!(code, 1, "check --netns {netns}: {err:?} {out}");
        let found = records(&out);
        assert!(
            found.iter().any(|r| r["type"] == "stale_entry"
                && r["orig"]["sport"] == STALE_SPORT
                && r["netns"]["inode"] == story.router.inode().unwrap()),
            "check --netns {netns} finds the stale entry: {found:?}"
        );
    }
    Ok(())
}

/// With each capability in turn left out, what needs it first fails at
/// once, with exit code 2 and one line on stderr that says what could not
/// be done.
#[test]
fn one_capability_fewer_fails_clearly() -> anyhow::Result<()> {
    let bin = NobodysBinary::new();
    let ns = Netns::new("caps")?;
    let resident = Resident::start(&ns);
    let by_proc = resident.netns_path();
    for (missing, _) in CAPS {
        let caps: Vec<&str> = all_caps().into_iter().filter(|c| *c != missing).collect();
        let (args, says): (Vec<&str>, &str) = match missing {
            // Loading the programs is the first thing watch does.
            "sys_admin" => (
                vec!["watch", "--format", "json", "--netns", &ns.name],
                "eBPF",
            ),
            "net_admin" => (
                vec!["check", "--format", "json", "--netns", &ns.name],
                "conntrack",
            ),
            "sys_ptrace" => (
                vec!["check", "--format", "json", "--netns", &by_proc],
                &by_proc,
            ),
            other => unreachable!("{other} has no case"),
        };
        let (code, out, err) = bin.run(&caps, &args, secs(20));
        eprintln!(
            "without {missing}: {}: exit {code}: {err:?}",
            args.join(" ")
        );
        assert_eq!(
            code, 2,
            "without {missing}, {args:?} exits 2: {err:?} {out}"
        );
        assert_eq!(
            err.len(),
            1,
            "without {missing}: one line on stderr: {err:?}"
        );
        assert!(
            err[0].starts_with("stalewatch: ") && err[0].contains(says),
            "without {missing}: the line names what failed ({says}): {}",
            err[0]
        );
        assert!(
            out.is_empty(),
            "without {missing}: nothing on stdout: {out}"
        );
    }
    Ok(())
}

/// Why the set holds CAP_SYS_ADMIN rather than CAP_BPF + CAP_PERFMON: these
/// two load and attach the programs, but no conntrack table outside
/// stalewatch's own namespace can be read without setns(), which takes
/// CAP_SYS_ADMIN. (Docker 20.10, the engine here, cannot grant CAP_BPF at
/// all.)
#[test]
fn bpf_and_perfmon_load_but_enter_no_namespace() -> anyhow::Result<()> {
    let bin = NobodysBinary::new();
    let ns = Netns::new("caps")?;
    let narrow = ["bpf", "perfmon", "net_admin", "sys_ptrace"];
    // Without the audit, which reads the namespace's table, watch attaches.
    let watcher = bin.watch(&narrow, &["--netns", &ns.name, "--audit-every", "0s"])?;
    let (status, _) = watcher.stop()?;
    assert!(status.success(), "attached and stopped cleanly: {status}");
    // With it, watch says at start that it cannot enter the namespace.
    let (code, _, err) = bin.run(
        &narrow,
        &["watch", "--format", "json", "--netns", &ns.name],
        secs(20),
    );
    assert_eq!(code, 2, "{err:?}");
    assert!(
        err.len() == 1 && err[0].contains("cannot enter network namespace"),
        "{err:?}"
    );

    let (code, _, err) = bin.run(
        &narrow,
        &["check", "--format", "json", "--netns", &ns.name],
        secs(20),
    );
    assert_eq!(code, 2, "{err:?}");
    assert!(
        err.len() == 1 && err[0].contains("cannot enter network namespace"),
        "{err:?}"
    );
    Ok(())
}

/// The unit grants exactly the set, as ambient and bounding capabilities,
/// and `systemd-analyze verify` accepts it (with ExecStart pointed at the
/// binary under test, since /usr/bin/stalewatch need not exist here).
/// systemd is not PID 1 on our machines, so the unit itself is not started.
#[test]
fn the_unit_grants_the_set_and_verifies() -> anyhow::Result<()> {
    let source =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/stalewatch.service");
    let unit = std::fs::read_to_string(&source)?;
    let want: Vec<String> = all_caps()
        .iter()
        .map(|c| format!("CAP_{}", c.to_uppercase()))
        .collect();
    for key in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
        let granted: Vec<String> = unit
            .lines()
            .filter_map(|l| l.strip_prefix(key))
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect();
        assert_eq!(granted, want, "{key}");
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("stalewatch.service");
    let bin = binary().to_string_lossy().into_owned();
    std::fs::write(&copy, unit.replace("/usr/bin/stalewatch", &bin))?;
    // The optional drop-ins (engine socket, metrics), next to it as
    // systemd would find them.
    let drop_ins = source.with_extension("service.d");
    std::fs::create_dir_all(dir.join("stalewatch.service.d"))?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&drop_ins)? {
        let path = entry?.path();
        let name = path.file_name().expect("a name").to_owned();
        let text = std::fs::read_to_string(&path)?.replace("/usr/bin/stalewatch", &bin);
        // What the metrics drop-in starts is a command line stalewatch
        // takes (it stops at the namespace that does not exist).
        if let Some(exec) = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("ExecStart=").filter(|e| !e.is_empty()))
        {
            let mut words = exec.split_whitespace();
            let out = Command::new(words.next().expect("a binary"))
                .args(words)
                .args(["--netns", "swcaps-no-such-netns"])
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.code() == Some(2) && err.contains("swcaps-no-such-netns"),
                "{exec}: {err}"
            );
        }
        std::fs::write(dir.join("stalewatch.service.d").join(&name), text)?;
        names.push(name.to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(names, ["docker.conf", "metrics.conf"]);
    let verify = Command::new("systemd-analyze")
        .args(["verify", &copy.to_string_lossy()])
        .output();
    // At debug level it also lists the drop-ins it loaded.
    let loaded = Command::new("systemd-analyze")
        .args(["verify", &copy.to_string_lossy()])
        .env("SYSTEMD_LOG_LEVEL", "debug")
        .output();
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", &copy.to_string_lossy()])
        .output();
    std::fs::remove_dir_all(&dir)?;
    let verify = verify?;
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let loaded = loaded?;
    let log = String::from_utf8_lossy(&loaded.stdout).into_owned()
        + &String::from_utf8_lossy(&loaded.stderr);
    for name in &names {
        assert!(
            log.contains(&format!(
                "DropIn Path: {}",
                dir.join("stalewatch.service.d").join(name).display()
            )),
            "{name} not loaded"
        );
    }
    // The exposure score systemd gives the sandbox (0 best, 10 worst).
    let security = String::from_utf8_lossy(&security?.stdout).into_owned();
    let score: f64 = security
        .lines()
        .find_map(|l| l.split("exposure level for stalewatch.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {security}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score <= 3.0, "the sandbox got weaker: exposure {score}");
    Ok(())
}
