//! Builds the eBPF programs (`stalewatch-ebpf`) for the BPF target and embeds
//! them in the binary. Needs the nightly toolchain with rust-src and
//! bpf-linker, which `cargo xtask setup` installs.

use std::process::Command;

const SETUP: &str = "the eBPF toolchain is not set up: run `cargo xtask setup` once";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    if which::which("bpf-linker").is_err() {
        fail(&format!("{SETUP} (bpf-linker not found)"));
    }
    let rust_src = Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !rust_src {
        fail(&format!(
            "{SETUP} (nightly toolchain with rust-src missing)"
        ));
    }
    // aya-build turns every stderr line of the inner cargo into a build
    // warning; a quiet inner cargo still reports real diagnostics (they come
    // as JSON messages) but not its progress lines.
    // SAFETY: build scripts are single-threaded here; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../stalewatch-ebpf");
    // The programs are built from stalewatch-common too (the map values,
    // the slot hash): a change there alone must rebuild them, or the
    // object embedded disagrees with the userspace that reads its maps.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../stalewatch-common")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "stalewatch-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

fn fail(message: &str) -> ! {
    println!("cargo::error={message}");
    std::process::exit(1);
}
