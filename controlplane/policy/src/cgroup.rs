//! Cgroup path patterns that select a workload's processes.

use std::fmt;
use std::hash::{Hash, Hasher};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A cgroup v2 path relative to the mount point, e.g. `system.slice/vendor-agent.service`.
///
/// `*` matches within one path segment; a whole segment `**` matches any number of
/// segments, including none. A pattern matches only the paths it spells out:
/// `a/*` matches `a/b` but not `a/b/c` (descendant cgroups are the daemon's concern).
#[derive(Clone)]
pub struct CgroupPattern {
    pattern: String,
    /// `None` for literal patterns, which compare as plain strings.
    matcher: Option<GlobSet>,
}

impl CgroupPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty cgroup path".to_owned());
        }
        if let Some(rest) = text.strip_prefix('/') {
            let hint = rest.strip_prefix("sys/fs/cgroup/").unwrap_or(rest);
            return Err(format!(
                "cgroup paths are relative to the cgroup v2 mount: write {hint:?} without the leading '/'"
            ));
        }
        if text.ends_with('/') {
            return Err("cgroup path must not end with '/'".to_owned());
        }
        let mut glob_segments = Vec::new();
        for segment in text.split('/') {
            match segment {
                "" => return Err("empty path segment ('//')".to_owned()),
                "." | ".." => {
                    return Err(format!(
                        "{segment:?} segments are not allowed in cgroup paths"
                    ));
                }
                "**" => glob_segments.push("**".to_owned()),
                _ if segment.contains("**") => {
                    return Err(format!(
                        "'**' must be a whole path segment (in {segment:?}); use '*' within a segment"
                    ));
                }
                // Only '*' is special: escape '?', '[', '{' and friends, which cgroup
                // names may contain literally.
                _ => glob_segments.push(
                    segment
                        .split('*')
                        .map(globset::escape)
                        .collect::<Vec<_>>()
                        .join("*"),
                ),
            }
        }
        if !text.contains('*') {
            return Ok(CgroupPattern {
                pattern: text.to_owned(),
                matcher: None,
            });
        }
        let mut globs = vec![glob_segments.join("/")];
        // globset's trailing `/**` needs at least one segment; ours also matches zero.
        if glob_segments.len() > 1 && glob_segments.last().is_some_and(|s| s == "**") {
            globs.push(glob_segments[..glob_segments.len() - 1].join("/"));
        }
        let mut set = GlobSetBuilder::new();
        for glob in &globs {
            set.add(
                GlobBuilder::new(glob)
                    .literal_separator(true)
                    // systemd escapes ('\x2d') are literal backslashes in cgroup names.
                    .backslash_escape(false)
                    .build()
                    .map_err(|e| format!("invalid pattern: {e}"))?,
            );
        }
        let matcher = set.build().map_err(|e| format!("invalid pattern: {e}"))?;
        Ok(CgroupPattern {
            pattern: text.to_owned(),
            matcher: Some(matcher),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the cgroup at `relative_path` (relative to the cgroup v2 mount;
    /// a leading or trailing '/' is ignored) is selected by this pattern.
    pub fn matches(&self, relative_path: &str) -> bool {
        let path = relative_path.strip_prefix('/').unwrap_or(relative_path);
        let path = path.strip_suffix('/').unwrap_or(path);
        match &self.matcher {
            None => path == self.pattern,
            Some(matcher) => matcher.is_match(path),
        }
    }

    /// True when the pattern has no glob, so it names exactly one cgroup.
    pub fn is_literal(&self) -> bool {
        self.matcher.is_none()
    }

    /// The leading segments before the first one that contains a glob, so a caller
    /// can start its directory walk there: `system.slice` for `system.slice/*.service`,
    /// the whole path for a literal pattern, `""` for `**/x`.
    pub fn literal_prefix(&self) -> &str {
        let Some(star) = self.pattern.find('*') else {
            return &self.pattern;
        };
        match self.pattern[..star].rfind('/') {
            Some(slash) => &self.pattern[..slash],
            None => "",
        }
    }
}

impl PartialEq for CgroupPattern {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl Eq for CgroupPattern {}

impl Hash for CgroupPattern {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.pattern.hash(state);
    }
}

impl fmt::Debug for CgroupPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CgroupPattern").field(&self.pattern).finish()
    }
}

