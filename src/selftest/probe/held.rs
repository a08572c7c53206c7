//! Connected UDP sockets held across a change of the Service they reach
//! ([`ProbeSpec::UdpHeld`](super::ProbeSpec::UdpHeld)): a stale socket
//! destroyed by the agent must fail at once, the others keep working.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{failure, udp_socket, MAX_REPLY, REQUEST};

/// How long a watched socket's reply is waited for.
const ROUND: Duration = Duration::from_millis(10);
/// Pause between two rounds over the sockets (a time resolution of a few
/// milliseconds is plenty; a busy loop is not).
const PAUSE: Duration = Duration::from_millis(2);

/// What one held socket saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSocket {
    /// Reply identity of the first exchange (the backend it reached).
    pub identity: Option<String>,
    /// `step:NAME` of the first failure while watched, if any.
    pub error: Option<String>,
    /// When that failure happened, in microseconds since the Unix epoch
    /// (the caller compares it with when it made the change).
    pub error_at_unix_us: Option<u64>,
    /// Exchanges answered while watched, before any failure.
    pub replies_watched: u64,
}

/// What the held sockets saw, in the order they were opened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldReport {
    /// One report per socket.
    pub sockets: Vec<HeldSocket>,
}

/// Opens `sockets` connected sockets to `target`, one exchange each;
/// waits (up to `watch`) for the file `trigger`; then exercises every
/// socket in rounds (send, then a reply within [`ROUND`]) until
/// `watch` has passed since the trigger, recording each one's first failure.
pub fn udp_held(
    target: SocketAddr,
    sockets: u32,
    trigger: &Path,
    watch: Duration,
    timeout: Duration,
) -> HeldReport {
    let mut held: Vec<(Option<UdpSocket>, HeldSocket)> =
        (0..sockets).map(|_| open(target, timeout)).collect();
    let wait_until = Instant::now() + watch;
    while !trigger.exists() && Instant::now() < wait_until {
        std::thread::sleep(Duration::from_millis(2));
    }
    let watch_until = Instant::now() + watch;
    while Instant::now() < watch_until {
        for (socket, report) in held.iter_mut() {
            let Some(s) = socket else { continue };
            match exchange(s, ROUND) {
                Ok(_) => report.replies_watched += 1,
                // A datagram lost on a busy host is no failure.
                Err(f) if f.ends_with(":TIMEOUT") => {}
                Err(f) => {
                    report.error = Some(f);
                    report.error_at_unix_us = Some(unix_us());
                    *socket = None;
                }
            }
        }
        std::thread::sleep(PAUSE);
    }
    HeldReport {
        sockets: held.into_iter().map(|(_, r)| r).collect(),
    }
}

fn open(target: SocketAddr, timeout: Duration) -> (Option<UdpSocket>, HeldSocket) {
    let mut report = HeldSocket::default();
    let socket = udp_socket(target, timeout)
        .map_err(|e| failure("socket", &e))
        .and_then(|s| {
            s.connect(target)
                .map(|()| s)
                .map_err(|e| failure("connect", &e))
        });
    match socket.and_then(|s| exchange(&s, timeout).map(|id| (s, id))) {
        Ok((s, identity)) => {
            report.identity = Some(identity);
            (Some(s), report)
        }
        Err(f) => {
            report.error = Some(f);
            (None, report)
        }
    }
}

/// One request and its reply's identity within `timeout`.
fn exchange(socket: &UdpSocket, timeout: Duration) -> Result<String, String> {
    let mut buf = [0u8; MAX_REPLY];
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| failure("socket", &e))?;
    socket.send(REQUEST).map_err(|e| failure("send", &e))?;
    let n = socket.recv(&mut buf).map_err(|e| failure("recv", &e))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
