//! Unknown SSH keys (boxd's "your key is your account"): `hutchd --signup closed|open|invite`.
//!
//! - `closed` (default): an unknown key is refused, with a message saying whom to ask.
//! - `open`: an unknown key gets an account with the default quota at its first login, named
//!   from its fingerprint (`u-` and ten hex digits); at most a few per source address an hour.
//! - `invite`: an admin makes a one-time code (`ssh HOST invite [--ttl HOURS]`); a new key logs
//!   in and redeems it (`ssh HOST signup CODE [NAME]`), which makes its account. Until then the
//!   key can run nothing else. Codes are stored hashed, expire, and are burnt by the first use.

use super::{Conn, Out};
use hutch_core::Account;
use hutch_store::{ACCOUNTS, INVITES};
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

/// A one-time invite code, stored by the hash of the code.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Invite {
    pub created_by: String,
    pub created_at: u64,
    pub expires_at: u64,
}

/// Invite lifetime when the admin gives none, and the longest allowed.
const DEFAULT_TTL_HOURS: u64 = 72;
const MAX_TTL_HOURS: u64 = 24 * 30;

fn hash(code: &str) -> String {
    hex::encode(sha2::Sha256::digest(code.as_bytes()))
}

/// The account name an unknown key gets by default: `u-` and ten hex digits of its fingerprint.
pub fn name_for(fingerprint: &str) -> String {
    format!("u-{}", &hash(fingerprint)[..10])
}

impl Conn {
    /// Makes an account for the verified unknown key `line` (OpenSSH text) named `name`.
    pub(super) fn make_account(&self, name: &str, line: &str) -> Result<Account, String> {
        hutch_core::names::validate_name(name).map_err(|e| format!("account {e}"))?;
        let acc = Account {
            name: name.to_string(),
            admin: false,
            keys: vec![line.to_string()],
            created_at: hutch_core::now(),
            quota: None,
        };
        self.m
            .store
            .insert_new(ACCOUNTS, name, &acc)
            .map_err(|e| match e {
                hutch_store::StoreError::Exists { .. } => {
                    format!("account {name} exists; choose another name")
                }
                e => e.to_string(),
            })?;
        tracing::info!(account = name, peer = ?self.peer, "ssh sign-up");
        Ok(acc)
    }

    /// `invite [--ttl HOURS]` (admins): a one-time code for a new key.
    pub(super) fn invite(&self, rest: &[&str]) -> Out {
        if !self.account().admin {
            return Out::fail("only admins can make invites");
        }
        let hours = match rest {
            [] => DEFAULT_TTL_HOURS,
            ["--ttl", h] => match h.parse::<u64>() {
                Ok(h) if (1..=MAX_TTL_HOURS).contains(&h) => h,
                _ => return Out::fail(format!("--ttl takes 1 to {MAX_TTL_HOURS} hours")),
            },
            _ => return Out::fail("usage: invite [--ttl HOURS]"),
        };
        let code = hex::encode(rand::random::<[u8; 16]>());
        let now = hutch_core::now();
        let inv = Invite {
            created_by: self.account().name.clone(),
            created_at: now,
            expires_at: now + hours * 3600,
        };
        if let Err(e) = self.m.store.insert_new(INVITES, &hash(&code), &inv) {
            return Out::fail(e.to_string());
        }
        Out::ok(format!(
            "{code}\nvalid for {hours} h, once. The new user runs: ssh -p {} {} signup {code} [NAME]\n",
            self.port, self.host
        ))
    }

    /// `signup CODE [NAME]` from a key without an account (`--signup invite`).
    pub(super) fn redeem(&mut self, args: &[String]) -> Out {
        let Some(line) = self.unknown_key.clone() else {
            return Out::fail("this key already has an account");
        };
        let (code, name) = match args {
            [c] => (c.as_str(), name_for(&self.key_fp)),
            [c, n] => (c.as_str(), n.clone()),
            _ => return Out::fail("usage: signup CODE [NAME]"),
        };
        if let Err(e) = hutch_core::names::validate_name(&name) {
            return Out::fail(format!("account {e}"));
        }
        let key = hash(code);
        let inv: Option<Invite> = self.m.store.get(INVITES, &key).ok().flatten();
        let valid = inv
            .as_ref()
            .is_some_and(|i| i.expires_at > hutch_core::now());
        // Burnt first: of two redemptions of one code, one deletes it.
        if !valid || !self.m.store.delete(INVITES, &key).unwrap_or(false) {
            if let Some(p) = self.peer {
                self.limits.failed(p.ip());
            }
            return Out::fail("no such invite, or it expired or was used");
        }
        match self.make_account(&name, &line) {
            Ok(acc) => {
                self.account = Some(acc);
                self.unknown_key = None;
                Out::ok(format!(
                    "welcome, {name}: your key is your account. Try: ssh -p {} {} help\n",
                    self.port, self.host
                ))
            }
            Err(e) => {
                // The code stays good for another try with another name.
                if let Some(i) = inv {
                    let _ = self.m.store.put(INVITES, &key, &i);
                }
                Out::fail(e)
            }
        }
    }

    /// What a key without an account may run: only `signup` (invite mode).
    pub(super) fn unknown_key_command(&mut self, args: &[String]) -> Out {
        match args.first().map(String::as_str) {
            Some("signup") => self.redeem(&args[1..]),
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
