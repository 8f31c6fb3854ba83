//! What a watch has to tell the host and the host has not taken yet: the kernel's changes
//! turned into protocol events, writes coalesced, the backlog bounded.
//!
//! Writes: the first write to a file is reported at once; more writes to it within
//! [`WRITE_QUIET`] of the last report are held back and reported as one `write` when that time
//! is up, when the writer closes the file, or before any other event of that name (so a
//! `remove` never overtakes the write before it). A file written without pause is thus reported
//! at most once per [`WRITE_QUIET`], and its last write is never lost. A close without a write
//! since the last report (`touch`, a read-write open that wrote nothing) reports nothing.
//!
//! Backlog: events wait here while the stream has no credit (the host is not reading). An event
//! that repeats the last one waiting for its name is dropped (coalesced); beyond
//! [`MAX_PENDING`] events or [`MAX_PENDING_BYTES`] of names, new events are dropped and counted
//! in [`Outbox::dropped`], so a host that stops reading costs the guest a bounded amount of
//! memory and loses the newest changes, as the kernel's own queue does.

use super::inotify::{Change, Raw};
use hutch_proto::{FsEvent, FsEventKind};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Writes to one file are reported at most once in this long.
pub const WRITE_QUIET: Duration = Duration::from_millis(50);
/// Events waiting for the host's credit, at most.
pub const MAX_PENDING: usize = 4096;
/// Bytes of names waiting for the host's credit, at most.
pub const MAX_PENDING_BYTES: usize = 1 << 20;
/// Longest name reported (a deeper path is dropped): its JSON stays well within a frame and the
/// stream's window.
pub const MAX_NAME: usize = 16 * 1024;
/// Files whose writes are being coalesced, at most; beyond it writes are reported as they come.
const MAX_WRITERS: usize = 4096;

/// A file written recently.
struct Writes {
    /// When its last `write` was queued.
    reported: Instant,
    /// Written since.
    dirty: bool,
}

/// See the module doc.
#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<(u64, FsEvent)>,
    /// The last event waiting per name, by sequence number.
    last: HashMap<String, (u64, FsEventKind)>,
    bytes: usize,
    seq: u64,
    writes: HashMap<String, Writes>,
    /// Events dropped because the backlog was full.
    pub dropped: u64,
}

fn kind(raw: Raw) -> FsEventKind {
    match raw {
        Raw::Create | Raw::MovedTo => FsEventKind::Create,
        Raw::Modify | Raw::CloseWrite => FsEventKind::Write,
        Raw::Delete => FsEventKind::Remove,
        Raw::MovedFrom => FsEventKind::Rename,
        Raw::Attrib => FsEventKind::Chmod,
    }
}

impl Outbox {
    /// The next event to send.
    pub fn front(&self) -> Option<&FsEvent> {
        self.queue.front().map(|(_, e)| e)
    }

    /// The front event was sent.
    pub fn pop(&mut self) {
        if let Some((seq, e)) = self.queue.pop_front() {
            self.bytes -= e.name.len();
            if self.last.get(&e.name).is_some_and(|(s, _)| *s == seq) {
                self.last.remove(&e.name);
            }
        }
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    fn queue(&mut self, name: String, kind: FsEventKind) {
        if self.last.get(&name).is_some_and(|(_, k)| *k == kind) {
            return;
        }
        if name.len() > MAX_NAME
            || self.queue.len() >= MAX_PENDING
            || self.bytes + name.len() > MAX_PENDING_BYTES
        {
            self.dropped += 1;
            return;
        }
        self.seq += 1;
        self.bytes += name.len();
        self.last.insert(name.clone(), (self.seq, kind));
        self.queue.push_back((self.seq, FsEvent { name, kind }));
    }

    /// Takes a change the kernel reported at `now`.
    pub fn push(&mut self, c: Change, now: Instant) {
        match c.raw {
            Raw::Modify => match self.writes.get_mut(&c.name) {
                Some(w) if now.duration_since(w.reported) < WRITE_QUIET => w.dirty = true,
                Some(w) => {
                    w.reported = now;
                    w.dirty = false;
                    self.queue(c.name, FsEventKind::Write);
                }
                None => {
                    if self.writes.len() >= MAX_WRITERS {
                        self.flush_due(now);
                    }
                    if self.writes.len() < MAX_WRITERS {
                        let w = Writes {
                            reported: now,
                            dirty: false,
                        };
                        self.writes.insert(c.name.clone(), w);
                    }
                    self.queue(c.name, FsEventKind::Write);
                }
            },
            Raw::CloseWrite => {
                if let Some(w) = self.writes.get_mut(&c.name).filter(|w| w.dirty) {
                    w.reported = now;
                    w.dirty = false;
                    self.queue(c.name, FsEventKind::Write);
                }
            }
            raw => {
                if self.writes.remove(&c.name).is_some_and(|w| w.dirty) {
                    self.queue(c.name.clone(), FsEventKind::Write);
                }
                self.queue(c.name, kind(raw));
            }
        }
    }

    /// Reports the held-back writes whose time is up, and forgets files quiet for that long.
    pub fn flush_due(&mut self, now: Instant) {
        let mut due: Vec<String> = Vec::new();
        self.writes.retain(|name, w| {
            if now.duration_since(w.reported) < WRITE_QUIET {
                return true;
            }
            if w.dirty {
                due.push(name.clone());
            }
            false
        });
        for name in due {
            self.queue(name.clone(), FsEventKind::Write);
            let w = Writes {
                reported: now,
                dirty: false,
            };
            self.writes.insert(name, w);
        }
    }

    /// How long until a held-back write is due (None: none is).
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        self.writes
            .values()
            .filter(|w| w.dirty)
            .map(|w| (w.reported + WRITE_QUIET).saturating_duration_since(now))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str, raw: Raw) -> Change {
        Change {
            name: name.into(),
            raw,
        }
    }

