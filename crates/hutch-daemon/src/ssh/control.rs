//! The control commands of the SSH front door (`ssh -p 2222 HOST COMMAND`): VMs, accounts, keys,
//! tokens, status. Parsing and rendering only; the work (and who may do it) is the service's.

use super::*;

impl Conn {
    pub(super) async fn control(&mut self, args: Vec<String>, stdin: &[u8]) -> Out {
        let json = args.iter().any(|a| a == "--json");
        let args: Vec<String> = args.into_iter().filter(|a| a != "--json").collect();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let not_found = |n: &str| Out::fail(format!("{n}: no such VM"));
        let caller = self.caller();
        match a.as_slice() {
            [] | ["help"] | ["--help"] => Out::ok(
                HELP.replace("PORT", &self.port.to_string())
                    .replace("HOST", &self.host),
            ),
            ["whoami"] => {
                let acc = self.account();
                Out::ok(format!(
                    "{}{}\nkey {}\n",
                    acc.name,
                    if acc.admin { " (admin)" } else { "" },
                    self.key_fp
                ))
            }
            ["ls"] | ["list"] => {
                let vms: Vec<Vm> = self.m.vms_of(&caller).await.unwrap_or_default();
                if json {
                    return Out::ok(serde_json::to_string_pretty(&vms).unwrap_or_default() + "\n");
                }
                let viewer = (!caller.admin).then_some(caller.account.as_str());
                Out::ok(hutch_core::render::vm_table(&vms, viewer, Some(&self.host)))
            }
            ["describe", n] => match self.find(n).await {
                Some(v) if json => {
                    Out::ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
                }
                Some(v) => Out::ok(self.describe(&v)),
                None => not_found(n),
            },
            ["logs", n] => match self.m.console(&caller, n, 64 * 1024).await {
                Ok(text) => Out::ok(text),
                Err(_) => not_found(n),
            },
            [op @ ("stop" | "start" | "rm" | "destroy"), n] => {
                if self.find(n).await.is_none() {
                    return not_found(n);
                }
                let r = match *op {
                    "stop" => self
                        .m
                        .stop(&caller, n)
                        .await
                        .map(|_| format!("{n} stopped\n")),
                    "start" => self
                        .m
                        .start(&caller, n)
                        .await
                        .map(|_| format!("{n} running\n")),
                    _ => self
                        .m
                        .delete(&caller, n)
                        .await
                        .map(|_| format!("{n} deleted\n")),
                };
                r.map(Out::ok).unwrap_or_else(|e| Out::fail(e.to_string()))
            }
            ["new", rest @ ..] => self.new_vm(rest, json).await,
            [op @ ("pause" | "resume"), n] => {
                if self.find(n).await.is_none() {
                    return not_found(n);
                }
                let r = if *op == "pause" {
                    self.m.pause(&caller, n).await
                } else {
                    self.m.resume(&caller, n).await
                };
                match r {
                    Ok(v) if json => {
                        Out::ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
                    }
                    Ok(v) => Out::ok(format!("{n} {}\n", v.state.as_str())),
                    Err(e) => Out::fail(e.to_string()),
                }
            }
            ["keepalive", n, rest @ ..] if rest.len() <= 1 => {
                if self.find(n).await.is_none() {
                    return not_found(n);
                }
                let req = hutch_core::api::Keepalive {
                    duration: rest.first().map(|d| d.to_string()),
                };
                match self.m.keepalive(&caller, n, req).await {
                    Ok(v) if json => {
                        Out::ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
                    }
                    Ok(v) => Out::ok(format!(
                        "{n} expires in {}, then {}\n",
                        hutch_core::render::until(v.timers.deadline.unwrap_or(0)),
                        v.timers.on_expire.as_str()
                    )),
                    Err(e) => Out::fail(e.to_string()),
                }
            }
            ["snapshot", rest @ ..] => self.snapshot_cmd(rest, json).await,
            ["fork", rest @ ..] => self.fork_cmd(rest, json).await,
            ["template", rest @ ..] => self.template_cmd(rest, json).await,
            ["pool", rest @ ..] => self.pool_cmd(rest, json).await,
            ["cp", src, rest @ ..] if rest.len() <= 1 => {
                if self.find(src).await.is_none() {
                    return not_found(src);
                }
                match self
                    .m
                    .clone_vm(&caller, src, rest.first().map(|s| s.to_string()))
                    .await
                {
                    Ok(v) if json => {
                        Out::ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
                    }
                    Ok(v) => Out::ok(self.describe(&v)),
                    Err(e) => Out::fail(e.to_string()),
                }
            }
            ["status"] => match self.m.status(&caller).await {
                Ok(st) if json => {
                    Out::ok(serde_json::to_string_pretty(&st).unwrap_or_default() + "\n")
                }
                Ok(st) => Out::ok(format!("node {}\n{}", self.host, st.render())),
                Err(e) => Out::fail(e.to_string()),
            },
            ["keys", "ls"] => {
                let lines: Vec<String> = self
                    .account()
                    .keys
                    .iter()
                    .filter_map(|k| PublicKey::from_openssh(k).ok())
                    .map(|k| format!("{}  {}\n", fingerprint(&k), k.algorithm()))
                    .collect();
                Out::ok(lines.concat())
            }
            ["quota", rest @ ..] => self.quota_cmd(rest, json).await,
            ["keys", "add"] => {
                self.add_keys(&self.account().name.clone(), stdin, false)
                    .await
            }
            ["keys", "rm", fp] => {
                let line = self
                    .account()
                    .keys
                    .iter()
                    .find(|k| line_fingerprint(k).as_deref() == Some(*fp))
                    .cloned();
                let Some(line) = line else {
                    return Out::fail(format!("no key {fp} on this account"));
                };
                match self.m.remove_key(&caller, &line).await {
                    Ok(revoked) => {
                        if let Some(acc) = self.account.as_mut() {
                            acc.keys.retain(|k| *k != line);
                        }
                        Out::ok(format!("removed {fp}; revoked {revoked} API token(s)\n"))
                    }
                    Err(e) => Out::fail(e.to_string()),
                }
            }
            ["token", "create", rest @ ..] => {
                let hours = match rest {
                    [] => 24,
                    ["--ttl", h] => match h.trim_end_matches('h').parse::<u64>() {
                        Ok(h) if (1..=24 * 365).contains(&h) => h,
                        _ => return Out::fail(format!("--ttl {h:?}: hours between 1 and 8760")),
                    },
                    _ => return Out::fail("usage: token create [--ttl HOURS]"),
                };
                match self.m.issue_token(&caller, hours * 3600).await {
                    Ok((rec, jwt)) if json => Out::ok(
                        serde_json::json!({"id": rec.id, "token": jwt, "expires_at": rec.expires_at}).to_string() + "\n",
                    ),
                    Ok((rec, jwt)) => Out::ok(format!("{jwt}\n# id {} expires in {hours}h; revoke: token rm {}\n", rec.id, rec.id)),
                    Err(e) => Out::fail(e.to_string()),
                }
            }
            ["token", "ls"] => {
                let mut rows = vec![vec!["ID".to_string(), "CREATED".into(), "EXPIRES".into()]];
                for t in self.m.tokens_of(&caller).await.unwrap_or_default() {
                    rows.push(vec![
                        t.id,
                        hutch_image::rfc3339(t.created_at),
                        hutch_image::rfc3339(t.expires_at),
                    ]);
                }
                Out::ok(hutch_core::table(rows))
            }
            ["token", "rm", id] => {
                if self.m.revoke_token(&caller, id).await.unwrap_or(false) {
                    Out::ok(format!("revoked {id}\n"))
                } else {
                    Out::fail(format!("no token {id} on this account"))
                }
            }
            ["invite", rest @ ..] => self.invite(rest).await,
            ["adduser", name] => self.add_keys(name, stdin, true).await,
            _ => Out::fail(format!(
                "unknown command {:?}; try: ssh -p {} {} help",
                args.join(" "),
                self.port,
                self.host
            )),
        }
    }

