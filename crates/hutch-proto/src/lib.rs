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
//! `Stdin`, `StdinEof`) carry raw bytes. The magic lets a reader resynchronise after a peer went
//! away mid-frame (hutchd killed while writing): the decoder skips to the next magic. The host
//! starts every connection with a `Hello` carrying a fresh nonce and ignores everything until the
//! agent echoes it, so nothing left over from an earlier connection is mistaken for a reply.
//! See docs/protocol.md.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Frame magic, "HU".
pub const MAGIC: [u8; 2] = *b"HU";
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload a frame may carry; bigger data is split across frames.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "org.hutch.agent";
/// Protocol version, bumped on incompatible changes.
pub const VERSION: u32 = 1;

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

/// Host -> agent request; each opens a stream (except `Signal`, which acts on one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Runs a process. Output arrives as Stdout/Stderr frames, then `Response::Exited`.
    Exec(ExecRequest),
    /// Sends a signal to the process of this stream.
    Signal { signal: i32 },
    /// Changes the terminal size of this stream's process (`tty` execs).
    Resize(TtySize),
    /// Reads a file: Stdout frames with its bytes, then `Response::Done`.
    ReadFile { path: String },
    /// Writes a file from the Stdin frames that follow, up to StdinEof; then `Response::Done`.
    WriteFile { path: String, mode: Option<u32> },
    /// Streams the VM's changes since boot from the image (the overlay upper layer) as an OCI
    /// layer tar on Stdout frames, deletions as whiteouts; then `Response::Done`. The writable
    /// filesystem is frozen meanwhile, so the layer is consistent.
    ExportChanges,
    /// A filesystem operation (for SFTP); answered with `FsAttr`, `FsDir`, `FsPath` or `Done`.
    Fs(FsRequest),
    /// Liveness and readiness.
    Health,
    /// Stops every process, syncs and unmounts, powers the VM off.
    Shutdown,
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
    ReadDir {
        path: String,
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
    },
    FsPath {
        path: String,
    },
    /// The request failed; the stream is finished.
    Error {
        code: String,
        message: String,
    },
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
