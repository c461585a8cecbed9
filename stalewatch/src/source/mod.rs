//! Evidence sources: each turns one part of the host into plain domain
//! facts. The kernel's probes report failing packets; conntrack over
//! netlink shows entries; namespaces are named and entered; a container
//! engine names containers and the ports it publishes. A source imports
//! the domain and no other layer; the others enter namespaces through
//! [`netns`].

pub mod conntrack;
pub mod engine;
pub mod intent;
pub mod kernel;
pub mod netns;
pub mod sockets;

/// Sets a netlink socket's receive buffer: SO_RCVBUFFORCE (root may
/// exceed net.core.rmem_max), else SO_RCVBUF.
pub fn set_rcvbuf(sock: &netlink_sys::Socket, bytes: usize) -> std::io::Result<()> {
    let value = nix::libc::c_int::try_from(bytes).unwrap_or(nix::libc::c_int::MAX);
    for option in [nix::libc::SO_RCVBUFFORCE, nix::libc::SO_RCVBUF] {
        // SAFETY: a plain int option on a socket we own.
        let rc = unsafe {
            nix::libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(sock),
                nix::libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    Err(std::io::Error::last_os_error())
}
