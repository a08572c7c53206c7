//! The client side: what a probe does and what it reports.
//!
//! kpr's hooks act per cgroup, and cgroup membership is per process, so
//! probes run in their own process (`kpr probe --spec JSON`, started by
//! [`super::launch::run_probe`]). The same operations also run in-process
//! through [`ProbeSpec::run`], e.g. on a thread from `Netns::enter_thread`.
//! Every operation is bounded: at most [`MAX_COUNT`] attempts, each step
//! at most `timeout_ms` (<= [`MAX_TIMEOUT_MS`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod held;

use super::errno::{error_name, EOF, TIMEOUT};
use super::error::{Result, TestbedError};

/// Most attempts one spec may ask for.
pub const MAX_COUNT: u32 = 100_000;
/// Longest per-step timeout one spec may ask for, in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 30_000;
/// What a TCP client sends before reading the reply.
pub const REQUEST: &[u8] = b"hello\n";
/// Longest reply read; a server identity is far shorter.
const MAX_REPLY: usize = 512;

/// One probe operation. JSON: `{"op":"tcp_requests","target":"10.96.0.1:80",...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProbeSpec {
    /// `count` times: connect, send [`REQUEST`], read the reply line, close.
    TcpRequests {
        /// Where to connect (a VIP or a pod address).
        target: SocketAddr,
        /// How many requests, sequentially.
        count: u32,
        /// Timeout of each step (connect, write, read), in ms.
        timeout_ms: u64,
    },
    /// One unconnected UDP socket: `count` times sendto + recvfrom.
    UdpUnconnected {
        /// Where to send.
        target: SocketAddr,
        /// How many datagrams, sequentially.
        count: u32,
        /// How long to wait for each reply, in ms.
        timeout_ms: u64,
    },
    /// `count` times a new socket: connect + getpeername + send + recv.
    UdpConnected {
        /// Where to connect.
        target: SocketAddr,
        /// How many sockets, sequentially.
        count: u32,
        /// How long to wait for each reply, in ms.
        timeout_ms: u64,
    },
    /// One TCP connection: getpeername and the reply identity.
    TcpPeerName {
        /// Where to connect.
        target: SocketAddr,
        /// Timeout of each step, in ms.
        timeout_ms: u64,
    },
    /// One TCP connect attempt: which errno (if any) and how long it took.
    TcpConnectError {
        /// Where to connect.
        target: SocketAddr,
        /// Connect timeout, in ms.
        timeout_ms: u64,
    },
    /// `count` rounds of one TCP request to each of `targets` in turn, so
    /// latencies of several paths are measured under the same conditions
    /// (same process, same TIME_WAIT load, same host noise).
    TcpInterleaved {
        /// Where to connect, in round order.
        targets: Vec<SocketAddr>,
        /// How many rounds.
        count: u32,
        /// Timeout of each step, in ms.
        timeout_ms: u64,
    },
    /// Where the probe runs: its cgroup v2 path and network namespace;
    /// lets a launcher check that placement worked.
    Placement {},
    /// `sockets` connected UDP sockets held while something changes (see
    /// [`held::udp_held`]): one exchange each, then, once the file
    /// `trigger` exists, every socket exercised for `watch_ms`.
    UdpHeld {
        /// Where to connect.
        target: SocketAddr,
        /// How many sockets.
        sockets: u32,
        /// The file whose creation starts the watch.
        trigger: std::path::PathBuf,
        /// How long to wait for the trigger, then to watch, in ms.
        watch_ms: u64,
        /// How long to wait for the first replies, in ms.
        timeout_ms: u64,
    },
    /// bind() to each address in turn (TCP: a listener; UDP: a socket),
    /// closing each right after: which ones the host lets this process take.
    Bind {
        /// The addresses to bind, in order.
        addrs: Vec<SocketAddr>,
        /// UDP sockets instead of TCP listeners.
        udp: bool,
    },
}

