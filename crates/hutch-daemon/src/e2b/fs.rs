//! envd's `filesystem.Filesystem` service over hutch's guest agent: Stat, ListDir (with depth),
//! MakeDir, Move, Remove, WatchDir and the polled watchers (CreateWatcher, GetWatcherEvents,
//! RemoveWatcher). Paths are the guest's, relative ones against the E2B user's home.

use super::connect::{self, Code, RpcError};
use super::envd::Ctx;
use super::users::{absolute, Table};
use crate::agent::{within, Agent, AgentError};
use axum::extract::Request;
use axum::response::Response;
use hutch_proto::{ErrorCode, FileAttr};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// How long one agent answer may take.
const ANSWER: Duration = Duration::from_secs(30);
/// Most entries one ListDir or Remove walks, and the deepest it goes.
pub const MAX_WALK: usize = 100_000;
pub const MAX_DEPTH: u32 = 64;

pub use super::watch::Watchers;

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PathReq {
    #[serde(default)]
    path: String,
    #[serde(default)]
    depth: u32,
}

#[derive(Debug, Deserialize, Default)]
struct MoveReq {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

/// The agent's failure as envd's.
pub fn agent_err(path: &str, e: AgentError) -> RpcError {
    let code = match e.code() {
        Some(ErrorCode::NotFound) => Code::NotFound,
        Some(ErrorCode::Exists) => Code::AlreadyExists,
        Some(ErrorCode::PermissionDenied) | Some(ErrorCode::ReadOnly) => Code::PermissionDenied,
        Some(ErrorCode::NotADirectory)
        | Some(ErrorCode::IsDirectory)
        | Some(ErrorCode::NotEmpty)
        | Some(ErrorCode::InvalidArgument)
        | Some(ErrorCode::TooLarge) => Code::InvalidArgument,
        Some(ErrorCode::NoSpace) => Code::ResourceExhausted,
        Some(_) => Code::Internal,
        None => Code::Unavailable,
    };
    RpcError::new(code, format!("{path}: {e}"))
}

/// Dispatches one call of the service.
pub async fn call(c: Ctx, method: &str, req: Request) -> Result<Response, RpcError> {
    let (parts, body) = req.into_parts();
    if method == "WatchDir" {
        let msg = connect::read_single(body).await?;
        return super::watch::watch_dir(c, &parts.headers, &msg).await;
    }
    let body = connect::read_unary(body).await?;
    let acct = c.account(&parts.headers).await?;
    // Every operation as the E2B user: the guest's permissions apply, and what it makes is its.
    let agent = agent_of(&c, &acct).await?;
    let table = c.table().await?;
    let abs = |p: &str| absolute(p, &acct.home);
    let v = match method {
        "Stat" => {
            let r: PathReq = connect::parse(&body)?;
            let path = abs(&r.path)?;
            serde_json::json!({ "entry": entry(&*agent, &table, &path).await? })
        }
        "ListDir" => {
            let r: PathReq = connect::parse(&body)?;
            let path = abs(&r.path)?;
            let depth = r.depth.clamp(1, MAX_DEPTH);
            serde_json::json!({ "entries": list(&*agent, &table, &path, depth).await? })
        }
        "MakeDir" => {
            let r: PathReq = connect::parse(&body)?;
            let path = abs(&r.path)?;
            if stat(&*agent, &path, false).await?.is_some() {
                return Err(RpcError::new(
                    Code::AlreadyExists,
                    format!("{path} already exists"),
                ));
            }
            make_dirs(&*agent, &path).await?;
            serde_json::json!({ "entry": entry(&*agent, &table, &path).await? })
        }
        "Move" => {
            let r: MoveReq = connect::parse(&body)?;
            let (from, to) = (abs(&r.source)?, abs(&r.destination)?);
            if let Some(parent) = parent(&to) {
                make_dirs(&*agent, parent).await?;
            }
            within(ANSWER, agent.rename(&from, &to))
                .await
                .map_err(|e| agent_err(&from, e))?;
            serde_json::json!({ "entry": entry(&*agent, &table, &to).await? })
        }
        "Remove" => {
            let r: PathReq = connect::parse(&body)?;
            let path = abs(&r.path)?;
            if path == "/" {
                return Err(RpcError::invalid("refusing to remove /"));
            }
            remove_all(&*agent, &path).await?;
            serde_json::json!({})
        }
        "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher" => {
            return super::watch::watcher_call(c, &parts.headers, method, &body)
                .await
                .map(connect::unary_ok);
        }
        other => {
            return Err(RpcError::new(
                Code::Unimplemented,
                format!("filesystem.Filesystem has no method {other}"),
            ));
        }
    };
    Ok(connect::unary_ok(v))
}

fn parent(p: &str) -> Option<&str> {
    p.rsplit_once('/').map(|(a, _)| a).filter(|a| !a.is_empty())
}

/// `lstat` (or `stat`), None when the path does not exist.
pub async fn stat(a: &dyn Agent, path: &str, follow: bool) -> Result<Option<FileAttr>, RpcError> {
    match within(ANSWER, a.stat(path, follow)).await {
        Ok(x) => Ok(Some(x)),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
        Err(e) => Err(agent_err(path, e)),
    }
}

/// `mkdir -p` (as the agent's user: what it makes is the user's).
pub async fn make_dirs(a: &dyn Agent, path: &str) -> Result<(), RpcError> {
    let mut cur = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        cur.push('/');
        cur.push_str(part);
        match within(ANSWER, a.mkdir(&cur, 0o755)).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::Exists) => {}
            Err(e) => return Err(agent_err(&cur, e)),
        }
    }
    Ok(())
}

