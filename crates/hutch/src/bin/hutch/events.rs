//! `hutch events`: follows hutchd's lifecycle event stream until interrupted.

use crate::client::{ndjson, Client};
use anyhow::Result;
use bytes::Bytes;
use hutch_core::VmEvent;
use hyper::Method;
use std::io::Write;

/// One event as a line: time, kind, VM (qualified by owner), state, reason.
pub(crate) fn line(e: &VmEvent) -> String {
    let secs = e.time_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let vm = match &e.owner {
        Some(o) => format!("{o}/{}", e.vm),
        None => e.vm.clone(),
    };
    let mut l = format!(
        "{h:02}:{m:02}:{s:02}.{:03}  {:<10}  {vm}  ({})",
        e.time_ms % 1000,
        e.kind,
        e.state.as_str()
    );
    if let Some(r) = &e.reason {
        l.push_str(": ");
        l.push_str(&hutch_core::clean_text(r).replace('\n', " "));
    }
    l
}

pub(crate) async fn follow(c: &Client, json: bool) -> Result<i32> {
    let r = c
        .send(
            Method::GET,
            "/api/v1/events",
            "application/json",
            Bytes::new(),
        )
        .await?;
    ndjson::<i32>(r, |v| {
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{v}")?;
        } else if v["kind"] == "lagged" {
            writeln!(
                out,
                "... {} events missed (this client was too slow)",
                v["missed"]
            )?;
        } else {
            let e: VmEvent = serde_json::from_value(v)?;
            writeln!(out, "{}", line(&e))?;
        }
        out.flush()?;
        Ok(None)
    })
    .await
}
