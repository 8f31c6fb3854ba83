//! VM names: validation and random `adjective-animal` names.

use rand::seq::SliceRandom;
use rand::Rng;

const ADJECTIVES: &[&str] = &[
    "bold", "brave", "calm", "clever", "eager", "fancy", "gentle", "happy", "jolly", "keen",
    "lively", "lucky", "mellow", "nimble", "proud", "quick", "quiet", "rapid", "shy", "sunny",
    "swift", "tidy", "vivid", "witty", "zesty",
];
const ANIMALS: &[&str] = &[
    "badger", "bison", "crane", "dingo", "eagle", "ferret", "fox", "gecko", "heron", "ibis",
    "koala", "lemur", "lynx", "marten", "newt", "otter", "panda", "quail", "raven", "seal",
    "tapir", "viper", "walrus", "yak", "zebra",
];

/// A random `adjective-animal` name.
pub fn random_name() -> String {
    let mut r = rand::thread_rng();
    format!(
        "{}-{}",
        ADJECTIVES.choose(&mut r).unwrap_or(&"bold"),
        ANIMALS.choose(&mut r).unwrap_or(&"fox")
    )
}

/// A random 12-hex-digit id.
pub fn random_id() -> String {
    format!(
        "{:012x}",
        rand::thread_rng().gen::<u64>() & 0xffff_ffff_ffff
    )
}

/// Checks a VM name: it becomes a hostname and (later) a DNS label, so it follows RFC 1123
/// label rules: 1-63 characters of `a-z`, `0-9` and `-`, not starting or ending with `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("name {name:?} must be 1 to 63 characters long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "name {name:?} may contain only lowercase letters, digits and '-'"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("name {name:?} must not start or end with '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for _ in 0..50 {
            validate_name(&random_name()).unwrap();
        }
        assert!(validate_name("web-1").is_ok());
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", "../x", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(random_id().len(), 12);
    }
}
