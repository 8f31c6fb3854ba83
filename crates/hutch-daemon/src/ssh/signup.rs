//! Unknown SSH keys (boxd's "your key is your account"): `hutchd --signup closed|open|invite`.
//!
//! - `closed` (default): an unknown key is refused, with a message saying whom to ask.
//! - `open`: an unknown key gets an account with the default quota at its first login, named
//!   from its fingerprint (`u-` and ten hex digits); at most a few per source address an hour.
//! - `invite`: an admin makes a one-time code (`ssh HOST invite [--ttl HOURS]`); a new key logs
//!   in and redeems it (`ssh HOST signup CODE [NAME]`), which makes its account. Until then the
//!   key can run nothing else. Codes are stored hashed, expire, and are burnt by the first use.

use super::{Conn, Out};
use crate::error::ApiError;
use crate::service::accounts::INVITE_TTL_HOURS;
use sha2::Digest;

/// What happens to SSH keys no account has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Signup {
    #[default]
    Closed,
    Open,
    Invite,
}

impl std::str::FromStr for Signup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "closed" => Ok(Signup::Closed),
            "open" => Ok(Signup::Open),
            "invite" => Ok(Signup::Invite),
            _ => Err(format!("--signup {s:?}: use closed, open or invite")),
        }
    }
}

/// The account name an unknown key gets by default: `u-` and ten hex digits of its fingerprint.
pub fn name_for(fingerprint: &str) -> String {
    format!(
        "u-{}",
        &hex::encode(sha2::Sha256::digest(fingerprint.as_bytes()))[..10]
    )
}

impl Conn {
    /// `invite [--ttl HOURS]` (admins): a one-time code for a new key.
    pub(super) async fn invite(&self, rest: &[&str]) -> Out {
        let hours = match rest {
            [] => INVITE_TTL_HOURS,
            ["--ttl", h] => match h.parse::<u64>() {
                Ok(h) => h,
                Err(_) => return Out::fail(format!("--ttl {h:?}: a number of hours")),
            },
            _ => return Out::fail("usage: invite [--ttl HOURS]"),
        };
        match self.m.create_invite(&self.caller(), hours).await {
            Ok(code) => Out::ok(format!(
                "{code}\nvalid for {hours} h, once. The new user runs: ssh -p {} {} signup {code} [NAME]\n",
                self.port, self.host
            )),
            Err(ApiError::Forbidden(_)) => Out::fail("only admins can make invites"),
            Err(e) => Out::fail(e.to_string()),
        }
    }

    /// `signup CODE [NAME]` from a key without an account (`--signup invite`).
    pub(super) async fn redeem(&mut self, args: &[String]) -> Out {
        let Some(line) = self.unknown_key.clone() else {
            return Out::fail("this key already has an account");
        };
        let (code, name) = match args {
            [c] => (c.as_str(), name_for(&self.key_fp)),
            [c, n] => (c.as_str(), n.clone()),
            _ => return Out::fail("usage: signup CODE [NAME]"),
        };
        match self.m.redeem_invite(code, &name, &line).await {
            Ok(acc) => {
                tracing::info!(account = %name, peer = ?self.peer, "ssh sign-up by invite");
                self.account = Some(acc);
                self.unknown_key = None;
                Out::ok(format!(
                    "welcome, {name}: your key is your account. Try: ssh -p {} {} help\n",
                    self.port, self.host
                ))
            }
            Err(ApiError::NotFound { .. }) => {
                if let Some(p) = self.peer {
                    self.limits.failed(p.ip());
                }
                Out::fail("no such invite, or it expired or was used")
            }
            Err(e) => Out::fail(e.to_string()),
        }
    }

    /// What a key without an account may run: only `signup` (invite mode).
    pub(super) async fn unknown_key_command(&mut self, args: &[String]) -> Out {
        match args.first().map(String::as_str) {
            Some("signup") => self.redeem(&args[1..]).await,
            _ => Out::fail(format!(
                "this key has no account on {host}. Ask an admin for an invite (ssh -p {port} {host} invite), then: ssh -p {port} {host} signup CODE [NAME]",
                host = self.host,
                port = self.port
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_fingerprints_are_valid_account_names() {
        let n = name_for("SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG");
        assert_eq!(n.len(), 12);
        assert!(hutch_core::names::validate_name(&n).is_ok());
        assert_ne!(n, name_for("SHA256:other"));
    }

    #[test]
    fn modes_parse() {
        assert_eq!("open".parse::<Signup>(), Ok(Signup::Open));
        assert_eq!("invite".parse::<Signup>(), Ok(Signup::Invite));
        assert_eq!("closed".parse::<Signup>(), Ok(Signup::Closed));
        assert!("maybe".parse::<Signup>().is_err());
    }
}