/// What a probe saw; the variant matches the spec's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProbeResult {
    /// Result of [`ProbeSpec::TcpRequests`].
    TcpRequests(RequestsReport),
    /// Result of [`ProbeSpec::UdpUnconnected`].
    UdpUnconnected(UdpReport),
    /// Result of [`ProbeSpec::UdpConnected`].
    UdpConnected(UdpReport),
    /// Result of [`ProbeSpec::TcpPeerName`].
    TcpPeerName(PeerNameReport),
    /// Result of [`ProbeSpec::TcpConnectError`].
    TcpConnectError(ConnectReport),
    /// Result of [`ProbeSpec::TcpInterleaved`]: one report per target, keyed
    /// by the target as written.
    TcpInterleaved(BTreeMap<String, RequestsReport>),
    /// Result of [`ProbeSpec::Placement`].
    Placement(PlacementReport),
    /// Result of [`ProbeSpec::UdpHeld`]: one report per socket.
    UdpHeld(held::HeldReport),
    /// Result of [`ProbeSpec::Bind`]: address as written -> `OK` or the
    /// errno name (`EADDRINUSE`, ...).
    Bind(BTreeMap<String, String>),
}

/// Outcome of repeated TCP requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestsReport {
    /// Reply identity -> number of requests answered with it.
    pub identities: BTreeMap<String, u64>,
    /// `step:NAME` (e.g. `connect:ECONNREFUSED`, `read:TIMEOUT`) -> count.
    pub failures: BTreeMap<String, u64>,
    /// Duration of each successful request (connect + request + reply +
    /// close), in nanoseconds, in order.
    pub durations_ns: Vec<u64>,
}

/// Outcome of repeated UDP exchanges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpReport {
    /// Reply identity -> number of datagrams answered with it.
    pub identities: BTreeMap<String, u64>,
    /// `step:NAME` (e.g. `recv:TIMEOUT`, `recv:ECONNREFUSED`) -> count.
    pub failures: BTreeMap<String, u64>,
    /// Source addresses of the replies as the client saw them
    /// (recvfrom); with kpr, VIPs, not backend addresses.
    pub reply_sources: BTreeSet<String>,
    /// getpeername() after connect (connected mode only; else empty).
    pub peer_names: BTreeSet<String>,
    /// Duration of each answered exchange, in microseconds, in order.
    pub durations_ns: Vec<u64>,
}

/// Outcome of one TCP connection's getpeername.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNameReport {
    /// getpeername() after connect, when connected.
    pub peer: Option<String>,
    /// The reply identity, when one came.
    pub identity: Option<String>,
    /// `step:NAME` of the first failure, if any.
    pub error: Option<String>,
}

/// Outcome of one TCP connect attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Errno name (`ECONNREFUSED`, `TIMEOUT`, ...); `None` when connected.
    pub error: Option<String>,
    /// Time the attempt took, in microseconds.
    pub elapsed_us: u64,
}

impl ConnectReport {
    /// `"OK"` when connected, else the errno name.
    pub fn outcome(&self) -> &str {
        self.error.as_deref().unwrap_or("OK")
    }
}

/// Where a probe process ran.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementReport {
    /// The cgroup v2 path from /proc/self/cgroup (`0::/kpr-test-...`).
    pub cgroup: String,
    /// The network namespace inode (`/proc/thread-self/ns/net`).
    pub netns_inode: u64,
}

