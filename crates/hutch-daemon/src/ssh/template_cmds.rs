//! The SSH front door's template and pool commands (`ssh HOST template ...`, `ssh HOST pool ...`).

use super::*;
use hutch_core::template::{CreateTemplate, SetPool};

fn pretty<T: serde::Serialize>(v: &T) -> Out {
    Out::ok(serde_json::to_string_pretty(v).unwrap_or_default() + "\n")
}

impl Conn {
    pub(super) async fn template_cmd(&mut self, rest: &[&str], json: bool) -> Out {
        let caller = self.caller();
        match rest {
            ["ls"] => match self.m.templates_of(&caller).await {
                Ok(v) if json => pretty(&v),
                Ok(v) => {
                    let mut rows = vec![vec![
                        "NAME".to_string(),
                        "STATUS".into(),
                        "IMAGE".into(),
                        "ERROR".into(),
                    ]];
                    for t in v {
                        rows.push(vec![
                            t.name,
                            t.status.as_str().into(),
                            t.image,
                            t.error.unwrap_or_default(),
                        ]);
                    }
                    Out::ok(hutch_core::table(rows))
                }
                Err(e) => Out::fail(e.to_string()),
            },
            ["rm", name] => match self.m.delete_template(&caller, name).await {
                Ok(()) => Out::ok(format!("removed template {name}\n")),
                Err(e) => Out::fail(e.to_string()),
            },
            ["build", name] => match self.m.rebuild_template(&caller, name).await {
                Ok(t) if json => pretty(&t),
                Ok(_) => Out::ok(format!("template {name} building; see: template ls\n")),
                Err(e) => Out::fail(e.to_string()),
            },
            ["create", name, flags @ ..] => {
                let mut req = CreateTemplate {
                    name: name.to_string(),
                    vcpus: hutch_core::api::DEFAULT_VCPUS,
                    mem_mib: hutch_core::api::DEFAULT_MEM_MIB,
                    ..Default::default()
                };
                let mut it = flags.iter();
                while let Some(f) = it.next() {
                    let Some(v) = it.next() else {
                        return Out::fail(format!("{f} needs a value"));
                    };
                    let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{f}: {v:?} is not a number"));
                    let r = match *f {
                        "--image" => {
                            req.image = v.to_string();
                            Ok(())
                        }
                        "--vcpu" => num(v).map(|n| req.vcpus = n as u32),
                        "--mem" => num(v).map(|n| req.mem_mib = n),
                        "--disk" => num(v).map(|n| req.disk_gib = Some(n)),
                        "--start-cmd" => {
                            req.start_cmd = Some(v.to_string());
                            Ok(())
                        }
                        "--ready-cmd" => {
                            req.ready_cmd = Some(v.to_string());
                            Ok(())
                        }
                        other => Err(format!("unknown flag {other}")),
                    };
                    if let Err(e) = r {
                        return Out::fail(e);
                    }
                }
                if req.image.is_empty() {
                    return Out::fail("--image is required");
                }
                match self.m.create_template(&caller, req).await {
                    Ok(t) if json => pretty(&t),
                    Ok(_) => Out::ok(format!("template {name} building; see: template ls\n")),
                    Err(e) => Out::fail(e.to_string()),
                }
            }
            _ => Out::fail(
                "usage: template create NAME --image IMAGE [--vcpu N] [--mem MIB] [--disk GIB] \
                 [--start-cmd CMD] [--ready-cmd CMD] | template ls | template build NAME | template rm NAME",
            ),
        }
    }

    pub(super) async fn pool_cmd(&mut self, rest: &[&str], json: bool) -> Out {
        let caller = self.caller();
        let table =
            |v: Vec<hutch_core::template::PoolView>| Out::ok(hutch_core::render::pool_table(&v));
        match rest {
            ["ls"] => match self.m.pools_of(&caller).await {
                Ok(v) if json => pretty(&v),
                Ok(v) => table(v),
                Err(e) => Out::fail(e.to_string()),
            },
            ["rm", t] => match self
                .m
                .set_pool(&caller, t, SetPool { min: 0, ..Default::default() })
                .await
            {
                Ok(_) => Out::ok(format!("removed the pool of {t}\n")),
                Err(e) => Out::fail(e.to_string()),
            },
            ["set", t, flags @ ..] => {
                let mut req = SetPool::default();
                let mut it = flags.iter();
                while let Some(f) = it.next() {
                    if *f == "--nodes" {
                        let Some(v) = it.next() else {
                            return Out::fail("--nodes needs all or NODE,NODE...");
                        };
                        req.nodes = Some(hutch_core::template::parse_pool_nodes(v));
                        continue;
                    }
                    let Some(Ok(n)) = it.next().map(|v| v.parse::<u32>()) else {
                        return Out::fail(format!("{f} needs a number"));
                    };
                    match *f {
                        "--min" => req.min = n,
                        "--max" => req.max = Some(n),
                        other => return Out::fail(format!("unknown flag {other}")),
                    }
                }
                match self.m.set_pool(&caller, t, req).await {
                    Ok(p) if json => pretty(&p),
                    Ok(p) => table(vec![p]),
                    Err(e) => Out::fail(e.to_string()),
                }
            }
            _ => {
                Out::fail("usage: pool set TEMPLATE --min N [--max M] [--nodes all|NODE,...] | pool ls | pool rm TEMPLATE")
            }
        }
    }
}