/// The guest user file operations for `acct` run as (`uid:gid`), or None for root.
pub fn user_spec(acct: &super::users::Account) -> Option<String> {
    (acct.uid != 0).then(|| format!("{}:{}", acct.uid, acct.gid))
}

/// Removes a file, a symlink or a whole tree (within [`MAX_WALK`] entries).
async fn remove_all(a: &dyn Agent, path: &str) -> Result<(), RpcError> {
    let Some(attr) = stat(a, path, false).await? else {
        return Err(RpcError::new(
            Code::NotFound,
            format!("{path} does not exist"),
        ));
    };
    if !is_dir(attr.mode) {
        return within(ANSWER, a.remove(path))
            .await
            .map_err(|e| agent_err(path, e));
    }
    // Depth first: every directory's entries go before it.
    let mut dirs = vec![path.to_string()];
    let mut order = Vec::new();
    let mut seen = 0usize;
    while let Some(d) = dirs.pop() {
        let mut skip = 0;
        loop {
            let page = within(ANSWER, a.read_dir(&d, skip))
                .await
                .map_err(|e| agent_err(&d, e))?;
            for e in &page.entries {
                seen += 1;
                if seen > MAX_WALK {
                    return Err(RpcError::new(
                        Code::ResourceExhausted,
                        format!("{path} holds over {MAX_WALK} entries; remove it with a command"),
                    ));
                }
                let p = format!("{}/{}", d.trim_end_matches('/'), e.name);
                if is_dir(e.attr.mode) {
                    dirs.push(p);
                } else {
                    within(ANSWER, a.remove(&p))
                        .await
                        .map_err(|err| agent_err(&p, err))?;
                }
            }
            if !page.more {
                break;
            }
            skip = page.next;
        }
        order.push(d);
    }
    for d in order.iter().rev() {
        within(ANSWER, a.rmdir(d))
            .await
            .map_err(|e| agent_err(d, e))?;
    }
    Ok(())
}

pub fn is_dir(mode: u32) -> bool {
    mode & 0o170000 == 0o040000
}

fn is_link(mode: u32) -> bool {
    mode & 0o170000 == 0o120000
}