impl ProbeSpec {
    /// Checks the bounds: count <= [`MAX_COUNT`], 1 <= timeout_ms <= [`MAX_TIMEOUT_MS`].
    pub fn validate(&self) -> Result<()> {
        let (count, timeout_ms) = match self {
            ProbeSpec::TcpRequests {
                count, timeout_ms, ..
            }
            | ProbeSpec::UdpUnconnected {
                count, timeout_ms, ..
            }
            | ProbeSpec::UdpConnected {
                count, timeout_ms, ..
            }
            | ProbeSpec::TcpInterleaved {
                count, timeout_ms, ..
            } => (*count, *timeout_ms),
            ProbeSpec::TcpPeerName { timeout_ms, .. }
            | ProbeSpec::TcpConnectError { timeout_ms, .. } => (1, *timeout_ms),
            ProbeSpec::Placement {} => return Ok(()),
            ProbeSpec::UdpHeld {
                sockets,
                watch_ms,
                timeout_ms,
                ..
            } => (*sockets, (*watch_ms).max(*timeout_ms)),
            ProbeSpec::Bind { addrs, .. } => (addrs.len() as u32, 1),
        };
        if count > MAX_COUNT {
            return Err(TestbedError::InvalidSpec(format!(
                "count {count} is above {MAX_COUNT}"
            )));
        }
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(TestbedError::InvalidSpec(format!(
                "timeout_ms {timeout_ms} is outside 1..={MAX_TIMEOUT_MS}"
            )));
        }
        Ok(())
    }

    /// The operation's name as in JSON (`tcp_requests`, ...).
    pub fn op(&self) -> &'static str {
        match self {
            ProbeSpec::TcpRequests { .. } => "tcp_requests",
            ProbeSpec::UdpUnconnected { .. } => "udp_unconnected",
            ProbeSpec::UdpConnected { .. } => "udp_connected",
            ProbeSpec::TcpPeerName { .. } => "tcp_peer_name",
            ProbeSpec::TcpConnectError { .. } => "tcp_connect_error",
            ProbeSpec::TcpInterleaved { .. } => "tcp_interleaved",
            ProbeSpec::Placement {} => "placement",
            ProbeSpec::Bind { .. } => "bind",
            ProbeSpec::UdpHeld { .. } => "udp_held",
        }
    }

    /// Runs the operation in this thread (and its network namespace) after
    /// validating it. Socket failures are results, not errors.
    pub fn run(&self) -> Result<ProbeResult> {
        self.validate()?;
        if let ProbeSpec::TcpInterleaved {
            targets,
            count,
            timeout_ms,
        } = self
        {
            return Ok(ProbeResult::TcpInterleaved(tcp_interleaved(
                targets,
                *count,
                ms(*timeout_ms),
            )));
        }
        if let ProbeSpec::Bind { addrs, udp } = self {
            return Ok(ProbeResult::Bind(bind_each(addrs, *udp)));
        }
        if let ProbeSpec::UdpHeld {
            target,
            sockets,
            trigger,
            watch_ms,
            timeout_ms,
        } = self
        {
            return Ok(ProbeResult::UdpHeld(held::udp_held(
                *target,
                *sockets,
                trigger,
                ms(*watch_ms),
                ms(*timeout_ms),
            )));
        }
        Ok(match *self {
            ProbeSpec::TcpInterleaved { .. }
            | ProbeSpec::Bind { .. }
            | ProbeSpec::UdpHeld { .. } => {
                unreachable!("handled above")
            }
            ProbeSpec::TcpRequests {
                target,
                count,
                timeout_ms,
            } => ProbeResult::TcpRequests(tcp_requests(target, count, ms(timeout_ms))),
            ProbeSpec::UdpUnconnected {
                target,
                count,
                timeout_ms,
            } => ProbeResult::UdpUnconnected(udp_unconnected(target, count, ms(timeout_ms))),
            ProbeSpec::UdpConnected {
                target,
                count,
                timeout_ms,
            } => ProbeResult::UdpConnected(udp_connected(target, count, ms(timeout_ms))),
            ProbeSpec::TcpPeerName { target, timeout_ms } => {
                ProbeResult::TcpPeerName(tcp_peer_name(target, ms(timeout_ms)))
            }
            ProbeSpec::TcpConnectError { target, timeout_ms } => {
                ProbeResult::TcpConnectError(tcp_connect(target, ms(timeout_ms)))
            }
            ProbeSpec::Placement {} => ProbeResult::Placement(placement()?),
        })
    }
}

