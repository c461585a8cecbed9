//! `cargo xtask dist`: the Debian package, `stalewatch_<version>_<arch>.deb`,
//! built with `dpkg-deb` from a staged tree (no packaging tool to install).
//!
//! What it holds, and where:
//!
//! - the release binary (the eBPF object is embedded in it), stripped of
//!   its debug information: `/usr/bin/stalewatch`;
//! - the systemd unit, unchanged: `/usr/lib/systemd/system/`. It is never
//!   enabled nor started by installing: the operator runs
//!   `systemctl enable --now stalewatch`. Its optional drop-ins are
//!   examples under `/usr/share/doc/stalewatch/examples/`, not installed
//!   where systemd would read them (`docker.conf` stops the unit from
//!   starting on a host without a docker group);
//! - a man page per command, rendered from the CLI definition
//!   (`stalewatch-cli`) with clap_mangen: `/usr/share/man/man1/`;
//! - completions for bash, zsh and fish, from the same definition;
//! - the README, a copyright file and a changelog in
//!   `/usr/share/doc/stalewatch/`; the Prometheus alerting rules in
//!   `/usr/share/stalewatch/prometheus/`.
//!
//! `Depends` is what `dpkg-shlibdeps` finds the binary needs (libc6,
//! libgcc-s1 at the versions of the build host); the maintainer scripts do
//! what debhelper's systemd snippets do for a unit installed with
//! `--no-enable --no-start`.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::CommandFactory as _;
use clap_complete::Shell;

use super::{describe, output, status, target_dir};

const PACKAGE: &str = "stalewatch";
const VERSION: &str = env!("CARGO_PKG_VERSION");
const MAINTAINER: &str =
    "stalewatch maintainers <maintainers@users.noreply.r-seed-858f4172.example>";
const UNIT: &str = "stalewatch.service";

/// What the package recommends: the tools its alerts' fix lines name.
const RECOMMENDS: &str = "conntrack, iproute2";

