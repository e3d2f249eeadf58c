//! A process's resident memory and CPU time, read from /proc.

use serde::Serialize;

/// One reading.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub rss_kib: u64,
    /// User + system CPU time, in microseconds.
    pub cpu_us: u64,
}

/// Reads `/proc/{pid}/status` (VmRSS) and `/proc/{pid}/stat` (utime, stime).
pub fn sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = 100; // USER_HZ on Linux
    Some(Sample {
        rss_kib,
        cpu_us: (utime + stime) * 1_000_000 / ticks,
    })
}

/// Peak RSS and CPU used between two readings, sampled every 200 ms in the background.
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<Sample>)>,
    start: Option<Sample>,
    pid: u32,
}

impl Sampler {
    pub fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            let mut all = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Acquire) {
                if let Some(x) = sample(pid) {
                    peak = peak.max(x.rss_kib);
                    all.push(x);
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            (peak, all)
        });
        Self {
            stop,
            task,
            start: sample(pid),
            pid,
        }
    }

    /// (peak RSS KiB, CPU microseconds used since start).
    pub async fn finish(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let (peak, _) = self.task.await.unwrap_or_default();
        let end = sample(self.pid).unwrap_or_default();
        let cpu = end
            .cpu_us
            .saturating_sub(self.start.unwrap_or_default().cpu_us);
        (peak.max(end.rss_kib), cpu)
    }
}
