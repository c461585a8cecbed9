// Rebuild the eBPF object when the linker changes (for example after
// `cargo xtask setup` rebuilt it against a newer nightly).
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