/// Tools this needs on the build host, with their Debian packages.
pub const TOOLS: &[(&str, &str)] = &[
    ("dpkg-deb", "dpkg"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("objcopy", "binutils"),
    ("gzip", "gzip"),
];

/// Builds the package from the release binary already built in `root`'s
/// target directory; returns the package's path.
pub fn package(root: &Path) -> Result<PathBuf> {
    let target = target_dir(root);
    let binary = target.join("release/stalewatch");
    if !binary.is_file() {
        bail!("no release binary at {}: build it first", binary.display());
    }
    let arch = output("dpkg", &["--print-architecture"])?.trim().to_owned();
    let out_dir = target.join("dist");
    let stage = out_dir.join(format!("{PACKAGE}_{VERSION}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cannot remove {}", stage.display()))?;
    }

    // The binary, without its debug information (the eBPF object is data
    // in .rodata and stays).
    let bin = stage.join("usr/bin/stalewatch");
    mkdir(bin.parent().expect("a parent"))?;
    status(
        Command::new("objcopy")
            .args([
                "--strip-debug",
                "--strip-unneeded",
                "--remove-section=.comment",
            ])
            .arg(&binary)
            .arg(&bin),
    )?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;

    let systemd = root.join("packaging/systemd");
    copy(
        &systemd.join(UNIT),
        &stage.join("usr/lib/systemd/system").join(UNIT),
    )?;
    let doc = stage.join("usr/share/doc").join(PACKAGE);
    for dropin in ["docker.conf", "metrics.conf"] {
        copy(
            &systemd.join("stalewatch.service.d").join(dropin),
            &doc.join("examples/stalewatch.service.d").join(dropin),
        )?;
    }
    copy(&root.join("README.md"), &doc.join("README.md"))?;
    copy(
        &root.join("packaging/README.md"),
        &doc.join("README.packaging.md"),
    )?;
    write(&doc.join("copyright"), &copyright(root)?)?;
    write(&doc.join("changelog"), &changelog(root)?)?;
    gzip(&doc.join("changelog"))?;
    copy(
        &root.join("packaging/prometheus/stalewatch-rules.yml"),
        &stage.join("usr/share/stalewatch/prometheus/stalewatch-rules.yml"),
    )?;

    let man = stage.join("usr/share/man/man1");
    man_pages(root, &man)?;
    completions(&stage)?;

    let depends = shlib_depends(&out_dir, &bin)?;
    let installed_kib = tree_size(&stage)?.div_ceil(1024);
    let debian = stage.join("DEBIAN");
    write(
        &debian.join("control"),
        &format!(
            "Package: {PACKAGE}\n\
             Version: {VERSION}\n\
             Architecture: {arch}\n\
             Maintainer: {MAINTAINER}\n\
             Installed-Size: {installed_kib}\n\
             Depends: {depends}\n\
             Recommends: {RECOMMENDS}\n\
             Section: net\n\
             Priority: optional\n\
             Description: finds flows forwarded to the wrong place by stale conntrack entries\n \
             When a DNAT rule is changed (a container redeployed with a new address),\n \
             flows whose conntrack entry was made before keep going to the old\n \
             address, and nothing logs it. stalewatch watches the kernel's ICMP\n \
             unreachable and drop paths with eBPF, ties each failing packet to its\n \
             conntrack entry, and says which flow is pinned where, why, and the\n \
             conntrack command that heals it.\n \
             .\n \
             This package holds the binary, a hardened systemd unit (not enabled:\n \
             run `systemctl enable --now stalewatch`), man pages, shell completions\n \
             and Prometheus alerting rules.\n"
        ),
    )?;
    for (name, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let path = debian.join(name);
        write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    write(&debian.join("md5sums"), &md5sums(&stage)?)?;
    open_dirs(&stage)?;

    let deb = out_dir.join(format!("{PACKAGE}_{VERSION}_{arch}.deb"));
    let mut build = Command::new("dpkg-deb");
    build
        .args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&stage)
        .arg(&deb);
    // Files dated no later than the commit: two builds of it are the same.
    if let Ok(epoch) = output(
        "git",
        &["-C", &root.to_string_lossy(), "log", "-1", "--format=%ct"],
    ) {
        build.env("SOURCE_DATE_EPOCH", epoch.trim());
    }
    status(&mut build)?;
    if Path::new("/usr/bin/lintian").is_file() {
        // Advice for whoever builds it; the package test installs it for real.
        let out = Command::new("lintian")
            .args(["--tag-display-limit", "0"])
            .arg(&deb)
            .output()
            .context("cannot run lintian")?;
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("dist: {}", deb.display());
    Ok(deb)
}

/// `stalewatch.1` and `stalewatch-<command>.1` for every command, gzipped
/// as Debian wants them, dated as the commit.
fn man_pages(root: &Path, dir: &Path) -> Result<()> {
    mkdir(dir)?;
    let date = output(
        "git",
        &["-C", &root.to_string_lossy(), "log", "-1", "--format=%cs"],
    )
    .map(|d| d.trim().to_owned())
    .unwrap_or_default();
    let mut cli = stalewatch_cli::Cli::command().disable_help_subcommand(true);
    cli.build();
    let commands = std::iter::once(cli.clone()).chain(cli.get_subcommands().cloned());
    for cmd in commands {
        let page = clap_mangen::Man::new(cmd)
            .source(format!("{PACKAGE} {VERSION}"))
            .manual("stalewatch manual")
            .date(&date)
            .generate_to(dir)
            .with_context(|| format!("cannot write a man page in {}", dir.display()))?;
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))?;
        gzip(&page)?;
    }
    Ok(())
}

/// Completions where each shell looks for a package's own.
fn completions(stage: &Path) -> Result<()> {
    for (shell, path) in [
        (
            Shell::Bash,
            "usr/share/bash-completion/completions/stalewatch",
        ),
        (Shell::Zsh, "usr/share/zsh/vendor-completions/_stalewatch"),
        (
            Shell::Fish,
            "usr/share/fish/vendor_completions.d/stalewatch.fish",
        ),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(
            shell,
            &mut stalewatch_cli::Cli::command(),
            PACKAGE,
            &mut text,
        );
        write(&stage.join(path), &String::from_utf8(text)?)?;
    }
    Ok(())
}

