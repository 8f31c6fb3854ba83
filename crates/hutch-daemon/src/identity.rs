//! VM identity tokens: short-lived JWTs (compact JWS, ES256 = ECDSA P-256 with SHA-256, fixed
//! 64-byte `r || s` signatures) that say "this request comes from VM <id>", for outside services
//! to verify against hutchd's public key set (JWKS) without a shared secret.
//!
//! The signing key is kept as an unencrypted PKCS#8 v1 DER document (the form `ring` generates
//! and parses) in a file that is a secret like the others: created 0600, written atomically
//! (temp file, fsync, rename, directory fsync) and refused at start when others could read it
//! (see [`crate::secrets`]). A file that is no P-256 PKCS#8 key is refused, not replaced: a new
//! key would silently invalidate every token in flight and every verifier's cached key set.
//!
//! A key's `kid` is its RFC 7638 JWK thumbprint (base64url SHA-256 of the canonical
//! `{"crv","kty","x","y"}` JSON), so it is stable for the key and changes with it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The only signature algorithm hutch issues or accepts.
pub const ALG: &str = "ES256";
/// Tokens longer than this are refused before anything is decoded.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// How far in the future `iat` may be (clock skew between hutchd and a verifier).
pub const IAT_LEEWAY_SECS: u64 = 60;

/// A P-256 coordinate or scalar, in bytes.
const COORD: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file (including a key file others could read).
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    #[error(
        "{path}: not a PKCS#8 ECDSA P-256 key ({reason}); move it away to have hutchd make a \
         new one (tokens signed with the old key then stop verifying)"
    )]
    BadKey { path: String, reason: String },
    #[error("generating an ECDSA P-256 key failed")]
    Generate,
    #[error("signing failed")]
    Sign,
    #[error("encoding the claims: {0}")]
    Encode(String),
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token algorithm {0:?} is not ES256")]
    Algorithm(String),
    #[error("no usable ES256 key {0:?} in the key set")]
    UnknownKey(String),
    #[error("token signature does not verify")]
    Signature,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("token issued in the future (iat {iat}, now {now})")]
    NotYetValid { iat: u64, now: u64 },
    #[error("token audience {got:?} is not {want:?}")]
    Audience { got: String, want: String },
}

/// What an identity token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityClaims {
    /// Who issued it (hutchd's configured issuer, e.g. its API URL).
    pub iss: String,
    /// `vm:<id>`.
    pub sub: String,
    /// Whom it is for: the service the VM presents it to, which must check it.
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    pub vm_id: String,
    pub vm_name: String,
    /// The account owning the VM; absent for the admin's VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// hutchd's identity signing key (ES256).
pub struct IdentityKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    x: String,
    y: String,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("IdentityKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn b64(d: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(d)
}

/// The RFC 7638 thumbprint of a P-256 JWK with coordinates `x`, `y` (base64url).
fn thumbprint(x: &str, y: &str) -> String {
    // Members in lexicographic order, no whitespace; x and y are base64url, so need no escaping.
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

impl IdentityKey {
    /// Loads the ES256 signing key from `path` (an unencrypted PKCS#8 v1 DER document),
    /// generating it on first use: mode 0600, written atomically (temp + fsync + rename +
    /// directory fsync). The directory must exist. A key file others could read, that is a
    /// symlink or that is not a P-256 PKCS#8 key is refused.
    pub fn load_or_create(path: &Path) -> Result<IdentityKey, IdentityError> {
        let der = match crate::secrets::read(path)? {
            Some(der) => der,
            None => {
                let der = Self::generate_pkcs8()?;
                crate::secrets::write(path, &der)?;
                der
            }
        };
        Self::from_pkcs8(&der).map_err(|e| match e {
            IdentityError::BadKey { reason, .. } => IdentityError::BadKey {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// A fresh key kept in memory only (tests, throwaway daemons).
    pub fn generate() -> Result<IdentityKey, IdentityError> {
        Self::from_pkcs8(&Self::generate_pkcs8()?)
    }

    fn generate_pkcs8() -> Result<Vec<u8>, IdentityError> {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| IdentityError::Generate)
    }

    /// The key in `der` (unencrypted PKCS#8 v1, P-256).
    pub fn from_pkcs8(der: &[u8]) -> Result<IdentityKey, IdentityError> {
        let rng = SystemRandom::new();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng).map_err(|e| {
                IdentityError::BadKey {
                    path: "(in memory)".into(),
                    reason: e.to_string(),
                }
            })?;
        // The public key is the uncompressed SEC1 point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        if point.len() != 1 + 2 * COORD || point[0] != 4 {
            return Err(IdentityError::BadKey {
                path: "(in memory)".into(),
                reason: "unexpected public key encoding".into(),
            });
        }
        let x = b64(&point[1..1 + COORD]);
        let y = b64(&point[1 + COORD..]);
        let kid = thumbprint(&x, &y);
        Ok(IdentityKey {
            pair,
            rng,
            kid,
            x,
            y,
        })
    }

    /// The key id: the RFC 7638 JWK thumbprint of the public key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": self.x,
            "y": self.y,
            "kid": self.kid,
            "alg": ALG,
            "use": "sig",
        })
    }

    /// The JWKS document: `{"keys":[<jwk>]}`.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.jwk()] })
    }

    /// A compact JWS (header `{"alg":"ES256","kid":..,"typ":"JWT"}`) for `claims`.
    pub fn sign(&self, claims: &IdentityClaims) -> Result<String, IdentityError> {
        let header = serde_json::json!({"alg": ALG, "typ": "JWT", "kid": self.kid});
        let body = serde_json::to_vec(claims).map_err(|e| IdentityError::Encode(e.to_string()))?;
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(&body));
        let sig = self
            .pair
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| IdentityError::Sign)?;
        Ok(format!("{input}.{}", b64(sig.as_ref())))
    }
}

