//! The standard `process_*` metrics (CPU, memory, descriptors, threads, start time), read
//! from `/proc/self` at each scrape, named as every Prometheus client library names them so
//! existing dashboards and alerts work. On systems without `/proc` none are shown.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

/// Clock ticks per second of `/proc/self/stat`'s times: 100 on every Linux that ships.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Default)]
pub(crate) struct ProcessCollector;

/// One reading of the process.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    start_time_seconds: f64,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(sample) = sample() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(sample.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                Some(sample.resident_bytes as f64),
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(Unit::Bytes),
                Some(sample.virtual_bytes as f64),
            ),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(Unit::Seconds),
                Some(sample.start_time_seconds),
            ),
            (
                "process_threads",
                "Operating system threads in the process",
                None,
                Some(sample.threads as f64),
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                sample.open_fds.map(|n| n as f64),
            ),
            (
                "process_max_fds",
                "The limit on open file descriptors",
                None,
                sample.max_fds.map(|n| n as f64),
            ),
        ];
        for (name, help, unit, value) in gauges {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let uptime_seconds: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    let mut sample = parse_stat(&stat, now - uptime_seconds)?;
    // Memory from `status`, in kB whatever the page size.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    sample.resident_bytes = status_kb(&status, "VmRSS:")? * 1024;
    sample.virtual_bytes = status_kb(&status, "VmSize:")? * 1024;
    sample.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count() as u64);
    sample.max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| max_open_files(&limits));
    Some(sample)
}

/// `/proc/self/stat` (proc(5)): the command name is in parentheses and may itself hold
/// spaces or parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str, boot_time_seconds: f64) -> Option<Sample> {
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // After the name, field 3 (state) is at index 0: field N is at N - 3.
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let ticks = field(14)? + field(15)?;
    Some(Sample {
        cpu_seconds: ticks as f64 / TICKS_PER_SECOND,
        threads: field(20)?,
        start_time_seconds: boot_time_seconds + field(22)? as f64 / TICKS_PER_SECOND,
        virtual_bytes: 0,
        resident_bytes: 0,
        open_fds: None,
        max_fds: None,
    })
}

/// A `kB` line of `/proc/self/status`, such as `VmRSS:   12345 kB`.
fn status_kb(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// The soft limit of `/proc/self/limits`' "Max open files" line.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (api keys (x)) S 1 4242 4242 0 -1 4194560 2186 0 0 0 250 150 0 0 20 0 \
                    7 0 3000 123456789 5000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 \
                    1 0 0 0 0 0";
        let sample = parse_stat(stat, 1_000.0).unwrap();
        assert_eq!(sample.cpu_seconds, 4.0);
        assert_eq!(sample.threads, 7);
        assert_eq!(sample.start_time_seconds, 1_030.0);
        let status = "Name:\tapikeys\nVmSize:\t  123456 kB\nVmRSS:\t    5000 kB\nThreads:\t7\n";
        assert_eq!(status_kb(status, "VmRSS:"), Some(5_000));
        assert_eq!(status_kb(status, "VmSize:"), Some(123_456));
    }

    #[test]
    fn the_soft_open_files_limit_is_read() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             95000                95000                processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn this_process_reads_as_alive() {
        let sample = sample().expect("/proc is there on Linux");
        assert!(sample.resident_bytes > 0 && sample.threads >= 1);
        assert!(sample.open_fds.unwrap() > 0 && sample.max_fds.unwrap() > 0);
    }
}
