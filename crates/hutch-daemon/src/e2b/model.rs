//! E2B's control-plane shapes (spec/openapi.yml of e2b-dev/E2B, as the SDKs send them) and the
//! record hutch keeps per sandbox.

use hutch_core::{Vm, VmState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most metadata entries on a sandbox, and the longest key and value.
pub const MAX_METADATA: usize = 64;
pub const MAX_META_KEY: usize = 256;
pub const MAX_META_VALUE: usize = 4096;
/// Most sandbox-wide env vars, and the longest name and value.
pub const MAX_ENVS: usize = 256;
pub const MAX_ENV_VALUE: usize = 32 * 1024;
/// E2B's default sandbox timeout, and hutch's longest (30 days).
pub const DEFAULT_TIMEOUT: u64 = 300;
pub const MAX_TIMEOUT: u64 = 30 * 24 * 3600;

/// What hutch keeps of an E2B sandbox beside its VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxRecord {
    /// The sandbox id, which is also the VM's name in its owner's namespace.
    pub id: String,
    /// The VM's id (a VM made later under the same name is another sandbox).
    pub vm_id: String,
    pub owner: Option<String>,
    /// The template (or image) it was created from, as asked.
    pub template_id: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Env vars of every process envd starts in it.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    pub started_at: u64,
    #[serde(default)]
    pub allow_internet_access: Option<bool>,
    /// Pause (true) or kill at the timeout.
    #[serde(default)]
    pub auto_pause: bool,
    #[serde(default)]
    pub auto_resume: bool,
    /// Whether its ports take traffic through the proxy without credentials (E2B's default).
    #[serde(default)]
    pub allow_public_traffic: Option<bool>,
}

/// A new sandbox id: 20 characters of lowercase letters and digits, like E2B's, starting with
/// a letter (a DNS label and a hutch VM name).
pub fn new_id() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::thread_rng();
    let mut s = String::with_capacity(20);
    s.push((b'a' + r.gen_range(0..26)) as char);
    for _ in 0..19 {
        s.push(CHARS[r.gen_range(0..CHARS.len())] as char);
    }
    s
}

/// Whether `id` can be a sandbox id (anything else is simply not found): a DNS label (fork
/// copies are `PREFIX-N`).
pub fn valid_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && !id.starts_with('-')
        && !id.ends_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `POST /sandboxes` and `POST /v2/sandboxes`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub timeout: Option<u64>,
    #[serde(default)]
    pub auto_pause: Option<bool>,
    #[serde(default)]
    pub auto_resume: Option<AutoResume>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(
        default,
        rename = "allow_internet_access",
        alias = "allowInternetAccess"
    )]
    pub allow_internet_access: Option<bool>,
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Fields hutch does not serve; their presence with a value is refused.
    #[serde(default)]
    pub mcp: Option<serde_json::Value>,
    #[serde(default)]
    pub volume_mounts: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct AutoResume {
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
    #[serde(default)]
    pub allow_public_traffic: Option<bool>,
}

/// `{"timeout": N}` (set timeout, connect, resume).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct TimeoutBody {
    pub timeout: Option<u64>,
    pub memory: Option<bool>,
}

/// A pause's body.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct MemoryBody {
    pub memory: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RefreshBody {
    pub duration: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ForkBody {
    pub timeout: Option<u64>,
    pub count: Option<u32>,
}

/// Checks what a create asks for (sizes and counts bounded), before anything is made.
pub fn check_new(n: &NewSandbox) -> Result<(), String> {
    if n.template_id.is_empty() || n.template_id.len() > 256 {
        return Err("templateID must be 1 to 256 characters".into());
    }
    if let Some(t) = n.timeout {
        check_timeout(t)?;
    }
    if let Some(m) = &n.metadata {
        if m.len() > MAX_METADATA {
            return Err(format!("at most {MAX_METADATA} metadata entries"));
        }
        for (k, v) in m {
            if k.is_empty() || k.len() > MAX_META_KEY || v.len() > MAX_META_VALUE {
                return Err(format!(
                    "metadata keys are 1 to {MAX_META_KEY} bytes, values at most {MAX_META_VALUE}"
                ));
            }
        }
    }
    if let Some(e) = &n.env_vars {
        check_envs(e)?;
    }
    if n.mcp.as_ref().is_some_and(|v| !v.is_null()) {
        return Err("mcp is not supported by hutch".into());
    }
    if n.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err("volumeMounts are not supported by hutch".into());
    }
    Ok(())
}

pub fn check_timeout(t: u64) -> Result<(), String> {
    if t == 0 || t > MAX_TIMEOUT {
        return Err(format!("timeout must be 1 to {MAX_TIMEOUT} seconds"));
    }
    Ok(())
}

