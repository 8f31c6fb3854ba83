//! The VM lifecycle: every state a VM can be in, every event that moves it, and the one
//! transition function ([`VmState::on`]) that every state change in hutch goes through.
//!
//! ```text
//!  create ─► creating ──booted──► running ──stop──► stopping ──halted──► stopped
//!               │                  ▲ │ │                                   │ ▲
//!               │                  │ │ └─pause─► pausing ─saved─► paused ──┼─┘ stop
//!               │                  │ │            (done: runs on)  │ resume │
//!               │                  │ │                             ▼        │ start
//!               │                  ├─┼──booted── resuming ◄────────┘        ▼
//!               │                  │ │ (boot-failed: back to paused)     starting
//!               │                  └─┼──────────────booted──────────────────┤
//!               │ boot-failed        │ exited                               │ boot-failed,
//!               ▼                    ▼                                      │ exited
//!             failed ◄───────────────┴──────────────────────────────────────┘
//!               │  start ──► starting
//!  running ─snapshot─► snapshotting ─done─► running
//!  running|paused|stopped ─migrate─► migrating ─done|saved|halted─► running|paused|stopped
//!  delete: every state but creating and deleting ─► deleting ─► (record gone)
//! ```
//!
//! In words: `creating` becomes `running` when the guest agent answers, or `failed` when the boot
//! does not finish (a create then undoes itself: no record, disk or process remains). `start`
//! takes a `stopped` or `failed` VM to `starting`, then `running` or `failed`. `stop` takes any VM
//! with a process (`starting`, `running`, `paused`) — and a `failed` one, to acknowledge it and
//! stop any restart policy — to `stopping`, then `stopped`. An unexpected QEMU exit (`exited`)
//! makes a VM `failed`, with the reason; during a stop it is just the stop finishing. `delete`
//! works from every state except `creating` (the create is still deciding) and `deleting`.
//! `failed` always carries a reason ([`crate::Vm::reason`]).
//!
//! `pause` saves a running VM's state to files and ends its QEMU (`pausing`, then `paused`: no
//! process, no memory held); `resume` starts a new QEMU from that state (`resuming`, then
//! `running`; if it cannot, the VM stays `paused` with its state intact). `stop` of a paused
//! VM discards the saved state. `snapshot` (and fork) keeps a running VM's state as a
//! snapshot: the VM is `snapshotting` while its QEMU is replaced by one restored from it.
//!
//! Concurrency follows from the table: a lifecycle operation checks its event against the VM's
//! current state before it waits for anything, so a second operation on a VM that is in a
//! transitional state (`creating`, `starting`, `stopping`, `deleting`) is refused at once with
//! [`Denied`] (HTTP 409) instead of queueing behind the first.

use serde::{Deserialize, Serialize};

/// Where a VM is in its life (see the module doc for the diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Being made by create or clone: not the VM's yet; undone if hutchd stops meanwhile.
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    /// Its state is being saved, before its QEMU ends.
    Pausing,
    /// Its state is saved in files; it has no process and holds no memory.
    Paused,
    /// A new QEMU is being started from its saved state.
    Resuming,
    /// Its QEMU exited when it should have run, or a start did not finish; `reason` says why.
    Failed,
    /// Being removed; finished if hutchd stops meanwhile.
    Deleting,
    /// A snapshot of it is being taken (its QEMU is replaced by one restored from it).
    Snapshotting,
    /// Reserved: being moved to another node.
    Migrating,
}

/// Everything that moves a VM from one state to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A user (or a restart policy) starts a stopped or failed VM.
    Start,
    /// The guest agent answered: the VM runs.
    Booted,
    /// The VM did not boot (QEMU did not start, exited, or the agent did not answer in time).
    BootFailed(String),
    /// A user stops the VM.
    Stop,
    /// The stop finished: the VM's process is gone.
    Halted,
    /// The VM's QEMU exited without being asked to.
    Exited(String),
    /// A user (or auto-pause) pauses the VM.
    Pause,
    /// Its state is saved and its QEMU is ending.
    Saved,
    /// A user (or a request that needs it) resumes a paused VM.
    Resume,
    Snapshot,
    Migrate,
    /// A snapshot or migration finished (or was abandoned) and the VM runs on.
    Done,
    /// A user deletes the VM.
    Delete,
}

