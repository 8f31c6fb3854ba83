//! Accounts, their SSH keys and quotas, API tokens and sign-up invites, for a caller. The SSH
//! front door parses commands and renders answers; who may do what is decided here.

use super::Service;
use crate::auth::{Caller, TokenRecord};
use crate::error::ApiError;
use crate::records::{ACCOUNTS, INVITES, TOKENS};
use hutch_core::{Account, Quota};
use sha2::Digest;

/// A one-time sign-up code, stored by the SHA-256 of the code.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Invite {
    pub created_by: String,
    pub created_at: u64,
    pub expires_at: u64,
}

/// Invite lifetime when the admin gives none, and the longest allowed.
pub const INVITE_TTL_HOURS: u64 = 72;
pub const MAX_INVITE_TTL_HOURS: u64 = 24 * 30;

/// A change to a quota (the admin's `quota NAME --vms N ...`); an error refuses it.
pub type QuotaChange<'a> = &'a (dyn Fn(&mut Quota) -> Result<(), String> + Sync);

fn hash(code: &str) -> String {
    hex::encode(sha2::Sha256::digest(code.as_bytes()))
}

/// What an account's VMs add up to.
pub fn usage(vms: &[hutch_core::Vm], account: &str) -> Quota {
    let mine: Vec<_> = vms
        .iter()
        .filter(|v| v.owner.as_deref() == Some(account))
        .collect();
    Quota {
        vms: mine.len() as u32,
        vcpus: mine.iter().map(|v| v.vcpus).sum(),
        mem_mib: mine.iter().map(|v| v.mem_mib).sum(),
        disk_gib: mine.iter().map(|v| v.disk_gib).sum(),
    }
}

impl Service {
    pub async fn account(&self, name: &str) -> Result<Option<Account>, ApiError> {
        Ok(self.records.get(ACCOUNTS, name).await?)
    }

