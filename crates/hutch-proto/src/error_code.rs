//! [`ErrorCode`]: what kind of failure an agent `error` response reports.
//!
//! The agent picks the code (from the errno of the failed call, or its own checks); the host
//! decides what it means at each edge (HTTP status, SFTP status, SSH exit). Codes travel as
//! snake_case strings. The set may grow: a code this build does not know, a value that is not a
//! string at all, or anything else a newer or hostile agent sends decodes to
//! [`ErrorCode::Unknown`] and never fails the response it is in.

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The kind of a failed request. The strings of the codes protocol v2 already had
/// (`not_found`, `permission_denied`, `is_directory`, `io_error`, `bad_request`, `no_process`,
/// `signal_failed`, `export_failed`) are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// ENOENT: no such file or directory.
    NotFound,
    /// EEXIST: the path already exists.
    Exists,
    /// EACCES, EPERM.
    PermissionDenied,
    /// ENOTDIR: a path component is not a directory.
    NotADirectory,
    /// EISDIR, or a file operation on a directory.
    IsDirectory,
    /// ENOTEMPTY: a directory to remove is not empty.
    NotEmpty,
    /// EINVAL and malformed arguments (a NUL in a path, an offset the file cannot have).
    InvalidArgument,
    /// EFBIG, E2BIG, ENAMETOOLONG: a file, argument or name over a limit.
    TooLarge,
    /// ENOSPC, EDQUOT: the guest's disk is full.
    NoSpace,
    /// EROFS: a read-only filesystem.
    ReadOnly,
    /// EBUSY, ETXTBSY.
    Busy,
    /// ENOTSUP, ENOSYS, EXDEV: not possible here.
    Unsupported,
    /// EMFILE, ENFILE, inotify's ENOSPC (the kernel's watch limit), or one of the agent's own
    /// limits (watch streams, directories per watch): too many at once.
    ResourceExhausted,
    /// Any other I/O error.
    Io,
    /// The agent could not make sense of the request.
    BadRequest,
    /// A signal for a stream that runs no process.
    NoProcess,
    /// Sending a signal failed.
    SignalFailed,
    /// Exporting the VM's changes failed.
    ExportFailed,
    /// A code this build does not know (newer agent, hostile agent, not a string).
    Unknown,
}

impl ErrorCode {
    const ALL: [ErrorCode; 19] = [
        ErrorCode::NotFound,
        ErrorCode::Exists,
        ErrorCode::PermissionDenied,
        ErrorCode::NotADirectory,
        ErrorCode::IsDirectory,
        ErrorCode::NotEmpty,
        ErrorCode::InvalidArgument,
        ErrorCode::TooLarge,
        ErrorCode::NoSpace,
        ErrorCode::ReadOnly,
        ErrorCode::Busy,
        ErrorCode::Unsupported,
        ErrorCode::ResourceExhausted,
        ErrorCode::Io,
        ErrorCode::BadRequest,
        ErrorCode::NoProcess,
        ErrorCode::SignalFailed,
        ErrorCode::ExportFailed,
        ErrorCode::Unknown,
    ];

    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Exists => "exists",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::IsDirectory => "is_directory",
            ErrorCode::NotEmpty => "not_empty",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::ReadOnly => "read_only",
            ErrorCode::Busy => "busy",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::Io => "io_error",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NoProcess => "no_process",
            ErrorCode::SignalFailed => "signal_failed",
            ErrorCode::ExportFailed => "export_failed",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The code of a wire string; [`ErrorCode::Unknown`] for anything else.
    pub fn from_wire(s: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .unwrap_or(ErrorCode::Unknown)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Accepts any JSON value: a known string is its code, everything else `Unknown` (containers
/// are read through and dropped, so the rest of the message still decodes).
struct CodeVisitor;

impl<'de> Visitor<'de> for CodeVisitor {
    type Value = ErrorCode;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an error code")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ErrorCode, E> {
        Ok(ErrorCode::from_wire(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<ErrorCode, E> {
        Ok(ErrorCode::Unknown)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<ErrorCode, E> {
        Ok(ErrorCode::Unknown)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<ErrorCode, E> {
        Ok(ErrorCode::Unknown)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<ErrorCode, E> {
        Ok(ErrorCode::Unknown)
    }
    fn visit_unit<E: de::Error>(self) -> Result<ErrorCode, E> {
        Ok(ErrorCode::Unknown)
    }
    fn visit_none<E: de::Error>(self) -> Result<ErrorCode, E> {
        Ok(ErrorCode::Unknown)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<ErrorCode, D::Error> {
        d.deserialize_any(CodeVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ErrorCode, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(ErrorCode::Unknown)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ErrorCode, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(ErrorCode::Unknown)
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ErrorCode, D::Error> {
        d.deserialize_any(CodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_roundtrips_and_strings_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{c} twice");
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<ErrorCode>(&s).unwrap(), c);
        }
    }

    #[test]
    fn anything_unknown_decodes_to_unknown() {
        for v in [
            r#""no_such_code""#,
            r#""""#,
            "17",
            "-3",
            "1.5",
            "true",
            "null",
            r#"[1,"a",{"b":[]}]"#,
            r#"{"nested":{"deep":[1,2,3]}}"#,
        ] {
            assert_eq!(
                serde_json::from_str::<ErrorCode>(v).unwrap(),
                ErrorCode::Unknown,
                "{v}"
            );
        }
        // Inside a message, the fields after it still decode.
        #[derive(Deserialize)]
        struct M {
            code: ErrorCode,
            message: String,
        }
        let m: M = serde_json::from_str(r#"{"code":{"x":[1,{"y":2}]},"message":"hi"}"#).unwrap();
        assert_eq!((m.code, m.message.as_str()), (ErrorCode::Unknown, "hi"));
    }
}
