//! The conntrack source against the running kernel (root): each test in a
//! network namespace of its own, with traffic on its loopback only.

use std::{
    io::Write,
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Instant,
};

use stalewatch::{
    domain::{Entry, Family, Proto, Tuple, udp},
    source::{
        conntrack::{
            Conn, Deletion, Error, Filter, Mirror, delete_entry, delete_judged, dump, find, get,
        },
        netns::in_netns,
    },
};
use stalewatch_common::ct_status;

/// Conntrack on for both families, port 9999 DNATed to 127.0.0.2, and
/// ports 20000-60000 dropped on input so that closed ports send no ICMP.
const RULES: &str = "
    table ip swct_nat {
        chain out { type nat hook output priority -100; policy accept; udp dport 9999 dnat to 127.0.0.2:9999; }
    }
    table inet swct {
        chain out { type filter hook output priority 0; policy accept; ct state new counter; }
        chain in { type filter hook input priority 0; policy accept; udp dport 20000-60000 drop; }
    }
";

/// A network namespace that is removed when the test ends, also on failure.
struct TestNetns {
    name: String,
    path: PathBuf,
}

impl TestNetns {
    fn new() -> TestNetns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "swct{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name], None);
        let ns = TestNetns {
            path: Path::new("/run/netns").join(&name),
            name,
        };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"], None);
        ns.exec(&["nft", "-f", "-"], Some(RULES));
        ns
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    fn exec(&self, args: &[&str], stdin: Option<&str>) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all, stdin);
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    /// Runs `f` on a thread inside the namespace.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.path, f).unwrap()
    }

    /// One datagram from `from` to each of `to`.
    fn send(&self, from: &str, to: &[SocketAddr]) {
        let (from, to) = (from.to_owned(), to.to_vec());
        self.within(move || {
            let sock = UdpSocket::bind(from).unwrap();
            for dst in to {
                sock.send_to(b"x", dst).unwrap();
            }
        });
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let status = child.wait().unwrap();
    assert!(status.success(), "{cmd} {args:?}: {status}");
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn origs(entries: &[Entry]) -> Vec<Tuple> {
    let mut v: Vec<Tuple> = entries.iter().map(|e| e.orig).collect();
    v.sort();
    v
}

#[test]
fn dump_get_and_delete_in_a_namespace() {
    let ns = TestNetns::new();
    ns.send("127.0.0.1:41001", &[addr("127.0.0.1:9999")]);
    ns.send("127.0.0.1:41002", &[addr("127.0.0.1:9999")]);
    ns.send("127.0.0.1:41003", &[addr("127.0.0.1:20001")]);
    let a = udp("127.0.0.1", 41001, "127.0.0.1", 9999);
    let b = udp("127.0.0.1", 41002, "127.0.0.1", 9999);
    let c = udp("127.0.0.1", 41003, "127.0.0.1", 20001);

    let all = dump(ns.path(), &Filter::default()).unwrap();
    assert_eq!(origs(&all), [a, b, c]);
    let entry_a = all.iter().find(|e| e.orig == a).unwrap();
    // DNATed: the reply comes from the backend.
    assert_eq!(entry_a.reply, udp("127.0.0.2", 9999, "127.0.0.1", 41001));
    let want = ct_status::CONFIRMED | ct_status::DST_NAT | ct_status::DST_NAT_DONE;
    assert_eq!(entry_a.status & want, want);
    assert!(entry_a.timeout.is_some_and(|t| t > 0 && t <= 30));
    assert!(entry_a.id.is_some());
    let entry_c = all.iter().find(|e| e.orig == c).unwrap();
    assert_eq!(entry_c.reply, udp("127.0.0.1", 20001, "127.0.0.1", 41003));
    assert_eq!(entry_c.status & ct_status::DST_NAT, 0);

    let dnat = ct_status::DST_NAT;
    let dumped = |f: Filter| origs(&dump(ns.path(), &f).unwrap());
    let status = |value, mask| Filter {
        status: Some((value, mask)),
        ..Filter::default()
    };
    assert_eq!(dumped(status(dnat, dnat)), [a, b]);
    assert_eq!(dumped(status(0, dnat)), [c]);
    assert_eq!(dumped(status(0, 0)), [a, b, c]);
    let to_c = Some((c.dst, c.dport));
    for proto in [None, Some(Proto::UDP)] {
        let f = Filter {
            proto,
            orig_dst: to_c,
            ..Filter::default()
        };
        assert_eq!(dumped(f), [c]);
    }
    let f = Filter {
        family: Some(Family::Ipv4),
        proto: Some(Proto::UDP),
        status: Some((dnat, dnat)),
        orig_dst: Some((a.dst, a.dport)),
        orig_src: None,
    };
    assert_eq!(dumped(f), [a, b]);
    let f = Filter {
        family: Some(Family::Ipv6),
        ..Filter::default()
    };
    assert_eq!(dumped(f), []);
    let f = Filter {
        proto: Some(Proto::TCP),
        ..Filter::default()
    };
    assert_eq!(dumped(f), []);

    let got = get(ns.path(), &a).unwrap().unwrap();
    assert_eq!(
        (got.orig, got.reply, got.id),
        (a, entry_a.reply, entry_a.id)
    );
    assert_eq!(got.status, entry_a.status);
    let missing = udp("127.0.0.1", 41009, "127.0.0.1", 9999);
    assert_eq!(get(ns.path(), &missing).unwrap(), None);

    let found = find(ns.path(), &a).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].reply, found[0].id, found[0].zone),
        (entry_a.reply, entry_a.id, 0)
    );
    // An entry with another id (what replaces one) is not deleted.
    let mut other_id = entry_a.clone();
    other_id.id = entry_a.id.map(|id| id ^ 1);
    assert!(!delete_entry(ns.path(), &other_id).unwrap());
    let mut other_zone = entry_a.clone();
    other_zone.zone = 9;
    assert!(!delete_entry(ns.path(), &other_zone).unwrap());
    assert_eq!(dumped(Filter::default()), [a, b, c]);
    assert!(delete_entry(ns.path(), entry_a).unwrap());
    assert_eq!(dumped(Filter::default()), [b, c]);
    assert_eq!(get(ns.path(), &a).unwrap(), None);
    assert!(!delete_entry(ns.path(), entry_a).unwrap());
    assert_eq!(
        delete_judged(ns.path(), &a, &entry_a.reply).unwrap(),
        Deletion::Gone
    );
    assert_eq!(dumped(Filter::default()), [b, c]);

    // One socket for many requests, as the watch loop holds it: each
    // reply goes to its own request, a refused one included.
    let conn = Conn::open(ns.path()).unwrap();
    for _ in 0..3 {
        assert_eq!(conn.get(&b).unwrap().map(|e| e.orig), Some(b));
        assert_eq!(conn.get(&missing).unwrap(), None);
        assert_eq!(origs(&conn.dump(&status(dnat, dnat)).unwrap()), [b]);
        assert_eq!(origs(&conn.dump(&Filter::default()).unwrap()), [b, c]);
    }
    let entry_b = conn.get(&b).unwrap().unwrap();
    // Judged with another reply: a new entry replaced the one judged.
    let judged_reply = udp("127.0.0.9", 9999, "127.0.0.1", 41002);
    assert!(matches!(
        conn.delete_judged(&b, &judged_reply).unwrap(),
        Deletion::Replaced(now) if now.len() == 1 && now[0].id == entry_b.id
    ));
    assert!(matches!(
        conn.delete_judged(&b, &entry_b.reply).unwrap(),
        Deletion::Deleted(e) if e.id == entry_b.id
    ));
    assert!(!conn.delete_entry(&entry_b).unwrap());
    assert_eq!(conn.get(&b).unwrap(), None);
    assert_eq!(origs(&conn.dump(&Filter::default()).unwrap()), [c]);
}

