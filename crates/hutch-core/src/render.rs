//! How VMs are shown to people, once for every front door: the `ls` table and `describe`, as
//! the CLI prints them and the SSH front door answers them.

use crate::{mib, Confinement, Vm};

/// How long ago `ts` (Unix seconds) was: `42s`, `5m`, `3h`, `2d`.
pub fn age(ts: u64) -> String {
    span(crate::now().saturating_sub(ts))
}

/// How long until `ts` (Unix seconds): `42s`, `9m`, `2h`, `3d`; `0s` once it has passed.
pub fn until(ts: u64) -> String {
    span(ts.saturating_sub(crate::now()))
}

/// `d` seconds in the largest whole unit: `42s`, `5m`, `3h`, `2d`.
fn span(d: u64) -> String {
    match d {
        0..=59 => format!("{d}s"),
        60..=3599 => format!("{}m", d / 60),
        3600..=86399 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

/// The name a viewer uses for `vm`: bare for its own (and the admin's own), `account/name` for
/// another account's (as the admin sees them).
pub fn display_name(vm: &Vm, viewer: Option<&str>) -> String {
    match vm.owner.as_deref() {
        Some(o) if Some(o) != viewer && o != "admin" => format!("{o}/{}", vm.name),
        _ => vm.name.clone(),
    }
}

/// The `ls` table. `viewer`: the account looking (None: the admin); `node`: a NODE column
/// (each VM's own node in a cluster).
/// EXPIRES is how long until the VM's TTL runs out (`-`: no TTL running).
pub fn vm_table(vms: &[Vm], viewer: Option<&str>, node: Option<&str>) -> String {
    let mut head = vec![
        "NAME", "STATE", "IMAGE", "IP", "VCPU", "RAM", "DISK", "PID", "AGE", "EXPIRES",
    ];
    let per_vm = vms.iter().any(|v| v.node.is_some());
    if node.is_some() || per_vm {
        head.insert(1, "NODE");
    }
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for v in vms {
        let mut row = vec![
            display_name(v, viewer),
            v.shown_state().into(),
            v.image.clone(),
            v.net
                .ipv4
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "-".into()),
            v.vcpus.to_string(),
            mib(v.mem_mib),
            format!("{}G", v.disk_gib),
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            age(v.created_at),
            v.timers.deadline.map(until).unwrap_or_else(|| "-".into()),
        ];
        if node.is_some() || per_vm {
            row.insert(1, v.node.as_deref().or(node).unwrap_or("-").to_string());
        }
        rows.push(row);
    }
    crate::table(rows)
}

/// The `image ls` table: a private image as `~account/NAME`, the shared library's bare.
pub fn image_table(images: &[crate::Image]) -> String {
    let mut rows = vec![["NAME", "DIGEST", "LAYERS", "SIZE", "AGE"]
        .map(String::from)
        .to_vec()];
    for i in images {
        rows.push(vec![
            match &i.owner {
                Some(o) => format!("~{o}/{}", i.name),
                None => i.name.clone(),
            },
            i.digest.chars().take(19).collect(),
            i.layers.len().to_string(),
            format!("{:.1}M", i.rootfs_size as f64 / 1048576.0),
            age(i.created_at),
        ]);
    }
    crate::table(rows)
}

/// `describe`: every field people look at, then how to get in (`connect`).
pub fn describe(v: &Vm, node: Option<&str>, connect: &str) -> String {
    let mut s = format!("\n  Name:    {}\n  ID:      {}\n", v.name, v.id);
    if let Some(o) = &v.owner {
        s.push_str(&format!("  Owner:   {o}\n"));
    }
    if let Some(n) = v.node.as_deref().or(node) {
        s.push_str(&format!("  Node:    {n}\n"));
    }
    s.push_str(&format!(
        "  Image:   {}\n  vCPU:    {}\n  RAM:     {}\n  Disk:    {}G\n  Status:  {}\n",
        v.image,
        v.vcpus,
        mib(v.mem_mib),
        v.disk_gib,
        v.shown_state()
    ));
    if let Some(r) = &v.reason {
        s.push_str(&format!("  Reason:  {}\n", crate::clean_text(r)));
    }
    if let Some(r) = &v.recreated {
        s.push_str(&format!("  Note:    {}\n", crate::clean_text(r)));
    }
    if let Some(m) = &v.migrated {
        s.push_str(&format!("  Moved:   {}\n", crate::clean_text(m)));
    }
    if v.restart != crate::RestartPolicy::No {
        s.push_str(&format!(
            "  Restart: {} ({} so far)\n",
            v.restart.as_str(),
            v.restarts
        ));
    }
    if let Some(p) = v.pid {
        s.push_str(&format!("  PID:     {p}\n"));
    }
    if let Some(p) = v.main_pid {
        s.push_str(&format!(
            "  Main:    guest pid {p} (image Entrypoint/Cmd; output in the logs)\n"
        ));
    }
    if let Some(k) = &v.kernel {
        s.push_str(&format!(
            "  Kernel:  {k} ({})\n",
            v.accel.as_deref().unwrap_or("")
        ));
    }
    if let Some(b) = v.boot_ms {
        s.push_str(&format!("  Boot:    {b} ms\n"));
    }
    s.push_str(&timer_lines(&v.timers));
    s.push_str(&net_lines(&v.net));
    s.push_str(&Confinement::describe(v.confinement.as_ref()));
    s.push_str(&format!("\n  Connect: {connect}\n\n"));
    s
}

/// The TTL and auto-pause lines of `describe` (docs/snapshots.md).
fn timer_lines(t: &crate::timers::VmTimers) -> String {
    use crate::timers::show_duration;
    let mut s = String::new();
    let then = t.on_expire.as_str();
    match (t.ttl_secs, t.deadline) {
        (Some(ttl), Some(d)) => s.push_str(&format!(
            "  TTL:     {}, expires in {}, then {then}\n",
            show_duration(ttl),
            until(d)
        )),
        (None, Some(d)) => s.push_str(&format!(
            "  TTL:     expires in {}, then {then}\n",
            until(d)
        )),
        (Some(ttl), None) => s.push_str(&format!(
            "  TTL:     {}, ran out; a resume or keepalive starts it again\n",
            show_duration(ttl)
        )),
        (None, None) => {}
    }
    if let Some(idle) = t.auto_pause_secs {
        s.push_str(&format!(
            "  Idle:    pauses after {} without activity, resumes on use\n",
            show_duration(idle)
        ));
    } else if t.auto_resume {
        s.push_str("  Idle:    resumes on use when paused\n");
    }
    s
}

/// The network lines of `describe`.
fn net_lines(n: &crate::net::VmNet) -> String {
    use crate::net::show_rate;
    let mut s = format!("  Network: {}", n.mode);
    if let Some(ip) = n.ipv4 {
        s.push_str(&format!(", {ip}"));
    }
    s.push('\n');
    let list = |l: &[crate::net::EgressRule]| {
        l.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !n.allow_out.is_empty() {
        s.push_str(&format!("  Allow:   {}\n", list(&n.allow_out)));
    }
    if !n.deny_out.is_empty() {
        s.push_str(&format!("  Deny:    {}\n", list(&n.deny_out)));
    }
    if n.rate_in.is_some() || n.rate_out.is_some() {
        let r = |x: Option<u64>| x.map(show_rate).unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "  Rates:   in {}, out {}\n",
            r(n.rate_in),
            r(n.rate_out)
        ));
    }
    if let Some(a) = n.ssh_addr {
        s.push_str(&format!("  SSH at:  {a}\n"));
    }
    for p in &n.ports {
        s.push_str(&format!("  Port:    host :{} -> {}\n", p.host, p.vm));
    }
    if !n.public_ports.is_empty() {
        let l: Vec<String> = n.public_ports.iter().map(|p| p.to_string()).collect();
        s.push_str(&format!("  Public:  {}\n", l.join(", ")));
    }
    s
}

