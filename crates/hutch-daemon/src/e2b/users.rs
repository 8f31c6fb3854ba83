//! E2B's users (`user` and `root`) mapped to the image's accounts, read from the guest's
//! /etc/passwd and /etc/group (cached for a short while per VM).

use super::connect::{Code, RpcError};
use crate::auth::Caller;
use crate::service::Service;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a VM's account table is trusted before it is read again.
const FRESH: Duration = Duration::from_secs(30);
/// Largest /etc/passwd or /etc/group read.
const MAX_TABLE: u64 = 1 << 20;

/// One account of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// The guest's accounts and groups.
#[derive(Debug, Default)]
pub struct Table {
    pub users: Vec<Account>,
    pub groups: HashMap<u32, String>,
}

impl Table {
    pub fn parse(passwd: &str, group: &str) -> Table {
        let users = passwd
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 7).then_some(())?;
                Some(Account {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_string(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
            })
            .collect();
        Table { users, groups }
    }

    pub fn user_name(&self, uid: u32) -> String {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map(|u| u.name.clone())
            .unwrap_or_else(|| uid.to_string())
    }

    pub fn group_name(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }

    /// The account an E2B username stands for. `root` is uid 0. `user` is the image's
    /// account named `user` if it has one, else the image's own user (its config's `User`),
    /// else root. No username (newer SDKs leave it to envd) is the same as `user`.
    pub fn resolve(&self, username: Option<&str>, image_user: &str) -> Result<Account, RpcError> {
        let by_name = |n: &str| self.users.iter().find(|u| u.name == n).cloned();
        let root = || Account {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
        };
        match username.unwrap_or("user") {
            "root" => Ok(by_name("root").unwrap_or_else(root)),
            "user" => Ok(by_name("user")
                .or_else(|| {
                    let u = image_user.split(':').next().unwrap_or("");
                    by_name(u).or_else(|| {
                        let uid: u32 = u.parse().ok()?;
                        self.users.iter().find(|a| a.uid == uid).cloned()
                    })
                })
                .unwrap_or_else(root)),
            other => Err(RpcError::new(
                Code::Unauthenticated,
                format!("invalid user {other:?}: E2B users are user and root"),
            )),
        }
    }
}

/// Account tables per VM id.
#[derive(Default)]
pub struct Cache {
    tables: Mutex<HashMap<String, (Instant, Arc<Table>)>>,
}

impl Cache {
    /// The account table of `caller`'s VM `name` (id `vm_id`).
    pub async fn of(
        &self,
        m: &Arc<Service>,
        caller: &Caller,
        name: &str,
        vm_id: &str,
    ) -> Result<Arc<Table>, RpcError> {
        if let Some((at, t)) = self.lock().get(vm_id) {
            if at.elapsed() < FRESH {
                return Ok(t.clone());
            }
        }
        let read = |path: &'static str| async move {
            match m.read_file(caller, name, path, MAX_TABLE).await {
                Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
                Err(crate::error::ApiError::NotFound { .. }) => Ok(String::new()),
                Err(e) => Err(RpcError::from(e)),
            }
        };
        let t = Arc::new(Table::parse(
            &read("/etc/passwd").await?,
            &read("/etc/group").await?,
        ));
        let mut all = self.lock();
        // Bounded: entries of VMs long gone are dropped when the cache grows.
        if all.len() > 4096 {
            all.retain(|_, (at, _)| at.elapsed() < FRESH);
        }
        all.insert(vm_id.to_string(), (Instant::now(), t.clone()));
        Ok(t)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Arc<Table>)>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The username of an envd request: `Authorization: Basic base64(user:)`, if any.
pub fn basic_user(headers: &axum::http::HeaderMap) -> Result<Option<String>, RpcError> {
    use base64::Engine;
    let Some(v) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || RpcError::new(Code::Unauthenticated, "malformed Authorization header");
    let v = v.to_str().map_err(|_| bad())?;
    let b64 = v.strip_prefix("Basic ").ok_or_else(bad)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    let user = s.split(':').next().unwrap_or("");
    Ok((!user.is_empty()).then(|| user.to_string()))
}

/// `path` made absolute against `home` (E2B resolves relative paths there); `~` and `~/x` too.
pub fn absolute(path: &str, home: &str) -> Result<String, RpcError> {
    if path.contains('\0') || path.len() > 4096 {
        return Err(RpcError::invalid("path is too long or has a NUL byte"));
    }
    let p = if path.starts_with('/') {
        path.to_string()
    } else if path == "~" || path.is_empty() {
        home.to_string()
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("{}/{rest}", home.trim_end_matches('/'))
    } else {
        format!("{}/{path}", home.trim_end_matches('/'))
    };
    Ok(normalize(&p))
}

/// Removes `.`, `..` and repeated slashes lexically (the guest resolves symlinks itself).
pub fn normalize(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/sh\n";

    #[test]
    fn users_map_to_the_images_accounts() {
        let t = Table::parse(PASSWD, "root:x:0:\nuser:x:1000:\n");
        assert_eq!(t.resolve(Some("root"), "").unwrap().uid, 0);
        assert_eq!(t.resolve(Some("user"), "").unwrap().home, "/home/user");
        assert_eq!(t.resolve(None, "").unwrap().uid, 1000);
        assert!(t.resolve(Some("admin"), "").is_err());
        assert_eq!(t.group_name(1000), "user");
        assert_eq!(t.user_name(42), "42");
        // An image without `user`: its configured user, else root.
        let t = Table::parse(
            "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
            "",
        );
        assert_eq!(t.resolve(Some("user"), "nobody").unwrap().uid, 65534);
        assert_eq!(t.resolve(Some("user"), "65534:65534").unwrap().uid, 65534);
        assert_eq!(t.resolve(Some("user"), "").unwrap().uid, 0);
    }

    #[test]
    fn paths_resolve_against_home() {
        assert_eq!(absolute("a/b", "/home/user").unwrap(), "/home/user/a/b");
        assert_eq!(absolute("~/x", "/root").unwrap(), "/root/x");
        assert_eq!(absolute("/tmp/../etc//x/.", "/root").unwrap(), "/etc/x");
        assert_eq!(absolute("../../..", "/home/user").unwrap(), "/");
        assert!(absolute("a\0b", "/").is_err());
    }

    #[test]
    fn basic_auth_names_the_user() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(basic_user(&h).unwrap(), None);
        h.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(basic_user(&h).unwrap().as_deref(), Some("root"));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert!(basic_user(&h).is_err());
    }
}