impl ProbeResult {
    /// The operation's name as in JSON; equals the spec's [`ProbeSpec::op`].
    pub fn op(&self) -> &'static str {
        match self {
            ProbeResult::TcpRequests(_) => "tcp_requests",
            ProbeResult::UdpUnconnected(_) => "udp_unconnected",
            ProbeResult::UdpConnected(_) => "udp_connected",
            ProbeResult::TcpPeerName(_) => "tcp_peer_name",
            ProbeResult::TcpConnectError(_) => "tcp_connect_error",
            ProbeResult::TcpInterleaved(_) => "tcp_interleaved",
            ProbeResult::Placement(_) => "placement",
            ProbeResult::Bind(_) => "bind",
            ProbeResult::UdpHeld(_) => "udp_held",
        }
    }

    /// The held sockets' reports, if this is one.
    pub fn as_held(&self) -> Option<&[held::HeldSocket]> {
        match self {
            ProbeResult::UdpHeld(r) => Some(&r.sockets),
            _ => None,
        }
    }

    /// The bind outcomes, if this is a bind report.
    pub fn as_bind(&self) -> Option<&BTreeMap<String, String>> {
        match self {
            ProbeResult::Bind(r) => Some(r),
            _ => None,
        }
    }

    /// The per-target reports of an interleaved run, if this is one.
    pub fn as_interleaved(&self) -> Option<&BTreeMap<String, RequestsReport>> {
        match self {
            ProbeResult::TcpInterleaved(r) => Some(r),
            _ => None,
        }
    }

    /// The TCP requests report, if this is one.
    pub fn as_requests(&self) -> Option<&RequestsReport> {
        match self {
            ProbeResult::TcpRequests(r) => Some(r),
            _ => None,
        }
    }

    /// The UDP report (connected or not), if this is one.
    pub fn as_udp(&self) -> Option<&UdpReport> {
        match self {
            ProbeResult::UdpUnconnected(r) | ProbeResult::UdpConnected(r) => Some(r),
            _ => None,
        }
    }

    /// The peer-name report, if this is one.
    pub fn as_peer_name(&self) -> Option<&PeerNameReport> {
        match self {
            ProbeResult::TcpPeerName(r) => Some(r),
            _ => None,
        }
    }

    /// The connect report, if this is one.
    pub fn as_connect(&self) -> Option<&ConnectReport> {
        match self {
            ProbeResult::TcpConnectError(r) => Some(r),
            _ => None,
        }
    }

    /// The placement report, if this is one.
    pub fn as_placement(&self) -> Option<&PlacementReport> {
        match self {
            ProbeResult::Placement(r) => Some(r),
            _ => None,
        }
    }
}

/// Entry point of the hidden `kpr probe --spec <JSON>` subcommand: runs
/// the spec in this process and prints the [`ProbeResult`] as one JSON
/// line on stdout.
pub fn probe_main(spec_json: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let spec: ProbeSpec = serde_json::from_str(spec_json).context("parsing probe spec JSON")?;
    let result = spec
        .run()
        .with_context(|| format!("running probe {}", spec.op()))?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &result).context("writing probe result")?;
    out.write_all(b"\n").context("writing probe result")?;
    out.flush().context("writing probe result")?;
    Ok(())
}

fn ms(timeout_ms: u64) -> Duration {
    Duration::from_millis(timeout_ms)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn failure(step: &str, e: &std::io::Error) -> String {
    format!("{step}:{}", error_name(e))
}

fn tcp_requests(target: SocketAddr, count: u32, timeout: Duration) -> RequestsReport {
    let mut report = RequestsReport::default();
    for _ in 0..count {
        let start = Instant::now();
        match tcp_request(target, timeout) {
            Ok((identity, _peer)) => {
                report.durations_ns.push(nanos(start.elapsed()));
                *report.identities.entry(identity).or_default() += 1;
            }
            Err(f) => *report.failures.entry(f).or_default() += 1,
        }
    }
    report
}

fn tcp_interleaved(
    targets: &[SocketAddr],
    count: u32,
    timeout: Duration,
) -> BTreeMap<String, RequestsReport> {
    let mut reports: BTreeMap<String, RequestsReport> = BTreeMap::new();
    for _ in 0..count {
        for target in targets {
            let report = reports.entry(target.to_string()).or_default();
            let start = Instant::now();
            match tcp_request(*target, timeout) {
                Ok((identity, _peer)) => {
                    report.durations_ns.push(nanos(start.elapsed()));
                    *report.identities.entry(identity).or_default() += 1;
                }
                Err(f) => *report.failures.entry(f).or_default() += 1,
            }
        }
    }
    reports
}

/// One request on a fresh connection; returns (identity, getpeername).
/// The connection is closed before returning.
fn tcp_request(
    target: SocketAddr,
    timeout: Duration,
) -> std::result::Result<(String, Option<SocketAddr>), String> {
    let mut stream =
        TcpStream::connect_timeout(&target, timeout).map_err(|e| failure("connect", &e))?;
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.write_all(REQUEST))
        .map_err(|e| failure("write", &e))?;
    let reply = read_line(&mut stream, timeout).map_err(|e| failure("read", &e))?;
    Ok((reply, peer))
}

/// Reads until newline, EOF or [`MAX_REPLY`] bytes, within `timeout` in
/// total; an empty reply is an `UnexpectedEof` error.
fn read_line(stream: &mut TcpStream, timeout: Duration) -> std::io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; MAX_REPLY];
    let mut got = 0;
    while got < buf.len() && !buf[..got].contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(ErrorKind::TimedOut, TIMEOUT));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if got == 0 {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, EOF));
    }
    Ok(String::from_utf8_lossy(&buf[..got]).trim().to_string())
}