    fn drain(o: &mut Outbox) -> Vec<(String, FsEventKind)> {
        let mut v = Vec::new();
        while let Some(e) = o.front() {
            v.push((e.name.clone(), e.kind));
            o.pop();
        }
        v
    }

    fn ev(name: &str, kind: FsEventKind) -> (String, FsEventKind) {
        (name.into(), kind)
    }

    #[test]
    fn a_burst_of_writes_is_reported_first_and_last() {
        use FsEventKind::*;
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut o = Outbox::default();
        o.push(ch("f", Raw::Create), ms(0));
        for i in 0..100 {
            o.push(ch("f", Raw::Modify), ms(i / 10));
        }
        assert_eq!(drain(&mut o), vec![ev("f", Create), ev("f", Write)]);
        assert_eq!(o.next_due(ms(10)), Some(Duration::from_millis(40)));
        o.flush_due(ms(30));
        assert!(drain(&mut o).is_empty(), "not due yet");
        o.flush_due(ms(50));
        assert_eq!(drain(&mut o), vec![ev("f", Write)], "the held-back write");
        // Nothing held back any more: nothing is due, and the file is forgotten when quiet.
        assert_eq!(o.next_due(ms(60)), None);
        o.flush_due(ms(200));
        o.push(ch("f", Raw::CloseWrite), ms(201));
        assert!(
            drain(&mut o).is_empty(),
            "a close after no write says nothing"
        );
        // Written again, then closed: the close reports the held-back write at once.
        o.push(ch("f", Raw::Modify), ms(300));
        assert_eq!(drain(&mut o), vec![ev("f", Write)]);
        o.push(ch("f", Raw::Modify), ms(301));
        o.push(ch("f", Raw::CloseWrite), ms(302));
        assert_eq!(drain(&mut o), vec![ev("f", Write)]);
        // A held-back write goes out before the removal that follows it.
        o.push(ch("f", Raw::Modify), ms(303));
        o.push(ch("f", Raw::Delete), ms(304));
        assert_eq!(drain(&mut o), vec![ev("f", Write), ev("f", Remove)]);
        assert_eq!(o.next_due(ms(305)), None);
    }

    #[test]
    fn kinds_map_like_fsnotify() {
        use FsEventKind::*;
        let now = Instant::now();
        let mut o = Outbox::default();
        for (n, raw) in [
            ("a", Raw::Create),
            ("a", Raw::Attrib),
            ("a", Raw::MovedFrom),
            ("b", Raw::MovedTo),
            ("b", Raw::Delete),
        ] {
            o.push(ch(n, raw), now);
        }
        assert_eq!(
            drain(&mut o),
            vec![
                ev("a", Create),
                ev("a", Chmod),
                ev("a", Rename),
                ev("b", Create),
                ev("b", Remove)
            ]
        );
    }

    #[test]
    fn the_backlog_coalesces_repeats_and_is_bounded() {
        use FsEventKind::*;
        let now = Instant::now();
        let mut o = Outbox::default();
        // Repeats of the last waiting event of a name are one event; other orders stay.
        for _ in 0..10 {
            o.push(ch("a", Raw::Attrib), now);
        }
        o.push(ch("a", Raw::Delete), now);
        o.push(ch("a", Raw::Create), now);
        o.push(ch("a", Raw::Attrib), now);
        assert_eq!(o.len(), 4);
        assert_eq!(
            drain(&mut o),
            vec![
                ev("a", Chmod),
                ev("a", Remove),
                ev("a", Create),
                ev("a", Chmod)
            ]
        );
        // Once sent, a repeat is news again.
        o.push(ch("a", Raw::Attrib), now);
        assert_eq!(o.len(), 1);
        o.pop();
        // Full: the newest are dropped and counted.
        for i in 0..MAX_PENDING + 10 {
            o.push(ch(&format!("f{i}"), Raw::Create), now);
        }
        assert_eq!((o.len(), o.dropped), (MAX_PENDING, 10));
        assert_eq!(o.front().unwrap().name, "f0");
        drain(&mut o);
        let long = "x".repeat(1000);
        for i in 0..MAX_PENDING {
            o.push(ch(&format!("{long}{i}"), Raw::Create), now);
        }
        let kept = o.len();
        assert!(o.bytes <= MAX_PENDING_BYTES && kept < MAX_PENDING, "{kept}");
        drain(&mut o);
        o.push(ch(&"y".repeat(MAX_NAME + 1), Raw::Create), now);
        assert_eq!(o.len(), 0, "a name too long to send");
        assert_eq!(o.dropped, 10 + (MAX_PENDING - kept) as u64 + 1);
    }
}
