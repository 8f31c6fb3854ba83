//! hutch: the command-line client of hutchd. Talks to the REST API over DATA_DIR/hutchd.sock,
//! or over TCP with --url and a bearer token.

mod client;
mod cluster;
mod completions;
mod events;
mod image;
mod migrate;
mod net;
mod pull;
mod render;
mod snap;
mod template;
mod timers;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use client::*;
use http_body_util::BodyExt;
use hyper::Method;
use pull::resolve_creds;
use render::*;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "hutch",
    version,
    about = "Run OCI images as virtual machines (client of hutchd)"
)]
struct Cli {
    /// hutchd's data directory (its socket is DATA_DIR/hutchd.sock).
    #[arg(
        long,
        global = true,
        env = "HUTCH_DATA_DIR",
        default_value = "/var/lib/hutch"
    )]
    data_dir: PathBuf,
    /// Talk to hutchd over TCP instead, e.g. https://10.0.0.5:7070 (http:// only on loopback).
    #[arg(long, global = true, env = "HUTCH_URL")]
    url: Option<String>,
    /// PEM certificate to trust for an https --url (hutchd's own: DATA_DIR/tls/cert.pem).
    #[arg(long, global = true, env = "HUTCH_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Bearer token for --url (hutchd writes it to DATA_DIR/api-token).
    #[arg(long, global = true, env = "HUTCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Create and boot a VM; pulls its image first when it is missing and names a registry.
    New {
        /// An image name, or a registry reference (HOST[:PORT]/REPO[:TAG]) pulled if missing.
        #[arg(long, required_unless_present_any = ["snapshot", "template"])]
        image: Option<String>,
        /// Start from a snapshot (`hutch snapshot`) instead: its memory, processes and disk,
        /// with a new name and address; its size is the snapshot's.
        #[arg(long, conflicts_with_all = ["image", "run", "vcpu", "mem", "disk", "template"])]
        snapshot: Option<String>,
        /// Start from a template (`hutch template create`): a warm pool VM when one is ready.
        #[arg(long, conflicts_with_all = ["image", "run", "vcpu", "mem", "disk"])]
        template: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = hutch_core::api::DEFAULT_VCPUS)]
        vcpu: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = hutch_core::api::DEFAULT_MEM_MIB)]
        mem: u64,
        /// Writable disk size in GiB (sparse).
        #[arg(long)]
        disk: Option<u64>,
        /// Run the image's Entrypoint + Cmd as the VM's main process (output in `hutch logs`).
        #[arg(long)]
        run: bool,
        /// When its QEMU exits without `hutch stop`: no, on-failure (crash, kill, host reboot)
        /// or always (a clean guest power-off too).
        #[arg(long, default_value = "no")]
        restart: hutch_core::RestartPolicy,
        #[command(flatten)]
        net: net::NetArgs,
        #[command(flatten)]
        timers: timers::TimerArgs,
        /// In a cluster: run it on this node (default: the scheduler picks one).
        #[arg(long)]
        node: Option<String>,
    },
    /// List VMs.
    #[command(alias = "list")]
    Ls,
    /// Show one VM in detail.
    Describe { name: String },
    /// Run a command in a VM; exits with its exit code.
    Exec {
        name: String,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[arg(long, short = 'w')]
        cwd: Option<String>,
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Kill the command after this many seconds (exit code 124).
        #[arg(long)]
        timeout: Option<u64>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Print a VM's console log.
    Logs {
        name: String,
        /// Bytes from the end.
        #[arg(long, default_value_t = 65536)]
        tail: u64,
    },
    /// Stop a VM (the guest syncs and powers off).
    Stop { name: String },
    /// Start a stopped VM.
    Start { name: String },
    /// Delete a VM (stopping it first).
    #[command(alias = "destroy")]
    Rm { name: String },
    /// Copy a file into or out of a VM: `hutch cp ./f vm:/path` or `hutch cp vm:/path ./f`.
    Cp {
        src: String,
        dst: String,
        /// Octal mode for files copied into a VM.
        #[arg(long)]
        mode: Option<String>,
    },
    /// Save a running VM's changes as a new image: `hutch commit demo localhost:5000/team/app:2`.
    Commit {
        name: String,
        reference: String,
        /// Also push it to its registry.
        #[arg(long)]
        push: bool,
        /// Plain HTTP for the push (loopback registries always use it).
        #[arg(long)]
        insecure: bool,
        /// USER:PASS for the push; default: ~/.docker/config.json.
        #[arg(long)]
        creds: Option<String>,
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Templates: an image booted once, set up and snapshotted, for VMs in milliseconds.
    #[command(subcommand)]
    Template(template::TemplateCmd),
    /// Warm pools of a template's VMs, restored ahead of time.
    #[command(subcommand)]
    Pool(template::PoolCmd),
    /// Snapshot a running VM (it runs on): `hutch snapshot web base`; `hutch snapshot ls|rm`.
    Snapshot(snap::SnapshotArgs),
    /// Pause a running VM: its state goes to disk and it holds no memory until resumed.
    Pause { name: String },
    /// Resume a paused VM with its name, address and disk.
    Resume { name: String },
    /// Copies of a running VM, each with its own name and address, sharing its memory and disk
    /// copy-on-write: `hutch fork web --count 3` makes web-fork-1..3.
    Fork {
        name: String,
        #[arg(long)]
        count: Option<u32>,
        /// Copies are PREFIX-1 ... PREFIX-N.
        #[arg(long = "name")]
        prefix: Option<String>,
    },
    /// Extend a VM's TTL: it runs out DURATION (`10m`) from now, or its own TTL from now.
    Keepalive(timers::KeepaliveArgs),
    /// Copy a stopped VM's disk into a new VM and boot it.
    Clone {
        name: String,
        new_name: Option<String>,
    },
    /// Host capacity at a glance: vCPUs, memory and disk used and free, VMs by state, versions.
    Status,
    /// Follow lifecycle events (created, started, stopped, failed, deleted, ...) as they happen.
    Events,
    /// The cluster's nodes: state (ready, cordoned, draining, down), free vCPU, memory and
    /// disk, VM count, version (the admin only).
    Nodes,
    /// Place no new VMs on NODE.
    Cordon { node: String },
    /// Let NODE take new VMs again.
    Uncordon { node: String },
    /// Move a VM to another node: a running one live, without stopping it; a paused or stopped
    /// one as it is (the admin only).
    Migrate {
        name: String,
        /// The node to move it to.
        #[arg(long)]
        to: String,
    },
    /// Cordon NODE and move every VM on it to other nodes: running ones live, paused ones with
    /// their saved state (the admin only).
    Drain { node: String },
    /// A VM's network: egress rules and rates.
    #[command(subcommand)]
    Net(net::NetCmd),
    /// Port forwards, public ports and share links.
    #[command(subcommand)]
    Port(net::PortCmd),
    /// Print the CA certificate of hutchd's HTTPS proxy (trust it in clients).
    Ca,
    /// Administration (the admin only).
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Print a shell completion script: `source <(hutch completions bash)`; `make install` puts
    /// them where bash, zsh and fish look.
    Completions { shell: completions::Shell },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Rebuild the records of VMs the state store lost (it was deleted or corrupt) from their
    /// directories and running QEMUs; nothing is stopped.
    Recover,
    /// Move this single node's state into an empty etcd, to become a cluster's first node
    /// (stop hutchd first; its VMs keep running).
    MigrateStore(migrate::MigrateArgs),
}

/// Runs a process. With `stdin`, the streaming form: the request line, then stdin streamed as
/// the process takes it.
async fn exec(
    c: &Client,
    name: &str,
    req: &hutch_core::api::ExecVm,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<i32> {
    let req = serde_json::to_value(req)?;
    let path = format!("/api/v1/sandboxes/{}/exec", seg(name));
    let r = match stdin {
        Some(input) => {
            let mut head = req.to_string().into_bytes();
            head.push(b'\n');
            let body = reader_body(Bytes::from(head), input);
            c.send_body(
                Method::POST,
                &path,
                "application/vnd.hutch.exec-stream",
                body,
            )
            .await?
        }
        None => {
            c.send(
                Method::POST,
                &path,
                "application/json",
                Bytes::from(req.to_string()),
            )
            .await?
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    ndjson(r, |ev| {
        match ev["type"].as_str().unwrap_or("") {
            "stdout" => {
                out.write_all(&b64.decode(ev["data"].as_str().unwrap_or(""))?)?;
                out.flush()?;
            }
            "stderr" => {
                err.write_all(&b64.decode(ev["data"].as_str().unwrap_or(""))?)?;
                err.flush()?;
            }
            "exit" => {
                if ev["timed_out"].as_bool() == Some(true) {
                    eprintln!("hutch: command timed out");
                    return Ok(Some(124));
                }
                if let Some(code) = ev["code"].as_i64() {
                    return Ok(Some(code as i32));
                }
                return Ok(Some(128 + ev["signal"].as_i64().unwrap_or(0) as i32));
            }
            "error" => bail!("{}", ev["message"].as_str().unwrap_or("exec failed")),
            _ => {}
        }
        Ok(None)
    })
    .await
}

/// `VM:/path` or `ACCOUNT/VM:/path` (the qualified name of another account's VM); anything
/// else is a local path.
fn split_vm_path(s: &str) -> Option<(&str, &str)> {
    let (vm, p) = s.split_once(':')?;
    let name = |n: &str| hutch_core::names::validate_name(n).is_ok();
    let ok = match vm.split_once('/') {
        Some((acct, n)) => name(acct) && name(n),
        None => name(vm),
    };
    (ok && p.starts_with('/')).then_some((vm, p))
}

async fn run(cli: Cli) -> Result<i32> {
    let url = match &cli.url {
        Some(u) => Some(parse_url(u, cli.ca_cert.as_deref())?),
        None => None,
    };
    let c = Client {
        data_dir: cli.data_dir.clone(),
        url,
        token: cli.token.clone(),
    };
    let j = cli.json;
    match cli.cmd {
        Cmd::Image(ic) => image::image(&c, ic, j).await?,
        Cmd::New {
            image,
            snapshot,
            template,
            name,
            vcpu,
            mem,
            disk,
            run,
            restart,
            net,
            timers,
            node,
        } => {
            let mut req = hutch_core::api::CreateVm {
                node,
                name,
                image: image.unwrap_or_default(),
                snapshot,
                template,
                vcpus: vcpu,
                mem_mib: mem,
                disk_gib: disk,
                run,
                restart,
                net: net.net,
                allow_out: net.allow_out,
                deny_out: net.deny_out,
                rate_in: net.rate_in,
                rate_out: net.rate_out,
                clone: net.clone,
                clone_dir: net.clone_dir,
                ..Default::default()
            };
            timers.apply(&mut req);
            let v = pull::create(&c, &req).await?;
            if j {
                out_json(&v)
            } else {
                describe(&v)
            }
        }
        Cmd::Ls => {
            let v = c.json(Method::GET, "/api/v1/sandboxes", None).await?;
            if j {
                out_json(&v);
            } else {
                // Another account's VM (as the admin sees it) is named `account/name`.
                let vms: Vec<hutch_core::Vm> = serde_json::from_value(v)?;
                print!("{}", hutch_core::render::vm_table(&vms, None, None));
            }
        }
        Cmd::Describe { name } => {
            let v = c
                .json(
                    Method::GET,
                    &format!("/api/v1/sandboxes/{}", seg(&name)),
                    None,
                )
                .await?;
            if j {
                out_json(&v)
            } else {
                describe(&v)
            }
        }
        Cmd::Exec {
            name,
            env,
            cwd,
            user,
            timeout,
            argv,
        } => {
            let mut envmap = std::collections::HashMap::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--env {kv:?} is not KEY=VALUE"))?;
                envmap.insert(k.to_string(), v.to_string());
            }
            let stdin: Option<Box<dyn Read + Send>> = if std::io::stdin().is_terminal() {
                None
            } else {
                Some(Box::new(std::io::stdin()))
            };
            let req = hutch_core::api::ExecVm {
                argv,
                env: envmap,
                cwd,
                user,
                timeout_secs: timeout,
                ..Default::default()
            };
            return exec(&c, &name, &req, stdin).await;
        }
        Cmd::Logs { name, tail } => {
            let b = c
                .call(
                    Method::GET,
                    &format!("/api/v1/sandboxes/{}/logs?tail={tail}", seg(&name)),
                    None,
                )
                .await?;
            std::io::stdout().write_all(&b)?;
        }
        Cmd::Stop { name } => {
            let v = c
                .json(
                    Method::POST,
                    &format!("/api/v1/sandboxes/{}/stop", seg(&name)),
                    None,
                )
                .await?;
            if j {
                out_json(&v)
            } else {
                println!("{name} stopped")
            }
        }
        Cmd::Start { name } => {
            let v = c
                .json(
                    Method::POST,
                    &format!("/api/v1/sandboxes/{}/start", seg(&name)),
                    None,
                )
                .await?;
            if j {
                out_json(&v)
            } else {
                println!("{name} running")
            }
        }
        Cmd::Rm { name } => {
            c.call(
                Method::DELETE,
                &format!("/api/v1/sandboxes/{}", seg(&name)),
                None,
            )
            .await?;
            if !j {
                println!("{name} deleted");
            }
        }
        Cmd::Cp { src, dst, mode } => match (split_vm_path(&src), split_vm_path(&dst)) {
            (Some((vm, p)), None) => {
                let r = c
                    .send(
                        Method::GET,
                        &format!("/api/v1/sandboxes/{}/files?path={}", seg(vm), enc(p)),
                        "application/json",
                        Bytes::new(),
                    )
                    .await?;
                if !r.status.is_success() {
                    finish(r).await?;
                    bail!("copy failed");
                }
                // Streamed to the destination chunk by chunk.
                let mut out: Box<dyn Write> = if dst == "-" {
                    Box::new(std::io::stdout().lock())
                } else {
                    Box::new(std::fs::File::create(&dst).with_context(|| dst.clone())?)
                };
                let mut body = r.body;
                while let Some(frame) = body.frame().await {
                    let frame = frame.with_context(|| format!("reading {src}"))?;
                    if let Some(d) = frame.data_ref() {
                        out.write_all(d).with_context(|| dst.clone())?;
                    }
                }
                out.flush()?;
            }
            (None, Some((vm, p))) => {
                let input: Box<dyn Read + Send> = if src == "-" {
                    Box::new(std::io::stdin())
                } else {
                    Box::new(std::fs::File::open(Path::new(&src)).with_context(|| src.clone())?)
                };
                let m = mode
                    .map(|m| format!("&mode={}", enc(&m)))
                    .unwrap_or_default();
                let r = c
                    .send_body(
                        Method::PUT,
                        &format!("/api/v1/sandboxes/{}/files?path={}{m}", seg(vm), enc(p)),
                        "application/octet-stream",
                        reader_body(Bytes::new(), input),
                    )
                    .await?;
                finish(r).await?;
            }
            _ => bail!("exactly one of SRC and DST must be VM:/absolute/path"),
        },
        Cmd::Commit {
            name,
            reference,
            push,
            insecure,
            creds,
            message,
        } => {
            let (username, password) = if push {
                resolve_creds(&reference, creds)?
            } else {
                (None, None)
            };
            let req = hutch_core::api::CommitVm {
                reference,
                comment: message,
                push,
                insecure,
                username,
                password,
            };
            let v = c
                .json(
                    Method::POST,
                    &format!("/api/v1/sandboxes/{}/commit", seg(&name)),
                    Some(serde_json::to_value(req)?),
                )
                .await?;
            if j {
                out_json(&v);
            } else {
                println!(
                    "committed {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    v["digest"].as_str().unwrap_or("")
                );
                if let Some(p) = v["pushed"].as_str() {
                    println!("pushed {p}");
                }
            }
        }
        Cmd::Clone { name, new_name } => {
            let v = c
                .json(
                    Method::POST,
                    &format!("/api/v1/sandboxes/{}/clone", seg(&name)),
                    Some(serde_json::to_value(hutch_core::api::CloneVm {
                        name: new_name,
                    })?),
                )
                .await?;
            if j {
                out_json(&v)
            } else {
                describe(&v)
            }
        }
        Cmd::Template(cmd) => template::template(&c, cmd, j).await?,
        Cmd::Pool(cmd) => template::pool(&c, cmd, j).await?,
        Cmd::Snapshot(a) => snap::snapshot(&c, a, j).await?,
        Cmd::Pause { name } => snap::pause_resume(&c, &name, false, j).await?,
        Cmd::Resume { name } => snap::pause_resume(&c, &name, true, j).await?,
        Cmd::Fork {
            name,
            count,
            prefix,
        } => snap::fork(&c, &name, count, prefix, j).await?,
        Cmd::Keepalive(a) => timers::keepalive(&c, a, j).await?,
        Cmd::Net(cmd) => net::net(&c, cmd, j).await?,
        Cmd::Port(cmd) => net::port(&c, cmd, j).await?,
        Cmd::Ca => net::ca(&c).await?,
        Cmd::Status => {
            let v = c.json(Method::GET, "/api/v1/status", None).await?;
            if j {
                out_json(&v)
            } else {
                let st: hutch_core::status::Status = serde_json::from_value(v)?;
                print!("{}", st.render());
            }
        }
        Cmd::Events => return events::follow(&c, j).await,
        Cmd::Nodes => cluster::nodes(&c, j).await?,
        Cmd::Cordon { node } => cluster::cordon(&c, &node, true, j).await?,
        Cmd::Uncordon { node } => cluster::cordon(&c, &node, false, j).await?,
        Cmd::Migrate { name, to } => cluster::migrate(&c, &name, &to, j).await?,
        Cmd::Drain { node } => cluster::drain(&c, &node, j).await?,
        Cmd::Admin(AdminCmd::MigrateStore(a)) => migrate::migrate(&c.data_dir, a).await?,
        Cmd::Admin(AdminCmd::Recover) => {
            let v = c.json(Method::POST, "/api/v1/admin/recover", None).await?;
            if j {
                out_json(&v)
            } else {
                let items = v.as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    println!("every VM directory has its record; nothing to recover");
                }
                for r in items {
                    let name = match r["owner"].as_str() {
                        Some(o) => format!("{o}/{}", r["vm"].as_str().unwrap_or("")),
                        None => r["vm"].as_str().unwrap_or("").to_string(),
                    };
                    println!(
                        "{}  {name}  {}",
                        r["id"].as_str().unwrap_or(""),
                        r["outcome"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Completions { shell } => completions::print(shell)?,
    }
    Ok(0)
}

fn main() {
    let cli = Cli::parse();
    // Needs no hutchd (nor a runtime).
    if let Cmd::Completions { shell } = cli.cmd {
        if let Err(e) = completions::print(shell) {
            eprintln!("hutch: {e}");
            std::process::exit(1);
        }
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hutch: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("hutch: {e:#}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_vm_path;

    #[test]
    fn vm_paths() {
        assert_eq!(split_vm_path("web:/root/f"), Some(("web", "/root/f")));
        assert_eq!(
            split_vm_path("alice/web:/root/f"),
            Some(("alice/web", "/root/f"))
        );
        assert_eq!(split_vm_path("./web:/x"), None);
        assert_eq!(split_vm_path("dir/sub/web:/x"), None);
        assert_eq!(split_vm_path("web:relative"), None);
        assert_eq!(split_vm_path("/tmp/file"), None);
    }
}