/// The entries under `path`, `depth` levels down, breadth first.
async fn list(
    a: &dyn Agent,
    t: &Table,
    path: &str,
    depth: u32,
) -> Result<Vec<serde_json::Value>, RpcError> {
    match stat(a, path, true).await? {
        None => {
            return Err(RpcError::new(
                Code::NotFound,
                format!("{path} does not exist"),
            ))
        }
        Some(x) if !is_dir(x.mode) => {
            return Err(RpcError::invalid(format!("{path} is not a directory")));
        }
        Some(_) => {}
    }
    let mut out = Vec::new();
    let mut level = vec![path.trim_end_matches('/').to_string()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for d in level {
            let mut skip = 0;
            loop {
                let page = within(
                    ANSWER,
                    a.read_dir(if d.is_empty() { "/" } else { &d }, skip),
                )
                .await
                .map_err(|e| agent_err(&d, e))?;
                for e in page.entries {
                    if out.len() >= MAX_WALK {
                        return Err(RpcError::new(
                            Code::ResourceExhausted,
                            format!("over {MAX_WALK} entries under {path}"),
                        ));
                    }
                    let p = format!("{d}/{}", e.name);
                    let target = if is_link(e.attr.mode) {
                        within(ANSWER, a.readlink(&p)).await.ok()
                    } else {
                        None
                    };
                    if is_dir(e.attr.mode) {
                        next.push(p.clone());
                    }
                    out.push(entry_json(t, &e.name, &p, &e.attr, target));
                }
                if !page.more {
                    break;
                }
                skip = page.next;
            }
        }
        level = next;
        if level.is_empty() {
            break;
        }
    }
    Ok(out)
}

/// The EntryInfo of `path` (not following a final symlink).
pub async fn entry(a: &dyn Agent, t: &Table, path: &str) -> Result<serde_json::Value, RpcError> {
    let attr = stat(a, path, false)
        .await?
        .ok_or_else(|| RpcError::new(Code::NotFound, format!("{path} does not exist")))?;
    let target = if is_link(attr.mode) {
        within(ANSWER, a.readlink(path)).await.ok()
    } else {
        None
    };
    let name = path.rsplit('/').next().unwrap_or("");
    Ok(entry_json(t, name, path, &attr, target))
}

/// envd's EntryInfo in proto JSON (int64 `size` as a string, enums by name).
pub fn entry_json(
    t: &Table,
    name: &str,
    path: &str,
    a: &FileAttr,
    target: Option<String>,
) -> serde_json::Value {
    let kind = if is_link(a.mode) {
        "FILE_TYPE_SYMLINK"
    } else if is_dir(a.mode) {
        "FILE_TYPE_DIRECTORY"
    } else {
        "FILE_TYPE_FILE"
    };
    let mut v = serde_json::json!({
        "name": name,
        "type": kind,
        "path": path,
        "size": a.size.to_string(),
        "mode": a.mode & 0o7777,
        "permissions": permissions(a.mode),
        "owner": t.user_name(a.uid),
        "group": t.group_name(a.gid),
        "modifiedTime": super::model::rfc3339(a.mtime.max(0) as u64),
    });
    if let Some(target) = target {
        v["symlinkTarget"] = target.into();
    }
    v
}

/// `ls -l` style permissions, as Go's `FileMode.String()` writes them.
pub fn permissions(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'L',
        0o010000 => 'p',
        0o140000 => 'S',
        0o020000 => 'D',
        0o060000 => 'D',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// The agent of a request's sandbox (a use of the VM: resumes an auto-resuming one), acting
/// as `acct`.
pub async fn agent_of(c: &Ctx, acct: &super::users::Account) -> Result<Arc<dyn Agent>, RpcError> {
    Ok(crate::service::files::as_user(
        c.e.m.agent(&c.caller, c.vm()).await?,
        user_spec(acct).as_deref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_envds() {
        let t = Table::parse("root:x:0:0::/root:/bin/sh\n", "root:x:0:\n");
        let a = FileAttr {
            size: 5,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            atime: 0,
            mtime: 1_700_000_000,
        };
        let v = entry_json(&t, "f", "/root/f", &a, None);
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["size"], "5");
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["owner"], "root");
        assert_eq!(v["modifiedTime"], "2023-11-14T22:13:20Z");
        assert_eq!(permissions(0o040755), "drwxr-xr-x");
        let l = entry_json(
            &t,
            "l",
            "/l",
            &FileAttr {
                mode: 0o120777,
                ..a
            },
            Some("/f".into()),
        );
        assert_eq!(l["type"], "FILE_TYPE_SYMLINK");
        assert_eq!(l["symlinkTarget"], "/f");
    }

    #[test]
    fn parents() {
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/a"), None);
    }
}
