//! Project tasks: `cargo xtask setup | build | dist | test | demo | bench`.
//!
//! `setup` installs everything a fresh Debian 12 machine lacks (see
//! shared/docs/KERNEL_AND_TOOLCHAIN.md for why bpf-linker is built this way),
//! so that a person or CI only ever runs `cargo xtask <verb>`.

mod dist;

use std::env;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, exit};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_FEATURE: &str = "llvm-22";

/// Commands the tests and the demo run, with the Debian package providing each.
const DEBIAN_TOOLS: &[(&str, &str)] = &[
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    // The metrics test scrapes with a real HTTP client.
    ("curl", "curl"),
    // A static busybox for the Docker tests' FROM-scratch image.
    ("busybox", "busybox-static"),
    // The packaging tests: a capability set under setpriv, the systemd
    // unit checked offline, the Kubernetes validator in a virtualenv.
    ("setpriv", "util-linux"),
    ("systemd-analyze", "systemd"),
    // The unit under a real systemd: a Debian root filesystem for its
    // container.
    ("debootstrap", "debootstrap"),
    ("virtualenv", "python3-virtualenv"),
    // The alerting rules' unit tests (promtool), and end to end: a real
    // Prometheus server (same package) scraping two stalewatch instances,
    // delivering through a real Alertmanager.
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("prometheus-alertmanager", "prometheus-alertmanager"),
];

/// The Podman tests and `demo --podman`: Debian's podman 4.3 with netavark
/// 1.4 (its network backend) and aardvark-dns, and podman-compose. Its
/// runtime is runc, which the Docker engine's packages already bring (crun,
/// the other choice, cannot run under these machines' cgroups).
const PODMAN_TOOLS: &[(&str, &str)] = &[("podman", "podman"), ("podman-compose", "podman-compose")];
const PODMAN_PACKAGES: &[&str] = &["netavark", "aardvark-dns"];
/// Where Debian's netavark lives (not on PATH).
const NETAVARK: &str = "/usr/lib/podman/netavark";

/// What only the benchmark needs: its bpftrace column.
const BENCH_TOOLS: &[(&str, &str)] = &[("bpftrace", "bpftrace")];

#[derive(Parser)]
#[command(about = "stalewatch project tasks")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install the Debian tools, nightly + rust-src and bpf-linker (idempotent).
    Setup,
    /// Set up, then build all release binaries.
    Build,
    /// Set up, build the release binary, then the Debian package
    /// (target/dist/stalewatch_<version>_<arch>.deb).
    Dist,
    /// Set up, then fmt, clippy, build, unit tests, the Debian package and
    /// end-to-end tests.
    Test {
        /// Skip the end-to-end stage (which needs root).
        #[arg(long)]
        no_e2e: bool,
        /// Extra arguments for the end-to-end test run (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, then run stalewatch-demo with the given arguments (root).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up (with bpftrace), build, then run stalewatch-bench with the
    /// given arguments (root; see BENCHMARKS.md, or `stalewatch-bench --help`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("xtask: {err:#}");
        exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.verb {
        Verb::Setup => setup(),
        Verb::Build => {
            setup()?;
            build(&root)
        }
        Verb::Dist => {
            setup()?;
            install_missing(dist::TOOLS)?;
            cargo(&root, "build --release -p stalewatch --bin stalewatch")?;
            dist::package(&root).map(drop)
        }
        Verb::Test { no_e2e, args } => {
            // Fail before minutes of fmt/clippy/build, not after.
            if !no_e2e {
                require_root("the end-to-end tests need root: run as root, or pass --no-e2e")?;
            }
            setup()?;
            cargo(&root, "fmt --all -- --check")?;
            cargo(
                &root,
                "clippy --workspace --all-targets --release -- -D warnings",
            )?;
            build(&root)?;
            cargo(
                &root,
                "test --release --workspace --exclude stalewatch-tests",
            )?;
            unit_tests_unprivileged(&root)?;
            if no_e2e {
                return Ok(());
            }
            // The package test installs what a user would.
            install_missing(dist::TOOLS)?;
            let deb = dist::package(&root)?;
            let engines = expected_engines();
            let skipped_file = target_dir(&root).join("e2e-skipped.txt");
            let _ = fs::remove_file(&skipped_file);
            let mut cmd = Command::new("cargo");
            cmd.current_dir(&root)
                .args("test --release -p stalewatch-tests -- --test-threads=1".split(' '))
                .args(&args)
                .env(
                    "STALEWATCH_BIN",
                    target_dir(&root).join("release/stalewatch"),
                )
                .env("STALEWATCH_DEB", &deb)
                .env("STALEWATCH_EXPECT_ENGINES", engines.join(","))
                .env("STALEWATCH_SKIPPED_FILE", &skipped_file);
            let result = status(&mut cmd);
            let skipped = fs::read_to_string(&skipped_file).unwrap_or_default();
            eprintln!(
                "xtask: engines expected on this machine: {}",
                if engines.is_empty() {
                    "none".to_owned()
                } else {
                    engines.join(", ")
                }
            );
            if skipped.trim().is_empty() {
                eprintln!("xtask: no end-to-end test was skipped");
            } else {
                eprintln!("xtask: end-to-end tests skipped (not passed):");
                for line in skipped.lines() {
                    eprintln!("xtask:   {line}");
                }
            }
            result
        }
        Verb::Demo { args } => {
            require_root("the demo needs root: run it as root")?;
            setup()?;
            build(&root)?;
            let demo = target_dir(&root).join("release/stalewatch-demo");
            let st = Command::new(&demo)
                .args(&args)
                .status()
                .with_context(|| format!("cannot run {}", demo.display()))?;
            // Pass the demo's verdict through unchanged (128+N for a signal, as shells do).
            exit(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)));
        }
        Verb::Bench { args } => {
            require_root("the benchmark needs root: run it as root")?;
            setup()?;
            install_missing(BENCH_TOOLS)?;
            build(&root)?;
            let target = target_dir(&root);
            let bench = target.join("release/stalewatch-bench");
            let command = std::iter::once("cargo xtask bench".to_owned())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ");
            let st = Command::new(&bench)
                .args(&args)
                .env("STALEWATCH_BIN", target.join("release/stalewatch"))
                .env("STALEWATCH_BENCH_COMMAND", command)
                .status()
                .with_context(|| format!("cannot run {}", bench.display()))?;
            exit(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)));
        }
    }
}