/// What the kernel itself returns for a filter, before stalewatch's check.
fn kernel_filtered(ns: &TestNetns, filter: &Filter) -> Vec<Tuple> {
    let conn = Conn::open(ns.path()).unwrap();
    origs(&conn.dump_kernel_filtered(filter).unwrap())
}

#[test]
fn the_kernel_applies_the_filters_itself() {
    let ns = TestNetns::new();
    ns.send("127.0.0.1:41021", &[addr("127.0.0.1:9999")]);
    ns.send(
        "127.0.0.1:41022",
        &[addr("127.0.0.1:20001"), addr("127.0.0.1:20002")],
    );
    ns.send("[::1]:41023", &[addr("[::1]:20001")]);
    let a = udp("127.0.0.1", 41021, "127.0.0.1", 9999);
    let b = udp("127.0.0.1", 41022, "127.0.0.1", 20001);
    let c = udp("127.0.0.1", 41022, "127.0.0.1", 20002);
    let d = udp("::1", 41023, "::1", 20001);
    let dnat = ct_status::DST_NAT;
    let f = Filter {
        status: Some((dnat, dnat)),
        ..Filter::default()
    };
    assert_eq!(kernel_filtered(&ns, &f), [a]);
    let f = Filter {
        family: Some(Family::Ipv6),
        ..Filter::default()
    };
    assert_eq!(kernel_filtered(&ns, &f), [d]);
    let f = Filter {
        proto: Some(Proto::UDP),
        orig_dst: Some((b.dst, b.dport)),
        ..Filter::default()
    };
    assert_eq!(kernel_filtered(&ns, &f), [b]);
    let f = Filter {
        orig_dst: Some(("127.0.0.9".parse().unwrap(), b.dport)),
        ..Filter::default()
    };
    assert_eq!(kernel_filtered(&ns, &f), []);
    // IPv6: family and port in the kernel, the address here.
    let f = Filter {
        proto: Some(Proto::UDP),
        orig_dst: Some((d.dst, d.dport)),
        ..Filter::default()
    };
    assert_eq!(kernel_filtered(&ns, &f), [d]);
    assert_eq!(origs(&dump(ns.path(), &f).unwrap()), [d]);
    let f = Filter {
        status: Some((0, dnat)),
        ..Filter::default()
    };
    let mut undnated = vec![b, c, d];
    undnated.sort();
    assert_eq!(kernel_filtered(&ns, &f), undnated);
}

