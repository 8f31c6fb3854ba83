//! The host <-> guest protocol spoken over the VM's virtio-serial port.
//!
//! One byte stream carries many concurrent operations ("streams"). Every unit on the wire is a
//! [`Frame`]:
//!
//! ```text
//!  0      2      3      4          8          12
//!  +------+------+------+----------+----------+----------------+
//!  | "HU" | kind | 0    | stream   | len      | payload (len)  |
//!  +------+------+------+----------+----------+----------------+
//!    magic   u8    flags  u32 BE     u32 BE     <= MAX_PAYLOAD
//! ```
//!
//! Control frames (`Hello`, `Request`, `Response`) carry JSON; data frames (`Stdout`, `Stderr`,
//! `Stdin`) carry raw bytes; `StdinEof` is empty and `Credit` carries a u32. The magic lets a
//! reader resynchronise after a peer went away mid-frame (hutchd killed while writing): the
//! lenient decoder skips to the next magic. The host starts every connection with a `Hello`
//! carrying a fresh nonce and ignores everything until the agent echoes it, so nothing left over
//! from an earlier connection is mistaken for a reply; from then on it decodes strictly, and a
//! malformed or oversized frame ends the connection.
//!
//! Data frames are flow-controlled per stream and direction (see [`credit`]): a sender may send
//! only as many data bytes as the receiver has granted ([`WINDOW`] initially), and the receiver
//! grants more with `Credit` frames as its consumer takes the data. One stream whose consumer
//! stops reading thus stalls only that stream. See docs/protocol.md.

pub mod credit;
mod error_code;
pub mod restore;
pub mod watch;

pub use error_code::ErrorCode;
pub use restore::{Identity, InvalidRestore, NetIdentity, RestoreInfo};
pub use watch::{FsEvent, FsEventKind};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Frame magic, "HU".
pub const MAGIC: [u8; 2] = *b"HU";
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload a frame may carry; bigger data is split across frames.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Entries in one `ReadDir` page: a name of 255 bytes, JSON-escaped at worst 6 bytes a byte, plus
/// its attributes, times this stays under [`MAX_PAYLOAD`].
pub const DIR_PAGE: usize = 100;
/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "org.hutch.agent";
/// Protocol version, bumped on incompatible changes. Version 2 added per-stream credit.
pub const VERSION: u32 = 2;
/// Data bytes a sender may have in flight per stream and direction before the receiver grants
/// more with a `Credit` frame.
pub const WINDOW: u32 = 256 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Connection handshake, JSON [`Hello`] (host) or [`HelloAck`] (agent), stream 0.
    Hello = 1,
    /// Host -> agent, JSON [`Request`], opens or acts on a stream.
    Request = 2,
    /// Agent -> host, JSON [`Response`].
    Response = 3,
    /// Agent -> host, raw bytes: process stdout, or file contents for `ReadFile`.
    Stdout = 4,
    /// Agent -> host, raw bytes: process stderr.
    Stderr = 5,
    /// Host -> agent, raw bytes: process stdin, or file contents for `WriteFile`.
    Stdin = 6,
    /// Host -> agent: no more stdin on this stream.
    StdinEof = 7,
    /// Either direction: the sender's consumer took data; payload is a u32 BE count of bytes the
    /// peer may send on this stream in addition to what it was granted before.
    Credit = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Request,
            3 => Kind::Response,
            4 => Kind::Stdout,
            5 => Kind::Stderr,
            6 => Kind::Stdin,
            7 => Kind::StdinEof,
            8 => Kind::Credit,
            _ => return None,
        })
    }
}

