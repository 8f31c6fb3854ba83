//! Prometheus metrics (`GET /metrics` on the API listeners, admin only): counters and
//! histograms the daemon updates as it works, and gauges read at scrape time from the store and
//! from each VM's QEMU process (CPU time, resident memory) and writable disk (allocated bytes).
//!
//! The text exposition format is written by hand: a handful of metric families do not need a
//! registry crate.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const LATENCY: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// What the daemon counts as it works.
pub struct Metrics {
    pub creates: Histogram,
    pub boots: Histogram,
    /// QEMU launch to the agent answering, for starts from saved state.
    pub restores: Histogram,
    /// How long a pause or snapshot kept the guest stopped while its state was written.
    pub saves: Histogram,
    pub execs: Histogram,
    pub execs_total: AtomicU64,
    /// Creates served by a warm pool VM.
    pub pool_claims: AtomicU64,
    pub pull_bytes: AtomicU64,
    pub ssh_sessions: AtomicU64,
    pub ssh_sessions_total: AtomicU64,
    /// VMs whose TTL ran out (deleted or paused for it).
    pub expired_total: AtomicU64,
    /// VMs paused for want of activity, and paused VMs that activity resumed.
    pub auto_paused_total: AtomicU64,
    pub auto_resumed_total: AtomicU64,
    /// Agent links (and the streams over them) and proxied connections this node served for
    /// other nodes (cluster).
    pub agent_links_total: AtomicU64,
    pub agent_streams_total: AtomicU64,
    pub dials_total: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            creates: Histogram::new(LATENCY),
            boots: Histogram::new(LATENCY),
            restores: Histogram::new(LATENCY),
            saves: Histogram::new(LATENCY),
            execs: Histogram::new(LATENCY),
            execs_total: AtomicU64::new(0),
            pool_claims: AtomicU64::new(0),
            pull_bytes: AtomicU64::new(0),
            ssh_sessions: AtomicU64::new(0),
            ssh_sessions_total: AtomicU64::new(0),
            expired_total: AtomicU64::new(0),
            auto_paused_total: AtomicU64::new(0),
            auto_resumed_total: AtomicU64::new(0),
            agent_links_total: AtomicU64::new(0),
            agent_streams_total: AtomicU64::new(0),
            dials_total: AtomicU64::new(0),
        }
    }
}

/// What one VM uses, read at scrape time.
pub struct VmUsage {
    pub name: String,
    pub owner: String,
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
}