fn decode(part: &str, what: &'static str) -> Result<Vec<u8>, IdentityError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| IdentityError::Malformed(what))
}

/// The uncompressed P-256 point of the key `kid` in `jwks`, when it is an EC P-256 key usable for
/// ES256 signatures.
fn find_key(jwks: &serde_json::Value, kid: &str) -> Result<Vec<u8>, IdentityError> {
    let unknown = || IdentityError::UnknownKey(kid.to_string());
    let keys = jwks["keys"].as_array().ok_or_else(unknown)?;
    let key = keys
        .iter()
        .find(|k| k["kid"].as_str() == Some(kid))
        .ok_or_else(unknown)?;
    let optional_is = |field: &str, want: &str| key.get(field).is_none_or(|v| v == want);
    if key["kty"] != "EC"
        || key["crv"] != "P-256"
        || !optional_is("alg", ALG)
        || !optional_is("use", "sig")
    {
        return Err(unknown());
    }
    let coord = |name: &str| -> Result<Vec<u8>, IdentityError> {
        let c = URL_SAFE_NO_PAD
            .decode(key[name].as_str().ok_or_else(unknown)?)
            .map_err(|_| unknown())?;
        if c.len() != COORD {
            return Err(unknown());
        }
        Ok(c)
    };
    let mut point = vec![4u8];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    Ok(point)
}

/// Verifies `token` against the key set `jwks`: an ES256 compact JWS whose `kid` names a P-256
/// key in the set, whose signature verifies, whose `aud` is `audience`, which has not expired at
/// `now` (`exp <= now` is expired) and was not issued more than [`IAT_LEEWAY_SECS`] after `now`.
/// The issuer is the caller's to check.
pub fn verify(
    jwks: &serde_json::Value,
    token: &str,
    audience: &str,
    now: u64,
) -> Result<IdentityClaims, IdentityError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(IdentityError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(IdentityError::Malformed("not three dot-separated parts"));
    };
    let header: serde_json::Value = serde_json::from_slice(&decode(header, "header")?)
        .map_err(|_| IdentityError::Malformed("header is not JSON"))?;
    if !header.is_object() {
        return Err(IdentityError::Malformed("header is not a JSON object"));
    }
    match header["alg"].as_str() {
        Some(ALG) => {}
        Some(other) => return Err(IdentityError::Algorithm(other.to_string())),
        None => return Err(IdentityError::Algorithm(header["alg"].to_string())),
    }
    // Extensions we do not understand must not be ignored (RFC 7515 section 4.1.11).
    if header.get("crit").is_some() {
        return Err(IdentityError::Malformed("critical header extensions"));
    }
    if header.get("typ").is_some_and(|t| t != "JWT") {
        return Err(IdentityError::Malformed("typ is not JWT"));
    }
    let kid = header["kid"]
        .as_str()
        .ok_or(IdentityError::Malformed("no kid"))?;
    let point = find_key(jwks, kid)?;
    let sig = decode(sig, "signature")?;
    let signed = &token[..header_body_len(token)];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| IdentityError::Signature)?;
    let claims: IdentityClaims = serde_json::from_slice(&decode(body, "payload")?)
        .map_err(|_| IdentityError::Malformed("payload is not identity claims"))?;
    if claims.exp <= now {
        return Err(IdentityError::Expired {
            exp: claims.exp,
            now,
        });
    }
    if claims.iat > now.saturating_add(IAT_LEEWAY_SECS) {
        return Err(IdentityError::NotYetValid {
            iat: claims.iat,
            now,
        });
    }
    if claims.aud != audience {
        return Err(IdentityError::Audience {
            got: claims.aud,
            want: audience.to_string(),
        });
    }
    Ok(claims)
}