impl fmt::Display for CgroupPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> CgroupPattern {
        CgroupPattern::parse(text).expect("valid pattern")
    }

    #[test]
    fn literal_patterns_match_only_themselves() {
        let p = pattern("system.slice/vendor-agent.service");
        assert!(p.is_literal());
        assert_eq!(p.literal_prefix(), "system.slice/vendor-agent.service");
        assert!(p.matches("system.slice/vendor-agent.service"));
        assert!(p.matches("/system.slice/vendor-agent.service"));
        assert!(!p.matches("system.slice/vendor-agent.service/child"));
        assert!(!p.matches("system.slice"));
    }

    #[test]
    fn star_stays_within_one_segment() {
        let p = pattern("system.slice/*.service");
        assert!(!p.is_literal());
        assert_eq!(p.literal_prefix(), "system.slice");
        assert!(p.matches("system.slice/sshd.service"));
        assert!(p.matches("system.slice/a.b.service"));
        assert!(!p.matches("system.slice/sshd.socket"));
        assert!(!p.matches("system.slice/x/sshd.service"));
        assert!(!p.matches("user.slice/sshd.service"));
        let q = pattern("a/*");
        assert!(q.matches("a/b"));
        assert!(!q.matches("a/b/c"));
        assert!(!q.matches("a"));
    }

    #[test]
    fn double_star_spans_any_number_of_segments() {
        let p = pattern("kubepods/**");
        assert_eq!(p.literal_prefix(), "kubepods");
        assert!(p.matches("kubepods"));
        assert!(p.matches("kubepods/burstable"));
        assert!(p.matches("kubepods/burstable/pod1/ctr"));
        assert!(!p.matches("kubepods.slice/x"));
        assert!(!p.matches("other/kubepods/x"));

        let q = pattern("a/**/b");
        assert_eq!(q.literal_prefix(), "a");
        assert!(q.matches("a/b"));
        assert!(q.matches("a/x/b"));
        assert!(q.matches("a/x/y/b"));
        assert!(!q.matches("a/x/y/c"));
        assert!(!q.matches("a/b/c"));

        let r = pattern("**/docker-*.scope");
        assert_eq!(r.literal_prefix(), "");
        assert!(r.matches("docker-1.scope"));
        assert!(r.matches("system.slice/docker-1.scope"));
        assert!(!r.matches("system.slice/docker-1.scope/x"));
    }

    #[test]
    fn other_glob_characters_and_backslashes_are_literal() {
        let p = pattern(r"system.slice/system-systemd\x2dcryptsetup.slice/*");
        assert!(p.matches(r"system.slice/system-systemd\x2dcryptsetup.slice/a"));
        assert!(!p.matches("system.slice/system-systemdx2dcryptsetup.slice/a"));
        let q = pattern("a/b?[c]{d}/*");
        assert!(q.matches("a/b?[c]{d}/e"));
        assert!(!q.matches("a/bx[c]{d}/e"));
        assert!(!q.matches("a/b?c{d}/e"));
    }

    #[test]
    fn invalid_paths_are_rejected() {
        let cases = [
            ("", "empty"),
            ("/sys/fs/cgroup/system.slice", "\"system.slice\""),
            ("/system.slice", "leading '/'"),
            ("system.slice/", "end with '/'"),
            ("a//b", "empty path segment"),
            ("a/../b", "\"..\""),
            ("./a", "\".\""),
            ("a/b**", "whole path segment"),
            ("a/**x/c", "whole path segment"),
        ];
        for (text, expected) in cases {
            let error = CgroupPattern::parse(text).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
