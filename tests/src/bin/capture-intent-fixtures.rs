//! Regenerates the NAT-intent reader's fixtures: builds issue #15's
//! two-node topology (`stalewatch_tests::multihost`) for each rule engine,
//! walks the service through its states, and saves what node A's tools
//! print at each one. Root only; everything lives in namespaces of its own.
//!
//! `capture-intent-fixtures [DIR]` (default: stalewatch's
//! `src/source/intent/testdata`). Files are named
//! `<engine>-<v4|v6>[-tcp]-<state>.<ext>`: `.json` is `nft -j list
//! ruleset`, `.txt` is `iptables-{nft,legacy}-save -t nat` (ip6tables for
//! v6), and `.nft.json` is `nft -j list ruleset` in a namespace whose rules
//! iptables-nft wrote.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use stalewatch_tests::multihost::{Cluster, DNS, Dnat, Engine, Family, L4, METRICS};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../stalewatch/src/source/intent/testdata"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    let mut written = Vec::new();
    for engine in Engine::ALL {
        let nft_engine = matches!(engine, Engine::NftPlain | Engine::NftKube);
        // The story of issue #15, and its address-reuse ending.
        for (family, l4) in [
            (Family::V4, L4::Udp),
            (Family::V6, L4::Udp),
            (Family::V4, L4::Tcp),
        ] {
            if l4 == L4::Tcp && engine == Engine::NftPlain {
                continue;
            }
            let mut c = Cluster::build(engine, family, l4)?;
            let mut save = |c: &Cluster, state: &str| save(&dir, c, state, &mut written);
            c.deploy(&DNS, 7)?;
            save(&c, "before")?;
            c.move_backend(&DNS, 7, 8)?;
            save(&c, "after-move")?;
            if (family, l4) == (Family::V4, L4::Udp) {
                c.reuse_address(7, &METRICS)?;
                save(&c, "address-reused")?;
            }
        }
        let mut save = |c: &Cluster, state: &str| save(&dir, c, state, &mut written);
        // Scaled to zero: the service's rules are gone, the base ones stay.
        let mut c = Cluster::build(engine, Family::V4, L4::Udp)?;
        c.deploy(&DNS, 7)?;
        c.scale_to_zero(&DNS)?;
        save(&c, "scaled-to-zero")?;
        // Load-balanced over .7 and .8, then .7 removed.
        let mut c = Cluster::build(engine, Family::V4, L4::Udp)?;
        c.start_pod(7)?;
        c.start_pod(8)?;
        c.set_service(&DNS, Dnat::Endpoints(vec![7, 8]))?;
        save(&c, "load-balanced")?;
        c.remove_endpoint(&DNS, 7)?;
        save(&c, "load-balanced-one-removed")?;
        // The quiet cases: an address range, a port range, a map.
        let mut c = Cluster::build(engine, Family::V4, L4::Udp)?;
        c.set_service(&DNS, Dnat::Range(7, 8))?;
        save(&c, "range")?;
        c.set_service(&DNS, Dnat::PortRange(8))?;
        save(&c, "port-range")?;
        if nft_engine {
            c.set_service(&DNS, Dnat::Map(8))?;
            save(&c, "map")?;
        }
    }
    for f in &written {
        println!("{f}");
    }
    Ok(())
}

/// Saves node A's rules in the engine's own format(s).
fn save(dir: &Path, c: &Cluster, state: &str, written: &mut Vec<String>) -> anyhow::Result<()> {
    let family = match c.family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    };
    let tcp = if c.l4 == L4::Tcp { "-tcp" } else { "" };
    let stem = format!("{}-{family}{tcp}-{state}", c.engine.name());
    let got = c.capture()?;
    let mut files = Vec::new();
    match c.engine {
        Engine::NftPlain | Engine::NftKube => files.push((format!("{stem}.json"), got.nft_json)),
        Engine::IptablesNftKube => {
            files.push((format!("{stem}.txt"), got.iptables_nft_save));
            files.push((format!("{stem}.nft.json"), got.nft_json));
        }
        Engine::IptablesLegacyKube => files.push((format!("{stem}.txt"), got.iptables_legacy_save)),
    }
    for (name, text) in files {
        anyhow::ensure!(!text.trim().is_empty(), "{name}: the tool printed nothing");
        std::fs::write(dir.join(&name), text).with_context(|| format!("writing {name}"))?;
        written.push(name);
    }
    Ok(())
}
