//! The `watch` request: a stream of changes in one guest directory (and, for a recursive watch,
//! every directory under it), for E2B's `WatchDir` and its polled watchers.
//!
//! The host sends `Request::Watch`; the agent answers `Response::Watching` once its watches are
//! set (or `Response::Error`), then one `Response::FsEvent` per change until the host sends
//! `Request::Cancel` or the connection ends. Events are flow-controlled like data frames: each
//! `fs_event` response spends its payload length of the stream's agent -> host credit, and the
//! host returns credit as its consumer takes them (see [`crate::credit`]). A host that stops
//! reading thus stalls only its watch, whose agent keeps a bounded backlog (see the agent's
//! `watch` module) instead of sending past the window.

use serde::{Deserialize, Serialize};

/// Directories one watch stream may watch at most (the watched one and those under it); a
/// recursive watch of a bigger tree is refused, and one that grows past it ends, with
/// `resource_exhausted`.
pub const MAX_WATCHES: usize = 8192;
/// Watch streams an agent serves at once; more are refused with `resource_exhausted`.
pub const MAX_WATCH_STREAMS: usize = 64;

/// What happened to an entry of a watched directory: E2B's event types (those of Go's
/// fsnotify, which E2B's envd uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsEventKind {
    /// The entry appeared: made, or moved in (`IN_CREATE`, `IN_MOVED_TO`).
    Create,
    /// The file's contents changed (`IN_MODIFY`, and `IN_CLOSE_WRITE` after unreported
    /// writes); repeated writes to one file are coalesced.
    Write,
    /// The entry was deleted (`IN_DELETE`).
    Remove,
    /// The entry was moved away or renamed: this is its old name; the new one, when it is in
    /// the watch, comes as a `create` (`IN_MOVED_FROM`).
    Rename,
    /// Its permissions, owner, timestamps or other attributes changed (`IN_ATTRIB`).
    Chmod,
    /// A kind this build does not know (a newer agent); never sent by this one.
    #[serde(other)]
    Unknown,
}

/// One change in a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FsEvent {
    /// The entry's path relative to the watched directory: a plain name, or for a recursive
    /// watch a path like `sub/file.txt`. Bytes that are not UTF-8 are replaced with U+FFFD.
    pub name: String,
    pub kind: FsEventKind,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Frame, Kind, Request, Response};

    #[test]
    fn watch_messages_roundtrip_with_their_wire_shape() {
        let req = Request::Watch {
            path: "/root/w".into(),
            recursive: true,
        };
        let s = serde_json::to_string(&req).unwrap();
        assert_eq!(s, r#"{"op":"watch","path":"/root/w","recursive":true}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), req);
        // `recursive` may be left out.
        let r: Request = serde_json::from_str(r#"{"op":"watch","path":"/x"}"#).unwrap();
        assert_eq!(
            r,
            Request::Watch {
                path: "/x".into(),
                recursive: false
            }
        );
        let cases = [
            (Response::Watching, r#"{"type":"watching"}"#),
            (
                Response::FsEvent(FsEvent {
                    name: "sub/file.txt".into(),
                    kind: FsEventKind::Write,
                }),
                r#"{"type":"fs_event","name":"sub/file.txt","kind":"write"}"#,
            ),
        ];
        for (r, want) in cases {
            let f = Frame::json(Kind::Response, 3, &r);
            assert_eq!(std::str::from_utf8(&f.payload).unwrap(), want);
            assert_eq!(f.parse::<Response>("response").unwrap(), r);
        }
        for k in [
            FsEventKind::Create,
            FsEventKind::Write,
            FsEventKind::Remove,
            FsEventKind::Rename,
            FsEventKind::Chmod,
        ] {
            let s = serde_json::to_string(&k).unwrap();
            assert_eq!(serde_json::from_str::<FsEventKind>(&s).unwrap(), k);
        }
    }

    #[test]
    fn an_event_kind_from_a_newer_agent_still_decodes() {
        let r: Response =
            serde_json::from_str(r#"{"type":"fs_event","name":"a","kind":"truncate"}"#).unwrap();
        assert_eq!(
            r,
            Response::FsEvent(FsEvent {
                name: "a".into(),
                kind: FsEventKind::Unknown
            })
        );
    }

    #[test]
    fn only_watch_answers_leave_a_stream_open_or_spend_credit() {
        let event = Response::FsEvent(FsEvent {
            name: "a".into(),
            kind: FsEventKind::Create,
        });
        assert!(!event.ends_stream() && event.counts_against_window());
        assert!(!Response::Watching.ends_stream());
        assert!(!Response::Watching.counts_against_window());
        assert!(!Response::Started { pid: 1 }.ends_stream());
        for r in [
            Response::Done { bytes: 0 },
            Response::Error {
                code: crate::ErrorCode::NotFound,
                message: String::new(),
            },
        ] {
            assert!(r.ends_stream() && !r.counts_against_window());
        }
    }
}
