//! How the CLI prints things: tables, `describe`, ages, JSON.

use hutch_core::mib;
use serde_json::Value;

pub(crate) fn age(ts: u64) -> String {
    let d = hutch_core::now().saturating_sub(ts);
    match d {
        0..=59 => format!("{d}s"),
        60..=3599 => format!("{}m", d / 60),
        3600..=86399 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

pub(crate) fn table(rows: Vec<Vec<String>>) {
    print!("{}", hutch_core::table(rows));
}

pub(crate) fn describe(v: &Value) {
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .or_else(|| v[k].as_u64().map(|n| n.to_string()))
    };
    println!();
    println!("  Name:    {}", s("name").unwrap_or_default());
    println!("  ID:      {}", s("id").unwrap_or_default());
    println!("  Image:   {}", s("image").unwrap_or_default());
    println!("  vCPU:    {}", s("vcpus").unwrap_or_default());
    println!("  RAM:     {}", mib(v["mem_mib"].as_u64().unwrap_or(0)));
    println!("  Disk:    {}G", s("disk_gib").unwrap_or_default());
    println!("  Status:  {}", s("state").unwrap_or_default());
    if let Some(r) = s("reason") {
        println!("  Reason:  {r}");
    }
    if let Some(p) = s("pid") {
        println!("  PID:     {p}");
    }
    if let Some(p) = v["main_pid"].as_i64() {
        println!("  Main:    guest pid {p} (image Entrypoint/Cmd; output in hutch logs)");
    }
    if let Some(k) = s("kernel") {
        println!("  Kernel:  {k} ({})", s("accel").unwrap_or_default());
    }
    if let Some(b) = s("boot_ms") {
        println!("  Boot:    {b} ms");
    }
    confinement(&v["confinement"]);
    println!();
    println!(
        "  Connect: hutch exec {} -- sh",
        s("name").unwrap_or_default()
    );
    println!();
}

/// The `Jail:` and `Cgroup:` lines of `describe` (docs/architecture.md, "Confinement").
pub(crate) fn confinement(c: &Value) {
    let c: Option<hutch_core::Confinement> = serde_json::from_value(c.clone()).ok();
    print!("{}", hutch_core::Confinement::describe(c.as_ref()));
}

pub(crate) fn out_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}