    pub(super) async fn add_keys(&self, account: &str, stdin: &[u8], create: bool) -> Out {
        if create && !self.account().admin {
            return Out::fail("only admins can add users");
        }
        let keys = match parse_keys(&String::from_utf8_lossy(stdin)) {
            Ok(k) => k,
            Err(e) => return Out::fail(e),
        };
        let keys: Vec<(String, String)> = keys
            .iter()
            .filter_map(|k| Some((fingerprint(k), k.to_openssh().ok()?)))
            .collect();
        match self.m.add_keys(&self.caller(), account, keys, create).await {
            Ok(acc) => Out::ok(format!("account {account}: {} key(s)\n", acc.keys.len())),
            Err(e) => Out::fail(e.to_string()),
        }
    }

    pub(super) async fn new_vm(&self, rest: &[&str], json: bool) -> Out {
        let mut req = CreateVm::default();
        let mut it = rest.iter().flat_map(|a| match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => vec![k.to_string(), v.to_string()],
            _ => vec![a.to_string()],
        });
        while let Some(flag) = it.next() {
            if flag == "--run" {
                req.run = true;
                continue;
            }
            let Some(val) = it.next() else {
                return Out::fail(format!("{flag} needs a value"));
            };
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{flag}: {v:?} is not a number"))
            };
            let r = match flag.as_str() {
                "--name" => {
                    req.name = Some(val);
                    Ok(())
                }
                "--image" => {
                    req.image = val;
                    Ok(())
                }
                "--snapshot" => {
                    req.snapshot = Some(val);
                    Ok(())
                }
                "--template" => {
                    req.template = Some(val);
                    Ok(())
                }
                "--vcpu" => num(&val).map(|n| req.vcpus = n as u32),
                "--mem" | "--ram" => num(&val).map(|n| req.mem_mib = n),
                "--disk" => num(&val).map(|n| req.disk_gib = Some(n)),
                "--restart" => val.parse().map(|r| req.restart = r),
                "--net" => val
                    .parse()
                    .map(|m| req.net = Some(m))
                    .map_err(|e: hutch_core::net::NetParseError| e.0),
                "--allow-out" => {
                    req.allow_out.push(val);
                    Ok(())
                }
                "--deny-out" => {
                    req.deny_out.push(val);
                    Ok(())
                }
                "--rate-in" => {
                    req.rate_in = Some(val);
                    Ok(())
                }
                "--rate-out" => {
                    req.rate_out = Some(val);
                    Ok(())
                }
                "--clone" => {
                    req.clone = Some(val);
                    Ok(())
                }
                "--clone-dir" => {
                    req.clone_dir = Some(val);
                    Ok(())
                }
                "--node" => {
                    req.node = Some(val);
                    Ok(())
                }
                "--ttl" => {
                    req.ttl = Some(val);
                    Ok(())
                }
                "--on-expire" => val.parse().map(|o| req.on_expire = Some(o)),
                "--auto-pause" => {
                    req.auto_pause = Some(val);
                    Ok(())
                }
                other => Err(format!(
                    "unknown flag {other}; see: ssh -p {} {} help",
                    self.port, self.host
                )),
            };
            if let Err(e) = r {
                return Out::fail(e);
            }
        }
        if req.image.is_empty() && req.snapshot.is_none() && req.template.is_none() {
            return Out::fail("--image (or --snapshot, --template) is required");
        }
        // In a cluster, a VM made over SSH runs on this node unless --node says otherwise:
        // `ssh VM@this-host` then reaches it.
        if req.node.is_none() && req.snapshot.is_none() && req.template.is_none() {
            req.node = self.m.records.local_node();
        }
        match self.m.create(&self.caller(), req).await {
            Ok(v) if json => Out::ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"),
            Ok(v) => Out::ok(self.describe(&v)),
            Err(e) => Out::fail(e.to_string()),
        }
    }
}

