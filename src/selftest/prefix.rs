//! Names of what a bed creates: every namespace and cgroup name starts
//! with a caller-given prefix and carries the owner's pid, so that
//! concurrent beds never collide and [`super::sweep::sweep_stale`] can tell
//! a killed run's leftovers from live beds.

use std::sync::atomic::{AtomicU32, Ordering};

use super::error::{Result, TestbedError};

/// Longest accepted caller prefix, so derived names stay short
/// (`<prefix>c<pid>-<n>` and `kpr-test-<prefix>-<pid>-<n>`).
pub const MAX_PREFIX_LEN: usize = 8;

/// Checks a caller-given prefix: 1..=8 characters of `[a-z0-9]`, so that
/// every name derived from it is short, unambiguous and shell-safe.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(TestbedError::InvalidName {
            name: prefix.to_string(),
            why: "a prefix is 1 to 8 characters of [a-z0-9]",
        })
    }
}

/// A suffix that keeps names unique when one process builds several test
/// beds with the same prefix: empty the first time, `-1`, `-2`, ... after.
pub fn unique_suffix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    match NEXT.fetch_add(1, Ordering::Relaxed) {
        0 => String::new(),
        n => format!("-{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_lowercase_alphanumerics() {
        assert!(validate_prefix("st").is_ok());
        assert!(validate_prefix("bench01").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("toolongname").is_err());
        assert!(validate_prefix("a-b").is_err());
        assert!(validate_prefix("A").is_err());
        assert!(validate_prefix("a/b").is_err());
    }
}