/// One unit on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Errors of encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("payload of {0} bytes exceeds the frame limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("malformed frame header {0:02x?}")]
    BadHeader([u8; HEADER_LEN]),
    #[error("credit frame with a {0}-byte payload (want 4)")]
    BadCredit(usize),
    #[error("malformed {what} message: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl Frame {
    pub fn new(kind: Kind, stream: u32, payload: Vec<u8>) -> Frame {
        Frame {
            kind,
            stream,
            payload,
        }
    }

    /// A `Credit` frame granting `n` more bytes on `stream`.
    pub fn credit(stream: u32, n: u32) -> Frame {
        Frame::new(Kind::Credit, stream, n.to_be_bytes().to_vec())
    }

    /// The grant of a `Credit` frame.
    pub fn credit_amount(&self) -> Result<u32, ProtoError> {
        <[u8; 4]>::try_from(self.payload.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| ProtoError::BadCredit(self.payload.len()))
    }

    /// Whether this frame carries flow-controlled data (counted against the stream's window).
    pub fn is_data(&self) -> bool {
        matches!(self.kind, Kind::Stdout | Kind::Stderr | Kind::Stdin)
    }

    /// A frame with a JSON payload.
    pub fn json<T: Serialize>(kind: Kind, stream: u32, msg: &T) -> Frame {
        // Serialising our own plain data types cannot fail.
        let payload = serde_json::to_vec(msg).unwrap_or_default();
        Frame::new(kind, stream, payload)
    }

    /// Parses the JSON payload.
    pub fn parse<T: for<'a> Deserialize<'a>>(&self, what: &'static str) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtoError::Json { what, source })
    }

    /// Appends the wire form of this frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge(self.payload.len()));
        }
        out.extend_from_slice(&MAGIC);
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut out)?;
        Ok(out)
    }
}

/// Incremental decoder: feed bytes with [`Decoder::push`], take frames with [`Decoder::next_frame`].
///
/// Garbage (bytes that do not start a valid header) is skipped up to the next magic; the number of
/// skipped bytes is counted in [`Decoder::skipped`].
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    skipped: u64,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Drops everything buffered (the peer went away).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Bytes skipped while resynchronising.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Bytes buffered and not yet returned as frames (at most one partial frame after
    /// [`Decoder::next_frame_strict`] returned `Ok(None)`).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next frame, refusing anything malformed: for a peer that is in sync (after the
    /// handshake), where a bad header means a broken or hostile peer, not a resynchronisation.
    /// Never buffers more than one maximal frame beyond what was pushed.
    pub fn next_frame_strict(&mut self) -> Result<Option<Frame>, ProtoError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            if !avail.is_empty() && avail[0] != MAGIC[0] {
                let mut h = [0u8; HEADER_LEN];
                h[..avail.len()].copy_from_slice(avail);
                return Err(ProtoError::BadHeader(h));
            }
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&avail[..HEADER_LEN]);
        let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let Some(kind) = Kind::from_u8(h[2]).filter(|_| h[..2] == MAGIC && h[3] == 0) else {
            return Err(ProtoError::BadHeader(h));
        };
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge(len));
        }
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let payload = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        Ok(Some(Frame {
            kind,
            stream,
            payload,
        }))
    }

    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() < HEADER_LEN {
                // Keep a possible partial magic; drop bytes that cannot start one.
                if !avail.is_empty() && avail[0] != MAGIC[0] {
                    self.skip_to_magic();
                    continue;
                }
                return None;
            }
            let kind = Kind::from_u8(avail[2]);
            let len = u32::from_be_bytes([avail[8], avail[9], avail[10], avail[11]]) as usize;
            if avail[..2] != MAGIC || kind.is_none() || avail[3] != 0 || len > MAX_PAYLOAD {
                self.skip_to_magic();
                continue;
            }
            if avail.len() < HEADER_LEN + len {
                return None;
            }
            let stream = u32::from_be_bytes([avail[4], avail[5], avail[6], avail[7]]);
            let payload = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
            self.start += HEADER_LEN + len;
            return kind.map(|kind| Frame {
                kind,
                stream,
                payload,
            });
        }
    }

    fn skip_to_magic(&mut self) {
        let avail = &self.buf[self.start..];
        let next = avail
            .iter()
            .skip(1)
            .position(|&b| b == MAGIC[0])
            .map(|p| p + 1)
            .unwrap_or(avail.len());
        self.skipped += next as u64;
        self.start += next;
    }
}