#[test]
fn ipv6_entries_filter_get_and_delete() {
    let ns = TestNetns::new();
    ns.send("[::1]:41011", &[addr("[::1]:20002"), addr("[::1]:20003")]);
    ns.send("127.0.0.1:41012", &[addr("127.0.0.1:20002")]);
    let x = udp("::1", 41011, "::1", 20002);
    let y = udp("::1", 41011, "::1", 20003);
    let v4 = udp("127.0.0.1", 41012, "127.0.0.1", 20002);
    let dumped = |f: Filter| origs(&dump(ns.path(), &f).unwrap());
    let v6 = Filter {
        family: Some(Family::Ipv6),
        ..Filter::default()
    };
    assert_eq!(dumped(v6.clone()), [x, y]);
    let f = Filter {
        family: Some(Family::Ipv4),
        ..Filter::default()
    };
    assert_eq!(dumped(f), [v4]);
    for proto in [None, Some(Proto::UDP)] {
        let f = Filter {
            proto,
            orig_dst: Some((x.dst, x.dport)),
            ..Filter::default()
        };
        assert_eq!(dumped(f), [x]);
    }
    let got = get(ns.path(), &x).unwrap().unwrap();
    assert_eq!(got.reply, udp("::1", 20002, "::1", 41011));
    let found = find(ns.path(), &x).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].reply, found[0].id), (got.reply, got.id));
    assert!(delete_entry(ns.path(), &got).unwrap());
    assert_eq!(dumped(v6), [y]);
    assert!(!delete_entry(ns.path(), &got).unwrap());
}

