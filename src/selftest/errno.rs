//! Stable names for socket errors, so probe results compare as strings
//! ("ECONNREFUSED") across processes and in JSON.

use std::io;

/// The name reported for a timeout, whether it came from our own deadline
/// (no errno), `SO_RCVTIMEO` (`EAGAIN`) or std's `connect_timeout`.
pub const TIMEOUT: &str = "TIMEOUT";

/// The name reported when the peer closed without sending a reply.
pub const EOF: &str = "EOF";

/// Names an I/O error: the errno symbol when there is one (`ECONNREFUSED`),
/// [`TIMEOUT`] for any timeout, [`EOF`] for a premature end of stream, and
/// otherwise the `io::ErrorKind` as Debug text.
pub fn error_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => TIMEOUT.to_string(),
        Some(code) => errno_name(code),
        None => match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => TIMEOUT.to_string(),
            io::ErrorKind::UnexpectedEof => EOF.to_string(),
            kind => format!("{kind:?}"),
        },
    }
}

/// The symbol of an errno value, or `E<number>` for ones not listed.
pub fn errno_name(code: i32) -> String {
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::EPIPE => "EPIPE",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPROTOTYPE => "EPROTOTYPE",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENETRESET => "ENETRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EDESTADDRREQ => "EDESTADDRREQ",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EALREADY => "EALREADY",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ESRCH => "ESRCH",
        _ => return format!("E{code}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_named_by_errno_symbol() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(error_name(&refused), "ECONNREFUSED");
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert_eq!(errno_name(4095), "E4095");
    }

    #[test]
    fn every_kind_of_timeout_is_named_timeout() {
        let rcvtimeo = io::Error::from_raw_os_error(libc::EAGAIN);
        let deadline = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
        assert_eq!(error_name(&rcvtimeo), TIMEOUT);
        assert_eq!(error_name(&deadline), TIMEOUT);
        let kernel = io::Error::from_raw_os_error(libc::ETIMEDOUT);
        assert_eq!(error_name(&kernel), "ETIMEDOUT");
    }
}
