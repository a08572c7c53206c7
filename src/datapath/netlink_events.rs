//! Netlink subscriptions to link and address changes of the agent's
//! network namespace, used as triggers only: the agent lists links
//! (`--devices`) or addresses (the host address map) again on each wake-up
//! instead of parsing messages, so a lost or merged message loses nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// rtnetlink multicast group of link changes (RTMGRP_LINK).
const RTMGRP_LINK: u32 = 0x1;
/// rtnetlink multicast groups of IPv4 and IPv6 address changes
/// (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR).
const RTMGRP_ADDRESSES: u32 = 0x10 | 0x100;

/// A netlink socket subscribed to changes of this namespace's links or
/// addresses. Messages are not parsed: each wake-up means "list them
/// again".
pub struct NetlinkEvents {
    fd: AsyncFd<OwnedFd>,
}

impl NetlinkEvents {
    /// Link changes: a link added, removed, renamed or changing state.
    /// Needs a tokio runtime.
    pub fn links() -> io::Result<NetlinkEvents> {
        Self::subscribe(RTMGRP_LINK)
    }

    /// Address changes, IPv4 and IPv6. Needs a tokio runtime.
    pub fn addresses() -> io::Result<NetlinkEvents> {
        Self::subscribe(RTMGRP_ADDRESSES)
    }

    fn subscribe(groups: u32) -> io::Result<NetlinkEvents> {
        // SAFETY: socket(2) and bind(2) with a zeroed, then filled
        // sockaddr_nl of the right size; the fd is owned right away.
        let fd = unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            addr.nl_groups = groups;
            let ret = libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            );
            if ret != 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        };
        // SAFETY: the OwnedFd is open and moves into the AsyncFd, which
        // owns it (same descriptor) until dropped.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(NetlinkEvents { fd })
    }

    /// Waits until something changed, then drains what is queued (a burst is
    /// one wake-up). An overrun (ENOBUFS: events were lost) also counts as
    /// a change, so nothing is missed.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv(fd.get_ref(), &mut buf)) {
                Ok(Ok(_)) => break,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => break,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        // Drain the rest of the burst without waiting (bounded).
        for _ in 0..1024 {
            match recv(self.fd.get_ref(), &mut buf) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(_) => break, // EAGAIN: drained
            }
        }
        Ok(())
    }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
