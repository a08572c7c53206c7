//! Netlink subscriptions to link, address and route changes of the
//! agent's network namespace, used as triggers only: the agent lists links
//! (`--devices`), links, addresses and routes (device detection) or
//! addresses (the host address map) again on each wake-up instead of
//! parsing messages, so a lost or merged message loses nothing.

#![deny(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use crate::datapath::sys;

/// rtnetlink multicast group of link changes (RTMGRP_LINK).
const RTMGRP_LINK: u32 = 0x1;
/// rtnetlink multicast groups of IPv4 and IPv6 address changes
/// (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR).
const RTMGRP_ADDRESSES: u32 = 0x10 | 0x100;
/// rtnetlink multicast groups of IPv4 and IPv6 route changes
/// (RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE).
const RTMGRP_ROUTES: u32 = 0x40 | 0x400;

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

    /// What device detection depends on: link, address (IPv4 and IPv6)
    /// and route changes. Needs a tokio runtime.
    pub fn devices() -> io::Result<NetlinkEvents> {
        Self::subscribe(RTMGRP_LINK | RTMGRP_ADDRESSES | RTMGRP_ROUTES)
    }

    /// Address changes, IPv4 and IPv6. Needs a tokio runtime.
    pub fn addresses() -> io::Result<NetlinkEvents> {
        Self::subscribe(RTMGRP_ADDRESSES)
    }

    fn subscribe(groups: u32) -> io::Result<NetlinkEvents> {
        let fd = sys::netlink_route_socket(groups, true)?;
        Ok(NetlinkEvents {
            fd: sys::async_fd(fd)?,
        })
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
    sys::recv(fd.as_fd(), buf, libc::MSG_DONTWAIT)
}
