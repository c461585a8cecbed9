//! Network namespaces the harness creates and removes.

use std::{
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::run;

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Runs `f` on a short-lived thread inside the namespace, through
    /// stalewatch's own way in; what it opens (a socket, a
    /// /proc/thread-self/net file) keeps that namespace after the thread
    /// ends.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let entered = stalewatch::source::netns::in_netns(&self.path(), f)
            .map_err(|e| anyhow::anyhow!("entering network namespace {}: {e}", self.name))?;
        Ok(entered?)
    }

    /// Creates `<prefix>-<role>-<n>` with its loopback up.
    pub fn new(role: &str) -> anyhow::Result<Netns> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}-{role}-{}",
            crate::prefix(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace's conntrack table, every zone, parsed (never a grep
    /// of `conntrack -L`).
    pub fn conntrack(&self) -> anyhow::Result<Vec<stalewatch::domain::Entry>> {
        use stalewatch::source::conntrack;
        Ok(conntrack::dump(
            Some(&self.path()),
            &conntrack::Filter::default(),
        )?)
    }

    /// The namespace's inode, as the kernel and stalewatch identify it.
    pub fn inode(&self) -> anyhow::Result<u32> {
        Ok(std::fs::metadata(self.path())?.ino() as u32)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs a command inside the namespace with `input` on its stdin.
    pub fn exec_input(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        crate::run_input(&full, input)
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn sysctl(&self, setting: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-qw", setting]).map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Links two namespaces with a veth pair, `a_if` in `a` and `b_if` in `b`.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    // Created straight inside the namespaces: the root namespace never
    // sees these links.
    run(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}