/// `hutch pool ls`: ready VMs against each pool's targets.
pub fn pool_table(pools: &[crate::template::PoolView]) -> String {
    // In a cluster: where each pool is kept and its ready VMs per node.
    let cluster = pools
        .iter()
        .any(|p| !p.nodes.is_empty() || !p.by_node.is_empty());
    let mut head = vec![
        "TEMPLATE".to_string(),
        "READY".into(),
        "STARTING".into(),
        "MIN".into(),
        "MAX".into(),
    ];
    if cluster {
        head.extend(["KEPT ON".to_string(), "READY BY NODE".into()]);
    }
    let mut rows = vec![head];
    for p in pools {
        let mut row = vec![
            p.template.clone(),
            p.ready.to_string(),
            p.starting.to_string(),
            p.min.to_string(),
            p.max.to_string(),
        ];
        if cluster {
            let kept = match p.nodes.as_slice() {
                [] => "snapshot's node".to_string(),
                [a] if a == crate::template::ALL_NODES => "all".to_string(),
                names => names.join(","),
            };
            let by: Vec<String> = p
                .by_node
                .iter()
                .map(|n| format!("{}={}", n.node, n.ready))
                .collect();
            row.extend([kept, by.join(" ")]);
        }
        rows.push(row);
    }
    crate::table(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timers::{OnExpire, VmTimers};

    fn vm(timers: VmTimers) -> Vm {
        let mut v: Vm = serde_json::from_value(serde_json::json!({
            "id": "0123456789ab", "name": "web", "image": "busybox", "image_digest": "",
            "vcpus": 1, "mem_mib": 256, "disk_gib": 10, "state": "running", "created_at": 0
        }))
        .unwrap();
        v.created_at = crate::now();
        v.timers = timers;
        v
    }

    #[test]
    fn ls_shows_when_the_ttl_runs_out() {
        let with_ttl = vm(VmTimers {
            ttl_secs: Some(600),
            deadline: Some(crate::now() + 570),
            ..Default::default()
        });
        let t = vm_table(&[with_ttl, vm(VmTimers::default())], None, None);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("AGE  EXPIRES"), "{t}");
        assert!(lines[1].ends_with(" 9m"), "{t}");
        assert!(lines[2].ends_with(" -"), "{t}");
        assert_eq!(until(crate::now().saturating_sub(5)), "0s");
    }

    #[test]
    fn describe_shows_ttl_and_auto_pause() {
        let d = describe(
            &vm(VmTimers {
                ttl_secs: Some(3600),
                deadline: Some(crate::now() + 7200 + 30),
                on_expire: OnExpire::Pause,
                auto_pause_secs: Some(300),
                auto_resume: false,
            }),
            None,
            "x",
        );
        assert!(
            d.contains("  TTL:     1h, expires in 2h, then pause\n"),
            "{d}"
        );
        assert!(
            d.contains("  Idle:    pauses after 5m without activity, resumes on use\n"),
            "{d}"
        );
        let d = describe(
            &vm(VmTimers {
                ttl_secs: Some(600),
                ..Default::default()
            }),
            None,
            "x",
        );
        assert!(d.contains("10m, ran out"), "{d}");
        assert!(!describe(&vm(VmTimers::default()), None, "x").contains("TTL"));
        let e2b = vm(VmTimers {
            auto_resume: true,
            ..Default::default()
        });
        assert!(describe(&e2b, None, "x").contains("  Idle:    resumes on use when paused\n"));
    }

    #[test]
    fn a_move_says_what_the_guest_went_through() {
        let mut m = crate::cluster::Migrated {
            vm: vm(VmTimers::default()),
            from: "n1".into(),
            to: "n2".into(),
            downtime_ms: 140,
            total_ms: 2500,
            disk_bytes: 6 << 20,
            ram_bytes: 173 << 20,
        };
        assert_eq!(
            m.line(),
            "moved web from n1 to n2 in 2.5 s (guest paused 140 ms; 6M of disk, 173M of RAM sent)"
        );
        m.vm.state = crate::VmState::Paused;
        assert!(m.line().contains("(paused, as it was; "), "{}", m.line());
        m.vm.mem.saved = None;
        m.vm.state = crate::VmState::Stopped;
        assert!(m.line().contains("(stopped, as it was; "), "{}", m.line());
        // The move's parts are in the VM's describe too.
        m.vm.migrated = Some("live from node n1".into());
        assert!(describe(&m.vm, None, "").contains("Moved:   live from node n1"));
    }
}
