//! `hutch new`'s network flags, `hutch net set`, `hutch port ...` and `hutch ca`.

use crate::client::{seg, Client};
use crate::render::out_json;
use anyhow::Result;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

/// The network of a new VM.
#[derive(Args, Debug, Default)]
pub struct NetArgs {
    /// none (no NIC), internal (hutch's DNS and metadata, the account's VMs) or internet (NAT
    /// out through the host; the default).
    #[arg(long)]
    pub net: Option<hutch_core::net::NetMode>,
    /// Only these CIDRs and domains (a domain covers its subdomains) may be reached; repeatable.
    #[arg(long = "allow-out")]
    pub allow_out: Vec<String>,
    /// These CIDRs and domains may not be reached; repeatable; wins over --allow-out.
    #[arg(long = "deny-out")]
    pub deny_out: Vec<String>,
    /// Bandwidth into the VM, e.g. 10mbit.
    #[arg(long = "rate-in")]
    pub rate_in: Option<String>,
    /// Bandwidth out of the VM, e.g. 10mbit.
    #[arg(long = "rate-out")]
    pub rate_out: Option<String>,
    /// A git repository to clone into the VM at first boot (with the image's git).
    #[arg(long)]
    pub clone: Option<String>,
    /// Where --clone puts it (default: /root/REPO).
    #[arg(long = "clone-dir", requires = "clone")]
    pub clone_dir: Option<String>,
}

#[derive(Subcommand)]
pub enum NetCmd {
    /// Change a VM's egress rules and rates (applies at once to a running VM). Lists given
    /// replace the VM's; `--allow-out ''` clears them. Rates: `off` removes a limit.
    Set {
        name: String,
        #[arg(long = "allow-out")]
        allow_out: Vec<String>,
        #[arg(long = "deny-out")]
        deny_out: Vec<String>,
        #[arg(long = "rate-in")]
        rate_in: Option<String>,
        #[arg(long = "rate-out")]
        rate_out: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum PortCmd {
    /// Forward a host TCP port to a port of the VM: `hutch port add web 8080:80`.
    Add { name: String, mapping: String },
    /// List a VM's port forwards and public ports.
    Ls { name: String },
    /// Stop forwarding a host port.
    Rm { name: String, host_port: u16 },
    /// Serve the VM's PORT through the HTTPS proxy to everyone (no token needed).
    Public { name: String, port: u16 },
    /// Make PORT private again (the owner's token or a share link needed).
    Private { name: String, port: u16 },
    /// A signed link to the VM's PORT through the proxy that expires: `--for 1h`.
    Share {
        name: String,
        port: u16,
        /// Lifetime: 90s, 30m, 1h, 7d (at most 30d).
        #[arg(long = "for", default_value = "1h")]
        ttl: String,
    },
}

/// `1h`, `30m`, `90s`, `7d` in seconds.
fn duration(s: &str) -> Result<u64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("--for {s:?}: like 90s, 30m, 1h or 7d"))?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => anyhow::bail!("--for {s:?}: the unit must be s, m, h or d"),
    };
    Ok(n.saturating_mul(mult))
}

fn print_ports(v: &Value) {
    let ip = v["ipv4"].as_str().unwrap_or("-");
    println!("{} ({ip})", v["vm"].as_str().unwrap_or(""));
    let ports = v["ports"].as_array().cloned().unwrap_or_default();
    if ports.is_empty() {
        println!("  no port forwards");
    }
    for p in ports {
        println!("  host :{} -> {ip}:{}", p["host"], p["vm"]);
    }
    let public = v["public_ports"].as_array().cloned().unwrap_or_default();
    if !public.is_empty() {
        let list: Vec<String> = public.iter().map(|p| p.to_string()).collect();
        println!("  public on the proxy: {}", list.join(", "));
    }
}

pub async fn net(c: &Client, cmd: NetCmd, j: bool) -> Result<()> {
    let NetCmd::Set {
        name,
        allow_out,
        deny_out,
        rate_in,
        rate_out,
    } = cmd;
    // `--allow-out ''` clears the list; no flag keeps it.
    let list = |l: Vec<String>| {
        (!l.is_empty()).then(|| l.into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>())
    };
    let req = hutch_core::net::SetNet {
        allow_out: list(allow_out),
        deny_out: list(deny_out),
        rate_in,
        rate_out,
    };
    let v = c
        .json(
            Method::POST,
            &format!("/api/v1/sandboxes/{}/net", seg(&name)),
            Some(serde_json::to_value(req)?),
        )
        .await?;
    if j {
        out_json(&v);
    } else {
        crate::render::describe(&v);
    }
    Ok(())
}

pub async fn port(c: &Client, cmd: PortCmd, j: bool) -> Result<()> {
    let base = |n: &str| format!("/api/v1/sandboxes/{}", seg(n));
    let v = match cmd {
        PortCmd::Add { name, mapping } => {
            let f: hutch_core::net::PortForward = mapping.parse()?;
            c.json(
                Method::POST,
                &format!("{}/ports", base(&name)),
                Some(serde_json::to_value(f)?),
            )
            .await?
        }
        PortCmd::Ls { name } => {
            c.json(Method::GET, &format!("{}/ports", base(&name)), None)
                .await?
        }
        PortCmd::Rm { name, host_port } => {
            c.json(
                Method::DELETE,
                &format!("{}/ports/{host_port}", base(&name)),
                None,
            )
            .await?
        }
        PortCmd::Public { name, port } => {
            c.json(Method::PUT, &format!("{}/public/{port}", base(&name)), None)
                .await?
        }
        PortCmd::Private { name, port } => {
            c.json(
                Method::DELETE,
                &format!("{}/public/{port}", base(&name)),
                None,
            )
            .await?
        }
        PortCmd::Share { name, port, ttl } => {
            let ttl_secs = duration(&ttl)?;
            let v = c
                .json(
                    Method::POST,
                    &format!("{}/share", base(&name)),
                    Some(json!({ "port": port, "ttl_secs": ttl_secs })),
                )
                .await?;
            if j {
                out_json(&v);
            } else {
                println!("{}", v["url"].as_str().unwrap_or(""));
            }
            return Ok(());
        }
    };
    if j {
        out_json(&v);
    } else {
        print_ports(&v);
    }
    Ok(())
}

/// `hutch ca`: the CA of hutchd's HTTPS proxy, to trust.
pub async fn ca(c: &Client) -> Result<()> {
    let r = c.call(Method::GET, "/api/v1/ca", None).await?;
    print!("{}", String::from_utf8_lossy(&r));
    Ok(())
}
