//! Registry credentials (given, or read from a docker config file) and the `WWW-Authenticate`
//! challenges a registry answers with. Both parse untrusted text; neither panics on any input
//! (property-tested).

use base64::Engine;
use std::path::Path;

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

/// Credentials for `registry` from a docker config file (`~/.docker/config.json` format).
pub fn docker_config_credentials(registry: &str, config: &Path) -> Option<Credentials> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(config).ok()?).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let keys: Vec<String> = if registry == "docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ]
    } else {
        vec![
            registry.into(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
    };
    let entry = keys.iter().find_map(|k| auths.get(k))?;
    if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
        let dec = base64::engine::general_purpose::STANDARD.decode(a).ok()?;
        let (u, p) = std::str::from_utf8(&dec).ok()?.split_once(':')?;
        return Some(Credentials {
            username: u.into(),
            password: p.into(),
        });
    }
    Some(Credentials {
        username: entry.get("username")?.as_str()?.into(),
        password: entry.get("password")?.as_str()?.into(),
    })
}

/// A challenge from `WWW-Authenticate`.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// What follows a parameter: any mix of commas and whitespace before the next one.
fn skip_sep(s: &str) -> &str {
    s.trim_start_matches(|c: char| c == ',' || c.is_whitespace())
}

pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, params) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let (mut service, mut scope) = (None, None);
    // key="value" pairs; values may contain commas (scopes), so split on `",`.
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (v, next) = if let Some(stripped) = after.strip_prefix('"') {
            let end = stripped.find('"')?;
            (&stripped[..end], skip_sep(&stripped[end + 1..]))
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], skip_sep(&after[end..]))
        };
        match k.trim() {
            "realm" => realm = Some(v.to_string()),
            "service" => service = Some(v.to_string()),
            "scope" => scope = Some(v.to_string()),
            _ => {}
        }
        rest = next;
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
        scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/node:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/node:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn docker_config() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw:with:colons");
        std::fs::write(&p, format!(r#"{{"auths":{{"localhost:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"u","password":"p"}}}}}}"#)).unwrap();
        let c = docker_config_credentials("localhost:5000", &p).unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("bob", "pw:with:colons")
        );
        assert_eq!(
            docker_config_credentials("docker.io", &p).unwrap().username,
            "u"
        );
        assert!(docker_config_credentials("ghcr.io", &p).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, failure_persistence: None, ..Default::default() })]

        /// Any header text: no panic, and a Bearer answer always has a realm.
        #[test]
        fn challenge_parser_takes_anything(s in "(Bearer |Basic |bearer )?[ -~]{0,120}") {
            if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(&s) {
                proptest::prop_assert!(s.contains(&realm));
            }
        }

        /// Well-formed challenges, parameters in any order and spacing, parse back exactly.
        #[test]
        fn bearer_challenges_round_trip(
            realm in "https?://[a-z0-9.:/_-]{1,40}",
            service in proptest::option::of("[a-zA-Z0-9._ -]{0,20}"),
            scope in proptest::option::of("[a-z0-9:/,._-]{0,40}"),
            rev in proptest::bool::ANY,
            sep in proptest::sample::select(vec![",", ", ", " ,"]),
        ) {
            let mut params = vec![format!("realm=\"{realm}\"")];
            if let Some(s) = &service {
                params.push(format!("service=\"{s}\""));
            }
            if let Some(s) = &scope {
                params.push(format!("scope=\"{s}\""));
            }
            if rev {
                params.reverse();
            }
            let h = format!("Bearer {}", params.join(sep));
            proptest::prop_assert_eq!(
                parse_challenge(&h),
                Some(Challenge::Bearer { realm, service, scope })
            );
        }
    }
}
