//! The SSH front door's snapshot and fork commands (`ssh HOST snapshot ...`, `ssh HOST fork ...`).

use super::*;
use hutch_core::api::ForkVm;

impl Conn {
    pub(super) async fn snapshot_cmd(&mut self, rest: &[&str], json: bool) -> Out {
        let caller = self.caller();
        fn pretty<T: serde::Serialize>(v: &T) -> Out {
            Out::ok(serde_json::to_string_pretty(v).unwrap_or_default() + "\n")
        }
        match rest {
            ["ls"] => match self.m.snapshots_of(&caller).await {
                Ok(v) if json => pretty(&v),
                Ok(v) => {
                    let mut rows = vec![vec![
                        "NAME".to_string(),
                        "FROM VM".into(),
                        "IMAGE".into(),
                        "MEM".into(),
                        "SIZE".into(),
                    ]];
                    for s in v {
                        rows.push(vec![
                            s.name,
                            s.vm,
                            s.image,
                            format!("{}Mi", s.mem_mib),
                            format!("{:.1}Mi", s.bytes as f64 / 1048576.0),
                        ]);
                    }
                    Out::ok(hutch_core::table(rows))
                }
                Err(e) => Out::fail(e.to_string()),
            },
            ["rm", name] => match self.m.delete_snapshot(&caller, name).await {
                Ok(()) => Out::ok(format!("removed snapshot {name}\n")),
                Err(e) => Out::fail(e.to_string()),
            },
            [vm, name] => {
                if self.find(vm).await.is_none() {
                    return Out::fail(format!("{vm}: no such VM"));
                }
                match self.m.snapshot(&caller, vm, name).await {
                    Ok(s) if json => pretty(&s),
                    Ok(s) => Out::ok(format!(
                        "snapshot {name} of {vm}: {:.1} MiB, {vm} stopped for {} ms\n",
                        s.bytes as f64 / 1048576.0,
                        s.pause_ms
                    )),
                    Err(e) => Out::fail(e.to_string()),
                }
            }
            _ => Out::fail("usage: snapshot VM NAME | snapshot ls | snapshot rm NAME"),
        }
    }

    pub(super) async fn fork_cmd(&mut self, rest: &[&str], json: bool) -> Out {
        let Some((vm, flags)) = rest.split_first() else {
            return Out::fail("usage: fork VM [--count N] [--name PREFIX]");
        };
        let mut req = ForkVm::default();
        let mut it = flags.iter();
        while let Some(f) = it.next() {
            let Some(v) = it.next() else {
                return Out::fail(format!("{f} needs a value"));
            };
            match *f {
                "--count" => match v.parse() {
                    Ok(n) => req.count = Some(n),
                    Err(_) => return Out::fail(format!("--count: {v:?} is not a number")),
                },
                "--name" => req.name = Some(v.to_string()),
                other => return Out::fail(format!("unknown flag {other}")),
            }
        }
        if self.find(vm).await.is_none() {
            return Out::fail(format!("{vm}: no such VM"));
        }
        match self.m.fork(&self.caller(), vm, req).await {
            Ok(v) if json => Out::ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"),
            Ok(v) => {
                let viewer = (!self.caller().admin).then(|| self.caller().account);
                Out::ok(hutch_core::render::vm_table(
                    &v,
                    viewer.as_deref(),
                    Some(&self.host),
                ))
            }
            Err(e) => Out::fail(e.to_string()),
        }
    }
}