/// The length of `header.payload` in a token with three parts.
fn header_body_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;

    const NOW: u64 = 1_700_000_000;

    fn claims() -> IdentityClaims {
        IdentityClaims {
            iss: "https://hutch.example".into(),
            sub: "vm:0123abcd".into(),
            aud: "https://vault.example".into(),
            iat: NOW,
            exp: NOW + 600,
            vm_id: "0123abcd".into(),
            vm_name: "web".into(),
            owner: Some("alice".into()),
        }
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(str::to_string).collect()
    }

    fn json_part(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn sign_verify_round_trip_and_header() {
        let key = IdentityKey::generate().unwrap();
        let token = key.sign(&claims()).unwrap();
        let got = verify(&key.jwks(), &token, "https://vault.example", NOW).unwrap();
        assert_eq!(got, claims());
        let p = parts(&token);
        assert_eq!(p.len(), 3);
        let header = json_part(&p[0]);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], key.kid());
        // Fixed-size r || s, not DER.
        assert_eq!(URL_SAFE_NO_PAD.decode(&p[2]).unwrap().len(), 64);
        let jwk = &key.jwks()["keys"][0];
        for (field, want) in [
            ("kty", "EC"),
            ("crv", "P-256"),
            ("alg", "ES256"),
            ("use", "sig"),
        ] {
            assert_eq!(jwk[field], want, "{field}");
        }
        // An admin VM's token has no owner claim at all.
        let mut c = claims();
        c.owner = None;
        let token = key.sign(&c).unwrap();
        assert!(json_part(&parts(&token)[1]).get("owner").is_none());
        assert_eq!(
            verify(&key.jwks(), &token, &c.aud, NOW).unwrap().owner,
            None
        );
    }

    #[test]
    fn tampering_audience_expiry_and_keys_are_rejected() {
        let key = IdentityKey::generate().unwrap();
        let jwks = key.jwks();
        let token = key.sign(&claims()).unwrap();
        let aud = "https://vault.example";
        let p = parts(&token);

        // Another VM's claims under this signature.
        let mut other = claims();
        other.vm_id = "ffffffff".into();
        other.sub = "vm:ffffffff".into();
        let forged = format!(
            "{}.{}.{}",
            p[0],
            b64(&serde_json::to_vec(&other).unwrap()),
            p[2]
        );
        assert!(matches!(
            verify(&jwks, &forged, aud, NOW),
            Err(IdentityError::Signature)
        ));
        // A flipped signature bit.
        let mut sig = URL_SAFE_NO_PAD.decode(&p[2]).unwrap();
        sig[10] ^= 1;
        let flipped = format!("{}.{}.{}", p[0], p[1], b64(&sig));
        assert!(matches!(
            verify(&jwks, &flipped, aud, NOW),
            Err(IdentityError::Signature)
        ));

        assert!(matches!(
            verify(&jwks, &token, "https://other.example", NOW),
            Err(IdentityError::Audience { .. })
        ));
        assert!(verify(&jwks, &token, aud, NOW + 599).is_ok());
        assert!(matches!(
            verify(&jwks, &token, aud, NOW + 600),
            Err(IdentityError::Expired { .. })
        ));
        assert!(verify(&jwks, &token, aud, NOW - IAT_LEEWAY_SECS).is_ok());
        assert!(matches!(
            verify(&jwks, &token, aud, NOW - IAT_LEEWAY_SECS - 1),
            Err(IdentityError::NotYetValid { .. })
        ));

        // Signed by another key: its kid is not in this set.
        let stranger = IdentityKey::generate().unwrap();
        assert_ne!(stranger.kid(), key.kid());
        let theirs = stranger.sign(&claims()).unwrap();
        assert!(matches!(
            verify(&jwks, &theirs, aud, NOW),
            Err(IdentityError::UnknownKey(_))
        ));
        // ... nor does claiming this set's kid help.
        let mut tp = parts(&theirs);
        tp[0] = b64(
            serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": key.kid()})
                .to_string()
                .as_bytes(),
        );
        assert!(matches!(
            verify(&jwks, &tp.join("."), aud, NOW),
            Err(IdentityError::Signature)
        ));
        // A set whose key under this kid has other coordinates.
        let mut swapped = jwks.clone();
        swapped["keys"][0]["x"] = stranger.jwks()["keys"][0]["x"].clone();
        swapped["keys"][0]["y"] = stranger.jwks()["keys"][0]["y"].clone();
        assert!(matches!(
            verify(&swapped, &token, aud, NOW),
            Err(IdentityError::Signature)
        ));
        // A key of another type or curve under the right kid is not used.
        for (field, value) in [("kty", "RSA"), ("crv", "P-384"), ("alg", "RS256")] {
            let mut bad = jwks.clone();
            bad["keys"][0][field] = value.into();
            assert!(
                matches!(
                    verify(&bad, &token, aud, NOW),
                    Err(IdentityError::UnknownKey(_))
                ),
                "{field}"
            );
        }
        assert!(verify(&serde_json::json!({}), &token, aud, NOW).is_err());
    }

    #[test]
    fn other_algorithms_and_malformed_tokens_are_rejected() {
        let key = IdentityKey::generate().unwrap();
        let jwks = key.jwks();
        let aud = "https://vault.example";
        let body = b64(&serde_json::to_vec(&claims()).unwrap());
        let header = |h: serde_json::Value| b64(h.to_string().as_bytes());

        let none = format!(
            "{}.{body}.",
            header(serde_json::json!({"alg": "none", "kid": key.kid()}))
        );
        assert!(matches!(
            verify(&jwks, &none, aud, NOW),
            Err(IdentityError::Algorithm(a)) if a == "none"
        ));
        // HS256 keyed with the public key's bytes (the classic key-confusion forgery).
        let h = header(serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": key.kid()}));
        let input = format!("{h}.{body}");
        let mut mac = Hmac::<Sha256>::new_from_slice(key.pair.public_key().as_ref()).unwrap();
        mac.update(input.as_bytes());
        let hs = format!("{input}.{}", b64(&mac.finalize().into_bytes()));
        assert!(matches!(
            verify(&jwks, &hs, aud, NOW),
            Err(IdentityError::Algorithm(a)) if a == "HS256"
        ));
        // No alg at all.
        let h = header(serde_json::json!({"kid": key.kid()}));
        assert!(matches!(
            verify(&jwks, &format!("{h}.{body}.AAAA"), aud, NOW),
            Err(IdentityError::Algorithm(_))
        ));

        let good = key.sign(&claims()).unwrap();
        let p = parts(&good);
        // A crit extension in an otherwise valid, correctly signed token.
        let h = header(serde_json::json!({"alg": "ES256", "kid": key.kid(), "crit": ["exp"]}));
        let input = format!("{h}.{}", p[1]);
        let sig = key.pair.sign(&key.rng, input.as_bytes()).unwrap();
        let crit = format!("{input}.{}", b64(sig.as_ref()));
        assert!(matches!(
            verify(&jwks, &crit, aud, NOW),
            Err(IdentityError::Malformed(_))
        ));
        for bad in [
            String::new(),
            "a.b".into(),
            format!("{good}.x"),
            format!("{}.{}.{}=", p[0], p[1], p[2]),
            format!("!!.{}.{}", p[1], p[2]),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(verify(&jwks, &bad, aud, NOW).is_err(), "{bad:.40}");
        }
    }

    #[test]
    fn signature_verifies_independently_with_the_jwks_point() {
        let key = IdentityKey::generate().unwrap();
        let token = key.sign(&claims()).unwrap();
        let jwks: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&key.jwks()).unwrap()).unwrap();
        let jwk = &jwks["keys"][0];
        let coord = |n: &str| URL_SAFE_NO_PAD.decode(jwk[n].as_str().unwrap()).unwrap();
        let mut point = vec![4u8];
        point.extend(coord("x"));
        point.extend(coord("y"));
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let pk = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &point,
        );
        pk.verify(signed.as_bytes(), &sig).unwrap();
        assert!(pk.verify(format!("{signed}x").as_bytes(), &sig).is_err());
        // The kid is the RFC 7638 thumbprint, computed here with another SHA-256.
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        );
        assert_eq!(jwk["kid"], b64(&Sha256::digest(canonical.as_bytes())));
    }

    #[test]
    fn key_persists_private_and_bad_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("identity-key.p8");
        let a = IdentityKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = IdentityKey::load_or_create(&path).unwrap();
        assert_eq!(a.jwks(), b.jwks());
        assert_eq!(a.kid(), b.kid());
        let token = a.sign(&claims()).unwrap();
        verify(&b.jwks(), &token, "https://vault.example", NOW).unwrap();
        // The file is the PKCS#8 DER document itself.
        let der = std::fs::read(&path).unwrap();
        assert_eq!(IdentityKey::from_pkcs8(&der).unwrap().kid(), a.kid());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temp");

        // Readable by others: refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            IdentityKey::load_or_create(&path),
            Err(IdentityError::Secret(_))
        ));
        // Not a key: refused and left alone.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"not a key").unwrap();
        let e = IdentityKey::load_or_create(&path).unwrap_err();
        assert!(matches!(e, IdentityError::BadKey { .. }), "{e}");
        assert!(e.to_string().contains("identity-key.p8"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a key");
        // A missing directory is an error, not a key in memory only.
        assert!(IdentityKey::load_or_create(&d.path().join("no/such/key")).is_err());
        assert_eq!(
            format!("{a:?}"),
            format!("IdentityKey {{ kid: {:?}, .. }}", a.kid())
        );
    }
}
