//! The resource monitor: samples the broker's RSS and the data dir's free space once a
//! second and raises or clears the broker's memory and disk alarms (RabbitMQ's
//! `vm_memory_high_watermark` and `disk_free_limit`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use warren_core::{AlarmState, Broker};

/// Thresholds, adjustable at runtime (tests lower and raise them).
#[derive(Debug)]
pub struct ResourceLimits {
    /// RSS above which the memory alarm goes up.
    pub memory_bytes: AtomicU64,
    /// Free space on the data dir's filesystem below which the disk alarm goes up.
    pub disk_free_bytes: AtomicU64,
}

impl ResourceLimits {
    /// From the config: an absolute watermark if given, else `relative` × total RAM.
    pub fn new(relative: f64, absolute: u64, disk_free: u64) -> Self {
        let memory = if absolute > 0 {
            absolute
        } else {
            total_memory()
                .map(|t| (t as f64 * relative) as u64)
                .unwrap_or(u64::MAX)
        };
        Self {
            memory_bytes: AtomicU64::new(memory),
            disk_free_bytes: AtomicU64::new(disk_free),
        }
    }
}

/// Runs until `shutdown`; checks every `period`.
pub async fn monitor(
    broker: Arc<Broker>,
    data_dir: PathBuf,
    limits: Arc<ResourceLimits>,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let rss = rss_bytes().unwrap_or(0);
        let free = disk_free(&data_dir).unwrap_or(u64::MAX);
        let state = AlarmState {
            memory: rss > limits.memory_bytes.load(Ordering::Relaxed),
            disk: free < limits.disk_free_bytes.load(Ordering::Relaxed),
        };
        let before = broker.alarms.get();
        if broker.alarms.set(state) {
            if state.blocked() {
                tracing::warn!(
                    rss,
                    disk_free = free,
                    memory = state.memory,
                    disk = state.disk,
                    "resource alarm raised: publishers blocked"
                );
            } else {
                tracing::info!(rss, disk_free = free, was = ?before, "resource alarm cleared");
            }
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Open file descriptors of this process (its entries in /proc/self/fd).
pub fn fd_used() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// The soft limit on open files (/proc/self/limits, "Max open files").
pub fn fd_total() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Threads of this process (/proc/self/status), the nearest thing to Erlang's processes.
pub fn threads() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The system's limit on threads (/proc/sys/kernel/threads-max).
pub fn threads_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/threads-max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runnable tasks on the machine: the `running` of /proc/loadavg's `running/total`.
pub fn run_queue() -> Option<u64> {
    let loadavg = std::fs::read_to_string("/proc/loadavg").ok()?;
    let (running, _) = loadavg.split_whitespace().nth(3)?.split_once('/')?;
    running.parse().ok()
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// The memory this process may use: the machine's RAM, or the container's cgroup limit when
/// that is lower. In a container /proc/meminfo shows the host's RAM, so a watermark taken
/// from it alone can sit above the container's limit and the broker gets OOM-killed before
/// the alarm ever blocks a publisher.
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let ram = kb * 1024;
    Some(cgroup_memory_limit().map_or(ram, |limit| limit.min(ram)))
}

/// The cgroup memory limit: v2 `memory.max`, else v1 `memory.limit_in_bytes`.
fn cgroup_memory_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| parse_cgroup_limit(&std::fs::read_to_string(p).ok()?))
}

/// A limit file's content; `max` (v2) means none. v1's "no limit" is a huge number, which
/// the caller's `min` with the RAM size takes care of.
fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse().ok().filter(|&n| n > 0)
}

/// Bytes available to unprivileged users on the filesystem holding `path`.
pub fn disk_free(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_plausible() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 1 << 20 && rss < 1 << 40, "rss {rss}");
        assert!(total_memory().unwrap() > rss);
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("536870912\n"), Some(536870912));
        assert_eq!(
            parse_cgroup_limit("9223372036854771712"),
            Some(9223372036854771712)
        );
        assert_eq!(parse_cgroup_limit(""), None);
        assert!(disk_free(std::path::Path::new("/")).unwrap() > 0);
        // This test's own thread is running.
        assert!(run_queue().unwrap() >= 1);
        assert!(threads_max().unwrap() > threads().unwrap());
    }
}
