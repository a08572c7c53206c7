//! What the process is and uses: the `process_*` metrics every Prometheus
//! client library exports (read from `/proc/self` at each scrape, as Go's
//! client does, so the standard "Kubernetes / Proxy" CPU and memory panels
//! work), and `kpr_build_info`, a constant 1 whose labels name the build.

use std::fs;

use nix::sys::resource::{getrlimit, Resource};
use nix::unistd::{sysconf, SysconfVar};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// One reading of the process's resources.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size, in bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit of open file descriptors.
    pub max_fds: u64,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// The fields of `/proc/<pid>/stat` used here, in the units the kernel
/// gives them (clock ticks, bytes, pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    utime_ticks: u64,
    stime_ticks: u64,
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may hold spaces and parentheses, so fields are counted after its
/// last `)`: field n is at index n - 3 there.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, after_comm) = text.rsplit_once(')')?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
        vsize_bytes: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The boot time (`btime`, seconds since the epoch) from `/proc/stat`.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl ProcessStats {
    /// Reads this process's stats; None when `/proc` cannot be read (then
    /// the `process_*` metrics are left out of the scrape).
    pub fn read() -> Option<ProcessStats> {
        let stat = parse_stat(&fs::read_to_string("/proc/self/stat").ok()?)?;
        let boot = parse_boot_time(&fs::read_to_string("/proc/stat").ok()?)?;
        let ticks = positive_sysconf(SysconfVar::CLK_TCK)? as f64;
        let page_size = positive_sysconf(SysconfVar::PAGE_SIZE)?;
        let open_fds = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max_fds = getrlimit(Resource::RLIMIT_NOFILE).ok()?.0;
        Some(ProcessStats {
            cpu_seconds: (stat.utime_ticks + stat.stime_ticks) as f64 / ticks,
            resident_bytes: stat.rss_pages.saturating_mul(page_size),
            virtual_bytes: stat.vsize_bytes,
            open_fds,
            max_fds,
            start_time_seconds: boot as f64 + stat.start_ticks as f64 / ticks,
        })
    }
}

fn positive_sysconf(var: SysconfVar) -> Option<u64> {
    sysconf(var)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v > 0)
}

/// A gauge value as the encoder takes it (saturating at `i64::MAX`).
fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

/// Exports [`ProcessStats::read`] at every scrape under the names of Go's
/// process collector.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = ProcessStats::read() else {
            return Ok(());
        };
        // The unit is appended to the name by prometheus-client (and
        // `_total` to counters).
        let counter = ConstCounter::new(s.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent in seconds",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?)?;
        for (name, help, unit, value) in [
            (
                "process_resident_memory",
                "Resident memory size in bytes",
                Some(&Unit::Bytes),
                s.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes",
                Some(&Unit::Bytes),
                s.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                None,
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                None,
                s.max_fds,
            ),
        ] {
            gauge(value).encode(encoder.encode_descriptor(
                name,
                help,
                unit,
                MetricType::Gauge,
            )?)?;
        }
        ConstGauge::new(s.start_time_seconds).encode(encoder.encode_descriptor(
            "process_start_time",
            "Start time of the process since unix epoch in seconds",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// The labels of `kpr_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    /// The crate version.
    version: String,
    /// `KPR_REVISION` at build time (e.g. a git commit), else "unknown".
    revision: String,
    /// The compiler, `rustc --version` at build time.
    rustc: String,
}

/// `kpr_build_info{version, revision, rustc} 1`, as `kubernetes_build_info`.
#[derive(Debug)]
pub struct BuildInfo {
    labels: BuildLabels,
}

impl Default for BuildInfo {
    fn default() -> Self {
        BuildInfo {
            labels: BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                revision: option_env!("KPR_REVISION")
                    .filter(|r| !r.is_empty())
                    .unwrap_or("unknown")
                    .to_string(),
                rustc: env!("KPR_RUSTC_VERSION").to_string(),
            },
        }
    }
}

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "kpr_build_info",
            "A metric with a constant '1' value labeled by the version, revision and compiler kpr was built from",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(family.encode_family(&self.labels)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (kpr (a) b) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    150 50 0 0 20 0 3 0 12345 104857600 2560 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime_ticks: 150,
                stime_ticks: 50,
                start_ticks: 12345,
                vsize_bytes: 104_857_600,
                rss_pages: 2560,
            })
        );
        assert_eq!(parse_stat("4242 (kpr) S 1"), None);
    }

    #[test]
    fn boot_time_comes_from_the_btime_line() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n";
        assert_eq!(parse_boot_time(text), Some(1_700_000_000));
        assert_eq!(parse_boot_time("cpu 1\n"), None);
    }

    #[test]
    fn this_process_reads_as_running_with_memory_and_descriptors() {
        let s = ProcessStats::read().expect("/proc/self is readable");
        assert!(
            s.resident_bytes > 0 && s.virtual_bytes >= s.resident_bytes,
            "{s:?}"
        );
        assert!(s.open_fds >= 3 && s.max_fds >= s.open_fds, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        // Started within the last day, not in the future (tick rounding aside).
        assert!(
            s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0,
            "{s:?}"
        );
    }
}
