//! A sandbox's resource use, as E2B's metrics: one sample taken now from the guest's own
//! counters (/proc/meminfo, /proc/stat over a short interval, df of /).

use crate::agent::ExecEvent;
use crate::auth::Caller;
use crate::service::Service;
use hutch_core::api::ExecVm;
use std::sync::Arc;
use std::time::Duration;

/// What one sample says (bytes, and percent of all vCPUs).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    pub cpu_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

const SCRIPT: &str = "cat /proc/meminfo; echo ---; head -1 /proc/stat; sleep 0.2; head -1 /proc/stat; echo ---; df -Pk / | tail -1";

/// Samples `caller`'s VM `name`; zeros where the guest cannot say (no shell, no df).
pub async fn sample(m: &Arc<Service>, caller: &Caller, name: &str) -> Sample {
    let req = ExecVm {
        argv: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
        timeout_secs: Some(5),
        ..Default::default()
    };
    let mut out = Vec::new();
    if let Ok(mut s) = m.exec(caller, name, req).await {
        let read = async {
            while let Ok(Some(ev)) = s.next().await {
                match ev {
                    ExecEvent::Stdout(b) if out.len() < 1 << 16 => out.extend_from_slice(&b),
                    ExecEvent::Exited { .. } => break,
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(6), read).await;
    }
    parse(&String::from_utf8_lossy(&out))
}

/// Reads the script's output.
pub fn parse(out: &str) -> Sample {
    let mut parts = out.split("---\n");
    let (mem, stat, df) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let kib = |key: &str| {
        mem.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = kib("MemTotal:");
    let avail = kib("MemAvailable:");
    let cache = kib("Cached:");
    let cpu: Vec<Vec<u64>> = stat
        .lines()
        .filter(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .collect();
    let cpu_pct = match cpu.as_slice() {
        [a, b] if a.len() >= 4 && b.len() >= 4 => {
            let busy = |v: &Vec<u64>| v.iter().sum::<u64>() - v[3] - v.get(4).copied().unwrap_or(0);
            let all = |v: &Vec<u64>| v.iter().sum::<u64>();
            let d_all = all(b).saturating_sub(all(a));
            if d_all == 0 {
                0.0
            } else {
                100.0 * busy(b).saturating_sub(busy(a)) as f64 / d_all as f64
            }
        }
        _ => 0.0,
    };
    let d: Vec<u64> = df
        .split_whitespace()
        .skip(1)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Sample {
        cpu_pct,
        mem_used: total.saturating_sub(avail),
        mem_total: total,
        mem_cache: cache,
        disk_total: d.first().copied().unwrap_or(0) * 1024,
        disk_used: d.get(1).copied().unwrap_or(0) * 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse() {
        let out = "MemTotal: 1000 kB\nMemAvailable: 400 kB\nCached: 100 kB\n---\ncpu  10 0 10 80 0\ncpu  20 0 20 160 0\n---\n/dev/vda 2000 500 1500 25% /\n";
        let s = parse(out);
        assert_eq!(s.mem_total, 1_024_000);
        assert_eq!(s.mem_used, 614_400);
        assert_eq!(s.mem_cache, 102_400);
        assert!((s.cpu_pct - 20.0).abs() < 0.01);
        assert_eq!(s.disk_total, 2_048_000);
        assert_eq!(s.disk_used, 512_000);
        assert_eq!(parse(""), Sample::default());
    }
}
