//! The `quota` control command: an account reads its quota and usage; the admin sets any
//! account's quota.

use super::{Conn, Out};
use hutch_core::Quota;

impl Conn {
    pub(super) async fn quota_cmd(&self, args: &[&str], json: bool) -> Out {
        let me = self.account();
        let (target, flags) = match args {
            [] => (me.name.clone(), &[][..]),
            [name, rest @ ..] if !name.starts_with("--") => (name.to_string(), rest),
            rest => (me.name.clone(), rest),
        };
        let set = |q: &mut Quota| set_flags(q, flags);
        let change: Option<crate::service::accounts::QuotaChange<'_>> =
            (!flags.is_empty()).then_some(&set);
        let (acc, q, used) = match self.m.quota(&self.caller(), &target, change).await {
            Ok(x) => x,
            Err(e) => return Out::fail(e.to_string()),
        };
        if json {
            let v = serde_json::json!({"account": target, "quota": q, "used": used});
            return Out::ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n");
        }
        Out::ok(format!(
            "account {target}{}\n  VMs:    {} of {}\n  vCPUs:  {} of {}\n  memory: {} of {} MiB\n  disk:   {} of {} GiB\n",
            if acc.admin { " (admin: no quota applies)" } else { "" },
            used.vms,
            q.vms,
            used.vcpus,
            q.vcpus,
            used.mem_mib,
            q.mem_mib,
            used.disk_gib,
            q.disk_gib
        ))
    }
}

/// Applies `--vms N --vcpus N --mem MIB --disk GIB` (any subset, also as `--flag=N`).
fn set_flags(q: &mut Quota, flags: &[&str]) -> Result<(), String> {
    let mut it = flags.iter().flat_map(|a| match a.split_once('=') {
        Some((k, v)) if k.starts_with("--") => vec![k.to_string(), v.to_string()],
        _ => vec![a.to_string()],
    });
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("{flag}: {v:?} is not a number"))?;
        let small = || u32::try_from(n).map_err(|_| format!("{flag}: {n} is too large"));
        match flag.as_str() {
            "--vms" => q.vms = small()?,
            "--vcpus" => q.vcpus = small()?,
            "--mem" => q.mem_mib = n,
            "--disk" => q.disk_gib = n,
            other => {
                return Err(format!(
                    "unknown flag {other}; usage: quota [ACCOUNT] [--vms N] [--vcpus N] [--mem MIB] [--disk GIB]"
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_flags() {
        let mut q = Quota::default();
        set_flags(&mut q, &["--vms", "3", "--mem=1024"]).unwrap();
        assert_eq!(
            (q.vms, q.mem_mib, q.vcpus),
            (3, 1024, Quota::default().vcpus)
        );
        assert!(set_flags(&mut q, &["--vms"]).is_err());
        assert!(set_flags(&mut q, &["--vms", "x"]).is_err());
        assert!(set_flags(&mut q, &["--vms", "99999999999"]).is_err());
        assert!(set_flags(&mut q, &["--cpu", "1"]).is_err());
    }
}