#[test]
fn a_zoned_entry_is_found_and_deleted_in_its_zone() {
    let ns = TestNetns::new();
    // Port 7777 is tracked in zone 5 (set before conntrack sees it). This
    // nft parses `ct zone set` only in the command form, not in a block.
    ns.exec(
        &[
            "nft",
            "add table inet swct_zone; \
             add chain inet swct_zone o { type filter hook output priority -300; }; \
             add rule inet swct_zone o udp dport 7777 ct zone set 5",
        ],
        None,
    );
    ns.send("127.0.0.1:41031", &[addr("127.0.0.1:7777")]);
    ns.send("127.0.0.1:41032", &[addr("127.0.0.1:20001")]);
    let z = udp("127.0.0.1", 41031, "127.0.0.1", 7777);
    let plain = udp("127.0.0.1", 41032, "127.0.0.1", 20001);
    let all = dump(ns.path(), &Filter::default()).unwrap();
    let zoned = all.iter().find(|e| e.orig == z).unwrap().clone();
    assert_eq!(zoned.zone, 5);
    assert_eq!(all.iter().find(|e| e.orig == plain).unwrap().zone, 0);
    // The default zone does not hold it; a look-up over every zone does.
    assert_eq!(get(ns.path(), &z).unwrap(), None);
    let found = find(ns.path(), &z).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].id, found[0].zone), (zoned.id, 5));
    let mut zone0 = zoned.clone();
    zone0.zone = 0;
    assert!(!delete_entry(ns.path(), &zone0).unwrap());
    assert!(matches!(
        delete_judged(ns.path(), &z, &zoned.reply).unwrap(),
        Deletion::Deleted(e) if e.id == zoned.id && e.zone == 5
    ));
    assert_eq!(
        origs(&dump(ns.path(), &Filter::default()).unwrap()),
        [plain]
    );
}

#[test]
fn a_path_that_is_no_network_namespace_is_an_error() {
    let missing = Path::new("/run/netns/swct-no-such-namespace");
    let e = dump(Some(missing), &Filter::default()).unwrap_err();
    assert!(matches!(e, Error::Netns(..)), "{e}");
    assert!(e.to_string().contains("swct-no-such-namespace"), "{e}");
    let t = udp("127.0.0.1", 1, "127.0.0.1", 2);
    assert!(matches!(get(Some(missing), &t), Err(Error::Netns(..))));
    assert!(matches!(
        delete_judged(Some(missing), &t, &t),
        Err(Error::Netns(..))
    ));
    // A file, but not an nsfs one: setns refuses it.
    let not_ns = Path::new("/proc/self/status");
    let e = dump(Some(not_ns), &Filter::default()).unwrap_err();
    assert!(matches!(e, Error::Netns(..)), "{e}");
}