impl Event {
    /// The event's name, as logs and the event stream show it.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::Booted => "booted",
            Event::BootFailed(_) => "boot-failed",
            Event::Stop => "stop",
            Event::Halted => "halted",
            Event::Exited(_) => "exited",
            Event::Pause => "pause",
            Event::Saved => "saved",
            Event::Resume => "resume",
            Event::Snapshot => "snapshot",
            Event::Migrate => "migrate",
            Event::Done => "done",
            Event::Delete => "delete",
        }
    }

    /// Why the VM failed, for the events that make it `failed`.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Event::BootFailed(r) | Event::Exited(r) => Some(r),
            _ => None,
        }
    }
}

/// An event the VM's state does not allow; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", explain(*state, event))]
pub struct Denied {
    pub state: VmState,
    pub event: &'static str,
}

fn explain(state: VmState, event: &str) -> String {
    match (state, event) {
        (VmState::Stopped, "stop") => "is already stopped".into(),
        (VmState::Running, "start") => "is already running".into(),
        (VmState::Paused, "start") => "is paused; resume it".into(),
        (VmState::Paused, "pause") => "is already paused".into(),
        (VmState::Running, "resume") => "is already running".into(),
        (s, "resume") => format!("is {}, not paused", s.as_str()),
        (VmState::Deleting, "delete") => "is already being deleted".into(),
        (VmState::Creating, "delete") => {
            "is still being created; delete it once the create has finished".into()
        }
        (s, "start") => format!("is {}, not stopped", s.as_str()),
        (s, _) => format!("is {}", s.as_str()),
    }
}

impl VmState {
    /// Every state, for tables and metrics.
    pub const ALL: [VmState; 12] = [
        VmState::Creating,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Pausing,
        VmState::Paused,
        VmState::Resuming,
        VmState::Failed,
        VmState::Deleting,
        VmState::Snapshotting,
        VmState::Migrating,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Pausing => "pausing",
            VmState::Paused => "paused",
            VmState::Resuming => "resuming",
            VmState::Failed => "failed",
            VmState::Deleting => "deleting",
            VmState::Snapshotting => "snapshotting",
            VmState::Migrating => "migrating",
        }
    }

    /// The state `event` moves a VM in this state to, or why it may not happen.
    pub fn on(self, event: &Event) -> Result<VmState, Denied> {
        use Event as E;
        use VmState as S;
        let next = match (self, event) {
            (S::Stopped | S::Failed, E::Start) => S::Starting,
            (S::Creating | S::Starting | S::Resuming, E::Booted) => S::Running,
            (S::Creating | S::Starting, E::BootFailed(_)) => S::Failed,
            (S::Starting | S::Running | S::Failed, E::Stop) => S::Stopping,
            // Nothing runs: the saved state is discarded and the next start boots afresh.
            (S::Paused, E::Stop) => S::Stopped,
            (S::Stopping, E::Halted) => S::Stopped,
            (S::Stopping, E::Exited(_)) => S::Stopped,
            (
                S::Creating
                | S::Starting
                | S::Running
                | S::Pausing
                | S::Snapshotting
                | S::Migrating,
                E::Exited(_),
            ) => S::Failed,
            // A resume that did not finish leaves the saved state as it was.
            (S::Resuming, E::BootFailed(_) | E::Exited(_)) => S::Paused,
            // A delete owns the record until it is gone: the process going away is expected.
            (S::Deleting, E::Exited(_) | E::Halted) => S::Deleting,
            (S::Running, E::Pause) => S::Pausing,
            (S::Pausing, E::Saved) => S::Paused,
            (S::Paused, E::Resume) => S::Resuming,
            (S::Running, E::Snapshot) => S::Snapshotting,
            // Running VMs move live; paused and stopped ones move at rest (`hutch drain`).
            (S::Running | S::Paused | S::Stopped, E::Migrate) => S::Migrating,
            // A move at rest ends where it began: saved, or stopped.
            (S::Migrating, E::Saved) => S::Paused,
            (S::Migrating, E::Halted) => S::Stopped,
            // A pause given up (the VM runs on), or a snapshot or migration finished.
            (S::Pausing | S::Snapshotting | S::Migrating, E::Done) => S::Running,
            (S::Creating | S::Deleting, E::Delete) => return Err(self.deny(event)),
            (_, E::Delete) => S::Deleting,
            _ => return Err(self.deny(event)),
        };
        Ok(next)
    }

    fn deny(self, event: &Event) -> Denied {
        Denied {
            state: self,
            event: event.name(),
        }
    }

    /// Whether a VM in this state has (or is getting) a QEMU process.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Creating
                | VmState::Starting
                | VmState::Running
                | VmState::Stopping
                | VmState::Pausing
                | VmState::Resuming
                | VmState::Snapshotting
                | VmState::Migrating
        )
    }

    /// Whether its guest memory counts against the host (admission control).
    pub fn uses_memory(self) -> bool {
        self.has_process() && self != VmState::Creating
    }
}

