//! Real traffic, from threads that live in the test's namespaces. Every
//! loop is bounded in count and time, and stops when told.

use std::{
    collections::HashMap,
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// A UDP sender that streams from one fixed source port, as a producer that
/// never pauses does (metrics, syslog, DNS forwarders).
pub struct Producer {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    /// ICMP errors reported back on the socket (unreachable, refused).
    errors: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Producer {
    /// Sends to `to` from `from` every `every`, for at most `max` datagrams
    /// or `limit` of time, whichever comes first.
    pub fn start(
        ns: &Netns,
        from: SocketAddr,
        to: SocketAddr,
        every: Duration,
        max: u64,
        limit: Duration,
    ) -> anyhow::Result<Producer> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let socket = in_netns(ns, move || {
            let socket = UdpSocket::bind(from)?;
            // Without IP_RECVERR a UDP socket hears only of "fatal" ICMP
            // errors (port unreachable), not of host unreachable.
            use nix::sys::socket::{setsockopt, sockopt};
            if from.is_ipv4() {
                setsockopt(&socket, sockopt::Ipv4RecvErr, &true)?;
            } else {
                setsockopt(&socket, sockopt::Ipv6RecvErr, &true)?;
            }
            socket.connect(to)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })?;
        let (s, n, e) = (stop.clone(), sent.clone(), errors.clone());
        let thread = thread::spawn(move || {
            let started = Instant::now();
            let mut buf = [0u8; 64];
            for seq in 0..max {
                if s.load(Ordering::Relaxed) || started.elapsed() > limit {
                    break;
                }
                let payload = format!("stalewatch-test {seq}");
                if socket.send(payload.as_bytes()).is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                } else {
                    e.fetch_add(1, Ordering::Relaxed);
                }
                // A connected UDP socket reports ICMP errors on the next call.
                match socket.recv(&mut buf) {
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                }
                thread::sleep(every);
            }
        });
        Ok(Producer {
            stop,
            sent,
            errors,
            thread: Some(thread),
        })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A UDP service that counts datagrams by source address and port.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<SocketAddr, u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Receiver> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let socket = in_netns(ns, move || {
            // An IPv6 wildcard socket takes IPv4 too (bindv6only is off).
            let socket = UdpSocket::bind(SocketAddr::from(([0u16; 8], port)))?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(socket)
        })?;
        let (s, map) = (stop.clone(), seen.clone());
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let from = canonical(from);
                    *map.lock().expect("lock").entry(from).or_default() += 1;
                }
            }
        });
        Ok(Receiver {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// Datagrams received from `from` so far.
    pub fn from(&self, from: SocketAddr) -> u64 {
        self.seen
            .lock()
            .expect("lock")
            .get(&from)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until at least `n` datagrams came from `from`.
    pub fn wait_from(&self, from: SocketAddr, n: u64, limit: Duration) -> bool {
        wait_until(limit, || self.from(from) >= n)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `done` every 50 ms until it holds or `limit` has passed.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// IPv4 peers of a dual-stack socket show as `::ffff:a.b.c.d`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Runs `f` on a short-lived thread inside `ns`; what it opens (a socket)
/// stays in that namespace after the thread ends.
fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = ns.path();
    let name = ns.name.clone();
    thread::spawn(move || -> anyhow::Result<T> {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {name} panicked"))?
}

/// A long-lived TCP connection from a fixed source port that writes a line
/// every `every`, as a log shipper or a database client does.
pub struct TcpProducer {
    stop: Arc<AtomicBool>,
    /// 0: writing; 1: idle; 2: closed its end (FIN sent).
    phase: Arc<std::sync::atomic::AtomicU8>,
    written: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProducer {
    pub fn start(
        ns: &Netns,
        from: SocketAddr,
        to: SocketAddr,
        every: Duration,
        limit: Duration,
    ) -> anyhow::Result<TcpProducer> {
        use std::io::Write as _;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let mut stream = in_netns(ns, move || {
            let socket = match from {
                SocketAddr::V4(_) => nix::sys::socket::AddressFamily::Inet,
                SocketAddr::V6(_) => nix::sys::socket::AddressFamily::Inet6,
            };
            let fd = nix::sys::socket::socket(
                socket,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::empty(),
                None,
            )?;
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr, &true)?;
            nix::sys::socket::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &nix::sys::socket::SockaddrStorage::from(from),
            )?;
            nix::sys::socket::connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &nix::sys::socket::SockaddrStorage::from(to),
            )?;
            let stream = std::net::TcpStream::from(fd);
            stream.set_nonblocking(true)?;
            Ok(stream)
        })?;
        let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let (s, p, w) = (stop.clone(), phase.clone(), written.clone());
        let thread = thread::spawn(move || {
            let started = Instant::now();
            let mut seq = 0u64;
            let mut closed = false;
            while !s.load(Ordering::Relaxed) && started.elapsed() < limit {
                let phase = p.load(Ordering::Relaxed);
                if phase == 2 && !closed {
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    closed = true;
                } else if phase == 0 && stream.write_all(format!("line {seq}\n").as_bytes()).is_ok()
                {
                    // Into the socket buffer; TCP retransmits what is not acked.
                    w.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                thread::sleep(every);
            }
        });
        Ok(TcpProducer {
            stop,
            phase,
            written,
            thread: Some(thread),
        })
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Stops writing; the connection stays open.
    pub fn pause(&self) {
        self.phase.store(1, Ordering::Relaxed);
    }

    /// Sends FIN; the socket stays open until `stop`.
    pub fn close(&self) {
        self.phase.store(2, Ordering::Relaxed);
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TcpProducer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP service that counts bytes by peer, and can close its connections
/// (a container that shuts down cleanly sends FIN).
pub struct TcpReceiver {
    stop: Arc<AtomicBool>,
    close: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<SocketAddr, u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpReceiver {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<TcpReceiver> {
        use std::io::Read as _;
        let stop = Arc::new(AtomicBool::new(false));
        let close = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let listener = in_netns(ns, move || {
            let l = std::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let (s, c, map) = (stop.clone(), close.clone(), seen.clone());
        let thread = thread::spawn(move || {
            let mut conns: Vec<(std::net::TcpStream, SocketAddr)> = Vec::new();
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                if let Ok((conn, peer)) = listener.accept() {
                    let _ = conn.set_nonblocking(true);
                    conns.push((conn, canonical(peer)));
                }
                if c.load(Ordering::Relaxed) {
                    // Dropping the streams closes them: FIN to the peer.
                    conns.clear();
                }
                for (conn, peer) in &mut conns {
                    if let Ok(n) = conn.read(&mut buf) {
                        *map.lock().expect("lock").entry(*peer).or_default() += n as u64;
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(TcpReceiver {
            stop,
            close,
            seen,
            thread: Some(thread),
        })
    }

    /// Closes every accepted connection, sending FIN.
    pub fn close_all(&self) {
        self.close.store(true, Ordering::Relaxed);
    }

    pub fn bytes_from(&self, from: SocketAddr) -> u64 {
        self.seen
            .lock()
            .expect("lock")
            .get(&from)
            .copied()
            .unwrap_or(0)
    }

    pub fn wait_bytes_from(&self, from: SocketAddr, n: u64, limit: Duration) -> bool {
        wait_until(limit, || self.bytes_from(from) >= n)
    }
}

impl Drop for TcpReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
