//! Servers that answer with who they are.
//!
//! Each server is one thread inside a namespace. A TCP server reads the
//! client's request line (waiting briefly), replies `identity\n` and closes;
//! a UDP server replies `identity` to every datagram's sender. Tests decide
//! which backend a translated connection reached from the identity alone.
//! Servers started with `*_reporting_peer` append the source address they
//! saw (`identity <- 192.0.2.9`), so tests can tell SNAT from a preserved
//! client address; the port is left out to keep the set of replies small.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{Result, TestbedError};
use super::netns::{Netns, NsThread};

/// Longest sleep between stop-flag checks when idle.
const IDLE_POLL: Duration = Duration::from_millis(5);
/// How long a TCP server waits for the request line before replying anyway;
/// also bounds how long one connection can delay a stop (< 50 ms).
const REQUEST_WAIT: Duration = Duration::from_millis(40);
/// UDP receive timeout, so the stop flag is seen at least this often.
const UDP_POLL: Duration = Duration::from_millis(20);
/// Bound on waiting for the server thread to bind.
const BIND_WAIT: Duration = Duration::from_secs(5);
/// Largest request read; anything longer is cut there.
const MAX_REQUEST: usize = 512;

/// Separates the identity from the peer address in a reporting server's reply.
pub const PEER_SEPARATOR: &str = " <- ";

/// Splits a reply into the server's identity and, for a server reporting
/// its peer, the source address it saw.
pub fn split_reply(reply: &str) -> (&str, Option<IpAddr>) {
    match reply.split_once(PEER_SEPARATOR) {
        Some((identity, peer)) => (identity, peer.trim().parse().ok()),
        None => (reply, None),
    }
}

/// Transport of a [`Server`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// Stream: request line, reply line, close.
    Tcp,
    /// Datagram: one reply per datagram.
    Udp,
}

/// A running server thread; Drop stops it (within ~50 ms) and joins it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    proto: Proto,
    identity: String,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl Server {
    /// Starts a TCP server on `addr` inside `netns`. `identity` defaults to
    /// `addr` as text (`10.244.0.11:80`, `[fd00:10:244::11]:80`).
    /// Returns once the socket is bound and listening.
    pub fn tcp(netns: &Netns, addr: SocketAddr, identity: Option<String>) -> Result<Server> {
        Server::start(netns, addr, Proto::Tcp, identity, false)
    }

    /// Like [`Server::tcp`], replying `identity <- PEER_IP`.
    pub fn tcp_reporting_peer(
        netns: &Netns,
        addr: SocketAddr,
        identity: Option<String>,
    ) -> Result<Server> {
        Server::start(netns, addr, Proto::Tcp, identity, true)
    }

    /// Like [`Server::udp`], replying `identity <- PEER_IP`.
    pub fn udp_reporting_peer(
        netns: &Netns,
        addr: SocketAddr,
        identity: Option<String>,
    ) -> Result<Server> {
        Server::start(netns, addr, Proto::Udp, identity, true)
    }

    /// Starts a UDP server on `addr` inside `netns`; `identity` as for
    /// [`Server::tcp`]. Returns once the socket is bound.
    pub fn udp(netns: &Netns, addr: SocketAddr, identity: Option<String>) -> Result<Server> {
        Server::start(netns, addr, Proto::Udp, identity, false)
    }

    fn start(
        netns: &Netns,
        addr: SocketAddr,
        proto: Proto,
        identity: Option<String>,
        report_peer: bool,
    ) -> Result<Server> {
        let identity = identity.unwrap_or_else(|| addr.to_string());
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = sync_channel::<std::result::Result<(), std::io::Error>>(1);
        let (t_identity, t_hits, t_stop) = (identity.clone(), hits.clone(), stop.clone());
        let thread = netns.spawn_thread(move || {
            let reply = Reply {
                identity: t_identity,
                report_peer,
            };
            match proto {
                Proto::Tcp => match bind_tcp(addr) {
                    Ok(listener) => {
                        let _ = bound_tx.send(Ok(()));
                        serve_tcp(listener, &reply, &t_hits, &t_stop);
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                    }
                },
                Proto::Udp => match bind_udp(addr) {
                    Ok(socket) => {
                        let _ = bound_tx.send(Ok(()));
                        serve_udp(socket, &reply, &t_hits, &t_stop);
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                    }
                },
            }
        })?;
        let server = Server {
            addr,
            proto,
            identity,
            hits,
            stop,
            thread: Some(thread),
        };
        let what = format!("bind {proto:?} server on {addr} in netns {}", netns.name());
        match bound_rx.recv_timeout(BIND_WAIT) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(TestbedError::io(what, e)),
            Err(RecvTimeoutError::Timeout) => Err(TestbedError::Timeout {
                what,
                waited_ms: BIND_WAIT.as_millis() as u64,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(TestbedError::ThreadPanicked {
                netns: netns.name().to_string(),
                message: format!("{what}: server thread ended"),
            }),
        }
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's transport.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// What the server replies with.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Replies sent so far (one per TCP connection or UDP datagram). A hit
    /// is counted just before its reply is sent, so once a client has read
    /// a reply, `hits()` already includes it.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if let Err(e) = thread.join() {
                tracing::warn!(addr = %self.addr, error = %e, "test server thread failed");
            }
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_read_timeout(Some(UDP_POLL))?;
    Ok(socket)
}

/// What a server answers.
struct Reply {
    identity: String,
    report_peer: bool,
}

impl Reply {
    fn to(&self, peer: SocketAddr) -> Vec<u8> {
        if self.report_peer {
            format!(
                "{}{PEER_SEPARATOR}{}",
                self.identity,
                peer.ip().to_canonical()
            )
            .into_bytes()
        } else {
            self.identity.as_bytes().to_vec()
        }
    }
}

fn serve_tcp(listener: TcpListener, reply: &Reply, hits: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let mut line = reply.to(peer);
                line.push(b'\n');
                // Counted before the reply leaves, so a client that has its
                // reply always sees the hit; taken back if the reply fails.
                hits.fetch_add(1, Ordering::Relaxed);
                if answer_tcp(stream, &line).is_err() {
                    hits.fetch_sub(1, Ordering::Relaxed);
                }
            }
            // Block until a connection arrives (or the stop check is due):
            // a sleep here would add its length to every measured request.
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(&listener, STOP_CHECK),
            Err(e) => {
                tracing::debug!(error = %e, "test server accept failed");
                std::thread::sleep(IDLE_POLL);
            }
        }
    }
}

/// How long an idle server blocks before it looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

fn wait_readable(fd: &impl std::os::fd::AsFd, timeout: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// Reads the request line (at most [`REQUEST_WAIT`]), replies, closes.
fn answer_tcp(mut stream: TcpStream, line: &[u8]) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(REQUEST_WAIT))?;
    let deadline = Instant::now() + REQUEST_WAIT;
    let mut buf = [0u8; MAX_REQUEST];
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if buf[..got].contains(&b'\n') {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    stream.write_all(line)
}

fn serve_udp(socket: UdpSocket, reply: &Reply, hits: &AtomicU64, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                hits.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = socket.send_to(&reply.to(peer), peer) {
                    hits.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!(%peer, error = %e, "test server reply failed");
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "test server recv failed");
                std::thread::sleep(IDLE_POLL);
            }
        }
    }
}