/// Runs stalewatch's unit tests again as an ordinary user (nobody, no
/// capabilities) when run as root: they must need no privilege, so that
/// anyone can run `cargo test -p stalewatch`. Kernel tests live in the
/// `tests` crate.
fn unit_tests_unprivileged(root: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let listing = Command::new("cargo")
        .current_dir(root)
        .args("test --release -p stalewatch --no-run --message-format=json".split(' '))
        .output()
        .context("cannot run cargo")?;
    let text = String::from_utf8_lossy(&listing.stdout);
    // One JSON message a line; test binaries are the executables cargo
    // leaves in deps/ (the command's own binary goes next to it).
    let tests: Vec<&str> = text
        .lines()
        .filter_map(|line| line.split("\"executable\":\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .filter(|exe| exe.contains("/deps/"))
        .collect();
    if tests.is_empty() {
        bail!("cargo listed no test binaries of stalewatch");
    }
    for test in tests {
        eprintln!("xtask: {test} as nobody, without capabilities");
        status(
            Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--bounding-set=-all",
                    "--",
                    test,
                ])
                .current_dir(root),
        )?;
    }
    Ok(())
}

/// Where the builds put the binaries: CARGO_TARGET_DIR (relative to the
/// workspace root, where cargo ran) when set.
/// The container engines this machine should have working, so that their
/// tests fail instead of skipping when one is broken:
/// `STALEWATCH_EXPECT_ENGINES` when set (comma-separated, empty for none);
/// otherwise Docker on CI (its machine has one) or wherever dockerd is
/// installed, and Podman on CI or wherever setup installed it.
fn expected_engines() -> Vec<String> {
    if let Ok(list) = env::var("STALEWATCH_EXPECT_ENGINES") {
        return list
            .split(',')
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
    }
    let ci = env::var_os("CI").is_some();
    let mut engines = Vec::new();
    if ci || find_in_path("dockerd").is_some() {
        engines.push("docker".to_owned());
    }
    if ci || (find_in_path("podman").is_some() && Path::new(NETAVARK).exists()) {
        engines.push("podman".to_owned());
    }
    engines
}

fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn build(root: &Path) -> Result<()> {
    cargo(root, "build --release --workspace --bins")
}

