//! Share tokens: `base64url(payload) "." base64url(HMAC-SHA256(key, payload))`, where the payload
//! is `v1:<expiry unix secs>:<port>:<vm id>`. The vm id comes last so it may hold any character.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The query parameter that carries a share token.
pub const SHARE_PARAM: &str = "hutch_share";
/// Share cookies are named `hutch_share_<port>`.
pub const SHARE_COOKIE_PREFIX: &str = "hutch_share_";
/// Longest token accepted (before any decoding).
const MAX_TOKEN_LEN: usize = 1024;

/// What a good token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareClaims {
    pub vm: String,
    pub port: u16,
    /// Unix seconds.
    pub expires: u64,
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length")
}

pub(crate) fn sign(key: &[u8], vm: &str, port: u16, expires: u64) -> String {
    let payload = format!("v1:{expires}:{port}:{vm}");
    let mut m = mac(key);
    m.update(payload.as_bytes());
    let tag = m.finalize().into_bytes();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(payload.as_bytes()),
        URL_SAFE_NO_PAD.encode(tag)
    )
}

/// The claims of `token` when its MAC is good (constant-time compare), it names `vm` and `port`,
/// and it has not expired at `now`.
pub(crate) fn verify(
    key: &[u8],
    token: &str,
    vm: &str,
    port: u16,
    now: u64,
) -> Option<ShareClaims> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let (payload_b64, tag_b64) = token.split_once('.')?;
    let payload = URL_SAFE_NO_PAD.decode(payload_b64).ok()?;
    let tag = URL_SAFE_NO_PAD.decode(tag_b64).ok()?;
    let mut m = mac(key);
    m.update(&payload);
    m.verify_slice(&tag).ok()?;
    let payload = String::from_utf8(payload).ok()?;
    let mut parts = payload.splitn(4, ':');
    if parts.next()? != "v1" {
        return None;
    }
    let expires: u64 = parts.next()?.parse().ok()?;
    let tport: u16 = parts.next()?.parse().ok()?;
    let tvm = parts.next()?;
    if tvm != vm || tport != port || expires <= now {
        return None;
    }
    Some(ShareClaims {
        vm: tvm.to_string(),
        port: tport,
        expires,
    })
}

/// Splits the share parameter out of a query string: `(token, rest of the query)`.
/// `None` when the query has no share parameter.
pub(crate) fn take_param(query: &str) -> Option<(String, String)> {
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((k, v)) if k == SHARE_PARAM => {
                if token.is_none() {
                    token = Some(v.to_string());
                }
            }
            _ if pair == SHARE_PARAM => {
                if token.is_none() {
                    token = Some(String::new());
                }
            }
            _ => {
                if !pair.is_empty() {
                    rest.push(pair);
                }
            }
        }
    }
    token.map(|t| (t, rest.join("&")))
}

/// The share cookie values for `port` in the `Cookie` header values.
pub(crate) fn cookie_tokens<'a>(
    cookies: impl Iterator<Item = &'a str>,
    port: u16,
) -> impl Iterator<Item = &'a str> {
    let name = format!("{SHARE_COOKIE_PREFIX}{port}");
    cookies.flat_map(|h| h.split(';')).filter_map(move |c| {
        let (k, v) = c.trim().split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// A `Cookie` header value without any `hutch_share_*` cookie; `None` when nothing is left.
pub(crate) fn strip_cookies<'a>(cookies: impl Iterator<Item = &'a str>) -> Option<String> {
    let kept: Vec<&str> = cookies
        .flat_map(|h| h.split(';'))
        .map(str::trim)
        .filter(|c| {
            !c.is_empty()
                && !c
                    .split('=')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .starts_with(SHARE_COOKIE_PREFIX)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify() {
        let k = b"key";
        let t = sign(k, "vm-1", 8080, 1000);
        assert_eq!(
            verify(k, &t, "vm-1", 8080, 999),
            Some(ShareClaims {
                vm: "vm-1".into(),
                port: 8080,
                expires: 1000
            })
        );
        assert_eq!(verify(k, &t, "vm-1", 8080, 1000), None, "expired");
        assert_eq!(verify(k, &t, "vm-2", 8080, 999), None, "other vm");
        assert_eq!(verify(k, &t, "vm-1", 8081, 999), None, "other port");
        assert_eq!(verify(b"other", &t, "vm-1", 8080, 999), None, "other key");
        // Tampered payload (a later expiry) with the old tag.
        let (_, tag) = t.split_once('.').unwrap();
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode("v1:9999:8080:vm-1"));
        assert_eq!(verify(k, &forged, "vm-1", 8080, 999), None);
        assert_eq!(verify(k, "", "vm-1", 8080, 0), None);
        assert_eq!(verify(k, "a.b.c", "vm-1", 8080, 0), None);
        assert_eq!(verify(k, &"a".repeat(5000), "vm-1", 8080, 0), None);
        // A vm id holding the separator is still bound exactly.
        let t = sign(k, "a:b", 1, 10);
        assert!(verify(k, &t, "a:b", 1, 0).is_some());
        assert!(verify(k, &t, "a", 1, 0).is_none());
    }

    #[test]
    fn params_and_cookies() {
        assert_eq!(take_param("a=1"), None);
        assert_eq!(
            take_param("a=1&hutch_share=T.x&b=2"),
            Some(("T.x".into(), "a=1&b=2".into()))
        );
        assert_eq!(take_param("hutch_share=T"), Some(("T".into(), "".into())));
        let hs = ["a=1; hutch_share_8080=TOK; b=2", "hutch_share_80=X"];
        assert_eq!(
            cookie_tokens(hs.iter().copied(), 8080).collect::<Vec<_>>(),
            vec!["TOK"]
        );
        assert_eq!(
            cookie_tokens(hs.iter().copied(), 80).collect::<Vec<_>>(),
            vec!["X"]
        );
        assert_eq!(strip_cookies(hs.iter().copied()), Some("a=1; b=2".into()));
        assert_eq!(strip_cookies(["hutch_share_1=x"].into_iter()), None);
    }
}
