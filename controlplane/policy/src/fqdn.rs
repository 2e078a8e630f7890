//! DNS name patterns of `fqdn` allow rules.

use std::fmt;
use std::net::IpAddr;

const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A DNS name (`api.example.com`) or a leading-label wildcard (`*.example.com`).
///
/// Stored lowercase without the trailing dot. `*.example.com` matches every name
/// below `example.com` at any depth, but not `example.com` itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnPattern {
    /// Normalized form as written, including a leading `*.` for wildcards.
    pattern: String,
    wildcard: bool,
}

impl FqdnPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        // One trailing dot is the absolute form of the same name.
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.is_empty() {
            return Err("empty name".to_owned());
        }
        if name == "*" {
            return Err(
                "`*` alone would match every name; use a cidr rule such as 0.0.0.0/0 instead"
                    .to_owned(),
            );
        }
        let (wildcard, suffix) = match name.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, name),
        };
        if suffix.contains('*') || (!wildcard && name.starts_with('*')) {
            return Err(
                "a wildcard is only allowed as the whole first label, as in *.example.com"
                    .to_owned(),
            );
        }
        if suffix.parse::<IpAddr>().is_ok() {
            return Err("this is an IP address; use a cidr rule for it".to_owned());
        }
        if name.len() > MAX_NAME_LEN {
            return Err(format!(
                "name is {} characters long; at most {MAX_NAME_LEN} are allowed",
                name.len()
            ));
        }
        for label in suffix.split('.') {
            if label.is_empty() {
                return Err("empty label (two dots in a row, or a leading dot)".to_owned());
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(format!(
                    "label {label:?} is {} characters long; at most {MAX_LABEL_LEN} are allowed",
                    label.len()
                ));
            }
            if let Some(bad) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
            {
                return Err(format!(
                    "invalid character {bad:?} in label {label:?}: use letters, digits, '-' or '_' \
                     (internationalized names in their xn-- form)"
                ));
            }
        }
        Ok(FqdnPattern {
            pattern: name.to_owned(),
            wildcard,
        })
    }

    /// Whether a resolved or queried name falls under this pattern (case-insensitive,
    /// trailing dot ignored).
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if !self.wildcard {
            return name.eq_ignore_ascii_case(&self.pattern);
        }
        let suffix = self.suffix();
        // Below the suffix: at least one character, then a dot, then the suffix.
        let Some(dot) = name.len().checked_sub(suffix.len() + 1) else {
            return false;
        };
        // Checking the dot byte first keeps the slice on a char boundary.
        dot > 0 && name.as_bytes()[dot] == b'.' && name[dot + 1..].eq_ignore_ascii_case(suffix)
    }

    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The normalized pattern, e.g. `*.example.com` or `api.example.com`.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Same as [`FqdnPattern::as_str`].
    pub fn name(&self) -> &str {
        &self.pattern
    }

    /// The domain the pattern covers: the name itself, or what follows `*.`.
    pub fn suffix(&self) -> &str {
        if self.wildcard {
            &self.pattern[2..]
        } else {
            &self.pattern
        }
    }
}

impl fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> FqdnPattern {
        FqdnPattern::parse(text).expect("valid pattern")
    }

    #[test]
    fn names_are_normalized() {
        let p = pattern("API.Example.COM.");
        assert_eq!(p.as_str(), "api.example.com");
        assert_eq!(p.to_string(), "api.example.com");
        assert_eq!(p.suffix(), "api.example.com");
        assert!(!p.is_wildcard());
        let w = pattern("*.Vendor-CDN.com");
        assert_eq!(w.name(), "*.vendor-cdn.com");
        assert_eq!(w.suffix(), "vendor-cdn.com");
        assert!(w.is_wildcard());
        assert_eq!(
            pattern("_srv._tcp.example.com").as_str(),
            "_srv._tcp.example.com"
        );
        assert_eq!(pattern("localhost").as_str(), "localhost");
    }

    #[test]
    fn exact_names_match_case_insensitively_with_or_without_trailing_dot() {
        let p = pattern("api.example.com");
        assert!(p.matches("api.example.com"));
        assert!(p.matches("API.EXAMPLE.com"));
        assert!(p.matches("api.example.com."));
        assert!(!p.matches("x.api.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("api.example.co"));
    }

    #[test]
    fn wildcards_match_any_depth_below_but_not_the_apex() {
        let w = pattern("*.example.com");
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.c.example.com"));
        assert!(w.matches("A.Example.Com."));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("example.com."));
        assert!(!w.matches(".example.com"));
        assert!(!w.matches("badexample.com"));
        assert!(!w.matches("a.example.org"));
        assert!(!w.matches("é.example.co"));
    }

    #[test]
    fn invalid_patterns_are_rejected_with_a_reason() {
        let cases = [
            ("", "empty name"),
            (".", "empty name"),
            ("*", "alone"),
            ("*.", "alone"),
            ("a.*.com", "first label"),
            ("*a.example.com", "first label"),
            ("a*.example.com", "first label"),
            ("*.*.example.com", "first label"),
            ("example..com", "empty label"),
            (".example.com", "empty label"),
            ("exa mple.com", "invalid character ' '"),
            ("bücher.de", "xn--"),
            ("10.0.0.1", "IP address"),
            ("::1", "IP address"),
        ];
        for (text, expected) in cases {
            let error = FqdnPattern::parse(text).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(
            FqdnPattern::parse(&long_label)
                .expect_err("long label")
                .contains("63")
        );
        assert!(FqdnPattern::parse(&format!("{}.com", "a".repeat(63))).is_ok());
        let long_name = ["a".repeat(63).as_str(); 4].join(".");
        assert_eq!(long_name.len(), 255);
        assert!(
            FqdnPattern::parse(&long_name)
                .expect_err("long name")
                .contains("253")
        );
    }
}
