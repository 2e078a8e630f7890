//! `egressctl check [FILE] [--require-reasons]`: validates a policy file
//! without a daemon.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use egressd_policy::Policy;

use crate::text::count;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy file to check.
    #[arg(value_name = "FILE", default_value = "/etc/egressd/policy.toml")]
    pub file: PathBuf,
    /// Also fail when an allow rule has no `reason`.
    #[arg(long)]
    pub require_reasons: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let policy = match egressd_policy::load(&args.file) {
        Ok(policy) => policy,
        Err(err) => {
            // `FILE:LINE:COL: message` lines, which editors understand; an
            // unreadable file also names its cause.
            eprintln!("{}", crate::text::error_chain(&err));
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.require_reasons {
        let missing = egressd_policy::missing_reasons(&policy);
        if !missing.is_empty() {
            for diagnostic in &missing {
                eprintln!(
                    "{}",
                    diagnostic_line(
                        &args.file,
                        diagnostic.line,
                        diagnostic.column,
                        &diagnostic.message
                    )
                );
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    writeln!(io::stdout().lock(), "{}", summary(&args.file, &policy))?;
    Ok(ExitCode::SUCCESS)
}

fn diagnostic_line(file: &Path, line: usize, column: usize, message: &str) -> String {
    format!("{}:{line}:{column}: {message}", file.display())
}

/// `FILE: ok (N workloads, M allow rules)`.
fn summary(file: &Path, policy: &Policy) -> String {
    let rules: usize = policy
        .workloads
        .iter()
        .map(|workload| workload.allow.len())
        .sum();
    format!(
        "{}: ok ({}, {})",
        file.display(),
        count(policy.workloads.len(), "workload"),
        count(rules, "allow rule")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnostics_use_the_compiler_format() {
        assert_eq!(
            diagnostic_line(Path::new("p.toml"), 7, 3, "allow rule has no reason"),
            "p.toml:7:3: allow rule has no reason"
        );
    }
}