/// Prints how long a dump of 50k entries takes here, next to
/// `conntrack -L`; asserts only that every entry comes back.
#[test]
fn dump_speed_on_50k_entries() {
    const PORTS: u16 = 25_000;
    let ns = TestNetns::new();
    let started = Instant::now();
    // 2 destinations x 25k ports from one socket: 50k distinct entries.
    let targets: Vec<SocketAddr> = ["127.0.0.1", "127.0.0.3"]
        .iter()
        .flat_map(|ip| (0..PORTS).map(move |p| SocketAddr::new(ip.parse().unwrap(), 20_000 + p)))
        .collect();
    ns.send("127.0.0.1:41100", &targets);
    // One DNATed entry among them, for the filtered dump.
    ns.send("127.0.0.1:41101", &[addr("127.0.0.1:9999")]);
    let made = started.elapsed();

    let cpu = || nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    let (wall, cpu0) = (Instant::now(), cpu());
    let all = dump(ns.path(), &Filter::default()).unwrap();
    let (all_wall, all_cpu) = (wall.elapsed(), cpu() - cpu0);
    assert_eq!(all.len(), targets.len() + 1);

    let (wall, cpu0) = (Instant::now(), cpu());
    let dnat = ct_status::DST_NAT;
    let f = Filter {
        status: Some((dnat, dnat)),
        ..Filter::default()
    };
    let dnated = dump(ns.path(), &f).unwrap();
    let (filtered_wall, filtered_cpu) = (wall.elapsed(), cpu() - cpu0);
    assert_eq!(dnated.len(), 1);

    // `conntrack -L` in the same namespace, timed by bash (real user sys).
    let script = "TIMEFORMAT='%R %U %S'; time conntrack -L >/dev/null 2>&1";
    let tool = Command::new("ip")
        .args(["netns", "exec", &ns.name, "bash", "-c", script])
        .output();
    let tool = match tool {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stderr).trim().to_string(),
        _ => "unavailable".to_string(),
    };
    println!(
        "conntrack dump of {} entries (made in {made:.2?}): {all_wall:.1?} wall, {:.1} ms CPU; \
         DST_NAT-filtered dump: {filtered_wall:.1?} wall, {:.1} ms CPU; \
         conntrack -L (real user sys, s): {tool}",
        all.len(),
        all_cpu.tv_sec() as f64 * 1e3 + all_cpu.tv_nsec() as f64 / 1e6,
        filtered_cpu.tv_sec() as f64 * 1e3 + filtered_cpu.tv_nsec() as f64 / 1e6,
    );
}

/// The DNATed entries a mirror holds, by source port.
fn mirrored(mirror: &Mirror) -> Vec<u16> {
    let mut ports: Vec<u16> = mirror
        .entries()
        .filter(|m| m.entry.is_dnat())
        .map(|m| m.entry.orig.sport)
        .collect();
    ports.sort_unstable();
    ports
}

/// `count` DNATed flows (to :9999) from consecutive source ports, and as
/// many without NAT (to :30000, dropped on input).
fn flows(ns: &TestNetns, first_sport: u16, count: u16) {
    for sport in first_sport..first_sport + count {
        ns.send(
            &format!("127.0.0.1:{sport}"),
            &[addr("127.0.0.1:9999"), addr("127.0.0.1:30000")],
        );
    }
}