/// A label value escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The exposition text: the daemon's counters, `vms` (state name, count) and per-VM usage.
    pub fn render(&self, vms: &[(&'static str, usize)], usage: &[VmUsage]) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP hutch_vms VMs by state.\n# TYPE hutch_vms gauge");
        for (state, n) in vms {
            let _ = writeln!(o, "hutch_vms{{state=\"{state}\"}} {n}");
        }
        self.creates.render(
            &mut o,
            "hutch_vm_create_seconds",
            "Time from a create request to a running VM.",
        );
        self.boots.render(
            &mut o,
            "hutch_vm_boot_seconds",
            "Time from QEMU launch to the guest agent answering.",
        );
        self.restores.render(
            &mut o,
            "hutch_vm_restore_seconds",
            "Time from QEMU launch from saved state (resume, snapshot, fork) to the guest agent answering.",
        );
        self.saves.render(
            &mut o,
            "hutch_vm_save_seconds",
            "Time a pause or snapshot wrote the VM's state.",
        );
        self.execs.render(
            &mut o,
            "hutch_exec_seconds",
            "Time from an exec request to its process exiting.",
        );
        let counters = [
            (
                "hutch_exec_total",
                "Processes started in VMs.",
                &self.execs_total,
            ),
            (
                "hutch_image_pull_bytes_total",
                "Compressed bytes of layers and manifests fetched from registries.",
                &self.pull_bytes,
            ),
            (
                "hutch_pool_claims_total",
                "Creates served by a warm pool VM.",
                &self.pool_claims,
            ),
            (
                "hutch_ssh_sessions_total",
                "SSH connections authenticated.",
                &self.ssh_sessions_total,
            ),
            (
                "hutch_vm_expired_total",
                "VMs deleted or paused because their TTL ran out.",
                &self.expired_total,
            ),
            (
                "hutch_vm_auto_paused_total",
                "VMs paused after a time without activity (auto-pause).",
                &self.auto_paused_total,
            ),
            (
                "hutch_vm_auto_resumed_total",
                "Paused VMs resumed by a request that needed them (auto-resume).",
                &self.auto_resumed_total,
            ),
            (
                "hutch_cluster_agent_links_total",
                "Agent links (connections) other nodes opened here to use VMs of this node.",
                &self.agent_links_total,
            ),
            (
                "hutch_cluster_agent_streams_total",
                "Agent streams (SSH sessions, SFTP requests) served over agent links.",
                &self.agent_streams_total,
            ),
            (
                "hutch_cluster_dials_total",
                "Connections to VM ports made here for other nodes' proxies.",
                &self.dials_total,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP hutch_ssh_sessions SSH connections open.\n# TYPE hutch_ssh_sessions gauge\nhutch_ssh_sessions {}",
            self.ssh_sessions.load(Ordering::Relaxed)
        );
        type Pick = fn(&VmUsage) -> Option<String>;
        let per_vm: [(&str, &str, &str, Pick); 3] = [
            (
                "hutch_vm_cpu_seconds_total",
                "CPU time of the VM's QEMU process.",
                "counter",
                |u| u.cpu_seconds.map(|v| format!("{v:.2}")),
            ),
            (
                "hutch_vm_memory_bytes",
                "Resident memory of the VM's QEMU process.",
                "gauge",
                |u| u.memory_bytes.map(|v| v.to_string()),
            ),
            (
                "hutch_vm_disk_bytes",
                "Bytes allocated by the VM's writable disk.",
                "gauge",
                |u| u.disk_bytes.map(|v| v.to_string()),
            ),
        ];
        for (name, help, kind, pick) in per_vm {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for u in usage {
                if let Some(v) = pick(u) {
                    let _ = writeln!(
                        o,
                        "{name}{{vm=\"{}\",owner=\"{}\"}} {v}",
                        label(&u.name),
                        label(&u.owner)
                    );
                }
            }
        }
        o
    }
}

/// CPU seconds (user + system) and resident bytes of process `pid`, from /proc.
pub fn process_usage(pid: u32) -> (Option<f64>, Option<u64>) {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces and parentheses).
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let utime: f64 = rest.get(11)?.parse().ok()?;
            let stime: f64 = rest.get(12)?.parse().ok()?;
            Some((utime + stime) / tick)
        });
    let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|p| p * page);
    (cpu, rss)
}

/// Bytes the file at `p` has allocated on disk.
pub fn allocated_bytes(p: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_well_formed() {
        let m = Metrics::default();
        m.creates.observe(Duration::from_millis(30));
        m.creates.observe(Duration::from_secs(3));
        m.execs_total.fetch_add(2, Ordering::Relaxed);
        let text = m.render(
            &[("running", 2), ("stopped", 1)],
            &[VmUsage {
                name: "we\"b".into(),
                owner: "alice".into(),
                cpu_seconds: Some(1.5),
                memory_bytes: Some(4096),
                disk_bytes: None,
            }],
        );
        assert!(text.contains("hutch_vms{state=\"running\"} 2\n"), "{text}");
        assert!(text.contains("hutch_vm_create_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("hutch_vm_create_seconds_bucket{le=\"5\"} 2\n"));
        assert!(text.contains("hutch_vm_create_seconds_count 2\n"));
        assert!(text.contains("hutch_exec_total 2\n"));
        assert!(text.contains("hutch_vm_auto_resumed_total 0\n"));
        assert!(text.contains("hutch_vm_memory_bytes{vm=\"we\\\"b\",owner=\"alice\"} 4096\n"));
        assert!(!text.contains("hutch_vm_disk_bytes{"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn reads_this_process() {
        let (cpu, rss) = process_usage(std::process::id());
        assert!(cpu.is_some() && rss.unwrap() > 0);
    }
}
