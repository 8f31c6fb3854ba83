//! Host routing: `<port>-<label>.<domain>` and `<label>.<domain>` (port 80).

/// Where a host routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The VM part of the host (an id or a name), lowercase.
    pub label: String,
    /// The guest port.
    pub port: u16,
}

/// Parses a `Host` value (an optional `:port` is ignored, case does not matter, one trailing dot
/// is allowed) under `domain` (lowercase, without a trailing dot). `None` for hosts not exactly one
/// label below the domain, labels that are not DNS labels, and ports outside 1..=65535.
pub fn parse_host(host: &str, domain: &str) -> Option<Target> {
    if host.is_empty() || host.len() > 255 || host.starts_with('[') || domain.is_empty() {
        return None;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let first = name.strip_suffix(domain)?.strip_suffix('.')?;
    if first.is_empty() || first.len() > 63 || first.contains('.') {
        return None;
    }
    if !first
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return None;
    }
    let digits = first.bytes().take_while(u8::is_ascii_digit).count();
    if (1..=5).contains(&digits) && first.as_bytes().get(digits) == Some(&b'-') {
        let port: u32 = first[..digits].parse().ok()?;
        let label = &first[digits + 1..];
        if !(1..=65535).contains(&port) || !valid_label(label) {
            return None;
        }
        return Some(Target {
            label: label.to_string(),
            port: port as u16,
        });
    }
    if !valid_label(first) {
        return None;
    }
    Some(Target {
        label: first.to_string(),
        port: 80,
    })
}

fn valid_label(l: &str) -> bool {
    !l.is_empty() && !l.starts_with('-') && !l.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(label: &str, port: u16) -> Option<Target> {
        Some(Target {
            label: label.into(),
            port,
        })
    }

    #[test]
    fn routes() {
        let d = "hutch.test";
        assert_eq!(parse_host("8080-myvm.hutch.test", d), t("myvm", 8080));
        assert_eq!(parse_host("8080-MyVM.Hutch.Test:443", d), t("myvm", 8080));
        assert_eq!(parse_host("myvm.hutch.test", d), t("myvm", 80));
        assert_eq!(parse_host("myvm.hutch.test.", d), t("myvm", 80));
        assert_eq!(parse_host("1-a.hutch.test", d), t("a", 1));
        assert_eq!(parse_host("65535-a.hutch.test", d), t("a", 65535));
        // Six digits is no port: the whole label is the VM.
        assert_eq!(parse_host("123456-a.hutch.test", d), t("123456-a", 80));
        assert_eq!(parse_host("vm-8080.hutch.test", d), t("vm-8080", 80));
        assert_eq!(parse_host("0-a.hutch.test", d), None);
        assert_eq!(parse_host("65536-a.hutch.test", d), None);
        assert_eq!(parse_host("8080-.hutch.test", d), None);
        assert_eq!(parse_host("hutch.test", d), None);
        assert_eq!(parse_host("a.b.hutch.test", d), None);
        assert_eq!(parse_host("a.otherhutch.test", d), None);
        assert_eq!(parse_host("ahutch.test", d), None);
        assert_eq!(parse_host("a.example.com", d), None);
        assert_eq!(parse_host("[::1]:80", d), None);
        assert_eq!(parse_host("a_b.hutch.test", d), None);
        assert_eq!(parse_host("a.hutch.test:x", d), None);
        assert_eq!(parse_host("", d), None);
        assert_eq!(parse_host(".hutch.test", d), None);
        assert_eq!(parse_host("\u{e9}.hutch.test", d), None);
    }
}
