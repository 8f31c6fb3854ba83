//! The fake agent's filesystem: a map of normalized absolute paths to files, directories and
//! symlinks, with the operations of the protocol and the error codes and messages of the real
//! agent. Paths are resolved lexically; a symlink is followed only as the last component.

use super::super::{AgentError, DirPage, FsAnswer};
use hutch_proto::{DirEntry, ErrorCode, FileAttr, FsRequest};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub(super) enum Node {
    File { data: Vec<u8>, mode: u32 },
    Dir { mode: u32 },
    Link { target: String },
}

impl Node {
    fn attr(&self) -> FileAttr {
        let (size, mode) = match self {
            Node::File { data, mode } => (data.len() as u64, 0o100000 | mode),
            Node::Dir { mode } => (4096, 0o040000 | mode),
            Node::Link { target } => (target.len() as u64, 0o120777),
        };
        FileAttr {
            size,
            mode,
            ..FileAttr::default()
        }
    }
}

/// The whole filesystem.
pub(super) struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Default for Tree {
    /// `/`, `/root` and `/tmp`.
    fn default() -> Tree {
        let mut nodes = BTreeMap::new();
        for d in ["/", "/root", "/tmp"] {
            nodes.insert(d.to_string(), Node::Dir { mode: 0o755 });
        }
        Tree { nodes }
    }
}

/// The error the real agent gives for `code` (its strerror text).
pub(super) fn os_error(code: ErrorCode, path: &str) -> AgentError {
    let text = match code {
        ErrorCode::NotFound => "No such file or directory (os error 2)",
        ErrorCode::Exists => "File exists (os error 17)",
        ErrorCode::NotADirectory => "Not a directory (os error 20)",
        ErrorCode::IsDirectory => "Is a directory (os error 21)",
        ErrorCode::NotEmpty => "Directory not empty (os error 39)",
        ErrorCode::InvalidArgument => "Invalid argument (os error 22)",
        _ => "Input/output error (os error 5)",
    };
    AgentError::guest(code, &format!("{path}: {text}"))
}

/// `p` made absolute and free of `.`, `..` and repeated slashes; None if it is relative.
fn normalize(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
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
    Some(format!("/{}", parts.join("/")))
}