fn unspecified_for(target: SocketAddr) -> SocketAddr {
    match target.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

fn udp_socket(target: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(unspecified_for(target))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    Ok(socket)
}

fn record_reply(report: &mut UdpReport, buf: &[u8], from: SocketAddr, start: Instant) {
    report.durations_ns.push(nanos(start.elapsed()));
    let identity = String::from_utf8_lossy(buf).trim().to_string();
    *report.identities.entry(identity).or_default() += 1;
    report.reply_sources.insert(from.to_string());
}

fn udp_unconnected(target: SocketAddr, count: u32, timeout: Duration) -> UdpReport {
    let mut report = UdpReport::default();
    let socket = match udp_socket(target, timeout) {
        Ok(s) => s,
        Err(e) => {
            report
                .failures
                .insert(failure("socket", &e), u64::from(count));
            return report;
        }
    };
    let mut buf = [0u8; MAX_REPLY];
    for _ in 0..count {
        let start = Instant::now();
        let outcome = socket
            .send_to(REQUEST, target)
            .map_err(|e| failure("send", &e))
            .and_then(|_| socket.recv_from(&mut buf).map_err(|e| failure("recv", &e)));
        match outcome {
            Ok((n, from)) => record_reply(&mut report, &buf[..n], from, start),
            Err(f) => *report.failures.entry(f).or_default() += 1,
        }
    }
    report
}

fn udp_connected(target: SocketAddr, count: u32, timeout: Duration) -> UdpReport {
    let mut report = UdpReport::default();
    let mut buf = [0u8; MAX_REPLY];
    for _ in 0..count {
        let start = Instant::now();
        let outcome = udp_socket(target, timeout)
            .map_err(|e| failure("socket", &e))
            .and_then(|s| {
                s.connect(target).map_err(|e| failure("connect", &e))?;
                Ok(s)
            })
            .and_then(|s| {
                if let Ok(peer) = s.peer_addr() {
                    report.peer_names.insert(peer.to_string());
                }
                s.send(REQUEST).map_err(|e| failure("send", &e))?;
                s.recv_from(&mut buf).map_err(|e| failure("recv", &e))
            });
        match outcome {
            Ok((n, from)) => record_reply(&mut report, &buf[..n], from, start),
            Err(f) => *report.failures.entry(f).or_default() += 1,
        }
    }
    report
}

fn tcp_peer_name(target: SocketAddr, timeout: Duration) -> PeerNameReport {
    let mut report = PeerNameReport::default();
    let mut stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(failure("connect", &e));
            return report;
        }
    };
    report.peer = stream.peer_addr().ok().map(|p| p.to_string());
    let reply = stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.write_all(REQUEST))
        .map_err(|e| failure("write", &e))
        .and_then(|()| read_line(&mut stream, timeout).map_err(|e| failure("read", &e)));
    match reply {
        Ok(identity) => report.identity = Some(identity),
        Err(f) => report.error = Some(f),
    }
    report
}

fn tcp_connect(target: SocketAddr, timeout: Duration) -> ConnectReport {
    let start = Instant::now();
    let outcome = TcpStream::connect_timeout(&target, timeout);
    let elapsed_us = micros(start.elapsed());
    ConnectReport {
        error: outcome.err().map(|e| error_name(&e)),
        elapsed_us,
    }
}

fn bind_each(addrs: &[SocketAddr], udp: bool) -> BTreeMap<String, String> {
    addrs
        .iter()
        .map(|addr| {
            let outcome = if udp {
                UdpSocket::bind(addr).map(drop)
            } else {
                std::net::TcpListener::bind(addr).map(drop)
            };
            let outcome = match outcome {
                Ok(()) => "OK".to_string(),
                Err(e) => error_name(&e),
            };
            (addr.to_string(), outcome)
        })
        .collect()
}

fn placement() -> Result<PlacementReport> {
    use std::os::unix::fs::MetadataExt as _;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| TestbedError::io("read /proc/self/cgroup", e))?;
    let cgroup = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_string();
    let netns_inode = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| TestbedError::io("stat /proc/thread-self/ns/net", e))?
        .ino();
    Ok(PlacementReport {
        cgroup,
        netns_inode,
    })
}

#[cfg(test)]
mod tests;
