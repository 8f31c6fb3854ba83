//! `hutch new --clone URL [--clone-dir DIR]`: a git repository cloned into the new VM at its
//! first boot, with the image's own git, as the image's user. A create whose clone fails is
//! undone (no half-made VM), with git's message.

use super::Service;
use crate::agent::ExecEvent;
use crate::auth::Caller;
use crate::error::ApiError;
use hutch_core::api::{CreateVm, ExecVm};
use hutch_core::Vm;
use std::sync::Arc;
use std::time::Duration;

/// Longest a clone may take.
const CLONE_TIMEOUT: Duration = Duration::from_secs(600);
/// git's output kept for the error message.
const MAX_OUTPUT: usize = 4096;

/// Checks `--clone` and `--clone-dir`; the URL and the directory to clone into.
pub fn clone_target(req: &CreateVm, workdir: &str) -> Result<Option<(String, String)>, ApiError> {
    let Some(url) = &req.clone else {
        if req.clone_dir.is_some() {
            return Err(ApiError::Invalid("--clone-dir needs --clone".into()));
        }
        return Ok(None);
    };
    let scheme_ok = ["https://", "http://", "git://", "ssh://"]
        .iter()
        .any(|s| url.starts_with(s))
        || (url.contains('@') && url.contains(':') && !url.contains("://"));
    if url.len() > 2048
        || !scheme_ok
        || url.starts_with('-')
        // `transport::address` runs a remote helper (git's `ext::` runs commands).
        || url.contains("::")
        || url.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ApiError::Invalid(format!(
            "--clone {:?}: a git URL (https://, http://, git://, ssh:// or user@host:path)",
            hutch_core::clean_text(url)
        )));
    }
    let repo: String = url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("")
        .trim_end_matches(".git")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .collect();
    let repo = if repo.is_empty() || repo.starts_with('.') {
        "repo".to_string()
    } else {
        repo
    };
    let dir = match &req.clone_dir {
        Some(d) => d.clone(),
        None if !workdir.is_empty() && workdir != "/" => {
            format!("{}/{repo}", workdir.trim_end_matches('/'))
        }
        None => format!("/root/{repo}"),
    };
    if !dir.starts_with('/')
        || dir.len() > 1024
        || dir.split('/').any(|c| c == "..")
        || dir.chars().any(|c| c.is_control())
    {
        return Err(ApiError::Invalid(format!(
            "--clone-dir {:?}: an absolute path without ..",
            hutch_core::clean_text(&dir)
        )));
    }
    Ok(Some((url.clone(), dir)))
}

impl Service {
    /// Runs `argv` in `vm` to its end; exit code and output (bounded).
    async fn run_to_end(
        self: &Arc<Self>,
        caller: &Caller,
        vm: &Vm,
        argv: &[&str],
    ) -> Result<(i32, String), ApiError> {
        let mut s = self
            .exec(
                caller,
                &hutch_core::render::display_name(vm, caller.owner().as_deref()),
                ExecVm {
                    argv: argv.iter().map(|a| a.to_string()).collect(),
                    timeout_secs: Some(CLONE_TIMEOUT.as_secs()),
                    ..Default::default()
                },
            )
            .await?;
        let mut out = Vec::new();
        loop {
            match s.next().await? {
                Some(ExecEvent::Stdout(b) | ExecEvent::Stderr(b)) => {
                    let room = MAX_OUTPUT.saturating_sub(out.len());
                    out.extend_from_slice(&b[..b.len().min(room)]);
                }
                Some(ExecEvent::Exited {
                    code, timed_out, ..
                }) => {
                    let text = hutch_core::clean_text(String::from_utf8_lossy(&out).trim());
                    let code = if timed_out { 124 } else { code.unwrap_or(-1) };
                    return Ok((code, text));
                }
                Some(_) => {}
                None => {
                    return Err(ApiError::Internal(
                        "the command's stream ended early".into(),
                    ))
                }
            }
        }
    }

    /// Clones `url` into `dir` in the just-booted `vm`.
    pub(crate) async fn clone_repo(
        self: &Arc<Self>,
        caller: &Caller,
        vm: &Vm,
        url: &str,
        dir: &str,
    ) -> Result<(), ApiError> {
        let (code, _) = self
            .run_to_end(caller, vm, &["sh", "-c", "command -v git"])
            .await?;
        if code != 0 {
            return Err(ApiError::Invalid(format!(
                "image {} has no git, which --clone needs",
                vm.image
            )));
        }
        let (code, out) = self
            .run_to_end(caller, vm, &["git", "clone", "--", url, dir])
            .await?;
        if code != 0 {
            return Err(ApiError::Invalid(format!(
                "git clone {url} failed (exit {code}): {out}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, dir: Option<&str>) -> Result<Option<(String, String)>, ApiError> {
        let req = CreateVm {
            clone: Some(url.into()),
            clone_dir: dir.map(str::to_string),
            ..Default::default()
        };
        clone_target(&req, "/tmp")
    }

    #[test]
    fn urls_and_dirs() {
        let ok = target("https://example.com/org/repo.git", None).unwrap();
        assert_eq!(
            ok,
            Some((
                "https://example.com/org/repo.git".into(),
                "/tmp/repo".into()
            ))
        );
        assert_eq!(
            target("git@host:org/x.git", Some("/src/x"))
                .unwrap()
                .unwrap()
                .1,
            "/src/x"
        );
        // Hostile: options, other transports, remote helpers, files, whitespace, control
        // characters, long URLs; relative or escaping directories.
        for bad in [
            "--upload-pack=touch /x",
            "-u x",
            "ext::sh -c touch% /x",
            "ext::sh@x:y",
            "fd::3",
            "file:///etc",
            "/etc/passwd",
            "https://example.com/a b",
            "https://example.com/a\nb",
            "",
        ] {
            assert!(target(bad, None).is_err(), "{bad:?}");
        }
        assert!(target(&format!("https://e.com/{}", "a".repeat(3000)), None).is_err());
        for dir in ["relative", "/a/../../etc", "/a/\u{1b}b"] {
            assert!(target("https://e.com/r", Some(dir)).is_err(), "{dir:?}");
        }
        // A repository name that is only dots or odd characters gets a plain one.
        assert_eq!(
            target("https://e.com/..", None).unwrap().unwrap().1,
            "/tmp/repo"
        );
        let req = CreateVm {
            clone_dir: Some("/x".into()),
            ..Default::default()
        };
        assert!(
            clone_target(&req, "/").is_err(),
            "--clone-dir without --clone"
        );
    }
}
