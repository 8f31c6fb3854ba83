//! The fake agent's directory watches: the events the real agent reports for the changes made
//! through the fake's own operations (fs requests, file writes, `put_file`), named relative to
//! the watched directory. What the fake reports for one operation:
//!
//! - `mkdir`, `symlink`: `create`; `remove`, `rmdir`: `remove`; `chmod`: `chmod`;
//! - `rename`: `rename` of the old name, then `create` of the new (as fsnotify and the agent);
//! - a file write: `create` of each directory it made and of a new file, then one `write`.
//!
//! Removing the watched directory ends its watch with `not_found`, as in the agent; renaming it
//! leaves the fake's watch on the old path. Events wait in an unbounded channel (the fake is for
//! tests; the real agent bounds its backlog).

use super::super::AgentError;
use super::fs::{os_error, parent, Node, Tree};
use super::Peer;
use hutch_proto::watch::MAX_WATCH_STREAMS;
use hutch_proto::{ErrorCode, FsEvent, FsEventKind, FsRequest, Response};

/// One watch: the normalized path of its directory and its stream.
struct Watch {
    dir: String,
    recursive: bool,
    peer: Peer,
}

/// The watches of one fake agent.
#[derive(Default)]
pub(super) struct Watchers {
    list: Vec<Watch>,
}

/// The events an operation makes if it succeeds: absolute paths and kinds.
pub(super) type Planned = Vec<(String, FsEventKind)>;

/// What `req` will report, computed before it runs.
pub(super) fn planned(tree: &Tree, req: &FsRequest) -> Planned {
    use FsEventKind::*;
    let at = |p: &str, follow: bool, kind: FsEventKind| {
        tree.resolve(p, follow)
            .map(|p| vec![(p, kind)])
            .unwrap_or_default()
    };
    match req {
        FsRequest::Mkdir { path, .. } => at(path, false, Create),
        FsRequest::Symlink { link, .. } => at(link, false, Create),
        FsRequest::Remove { path } | FsRequest::Rmdir { path } => at(path, false, Remove),
        FsRequest::Chmod { path, .. } => at(path, true, Chmod),
        FsRequest::Rename { from, to } => {
            let mut v = at(from, false, Rename);
            v.extend(at(to, false, Create));
            v
        }
        FsRequest::Stat { .. }
        | FsRequest::ReadDir { .. }
        | FsRequest::Realpath { .. }
        | FsRequest::Readlink { .. } => Vec::new(),
    }
}

/// What a write of `path` will report: the directories and file it makes, and the write.
pub(super) fn planned_write(tree: &Tree, path: &str, offset: Option<u64>) -> Planned {
    let Ok(p) = tree.resolve(path, true) else {
        return Vec::new();
    };
    let mut made = Vec::new();
    if tree.node(&p, false).is_err() {
        made.push((p.clone(), FsEventKind::Create));
        // Without an offset the agent makes the missing parents too.
        let mut d = parent(&p).filter(|_| offset.is_none());
        while let Some(dir) = d.filter(|d| tree.node(d, false).is_err()) {
            d = parent(&dir);
            made.push((dir, FsEventKind::Create));
        }
    }
    made.reverse();
    made.push((p, FsEventKind::Write));
    made
}

/// `path`'s name as seen from a watch of `dir`.
fn name_in(dir: &str, recursive: bool, path: &str) -> Option<String> {
    let rel = if dir == "/" {
        path.strip_prefix('/')?
    } else {
        path.strip_prefix(dir)?.strip_prefix('/')?
    };
    (!rel.is_empty() && (recursive || !rel.contains('/'))).then(|| rel.to_string())
}

impl Watchers {
    /// A new watch of directory `path`: its stream, answered with `watching`.
    pub(super) fn add(
        &mut self,
        tree: &Tree,
        path: &str,
        recursive: bool,
        peer: Peer,
    ) -> Result<(), AgentError> {
        self.list.retain(|w| !w.peer.out.is_closed());
        let (dir, node) = tree.node(path, true)?;
        if !matches!(node, Node::Dir { .. }) {
            return Err(os_error(ErrorCode::NotADirectory, path));
        }
        if self.list.len() >= MAX_WATCH_STREAMS {
            let msg = format!("the guest already has {MAX_WATCH_STREAMS} directory watches");
            return Err(AgentError::guest(ErrorCode::ResourceExhausted, &msg));
        }
        peer.answer(Response::Watching);
        self.list.push(Watch {
            dir,
            recursive,
            peer,
        });
        Ok(())
    }

    /// Reports what an operation did to every watch that sees it; watches whose stream was
    /// dropped are forgotten.
    pub(super) fn notify(&mut self, events: &Planned) {
        self.list.retain(|w| {
            for (path, kind) in events {
                if *path == w.dir && *kind == FsEventKind::Remove {
                    w.peer.answer(Response::Error {
                        code: ErrorCode::NotFound,
                        message: format!("{}: the watched directory is gone", w.dir),
                    });
                    return false;
                }
                if let Some(name) = name_in(&w.dir, w.recursive, path) {
                    w.peer
                        .answer(Response::FsEvent(FsEvent { name, kind: *kind }));
                }
            }
            !w.peer.out.is_closed()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_seen_from_a_watch() {
        assert_eq!(name_in("/", false, "/a"), Some("a".into()));
        assert_eq!(name_in("/", false, "/a/b"), None);
        assert_eq!(name_in("/", true, "/a/b"), Some("a/b".into()));
        assert_eq!(name_in("/root", false, "/root/x"), Some("x".into()));
        assert_eq!(name_in("/root", true, "/root/x/y"), Some("x/y".into()));
        assert_eq!(name_in("/root", true, "/rootx/y"), None);
        assert_eq!(name_in("/root", true, "/root"), None);
    }

    #[test]
    fn a_write_reports_what_it_makes() {
        use FsEventKind::*;
        let mut t = Tree::default();
        let got = planned_write(&t, "/root/a/b/f", None);
        let want = [
            ("/root/a", Create),
            ("/root/a/b", Create),
            ("/root/a/b/f", Create),
            ("/root/a/b/f", Write),
        ];
        assert_eq!(got, want.map(|(p, k)| (p.to_string(), k)));
        t.write("/root/a/b/f", None, None, b"x").unwrap();
        let got = planned_write(&t, "/root/a/b/f", Some(1));
        assert_eq!(got, vec![("/root/a/b/f".to_string(), Write)]);
    }
}