/// Env var names and values a process may be given.
pub fn check_envs(e: &BTreeMap<String, String>) -> Result<(), String> {
    if e.len() > MAX_ENVS {
        return Err(format!("at most {MAX_ENVS} env vars"));
    }
    for (k, v) in e {
        let name_ok = !k.is_empty()
            && k.len() <= 256
            && !k.contains('=')
            && !k.contains('\0')
            && !v.contains('\0');
        if !name_ok || v.len() > MAX_ENV_VALUE {
            return Err(format!("env var {k:?}: bad name or value"));
        }
    }
    Ok(())
}

/// RFC 3339 in UTC for Unix seconds.
pub fn rfc3339(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// E2B's state of a VM: running or paused (anything on its way to either counts as it).
pub fn state(vm: &Vm) -> &'static str {
    match vm.state {
        VmState::Paused | VmState::Pausing => "paused",
        _ => "running",
    }
}

/// When the sandbox times out (far in the future for a VM without a deadline).
fn end_at(vm: &Vm) -> u64 {
    vm.timers
        .deadline
        .unwrap_or_else(|| hutch_core::now() + MAX_TIMEOUT)
}

/// The create/connect answer (`Sandbox`).
pub fn sandbox_json(r: &SandboxRecord, token: &str, domain: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "templateID": r.template_id,
        "sandboxID": r.id,
        "clientID": "hutch",
        "envdVersion": super::ENVD_VERSION,
        "envdAccessToken": token,
        "trafficAccessToken": null,
        "domain": domain,
        "alias": r.template_id,
    })
}

/// `ListedSandbox`.
pub fn listed_json(r: &SandboxRecord, vm: &Vm) -> serde_json::Value {
    serde_json::json!({
        "templateID": r.template_id,
        "alias": r.template_id,
        "sandboxID": r.id,
        "clientID": "hutch",
        "startedAt": rfc3339(r.started_at),
        "endAt": rfc3339(end_at(vm)),
        "cpuCount": vm.vcpus,
        "memoryMB": vm.mem_mib,
        "diskSizeMB": vm.disk_gib * 1024,
        "state": state(vm),
        "envdVersion": super::ENVD_VERSION,
        "metadata": r.metadata,
    })
}

/// `SandboxDetail`.
pub fn detail_json(
    r: &SandboxRecord,
    vm: &Vm,
    token: &str,
    domain: Option<&str>,
) -> serde_json::Value {
    let mut v = listed_json(r, vm);
    let o = v.as_object_mut().expect("an object");
    o.insert("envdAccessToken".into(), token.into());
    o.insert("domain".into(), domain.into());
    o.insert("allowInternetAccess".into(), r.allow_internet_access.into());
    o.insert(
        "lifecycle".into(),
        serde_json::json!({
            "autoResume": r.auto_resume,
            "onTimeout": if r.auto_pause { "pause" } else { "kill" },
        }),
    );
    if state(vm) == "paused" {
        o.insert("pauseMode".into(), "full".into());
    }
    v
}

/// The `metadata` filter of a list: `k=v&k2=v2`, each key and value percent-encoded (again,
/// inside the query parameter).
pub fn parse_metadata_filter(q: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_decode(s).ok_or_else(|| format!("metadata filter {pair:?} is not encoded"))
        };
        out.insert(dec(k)?, dec(v)?);
    }
    if out.len() > MAX_METADATA {
        return Err("too many metadata filters".into());
    }
    Ok(out)
}

/// Decodes `%XX` escapes and `+` (a space in form encoding).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_labels() {
        for _ in 0..100 {
            let id = new_id();
            assert_eq!(id.len(), 20);
            assert!(valid_id(&id));
            assert!(id.as_bytes()[0].is_ascii_lowercase());
        }
        assert!(!valid_id(""));
        assert!(!valid_id("../x"));
        assert!(!valid_id("Abc"));
        assert!(!valid_id(&"a".repeat(64)));
    }

    #[test]
    fn metadata_filters_decode_twice_encoded_pairs() {
        // What the Python SDK sends for {"user id": "a&b"}: urlencode of quoted pairs.
        let m = parse_metadata_filter("user%20id=a%26b&k=v").unwrap();
        assert_eq!(m["user id"], "a&b");
        assert_eq!(m["k"], "v");
        assert!(parse_metadata_filter("k=%zz").is_err());
    }

    #[test]
    fn creates_are_bounded() {
        let ok = NewSandbox {
            template_id: "base".into(),
            ..Default::default()
        };
        assert!(check_new(&ok).is_ok());
        let mut n = ok.clone();
        n.timeout = Some(0);
        assert!(check_new(&n).is_err());
        let mut n = ok.clone();
        n.metadata = Some((0..65).map(|i| (i.to_string(), String::new())).collect());
        assert!(check_new(&n).is_err());
        let mut n = ok.clone();
        n.env_vars = Some([("A=B".to_string(), "x".to_string())].into());
        assert!(check_new(&n).is_err());
        let mut n = ok;
        n.volume_mounts = Some(vec![serde_json::json!({"name": "v"})]);
        assert!(check_new(&n).is_err());
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
