//! Name handling shared by both listeners: plain lowercase label lists, never hickory's escaped
//! text form, so a label that carries a '.' (legal on the wire) can never pass for two labels in
//! the strings handed to the [`Directory`](crate::Directory).

use hickory_proto::rr::Name;

/// A name as lowercase labels, each checked to be a host-name label: ASCII letters, digits,
/// '-' and '_' (the latter for SRV-style names), 1 to 63 bytes. The root name is no labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Labels(pub(crate) Vec<String>);

impl Labels {
    /// The labels of `name`, lowercased; None when a label holds any other byte.
    pub(crate) fn of(name: &Name) -> Option<Labels> {
        let mut out = Vec::with_capacity(usize::from(name.num_labels()));
        for label in name.iter() {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            if !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            {
                return None;
            }
            // Checked above: ASCII only.
            let text: String = label
                .iter()
                .map(|b| b.to_ascii_lowercase() as char)
                .collect();
            out.push(text);
        }
        Some(Labels(out))
    }

    /// Parses a configured domain such as `hutch.internal` (a trailing dot is allowed).
    pub(crate) fn parse_domain(domain: &str) -> Option<Labels> {
        let trimmed = domain.strip_suffix('.').unwrap_or(domain);
        if trimmed.is_empty() || trimmed.len() > 200 {
            return None;
        }
        let name = Name::from_ascii(trimmed).ok()?;
        let labels = Labels::of(&name)?;
        if labels.0.is_empty() {
            return None;
        }
        Some(labels)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The labels before `domain` when this name is `domain` or beneath it (empty for the apex).
    pub(crate) fn under<'a>(&'a self, domain: &Labels) -> Option<&'a [String]> {
        let n = self.0.len().checked_sub(domain.0.len())?;
        if self.0[n..] == domain.0[..] {
            Some(&self.0[..n])
        } else {
            None
        }
    }

    /// The dotted text form without a trailing dot (`""` for the root).
    pub(crate) fn dotted(&self) -> String {
        self.0.join(".")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(s: &str) -> Option<Labels> {
        Labels::of(&Name::from_ascii(s).unwrap())
    }

    #[test]
    fn lowercases_and_checks_labels() {
        assert_eq!(
            labels("WWW.Example.COM.").unwrap().dotted(),
            "www.example.com"
        );
        assert_eq!(labels("_sip._tcp.x.org").unwrap().len(), 4);
        let raw = |l: &[&[u8]]| Labels::of(&Name::from_labels(l.iter().copied()).unwrap());
        assert!(
            raw(&[b"a.b", b"example", b"com"]).is_none(),
            "a dot inside a label"
        );
        assert!(
            raw(&[b"a\0b", b"example"]).is_none(),
            "a NUL inside a label"
        );
        assert!(raw(&[b"*", b"example"]).is_none());
        assert!(raw(&[b"ok", b"example"]).is_some());
        assert_eq!(labels(".").unwrap().len(), 0);
    }

    #[test]
    fn under_domain() {
        let d = Labels::parse_domain("Hutch.Test.").unwrap();
        let n = labels("a.b.hutch.test").unwrap();
        assert_eq!(n.under(&d).unwrap(), &["a".to_string(), "b".to_string()]);
        assert_eq!(labels("hutch.test").unwrap().under(&d).unwrap().len(), 0);
        assert!(labels("hutch.test.org").unwrap().under(&d).is_none());
        assert!(labels("xhutch.test").unwrap().under(&d).is_none());
        assert!(labels("test").unwrap().under(&d).is_none());
        assert!(Labels::parse_domain("").is_none());
        assert!(Labels::parse_domain(".").is_none());
        assert!(Labels::parse_domain("a b.test").is_none());
    }
}
