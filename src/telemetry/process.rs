//! The series every exporter has beside its own: the process's CPU, memory, file descriptors,
//! threads and start time (Prometheus's standard `process_*` names, read from `/proc/self` at
//! each scrape; none off Linux), and `ipn_build_info`, whose labels say which binary and
//! version answer.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Linux's clock ticks per second for `/proc` times (USER_HZ, 100 on every architecture Rust
/// targets with Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Registers the process series and `ipn_build_info{binary,version}` in `registry` (one without
/// a prefix, so the names are the standard ones).
pub fn register(registry: &mut Registry, binary: &'static str) {
    registry.register_collector(Box::new(Process { binary }));
}

#[derive(Debug)]
struct Process {
    binary: &'static str,
}

/// What `/proc/self` says now.
#[derive(Debug, Default, PartialEq)]
struct Figures {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    threads: i64,
    start_time_seconds: f64,
    open_fds: i64,
    max_fds: i64,
}

impl Figures {
    fn read() -> Option<Figures> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
        let page = 4096; // the page size of every Linux target we build for
        let mut figures = parse(&stat, &boot, &limits, page)?;
        figures.open_fds = i64::try_from(open_fds).unwrap_or(i64::MAX);
        Some(figures)
    }
}

/// `/proc/self/stat`, `/proc/stat` and `/proc/self/limits` read into figures (open fds aside).
fn parse(stat: &str, boot: &str, limits: &str, page: i64) -> Option<Figures> {
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // man 5 proc: utime 14, stime 15, num_threads 20, starttime 22, vsize 23, rss 24 (1-based,
    // counted from pid; `fields` starts at field 3).
    let number = |n: usize| fields.get(n - 3)?.parse::<i64>().ok();
    let boot_time: i64 = boot
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let max_fds = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(-1);
    Some(Figures {
        cpu_seconds: (number(14)? + number(15)?) as f64 / TICKS_PER_SECOND,
        threads: number(20)?,
        start_time_seconds: boot_time as f64 + number(22)? as f64 / TICKS_PER_SECOND,
        virtual_bytes: number(23)?,
        resident_bytes: number(24)?.saturating_mul(page),
        open_fds: 0,
        max_fds,
    })
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = ConstGauge::new(1_i64);
        let labels = [
            ("binary", self.binary),
            ("version", env!("CARGO_PKG_VERSION")),
        ];
        let mut family = encoder.encode_descriptor(
            "ipn_build_info",
            "Which binary and version answers (always 1)",
            None,
            info.metric_type(),
        )?;
        info.encode(family.encode_family(&labels)?)?;
        let Some(figures) = Figures::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(figures.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                figures.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                figures.virtual_bytes as f64,
            ),
            (
                "process_threads",
                "OS threads of the process",
                figures.threads as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                figures.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                figures.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Limit of open file descriptors (-1: unlimited)",
                figures.max_fds as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_into_the_standard_figures() {
        // A process named with a space and a parenthesis, as the kernel writes it.
        let stat = "4242 (ipn (worker)) S 1 4242 4242 0 -1 4194560 600 0 0 0 250 50 0 0 20 0 7 0 12345 104857600 2560 18446744073709551615";
        let boot = "cpu  1 2 3\nbtime 1764633600\nprocesses 9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        let figures = parse(stat, boot, limits, 4096).expect("parsed");
        assert_eq!(
            figures,
            Figures {
                cpu_seconds: 3.0,
                resident_bytes: 2560 * 4096,
                virtual_bytes: 104_857_600,
                threads: 7,
                start_time_seconds: 1_764_633_600.0 + 123.45,
                open_fds: 0,
                max_fds: 1024,
            }
        );
    }

    #[test]
    fn this_process_reports_itself() {
        let figures = Figures::read().expect("on Linux");
        assert!(figures.resident_bytes > 0 && figures.threads >= 1 && figures.open_fds > 0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        assert!(figures.start_time_seconds <= now + 1.0);
        assert!(figures.start_time_seconds > now - 86_400.0 * 365.0);
    }
}
