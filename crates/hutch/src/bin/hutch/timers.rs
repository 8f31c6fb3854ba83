//! `hutch new`'s timer flags (`--ttl`, `--on-expire`, `--auto-pause`) and `hutch keepalive`
//! (docs/snapshots.md).

use crate::client::{seg, Client};
use crate::render::out_json;
use anyhow::Result;
use clap::Args;
use hyper::Method;

/// The timers of a new VM (also from a snapshot). Durations: 90s, 30m, 1h, 7d (at most 30d).
#[derive(Args, Debug, Default)]
pub struct TimerArgs {
    /// Lifetime: when it runs out the VM is deleted (or paused, --on-expire pause);
    /// `hutch keepalive` extends it.
    #[arg(long)]
    pub ttl: Option<String>,
    /// What happens when the TTL runs out: delete (default) or pause.
    #[arg(long = "on-expire", requires = "ttl")]
    pub on_expire: Option<hutch_core::timers::OnExpire>,
    /// Pause after this long without exec, file, SSH or proxy activity; such activity
    /// resumes it.
    #[arg(long = "auto-pause", value_name = "IDLE")]
    pub auto_pause: Option<String>,
}

impl TimerArgs {
    /// Puts them into a create request.
    pub fn apply(self, req: &mut hutch_core::api::CreateVm) {
        req.ttl = self.ttl;
        req.on_expire = self.on_expire;
        req.auto_pause = self.auto_pause;
    }
}

/// `hutch keepalive VM [DURATION]`.
#[derive(Args, Debug)]
pub struct KeepaliveArgs {
    /// The VM.
    pub name: String,
    /// 90s, 30m, 1h, 7d (default: the VM's own TTL).
    pub duration: Option<String>,
}

pub async fn keepalive(c: &Client, a: KeepaliveArgs, j: bool) -> Result<()> {
    let (name, duration) = (a.name, a.duration);
    let v = c
        .json(
            Method::POST,
            &format!("/api/v1/sandboxes/{}/keepalive", seg(&name)),
            Some(serde_json::to_value(hutch_core::api::Keepalive {
                duration,
            })?),
        )
        .await?;
    if j {
        out_json(&v);
    } else {
        let vm: hutch_core::Vm = serde_json::from_value(v)?;
        println!(
            "{name} expires in {}, then {}",
            hutch_core::render::until(vm.timers.deadline.unwrap_or(0)),
            vm.timers.on_expire.as_str()
        );
    }
    Ok(())
}