/// The shared libraries the binary links, as a Depends field.
fn shlib_depends(work: &Path, binary: &Path) -> Result<String> {
    // dpkg-shlibdeps wants to run in a source tree: a control file naming
    // the package is all it reads.
    let src = work.join("shlibdeps");
    write(
        &src.join("debian/control"),
        &format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.current_dir(&src)
        .arg("-O")
        .arg(format!("-e{}", binary.display()));
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", describe(&cmd)))?;
    let _ = fs::remove_dir_all(&src);
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            describe(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let depends = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_owned();
    if !depends.contains("libc6") {
        bail!("dpkg-shlibdeps found no libc6 dependency: {depends}");
    }
    Ok(depends)
}

/// A machine-readable copyright file (DEP-5) for the workspace's licence.
fn copyright(root: &Path) -> Result<String> {
    let year = output(
        "git",
        &[
            "-C",
            &root.to_string_lossy(),
            "log",
            "-1",
            "--format=%cd",
            "--date=format:%Y",
        ],
    )
    .map(|y| y.trim().to_owned())
    .unwrap_or_else(|_| "2026".to_owned());
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: stalewatch\n\
         \n\
         Files: *\n\
         Copyright: {year} stalewatch maintainers\n\
         License: MIT or Apache-2.0\n\
         \n\
         License: MIT\n \
         Permission is hereby granted, free of charge, to any person obtaining a\n \
         copy of this software and associated documentation files (the\n \
         \"Software\"), to deal in the Software without restriction, including\n \
         without limitation the rights to use, copy, modify, merge, publish,\n \
         distribute, sublicense, and/or sell copies of the Software, and to\n \
         permit persons to whom the Software is furnished to do so, subject to\n \
         the following conditions:\n \
         .\n \
         The above copyright notice and this permission notice shall be included\n \
         in all copies or substantial portions of the Software.\n \
         .\n \
         THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS\n \
         OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF\n \
         MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.\n \
         IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY\n \
         CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,\n \
         TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE\n \
         SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.\n\
         \n\
         License: Apache-2.0\n \
         Licensed under the Apache License, Version 2.0 (the \"License\"); you may\n \
         not use this file except in compliance with the License.\n \
         .\n \
         On Debian systems, the complete text of the Apache License, Version 2.0\n \
         can be found in \"/usr/share/common-licenses/Apache-2.0\".\n"
    ))
}

/// A one-entry Debian changelog: the version, and the commit it was built
/// from (its date, so that two builds of one commit are the same).
fn changelog(root: &Path) -> Result<String> {
    let root = root.to_string_lossy();
    let commit = output("git", &["-C", &root, "rev-parse", "--short=12", "HEAD"])
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let date = output("git", &["-C", &root, "log", "-1", "--format=%cD"])
        .or_else(|_| output("date", &["-R"]))?
        .trim()
        .to_owned();
    Ok(format!(
        "{PACKAGE} ({VERSION}) unstable; urgency=medium\n\n  \
         * Built from commit {commit} of the stalewatch repository.\n\n \
         -- {MAINTAINER}  {date}\n"
    ))
}

/// DEBIAN/md5sums: every file the package installs.
fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    walk(stage, &mut files)?;
    files.retain(|f| !f.starts_with(stage.join("DEBIAN")));
    files.sort();
    let mut cmd = Command::new("md5sum");
    cmd.current_dir(stage).args(
        files
            .iter()
            .map(|f| f.strip_prefix(stage).expect("inside the stage")),
    );
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", describe(&cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed", describe(&cmd));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn tree_size(dir: &Path) -> Result<u64> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files
        .iter()
        .map(|f| Ok(fs::metadata(f)?.len()))
        .sum::<Result<u64>>()
}

/// Every regular file under `dir`.
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

fn gzip(path: &Path) -> Result<()> {
    // -n: no name or time stamp in the header (reproducible, as lintian asks).
    status(Command::new("gzip").args(["-9nf"]).arg(path))
}

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Every directory under `dir` (and itself) mode 0755, whatever the umask.
fn open_dirs(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            open_dirs(&entry.path())?;
        }
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    mkdir(to.parent().expect("a parent"))?;
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    mkdir(path.parent().expect("a parent"))?;
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

// deb-systemd-helper and deb-systemd-invoke are init-system-helpers',
// which is Essential: always there.

/// Makes systemd see the unit, and records the links `systemctl enable`
/// would make so that a purge can remove them; never enables or starts it.
/// After an upgrade, a unit that runs is restarted on the new binary.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ]; then
	# Undo the mask a removal left (see postrm).
	deb-systemd-helper unmask 'stalewatch.service' >/dev/null || true
	# Not enabled: the operator runs `systemctl enable --now stalewatch`.
	deb-systemd-helper update-state 'stalewatch.service' >/dev/null || true
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			deb-systemd-invoke try-restart 'stalewatch.service' >/dev/null || true
		fi
	fi
fi
exit 0
"#;

/// Stops a running unit before its binary goes.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = "remove" ]; then
	deb-systemd-invoke stop 'stalewatch.service' >/dev/null || true
fi
exit 0
"#;

/// On removal the unit is masked (an operator's enable links would point
/// at nothing); on purge those links, the mask and the helper's state go.
/// The unit itself keeps nothing on disk: a DynamicUser without
/// StateDirectory=, CacheDirectory= or LogsDirectory=; PrivateTmp='s
/// directories go when it stops; its records are the journal's.
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = "remove" ]; then
	deb-systemd-helper mask 'stalewatch.service' >/dev/null || true
fi
if [ "$1" = "purge" ]; then
	deb-systemd-helper purge 'stalewatch.service' >/dev/null || true
	deb-systemd-helper unmask 'stalewatch.service' >/dev/null || true
fi
exit 0
"#;
