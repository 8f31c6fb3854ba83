//! VM timers (`hutch_core::timers`): a TTL that deletes or pauses a VM when it runs out,
//! `keepalive` that extends it, and auto-pause after a time without activity.

use crate::error::ApiError;
use hutch_core::api::CreateVm;
use hutch_core::timers::{parse_duration, VmTimers};

/// The timers a create asks for (validated).
pub fn timers_of(req: &CreateVm) -> Result<VmTimers, ApiError> {
    let parse = |what: &str, v: &Option<String>| -> Result<Option<u64>, ApiError> {
        v.as_deref()
            .map(|s| parse_duration(s).map_err(|e| ApiError::Invalid(format!("{what}: {e}"))))
            .transpose()
    };
    let ttl_secs = parse("ttl", &req.ttl)?;
    if req.on_expire.is_some() && ttl_secs.is_none() {
        return Err(ApiError::Invalid("on_expire needs a ttl".into()));
    }
    Ok(VmTimers {
        ttl_secs,
        deadline: ttl_secs.map(|t| hutch_core::now() + t),
        on_expire: req.on_expire.unwrap_or_default(),
        auto_pause_secs: parse("auto_pause", &req.auto_pause)?,
    })
}