/// The watch's audit keeps the DNATed entries from conntrack events: the
/// ones there when it opens from a dump (their end may go unannounced),
/// later ones from their events; entries without NAT never (the socket's
/// filter drops their events in the kernel); lost events bring a new dump.
#[test]
fn a_mirror_follows_the_dnated_entries_through_events() {
    let ns = TestNetns::new();
    flows(&ns, 41000, 3);
    let mut mirror = Mirror::open(&ns.path, &[]).expect("mirror");
    assert_eq!(mirrored(&mirror), vec![41000, 41001, 41002]);
    assert_eq!(mirror.unannounced(), 3);
    assert!(mirror.entries().all(|m| m.entry.is_dnat() && !m.announced));

    flows(&ns, 42000, 2);
    let update = mirror.update().expect("update");
    assert_eq!((update.made, update.gone, update.resynced), (2, 0, false));
    assert_eq!(mirrored(&mirror), vec![41000, 41001, 41002, 42000, 42001]);
    assert_eq!(mirror.unannounced(), 3, "made after it opened: announced");
    // The plain entries exist, and are not mirrored.
    let table = dump(ns.path(), &Filter::default()).expect("dump");
    assert_eq!(
        table.iter().filter(|e| !e.is_dnat()).count(),
        5,
        "{table:?}"
    );

    // An announced entry's end is heard.
    let entry_of = |sport: u16, mirror: &Mirror| {
        mirror
            .entries()
            .find(|m| m.entry.orig.sport == sport)
            .map(|m| m.entry.clone())
            .expect("mirrored")
    };
    let announced = entry_of(42000, &mirror);
    assert!(mirror.announced(&announced));
    assert!(delete_entry(ns.path(), &announced).expect("delete"));
    let update = mirror.update().expect("update");
    assert_eq!((update.made, update.gone), (0, 1));
    assert_eq!(mirrored(&mirror), vec![41000, 41001, 41002, 42001]);

    // One made before the mirror may go unannounced (when no listener of
    // the namespace's conntrack events existed as it was made): kept
    // until a look-up finds it gone.
    let old = entry_of(41001, &mirror);
    assert!(!mirror.announced(&old));
    assert!(delete_entry(ns.path(), &old).expect("delete"));
    mirror.update().expect("update");
    let left = mirrored(&mirror);
    assert!(
        left == vec![41000, 41001, 41002, 42001] || left == vec![41000, 41002, 42001],
        "{left:?}"
    );
    mirror.forget(&old);
    assert_eq!(mirrored(&mirror), vec![41000, 41002, 42001]);
    assert_eq!(mirror.unannounced(), 2);

    // The namespace's own addresses: entries without NAT to them are kept
    // too, made before (read again) or after (their events).
    mirror
        .set_local([addr("127.0.0.1:0").ip(), addr("[::1]:0").ip()])
        .expect("local");
    let update = mirror.update().expect("update");
    assert!(update.resynced, "{update:?}");
    let plain = |m: &Mirror| -> Vec<(u16, String)> {
        let mut v: Vec<(u16, String)> = m
            .entries()
            .filter(|m| !m.entry.is_dnat())
            .map(|m| (m.entry.orig.sport, m.entry.orig.dst.to_string()))
            .collect();
        v.sort();
        v
    };
    let to = |port: u16| (port, "127.0.0.1".to_owned());
    assert_eq!(
        plain(&mirror),
        vec![to(41000), to(41001), to(41002), to(42000), to(42001)]
    );
    // Not to another address of the loopback, which is no address of
    // the namespace; to an IPv6 one, yes.
    ns.send("127.0.0.1:44000", &[addr("127.0.0.5:30000")]);
    ns.send("[::1]:44001", &[addr("[::1]:30000")]);
    ns.send("127.0.0.1:44002", &[addr("127.0.0.1:30000")]);
    let update = mirror.update().expect("update");
    assert_eq!(update.made, 2, "{update:?}: {:?}", plain(&mirror));
    let got = plain(&mirror);
    assert!(got.contains(&(44001, "::1".to_owned())), "{got:?}");
    assert!(got.contains(&to(44002)), "{got:?}");
    assert!(!got.iter().any(|(p, _)| *p == 44000), "{got:?}");

    // A buffer too small for the events: the table is read again.
    let local = [addr("127.0.0.1:0").ip(), addr("[::1]:0").ip()];
    let mut small = Mirror::with_buffer(&ns.path, &local, 4096).expect("small mirror");
    flows(&ns, 43000, 200);
    let update = small.update().expect("update");
    assert!(update.resynced, "{update:?}");
    let ports = mirrored(&small);
    assert_eq!(ports.len(), 203, "{ports:?}");
    assert!(ports.contains(&43199) && ports.contains(&41000));
    assert!(!ports.contains(&41001), "deleted before");
}

/// A namespace whose conntrack events are off has no mirror: the watch
/// reads its table at each audit instead.
#[test]
fn no_mirror_where_conntrack_events_are_off() {
    let ns = TestNetns::new();
    ns.exec(
        &["sysctl", "-qw", "net.netfilter.nf_conntrack_events=0"],
        None,
    );
    match Mirror::open(&ns.path, &[]) {
        Err(e @ Error::NoEvents(_)) => {
            assert!(e.to_string().contains("nf_conntrack_events = 0"), "{e}")
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a mirror without events"),
    }
}
