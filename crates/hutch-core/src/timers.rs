//! A VM's timers: a lifetime (`--ttl`, extended by `keepalive`) that deletes or pauses it when
//! it runs out, and auto-pause after a time without activity (docs/snapshots.md).

use serde::{Deserialize, Serialize};

/// The longest TTL or idle time hutch takes (30 days).
pub const MAX_SECS: u64 = 30 * 86400;

/// What happens when a VM's TTL runs out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpire {
    #[default]
    Delete,
    Pause,
}

impl OnExpire {
    pub fn as_str(self) -> &'static str {
        match self {
            OnExpire::Delete => "delete",
            OnExpire::Pause => "pause",
        }
    }
}

impl std::str::FromStr for OnExpire {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "delete" => Ok(OnExpire::Delete),
            "pause" => Ok(OnExpire::Pause),
            _ => Err(format!("on-expire {s:?}: use delete or pause")),
        }
    }
}

/// A VM's timers, as its record keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmTimers {
    /// The lifetime it was given (`--ttl`); `keepalive` without a duration extends by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// When it expires (Unix seconds); None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    #[serde(default)]
    pub on_expire: OnExpire,
    /// Pause after this long without exec, file, SSH or proxy activity; a paused VM with it set
    /// resumes by itself on such activity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause_secs: Option<u64>,
    /// A paused VM resumes by itself on use even without auto-pause (E2B's `autoResume`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_resume: bool,
}

/// A duration as people write it: `90s`, `30m`, `1h`, `7d`, or plain seconds; 1 s to
/// [`MAX_SECS`].
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("duration {s:?}: like 90s, 30m, 1h or 7d"))?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("duration {s:?}: the unit must be s, m, h or d")),
    };
    let secs = n.saturating_mul(mult);
    if secs == 0 || secs > MAX_SECS {
        return Err(format!("duration {s:?}: between 1s and 30d"));
    }
    Ok(secs)
}

/// `secs` the short way people read it (`90s`, `30m`, `2h`, `3d`).
pub fn show_duration(secs: u64) -> String {
    match secs {
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("7d"), Ok(7 * 86400));
        assert_eq!(parse_duration("45"), Ok(45));
        for bad in [
            "",
            "0",
            "0s",
            "31d",
            "1w",
            "-5m",
            "m",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(show_duration(7200), "2h");
        assert_eq!(show_duration(90), "90s");
        assert_eq!("pause".parse::<OnExpire>(), Ok(OnExpire::Pause));
        assert!("keep".parse::<OnExpire>().is_err());
    }
}