fn setup() -> Result<()> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    fix_path(&cargo_home.join("bin"))?;
    install_missing(DEBIAN_TOOLS)?;
    install_missing(PODMAN_TOOLS)?;
    if !Path::new(NETAVARK).exists() {
        install_packages(PODMAN_PACKAGES)?;
    }

    // RUSTUP_AUTO_INSTALL may be off, so `+nightly` alone would not install it.
    if !output("rustup", &["toolchain", "list"])?
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        println!("setup: rustup toolchain install nightly");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    // build-std=core for the BPF target needs the nightly's sources.
    if !output("rustup", &["+nightly", "component", "list", "--installed"])?
        .lines()
        .any(|l| l.trim() == "rust-src")
    {
        println!("setup: rustup component add rust-src --toolchain nightly");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // bpf-linker must link against the nightly's own libLLVM: rebuild whenever
    // the nightly changes (the stamp records which one it was built against).
    let prefix = cargo_home.join("stalewatch-llvm");
    let stamp = prefix.join("stamp");
    let nightly = output("rustc", &["+nightly", "-vV"])?;
    let fresh = cargo_home.join("bin/bpf-linker").is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == nightly);
    if !fresh {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM (~1 min)"
        );
        build_bpf_linker(&cargo_home, &prefix)?;
        fs::write(&stamp, &nightly).with_context(|| format!("cannot write {}", stamp.display()))?;
    }

    println!("setup: toolchain ready");
    Ok(())
}

/// apt-get installs the packages of the commands that are not on PATH.
fn install_missing(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| find_in_path(cmd).is_none())
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    install_packages(&missing)?;
    if let Some((cmd, pkg)) = tools.iter().find(|(cmd, _)| find_in_path(cmd).is_none()) {
        bail!("`{cmd}` still missing after installing {pkg}");
    }
    Ok(())
}

/// apt-get installs `packages`, without their recommendations.
fn install_packages(packages: &[&str]) -> Result<()> {
    require_root(&format!(
        "setup needs root to apt-get install {}",
        packages.join(" ")
    ))?;
    println!("setup: apt-get install {}", packages.join(" "));
    let apt = |args: &[&str]| {
        status(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    apt(&["update", "-qq"])?;
    apt(&[
        &["install", "-y", "-qq", "--no-install-recommends"],
        packages,
    ]
    .concat())
}

/// The recipe from shared/docs/KERNEL_AND_TOOLCHAIN.md.
fn build_bpf_linker(cargo_home: &Path, prefix: &Path) -> Result<()> {
    let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    let lib_dir = sysroot.join("lib");
    let lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot read {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .find(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let target = lib_dir.join(&lib);
    let llvm_lib = prefix.join("lib");
    fs::create_dir_all(&llvm_lib)
        .with_context(|| format!("cannot create {}", llvm_lib.display()))?;
    for name in [OsString::from("libLLVM.so"), lib] {
        let link = llvm_lib.join(name);
        // `ln -sf`: replace a link left by an older nightly.
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    status(
        Command::new("cargo")
            .args(["+nightly", "install", "--quiet", "--force", "bpf-linker"])
            .args([
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                LLVM_FEATURE,
            ])
            .arg("--root")
            .arg(cargo_home)
            .env("LLVM_PREFIX", prefix),
    )
}

/// Child processes need `$CARGO_HOME/bin` (bpf-linker) and the sbin
/// directories (iptables, conntrack, ...). PATH is only touched when something
/// is missing: stalewatch's build.rs reruns whenever PATH changes.
fn fix_path(cargo_bin: &Path) -> Result<()> {
    let old = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&old).collect();
    let before = dirs.len();
    if !dirs.iter().any(|d| d == cargo_bin) {
        dirs.insert(0, cargo_bin.to_path_buf());
    }
    for sbin in ["/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(sbin)) {
            dirs.push(sbin.into());
        }
    }
    if dirs.len() != before {
        // SAFETY: single-threaded; no other thread reads the environment.
        unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
    }
    Ok(())
}

fn find_in_path(cmd: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// Fails with `message` unless running as root.
fn require_root(message: &str) -> Result<()> {
    if !is_root() {
        bail!("{message}");
    }
    Ok(())
}

fn is_root() -> bool {
    // /proc/self is owned by the effective uid: no libc needed.
    fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) == 0
}

/// Runs `cargo` in the workspace root; `args` are space-separated.
fn cargo(root: &Path, args: &str) -> Result<()> {
    status(
        Command::new("cargo")
            .current_dir(root)
            .args(args.split(' ')),
    )
}

/// Runs a command with inherited stdio; a failure becomes one error line.
fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout.
fn output(program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", describe(&cmd)))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("`{}` failed ({}): {first}", describe(&cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let args = cmd.get_args().map(|a| a.to_string_lossy());
    std::iter::once(cmd.get_program().to_string_lossy())
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}