/// Host -> agent handshake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub nonce: u64,
    pub version: u32,
}

/// Agent -> host handshake answer; sent once the guest root is mounted and the agent serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelloAck {
    pub nonce: u64,
    pub version: u32,
    pub hostname: String,
    pub kernel: String,
    /// Milliseconds since the guest kernel booted (from /proc/uptime).
    pub uptime_ms: u64,
}

/// Host -> agent request; each opens a stream (except `Signal`, `Resize` and `Cancel`, which act
/// on one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Runs a process. Output arrives as Stdout/Stderr frames, then `Response::Exited`.
    Exec(ExecRequest),
    /// Sends a signal to the process of this stream.
    Signal { signal: i32 },
    /// Changes the terminal size of this stream's process (`tty` execs).
    Resize(TtySize),
    /// Reads a file from `offset`, at most `len` bytes (to its end if absent): Stdout frames
    /// with its bytes, then `Response::Done`.
    ReadFile {
        path: String,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        len: Option<u64>,
        /// Read as this guest user (its permissions; spec as for `ExecRequest::user`); root
        /// when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Writes a file from the Stdin frames that follow, up to StdinEof; then `Response::Done`.
    /// Without `offset` the file is created or truncated (and its parents made); with it the
    /// bytes go at that offset of the file (created if missing, never truncated).
    WriteFile {
        path: String,
        mode: Option<u32>,
        #[serde(default)]
        offset: Option<u64>,
        /// Write as this guest user (its permissions; the file and the parents made are
        /// its); root when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Streams the VM's changes since boot from the image (the overlay upper layer) as an OCI
    /// layer tar on Stdout frames, deletions as whiteouts; then `Response::Done`. The writable
    /// filesystem is frozen meanwhile, so the layer is consistent.
    ExportChanges,
    /// A filesystem operation (for SFTP); answered with `FsAttr`, `FsDir`, `FsPath` or `Done`.
    Fs(FsRequest),
    /// A filesystem operation as guest user `user` (its permissions; what it makes is its).
    FsAs { user: String, req: FsRequest },
    /// The host gave up on this stream: the agent stops sending on it and kills its process.
    Cancel,
    /// Liveness and readiness.
    Health,
    /// Stops every process, syncs and unmounts, powers the VM off.
    Shutdown,
    /// The VM was just restored from a memory snapshot: set the clock, feed the RNG and, for a
    /// copy, take on a new identity; `Response::Done` once all of it is applied.
    Restored(RestoreInfo),
    /// Watches directory `path` (and, when `recursive`, every directory under it):
    /// `Response::Watching` once the watch is set, then one `Response::FsEvent` per change, until
    /// the host sends `Cancel` (see [`watch`]).
    Watch {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
}

/// What to run and how.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// The complete environment of the process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name`, `uid`, `name:group` or `uid:gid`, resolved in the guest root.
    #[serde(default)]
    pub user: Option<String>,
    /// Whether Stdin frames follow; if false the process gets /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process (SIGKILL) after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Run detached from the connection: output goes to the VM console, the process outlives
    /// the host connection, and the stream ends after `Started`. Used for the image's main process.
    #[serde(default)]
    pub detach: bool,
    /// Run on a pseudo-terminal of this size: stdout carries the terminal's output (stderr is
    /// merged into it), Stdin frames are typed into it.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Filesystem operations in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "fs", rename_all = "snake_case")]
pub enum FsRequest {
    /// `follow`: stat (true) or lstat (false).
    Stat {
        path: String,
        follow: bool,
    },
    /// One page of a directory listing: up to [`DIR_PAGE`] entries after the first `skip`
    /// (so a listing of any size fits in frames; `FsDir.more` says whether more follow).
    ReadDir {
        path: String,
        #[serde(default)]
        skip: u64,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Remove {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    Realpath {
        path: String,
    },
    Readlink {
        path: String,
    },
    Symlink {
        target: String,
        link: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
}

/// File metadata; `mode` is the full st_mode (type and permission bits).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct FileAttr {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: i64,
    pub mtime: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub attr: FileAttr,
}

/// Agent -> host answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The process runs.
    Started {
        pid: i32,
    },
    /// The process ended; all its output has been sent before this frame.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    /// A file operation finished.
    Done {
        bytes: u64,
    },
    Health {
        ready: bool,
        uptime_ms: u64,
        processes: u32,
    },
    FsAttr {
        attr: FileAttr,
    },
    FsDir {
        entries: Vec<DirEntry>,
        /// More entries follow this page, from position `next` on (the `skip` of the next page).
        #[serde(default)]
        more: bool,
        #[serde(default)]
        next: u64,
    },
    FsPath {
        path: String,
    },
    /// The request failed; the stream is finished. `code` says what kind of failure (the host
    /// maps it to its HTTP, SFTP and SSH answers); `message` is for people.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// A `watch` is set; its events follow.
    Watching,
    /// A change in a watched directory. Spends its payload length of the stream's credit, like
    /// a data frame.
    FsEvent(FsEvent),
}

impl Response {
    /// Whether this is the last answer on its stream: all are but `started`, `watching` and
    /// `fs_event`.
    pub fn ends_stream(&self) -> bool {
        !matches!(
            self,
            Response::Started { .. } | Response::Watching | Response::FsEvent(_)
        )
    }

    /// Whether this answer spends the stream's agent -> host credit by its payload length, as
    /// data frames do (`fs_event`, so a watch whose host stops reading stalls in the agent).
    pub fn counts_against_window(&self) -> bool {
        matches!(self, Response::FsEvent(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(d: &mut Decoder) -> Vec<Frame> {
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    #[test]
    fn roundtrip_split_at_every_byte() {
        let a = Frame::json(Kind::Request, 7, &Request::Health);
        let b = Frame::new(Kind::Stdout, 9, b"hello world".to_vec());
        let mut wire = a.encode().unwrap();
        wire.extend(b.encode().unwrap());
        for split in 0..wire.len() {
            let mut d = Decoder::new();
            d.push(&wire[..split]);
            let mut got = frames(&mut d);
            d.push(&wire[split..]);
            got.extend(frames(&mut d));
            assert_eq!(got, vec![a.clone(), b.clone()], "split at {split}");
        }
    }

    #[test]
    fn resyncs_when_joining_mid_frame() {
        // A reader that connects in the middle of a frame sees the tail of its payload first.
        let good = Frame::new(Kind::Stderr, 1, b"x".to_vec());
        let earlier = Frame::new(Kind::Stdout, 2, b"tail of an old HU\x09 frame".to_vec());
        let earlier = earlier.encode().unwrap();
        let mut wire = earlier[HEADER_LEN + 3..].to_vec();
        wire.extend(good.encode().unwrap());
        let mut d = Decoder::new();
        d.push(&wire);
        let got = frames(&mut d);
        assert_eq!(got.last(), Some(&good));
        assert!(d.skipped() > 0);
    }

    #[test]
    fn oversized_payload_refused() {
        let f = Frame::new(Kind::Stdin, 1, vec![0; MAX_PAYLOAD + 1]);
        assert!(matches!(f.encode(), Err(ProtoError::TooLarge(_))));
    }

    #[test]
    fn strict_decoder_refuses_oversized_and_garbage() {
        // A header announcing more than MAX_PAYLOAD: an error at once, nothing buffered for it.
        let mut d = Decoder::new();
        let mut h = b"HU\x04\x00\x00\x00\x00\x01".to_vec();
        h.extend_from_slice(&((MAX_PAYLOAD as u32) + 1).to_be_bytes());
        d.push(&h);
        assert!(matches!(
            d.next_frame_strict(),
            Err(ProtoError::TooLarge(_))
        ));
        let mut d = Decoder::new();
        d.push(b"XX\x04\x00\x00\x00\x00\x01\x00\x00\x00\x00");
        assert!(matches!(
            d.next_frame_strict(),
            Err(ProtoError::BadHeader(_))
        ));
        let mut d = Decoder::new();
        d.push(b"HU\x63\x00\x00\x00\x00\x01\x00\x00\x00\x00");
        assert!(matches!(
            d.next_frame_strict(),
            Err(ProtoError::BadHeader(_))
        ));
        let mut d = Decoder::new();
        d.push(&Frame::credit(3, 77).encode().unwrap());
        let f = d.next_frame_strict().unwrap().unwrap();
        assert_eq!(
            (f.kind, f.stream, f.credit_amount().unwrap()),
            (Kind::Credit, 3, 77)
        );
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn frame() -> impl Strategy<Value = Frame> {
            (
                1u8..=8,
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..3000),
            )
                .prop_map(|(k, stream, payload)| Frame {
                    kind: Kind::from_u8(k).unwrap(),
                    stream,
                    payload,
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

            /// Any sequence of frames, cut into any pieces, decodes back to itself, strictly and
            /// leniently.
            #[test]
            fn roundtrip_any_split(
                frames in proptest::collection::vec(frame(), 0..12),
                cuts in proptest::collection::vec(1usize..5000, 0..20),
            ) {
                let mut wire = Vec::new();
                for f in &frames {
                    f.encode_into(&mut wire).unwrap();
                }
                let (mut strict, mut lenient) = (Decoder::new(), Decoder::new());
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let mut rest = wire.as_slice();
                let mut cuts = cuts.into_iter();
                while !rest.is_empty() {
                    let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                    strict.push(&rest[..n]);
                    lenient.push(&rest[..n]);
                    rest = &rest[n..];
                    while let Some(f) = strict.next_frame_strict().unwrap() {
                        a.push(f);
                    }
                    b.extend(std::iter::from_fn(|| lenient.next_frame()));
                    prop_assert!(strict.buffered() <= HEADER_LEN + MAX_PAYLOAD);
                }
                prop_assert_eq!(&a, &frames);
                prop_assert_eq!(&b, &frames);
                prop_assert_eq!(strict.buffered(), 0);
            }

            /// Arbitrary bytes never panic either decoder; the strict one stops at the first bad
            /// header and never returns a payload over the limit; the lenient one never buffers
            /// more than a frame's worth beyond its input.
            #[test]
            fn garbage_never_panics(chunks in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..600), 0..20)) {
                let (mut strict, mut lenient) = (Decoder::new(), Decoder::new());
                let mut failed = false;
                for c in &chunks {
                    lenient.push(c);
                    while let Some(f) = lenient.next_frame() {
                        prop_assert!(f.payload.len() <= MAX_PAYLOAD);
                    }
                    if !failed {
                        strict.push(c);
                        loop {
                            match strict.next_frame_strict() {
                                Ok(Some(f)) => prop_assert!(f.payload.len() <= MAX_PAYLOAD),
                                Ok(None) => break,
                                Err(_) => { failed = true; break; }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn error_response_with_unknown_code_still_decodes() {
        let f = Frame::new(
            Kind::Response,
            1,
            br#"{"type":"error","code":"from_the_future","message":"x"}"#.to_vec(),
        );
        assert_eq!(
            f.parse::<Response>("response").unwrap(),
            Response::Error {
                code: ErrorCode::Unknown,
                message: "x".into()
            }
        );
        let r = Response::Error {
            code: ErrorCode::IsDirectory,
            message: "/x is a directory".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"type":"error","code":"is_directory","message":"/x is a directory"}"#
        );
    }

    #[test]
    fn request_json_shape() {
        let r = Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"op":"exec","argv":["true"]"#), "{s}");
        let back: Request = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
    }
}
