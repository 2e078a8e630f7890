//! Errors and source positions.

use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based position in the policy file (column counts characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem found in the policy file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic on one line: a multi-line message (the toml crate's syntax errors have
    /// two) is joined with `: `, so every diagnostic prints as one `PATH:LINE:COL: message`.
    pub fn new(location: Location, message: impl Into<String>) -> Self {
        let message: String = message.into();
        let message = if message.contains('\n') {
            message
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join(": ")
        } else {
            message
        };
        Diagnostic {
            line: location.line,
            column: location.column,
            message,
        }
    }

    pub fn location(&self) -> Location {
        Location {
            line: self.line,
            column: self.column,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One line per diagnostic, `PATH:LINE:COLUMN: message`, so editors can jump to it.
    #[error("{}", DiagnosticList { path, diagnostics })]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

impl PolicyError {
    pub fn path(&self) -> &Path {
        match self {
            PolicyError::Io { path, .. } | PolicyError::Invalid { path, .. } => path,
        }
    }

    /// The diagnostics of an invalid file; empty for I/O errors.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            PolicyError::Io { .. } => &[],
            PolicyError::Invalid { diagnostics, .. } => diagnostics,
        }
    }
}

struct DiagnosticList<'a> {
    path: &'a Path,
    diagnostics: &'a [Diagnostic],
}

impl fmt::Display for DiagnosticList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{diagnostic}", self.path.display())?;
        }
        Ok(())
    }
}

/// Turns byte offsets (what toml spans are) into line/column.
pub(crate) struct SourceMap<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        SourceMap { text, line_starts }
    }

    pub(crate) fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self
            .line_starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        // Spans from toml are char boundaries; fall back to bytes if one is not.
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        Location {
            line: line.max(1),
            column: column + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_one_based_lines_and_char_columns() {
        let map = SourceMap::new("ab\nçd\n\nx");
        assert_eq!(map.location(0), Location { line: 1, column: 1 });
        assert_eq!(map.location(2), Location { line: 1, column: 3 });
        assert_eq!(map.location(3), Location { line: 2, column: 1 });
        // 'ç' is two bytes but one column.
        assert_eq!(map.location(5), Location { line: 2, column: 2 });
        assert_eq!(map.location(7), Location { line: 3, column: 1 });
        assert_eq!(map.location(8), Location { line: 4, column: 1 });
        assert_eq!(map.location(100), Location { line: 4, column: 2 });
    }

    #[test]
    fn invalid_display_prints_one_line_per_diagnostic() {
        let error = PolicyError::Invalid {
            path: PathBuf::from("/etc/egressd/policy.toml"),
            diagnostics: vec![
                Diagnostic::new(Location { line: 3, column: 7 }, "first"),
                Diagnostic::new(Location { line: 9, column: 1 }, "second"),
            ],
        };
        assert_eq!(
            error.to_string(),
            "/etc/egressd/policy.toml:3:7: first\n/etc/egressd/policy.toml:9:1: second"
        );
    }
}
