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
    worker: Worker,
    sent: Arc<AtomicU64>,
    /// ICMP errors reported back on the socket (unreachable, refused).
    errors: Arc<AtomicU64>,
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
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let socket = ns.within(move || {
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
        let (n, e) = (sent.clone(), errors.clone());
        let worker = Worker::spawn(move |stop| {
            let started = Instant::now();
            let mut buf = [0u8; 64];
            for seq in 0..max {
                if stop.load(Ordering::Relaxed) || started.elapsed() > limit {
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
            worker,
            sent,
            errors,
        })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn stop(&mut self) {
        self.worker.stop();
    }
}

/// A UDP service that counts datagrams by source address and port.
pub struct Receiver {
    _worker: Worker,
    seen: Counts,
}

impl Receiver {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Receiver> {
        let seen = Counts::default();
        let socket = ns.within(move || {
            // An IPv6 wildcard socket takes IPv4 too (bindv6only is off).
            let socket = UdpSocket::bind(SocketAddr::from(([0u16; 8], port)))?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(socket)
        })?;
        let counts = seen.clone();
        let worker = Worker::spawn(move |stop| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    counts.add(canonical(from), 1);
                }
            }
        });
        Ok(Receiver {
            _worker: worker,
            seen,
        })
    }

    /// Datagrams received from `from` so far.
    pub fn from(&self, from: SocketAddr) -> u64 {
        self.seen.get(from)
    }

    /// Waits until at least `n` datagrams came from `from`.
    pub fn wait_from(&self, from: SocketAddr, n: u64, limit: Duration) -> bool {
        wait_until(limit, || self.from(from) >= n)
    }
}

/// A thread of a traffic loop, told to stop and joined on `stop` or drop.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `body` on a thread; it returns once the flag it is given is set.
    fn spawn(body: impl FnOnce(&AtomicBool) + Send + 'static) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || body(&flag));
        Worker {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a service received, by peer, shared with its thread.
#[derive(Clone, Default)]
struct Counts(Arc<Mutex<HashMap<SocketAddr, u64>>>);

impl Counts {
    fn add(&self, peer: SocketAddr, n: u64) {
        *self.0.lock().expect("lock").entry(peer).or_default() += n;
    }

    fn get(&self, peer: SocketAddr) -> u64 {
        self.0
            .lock()
            .expect("lock")
            .get(&peer)
            .copied()
            .unwrap_or(0)
    }
}

/// Polls `done` every 50 ms until it holds or `limit` has passed.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    crate::poll(limit, || done().then_some(())).is_some()
}

/// IPv4 peers of a dual-stack socket show as `::ffff:a.b.c.d`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A long-lived TCP connection from a fixed source port that writes a line
/// every `every`, as a log shipper or a database client does.
pub struct TcpProducer {
    worker: Worker,
    /// 0: writing; 1: idle; 2: closed its end (FIN sent).
    phase: Arc<std::sync::atomic::AtomicU8>,
    written: Arc<AtomicU64>,
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
        let written = Arc::new(AtomicU64::new(0));
        let mut stream = ns.within(move || {
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
        let (p, w) = (phase.clone(), written.clone());
        let worker = Worker::spawn(move |stop| {
            let started = Instant::now();
            let mut seq = 0u64;
            let mut closed = false;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
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
            worker,
            phase,
            written,
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
        self.worker.stop();
    }
}

/// A TCP service that counts bytes by peer, and can close its connections
/// (a container that shuts down cleanly sends FIN).
pub struct TcpReceiver {
    _worker: Worker,
    close: Arc<AtomicBool>,
    seen: Counts,
}

impl TcpReceiver {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<TcpReceiver> {
        use std::io::Read as _;
        let close = Arc::new(AtomicBool::new(false));
        let seen = Counts::default();
        let listener = ns.within(move || {
            let l = std::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let (c, counts) = (close.clone(), seen.clone());
        let worker = Worker::spawn(move |stop| {
            let mut conns: Vec<(std::net::TcpStream, SocketAddr)> = Vec::new();
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
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
                        counts.add(*peer, n as u64);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(TcpReceiver {
            _worker: worker,
            close,
            seen,
        })
    }

    /// Closes every accepted connection, sending FIN.
    pub fn close_all(&self) {
        self.close.store(true, Ordering::Relaxed);
    }

    pub fn bytes_from(&self, from: SocketAddr) -> u64 {
        self.seen.get(from)
    }

    pub fn wait_bytes_from(&self, from: SocketAddr, n: u64, limit: Duration) -> bool {
        wait_until(limit, || self.bytes_from(from) >= n)
    }
}