pub(super) const HELP: &str = "hutch over SSH. Commands:
  new --image IMAGE [--name NAME] [--vcpu N] [--mem MIB] [--disk GIB] [--run] [--restart R]
      [--net none|internal|internet] [--allow-out CIDR|DOMAIN]... [--deny-out CIDR|DOMAIN]...
      [--rate-in RATE] [--rate-out RATE] [--clone GIT-URL [--clone-dir DIR]] [--node NODE]
  new --snapshot SNAPSHOT | --template TEMPLATE [--name NAME] [network flags]
  template create NAME --image IMAGE [--vcpu N] [--mem MIB] [--start-cmd CMD] [--ready-cmd CMD]
  template ls | template build NAME | template rm NAME
  pool set TEMPLATE --min N [--max M] | pool ls | pool rm TEMPLATE
      both with [--ttl DURATION [--on-expire delete|pause]] [--auto-pause IDLE]
      (90s, 30m, 1h, 7d; the TTL deletes or pauses it; auto-pause resumes it on use)
  ls | describe NAME | stop NAME | start NAME | rm NAME | logs NAME | cp NAME [NEW-NAME]
  pause NAME | resume NAME | fork NAME [--count N] [--name PREFIX]
  keepalive NAME [DURATION]     (the TTL runs out DURATION from now; default: its own TTL)
  snapshot NAME SNAPSHOT | snapshot ls | snapshot rm SNAPSHOT
  status | whoami | keys ls | keys add < key.pub | keys rm FINGERPRINT
  token create [--ttl HOURS] | token ls | token rm ID     (API tokens for the REST API)
  quota                         (your quota and usage)
  adduser NAME < key.pub | quota NAME [--vms N] [--vcpus N] [--mem MIB] [--disk GIB]   (admins)
  invite [--ttl HOURS]          (admins: a one-time code; a new key runs: signup CODE [NAME])
Add --json to ls, describe and new for JSON. Enter a VM: ssh -p PORT NAME@HOST
";