/// What hutch does when a VM's QEMU exits without being asked to (`hutch new --restart`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it `failed`.
    #[default]
    No,
    /// Start it again when it failed: QEMU crashed or was killed, the boot failed, or the host
    /// went down under it; not when the guest powered itself off cleanly.
    OnFailure,
    /// Start it again whenever it stopped without `hutch stop`, a clean guest power-off included.
    Always,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }

    /// Whether a VM that ended this way is started again. `clean`: the guest powered off by
    /// itself (QEMU exited with status 0); false when the exit status is unknown.
    pub fn restarts(self, clean: bool) -> bool {
        match self {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure => !clean,
            RestartPolicy::Always => true,
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(RestartPolicy::No),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "always" => Ok(RestartPolicy::Always),
            _ => Err(format!(
                "restart policy {s:?}: use no, on-failure or always"
            )),
        }
    }
}

/// One lifecycle event as `hutch events` and `GET /api/v1/events` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmEvent {
    /// Increases by one per event of this hutchd process.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// created, starting, started, stopping, stopped, failed, restarting, deleting, deleted,
    /// paused, resumed.
    pub kind: String,
    /// The VM's name and owner (None: the admin's).
    pub vm: String,
    #[serde(default)]
    pub owner: Option<String>,
    pub id: String,
    /// The VM's state after the event.
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl VmEvent {
    /// The event kind people see for a VM's record going from state `from` to `to`
    /// (`restarting` is told apart by the caller: a start that counts an automatic restart).
    pub fn kind_of(from: VmState, to: VmState) -> &'static str {
        use VmState as S;
        match (from, to) {
            (S::Creating, S::Running) => "created",
            (S::Starting, S::Running) => "started",
            (S::Resuming, S::Running) => "resumed",
            (S::Snapshotting, S::Running) => "snapshotted",
            (_, S::Running) => "running",
            (_, S::Starting) => "starting",
            (_, S::Stopping) => "stopping",
            (_, S::Stopped) => "stopped",
            (_, S::Failed) => "failed",
            (_, S::Deleting) => "deleting",
            (_, S::Paused) => "paused",
            (_, s) => s.as_str(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use VmState as S;

    fn why() -> String {
        "qemu died".into()
    }

    /// Every (state, event) pair that is allowed, and where it leads; everything else is denied.
    fn allowed() -> Vec<(VmState, Event, VmState)> {
        let mut t = vec![
            (S::Stopped, E::Start, S::Starting),
            (S::Failed, E::Start, S::Starting),
            (S::Creating, E::Booted, S::Running),
            (S::Starting, E::Booted, S::Running),
            (S::Resuming, E::Booted, S::Running),
            (S::Resuming, E::BootFailed(why()), S::Paused),
            (S::Resuming, E::Exited(why()), S::Paused),
            (S::Creating, E::BootFailed(why()), S::Failed),
            (S::Starting, E::BootFailed(why()), S::Failed),
            (S::Starting, E::Stop, S::Stopping),
            (S::Running, E::Stop, S::Stopping),
            (S::Paused, E::Stop, S::Stopped),
            (S::Failed, E::Stop, S::Stopping),
            (S::Stopping, E::Halted, S::Stopped),
            (S::Stopping, E::Exited(why()), S::Stopped),
            (S::Creating, E::Exited(why()), S::Failed),
            (S::Starting, E::Exited(why()), S::Failed),
            (S::Running, E::Exited(why()), S::Failed),
            (S::Pausing, E::Exited(why()), S::Failed),
            (S::Snapshotting, E::Exited(why()), S::Failed),
            (S::Migrating, E::Exited(why()), S::Failed),
            (S::Deleting, E::Exited(why()), S::Deleting),
            (S::Deleting, E::Halted, S::Deleting),
            (S::Running, E::Pause, S::Pausing),
            (S::Pausing, E::Saved, S::Paused),
            (S::Pausing, E::Done, S::Running),
            (S::Paused, E::Resume, S::Resuming),
            (S::Running, E::Snapshot, S::Snapshotting),
            (S::Running, E::Migrate, S::Migrating),
            (S::Paused, E::Migrate, S::Migrating),
            (S::Stopped, E::Migrate, S::Migrating),
            (S::Snapshotting, E::Done, S::Running),
            (S::Migrating, E::Done, S::Running),
            (S::Migrating, E::Saved, S::Paused),
            (S::Migrating, E::Halted, S::Stopped),
        ];
        for s in S::ALL {
            if !matches!(s, S::Creating | S::Deleting) {
                t.push((s, E::Delete, S::Deleting));
            }
        }
        t
    }

    fn all_events() -> Vec<Event> {
        vec![
            E::Start,
            E::Booted,
            E::BootFailed(why()),
            E::Stop,
            E::Halted,
            E::Exited(why()),
            E::Pause,
            E::Saved,
            E::Resume,
            E::Snapshot,
            E::Migrate,
            E::Done,
            E::Delete,
        ]
    }

    #[test]
    fn the_whole_table() {
        let allowed = allowed();
        let mut checked = 0;
        for s in S::ALL {
            for e in all_events() {
                let want = allowed
                    .iter()
                    .find(|(from, ev, _)| *from == s && *ev == e)
                    .map(|(_, _, to)| *to);
                match (s.on(&e), want) {
                    (Ok(got), Some(to)) => assert_eq!(got, to, "{s:?} on {e:?}"),
                    (Err(d), None) => {
                        assert_eq!(d.state, s);
                        assert_eq!(d.event, e.name());
                    }
                    (got, want) => panic!("{s:?} on {e:?}: got {got:?}, want {want:?}"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 12 * 13);
    }

    #[test]
    fn the_concurrency_cases_have_one_outcome() {
        // Same-name creates are decided by the store (one insert wins), not here.
        // Delete during create: refused, the create decides.
        assert!(S::Creating.on(&E::Delete).is_err());
        // Start during stop: refused at once.
        let d = S::Stopping.on(&E::Start).unwrap_err();
        assert_eq!(d.to_string(), "is stopping, not stopped");
        // Stop during stop, start during start: refused.
        assert!(S::Stopping.on(&E::Stop).is_err());
        assert!(S::Starting.on(&E::Start).is_err());
        // Stop during exec: the VM stops (exec is not a state); the exec ends with the VM.
        assert_eq!(S::Running.on(&E::Stop), Ok(S::Stopping));
        // QEMU dying while a stop is in progress is the stop finishing, not a failure.
        assert_eq!(S::Stopping.on(&E::Exited(why())), Ok(S::Stopped));
    }

    #[test]
    fn messages_read_well() {
        assert_eq!(
            S::Stopped.on(&E::Stop).unwrap_err().to_string(),
            "is already stopped"
        );
        assert_eq!(
            S::Running.on(&E::Start).unwrap_err().to_string(),
            "is already running"
        );
        assert_eq!(
            S::Deleting.on(&E::Stop).unwrap_err().to_string(),
            "is deleting"
        );
    }

    #[test]
    fn only_failure_events_carry_reasons() {
        for e in all_events() {
            assert_eq!(
                e.reason().is_some(),
                matches!(e, E::BootFailed(_) | E::Exited(_))
            );
        }
    }

    #[test]
    fn restart_policies() {
        use RestartPolicy as R;
        assert!(!R::No.restarts(false) && !R::No.restarts(true));
        assert!(R::OnFailure.restarts(false) && !R::OnFailure.restarts(true));
        assert!(R::Always.restarts(false) && R::Always.restarts(true));
        for r in [R::No, R::OnFailure, R::Always] {
            assert_eq!(r.as_str().parse::<R>(), Ok(r));
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert!("sometimes".parse::<R>().is_err());
    }

    #[test]
    fn states_serialize_as_their_names() {
        for s in S::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}

#[cfg(test)]
mod doc_tests {
    /// The diagram in docs/architecture.md is the one in this module's doc.
    #[test]
    fn architecture_doc_has_this_diagram() {
        let src = include_str!("lifecycle.rs");
        let start = src.find("//! ```text\n").unwrap() + "//! ```text\n".len();
        let end = start + src[start..].find("//! ```\n").unwrap();
        let diagram: Vec<&str> = src[start..end]
            .lines()
            .map(|l| {
                l.strip_prefix("//! ")
                    .unwrap_or(l.trim_start_matches("//!"))
            })
            .collect();
        let doc = include_str!("../../../docs/architecture.md");
        assert!(
            doc.contains(&diagram.join("\n")),
            "docs/architecture.md does not have the lifecycle diagram of hutch_core::lifecycle"
        );
    }
}
