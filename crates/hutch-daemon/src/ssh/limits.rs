//! Bounds on abuse of the SSH front door: refused key offers per address (lockout), logins in
//! progress in all and per address, and the time a login may take.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bounds on abuse: refused key offers per address, logins in progress (in all and per
/// address, so idle connections from one address cannot lock others out), time to log in.
pub struct Limits {
    pub(super) failures: std::sync::Mutex<HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
    pub(super) pending: AtomicUsize,
    pub(super) pending_by_ip: std::sync::Mutex<HashMap<std::net::IpAddr, usize>>,
    pub max_failures: u32,
    pub failure_window: std::time::Duration,
    pub max_pending: usize,
    pub max_pending_per_ip: usize,
    pub auth_deadline: std::time::Duration,
    /// Accounts made by open sign-up per address within the last hour.
    pub(super) signups: std::sync::Mutex<HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
    pub max_signups_per_ip_hour: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            failures: Default::default(),
            pending: Default::default(),
            pending_by_ip: Default::default(),
            max_failures: 30,
            failure_window: std::time::Duration::from_secs(300),
            max_pending: 64,
            max_pending_per_ip: 8,
            auth_deadline: std::time::Duration::from_secs(30),
            signups: Default::default(),
            max_signups_per_ip_hour: 5,
        }
    }
}

/// A login in progress; released when it succeeds or the connection goes away.
pub struct PendingSlot {
    limits: Arc<Limits>,
    ip: std::net::IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.limits.pending.fetch_sub(1, Ordering::SeqCst);
        let mut by_ip = self
            .limits
            .pending_by_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
    }
}

impl Limits {
    pub(super) fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PendingSlot> {
        if self.blocked(ip) {
            tracing::info!(%ip, "ssh connection refused: too many failed logins");
            return None;
        }
        {
            let mut by_ip = self.pending_by_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= self.max_pending_per_ip {
                tracing::warn!(%ip, "ssh connection refused: too many logins in progress from this address");
                return None;
            }
            *n += 1;
        }
        let n = self.pending.fetch_add(1, Ordering::SeqCst);
        // From here on, dropping the slot undoes both counts.
        let slot = PendingSlot {
            limits: self.clone(),
            ip,
        };
        if n >= self.max_pending {
            tracing::warn!(%ip, "ssh connection refused: too many logins in progress");
            return None;
        }
        Some(slot)
    }

    pub(super) fn blocked(&self, ip: std::net::IpAddr) -> bool {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.get(&ip).is_some_and(|(n, since)| {
            *n >= self.max_failures && since.elapsed() < self.failure_window
        })
    }

    pub(super) fn failed(&self, ip: std::net::IpAddr) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.failure_window;
        let e = f.entry(ip).or_insert((0, std::time::Instant::now()));
        if e.1.elapsed() >= window {
            *e = (0, std::time::Instant::now());
        }
        e.0 += 1;
        if f.len() > 100_000 {
            f.retain(|_, (_, since)| since.elapsed() < window);
        }
    }

    /// Counts a sign-up from `ip`; false when the address made too many this hour.
    pub(super) fn signup(&self, ip: std::net::IpAddr) -> bool {
        let hour = std::time::Duration::from_secs(3600);
        let mut f = self.signups.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() > 100_000 {
            f.retain(|_, (_, since)| since.elapsed() < hour);
        }
        let e = f.entry(ip).or_insert((0, std::time::Instant::now()));
        if e.1.elapsed() >= hour {
            *e = (0, std::time::Instant::now());
        }
        if e.0 >= self.max_signups_per_ip_hour {
            return false;
        }
        e.0 += 1;
        true
    }
}