pub(super) fn parent(p: &str) -> Option<String> {
    (p != "/").then(|| match p.rfind('/') {
        Some(0) | None => "/".to_string(),
        Some(i) => p[..i].to_string(),
    })
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Tree {
    /// The normalized path, with a final symlink followed when `follow`.
    pub(super) fn resolve(&self, path: &str, follow: bool) -> Result<String, AgentError> {
        let mut p = normalize(path).ok_or_else(|| os_error(ErrorCode::InvalidArgument, path))?;
        if path.contains('\0') {
            return Err(os_error(ErrorCode::InvalidArgument, path));
        }
        for _ in 0..8 {
            match self.nodes.get(&p) {
                Some(Node::Link { target }) if follow => {
                    let base = parent(&p).unwrap_or_else(|| "/".into());
                    let t = if target.starts_with('/') {
                        target.clone()
                    } else {
                        join(&base, target)
                    };
                    p = normalize(&t).unwrap_or_else(|| "/".into());
                }
                _ => return Ok(p),
            }
        }
        Err(AgentError::guest(
            ErrorCode::NotADirectory,
            &format!("{path}: Too many levels of symbolic links (os error 40)"),
        ))
    }

    pub(super) fn node(&self, path: &str, follow: bool) -> Result<(String, &Node), AgentError> {
        let p = self.resolve(path, follow)?;
        match self.nodes.get(&p) {
            Some(n) => Ok((p, n)),
            None => Err(os_error(ErrorCode::NotFound, path)),
        }
    }

    /// Checks that the parent of `p` is a directory.
    fn parent_dir(&self, p: &str, shown: &str) -> Result<(), AgentError> {
        match parent(p).and_then(|d| self.nodes.get(&d)) {
            Some(Node::Dir { .. }) => Ok(()),
            Some(_) => Err(os_error(ErrorCode::NotADirectory, shown)),
            None => Err(os_error(ErrorCode::NotFound, shown)),
        }
    }

    fn children(&self, dir: &str) -> Vec<String> {
        let prefix = if dir == "/" {
            "/".to_string()
        } else {
            format!("{dir}/")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| *k != "/" && !k[prefix.len()..].contains('/'))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub(super) fn fs(&mut self, req: FsRequest) -> Result<FsAnswer, AgentError> {
        Ok(match req {
            FsRequest::Stat { path, follow } => FsAnswer::Attr(self.node(&path, follow)?.1.attr()),
            FsRequest::ReadDir { path, skip } => {
                let (p, n) = self.node(&path, true)?;
                if !matches!(n, Node::Dir { .. }) {
                    return Err(os_error(ErrorCode::NotADirectory, &path));
                }
                let all = self.children(&p);
                let from = usize::try_from(skip).unwrap_or(usize::MAX).min(all.len());
                let page: Vec<DirEntry> = all[from..]
                    .iter()
                    .take(hutch_proto::DIR_PAGE)
                    .filter_map(|k| {
                        let attr = self.nodes.get(k)?.attr();
                        let name = k.rsplit('/').next().unwrap_or(k).to_string();
                        Some(DirEntry { name, attr })
                    })
                    .collect();
                let next = (from + page.len()) as u64;
                FsAnswer::Dir(DirPage {
                    more: (next as usize) < all.len(),
                    entries: page,
                    next,
                })
            }
            FsRequest::Mkdir { path, mode } => {
                let p = self.resolve(&path, false)?;
                if self.nodes.contains_key(&p) {
                    return Err(os_error(ErrorCode::Exists, &path));
                }
                self.parent_dir(&p, &path)?;
                let mode = mode & 0o7777;
                self.nodes.insert(p, Node::Dir { mode });
                FsAnswer::Done
            }
            FsRequest::Remove { path } => {
                let (p, n) = self.node(&path, false)?;
                if matches!(n, Node::Dir { .. }) {
                    return Err(os_error(ErrorCode::IsDirectory, &path));
                }
                self.nodes.remove(&p);
                FsAnswer::Done
            }
            FsRequest::Rmdir { path } => {
                let (p, n) = self.node(&path, false)?;
                if !matches!(n, Node::Dir { .. }) {
                    return Err(os_error(ErrorCode::NotADirectory, &path));
                }
                if !self.children(&p).is_empty() {
                    return Err(os_error(ErrorCode::NotEmpty, &path));
                }
                self.nodes.remove(&p);
                FsAnswer::Done
            }
            FsRequest::Rename { from, to } => {
                let (src, _) = self.node(&from, false)?;
                let dst = self.resolve(&to, false)?;
                self.parent_dir(&dst, &to)?;
                if dst.starts_with(&format!("{src}/")) {
                    return Err(os_error(ErrorCode::InvalidArgument, &to));
                }
                let moved: Vec<String> = self
                    .nodes
                    .keys()
                    .filter(|k| **k == src || k.starts_with(&format!("{src}/")))
                    .cloned()
                    .collect();
                for k in moved {
                    if let Some(n) = self.nodes.remove(&k) {
                        self.nodes.insert(format!("{dst}{}", &k[src.len()..]), n);
                    }
                }
                FsAnswer::Done
            }
            FsRequest::Realpath { path } => {
                let (p, _) = self.node(&path, true)?;
                FsAnswer::Path(p)
            }
            FsRequest::Readlink { path } => match self.node(&path, false)? {
                (_, Node::Link { target }) => FsAnswer::Path(target.clone()),
                _ => return Err(os_error(ErrorCode::InvalidArgument, &path)),
            },
            FsRequest::Symlink { target, link } => {
                let p = self.resolve(&link, false)?;
                if self.nodes.contains_key(&p) {
                    return Err(os_error(ErrorCode::Exists, &link));
                }
                self.parent_dir(&p, &link)?;
                self.nodes.insert(p, Node::Link { target });
                FsAnswer::Done
            }
            FsRequest::Chmod { path, mode } => {
                let p = self.node(&path, true)?.0;
                if let Some(Node::File { mode: m, .. } | Node::Dir { mode: m }) =
                    self.nodes.get_mut(&p)
                {
                    *m = mode & 0o7777;
                }
                FsAnswer::Done
            }
        })
    }

    /// Applies a finished write.
    pub(super) fn write(
        &mut self,
        path: &str,
        mode: Option<u32>,
        offset: Option<u64>,
        data: &[u8],
    ) -> Result<u64, AgentError> {
        let p = self.resolve(path, true)?;
        if matches!(self.nodes.get(&p), Some(Node::Dir { .. })) {
            return Err(os_error(ErrorCode::IsDirectory, path));
        }
        let mode = mode.unwrap_or(0o644) & 0o7777;
        match offset {
            None => {
                // Parents are made, as the agent does.
                let mut missing = Vec::new();
                let mut d = parent(&p);
                while let Some(dir) = d {
                    match self.nodes.get(&dir) {
                        Some(Node::Dir { .. }) => break,
                        Some(_) => return Err(os_error(ErrorCode::NotADirectory, path)),
                        None => {
                            d = parent(&dir);
                            missing.push(dir);
                        }
                    }
                }
                for dir in missing {
                    self.nodes.insert(dir, Node::Dir { mode: 0o755 });
                }
                let data = data.to_vec();
                self.nodes.insert(p, Node::File { data, mode });
            }
            Some(off) => {
                self.parent_dir(&p, path)?;
                let off = usize::try_from(off)
                    .ok()
                    .filter(|o| o.saturating_add(data.len()) <= 1 << 30)
                    .ok_or_else(|| os_error(ErrorCode::TooLarge, path))?;
                let n = self.nodes.entry(p).or_insert(Node::File {
                    data: Vec::new(),
                    mode,
                });
                if let Node::File { data: d, .. } = n {
                    if d.len() < off + data.len() {
                        d.resize(off + data.len(), 0);
                    }
                    d[off..off + data.len()].copy_from_slice(data);
                }
            }
        }
        Ok(data.len() as u64)
    }
}
