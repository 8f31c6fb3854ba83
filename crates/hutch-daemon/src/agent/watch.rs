//! [`WatchStream`]: the events of a directory watch in the guest
//! ([`Agent::watch`](super::Agent::watch)).
//!
//! The agent answers a `watch` request with `watching` once its inotify watches are set (or an
//! `error`), then sends one `fs_event` per change until the host cancels. Events spend the
//! stream's credit like file data, which the host returns as [`WatchStream::next`] takes them:
//! a caller that stops reading stalls its own watch in the guest (which then coalesces and, past
//! its bound, drops events) and holds no more than one window of events here.

use super::stream::{unexpected, Incoming, Transport};
use super::AgentError;
use hutch_proto::{FsEvent, Response};
use std::sync::Arc;

/// A directory watch in the guest: see the module doc. Dropping it cancels the watch (the agent
/// removes its inotify watches).
pub struct WatchStream {
    t: Arc<dyn Transport>,
    done: bool,
}

impl WatchStream {
    /// The watch on `t`, once the agent says it is set: an error if it refused (not found, not a
    /// directory, permission, too many watches).
    pub(crate) async fn established(t: Arc<dyn Transport>) -> Result<WatchStream, AgentError> {
        loop {
            match t.recv().await {
                Some(Incoming::Answer(Response::Watching)) => {
                    return Ok(WatchStream { t, done: false })
                }
                Some(Incoming::Answer(Response::Error { code, message })) => {
                    return Err(AgentError::guest(code, &message))
                }
                Some(Incoming::Answer(other)) => return Err(unexpected(&other, "watching")),
                // A watch has no data; whatever a guest sends there is dropped.
                Some(Incoming::Stdout(_) | Incoming::Stderr(_)) => {}
                None => return Err(AgentError::Lost),
            }
        }
    }

    /// The next change. It waits as long as nothing changes: bound it with
    /// [`within`](super::within) or a `select!` (it is cancel-safe). An error ends the stream:
    /// the agent ended the watch ([`AgentError::Guest`]: `not_found` when the watched directory
    /// was removed, `resource_exhausted` when a recursive watch outgrew its limit), the
    /// connection was lost ([`AgentError::Lost`]; the agent's watch is gone with it), or the
    /// agent answered out of turn ([`AgentError::Proto`]). `Ok(None)` after such an end.
    ///
    /// Kinds are [`FsEventKind`](hutch_proto::FsEventKind)s; `Unknown` (a newer agent's kind)
    /// is passed on for the caller to skip.
    pub async fn next(&mut self) -> Result<Option<FsEvent>, AgentError> {
        while !self.done {
            let item = self.t.recv().await;
            let r = match item {
                Some(Incoming::Answer(Response::FsEvent(e))) => return Ok(Some(e)),
                Some(Incoming::Stdout(_) | Incoming::Stderr(_)) => continue,
                Some(Incoming::Answer(Response::Error { code, message })) => {
                    Err(AgentError::guest(code, &message))
                }
                Some(Incoming::Answer(other)) => Err(unexpected(&other, "a watch event")),
                None => Err(AgentError::Lost),
            };
            self.done = true;
            return r;
        }
        Ok(None)
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.t.close();
    }
}
