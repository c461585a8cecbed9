//! The load: a UDP flood from the sender namespace, and a sink that drains
//! the destination.
//!
//! The sender writes whole IPv4/UDP datagrams to one non-blocking raw socket
//! (`IPPROTO_RAW`) with `sendmmsg`, 64 at a time: distinct flows by the ten
//! thousand (source address x source port) without ten thousand bound UDP
//! sockets, and the router sees ordinary UDP. Every loop is bounded in time
//! and in count, and stops when told or on Ctrl-C.

use std::{
    mem,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::libc;

use super::topo;
use crate::netns::Netns;

const BATCH: usize = 64;
const PAYLOAD: &[u8] = b"stalewatch-bench..";
const PACKET_LEN: usize = 20 + 8 + PAYLOAD.len();

/// What to send.
#[derive(Clone, Debug)]
pub struct Spec {
    pub dst: Ipv4Addr,
    pub dport: u16,
    /// Distinct flows: source addresses x consecutive source ports.
    pub flows: u32,
    pub first_sport: u16,
    /// IP TTL; 1 makes the router drop every packet at forwarding.
    pub ttl: u8,
    /// Packets per second, or as fast as one thread can.
    pub rate: Option<u64>,
    /// Hard limits: the flood stops at whichever comes first.
    pub limit: Duration,
    pub max_packets: u64,
}

pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    /// The sending thread's id, for its CPU time.
    tid: Arc<AtomicI32>,
    /// Calls that failed with a transient error (queue full).
    busy: Arc<AtomicU64>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A raw socket made in `ns`: it sends from there whichever thread uses it.
fn raw_socket(ns: &Netns) -> anyhow::Result<OwnedFd> {
    ns.within(|| {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
    .context("raw socket in the sender namespace")
}

/// One datagram. With `IPPROTO_RAW` the kernel fills in the IP checksum,
/// total length and id; a UDP checksum of 0 means "none" for IPv4.
fn packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, ttl: u8) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PACKET_LEN as u16).to_be_bytes());
    p[8] = ttl;
    p[9] = libc::IPPROTO_UDP as u8;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + PAYLOAD.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(PAYLOAD);
    p
}

impl Flood {
    pub fn start(sender: &Netns, spec: Spec) -> anyhow::Result<Flood> {
        if spec.flows == 0 {
            bail!("a flood needs at least one flow");
        }
        let socket = raw_socket(sender)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let busy = Arc::new(AtomicU64::new(0));
        let tid = Arc::new(AtomicI32::new(0));
        let (s, n, b, t) = (stop.clone(), sent.clone(), busy.clone(), tid.clone());
        let thread = thread::Builder::new().name("flood".into()).spawn(move || {
            t.store(nix::unistd::gettid().as_raw(), Ordering::Relaxed);
            pin(SENDER_CPU);
            send_loop(&socket, &spec, &s, &n, &b)
        })?;
        Ok(Flood {
            stop,
            sent,
            tid,
            busy,
            thread: Some(thread),
        })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn busy(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }

    /// CPU time of the sending thread so far, ns. The kernel accounts the
    /// softirq work done on its way out (veth hands packets over inline:
    /// the router's forwarding, conntrack, NAT, drops, and the BPF programs
    /// on those paths) to the sending thread, as this kernel has no
    /// IRQ_TIME_ACCOUNTING. So CPU per packet measures the path's cost
    /// whether or not other work on the machine lets the thread run.
    pub fn cpu_ns(&self) -> Option<u64> {
        let tid = self.tid.load(Ordering::Relaxed);
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// Whether the sender gave up (an error) or hit a limit.
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the flood; reports a send error, if the loop hit one.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the flood thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn send_loop(
    socket: &OwnedFd,
    spec: &Spec,
    stop: &AtomicBool,
    sent: &AtomicU64,
    busy: &AtomicU64,
) -> anyhow::Result<()> {
    let flows = spec.flows as usize;
    let sources = u32::from(topo::SOURCES);
    let packets: Vec<[u8; PACKET_LEN]> = (0..spec.flows)
        .map(|i| {
            // Flow i: source address i % 8, port first + i / 8.
            let sport = spec.first_sport.wrapping_add((i / sources) as u16);
            packet(
                topo::source((i % sources) as u8),
                sport,
                spec.dst,
                spec.dport,
                spec.ttl,
            )
        })
        .collect();
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut to: libc::sockaddr_in = unsafe { mem::zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from_ne_bytes(spec.dst.octets());
    let mut iovs: Vec<libc::iovec> = packets
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: PACKET_LEN,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: as above, plain data.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_name = (&raw mut to).cast();
            m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();

    let started = Instant::now();
    let mut next = 0usize;
    let mut total = 0u64;
    let mut checks = 0u32;
    while total < spec.max_packets {
        // Time and flags are checked every few batches only: the loop is
        // the benchmark's load and must stay tight.
        checks = checks.wrapping_add(1);
        if checks.is_multiple_of(16)
            && (stop.load(Ordering::Relaxed)
                || super::interrupted()
                || started.elapsed() >= spec.limit)
        {
            break;
        }
        let mut want = BATCH.min(flows - next);
        if let Some(rate) = spec.rate {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            if total >= due {
                thread::sleep(Duration::from_micros(100));
                continue;
            }
            want = want.min((due - total) as usize);
        }
        // SAFETY: msgs[next..next + want] are valid headers whose buffers
        // (packets, iovs, to) outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs[next..].as_mut_ptr(),
                want as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR) => {
                    busy.fetch_add(1, Ordering::Relaxed);
                    thread::yield_now();
                    continue;
                }
                _ => return Err(err).context("sendmmsg"),
            }
        }
        let n = n as usize;
        total += n as u64;
        sent.store(total, Ordering::Relaxed);
        next = (next + n) % flows;
    }
    Ok(())
}

/// The CPUs the sender and the sink run on. Left to the scheduler, the
/// sink landed on the sender's CPU in some runs and on the other in
/// others, and the healthy path's cost per packet took two values 15%
/// apart from run to run (data handed over within one core's caches or
/// across two); pinned, every run has the same layout. The tools under
/// test run wherever the scheduler puts them.
const SENDER_CPU: usize = 0;
const SINK_CPU: usize = 1;

/// Pins the calling thread to `cpu`, where the machine has it.
fn pin(cpu: usize) {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpu >= cpus {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// A UDP service in the destination that drains whatever arrives, so that
/// the healthy path ends in a delivered datagram, not a drop.
pub struct Sink {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    pub fn start(ns: &Netns, addr: SocketAddr) -> anyhow::Result<Sink> {
        let socket = ns
            .within(move || {
                let socket = UdpSocket::bind(addr)?;
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                let size: libc::c_int = 32 << 20;
                // SAFETY: setsockopt with a c_int value of the right size.
                // FORCE: as root, past rmem_max, for this one socket only.
                let rc = unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        (&raw const size).cast(),
                        mem::size_of::<libc::c_int>() as u32,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(socket)
            })
            .context("sink socket in the destination namespace")?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), received.clone());
        let thread = thread::Builder::new().name("sink".into()).spawn(move || {
            pin(SINK_CPU);
            drain(&socket, &s, &r)
        })?;
        Ok(Sink {
            stop,
            received,
            thread: Some(thread),
        })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn drain(socket: &UdpSocket, stop: &AtomicBool, received: &AtomicU64) {
    let mut bufs = [[0u8; 64]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: plain data; all-zero is valid.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // The socket's 100 ms receive timeout bounds each wait, so the stop
    // flag is seen promptly.
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs point at live buffers; at most BATCH are filled.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
