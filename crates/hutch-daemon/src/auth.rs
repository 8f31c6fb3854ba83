//! Who is calling: API tokens (JWT, HS256, signed with a secret kept in the data dir) issued to
//! an account over SSH, with expiry and revocation; and the caller identity the API acts for.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::Path;

/// The header with which a request bearing the cluster's admin token acts for an account (as
/// that account, with its rights only): how a front door forwards what its SSH users ask.
pub const ACT_AS: &str = "x-hutch-act-as";

/// Marks a request that bore the cluster's admin token (node-to-node routes require it, even
/// when the request acts for an account).
#[derive(Debug, Clone, Copy)]
pub struct NodeToken;

/// The identity a request acts for.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account: String,
    pub admin: bool,
}

impl Caller {
    /// Local callers (unix socket, static admin token).
    pub fn local_admin() -> Caller {
        Caller {
            account: "admin".into(),
            admin: true,
        }
    }

    pub fn sees(&self, owner: Option<&str>) -> bool {
        self.admin || owner == Some(self.account.as_str())
    }

    /// The owner of what this caller creates: None (the admin's namespace: bare VM names, the
    /// shared image library) for the admin, else the account.
    pub fn owner(&self) -> Option<String> {
        (!self.admin).then(|| self.account.clone())
    }

    /// The store key of the VM this caller means by `name`, or None when it may not name it. An
    /// account's names live in its own namespace, so no name it gives can reach another
    /// account's VM; `account/name` is the qualified form (any account's for the admin, its own
    /// for an account).
    pub fn vm_key(&self, name: &str) -> Option<String> {
        if let Some((acct, _)) = name.split_once('/') {
            return (self.admin || acct == self.account).then(|| name.to_string());
        }
        Some(hutch_core::vm_key(self.owner().as_deref(), name))
    }
}

/// An issued token, as stored (never the token itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub account: String,
    pub created_at: u64,
    pub expires_at: u64,
}

/// What a token says: its account (`sub`), id (`jti`), issue and expiry times.
#[derive(Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

pub struct Tokens {
    secret: Vec<u8>,
}

fn b64(d: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
}

impl Tokens {
    pub fn load_or_create(data_dir: &Path) -> Result<Tokens, crate::secrets::SecretError> {
        let secret = crate::secrets::read_or_create(
            &data_dir.join("jwt-secret"),
            |s| s.len() >= 32,
            || rand::random::<[u8; 32]>().to_vec(),
        )?;
        Ok(Tokens { secret })
    }

    fn mac(&self, input: &str) -> Vec<u8> {
        // HMAC accepts keys of any length.
        let mut m = Hmac::<Sha256>::new_from_slice(&self.secret).expect("hmac key");
        m.update(input.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    /// Issues a token for `account` valid for `ttl_secs`; returns its record (to store) and
    /// the token.
    pub fn issue(&self, account: &str, ttl_secs: u64) -> Result<(TokenRecord, String), String> {
        let now = hutch_core::now();
        let rec = TokenRecord {
            id: hex::encode(rand::random::<[u8; 8]>()),
            account: account.into(),
            created_at: now,
            expires_at: now + ttl_secs,
        };
        let claims = Claims {
            sub: rec.account.clone(),
            jti: rec.id.clone(),
            iat: now,
            exp: rec.expires_at,
        };
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64(&serde_json::to_vec(&claims).map_err(|e| e.to_string())?)
        );
        let jwt = format!("{input}.{}", b64(&self.mac(&input)));
        Ok((rec, jwt))
    }

    /// The claims of `jwt` when its signature is ours and it has not expired (whether it was
    /// revoked and its account exists is the service's to check).
    pub fn claims(&self, jwt: &str) -> Option<Claims> {
        let (input, sig) = jwt.rsplit_once('.')?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .ok()?;
        let mut m = Hmac::<Sha256>::new_from_slice(&self.secret).ok()?;
        m.update(input.as_bytes());
        m.verify_slice(&sig).ok()?;
        let (header, body) = input.split_once('.')?;
        let header: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .ok()?,
        )
        .ok()?;
        if header["alg"] != "HS256" {
            return None;
        }
        let c: Claims = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(body)
                .ok()?,
        )
        .ok()?;
        (c.exp > hutch_core::now()).then_some(c)
    }
}
