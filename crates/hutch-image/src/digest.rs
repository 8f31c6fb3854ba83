//! [`Digest`]: a content digest as hutch accepts it, `sha256:` and exactly 64 lowercase hex
//! digits. It is parsed once, where text enters (deserialization of manifests, indexes,
//! archive metadata; references; registry answers), so a value of this type is always safe to
//! use as a file name in the blob store.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A parsed `sha256:<64 lowercase hex>` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {shown}: {why}")]
pub struct DigestError {
    shown: String,
    why: &'static str,
}

impl Digest {
    /// Parses `s`; anything but `sha256:` followed by 64 lowercase hex digits is refused.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let err = |why| DigestError {
            shown: format!("{:?}", s.chars().take(100).collect::<String>()),
            why,
        };
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| err("only sha256 digests are supported"))?;
        if hex.len() != 64 {
            return Err(err("a sha256 digest has 64 hex digits"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err("only lowercase hex digits are allowed"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest::from_hasher(sha2::Sha256::digest(data).into())
    }

    /// The digest of a finished SHA-256 hash.
    pub fn from_hasher(sum: [u8; 32]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(sum)))
    }

    /// The 64 hex digits (a file name in the blob store).
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, o: &str) -> bool {
        self.0 == o
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, o: &&str) -> bool {
        self.0 == *o
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn accepts_only_sha256_lowercase_hex() {
        let d = Digest::parse(GOOD).unwrap();
        assert_eq!(d.hex().len(), 64);
        assert_eq!(d.to_string(), GOOD);
        for bad in [
            "",
            "sha256:",
            "sha256:../../../../etc/passwd",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "a".repeat(63)),
            &format!("sha256:{}", "a".repeat(65)),
            &format!("sha512:{}", "a".repeat(64)),
            &format!("SHA256:{}", "a".repeat(64)),
            &format!("sha256:{}/", "a".repeat(63)),
            &format!(" sha256:{}", "a".repeat(64)),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
        let e = serde_json::from_str::<Digest>(r#""sha256:../../x""#).unwrap_err();
        assert!(e.to_string().contains("invalid digest"), "{e}");
        assert_eq!(
            serde_json::from_str::<Digest>(&format!("\"{GOOD}\"")).unwrap(),
            d
        );
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{GOOD}\""));
        assert_eq!(
            Digest::of(b""),
            *"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever the text, a parsed digest is exactly `sha256:` + 64 of [0-9a-f], so its hex
        /// part is a single safe file name.
        #[test]
        fn parsed_digests_are_safe_names(s in "(sha256:)?[0-9a-fA-F./ :%-]{0,70}") {
            if let Ok(d) = Digest::parse(&s) {
                prop_assert_eq!(d.as_str(), s.as_str());
                prop_assert_eq!(d.hex().len(), 64);
                prop_assert!(d.hex().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            }
        }

        #[test]
        fn valid_digests_round_trip(h in "[0-9a-f]{64}") {
            let s = format!("sha256:{h}");
            let d = Digest::parse(&s).unwrap();
            let j = serde_json::to_string(&d).unwrap();
            prop_assert_eq!(serde_json::from_str::<Digest>(&j).unwrap(), d);
        }
    }
}
