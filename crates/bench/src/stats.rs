//! Latency samples and their percentiles, and reading a process's CPU time and memory from
//! `/proc`. Not for anything that talks to a server.

use std::time::Duration;

use serde::Serialize;

/// Send→receive latencies, in microseconds.
#[derive(Default)]
pub struct Latencies {
    micros: Vec<u32>,
}

/// Percentiles in milliseconds.
#[derive(Serialize, Clone, Copy, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latencies {
    /// Record one latency.
    pub fn record(&mut self, d: Duration) {
        self.micros
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    /// Take in another set.
    pub fn merge(&mut self, other: Latencies) {
        self.micros.extend(other.micros);
    }

    /// The percentiles (all zero when nothing was recorded).
    pub fn percentiles(&mut self) -> Percentiles {
        if self.micros.is_empty() {
            return Percentiles::default();
        }
        self.micros.sort_unstable();
        let n = self.micros.len();
        let at = |q: f64| {
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            f64::from(self.micros[i]) / 1000.0
        };
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: f64::from(self.micros[n - 1]) / 1000.0,
        }
    }
}

/// One reading of a process's counters.
#[derive(Clone, Copy, Default)]
pub struct ProcSample {
    /// User + system CPU time, in clock ticks (USER_HZ, 100 on Linux).
    pub cpu_ticks: u64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size over the process's life, KiB.
    pub hwm_kib: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ; 100 on every Linux
/// architecture we run on).
pub const TICKS_PER_SEC: f64 = 100.0;

/// User + system CPU ticks from the text of a `/proc/…/stat` file (0 where unreadable).
fn stat_ticks(stat: &str) -> u64 {
    // Fields after the command name (which may contain spaces) start at field 3 (`state`).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    num(11) + num(12) // utime (field 14) + stime (field 15)
}

/// CPU ticks of the threads of `pid` named `name` (`/proc/<pid>/task/*/comm`); `None` if it
/// has no such thread (a server on PostgreSQL has no SQLite writer).
pub fn thread_ticks(pid: u32, name: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut found = None;
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            *found.get_or_insert(0) += stat_ticks(&stat);
        }
    }
    found
}

/// Read `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn sample(pid: u32) -> std::io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let cpu_ticks = stat_ticks(&stat);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_ticks,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// CPU ticks of the threads named `name` summed over several processes; `None` if none has
/// such a thread.
pub fn thread_ticks_all(pids: &[u32], name: &str) -> Option<u64> {
    pids.iter()
        .filter_map(|&pid| thread_ticks(pid, name))
        .reduce(|a, b| a + b)
}

/// Sum of samples over several processes (several server nodes).
pub fn sample_all(pids: &[u32]) -> ProcSample {
    let mut total = ProcSample::default();
    for &pid in pids {
        if let Ok(s) = sample(pid) {
            total.cpu_ticks += s.cpu_ticks;
            total.rss_kib += s.rss_kib;
            total.hwm_kib += s.hwm_kib;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_add_user_and_system_time_after_a_command_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime ...
        let stat = "42 (sqlite writer) S 1 42 42 0 -1 4194304 10 0 0 0 250 17 0 0 20 0";
        assert_eq!(stat_ticks(stat), 267);
        assert_eq!(stat_ticks("garbage"), 0);
    }

    #[test]
    fn this_process_threads_are_found_by_name() {
        let me = std::process::id();
        let name = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        assert!(thread_ticks(me, name.trim_end()).is_some());
        assert_eq!(thread_ticks(me, "no-such-thread-name"), None);
    }

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut l = Latencies::default();
        for ms in 1..=1000u64 {
            l.record(Duration::from_millis(ms));
        }
        let p = l.percentiles();
        assert_eq!(p.p50, 500.0);
        assert_eq!(p.p99, 990.0);
        assert_eq!(p.p999, 999.0);
        assert_eq!(p.max, 1000.0);
        assert_eq!(Latencies::default().percentiles().max, 0.0);
    }

    #[test]
    fn our_own_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(s.hwm_kib >= s.rss_kib);
    }
}