    /// The account holding the key with `fingerprint` (as `key_fingerprint` gives them).
    pub async fn account_by_key(
        &self,
        fingerprint: &str,
        key_fingerprint: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Account>, ApiError> {
        let accounts: Vec<Account> = self.records.list(ACCOUNTS).await?;
        Ok(accounts.into_iter().find(|a| {
            a.keys
                .iter()
                .any(|k| key_fingerprint(k).as_deref() == Some(fingerprint))
        }))
    }

    /// Makes the admin account's keys exactly `keys` (OpenSSH lines).
    pub async fn set_admin_keys(&self, keys: Vec<String>) -> Result<(), ApiError> {
        let acc = Account {
            name: "admin".into(),
            admin: true,
            keys,
            created_at: hutch_core::now(),
            quota: None,
        };
        Ok(self.records.put(ACCOUNTS, "admin", &acc).await?)
    }

    /// Adds `keys` to `account` (making it when `create`): the admin for any account, an account
    /// for itself. `owner_of` says which account holds a key already, if any.
    pub async fn add_keys(
        &self,
        caller: &Caller,
        account: &str,
        keys: Vec<(String, String)>,
        create: bool,
    ) -> Result<Account, ApiError> {
        if (create || account != caller.account) && !caller.admin {
            return Err(ApiError::Forbidden("only admins can add users".into()));
        }
        if create {
            hutch_core::names::validate_name(account)
                .map_err(|_| ApiError::Invalid(format!("invalid account name {account:?}")))?;
        }
        let accounts: Vec<Account> = self.records.list(ACCOUNTS).await?;
        for (fp, line) in &keys {
            let holder = accounts.iter().find(|a| a.keys.contains(line));
            if holder.is_some_and(|a| a.name != account) {
                return Err(ApiError::Conflict(format!(
                    "key {fp} already belongs to another account"
                )));
            }
        }
        let lines: Vec<String> = keys.into_iter().map(|(_, l)| l).collect();
        let existing = accounts.into_iter().find(|a| a.name == account);
        let acc = match (existing, create) {
            (Some(_), true) => return Err(ApiError::Conflict(format!("account {account} exists"))),
            (Some(mut a), false) => {
                for l in lines {
                    if !a.keys.contains(&l) {
                        a.keys.push(l);
                    }
                }
                a
            }
            (None, _) => Account {
                name: account.into(),
                admin: false,
                keys: lines,
                created_at: hutch_core::now(),
                quota: None,
            },
        };
        self.records.put(ACCOUNTS, account, &acc).await?;
        Ok(acc)
    }

    /// Removes the caller's key whose OpenSSH line is `line`; its API tokens are all revoked (a
    /// removed key may be how one was obtained). Returns how many.
    pub async fn remove_key(&self, caller: &Caller, line: &str) -> Result<usize, ApiError> {
        let mut acc = self
            .account(&caller.account)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                kind: "account",
                name: caller.account.clone(),
            })?;
        acc.keys.retain(|k| k != line);
        if acc.keys.is_empty() {
            return Err(ApiError::Conflict(
                "refusing to remove the account's last key".into(),
            ));
        }
        self.records.put(ACCOUNTS, &acc.name, &acc).await?;
        let mut revoked = 0;
        for t in self.tokens_of(caller).await? {
            if self.revoke_token(caller, &t.id).await? {
                revoked += 1;
            }
        }
        Ok(revoked)
    }

    /// The quota of `target` and what it uses, after applying `change` to it (admin only for
    /// changes and for other accounts).
    pub async fn quota(
        &self,
        caller: &Caller,
        target: &str,
        change: Option<QuotaChange<'_>>,
    ) -> Result<(Account, Quota, Quota), ApiError> {
        if (target != caller.account || change.is_some()) && !caller.admin {
            return Err(ApiError::Forbidden(
                "only the admin sets quotas or reads another account's".into(),
            ));
        }
        let mut acc = self
            .account(target)
            .await?
            .ok_or_else(|| ApiError::Invalid(format!("no account {target}")))?;
        if let Some(f) = change {
            let mut q = acc.quota.unwrap_or(self.admission.default_quota);
            f(&mut q).map_err(ApiError::Invalid)?;
            acc.quota = Some(q);
            self.records.put(ACCOUNTS, &acc.name, &acc).await?;
        }
        let q = acc.quota.unwrap_or(self.admission.default_quota);
        let used = usage(&self.list().await?, target);
        Ok((acc, q, used))
    }

    /// A new API token for the caller's account, valid `ttl_secs`.
    pub async fn issue_token(
        &self,
        caller: &Caller,
        ttl_secs: u64,
    ) -> Result<(TokenRecord, String), ApiError> {
        let (rec, jwt) = self
            .tokens
            .issue(&caller.account, ttl_secs)
            .map_err(ApiError::Internal)?;
        self.records.put(TOKENS, &rec.id, &rec).await?;
        Ok((rec, jwt))
    }

    /// The caller identity of API token `jwt`: signed by us, not expired, not revoked, and of
    /// an account that still exists.
    /// The caller a request with the admin token acts for when it names account `name`
    /// ([`ACT_AS`](crate::auth::ACT_AS)): that account as it is recorded; None if there is none.
    pub async fn act_as(&self, name: &str) -> Option<Caller> {
        let acc = self.account(name).await.ok()??;
        Some(Caller {
            account: acc.name,
            admin: acc.admin,
        })
    }

    pub async fn verify_token(&self, jwt: &str) -> Option<Caller> {
        let c = self.tokens.claims(jwt)?;
        let rec: TokenRecord = self.records.get(TOKENS, &c.jti).await.ok()??;
        if rec.account != c.sub {
            return None;
        }
        let acc = self.account(&c.sub).await.ok()??;
        Some(Caller {
            account: acc.name,
            admin: acc.admin,
        })
    }

    /// The caller's tokens, oldest first.
    pub async fn tokens_of(&self, caller: &Caller) -> Result<Vec<TokenRecord>, ApiError> {
        let mut v: Vec<TokenRecord> = self
            .records
            .list::<TokenRecord>(TOKENS)
            .await?
            .into_iter()
            .filter(|t| t.account == caller.account)
            .collect();
        v.sort_by_key(|t| t.created_at);
        Ok(v)
    }

    /// Revokes the caller's token `id`; false if it has none of that id.
    pub async fn revoke_token(&self, caller: &Caller, id: &str) -> Result<bool, ApiError> {
        match self.records.get::<TokenRecord>(TOKENS, id).await? {
            Some(t) if t.account == caller.account => Ok(self.records.delete(TOKENS, id).await?),
            _ => Ok(false),
        }
    }

    /// Makes an account for a verified key without one (`line`, OpenSSH text) named `name`.
    pub async fn sign_up(&self, name: &str, line: &str) -> Result<Account, ApiError> {
        hutch_core::names::validate_name(name)
            .map_err(|e| ApiError::Invalid(format!("account {e}")))?;
        let acc = Account {
            name: name.to_string(),
            admin: false,
            keys: vec![line.to_string()],
            created_at: hutch_core::now(),
            quota: None,
        };
        if !self.records.create(ACCOUNTS, name, &acc).await? {
            return Err(ApiError::Conflict(format!(
                "account {name} exists; choose another name"
            )));
        }
        Ok(acc)
    }

    /// A one-time sign-up code valid `hours` (admins).
    pub async fn create_invite(&self, caller: &Caller, hours: u64) -> Result<String, ApiError> {
        super::admin_only(caller, "making invites")?;
        if !(1..=MAX_INVITE_TTL_HOURS).contains(&hours) {
            return Err(ApiError::Invalid(format!(
                "--ttl takes 1 to {MAX_INVITE_TTL_HOURS} hours"
            )));
        }
        let code = hex::encode(rand::random::<[u8; 16]>());
        let now = hutch_core::now();
        let inv = Invite {
            created_by: caller.account.clone(),
            created_at: now,
            expires_at: now + hours * 3600,
        };
        self.records.create(INVITES, &hash(&code), &inv).await?;
        Ok(code)
    }

    /// Redeems `code` for a new account `name` holding key `line`. The code is burnt before the
    /// account is made (of two redemptions one wins); a taken name gives it back.
    pub async fn redeem_invite(
        &self,
        code: &str,
        name: &str,
        line: &str,
    ) -> Result<Account, ApiError> {
        hutch_core::names::validate_name(name)
            .map_err(|e| ApiError::Invalid(format!("account {e}")))?;
        let key = hash(code);
        let inv: Option<Invite> = self.records.get(INVITES, &key).await?;
        let valid = inv
            .as_ref()
            .is_some_and(|i| i.expires_at > hutch_core::now());
        if !valid || !self.records.delete(INVITES, &key).await? {
            return Err(ApiError::NotFound {
                kind: "invite",
                name: "(code)".into(),
            });
        }
        match self.sign_up(name, line).await {
            Ok(acc) => Ok(acc),
            Err(e) => {
                if let Some(i) = inv {
                    let _ = self.records.put(INVITES, &key, &i).await;
                }
                Err(e)
            }
        }
    }
}
